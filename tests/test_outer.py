"""SlowMo and DiLoCo against NumPy re-derivations and their special cases."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax

LR, BETA = 0.05, 0.9


def flat_model(tree):
  """One unstacked model -> flat float64 vector."""
  return np.concatenate([np.asarray(tree["w"], np.float64), [float(tree["c"])]])


class Momentum:
  """optax.sgd(lr, momentum=β) per worker: buf ← β buf + g, x ← x − lr(k − 1) buf."""

  def __init__(self, m, lr, beta=BETA):
    self.buf = np.zeros((m, ref.D + 1))
    self.lr, self.beta = lr, beta

  def step(self, xs, k, A, b):
    for i in range(len(xs)):
      self.buf[i] = self.beta * self.buf[i] + ref.np_grad(xs[i], A[k - 1, i], b[k - 1, i])
      xs[i] = xs[i] - self.lr(k - 1) * self.buf[i]
    return xs


def outer_reference(m, tau, A, b, lr, outer_step, buffers="maintain"):
  """τ inner momentum-SGD steps, then x_start ← outer_step(k, Δ, x_start), x_i ← x_start."""
  opt = Momentum(m, lr)
  xs, x_start = np.tile(ref.x_init(), (m, 1)), ref.x_init()
  for k in range(1, A.shape[0] + 1):
    xs = opt.step(xs, k, A, b)
    if k % tau == 0:
      x_start = outer_step(k, x_start - xs.mean(0), x_start)
      xs = np.tile(x_start, (m, 1))
      if buffers == "reset":
        opt.buf[:] = 0.0
      elif buffers == "average":
        opt.buf[:] = opt.buf.mean(0)
  return xs, x_start


def slowmo_outer(alpha, beta, lr):
  u = np.zeros(ref.D + 1)

  def step(k, delta, x_start):
    nonlocal u
    gamma = lr(k - 1)
    u = beta * u + delta / gamma
    return x_start - alpha * gamma * u

  return step


SCHEDULE = optax.exponential_decay(0.08, transition_steps=2, decay_rate=0.7)
schedule_np = lambda count: 0.08 * 0.7 ** (count / 2)


@pytest.mark.parametrize("buffers", ["maintain", "reset", "average"])
def test_slowmo_matches_numpy_with_schedule(buffers):
  m, tau, alpha, beta = 4, 3, 0.8, 0.6
  steps = 3 * tau + 1
  A, b = ref.make_batches(steps, m, seed=41)
  local = optax.sgd(SCHEDULE, momentum=BETA)
  tx = coopjax.slowmo(
    local, tau=tau, num_workers=m, alpha=alpha, beta=beta, lr=SCHEDULE, base_buffers=buffers
  )
  X, state = ref.run(tx, A, b, m)
  xs, x_start = outer_reference(
    m, tau, A, b, schedule_np, slowmo_outer(alpha, beta, schedule_np), buffers
  )
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(flat_model(state.x_start), x_start, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "buffers,policy", [("maintain", "keep"), ("reset", "reset"), ("average", "mix")]
)
def test_slowmo_alpha1_beta0_is_periodic_averaging(buffers, policy):
  m, tau, steps = 4, 2, 7
  A, b = ref.make_batches(steps, m, seed=42)
  local = optax.sgd(LR, momentum=BETA)
  X, _ = ref.run(
    coopjax.slowmo(
      local, tau=tau, num_workers=m, alpha=1.0, beta=0.0, lr=0.3, base_buffers=buffers
    ),
    A,
    b,
    m,
  )
  Xl, _ = ref.run(
    coopjax.local_sgd(local, tau=tau, num_workers=m, local_state_policy=policy), A, b, m
  )
  np.testing.assert_allclose(ref.flat(X), ref.flat(Xl), rtol=1e-5, atol=1e-6)


def test_diloco_matches_numpy_with_nesterov_outer():
  m, tau, outer_lr, mu = 4, 3, 0.7, 0.9
  steps = 3 * tau + 2
  A, b = ref.make_batches(steps, m, seed=43)
  outer = optax.sgd(outer_lr, momentum=mu, nesterov=True)
  X, state = ref.run(
    coopjax.diloco(optax.sgd(LR, momentum=BETA), outer=outer, tau=tau, num_workers=m), A, b, m
  )
  trace = np.zeros(ref.D + 1)

  def nesterov(k, delta, x_start):  # optax.trace(nesterov=True): t ← g + μt, step g + μt
    nonlocal trace
    trace = delta + mu * trace
    return x_start - outer_lr * (delta + mu * trace)

  xs, x_start = outer_reference(m, tau, A, b, lambda c: LR, nesterov)
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(flat_model(state.x_start), x_start, rtol=1e-4, atol=1e-5)
  # The displacement's sign: Δ = x_start − x̄, so outer sgd(1) lands on x̄, not past x_start.
  assert np.abs(x_start - ref.x_init()).max() > 1e-3


@pytest.mark.parametrize("inner", ["momentum", "adam"])
def test_diloco_outer_sgd1_is_periodic_averaging(inner):
  m, tau, steps = 3, 3, 8
  A, b = ref.make_batches(steps, m, seed=44)
  local = optax.sgd(LR, momentum=BETA) if inner == "momentum" else optax.adam(0.02)
  X, _ = ref.run(coopjax.diloco(local, outer=optax.sgd(1.0), tau=tau, num_workers=m), A, b, m)
  Xl, _ = ref.run(coopjax.local_sgd(local, tau=tau, num_workers=m), A, b, m)
  np.testing.assert_allclose(ref.flat(X), ref.flat(Xl), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.05, 0.5])
def test_slowmo_is_diloco_with_heavy_ball_outer(gamma):
  """Constant γ: SlowMo(α, β) = DiLoCo with outer optax.sgd(α, momentum=β), for any γ.

  SlowMo's u ← βu + Δ/γ, x ← x − αγu is, with t = γu, t ← βt + Δ, x ← x − αt: optax's
  heavy-ball trace with learning rate α.
  """
  m, tau, alpha, beta = 4, 2, 0.9, 0.7
  steps = 4 * tau
  A, b = ref.make_batches(steps, m, seed=45)
  local = optax.sgd(LR, momentum=BETA)
  Xs, ss = ref.run(
    coopjax.slowmo(local, tau=tau, num_workers=m, alpha=alpha, beta=beta, lr=gamma), A, b, m
  )
  Xd, sd = ref.run(
    coopjax.diloco(local, outer=optax.sgd(alpha, momentum=beta), tau=tau, num_workers=m), A, b, m
  )
  np.testing.assert_allclose(ref.flat(Xs), ref.flat(Xd), rtol=1e-5, atol=1e-6)
  trace = flat_model(coopjax.algorithms.find_state(sd.outer_state, optax.TraceState).trace)
  np.testing.assert_allclose(gamma * flat_model(ss.momentum), trace, rtol=1e-4, atol=1e-6)


def test_slowmo_without_lr_matches_numpy_heavy_ball():
  """lr=None: t ← βt + Δ, x_start ← x_start − αt (the constant-γ rule, γ cancelled)."""
  m, tau, alpha, beta = 4, 2, 0.8, 0.6
  steps = 3 * tau
  A, b = ref.make_batches(steps, m, seed=48)
  t = np.zeros(ref.D + 1)

  def outer_step(k, delta, x_start):
    nonlocal t
    t = beta * t + delta
    return x_start - alpha * t

  X, state = ref.run(
    coopjax.slowmo(optax.sgd(LR, momentum=BETA), tau=tau, num_workers=m, alpha=alpha, beta=beta),
    A,
    b,
    m,
  )
  xs, x_start = outer_reference(m, tau, A, b, lambda c: LR, outer_step)
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat_model(state.momentum), t, rtol=1e-4, atol=1e-6)


def test_slowmo_learning_rate_in_float64():
  """In a float64 run γ enters in float64: a γ not representable in float32 is not rounded."""
  import jax

  gamma = 0.1  # float32(0.1) differs from 0.1 by 1.5e-9
  with jax.enable_x64(True):
    X = {"w": jnp.zeros((2, 3), jnp.float64)}
    tx = coopjax.slowmo(optax.sgd(1.0), tau=1, num_workers=2, alpha=1.0, beta=0.0, lr=gamma)
    g = {"w": jnp.asarray([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], jnp.float64)}
    U, state = tx.update(g, tx.init(X), X)
    # Δ = x_start − x̄ = 2; u = Δ/γ; x_start ← 0 − 1·γ·u = −2 up to float64 rounding.
    np.testing.assert_allclose(np.asarray(state.momentum["w"]), 2.0 / gamma, rtol=1e-14)
    assert state.momentum["w"].dtype == jnp.float64


def test_slowmo_and_heavy_ball_diloco_differ_under_a_decaying_lr():
  m, tau, alpha, beta = 4, 2, 0.9, 0.7
  A, b = ref.make_batches(4 * tau, m, seed=46)
  local = optax.sgd(SCHEDULE, momentum=BETA)
  Xs, _ = ref.run(
    coopjax.slowmo(local, tau=tau, num_workers=m, alpha=alpha, beta=beta, lr=SCHEDULE), A, b, m
  )
  Xd, _ = ref.run(
    coopjax.diloco(local, outer=optax.sgd(alpha, momentum=beta), tau=tau, num_workers=m), A, b, m
  )
  assert np.abs(ref.flat(Xs) - ref.flat(Xd)).max() > 1e-4


def test_averaged_model_moves_as_eq14_off_mixing_steps():
  """Between mixes u_{k+1} = u_k − η mean_i g_i; right after a mix every x_i = x_start."""
  m, tau, steps = 4, 3, 7
  A, b = ref.make_batches(steps, m, seed=47)
  tx = coopjax.diloco(
    optax.sgd(LR), outer=optax.sgd(0.7, momentum=0.9, nesterov=True), tau=tau, num_workers=m
  )
  X = coopjax.replicate(ref.init_params(), m)
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx)
  for k in range(1, steps + 1):
    Xf = ref.flat(X)
    g = np.mean([ref.np_grad(Xf[i], A[k - 1, i], b[k - 1, i]) for i in range(m)], axis=0)
    X, state, _ = step(X, state, (jnp.asarray(A[k - 1]), jnp.asarray(b[k - 1])))
    if k % tau:
      np.testing.assert_allclose(ref.flat(X).mean(0), Xf.mean(0) - LR * g, atol=1e-6)
    else:
      np.testing.assert_allclose(ref.flat(X), np.tile(flat_model(state.x_start), (m, 1)))


def test_validation_errors():
  with pytest.raises(ValueError, match="base_buffers"):
    coopjax.slowmo(
      optax.sgd(LR), tau=2, num_workers=4, alpha=1.0, beta=0.5, lr=LR, base_buffers="average_all"
    )
  with pytest.raises(TypeError, match="outer"):
    coopjax.diloco(optax.sgd(LR), outer=0.7, tau=2, num_workers=4)
  with pytest.raises(ValueError, match="lr"):
    coopjax.slowmo(optax.sgd(LR), tau=2, num_workers=4, alpha=1.0, beta=0.5, lr=-0.1)
  with pytest.raises(ValueError, match="no auxiliary rows"):
    coopjax.diloco(optax.sgd(LR), outer=optax.sgd(1.0), tau=2, num_workers=4).init(
      coopjax.replicate(ref.init_params(), 4, 1)
    )


def test_doctest():
  import doctest

  from coopjax.algorithms import _outer as outer

  result = doctest.testmod(outer, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
