"""The one step body: metrics on both paths, the layout given once, errors that name the fix."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import diagnostics
from coopjax import mixing
from coopjax import step as step_module
from coopjax.parallel import sharding
from coopjax.workers import sum_rows

LR = 0.05
D = 8


@pytest.fixture(scope="module")
def mesh():
  return coopjax.worker_mesh(D)


def described(tx, layout, mix_mask=None):
  """``tx`` carrying its layout and mix_mask, as every coopjax factory's result does."""
  attrs = {"__slots__": (), "layout": layout, "mix_mask": mix_mask}
  cls = type("Described", (optax.GradientTransformationExtraArgs,), attrs)
  return cls(tx.init, tx.update)


def np_consensus(rows):
  """Σ_i ‖x_i − mean‖² of a [n, d] float64 array."""
  return float(np.sum((rows - rows.mean(0)) ** 2))


# ----------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7, 12, 16])
def test_sum_rows_and_worker_mean_equal_numpy(n):
  x = np.random.default_rng(n).normal(size=(n, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(sum_rows(x)), x.astype(np.float64).sum(0), rtol=1e-5)
  mean = mixing.worker_mean({"a": jnp.asarray(x)})["a"]
  np.testing.assert_allclose(np.asarray(mean), x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
  lowp = sum_rows(jnp.asarray(x, jnp.bfloat16))
  assert lowp.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(lowp, np.float32), x.sum(0), rtol=2e-2, atol=5e-2)


def test_plain_worker_sum_has_no_leading_axis_reduction():
  """The sum lowers to adds of row slices; XLA never reduces over the worker axis."""
  x = jnp.ones((4, 64, 32))
  hlo = jax.jit(lambda x: mixing.worker_sum(x)).lower(x).compile().as_text()
  assert "reduce(" not in hlo.replace("all-reduce(", "")


# ------------------------------------------------------------------------ consensus distance


def test_consensus_distance_mask_against_numpy():
  rng = np.random.default_rng(0)
  X = {"w": rng.normal(size=(5, 3)), "stats": rng.normal(size=(5, 2)) * 10}
  X = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), X)
  w, s = (np.asarray(X[k], np.float64) for k in ("w", "stats"))
  np.testing.assert_allclose(
    float(coopjax.consensus_distance(X)), np_consensus(w) + np_consensus(s), rtol=1e-5
  )
  mask = {"w": True, "stats": False}
  np.testing.assert_allclose(float(coopjax.consensus_distance(X, mask)), np_consensus(w), rtol=1e-5)
  tx = described(
    coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=5), coopjax.Layout(5), mix_mask=mask
  )
  np.testing.assert_allclose(float(coopjax.consensus_distance(X, tx)), np_consensus(w), rtol=1e-5)
  assert float(coopjax.consensus_distance(X, True)) == pytest.approx(
    np_consensus(w) + np_consensus(s), rel=1e-5
  )
  with pytest.raises(ValueError, match="prefix of X"):
    coopjax.consensus_distance(X, {"w": True})
  with pytest.raises(TypeError, match="booleans"):
    coopjax.consensus_distance(X, {"w": 1, "stats": 0})


def test_step_counts_mixed_leaves_only_by_default():
  """Leaves kept per worker (mix_mask False) never enter the step's consensus distance."""
  m = 4
  mask = {"w": True, "c": False}
  base = coopjax.cooperative(optax.sgd(LR), tau=2, W=coopjax.topology.complete(m), mix_mask=mask)
  tx = base  # every coopjax transformation carries its mix_mask and layout
  assert tx.mix_mask == mask and tx.layout == coopjax.Layout(m)
  A, b = ref.make_batches(3, m)
  X = coopjax.replicate(ref.init_params(), tx)
  state = tx.init(X)
  masked = coopjax.make_step(ref.loss_fn, tx)
  every = coopjax.make_step(ref.loss_fn, tx, consensus_mask=True)
  for k in range(3):
    batch = (jnp.asarray(A[k]), jnp.asarray(b[k]))
    _, _, met_all = every(X, state, batch)
    X, state, met = masked(X, state, batch)
    rows = ref.flat(X)
    np.testing.assert_allclose(
      float(met["consensus_distance"]), np_consensus(rows[:, :-1]), rtol=1e-4, atol=1e-9
    )
    np.testing.assert_allclose(
      float(met_all["consensus_distance"]), np_consensus(rows), rtol=1e-4, atol=1e-9
    )
  assert np_consensus(rows[:, -1:]) > 0  # the kept-local leaf does differ


