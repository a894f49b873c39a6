"""AdaComm's adaptive period against a NumPy re-derivation of its rule."""

import math

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
    coopjax.adacomm(
      optax.sgd(LR, momentum=BETA), tau0=tau0, num_workers=m, loss_estimate="worker_losses"
    ),
    A,
    b,
    m,
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
    optax.sgd(schedule, momentum=BETA),
    tau0=tau0,
    num_workers=m,
    lr_schedule=schedule,
    loss_estimate="worker_losses",
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
    loss_estimate="worker_losses",
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
  X, _, taus = run(
    coopjax.adacomm(local, tau0=tau0, num_workers=m, loss_estimate="worker_losses"),
    A,
    b,
    m,
    value=np.full(m, 0.7),
  )
  assert taus == [tau0] * steps
  Xl, _, _ = run(
    coopjax.local_sgd(local, tau=tau0, num_workers=m), A, b, m
  )  # value is ignored there
  np.testing.assert_allclose(ref.flat(X), ref.flat(Xl), rtol=1e-5, atol=1e-6)


def test_make_step_passes_the_losses_and_traces_once():
  m, tau0, steps = 4, 4, 12
  A, b = ref.make_batches(steps, m, seed=51)
  tx = coopjax.adacomm(
    optax.sgd(LR, momentum=BETA), tau0=tau0, num_workers=m, loss_estimate="worker_losses"
  )
  X = coopjax.replicate(ref.init_params(), m)
  state = tx.init(X)
  assert isinstance(state, coopjax.AdaCommState)
  assert state._fields == ("count", "local_state", "tau", "last_mix", "loss0", "decide_at")
  X, state = ref.run_from(tx, X, A, b, single_trace=True)
  X_ref, taus_ref = reference(A[:steps], b[:steps], m, tau0)
  assert int(state.tau) == taus_ref[-1]
  np.testing.assert_allclose(ref.flat(X), X_ref, rtol=1e-4, atol=1e-5)


def test_rejects_bad_arguments():
  m = 4
  with pytest.raises(ValueError, match="lr_schedule"):
    coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=m, lr0=0.1, loss_estimate="worker_losses")
  with pytest.raises(TypeError, match="schedule"):
    coopjax.adacomm(
      optax.sgd(LR), tau0=2, num_workers=m, lr_schedule=0.1, loss_estimate="worker_losses"
    )
  with pytest.raises(ValueError, match="tau must be >= 1"):
    coopjax.adacomm(optax.sgd(LR), tau0=0, num_workers=m, loss_estimate="worker_losses")
  tx = coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=m, loss_estimate="worker_losses")
  X = coopjax.replicate(ref.init_params(), m)
  grads = jax.tree.map(jnp.zeros_like, X)
  with pytest.raises(ValueError, match="value=losses"):
    tx.update(grads, tx.init(X), X)
  with pytest.raises(ValueError, match="one loss per worker"):
    tx.update(grads, tx.init(X), X, value=jnp.ones(3))


# ---------------------------------------------------------------------------------------------
# The default rule: F is the averaged model's loss on a fixed evaluation batch.


def non_iid_batches(steps, m, seed, spread=1.5):
  """Worker i's targets are shifted by spread·(i − (m−1)/2): each shard has its own optimum."""
  A, b = ref.make_batches(steps, m, seed=seed)
  shift = spread * (np.arange(m) - (m - 1) / 2)
  return A, (b + shift[None, :, None]).astype(np.float32)


def eval_batch_of(A, b):
  """A fixed subset of the training data: the first two steps' samples of every worker."""
  return A[:2].reshape(-1, ref.D), b[:2].reshape(-1)


