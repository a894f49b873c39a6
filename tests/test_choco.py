"""CHOCO-SGD against NumPy re-derivations and its special cases (cooperative, delayed, local)."""

import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import compress
from coopjax import topology

LR, MOMENTUM = 0.05, 0.9
KEY = jax.random.key(7)


COMPRESSORS = {
  "identity": compress.identity(),
  "top_k": compress.top_k(fraction=0.34),  # 1 of w's 3 coordinates, c whole
  "qsgd": compress.qsgd(2),  # random levels drawn from the message keys
  "random_k": compress.random_k(fraction=0.5, unbiased=True),
  "sign": compress.scaled_sign(),
  "int8": compress.int8(),
  "int4": compress.int4(),
}


def np_compress(compressor, x_flat, key, step, sender):
  """Q of one worker's flat model [w (D), c], leaf by leaf, with the project's message keys.

  Leaf keys follow ``jax.tree.leaves`` order: ``c`` (leaf 0) before ``w`` (leaf 1).
  """
  if compressor.name not in _ROUNDTRIPS:
    _ROUNDTRIPS[compressor.name] = jax.jit(
      lambda x, k: compressor.decode(compressor.encode(x, k), x, k)
    )
  roundtrip = _ROUNDTRIPS[compressor.name]
  mk = compress.message_key(key, step, sender)
  out = []
  for lo, hi, shape, leaf in [(0, ref.D, (ref.D,), 1), (ref.D, ref.D + 1, (), 0)]:
    x = jnp.asarray(x_flat[lo:hi].reshape(shape), jnp.float32)
    out.append(np.asarray(roundtrip(x, jax.random.fold_in(mk, leaf)), np.float64).ravel())
  return np.concatenate(out)


_ROUNDTRIPS = {}


def x0_rows(m, spread=0.5, seed=3):
  """Distinct initial rows (flat [m, D + 1]) and the same as a stacked pytree."""
  rng = np.random.default_rng(seed)
  flat = np.tile(ref.flat(coopjax.replicate(ref.init_params(), 1))[0], (m, 1))
  flat = (flat + spread * rng.normal(size=flat.shape)).astype(np.float32)
  X = {"w": jnp.asarray(flat[:, : ref.D]), "c": jnp.asarray(flat[:, ref.D])}
  return flat.astype(np.float64), X


def choco_reference(x0, W, tau, gamma, A, b, compressor, order, hat_init, key):
  """CHOCO-SGD in NumPy with momentum-SGD local steps (optax.sgd(LR, momentum=MOMENTUM))."""
  W = np.asarray(W, np.float64)
  m = W.shape[0]
  X = np.array(x0, np.float64)
  buf = np.zeros_like(X)
  hat = np.zeros_like(X) if hat_init == "zeros" else X.copy()
  s = W.T @ hat
  for k in range(1, A.shape[0] + 1):
    for i in range(m):
      buf[i] = MOMENTUM * buf[i] + ref.np_grad(X[i], A[k - 1, i], b[k - 1, i])
      X[i] = X[i] - LR * buf[i]
    if k % tau:
      continue
    if order == "overlap":
      X = X + gamma * (s - hat)
    q = np.stack([np_compress(compressor, X[i] - hat[i], key, k, i) for i in range(m)])
    hat = hat + q
    s = s + W.T @ q
    if order == "paper":
      X = X + gamma * (s - hat)
  return X, hat, s


@pytest.mark.parametrize(
  "order,hat_init,name",
  [
    ("paper", "zeros", "top_k"),
    ("paper", "x0", "qsgd"),
    ("overlap", "zeros", "qsgd"),
    ("overlap", "x0", "top_k"),
  ],
)
def test_choco_matches_numpy_with_momentum(order, hat_init, name):
  m, tau, gamma, steps = 4, 2, 0.6, 7
  A, b = ref.make_batches(steps, m, seed=11)
  x0, X = x0_rows(m)
  W = topology.ring(m)
  compressor = COMPRESSORS[name]
  tx = coopjax.choco(
    optax.sgd(LR, momentum=MOMENTUM),
    tau=tau,
    W=W,
    compressor=compressor,
    gamma=gamma,
    order=order,
    hat_init=hat_init,
    key=KEY,
  )
  X, state = ref.run_from(tx, X, A, b)
  xs, hat, s = choco_reference(x0, W, tau, gamma, A, b, compressor, order, hat_init, KEY)
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ref.flat(state.hat), hat, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ref.flat(state.s), s, rtol=1e-4, atol=1e-5)
  assert np.abs(hat - xs).max() > 1e-3  # the copies lag: the compressor dropped something