def test_sharded_metrics_equal_unsharded_with_auxiliary_rows(mesh):
  """The same metrics on both paths (log_every=1); EASGD's anchor counts once in the consensus
  distance."""
  m = 16
  tx = coopjax.easgd(optax.sgd(LR), tau=2, alpha=0.05, num_workers=m)
  layout = coopjax.Layout(m, 1)
  A, b = ref.make_batches(3, m)
  Xu = coopjax.replicate(ref.init_params(), layout)
  su = tx.init(Xu)
  Xs = coopjax.shard(Xu, mesh, layout)
  ss = sharding.init(tx, Xs, mesh, num_aux=1)
  plain = coopjax.make_step(ref.loss_fn, tx)
  sharded = coopjax.make_step(ref.loss_fn, tx, mesh=mesh, log_every=1)
  for k in range(3):
    batch = (jnp.asarray(A[k]), jnp.asarray(b[k]))
    Xu, su, mu = plain(Xu, su, batch)
    Xs, ss, ms = sharded(Xs, ss, coopjax.shard_batch(batch, mesh))
    jax.block_until_ready(Xs)
    assert sorted(mu) == sorted(ms)
    np.testing.assert_allclose(
      float(mu["consensus_distance"]), np_consensus(ref.flat(Xu)), rtol=1e-4
    )
    for key in ("loss", "consensus_distance", "avg_grad_norm"):
      np.testing.assert_allclose(float(ms[key]), float(mu[key]), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
    ref.flat(coopjax.unshard(Xs, mesh, layout)), ref.flat(Xu), rtol=2e-5, atol=2e-6
  )


def test_log_every_computes_reducing_metrics_on_logged_steps_only(mesh):
  m = 8
  tx = coopjax.local_sgd(optax.sgd(LR), tau=3, num_workers=m)
  A, b = ref.make_batches(4, m)
  X0 = coopjax.replicate(ref.init_params(), m)
  every, logged = (
    coopjax.make_step(ref.loss_fn, tx),
    coopjax.make_step(ref.loss_fn, tx, log_every=2),
  )
  X1 = X2 = X0
  s1 = s2 = tx.init(X0)
  for k in range(4):
    batch = (jnp.asarray(A[k]), jnp.asarray(b[k]))
    X1, s1, m1 = every(X1, s1, batch)
    X2, s2, m2 = logged(X2, s2, batch)
    for key in ("loss", "consensus_distance", "avg_grad_norm"):
      if (k + 1) % 2 == 0:
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-6)
      else:
        assert np.isnan(float(m2[key]))
  # On a mesh their all-reduces then sit in a branch: off-steps communicate nothing.
  Xs = coopjax.shard(X0, mesh)
  step = coopjax.make_step(
    ref.loss_fn, coopjax.local_sgd(optax.sgd(LR), tau=10**6, num_workers=m), mesh=mesh, log_every=10
  )
  state = sharding.init(tx, Xs, mesh)
  rep = coopjax.comm_report(step, Xs, state, coopjax.shard_batch((A[0], b[0]), mesh))
  assert rep and not rep.every_step()
  with pytest.raises(ValueError, match="log_every"):
    coopjax.make_step(ref.loss_fn, tx, log_every=0)


