"""A dead process in a multi-process run: the survivors drop its rows and finish the run.

* Three CPU processes over gloo (one device, one worker each) run EASGD with
  momentum through :func:`coopjax.distributed.resilient_loop`; process 1 is
  SIGKILLed mid-run. The survivors must finish every step without a restart,
  and their rows of X and of the momentum must equal the NumPy reference
  (``benchmarks/bench_failover.py``: float64, written out) that removes worker 1
  at the failed step, re-splits the data over two workers and continues with
  EASGD's W_α′ for m′ = 2.
* In one process on 8 fake devices, :func:`coopjax.distributed.drop_devices`
  (the survivors' rebuild) equals :func:`coopjax.elastic.resize` of the
  unsharded state, row for row.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coopjax
from coopjax import compress
from coopjax import elastic
from coopjax import topology
from coopjax.parallel import distributed
from coopjax.parallel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_failover  # noqa: E402


def test_survivors_finish_and_match_numpy_with_the_dead_rows_dropped():
  if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
    pytest.skip("this jax has no jax_cpu_collectives_implementation option (gloo)")
  args = bench_failover.parse_args(
    ["--algorithm", "easgd", "--victim", "1", "--kill-at", "5", "--steps", "14", "--timeout", "60"]
    + ["--step-sleep", "0.2"]  # the kill lands between steps (see docs/elastic.md on CPUs)
  )
  try:
    result = bench_failover.run(args)
  except RuntimeError as e:
    text = str(e).lower()
    if "gloo" in text and any(u in text for u in ("not available", "unimplemented", "unknown")):
      pytest.skip(f"gloo CPU collectives are unavailable in this jaxlib: {e}")
    raise
  print(
    f"failed step {result['failed_step']}, detection {result['detection_seconds']:.2f} s, "
    f"recovery {result['recovery_seconds']:.2f} s"
  )
  assert result["survivor_steps"] == [14, 14]
  assert result["dropped_workers"] == [1] and result["num_workers_after"] == 2
  assert 5 < result["failed_step"] <= 14
  X, X_ref = np.asarray(result["X"]), np.asarray(result["X_reference"])
  assert X.shape == (3, args.dim)  # two workers and the anchor
  np.testing.assert_allclose(X, X_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result["momentum"], result["momentum_reference"], rtol=1e-4, atol=1e-6)
  # The reference is sensitive to the drop: keeping worker 2 instead of worker 0 differs.
  X_wrong, _ = bench_failover.numpy_reference(args, result["failed_step"], [0])
  assert np.max(np.abs(X_wrong - X)) > 1e-3


@pytest.mark.parametrize("name", ["easgd", "local_sgd_adam", "choco", "live_mask"])
def test_drop_devices_equals_resize_of_the_unsharded_state(name):
  """4 devices × 2 workers → devices 0, 2, 3 survive: rows 2 and 3 are dropped.

  ``live_mask``: worker 5 is masked (with_live_mask); it stays masked as the
  survivors' worker 3 (the replicated mask keeps the kept workers' flags).
  """
  m, steps = 8, 3
  if name == "choco":  # its s = W·x̂ is re-derived for the ring of the survivors
    make_tx = lambda m: coopjax.choco(  # noqa: E731
      optax.sgd(0.05), tau=1, W=topology.ring(m), compressor=compress.top_k(k=2), gamma=0.4
    )
  elif name == "easgd":
    make_tx = lambda m: coopjax.easgd(  # noqa: E731
      optax.sgd(0.05, momentum=0.9), tau=2, alpha=elastic.scale_alpha(0.1, 8, m), num_workers=m
    )
  elif name == "live_mask":
    make_tx = lambda m: coopjax.with_live_mask(  # noqa: E731
      coopjax.local_sgd(optax.sgd(0.05, momentum=0.9), tau=2, num_workers=m)
    )
  else:
    make_tx = lambda m: coopjax.local_sgd(optax.adam(0.05), tau=2, num_workers=m)  # noqa: E731
  tx = make_tx(m)
  devices = jax.devices()[:4]
  mesh = sharding.worker_mesh(devices=devices)
  rng = np.random.default_rng(0)
  X0 = coopjax.replicate(jnp.zeros(3), tx)
  X = coopjax.shard(X0, mesh, tx)
  state = sharding.init(tx, X, mesh)
  if name == "live_mask":
    state = coopjax.set_live(tx, state, np.arange(m) != 5)
  loss = lambda w, batch: 0.5 * jnp.mean((batch["x"] @ w - batch["y"]) ** 2)  # noqa: E731
  step = coopjax.make_step(loss, tx, mesh=mesh)
  for _ in range(steps):
    batch = {"x": rng.standard_normal((m, 4, 3), np.float32), "y": rng.standard_normal((m, 4))}
    X, state, _ = step(X, state, coopjax.shard_batch(jax.tree.map(np.float32, batch), mesh))
  new_mesh = sharding.worker_mesh(devices=[devices[0], devices[2], devices[3]])
  new_tx = make_tx(6)
  X_new, state_new = distributed.drop_devices(X, state, tx, new_tx, mesh, new_mesh)
  # The reference: the unsharded state, resized by the row map that drops workers 2 and 3.
  X_u = coopjax.unshard(X, mesh, tx)
  state_u = jax.device_get(state)  # the local state has one row per worker: no auxiliary copies
  X_ref, state_ref = elastic.resize(X_u, state_u, tx, new_tx, keep=[0, 1, 4, 5, 6, 7])
  np.testing.assert_array_equal(coopjax.unshard(X_new, new_mesh, new_tx), X_ref)
  for got, want in zip(jax.tree.leaves(state_new), jax.tree.leaves(state_ref), strict=True):
    if name == "choco":  # s re-derived by a dense mix of sharded vs unsharded copies
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if name == "choco":  # NumPy: s_i = Σ_j W′_ji x̂_j on the ring of the six survivors
    hat = np.asarray(state_new.hat, np.float64)
    ring = np.asarray(topology.ring(6))
    np.testing.assert_allclose(np.asarray(state_new.s), ring.T @ hat, rtol=1e-6, atol=1e-7)
  if name == "live_mask":  # worker 5 is the survivors' worker 3, still masked
    assert np.asarray(state_new.live).tolist() == [True, True, True, False, True, True]
  # And the run goes on over the three surviving devices.
  step = coopjax.make_step(loss, new_tx, mesh=new_mesh)
  batch = {"x": np.ones((6, 4, 3), np.float32), "y": np.ones((6, 4), np.float32)}
  X_new, state_new, _ = step(X_new, state_new, coopjax.shard_batch(batch, new_mesh))
  assert int(coopjax.step_count(state_new)) == steps + 1


def test_initialize_checks_recoverable_before_joining():
  with pytest.raises(TypeError, match="recoverable"):
    distributed.initialize("127.0.0.1:1", 2, 0, cpu_collectives=None, recoverable="yes")
  assert not jax.config.jax_enable_recoverability


def test_resilient_loop_refuses_donation():
  make_tx = lambda m: coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=m)  # noqa: E731
  mesh = sharding.worker_mesh(devices=jax.devices()[:2])
  tx = make_tx(2)
  X = coopjax.shard(coopjax.replicate(jnp.zeros(2), tx), mesh, tx)
  with pytest.raises(ValueError, match="donate"):
    distributed.resilient_loop(
      lambda w, b: jnp.sum(w), tx, X, sharding.init(tx, X, mesh), iter([]),
      make_tx=make_tx, make_shards=lambda m: None, num_steps=1, mesh=mesh,
      step_options={"donate": True},
    )  # fmt: skip


def test_resilient_loop_holds_the_data_of_quarantined_workers():
  """Quarantine inside the loop: the stream positions equal a manual loop's set_live (lags, X)."""
  from coopjax.training import data

  m, n = 4, 64
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, 3)).astype(np.float32)
  y = rng.standard_normal(n).astype(np.float32)
  x[data.split_iid(n, m, seed=0)[1][0], 0] = np.nan  # one example of worker 1 is broken
  make_tx = lambda m: coopjax.with_live_mask(  # noqa: E731
    coopjax.local_sgd(optax.sgd(0.05), tau=2, num_workers=m)
  )
  make_shards = lambda m: data.split_iid(n, m, seed=0)  # noqa: E731
  loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)  # noqa: E731
  options = dict(on_nonfinite="quarantine", readmit_after=100, log_every=1)
  mesh = sharding.worker_mesh(devices=jax.devices()[:2])
  tx = make_tx(m)
  X0 = coopjax.shard(coopjax.replicate(jnp.zeros(3), tx), mesh, tx)
  out = distributed.resilient_loop(
    loss, tx, X0, sharding.init(tx, X0, mesh),
    data.make_worker_batches(x, y, make_shards(m), 2, keys=("x", "y")),
    make_tx=make_tx, make_shards=make_shards, num_steps=12, mesh=mesh, step_options=options,
  )  # fmt: skip
  # The reference: the same steps by hand, the stream held as docs/failures.md says.
  batches = data.make_worker_batches(x, y, make_shards(m), 2, keys=("x", "y"))
  X, state = X0, sharding.init(tx, X0, mesh)
  step = coopjax.make_step(loss, tx, mesh=mesh, **options)
  for _ in range(12):
    X, state, metrics = step(X, state, coopjax.shard_batch(next(batches), mesh))
    batches.set_live(np.asarray(metrics["live"]))
  assert not np.asarray(state.live)[1] and np.asarray(state.live).sum() == 3
  assert out.batches.state == batches.state and batches.state.lags[1] > 0
  np.testing.assert_array_equal(np.asarray(out.X), np.asarray(X))
