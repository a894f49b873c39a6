"""The core framework A(τ, W, v) against independent NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology

LR = 0.05


def run(tx, x0, A, b, num_workers, num_aux=0, jit=True):
  X = coopjax.replicate(x0, num_workers, num_aux)
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx, num_workers=num_workers)
  metrics = []
  for k in range(A.shape[0]):
    X, state, met = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
    metrics.append(met)
  return X, state, metrics


def test_sync_sgd_equals_large_batch_sgd():
  m, steps = 4, 6
  A, b = ref.make_batches(steps, m)
  x0 = ref.init_params()
  X, _, _ = run(coopjax.sync_sgd(optax.sgd(LR), num_workers=m), x0, A, b, m)
  # Large-batch SGD on one model: the gradient is the mean of the m workers' gradients.
  x = ref.flat(coopjax.replicate(x0, 1))[0]
  for k in range(steps):
    g = np.mean([ref.np_grad(x, A[k, i], b[k, i]) for i in range(m)], axis=0)
    x = x - LR * g
  np.testing.assert_allclose(ref.flat(X), np.tile(x, (m, 1)), rtol=1e-5, atol=1e-6)


def test_independent_workers_equal_separate_sgd_runs():
  m, steps, tau = 3, 7, 2
  A, b = ref.make_batches(steps, m, seed=3)
  x0 = ref.init_params()
  with pytest.warns(UserWarning, match="identity"):
    tx = coopjax.cooperative(optax.sgd(LR), tau=tau, W=topology.independent(m))
  X, _, _ = run(tx, x0, A, b, m)
  for i in range(m):
    x = ref.flat(coopjax.replicate(x0, 1))[0]
    for k in range(steps):
      x = x - LR * ref.np_grad(x, A[k, i], b[k, i])
    np.testing.assert_allclose(ref.flat(X)[i], x, rtol=1e-5, atol=1e-6)


CASES = {
  "pasgd": lambda m, tau: (
    coopjax.local_sgd(optax.sgd(LR), tau=tau, num_workers=m),
    topology.complete(m),
    0,
  ),
  "easgd": lambda m, tau: (
    coopjax.easgd(optax.sgd(LR), tau=tau, alpha=0.1, num_workers=m),
    topology.easgd(m, 0.1),
    1,
  ),
  "dpsgd_ring": lambda m, tau: (
    coopjax.dpsgd(optax.sgd(LR), W=topology.ring(m)),
    topology.ring(m),
    0,
  ),
  "dpsgd_torus": lambda m, tau: (
    coopjax.dpsgd(optax.sgd(LR), W=topology.torus(2, m // 2)),
    topology.torus(2, m // 2),
    0,
  ),
  "ring_tau3": lambda m, tau: (
    coopjax.cooperative(optax.sgd(LR), tau=tau, W=topology.ring(m)),
    topology.ring(m),
    0,
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_reimplementation(name):
  m, tau = 6, 3
  tx, W, v = CASES[name](m, tau)
  tau_eff = 1 if name.startswith("dpsgd") else tau
  steps = 3 * tau + 2
  A, b = ref.make_batches(steps, m, seed=7)
  x0 = ref.init_params()
  X, _, _ = run(tx, x0, A, b, m, v)
  X_ref, _ = ref.cooperative_reference(
    ref.flat(coopjax.replicate(x0, 1))[0], W, tau_eff, LR, A, b, v
  )
  np.testing.assert_allclose(ref.flat(X), X_ref, rtol=1e-5, atol=1e-5)


def test_easgd_equals_elastic_update_written_out():
  """Zhang et al.'s elastic pull, applied after the local step on communication steps."""
  m, tau, alpha, steps = 4, 2, 0.15, 7
  A, b = ref.make_batches(steps, m, seed=11)
  x0 = ref.init_params()
  X, _, _ = run(
    coopjax.easgd(optax.sgd(LR), tau=tau, alpha=alpha, num_workers=m), x0, A, b, m, num_aux=1
  )
  x_init = ref.flat(coopjax.replicate(x0, 1))[0]
  xs = [x_init.copy() for _ in range(m)]
  z = x_init.copy()
  for k in range(1, steps + 1):
    xs = [xs[i] - LR * ref.np_grad(xs[i], A[k - 1, i], b[k - 1, i]) for i in range(m)]
    if k % tau == 0:
      z_new = z + alpha * sum(x - z for x in xs)
      xs = [x - alpha * (x - z) for x in xs]
      z = z_new
  np.testing.assert_allclose(ref.flat(X), np.stack(xs + [z]), rtol=1e-5, atol=1e-5)


