"""Both update orders, the elastic family, and the local-state policies."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology

LR = 0.05


def test_mix_then_step_easgd_is_zhang_et_al():
  """x_i ← x_i − ηg_i − α(x_i − z), z ← z + αΣ(x_i − z) on communication steps."""
  m, tau, alpha = 4, 3, 0.15
  steps = 3 * tau + 1
  A, b = ref.make_batches(steps, m, seed=21)
  tx = coopjax.easgd(optax.sgd(LR), tau=tau, alpha=alpha, num_workers=m, order="mix_then_step")
  X, _ = ref.run(tx, A, b, m, v=1)
  xs, z = [ref.x_init() for _ in range(m)], ref.x_init()
  for k in range(1, steps + 1):
    g = [ref.np_grad(xs[i], A[k - 1, i], b[k - 1, i]) for i in range(m)]
    if k % tau == 0:
      z_new = z + alpha * sum(x - z for x in xs)
      xs = [xs[i] - LR * g[i] - alpha * (xs[i] - z) for i in range(m)]
      z = z_new
    else:
      xs = [xs[i] - LR * g[i] for i in range(m)]
  np.testing.assert_allclose(ref.flat(X), np.stack(xs + [z]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("W", [topology.ring(5), topology.erdos_renyi(5, 0.6, seed=2)])
def test_mix_then_step_dpsgd_is_lian_et_al(W):
  """x_i ← Σ_j W_ij x_j − η g_i(x_i)."""
  m, steps = 5, 6
  A, b = ref.make_batches(steps, m, seed=22)
  X, _ = ref.run(coopjax.dpsgd(optax.sgd(LR), W=W, order="mix_then_step"), A, b, m)
  xs = np.tile(ref.x_init(), (m, 1))
  for k in range(steps):
    g = np.stack([ref.np_grad(xs[i], A[k, i], b[k, i]) for i in range(m)])
    xs = np.stack([sum(W[i, j] * xs[j] for j in range(m)) - LR * g[i] for i in range(m)])
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-5, atol=1e-5)


FAMILY = {
  "pasgd": (lambda m, o: coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=m, order=o), 0),
  "easgd": (lambda m, o: coopjax.easgd(optax.sgd(LR), tau=2, alpha=0.1, num_workers=m, order=o), 1),
  "dpsgd": (lambda m, o: coopjax.dpsgd(optax.sgd(LR), W=topology.torus(2, m // 2), order=o), 0),
  "elastic_ring": (
    lambda m, o: coopjax.elastic_averaging(optax.sgd(LR), W=topology.ring(m), alpha=0.1, order=o),
    1,
  ),
  "hierarchical": (
    lambda m, o: coopjax.elastic_hierarchical(
      optax.sgd(LR), tau=2, groups=[[0, 1, 2], [3, 4, 5]], alpha=0.2, order=o
    ),
    2,
  ),
}


@pytest.mark.parametrize("order", ["step_then_mix", "mix_then_step"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_averaged_model_identity_both_orders(name, order):
  make, v = FAMILY[name]
  m, steps = 6, 5
  A, b = ref.make_batches(steps, m, seed=23)
  ref.averaged_model_run(make(m, order), m, v, A, b, LR)


def _spread_X(m, v, seed=0):
  """Distinct models per row, so that mixing matters."""
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.normal(size=(m + v, ref.D)), jnp.float32),
    "c": jnp.asarray(rng.normal(size=(m + v,)), jnp.float32),
  }


def test_orders_agree_without_mixing_or_gradients():
  m, steps = 4, 4
  A, b = ref.make_batches(steps, m, seed=24)
  with pytest.warns(UserWarning):
    a = ref.run(coopjax.cooperative(optax.sgd(LR), tau=1, W=np.eye(m)), A, b, m, X=_spread_X(m, 0))[
      0
    ]
  with pytest.warns(UserWarning):
    tx = coopjax.cooperative(optax.sgd(LR), tau=1, W=np.eye(m), order="mix_then_step")
    c = ref.run(tx, A, b, m, X=_spread_X(m, 0))[0]
  np.testing.assert_allclose(ref.flat(a), ref.flat(c), rtol=1e-6, atol=1e-6)
  # G = 0 (learning rate 0): both orders are pure mixing X ← X W^k.
  W = topology.ring(m)
  outs = [
    ref.run(coopjax.cooperative(optax.sgd(0.0), tau=1, W=W, order=o), A, b, m, X=_spread_X(m, 0))[0]
    for o in ("step_then_mix", "mix_then_step")
  ]
  expect = np.linalg.matrix_power(W.T, steps) @ ref.flat(_spread_X(m, 0))
  for out in outs:
    np.testing.assert_allclose(ref.flat(out), expect, rtol=1e-5, atol=1e-6)


def test_orders_differ_by_eta_G_times_W_minus_I():
  """(X − ηG)W − (XW − ηG) = −ηG(W − I): in rows, −η (Wᵀ − I) G."""
  m, v = 4, 1
  A, b = ref.make_batches(1, m, seed=25)
  X0 = _spread_X(m, v, seed=3)
  outs = {}
  for o in ("step_then_mix", "mix_then_step"):
    tx = coopjax.easgd(optax.sgd(LR), tau=1, alpha=0.15, num_workers=m, order=o)
    outs[o] = ref.flat(ref.run(tx, A, b, m, v, X=X0)[0])
  Xf = ref.flat(X0)
  G = np.zeros_like(Xf)
  for i in range(m):
    G[i] = ref.np_grad(Xf[i], A[0, i], b[0, i])
  W = topology.easgd(m, 0.15)
  diff = outs["step_then_mix"] - outs["mix_then_step"]
  np.testing.assert_allclose(diff, -LR * (W.T - np.eye(m + v)) @ G, rtol=1e-4, atol=1e-6)
  assert np.abs(diff).max() > 1e-3  # the orders genuinely differ here


@pytest.mark.parametrize("policy", ["keep", "mix", "reset"])
@pytest.mark.parametrize("order", ["step_then_mix", "mix_then_step"])
def test_local_state_policies_with_momentum(policy, order):
  m, tau, beta, steps = 4, 2, 0.9, 7
  A, b = ref.make_batches(steps, m, seed=26)
  W = topology.ring(m)
  tx = coopjax.cooperative(
    optax.sgd(LR, momentum=beta), tau=tau, W=W, order=order, local_state_policy=policy
  )
  X, _ = ref.run(tx, A, b, m, X=_spread_X(m, 0, seed=4))
  # NumPy: heavy-ball buf ← β buf + g, update −η buf; the policy acts on buf at mixing steps.
  Xr = ref.flat(_spread_X(m, 0, seed=4))
  buf = np.zeros_like(Xr)
  for k in range(1, steps + 1):
    G = np.stack([ref.np_grad(Xr[i], A[k - 1, i], b[k - 1, i]) for i in range(m)])
    buf = beta * buf + G
    mixing = k % tau == 0
    if order == "step_then_mix":
      Xr = Xr - LR * buf
      if mixing:
        Xr = W.T @ Xr
    else:
      Xr = (W.T @ Xr if mixing else Xr) - LR * buf
    if mixing and policy == "mix":
      buf = W.T @ buf
    elif mixing and policy == "reset":
      buf = np.zeros_like(buf)
  np.testing.assert_allclose(ref.flat(X), Xr, rtol=1e-4, atol=1e-5)


def test_mix_mask_keeps_leaves_local():
  m, tau = 4, 1
  A, b = ref.make_batches(3, m, seed=27)
  X0 = _spread_X(m, 0, seed=5)
  tx = coopjax.local_sgd(optax.sgd(0.0), tau=tau, num_workers=m, mix_mask={"w": True, "c": False})
  X, _ = ref.run(tx, A, b, m, X=X0)
  np.testing.assert_allclose(X["c"], X0["c"], rtol=1e-6)  # never mixed, never moved (lr 0)
  np.testing.assert_allclose(X["w"], np.tile(np.mean(X0["w"], 0), (m, 1)), rtol=1e-5, atol=1e-6)


def test_bad_policy_and_order():
  with pytest.raises(ValueError, match="local_state_policy"):
    coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=4, local_state_policy="average")
  with pytest.raises(ValueError, match="order"):
    coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=4, order="mix_first")


def test_hierarchical_matrix_is_valid_and_pulls_groups():
  W = topology.elastic_hierarchical([[0, 1], [2, 3, 4]], 0.2)
  np.testing.assert_allclose(W.sum(0), 1.0)
  np.testing.assert_allclose(W, W.T)
  assert topology.zeta(W) < 1
  # A worker's new model only involves itself and its own group's auxiliary.
  np.testing.assert_allclose(W[:, 0], [0.8, 0, 0, 0, 0, 0.2, 0])
  with pytest.raises(ValueError, match="partition"):
    topology.elastic_hierarchical([[0, 1], [1, 2]], 0.2)