@pytest.mark.parametrize("hat_init", ["zeros", "x0"])
def test_identity_gamma1_paper_order_is_cooperative(hat_init):
  m, tau, steps = 4, 2, 7
  A, b = ref.make_batches(steps, m, seed=12)
  _, X = x0_rows(m)
  local = optax.sgd(LR, momentum=MOMENTUM)
  W = topology.ring(m)
  Xc, _ = ref.run_from(
    coopjax.choco(
      local, tau=tau, W=W, compressor=compress.identity(), gamma=1.0, hat_init=hat_init
    ),
    X,
    A,
    b,
  )
  Xr, _ = ref.run_from(coopjax.cooperative(local, tau=tau, W=W), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xr), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hat_init,replicated", [("x0", False), ("zeros", True)])
def test_identity_gamma1_overlap_order_is_delayed(hat_init, replicated):
  m, tau, steps = 4, 2, 7
  A, b = ref.make_batches(steps, m, seed=13)
  _, X = x0_rows(m, spread=0.0 if replicated else 0.5)
  local = optax.sgd(LR, momentum=MOMENTUM)
  W = topology.ring(m)
  tx = coopjax.choco(
    local,
    tau=tau,
    W=W,
    compressor=compress.identity(),
    gamma=1.0,
    order="overlap",
    hat_init=hat_init,
  )
  Xc, sc = ref.run_from(tx, X, A, b)
  Xd, sd = ref.run_from(coopjax.delayed(local, tau=tau, W=W), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xd), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref.flat(sc.hat), ref.flat(sd.pending), rtol=1e-5, atol=1e-6)


def test_overlap_order_with_zero_copies_differs_from_delayed_on_distinct_rows():
  """With x̂ = 0 the first overlap mix adds γ(s − x̂) = 0 where delayed mixes X_0."""
  m, tau, steps = 4, 2, 2
  A, b = ref.make_batches(steps, m, seed=13)
  _, X = x0_rows(m)
  local = optax.sgd(LR)
  W = topology.ring(m)
  tx = coopjax.choco(
    local, tau=tau, W=W, compressor=compress.identity(), gamma=1.0, order="overlap"
  )
  Xc, _ = ref.run_from(tx, X, A, b)
  Xl, _ = ref.run_from(
    coopjax.choco(local, tau=tau, W=W, compressor=compress.identity(), gamma=0.0), X, A, b
  )
  Xd, _ = ref.run_from(coopjax.delayed(local, tau=tau, W=W), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xl), rtol=1e-6, atol=1e-6)  # no move yet
  assert np.abs(ref.flat(Xc) - ref.flat(Xd)).max() > 1e-2


@pytest.mark.parametrize("order", ["paper", "overlap"])
def test_gamma0_is_local_steps_only(order):
  m, tau, steps = 4, 2, 6
  A, b = ref.make_batches(steps, m, seed=14)
  _, X = x0_rows(m)
  local = optax.sgd(LR, momentum=MOMENTUM)
  tx = coopjax.choco(
    local, tau=tau, W=topology.ring(m), compressor=COMPRESSORS["top_k"], gamma=0.0, order=order
  )
  Xc, _ = ref.run_from(tx, X, A, b)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the identity W warns: no communication
    Xi, _ = ref.run_from(coopjax.cooperative(local, tau=tau, W=np.eye(m)), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xi), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order,hat_init", [("paper", "zeros"), ("overlap", "x0")])
def test_every_mix_preserves_the_worker_mean(order, hat_init):
  """Doubly stochastic W: Σ_i s_i = Σ_i x̂_i always, so mean(X) after a mix = mean(x½)."""
  m, tau, steps = 6, 1, 5
  A, b = ref.make_batches(steps, m, seed=15)
  _, X = x0_rows(m)
  local = optax.sgd(LR)  # x½ = X − LR·g
  W = topology.exponential(m)
  tx = coopjax.choco(
    local,
    tau=tau,
    W=W,
    compressor=COMPRESSORS["qsgd"],
    gamma=0.7,
    order=order,
    hat_init=hat_init,
  )
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx)
  grad = jax.vmap(jax.grad(ref.loss_fn))
  for k in range(steps):
    batch = (jnp.asarray(A[k]), jnp.asarray(b[k]))
    half = jax.tree.map(lambda x, g: x - LR * g, X, grad(X, batch))
    X, state, _ = step(X, state, batch)
    np.testing.assert_allclose(ref.flat(X).mean(0), ref.flat(half).mean(0), atol=2e-6)
    np.testing.assert_allclose(ref.flat(state.s).sum(0), ref.flat(state.hat).sum(0), atol=2e-5)
    if k > 0:  # (overlap with zero copies: the first mix only sends)
      assert np.abs(ref.flat(X) - ref.flat(half)).max() > 1e-4  # the mix moved the rows


