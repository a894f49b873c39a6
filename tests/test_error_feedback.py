"""Error-feedback averaging (local SGD, DiLoCo, SlowMo with a compressor) against references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from test_choco import COMPRESSORS
from test_choco import np_compress
from test_choco import run_both
from test_choco import x0_rows

import coopjax
from coopjax import compress

LR, MOMENTUM = 0.05, 0.9
KEY = jax.random.key(5)


def flat_model(tree):
  return np.concatenate([np.asarray(tree["w"], np.float64).ravel(), [float(tree["c"])]])


def factories(compressor, beta=1.0):
  """(name, compressed factory, uncompressed factory, η of x_ref ← x_ref − η·mean c or None)."""
  local = optax.sgd(LR, momentum=MOMENTUM)
  ef = dict(compressor=compressor, error_decay=beta, key=KEY)
  return {
    "local_sgd": (
      lambda: coopjax.local_sgd(local, tau=3, num_workers=4, **ef),
      lambda: coopjax.local_sgd(local, tau=3, num_workers=4),
      1.0,
    ),
    "diloco_sgd": (
      lambda: coopjax.diloco(local, outer=optax.sgd(0.7), tau=3, num_workers=4, **ef),
      lambda: coopjax.diloco(local, outer=optax.sgd(0.7), tau=3, num_workers=4),
      0.7,
    ),
    "diloco_nesterov": (
      lambda: coopjax.diloco(
        local, outer=optax.sgd(0.7, momentum=0.9, nesterov=True), tau=3, num_workers=4, **ef
      ),
      lambda: coopjax.diloco(
        local, outer=optax.sgd(0.7, momentum=0.9, nesterov=True), tau=3, num_workers=4
      ),
      None,
    ),
    "slowmo": (
      lambda: coopjax.slowmo(local, tau=3, num_workers=4, alpha=0.8, beta=0.5, lr=LR, **ef),
      lambda: coopjax.slowmo(local, tau=3, num_workers=4, alpha=0.8, beta=0.5, lr=LR),
      None,
    ),
  }


@pytest.mark.parametrize("name", ["local_sgd", "diloco_nesterov", "slowmo"])
def test_identity_compressor_is_the_uncompressed_algorithm(name):
  A, b = ref.make_batches(10, 4, seed=21)
  compressed, plain, _ = factories(compress.identity())[name]
  X = coopjax.replicate(ref.init_params(), 4)
  Xc, sc = ref.run_from(compressed(), X, A, b)
  Xp, _ = ref.run_from(plain(), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xp), rtol=1e-5, atol=1e-6)
  assert isinstance(sc, coopjax.ErrorFeedbackState)
  assert not np.any(ref.flat(sc.error))  # Q(v) = v leaves no error


def test_identity_compressor_local_sgd_from_distinct_rows():
  """x_ref starts at X's worker mean: the first mix averages distinct rows, as local SGD."""
  A, b = ref.make_batches(7, 4, seed=22)
  _, X = x0_rows(4)
  compressed, plain, _ = factories(compress.identity())["local_sgd"]
  Xc, _ = ref.run_from(compressed(), X, A, b)
  Xp, _ = ref.run_from(plain(), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xp), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "compressor,name,beta",
  [
    ("identity", "local_sgd", 1.0),
    ("top_k", "local_sgd", 1.0),
    ("qsgd", "local_sgd", 0.5),
    ("random_k", "local_sgd", 1.0),
    ("sign", "diloco_sgd", 1.0),
    ("int8", "diloco_sgd", 0.5),
    ("int4", "local_sgd", 1.0),
    ("top_k", "diloco_sgd", 0.5),
  ],
)
def test_virtual_model_moves_as_the_uncompressed_mean(compressor, name, beta):
  """x_ref' − η·mean(e') = x_ref − ηβ·mean(e) − η·mean_i(x_ref − x½_i) at every mix.

  Every compressor of coopjax.compress, with β = 1 and β < 1, for local SGD (η = 1) and DiLoCo
  with outer optax.sgd(η).
  """
  tx_fn, _, eta = factories(COMPRESSORS[compressor], beta)[name]
  tx = tx_fn()
  A, b = ref.make_batches(9, 4, seed=23)
  _, X = x0_rows(4)
  local = optax.sgd(LR, momentum=MOMENTUM)

  @jax.jit
  def half_step(X, local_state, batch):  # x½: the local step alone
    U, _ = jax.vmap(local.update)(jax.vmap(jax.grad(ref.loss_fn))(X, batch), local_state, X)
    return optax.apply_updates(X, U)

  mixes = []
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx)
  for k in range(1, A.shape[0] + 1):
    batch = (jnp.asarray(A[k - 1]), jnp.asarray(b[k - 1]))
    half = ref.flat(half_step(X, state.local_state, batch))
    x_ref, e_mean = flat_model(state.x_ref), ref.flat(state.error).mean(0)
    X, state, _ = step(X, state, batch)
    if k % 3 == 0:
      expected = x_ref - eta * beta * e_mean - eta * (x_ref - half.mean(0))
      virtual = flat_model(state.x_ref) - eta * ref.flat(state.error).mean(0)
      np.testing.assert_allclose(virtual, expected, rtol=1e-5, atol=1e-6)
      mixes.append(np.abs(ref.flat(state.error)).max())
  if compressor != "identity":
    assert max(mixes) > 1e-3  # the compressor withheld something