def test_default_sharded_step_adds_no_collective_to_off_steps(mesh):
  """With a mesh the default computes the reducing metrics every MESH_LOG_EVERY steps: local SGD
  with a long period communicates nothing on the other steps; on step 100 they are right."""
  m = 8
  tx = coopjax.local_sgd(optax.sgd(LR), tau=10**6, num_workers=m)
  A, b = ref.make_batches(1, m)
  Xs = coopjax.shard(coopjax.replicate(ref.init_params(), m), mesh)
  state = sharding.init(tx, Xs, mesh)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  batch = coopjax.shard_batch((A[0], b[0]), mesh)
  rep = coopjax.comm_report(step, Xs, state, batch)
  assert rep and not rep.every_step()
  assert step_module.MESH_LOG_EVERY == 100
  plain = coopjax.make_step(ref.loss_fn, tx)
  Xu, su = coopjax.replicate(ref.init_params(), m), tx.init(coopjax.replicate(ref.init_params(), m))
  for k in range(1, 101):
    Xs, state, ms = step(Xs, state, batch)
    Xu, su, mu = plain(Xu, su, (A[0], b[0]))
    if k < 100:
      assert np.isnan(float(ms["consensus_distance"])) and np.isfinite(float(mu["loss"]))
  for key in ("loss", "consensus_distance", "avg_grad_norm"):
    np.testing.assert_allclose(float(ms[key]), float(mu[key]), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- the layout


def test_layout_given_once(mesh):
  m, v = 16, 1
  tx = coopjax.easgd(optax.sgd(LR), tau=2, alpha=0.05, num_workers=m)
  layout = coopjax.Layout(m, v)
  X = coopjax.replicate(ref.init_params(), layout)
  assert X["w"].shape == (m + v, ref.D)
  X = jax.tree.map(
    lambda a: a + jnp.arange(m + v, dtype=a.dtype).reshape((-1,) + (1,) * (a.ndim - 1)), X
  )
  Xs = coopjax.shard(X, mesh, layout)
  np.testing.assert_array_equal(ref.flat(coopjax.unshard(Xs, mesh, layout)), ref.flat(X))
  np.testing.assert_array_equal(ref.flat(coopjax.unshard(Xs, mesh, num_aux=v)), ref.flat(X))
  described_tx = tx  # tx.layout is Layout(m, v)
  assert tx.layout == layout
  state = sharding.init(described_tx, Xs, mesh)  # v from tx.layout
  assert int(coopjax.step_count(state)) == 0
  u = coopjax.average(X, layout, workers_only=True)
  np.testing.assert_allclose(
    ref.flat(jax.tree.map(lambda a: a[None], u))[0], ref.flat(X)[:m].mean(0), rtol=1e-6
  )
  np.testing.assert_allclose(
    ref.flat(jax.tree.map(lambda a: a[None], coopjax.average(X, described_tx, workers_only=True)))[
      0
    ],
    ref.flat(X)[:m].mean(0),
    rtol=1e-6,
  )


def test_forgetting_the_layout_is_an_error_naming_the_fix(mesh):
  m, v = 16, 1
  layout = coopjax.Layout(m, v)
  X = coopjax.replicate(ref.init_params(), layout)
  Xs = coopjax.shard(X, mesh, layout)
  # unshard of an EASGD state without the layout: never the interleaved anchor copies.
  with pytest.raises(ValueError, match=r"coopjax\.Layout"):
    coopjax.unshard(Xs, mesh)
  # averaging the workers only needs to know which rows are the anchor.
  with pytest.raises(ValueError, match=r"coopjax\.Layout"):
    coopjax.average(X, workers_only=True)
  # m = 4 + 1 rows on 4 devices: not "m=5 workers".
  small = coopjax.replicate(ref.init_params(), coopjax.Layout(4, 1))
  with pytest.raises(ValueError, match=r"coopjax\.Layout") as err:
    coopjax.shard(small, coopjax.worker_mesh(4))
  assert "m=5" not in str(err.value)
  assert coopjax.shard(small, coopjax.worker_mesh(4), coopjax.Layout(4, 1))["w"].shape == (8, ref.D)
  # a layout that disagrees with X
  with pytest.raises(ValueError, match="rows"):
    coopjax.shard(X, mesh, coopjax.Layout(8, 1))
  # one row per device is unambiguous: workers only
  Xw = coopjax.replicate(ref.init_params(), D)
  np.testing.assert_array_equal(
    ref.flat(coopjax.unshard(coopjax.shard(Xw, mesh), mesh)), ref.flat(Xw)
  )


def test_step_checks_x_against_the_transformations_layout():
  m = 4
  tx = described(
    coopjax.easgd(optax.sgd(LR), tau=2, alpha=0.1, num_workers=m), coopjax.Layout(m, 1)
  )
  A, b = ref.make_batches(1, m)
  X = coopjax.replicate(ref.init_params(), m)  # the anchor forgotten
  step = coopjax.make_step(ref.loss_fn, tx)
  with pytest.raises(ValueError, match=r"tx.layout.*replicate\(params, tx\)"):
    step(X, None, (A[0], b[0]))
  A3, b3 = ref.make_batches(1, 3)
  X = coopjax.replicate(ref.init_params(), tx)
  with pytest.raises(
    ValueError, match=r"batch has leading axis 3 but tx has 4 workers \(tx.layout\)"
  ):
    step(X, tx.init(X), (A3[0], b3[0]))


def test_sharded_step_names_a_batch_with_the_wrong_number_of_workers(mesh):
  """The batch is at fault, not X: the message names the batch and the m of tx."""
  m = 2 * D
  tx = coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=m)
  X = coopjax.shard(coopjax.replicate(ref.init_params(), tx), mesh, tx)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  A, b = ref.make_batches(1, 2 * m)
  with pytest.raises(ValueError, match=rf"batch has leading axis {2 * m} but tx has {m} workers"):
    step(X, coopjax.sharding.init(tx, X, mesh), (A[0], b[0]))