ALGORITHMS = {
  "sync": (lambda m: coopjax.sync_sgd(optax.sgd(LR), num_workers=m), 0),
  "pasgd": (lambda m: coopjax.local_sgd(optax.sgd(LR), tau=3, num_workers=m), 0),
  "easgd": (lambda m: coopjax.easgd(optax.sgd(LR), tau=2, alpha=0.1, num_workers=m), 1),
  "dpsgd": (lambda m: coopjax.dpsgd(optax.sgd(LR), W=topology.ring(m)), 0),
  "coop_exp_tau2": (
    lambda m: coopjax.cooperative(optax.sgd(LR), tau=2, W=topology.exponential(m)),
    0,
  ),
  "easgd_mix_first": (
    lambda m: coopjax.easgd(optax.sgd(LR), tau=2, alpha=0.1, num_workers=m, order="mix_then_step"),
    1,
  ),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_averaged_model_identity(name):
  """u_{k+1} = u_k − η·m/(m+v)·mean_i g_i(x_i) (paper eq. 14), every step."""
  make, v = ALGORITHMS[name]
  m, steps = 8, 6
  A, b = ref.make_batches(steps, m, seed=5)
  for X, u_expected in ref.averaged_model_run(make(m), m, v, A, b, LR):
    np.testing.assert_allclose(
      ref.flat(jax.tree.map(lambda x: x[None], coopjax.average(X)))[0],
      u_expected,
      rtol=1e-5,
      atol=1e-6,
    )


def _reference_local(opt_update, x0, W, tau, A, b):
  """Cooperative reference with a hand-written per-worker optimizer update."""
  n = W.shape[0]
  X = np.tile(x0, (n, 1))
  states = [None] * n
  for k in range(1, A.shape[0] + 1):
    U = np.zeros_like(X)
    for i in range(n):
      g = ref.np_grad(X[i], A[k - 1, i], b[k - 1, i])
      U[i], states[i] = opt_update(g, states[i], k)
    X = (W if k % tau == 0 else np.eye(n)).T @ (X + U)
  return X


def test_momentum_local_optimizer():
  m, tau, steps, beta = 4, 2, 7, 0.9
  A, b = ref.make_batches(steps, m, seed=2)
  x0 = ref.init_params()
  X, _, _ = run(
    coopjax.local_sgd(optax.sgd(LR, momentum=beta), tau=tau, num_workers=m), x0, A, b, m
  )

  def momentum(g, buf, k):
    buf = g if buf is None else beta * buf + g
    return -LR * buf, buf

  x_init = ref.flat(coopjax.replicate(x0, 1))[0]
  expect = _reference_local(momentum, x_init, topology.complete(m), tau, A, b)
  np.testing.assert_allclose(ref.flat(X), expect, rtol=1e-4, atol=1e-5)


def test_adam_with_schedule_local_optimizer():
  m, tau, steps = 3, 2, 6
  b1, b2, eps = 0.9, 0.999, 1e-8
  schedule = optax.linear_schedule(0.1, 0.01, transition_steps=steps)
  A, b = ref.make_batches(steps, m, seed=4)
  x0 = ref.init_params()
  W = topology.ring(m)
  X, _, _ = run(coopjax.cooperative(optax.adam(schedule, b1, b2, eps), tau=tau, W=W), x0, A, b, m)

  def adam(g, st, k):
    mu, nu = (np.zeros_like(g), np.zeros_like(g)) if st is None else st
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    mhat, nhat = mu / (1 - b1**k), nu / (1 - b2**k)
    lr = 0.1 + (0.01 - 0.1) * min(k - 1, steps) / steps
    return -lr * mhat / (np.sqrt(nhat) + eps), (mu, nu)

  x_init = ref.flat(coopjax.replicate(x0, 1))[0]
  expect = _reference_local(adam, x_init, W, tau, A, b)
  np.testing.assert_allclose(ref.flat(X), expect, rtol=1e-4, atol=1e-5)


def test_clip_by_global_norm_is_per_worker():
  m, tau, steps, max_norm = 4, 2, 4, 0.3
  A, b = ref.make_batches(steps, m, seed=9)
  A[:, 0] *= 50.0  # worker 0's gradients are huge, the others' are small
  x0 = ref.init_params()
  local = optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(LR))
  X, _, _ = run(coopjax.local_sgd(local, tau=tau, num_workers=m), x0, A, b, m)

  def clipped_sgd(g, st, k):
    norm = np.linalg.norm(g)
    return -LR * g * min(1.0, max_norm / norm), None

  x_init = ref.flat(coopjax.replicate(x0, 1))[0]
  expect = _reference_local(clipped_sgd, x_init, topology.complete(m), tau, A, b)
  np.testing.assert_allclose(ref.flat(X), expect, rtol=1e-4, atol=1e-5)

  # Clipping the stacked tree would have scaled the small workers too: not what happened.
  def stacked_clip(g, st, k):
    return -LR * g, None

  unclipped = _reference_local(stacked_clip, x_init, topology.complete(m), tau, A, b)
  assert not np.allclose(ref.flat(X), unclipped, atol=1e-3)