def test_warmup_then_identity_is_cooperative_with_warmup():
  m, tau, steps, warm = 4, 2, 7, 2
  A, b = ref.make_batches(steps, m, seed=16)
  _, X = x0_rows(m)
  local = optax.sgd(LR, momentum=MOMENTUM)
  W = topology.ring(m)
  Xc, _ = ref.run_from(
    coopjax.choco(
      local, tau=tau, W=W, compressor=compress.identity(), gamma=1.0, warmup_steps=warm
    ),
    X,
    A,
    b,
  )
  Xr, _ = ref.run_from(coopjax.cooperative(local, tau=tau, W=W, warmup_steps=warm), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xr), rtol=1e-5, atol=1e-6)


def test_mix_mask_leaves_keep_rows_and_copies():
  m, tau, steps = 4, 1, 3
  A, b = ref.make_batches(steps, m, seed=17)
  _, X = x0_rows(m)
  local = optax.sgd(LR)
  mask = {"w": True, "c": False}
  W = topology.ring(m)
  Xc, state = ref.run_from(
    coopjax.choco(local, tau=tau, W=W, compressor=compress.identity(), gamma=1.0, mix_mask=mask),
    X,
    A,
    b,
  )
  Xr, _ = ref.run_from(coopjax.cooperative(local, tau=tau, W=W, mix_mask=mask), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xr), rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(state.hat["c"])) and not np.any(np.asarray(state.s["c"]))


def test_comm_prices_the_payload():
  m = 8
  tx = coopjax.choco(
    optax.sgd(LR), tau=2, W=topology.ring(m), compressor=COMPRESSORS["top_k"], gamma=0.5
  )
  X = {"w": jnp.zeros((m, 100)), "b": jnp.zeros((m, 10))}
  state = tx.init(X)
  # top-k 0.34: 34 + 3 kept values, each a float32 value and an int32 index, over 110 floats.
  fraction = (34 + 3) * 2 / 110
  assert tx.comm(1, state).collective == "none"
  cost = tx.comm(2, state)
  assert cost.collective == "neighbor_exchange" and cost.volume == 2.0
  assert cost.wire_fraction == pytest.approx(fraction)
  assert tx.mix_cost.wire_fraction == pytest.approx(fraction)
  assert tx.comm(4).wire_fraction == pytest.approx(fraction)  # the model init saw
  chained = optax.chain(optax.identity(), tx)
  assert chained.init(X) and tx.comm(2, chained.init(X)).wire_fraction == pytest.approx(fraction)


def test_validation_errors():
  local, W = optax.sgd(LR), topology.ring(4)
  q = compress.identity()
  with pytest.raises(TypeError, match="one fixed mixing matrix"):
    coopjax.choco(local, tau=1, W=[topology.ring(4), topology.complete(4)], compressor=q, gamma=1.0)
  with pytest.raises(TypeError, match="one fixed mixing matrix"):
    coopjax.choco(local, tau=1, W=lambda r: W, compressor=q, gamma=1.0)
  with pytest.raises(ValueError, match="order must be one of"):
    coopjax.choco(local, tau=1, W=W, compressor=q, gamma=1.0, order="step_then_mix")
  with pytest.raises(ValueError, match="hat_init"):
    coopjax.choco(local, tau=1, W=W, compressor=q, gamma=1.0, hat_init="ones")
  with pytest.raises(ValueError, match="gamma"):
    coopjax.choco(local, tau=1, W=W, compressor=q, gamma=1.5)
  with pytest.raises(TypeError, match="Compressor"):
    coopjax.choco(local, tau=1, W=W, compressor="top_k", gamma=1.0)
  with pytest.raises(ValueError, match="local_state_policy"):
    coopjax.choco(local, tau=1, W=W, compressor=q, gamma=1.0, local_state_policy="mix")