# --------------------------------------------------------------------- errors in the trace


def _plain(loss_fn, **kwargs):
  m = 4
  tx = coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=m)
  X = coopjax.replicate(ref.init_params(), m)
  A, b = ref.make_batches(1, m)
  step = coopjax.make_step(loss_fn, tx, **kwargs)
  return lambda batch=(A[0], b[0]): step(X, tx.init(X), batch)


def test_loss_returning_a_vector_names_loss_fn():
  def per_example(params, batch):
    A, b = batch
    return 0.5 * (A @ params["w"] + params["c"] - b) ** 2

  with pytest.raises(ValueError, match="loss_fn must return one scalar.*jnp.mean"):
    _plain(per_example)()


def test_loss_returning_a_tuple_names_has_aux():
  with_aux = lambda p, batch: (ref.loss_fn(p, batch), {"n": jnp.ones(())})
  with pytest.raises(TypeError, match="has_aux=True"):
    _plain(with_aux)()
  _, _, met = _plain(with_aux, has_aux=True)()  # the fix works
  assert met["aux"]["n"].shape == (4,)
  with pytest.raises(TypeError, match="has_aux"):
    _plain(ref.loss_fn, has_aux=True)()


def test_batch_without_the_worker_axis_is_refused():
  """(A [B, d], b [B]) with B = m: a per-worker scalar label and no common example axis."""
  m = 4
  A, b = ref.make_batches(1, 1, batch=m)
  no_axis = (A[0, 0], b[0, 0])  # shapes (4, 3) and (4,)
  with pytest.raises(ValueError, match="worker axis.*check_batch=False"):
    _plain(ref.loss_fn)(no_axis)
  with pytest.raises(ValueError, match="leading axis 3 but tx has 4 workers"):
    tx = described(coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=m), coopjax.Layout(m))
    X = coopjax.replicate(ref.init_params(), tx)
    A3, b3 = ref.make_batches(1, 3)
    coopjax.make_step(ref.loss_fn, tx)(X, tx.init(X), (A3[0], b3[0]))
  # One-hot targets [B, C] next to [B, d]: the leading sizes disagree.
  onehot = lambda p, batch: jnp.mean((batch[0] @ p["w"] + p["c"]) * batch[1][..., 0])
  with pytest.raises(ValueError, match="check_batch=False"):
    _plain(onehot)((A[0, 0], np.ones((m, 2), np.float32)))
  _plain(onehot, check_batch=False)((A[0, 0], np.ones((m, 2), np.float32)))  # the opt-out
  # An integer per worker (its index) next to a vector is allowed.
  indexed = lambda p, batch: jnp.sum((p["w"] - batch[1]) ** 2) + 0.0 * batch[0]
  _, _, met = _plain(indexed)((np.arange(m), np.ones((m, 3), np.float32)))
  assert met["worker_loss"].shape == (m,)
  # A per-worker PRNG key is no example leaf.
  keyed = lambda p, batch: ref.loss_fn(p, batch[:2])
  A, b = ref.make_batches(1, m)
  keys = jax.random.split(jax.random.key(0), m)
  _, _, met = _plain(keyed)((A[0], b[0], keys))
  assert met["worker_loss"].shape == (m,)