def test_composes_with_optax_chain_and_counts_steps():
  m, tau = 4, 3
  A, b = ref.make_batches(4, m)
  tx = optax.chain(coopjax.local_sgd(optax.sgd(LR), tau=tau, num_workers=m), optax.identity())
  X, state, metrics = run(tx, ref.init_params(), A, b, m)
  assert [int(met["step"]) for met in metrics] == [1, 2, 3, 4]
  assert int(coopjax.step_count(state)) == 4
  # Consensus distance is zero right after the mix at k = 3 and not before.
  cd = [float(met["consensus_distance"]) for met in metrics]
  assert cd[2] < 1e-10 < cd[1]


def test_shapes_and_single_trace():
  m, v, tau = 4, 1, 2
  A, b = ref.make_batches(5, m)
  tx = coopjax.easgd(optax.sgd(LR), tau=tau, alpha=0.1, num_workers=m)
  X = coopjax.replicate(ref.init_params(), m, v)
  chex.assert_tree_shape_prefix(X, (m + v,))
  chex.assert_shape(X["w"], (m + v, ref.D))
  state = tx.init(X)
  raw = coopjax.make_step(ref.loss_fn, tx, jit=False)
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(raw, n=1))
  for k in range(5):  # on-steps (k = 2, 4) and off-steps share one trace
    X, state, met = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
  chex.assert_tree_shape_prefix(X, (m + v,))
  chex.assert_shape(met["worker_loss"], (m,))
  chex.assert_shape(met["loss"], ())
  chex.assert_tree_all_finite(X)


def test_consensus_distance_and_average_against_numpy():
  rng = np.random.default_rng(0)
  X = {
    "a": rng.normal(size=(5, 3)).astype(np.float32),
    "b": rng.normal(size=(5,)).astype(np.float32),
  }
  flat = np.concatenate([X["a"], X["b"][:, None]], 1).astype(np.float64)
  J = np.full((5, 5), 1 / 5)
  expected = np.linalg.norm(flat.T @ (np.eye(5) - J)) ** 2
  np.testing.assert_allclose(float(coopjax.consensus_distance(X)), expected, rtol=1e-5)
  u = coopjax.average(X, num_aux=1, workers_only=True)
  np.testing.assert_allclose(u["a"], X["a"][:4].mean(0), rtol=1e-6)
  np.testing.assert_allclose(coopjax.average(X)["b"], X["b"].mean(), rtol=1e-6)


def test_doctests():
  import doctest

  from coopjax import topology
  from coopjax import workers
  from coopjax.algorithms import _cooperative as algorithms

  for mod in (algorithms, topology, workers):
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, (mod.__name__, result)


def test_merge_aux_mixes_fresh_non_trainable_state():
  """Statistics returned as aux are written into X before the mix (BatchNorm-style)."""
  m, tau = 4, 2
  A, b = ref.make_batches(2, m, seed=13)

  def loss_with_stats(params, batch):
    A_, b_ = batch
    return ref.loss_fn(params, batch), {"stat": jnp.mean(b_) + 0.0 * params["stat"]}

  def merge(X, aux):
    return {**X, "stat": aux["stat"]}

  params = {**ref.init_params(), "stat": np.float32(0.0)}
  tx = coopjax.local_sgd(optax.sgd(LR), tau=tau, num_workers=m)
  X = coopjax.replicate(params, m)
  state = tx.init(X)
  step = coopjax.make_step(loss_with_stats, tx, has_aux=True, merge_aux=merge)
  X, state, _ = step(X, state, (jnp.asarray(A[0]), jnp.asarray(b[0])))
  np.testing.assert_allclose(X["stat"], b[0].mean(axis=1), rtol=1e-6)  # k = 1: kept local
  X, state, _ = step(X, state, (jnp.asarray(A[1]), jnp.asarray(b[1])))
  np.testing.assert_allclose(X["stat"], np.full(m, b[1].mean()), rtol=1e-5)  # k = 2: mixed
