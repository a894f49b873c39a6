"""AdaComm's adaptive period against a NumPy re-derivation of its rule."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax

LR, BETA = 0.05, 0.9


def run(tx, A, b, m, value=None):
  """Steps with tx.update(grads, state, X, value=losses); ``value`` overrides the losses."""
  X = coopjax.replicate(ref.init_params(), m)
  state = tx.init(X)
  grad_fn = jax.vmap(jax.value_and_grad(ref.loss_fn))

  @jax.jit
  def step(X, state, batch):
    losses, grads = grad_fn(X, batch)
    v = losses if value is None else jnp.asarray(value, jnp.float32)
    updates, state = tx.update(grads, state, X, value=v)
    return optax.apply_updates(X, updates), state

  taus = []
  for k in range(A.shape[0]):
    X, state = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
    taus.append(int(getattr(state, "tau", -1)))
  return X, state, taus


def np_loss(x, A, b):
  r = A @ x[: ref.D] + x[ref.D] - b
  return 0.5 * np.mean(r**2)


def reference(A, b, m, tau0, lr=lambda count: LR, decaying=False, beta=BETA, max_tau=None):
  """Momentum SGD per worker; average when τ steps have passed since the last average.

  τ ← ⌈√((η₀/η_l)·F_l/F₀)·τ₀⌉ at each average, F = mean worker loss at the models
  before that step, F₀ the mean loss at step 1, η_l = lr(k) the next step's lr.
  """
  X = np.tile(ref.flat(coopjax.replicate(ref.init_params(), 1))[0], (m, 1))
  buf = np.zeros_like(X)
  tau, last, F0, taus, raw = tau0, 0, None, [], []
  for k in range(1, A.shape[0] + 1):
    losses = [np_loss(X[i], A[k - 1, i], b[k - 1, i]) for i in range(m)]
    g = np.stack([ref.np_grad(X[i], A[k - 1, i], b[k - 1, i]) for i in range(m)])
    F0 = np.mean(losses) if k == 1 else F0
    buf = beta * buf + g
    X = X - lr(k - 1) * buf
    if k - last == tau:
      X = np.tile(X.mean(0), (m, 1))
      ratio = np.mean(losses) / F0 * (lr(0) / lr(k) if decaying else 1.0)
      raw.append(math.sqrt(ratio) * tau0)
      tau = max(1, math.ceil(raw[-1]))
      tau = tau if max_tau is None else min(tau, max_tau)
      last = k
    taus.append(tau)
  # Float32 vs float64 losses must not straddle an integer in the ceiling.
  assert all(abs(r - round(r)) > 1e-3 for r in raw), raw
  return X, taus


def test_fixed_lr_matches_numpy_with_momentum():
  m, tau0, steps = 4, 4, 30
  A, b = ref.make_batches(steps, m, seed=51)
  X, state, taus = run(
    coopjax.adacomm(optax.sgd(LR, momentum=BETA), tau0=tau0, num_workers=m), A, b, m
  )
  X_ref, taus_ref = reference(A, b, m, tau0)
  assert taus == taus_ref
  assert min(taus_ref) < tau0  # the loss fell, so the period shrank
  assert len(set(taus_ref)) >= 2
  np.testing.assert_allclose(ref.flat(X), X_ref, rtol=1e-4, atol=1e-5)
  assert int(coopjax.step_count(state)) == steps


def test_decaying_lr_matches_numpy():
  m, tau0, steps = 4, 3, 30
  schedule = optax.exponential_decay(0.08, transition_steps=6, decay_rate=0.5)
  lr = lambda count: 0.08 * 0.5 ** (count / 6)
  A, b = ref.make_batches(steps, m, seed=52)
  tx = coopjax.adacomm(
    optax.sgd(schedule, momentum=BETA), tau0=tau0, num_workers=m, lr_schedule=schedule
  )
  X, _, taus = run(tx, A, b, m)
  X_ref, taus_ref = reference(A, b, m, tau0, lr=lr, decaying=True)
  assert taus == taus_ref
  assert max(taus_ref) > tau0  # the lr decay outweighs the loss decrease here
  np.testing.assert_allclose(ref.flat(X), X_ref, rtol=1e-4, atol=1e-5)
  # lr0 overrides η₀ = schedule(0): doubling it multiplies the ratio by 2.
  tx2 = coopjax.adacomm(
    optax.sgd(schedule, momentum=BETA),
    tau0=tau0,
    num_workers=m,
    lr0=0.16,
    lr_schedule=schedule,
    max_tau=7,
  )
  _, _, taus2 = run(tx2, A, b, m)
  _, taus2_ref = reference(
    A, b, m, tau0, lr=lambda c: 0.16 if c == 0 else lr(c), decaying=True, max_tau=7
  )
  assert taus2 == taus2_ref and taus2 != taus


def test_constant_loss_is_periodic_averaging():
  m, tau0, steps = 4, 3, 20
  A, b = ref.make_batches(steps, m, seed=53)
  local = optax.sgd(LR, momentum=BETA)
  X, _, taus = run(coopjax.adacomm(local, tau0=tau0, num_workers=m), A, b, m, value=np.full(m, 0.7))
  assert taus == [tau0] * steps
  Xl, _, _ = run(
    coopjax.local_sgd(local, tau=tau0, num_workers=m), A, b, m
  )  # value is ignored there
  np.testing.assert_allclose(ref.flat(X), ref.flat(Xl), rtol=1e-5, atol=1e-6)


def test_make_step_passes_the_losses_and_traces_once():
  m, tau0, steps = 4, 4, 12
  A, b = ref.make_batches(steps, m, seed=51)
  tx = coopjax.adacomm(optax.sgd(LR, momentum=BETA), tau0=tau0, num_workers=m)
  X = coopjax.replicate(ref.init_params(), m)
  state = tx.init(X)
  assert isinstance(state, coopjax.AdaCommState)
  assert state._fields == ("count", "local_state", "tau", "last_mix", "loss0")
  raw = coopjax.make_step(ref.loss_fn, tx, jit=False)
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(raw, n=1))
  for k in range(steps):
    X, state, _ = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
  X_ref, taus_ref = reference(A[:steps], b[:steps], m, tau0)
  assert int(state.tau) == taus_ref[-1]
  np.testing.assert_allclose(ref.flat(X), X_ref, rtol=1e-4, atol=1e-5)


def test_rejects_bad_arguments():
  m = 4
  with pytest.raises(ValueError, match="lr_schedule"):
    coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=m, lr0=0.1)
  with pytest.raises(TypeError, match="schedule"):
    coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=m, lr_schedule=0.1)
  with pytest.raises(ValueError, match="tau must be >= 1"):
    coopjax.adacomm(optax.sgd(LR), tau0=0, num_workers=m)
  tx = coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=m)
  X = coopjax.replicate(ref.init_params(), m)
  grads = jax.tree.map(jnp.zeros_like, X)
  with pytest.raises(ValueError, match="value=losses"):
    tx.update(grads, tx.init(X), X)
  with pytest.raises(ValueError, match="one loss per worker"):
    tx.update(grads, tx.init(X), X, value=jnp.ones(3))