def reference_averaged(A, b, m, tau0, Ae, be, interval=None, beta=BETA):
  """Momentum SGD per worker; at an averaging with k ≥ decide_at, τ ← ⌈√(F(x̄)/F(x_0))·τ₀⌉.

  F(x) = loss of x on (Ae, be); decide_at = the next multiple of ``interval`` (0 if None).
  """
  x0 = ref.flat(coopjax.replicate(ref.init_params(), 1))[0]
  X, buf = np.tile(x0, (m, 1)), np.zeros((m, ref.D + 1))
  F0 = np_loss(x0, Ae, be)
  tau, last, decide_at, taus, raw = tau0, 0, interval or 0, [], []
  for k in range(1, A.shape[0] + 1):
    g = np.stack([ref.np_grad(X[i], A[k - 1, i], b[k - 1, i]) for i in range(m)])
    buf = beta * buf + g
    X = X - LR * buf
    if k - last == tau:
      X = np.tile(X.mean(0), (m, 1))
      if k >= decide_at:
        raw.append(math.sqrt(np_loss(X[0], Ae, be) / F0) * tau0)
        tau = max(1, math.ceil(raw[-1]))
        decide_at = 0 if interval is None else (k // interval + 1) * interval
      last = k
    taus.append(tau)
  assert all(abs(r - round(r)) > 1e-3 for r in raw), raw
  return X, taus


def averaged_tx(tau0, m, Ae, be, **kw):
  batch = (jnp.asarray(Ae), jnp.asarray(be))
  return coopjax.adacomm(
    optax.sgd(LR, momentum=BETA),
    tau0=tau0,
    num_workers=m,
    loss_fn=ref.loss_fn,
    eval_batch=batch,
    **kw,
  )


def test_default_uses_the_averaged_models_loss_non_iid():
  m, tau0, steps = 4, 6, 60
  A, b = non_iid_batches(steps, m, seed=61)
  Ae, be = eval_batch_of(A, b)
  X, state, taus = run(averaged_tx(tau0, m, Ae, be), A, b, m)
  X_ref, taus_ref = reference_averaged(A, b, m, tau0, Ae, be)
  assert taus == taus_ref
  assert len(set(taus_ref)) >= 2
  np.testing.assert_allclose(ref.flat(X), X_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(state.loss0), np_loss(_x0(), Ae, be), rtol=1e-5)
  # The worker-loss estimate sees each model on its own shard: lower F, shorter periods.
  _, _, taus_w = run(
    coopjax.adacomm(
      optax.sgd(LR, momentum=BETA), tau0=tau0, num_workers=m, loss_estimate="worker_losses"
    ),
    A,
    b,
    m,
  )
  assert sum(taus_w) < sum(taus)


def _x0():
  return ref.flat(coopjax.replicate(ref.init_params(), 1))[0]


def test_default_re_decides_once_per_interval():
  m, tau0, steps, interval = 4, 3, 48, 10
  A, b = non_iid_batches(steps, m, seed=62, spread=0.5)
  Ae, be = eval_batch_of(A, b)
  X, _, taus = run(averaged_tx(tau0, m, Ae, be, interval=interval), A, b, m)
  X_ref, taus_ref = reference_averaged(A, b, m, tau0, Ae, be, interval=interval)
  assert taus == taus_ref
  _, taus_every = reference_averaged(A, b, m, tau0, Ae, be)
  assert taus_ref != taus_every  # the interval changes which averagings decide
  np.testing.assert_allclose(ref.flat(X), X_ref, rtol=1e-4, atol=1e-5)


def test_default_evaluates_the_loss_only_inside_the_decision_branch():
  """The evaluation batch's forward pass sits in a cond branch, not in the step's main path."""
  m = 4
  Ae = np.ones((7, ref.D), np.float32)  # a batch size seen nowhere else
  tx = averaged_tx(2, m, Ae, np.ones(7, np.float32))
  X = coopjax.replicate(ref.init_params(), m)
  grads = jax.tree.map(jnp.zeros_like, X)
  jaxpr = jax.make_jaxpr(lambda s: tx.update(grads, s, X))(tx.init(X)).jaxpr
  top = [str(e) for e in jaxpr.eqns if e.primitive.name != "cond"]
  assert not any("7,3" in t or "7, 3" in t for t in top)
  assert "7,3" in str(jaxpr) or "7, 3" in str(jaxpr)


def test_default_needs_its_loss_and_batch():
  with pytest.raises(ValueError, match="loss_fn=.*eval_batch"):
    coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=4)
  with pytest.raises(ValueError, match="only by loss_estimate='averaged_model'"):
    coopjax.adacomm(
      optax.sgd(LR), tau0=2, num_workers=4, loss_fn=ref.loss_fn, loss_estimate="worker_losses"
    )
  with pytest.raises(ValueError, match="loss_estimate must be one of"):
    coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=4, loss_estimate="own")
  with pytest.raises(ValueError, match="interval must be >= 1"):
    coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=4, loss_estimate="worker_losses", interval=0)


def test_doctest():
  import doctest

  from coopjax.algorithms import _adacomm

  result = doctest.testmod(_adacomm, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