def ef_reference(x0, tau, A, b, compressor, beta, key, outer_step):
  """Momentum-SGD inner steps; at k mod τ = 0: the error-feedback round and the outer step."""
  m = x0.shape[0]
  X = np.array(x0, np.float64)
  buf = np.zeros_like(X)
  x_ref = X.mean(0)
  e = np.zeros_like(X)
  for k in range(1, A.shape[0] + 1):
    for i in range(m):
      buf[i] = MOMENTUM * buf[i] + ref.np_grad(X[i], A[k - 1, i], b[k - 1, i])
      X[i] = X[i] - LR * buf[i]
    if k % tau:
      continue
    v = beta * e + (x_ref[None] - X)
    c = np.stack([np_compress(compressor, v[i], key, k, i) for i in range(m)])
    e = v - c
    x_ref = outer_step(c.mean(0), x_ref)
    X = np.tile(x_ref, (m, 1))
  return X, x_ref, e


@pytest.mark.parametrize("compressor", ["top_k", "qsgd"])
def test_local_sgd_matches_numpy(compressor):
  A, b = ref.make_batches(10, 4, seed=24)
  x0, X = x0_rows(4)
  tx = coopjax.local_sgd(
    optax.sgd(LR, momentum=MOMENTUM),
    tau=3,
    num_workers=4,
    compressor=COMPRESSORS[compressor],
    error_decay=0.8,
    key=KEY,
  )
  Xc, state = ref.run_from(tx, X, A, b)
  xs, x_ref, e = ef_reference(x0, 3, A, b, COMPRESSORS[compressor], 0.8, KEY, lambda c, r: r - c)
  np.testing.assert_allclose(ref.flat(Xc), xs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(flat_model(state.x_ref), x_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ref.flat(state.error), e, rtol=1e-4, atol=1e-5)


def test_diloco_matches_numpy_with_heavy_ball_outer():
  lr, mu = 0.7, 0.9
  A, b = ref.make_batches(10, 4, seed=25)
  x0, X = x0_rows(4)
  compressor = COMPRESSORS["top_k"]
  tx = coopjax.diloco(
    optax.sgd(LR, momentum=MOMENTUM),
    outer=optax.sgd(lr, momentum=mu),
    tau=3,
    num_workers=4,
    compressor=compressor,
    key=KEY,
  )
  Xc, state = ref.run_from(tx, X, A, b)
  trace = np.zeros(ref.D + 1)

  def heavy_ball(c, x_ref):
    nonlocal trace
    trace = mu * trace + c
    return x_ref - lr * trace

  xs, x_ref, e = ef_reference(x0, 3, A, b, compressor, 1.0, KEY, heavy_ball)
  np.testing.assert_allclose(ref.flat(Xc), xs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(flat_model(state.x_ref), x_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ref.flat(state.error), e, rtol=1e-4, atol=1e-5)


def test_no_compressor_keeps_the_uncompressed_states():
  local = optax.sgd(LR)
  X = coopjax.replicate(ref.init_params(), 4)
  assert isinstance(
    coopjax.local_sgd(local, tau=2, num_workers=4).init(X), coopjax.CooperativeState
  )
  assert isinstance(
    coopjax.diloco(local, outer=optax.sgd(1.0), tau=2, num_workers=4).init(X), coopjax.DiLoCoState
  )
  assert isinstance(
    coopjax.slowmo(local, tau=2, num_workers=4, alpha=1.0, beta=0.0).init(X), coopjax.SlowMoState
  )


def test_comm_is_a_gather_of_payloads():
  m = 8
  tx = coopjax.local_sgd(optax.sgd(LR), tau=4, num_workers=m, compressor=COMPRESSORS["top_k"])
  X = {"w": jnp.zeros((m, 100))}
  state = tx.init(X)
  assert tx.comm(3, state).collective == "none"
  cost = tx.comm(4, state)
  assert (cost.collective, cost.volume, cost.rounds) == ("all_gather", m - 1.0, m - 1)
  assert cost.wire_fraction == pytest.approx(34 * 2 / 100)  # 34 values + 34 int32 indices
  assert tx.mix_cost == cost


def test_validation_errors():
  local = optax.sgd(LR)
  with pytest.raises(ValueError, match="compressed averaging only"):
    coopjax.local_sgd(local, tau=2, num_workers=4, error_decay=0.5)
  with pytest.raises(ValueError, match="compressed averaging only"):
    coopjax.diloco(local, outer=optax.sgd(1.0), tau=2, num_workers=4, key=KEY)
  with pytest.raises(ValueError, match="error_decay must be in"):
    coopjax.local_sgd(local, tau=2, num_workers=4, compressor=compress.identity(), error_decay=2.0)
  with pytest.raises(TypeError, match="Compressor"):
    coopjax.slowmo(local, tau=2, num_workers=4, alpha=1.0, beta=0.0, compressor="qsgd")
  with pytest.raises(ValueError, match="takes the options"):
    coopjax.local_sgd(local, tau=2, num_workers=4, compressor=compress.identity(), symmetric=False)
  with pytest.raises(ValueError, match="order"):
    coopjax.local_sgd(
      local, tau=2, num_workers=4, compressor=compress.identity(), order="mix_then_step"
    )


@pytest.mark.parametrize("name", ["qsgd"])
def test_sharded_equals_unsharded(name):
  m = 16
  tx = coopjax.local_sgd(
    optax.sgd(LR, momentum=MOMENTUM),
    tau=2,
    num_workers=m,
    compressor=COMPRESSORS[name],
    error_decay=0.8,
    key=KEY,
  )
  (plain, ps), (sharded, ss) = run_both(tx, m, steps=5)
  np.testing.assert_allclose(ref.flat(sharded), ref.flat(plain), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(
    ref.flat(jax.tree.map(np.asarray, ss.error)), ref.flat(ps.error), rtol=2e-5, atol=2e-6
  )
  np.testing.assert_allclose(
    flat_model(jax.tree.map(np.asarray, ss.x_ref)), flat_model(ps.x_ref), rtol=2e-5, atol=2e-6
  )


def test_mix_mask_leaves_stay_per_worker_without_error():
  """Leaves outside mix_mask are not sent: they stay per worker, their errors stay 0."""
  A, b = ref.make_batches(4, 4, seed=26)
  _, X = x0_rows(4)
  local = optax.sgd(LR)
  mask = {"w": True, "c": False}
  tx = coopjax.local_sgd(local, tau=2, num_workers=4, compressor=compress.identity(), mix_mask=mask)
  Xc, state = ref.run_from(tx, X, A, b)
  Xp, _ = ref.run_from(coopjax.local_sgd(local, tau=2, num_workers=4, mix_mask=mask), X, A, b)
  np.testing.assert_allclose(ref.flat(Xc), ref.flat(Xp), rtol=1e-5, atol=1e-6)
  assert np.ptp(np.asarray(Xc["c"])) > 1e-3  # c was not averaged
  assert not np.any(np.asarray(state.error["c"]))