def test_sharded_step_errors_name_the_fix(mesh):
  m = 8
  tx = coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=m)
  Xs = coopjax.shard(coopjax.replicate(ref.init_params(), m), mesh)
  state = sharding.init(tx, Xs, mesh)
  A, b = ref.make_batches(1, m)
  vector = lambda p, batch: (batch[0] @ p["w"] - batch[1]) ** 2
  with pytest.raises(ValueError, match="loss_fn must return one scalar"):
    coopjax.make_step(vector, tx, mesh=mesh)(Xs, state, (A[0], b[0]))
  with pytest.raises(ValueError, match=r"batch has leading axis 12 but tx has 8 workers"):
    A12, b12 = ref.make_batches(1, 12)
    coopjax.make_step(ref.loss_fn, tx, mesh=mesh)(Xs, state, (A12[0], b12[0]))


# ------------------------------------------------------------------ placement and the guard


def test_unplaced_batch_is_placed_by_the_step(mesh):
  m = 8
  tx = coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=m)
  A, b = ref.make_batches(2, m)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  X0 = coopjax.shard(coopjax.replicate(ref.init_params(), m), mesh)
  out = {}
  for name, place in {
    "shard_batch": lambda batch: coopjax.shard_batch(batch, mesh),
    "numpy": lambda batch: batch,
    "one_device": lambda batch: jax.device_put(batch, jax.devices()[0]),
  }.items():
    X, state = X0, sharding.init(tx, X0, mesh)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      for k in range(2):
        X, state, _ = step(X, state, place((A[k], b[k])))
        jax.block_until_ready(X)
    out[name] = ref.flat(coopjax.unshard(X, mesh))
    moved = [w for w in caught if "shard_batch" in str(w.message)]
    assert bool(moved) == (name == "one_device"), name
  np.testing.assert_array_equal(out["numpy"], out["shard_batch"])
  np.testing.assert_array_equal(out["one_device"], out["shard_batch"])


def test_state_committed_to_one_device_is_an_error_naming_the_fix(mesh):
  # e.g. a checkpoint restored with a target built from an unplaced state
  m = 8
  tx = coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=m)
  A, b = ref.make_batches(1, m)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  X = jax.device_put(coopjax.replicate(ref.init_params(), m), jax.devices()[1])
  with pytest.raises(ValueError, match=r"committed to devices other.*coopjax.shard\(X, mesh, tx\)"):
    step(X, tx.init(X), coopjax.shard_batch((A[0], b[0]), mesh))


def test_sharded_step_waits_periodically_on_cpu_devices(mesh, monkeypatch):
  """Unwaited loops of steps with collectives deadlock on fake CPU devices: the step waits."""
  m = 8
  tx = coopjax.sync_sgd(optax.sgd(LR), num_workers=m)  # an all-reduce on every step
  X = coopjax.shard(coopjax.replicate(ref.init_params(), m), mesh)
  state = sharding.init(tx, X, mesh)
  A, b = ref.make_batches(1, m)
  batch = coopjax.shard_batch((A[0], b[0]), mesh)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  waits = []
  real = jax.block_until_ready
  monkeypatch.setattr(step_module.jax, "block_until_ready", lambda x: waits.append(1) or real(x))
  calls = 12 * step_module.BLOCK_EVERY  # well past the ~35-63 unwaited calls that deadlock
  for _ in range(calls):
    X, state, _ = step(X, state, batch)
  monkeypatch.undo()
  jax.block_until_ready(X)
  assert len(waits) == calls // step_module.BLOCK_EVERY
  assert int(coopjax.step_count(state)) == calls


def test_diagnostics_flags_on_the_sharded_step_with_an_anchor(mesh):
  m = 16
  tx = coopjax.easgd(optax.sgd(LR), tau=2, alpha=0.05, num_workers=m)
  layout = coopjax.Layout(m, 1)
  Xs = coopjax.shard(coopjax.replicate(ref.init_params(), layout), mesh, layout)
  state = sharding.init(tx, Xs, mesh, num_aux=1)
  A, b = ref.make_batches(1, m)
  A[0, 3, 0, 0] = np.nan
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh, check_finite=True)
  _, _, met = step(Xs, state, coopjax.shard_batch((A[0], b[0]), mesh))
  assert np.asarray(met["nonfinite_workers"]).tolist() == [i == 3 for i in range(m)]
  assert met["nonfinite_rows"].shape == (m + 1,)
  assert bool(np.asarray(met["nonfinite_rows"])[3]) and not np.asarray(met["nonfinite_rows"])[-1]
  assert diagnostics.check_finite(met, policy="skip") == [3]