def run_both(tx, m, steps, seed=0):
  """The same run unsharded and sharded over 8 devices (distinct initial rows): (plain, sharded)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), (coopjax.WORKER_AXIS,))
  A, b = ref.make_batches(steps, m, seed=seed)
  _, X0 = x0_rows(m)
  plain, plain_state = ref.run_from(tx, X0, A, b)
  X = coopjax.shard(X0, mesh, 0)
  state = coopjax.sharding.init(tx, X, mesh, 0)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  for k in range(steps):
    X, state, _ = step(X, state, coopjax.shard_batch((A[k], b[k]), mesh))
    jax.block_until_ready(X)  # fake CPU devices deadlock on unblocked loops
  return (plain, plain_state), (coopjax.unshard(X, mesh, 0), state)


@pytest.mark.parametrize(
  "graph,order,hat_init,name",
  [("exponential", "overlap", "x0", "qsgd")],
)
def test_sharded_equals_unsharded(graph, order, hat_init, name):
  m = 16  # two workers per device
  W = topology.ring(m) if graph == "ring" else topology.exponential(m)
  tx = coopjax.choco(
    optax.sgd(LR, momentum=MOMENTUM),
    tau=2,
    W=W,
    compressor=COMPRESSORS[name],
    gamma=0.6,
    order=order,
    hat_init=hat_init,
    key=KEY,
  )
  (plain, ps), (sharded, ss) = run_both(tx, m, steps=5)
  np.testing.assert_allclose(ref.flat(sharded), ref.flat(plain), rtol=2e-5, atol=2e-6)
  hat = jax.tree.map(np.asarray, ss.hat)
  np.testing.assert_allclose(ref.flat(hat), ref.flat(ps.hat), rtol=2e-5, atol=2e-6)


def test_docs_example_runs_and_reports_payload_bytes(capsys):
  """docs/compression.md's example: top-k 25 % of 16 values = 4 values + 4 indices to each of
  the ring's 2 neighbours, 64 of the 128 dense bytes; the loss falls from its start."""
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "compression.md").read_text()
  code = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S).group(1)
  ns = {}
  exec(compile(code, "compression.md", "exec"), ns)
  out = capsys.readouterr().out
  assert out.strip().endswith("64 of 128 dense bytes sent per worker per step"), out
  x, y = ns["batch"]
  start = float(np.mean((np.asarray(y)) ** 2))
  assert float(ns["metrics"]["loss"]) < 1e-3 * start


def test_bytes_of_a_batchnorm_model_count_the_mixed_leaves_only():
  """docs/compression.md's figures: MLP 12-16-10 with BatchNorm, statistics kept per worker."""
  from coopjax.training import models

  model = models.MLP(features=(16,), num_classes=10, norm="batch")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 12)))
  mask = models.params_mask(variables)
  leaves = jax.tree.leaves(variables["params"])
  assert sum(x.size for x in leaves) == 410
  # By hand: k = max(1, ⌊0.1 d⌋) per leaf, 4 + 4 bytes per kept entry; qsgd(4): 4 + ⌈5d/8⌉.
  k = [max(1, int(0.1 * x.size)) for x in leaves]
  topk_bytes = 8 * sum(k)
  qsgd_bytes = sum(4 + -(-5 * x.size // 8) for x in leaves)
  assert (topk_bytes, qsgd_bytes) == (312, 281)
  assert compress.payload_bytes(compress.top_k(fraction=0.1), variables["params"]) == topk_bytes
  X = coopjax.replicate(variables, 8)
  tx = coopjax.choco(
    optax.sgd(0.1),
    tau=2,
    W=topology.ring(8),
    compressor=compress.top_k(fraction=0.1),
    gamma=0.4,
    mix_mask=mask,
  )
  state = tx.init(X)
  assert tx.comm(2, state).bytes_sent(410 * 4) == pytest.approx(2 * topk_bytes)
  assert tx.comm(1, state).bytes_sent(410 * 4) == 0.0
  ef = coopjax.diloco(
    optax.sgd(0.1),
    outer=optax.sgd(0.7),
    tau=2,
    num_workers=8,
    compressor=compress.qsgd(4, unbiased=False),
    mix_mask=mask,
  )
  cost = ef.comm(2, ef.init(X))
  assert cost.collective == "all_gather"
  assert cost.bytes_sent(410 * 4) == pytest.approx(7 * qsgd_bytes)
