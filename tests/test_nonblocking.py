"""Non-blocking EASGD, Overlap Local-SGD and delayed mixing against NumPy, and their dataflow."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from jax.extend import core as jcore

import coopjax
from coopjax import topology

LR, BETA = 0.05, 0.9


def run(tx, A, b, m, v):
  """Runs make_step; returns the X and state after every step."""
  X = coopjax.replicate(ref.init_params(), m, v)
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx)
  out = []
  for k in range(A.shape[0]):
    X, state, met = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
    out.append((X, state, met))
  return out


class Momentum:
  """Heavy-ball SGD per worker, as optax.sgd(lr, momentum): buf ← β buf + g, x ← x − η_k buf."""

  def __init__(self, m, lr=LR, beta=BETA):
    self.buf = np.zeros((m, ref.D + 1))
    self.lr = lr if callable(lr) else (lambda count: lr)
    self.beta = beta

  def step(self, xs, k, A, b):
    for i in range(len(xs)):
      self.buf[i] = self.beta * self.buf[i] + ref.np_grad(xs[i], A[k - 1, i], b[k - 1, i])
      xs[i] = xs[i] - self.lr(k - 1) * self.buf[i]
    return xs


def easgd_reference(m, tau, alpha, A, b):
  """Blocking EASGD, step then mix; returns [(workers, anchor)] after every step."""
  opt, xs, z = Momentum(m), np.tile(ref.x_init(), (m, 1)), ref.x_init()
  hist = []
  for k in range(1, A.shape[0] + 1):
    xs = opt.step(xs, k, A, b)
    if k % tau == 0:
      z_new = (1 - m * alpha) * z + alpha * xs.sum(0)
      xs = (1 - alpha) * xs + alpha * z
      z = z_new
    hist.append((xs.copy(), z.copy()))
  return hist


def test_nonblocking_easgd_matches_numpy_and_blocking_easgd():
  m, tau, alpha = 4, 3, 0.15
  steps = 3 * tau + 2
  A, b = ref.make_batches(steps, m, seed=31)
  local = optax.sgd(LR, momentum=BETA)
  nb = run(coopjax.nonblocking_easgd(local, tau=tau, alpha=alpha, num_workers=m), A, b, m, 1)
  bl = run(
    coopjax.easgd(local, tau=tau, alpha=alpha, num_workers=m, order="step_then_mix"), A, b, m, 1
  )
  expect = easgd_reference(m, tau, alpha, A, b)
  for k in range(steps):
    (X, state, met), (Xb, _, metb) = nb[k], bl[k]
    xs, z = expect[k]
    Xf = ref.flat(X)
    np.testing.assert_allclose(Xf[:m], xs, rtol=1e-5, atol=1e-5)
    # The anchor row lags one mix: z_p (the last pull's anchor), z_1 = x_0 before mix 2.
    p = (k + 1) // tau
    z_lag = ref.x_init() if p <= 1 else expect[(p - 1) * tau - 1][1]
    np.testing.assert_allclose(Xf[m], z_lag, rtol=1e-5, atol=1e-5)
    settled = ref.flat(coopjax.settle_easgd(X, state, alpha))
    np.testing.assert_allclose(settled, np.vstack([xs, z]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(settled, ref.flat(Xb), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(met["worker_loss"], metb["worker_loss"], rtol=1e-6, atol=1e-7)
  assert np.abs(expect[-1][1] - ref.x_init()).max() > 1e-3  # the anchor moved


def test_nonblocking_easgd_settled_averaged_model_identity():
  """Settled X obeys eq. 14, u_{k+1} = u_k − η m/(m+1) mean_i g_i, every step (SGD)."""
  m, tau, alpha, steps = 4, 2, 0.1, 6
  A, b = ref.make_batches(steps, m, seed=32)
  tx = coopjax.nonblocking_easgd(optax.sgd(LR), tau=tau, alpha=alpha, num_workers=m)
  X = coopjax.replicate(ref.init_params(), m, 1)
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx)
  for k in range(steps):
    Xf = ref.flat(X)
    g = np.mean([ref.np_grad(Xf[i], A[k, i], b[k, i]) for i in range(m)], axis=0)
    u = ref.flat(coopjax.settle_easgd(X, state, alpha)).mean(0) - LR * m / (m + 1) * g
    X, state, _ = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
    np.testing.assert_allclose(
      ref.flat(coopjax.settle_easgd(X, state, alpha)).mean(0), u, rtol=1e-5, atol=1e-6
    )


def overlap_reference(m, tau, alpha, beta, A, b, lr):
  """Overlap Local-SGD, blocking form; returns [(workers, z_{p+1} settled, z_p lagged)]."""
  opt = Momentum(m, lr=lr)
  xs, z, u = np.tile(ref.x_init(), (m, 1)), ref.x_init(), np.zeros(ref.D + 1)
  z_prev = z.copy()
  hist = []
  for k in range(1, A.shape[0] + 1):
    xs = opt.step(xs, k, A, b)
    if k % tau == 0:
      eta = lr(k - 1)
      xs = (1 - alpha) * xs + alpha * z
      z_prev = z.copy()
      u = beta * u + (z - xs.mean(0)) / eta
      z = z - eta * u
    hist.append((xs.copy(), z.copy(), z_prev.copy()))
  return hist


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_overlap_local_sgd_matches_numpy_with_schedule(beta):
  m, tau, alpha = 4, 2, 0.4
  steps = 4 * tau + 1
  A, b = ref.make_batches(steps, m, seed=33)
  schedule = optax.exponential_decay(0.08, transition_steps=1, decay_rate=0.8)
  lr = lambda count: 0.08 * 0.8**count
  tx = coopjax.overlap_local_sgd(
    optax.sgd(schedule, momentum=BETA),
    tau=tau,
    alpha=alpha,
    num_workers=m,
    anchor_momentum=beta,
    lr=schedule,
  )
  out = run(tx, A, b, m, 1)
  expect = overlap_reference(m, tau, alpha, beta, A, b, lr)
  for k in range(steps):
    X, state, _ = out[k]
    xs, z, z_lag = expect[k]
    Xf = ref.flat(X)
    np.testing.assert_allclose(Xf[:m], xs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(Xf[m], z_lag, rtol=1e-4, atol=1e-5)
    settled = coopjax.settle_overlap(X, state)
    np.testing.assert_allclose(ref.flat(settled)[m], z, rtol=1e-4, atol=1e-5)
  # With momentum the schedule matters: a constant lr gives other models.
  if beta:
    const = overlap_reference(m, tau, alpha, beta, A, b, lambda c: 0.08)
    other = overlap_reference(m, tau, alpha, beta, A, b, lambda c: 0.08 * 0.8**c)
    assert np.abs(const[-1][1] - other[-1][1]).max() > 1e-3


def test_overlap_beta0_is_cooperative_with_column_stochastic_W():
  """β = 0: A(τ, W_ov, 1) with W_ov = [[(1−α)I, (1−α)1/m], [α1ᵀ, α]] (after settling)."""
  m, tau, alpha = 4, 2, 0.3
  steps = 3 * tau + 1
  A, b = ref.make_batches(steps, m, seed=34)
  W = np.zeros((m + 1, m + 1))
  W[:m, :m] = (1 - alpha) * np.eye(m)
  W[:m, m] = (1 - alpha) / m
  W[m, :m] = alpha
  W[m, m] = alpha
  local = optax.sgd(LR, momentum=BETA)
  ov = run(coopjax.overlap_local_sgd(local, tau=tau, alpha=alpha, num_workers=m), A, b, m, 1)
  coop = run(coopjax.cooperative(local, tau=tau, W=W, num_aux=1, symmetric=False), A, b, m, 1)
  for (X, state, _), (Xc, _, _) in zip(ov, coop, strict=True):
    settled = coopjax.settle_overlap(X, state)
    np.testing.assert_allclose(ref.flat(settled), ref.flat(Xc), rtol=1e-5, atol=1e-6)


def test_overlap_alpha0_is_no_communication():
  m, tau, steps = 3, 2, 7
  A, b = ref.make_batches(steps, m, seed=35)
  out = run(
    coopjax.overlap_local_sgd(
      optax.sgd(LR, momentum=BETA), tau=tau, alpha=0.0, num_workers=m, anchor_momentum=0.5
    ),
    A,
    b,
    m,
    1,
  )
  opt, xs = Momentum(m), np.tile(ref.x_init(), (m, 1))
  for k in range(1, steps + 1):
    xs = opt.step(xs, k, A, b)
  np.testing.assert_allclose(ref.flat(out[-1][0])[:m], xs, rtol=1e-5, atol=1e-5)


def delayed_reference(W, tau, A, b):
  m = W.shape[0]
  opt, xs = Momentum(m), np.tile(ref.x_init(), (m, 1))
  snap = xs.copy()
  for k in range(1, A.shape[0] + 1):
    xs = opt.step(xs, k, A, b)
    if k % tau == 0:
      xs = xs - snap + W.T @ snap
      snap = xs.copy()
  return xs


@pytest.mark.parametrize("graph", ["complete", "ring"])
def test_delayed_matches_numpy(graph):
  m, tau = 5, 3
  steps = 3 * tau + 1
  W = topology.complete(m) if graph == "complete" else topology.ring(m)
  A, b = ref.make_batches(steps, m, seed=36)
  out = run(coopjax.delayed(optax.sgd(LR, momentum=BETA), tau=tau, W=W), A, b, m, 0)
  expect = delayed_reference(W, tau, A, b)
  np.testing.assert_allclose(ref.flat(out[-1][0]), expect, rtol=1e-5, atol=1e-5)
  # The snapshot is not the current model: the mix differs from mixing x itself.
  blocking = run(coopjax.cooperative(optax.sgd(LR, momentum=BETA), tau=tau, W=W), A, b, m, 0)
  assert np.abs(ref.flat(blocking[-1][0]) - expect).max() > 1e-4


def test_delayed_complete_is_cocod_and_keeps_eq14():
  """W = J: after each mix x_i = s̄ + (x_i − s_i); the averaged model moves as in eq. 14."""
  m, tau, steps = 4, 2, 6
  A, b = ref.make_batches(steps, m, seed=37)
  tx = coopjax.delayed(optax.sgd(LR), tau=tau, W=topology.complete(m))
  X = coopjax.replicate(ref.init_params(), m)
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx)
  for k in range(1, steps + 1):
    Xf, snap = ref.flat(X), ref.flat(state.pending)
    G = np.stack([ref.np_grad(Xf[i], A[k - 1, i], b[k - 1, i]) for i in range(m)])
    X, state, _ = step(X, state, (jnp.asarray(A[k - 1]), jnp.asarray(b[k - 1])))
    local = Xf - LR * G
    expect = snap.mean(0) + local - snap if k % tau == 0 else local
    np.testing.assert_allclose(ref.flat(X), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.flat(X).mean(0), Xf.mean(0) - LR * G.mean(0), atol=1e-6)


def test_validation_errors():
  with pytest.raises(ValueError, match="alpha"):
    coopjax.overlap_local_sgd(optax.sgd(LR), tau=2, alpha=1.5, num_workers=4)
  with pytest.raises(ValueError, match="lr"):
    coopjax.overlap_local_sgd(
      optax.sgd(LR), tau=2, alpha=0.5, num_workers=4, anchor_momentum=0.9, lr=0.0
    )
  with pytest.raises(TypeError, match="alpha"):
    coopjax.nonblocking_easgd(optax.sgd(LR), tau=2, alpha="0.1", num_workers=4)
  with pytest.raises(ValueError, match="num_aux=1"):
    coopjax.nonblocking_easgd(optax.sgd(LR), tau=2, alpha=0.1, num_workers=4).init(
      coopjax.replicate(ref.init_params(), 4)
    )
  with pytest.raises(ValueError, match="4x4"):
    coopjax.delayed(optax.sgd(LR), tau=2, W=topology.ring(4)).init(
      coopjax.replicate(ref.init_params(), 5)
    )


# --- Dataflow of one compiled period -------------------------------------------------------
#
# An abstract interpreter over the period's jaxpr. Each value carries a set of labels (which
# inputs it derives from) and, for small integer scalars, its concrete value, so the step
# counter is known and each lax.cond is followed into the branch actually taken. One program is
# walked per period: the scan over the period's first tau - 1 steps iteration by iteration (the
# batch of step t is labelled batch@t), then the closing step at the top level (step
# (p + 1) tau - 1). Gradient computations are the equations inside the jitted loss (jit named
# "loss_fn"); reductions are reduce_sum / dot_general equations inside a taken mixing branch or
# under the "early_reduction" name scope (issued outside the branch).

MIX_REDUCTIONS = ("reduce_sum", "dot_general")


def _is_counter_op(eqn):
  """A first-order equation on small integer/bool values (the step counter's arithmetic)."""
  if any(isinstance(p, (jcore.Jaxpr, jcore.ClosedJaxpr)) for p in eqn.params.values()):
    return False
  return all(
    int(np.prod(v.aval.shape)) <= 16
    and (jnp.issubdtype(v.aval.dtype, jnp.integer) or v.aval.dtype == jnp.bool_)
    for v in eqn.outvars
  )


def _relabel(labels, t):
  """Batch labels inside the scan: batch@closing -> batch@t."""
  return frozenset(lab.split("@")[0] + f"@{t}" for lab in labels)


class DataflowWalk:
  def __init__(self):
    self.reductions = []  # (step, labels of the operands)
    self.gradients = []  # (step, labels of the inputs)
    self.offset = 0  # first step of the program being walked
    self.closing = None  # the step taken at the program's top level

  def run(self, jaxpr, consts, args, t=None, in_loss=False, in_mix=False):
    env = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        return (v.val, frozenset())
      return env[v]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
      env[var] = (np.asarray(val) if np.size(val) <= 16 else None, frozenset())
    for var, val in zip(jaxpr.invars, args, strict=True):
      env[var] = val
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      early = "early_reduction" in str(eqn.source_info.name_stack)
      outs = self.eqn(eqn, ins, t, in_loss, in_mix or early)
      for var, val in zip(eqn.outvars, outs, strict=True):
        if not isinstance(var, jcore.DropVar):
          env[var] = val
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins, t, in_loss, in_mix):
    name = eqn.primitive.name
    labels = frozenset().union(*(lab for _, lab in ins)) if ins else frozenset()
    step = self.closing if t is None else t
    if name in ("jit", "pjit"):
      sub = eqn.params["jaxpr"]
      inner = in_loss or "loss_fn" in str(eqn.params.get("name", ""))
      return self.run(sub.jaxpr, sub.consts, ins, t, inner, in_mix)
    if name == "scan":
      return self.scan(eqn, ins, in_loss, in_mix)
    if name == "cond":
      index = ins[0][0]
      assert index is not None, "the mixing predicate must be known (concrete step counter)"
      branch = eqn.params["branches"][int(index)]
      mixing = in_mix or int(index) == 1  # lax.cond(pred, mix, skip): branches = (skip, mix)
      return self.run(branch.jaxpr, branch.consts, ins[1:], t, in_loss, mixing)
    if in_loss:
      self.gradients.append((step, labels))
    if in_mix and name in MIX_REDUCTIONS:
      self.reductions.append((step, labels))
      labels = labels | {f"reduce@{step}"}
    values = [v for v, _ in ins]
    if all(v is not None for v in values) and _is_counter_op(eqn):
      out = eqn.primitive.bind(*values, **eqn.params)
      out = out if eqn.primitive.multiple_results else [out]
      return [(np.asarray(o), labels) for o in out]
    return [(None, labels) for _ in eqn.outvars]

  def scan(self, eqn, ins, in_loss, in_mix):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
    ys = None
    for i in range(p["length"]):
      t = self.offset + i
      x_t = [(None, _relabel(labs, t)) for _, labs in xs]
      out = self.run(
        p["jaxpr"].jaxpr, p["jaxpr"].consts, [*consts, *carry, *x_t], t, in_loss, in_mix
      )
      carry, y = out[:nk], out[nk:]
      ys = y if ys is None else [(None, a[1] | b[1]) for a, b in zip(ys, y, strict=True)]
    return [*carry, *[(None, lab) for _, lab in ys]]


def trace_periods(tx, m, v, tau, periods):
  """Walks ``periods`` calls of make_period_step from a fresh state (count 0), one per period."""
  A, b = ref.make_batches(tau * periods, m, seed=38)
  X = coopjax.replicate(ref.init_params(), m, v)
  state = tx.init(X)
  period = coopjax.make_period_step(
    jax.jit(ref.loss_fn), tx, jit=False, with_consensus=False, with_grad_norm=False
  )
  leaves, _ = jax.tree_util.tree_flatten_with_path((X, state))
  carried = []
  for path, leaf in leaves:
    role = ["X", "state"][path[0].idx]
    if role == "state":
      field = path[1].name
      role = f"state.{field}"
      if field == "count":
        carried.append((np.asarray(leaf), frozenset([role])))
        continue
    carried.append((None, frozenset([role])))
  walk = DataflowWalk()
  for p in range(periods):
    sl = slice(p * tau, (p + 1) * tau)
    args = (X, state, (jnp.asarray(A[sl]), jnp.asarray(b[sl])))
    closed = jax.make_jaxpr(period)(*args)
    walk.offset, walk.closing = p * tau, (p + 1) * tau - 1
    batch = [(None, frozenset([f"batch@{walk.closing}"]))] * 2
    outs = walk.run(closed.jaxpr, closed.consts, [*carried, *batch])
    carried = outs[: len(carried)]
    X, state, _ = period(*args)
  return walk


def period_of(t, tau):
  return t // tau


NONBLOCKING = {
  "nonblocking_easgd": (
    lambda m, tau: coopjax.nonblocking_easgd(optax.sgd(LR), tau=tau, alpha=0.1, num_workers=m),
    1,
  ),
  "overlap_local_sgd": (
    lambda m, tau: coopjax.overlap_local_sgd(
      optax.sgd(LR), tau=tau, alpha=0.3, num_workers=m, anchor_momentum=0.5, lr=0.1
    ),
    1,
  ),
  "delayed_ring": (lambda m, tau: coopjax.delayed(optax.sgd(LR), tau=tau, W=topology.ring(m)), 0),
}


@pytest.mark.parametrize("name", sorted(NONBLOCKING))
def test_reduction_is_independent_of_the_periods_local_steps(name):
  """In a period's program the mix's reduction and the period's gradients are unordered.

  Its operand derives from no batch of its own period (it is the pending state, fixed at the
  previous mix), and no gradient computation of the period reads its result; the next
  period's reduction reads the models fixed at this period's mix.
  """
  m, tau, periods = 4, 3, 2
  make, v = NONBLOCKING[name]
  walk = trace_periods(make(m, tau), m, v, tau, periods)
  mix_iters = sorted({t for t, _ in walk.reductions})
  assert mix_iters == [tau - 1, 2 * tau - 1]  # one mix per period, at its last step
  for t, labels in walk.reductions:
    p = period_of(t, tau)
    own = {f"batch@{s}" for s in range(p * tau, (p + 1) * tau)}
    assert not own & labels, (t, sorted(labels))
    if p == 0:  # the pending state as initialised: nothing computed in the program
      assert labels == {"state.pending"}, (t, sorted(labels))
    else:  # issued at the previous mix: it depends on the previous period's data
      assert {f"batch@{s}" for s in range((p - 1) * tau, p * tau)} <= labels
  assert walk.gradients
  for t, labels in walk.gradients:
    assert f"reduce@{(period_of(t, tau) + 1) * tau - 1}" not in labels, (t, sorted(labels))
  # The gradients of period 2 do read the reduction completed at mix 1 (through the pull).
  assert any(f"reduce@{tau - 1}" in labels for t, labels in walk.gradients if t >= tau)


def test_blocking_easgd_reduction_waits_for_the_last_local_step():
  """The contrast: EASGD's mix (a dense W_α product) reads the models of the period's last step."""
  m, tau = 4, 3
  walk = trace_periods(
    coopjax.easgd(optax.sgd(LR), tau=tau, alpha=0.1, num_workers=m), m, 1, tau, 1
  )
  assert walk.reductions
  for t, labels in walk.reductions:
    assert t == tau - 1 and f"batch@{tau - 1}" in labels


@pytest.mark.parametrize("name", sorted(NONBLOCKING))
@pytest.mark.parametrize("length,start", [(6, 0), (3, 1), (1, 2), (2, 0)])
def test_period_step_with_early_reduction_equals_steps(name, length, start):
  """Programs of any length from any step count: the same iterates as make_step, in a chain.

  (The aligned period, (length, start) = (tau, 0), is tests/test_period.py's.) (6, 0) mixes
  twice in one program and (3, 1) mixes inside the loop, so the closing mix must fall
  back to reducing the state's pending; (1, 2) is a period of one step ending in a mix; (2, 0)
  ends without mixing.
  """
  m, tau = 4, 3
  make, v = NONBLOCKING[name]
  tx = optax.chain(optax.scale(1.0), make(m, tau))
  A, b = ref.make_batches(start + length, m, seed=39)
  X0 = coopjax.replicate(ref.init_params(), m, v)
  step = coopjax.make_step(ref.loss_fn, tx)
  X, state, losses = X0, tx.init(X0), []
  for k in range(start + length):
    X, state, met = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
    losses.append(met["worker_loss"])
    if k + 1 == start:
      Xs, ss = X, state
  if start == 0:
    Xs, ss = X0, tx.init(X0)
  period = coopjax.make_period_step(ref.loss_fn, tx)
  Xp, sp, mp = period(Xs, ss, (jnp.asarray(A[start:]), jnp.asarray(b[start:])))
  np.testing.assert_allclose(ref.flat(Xp), ref.flat(X), rtol=1e-6, atol=1e-6)
  for a, c in zip(jax.tree.leaves(sp), jax.tree.leaves(state), strict=True):
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(mp["worker_loss"], np.stack(losses[start:]), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(mp["step"], np.arange(start + 1, start + length + 1))
  assert np.abs(ref.flat(Xp) - ref.flat(X0)).max() > 1e-3


def test_issued_early_checks_its_arguments():
  from coopjax.algorithms import _nonblocking as nonblocking

  with pytest.raises(TypeError, match="early.kind"):
    with nonblocking.issued_early(nonblocking.EarlyReduction(tuple, {}, jnp.zeros((), jnp.int32))):
      pass
  m, tau = 4, 2
  tx = coopjax.nonblocking_easgd(optax.sgd(LR), tau=tau, alpha=0.1, num_workers=m)
  X = coopjax.replicate(ref.init_params(), m, 1)
  state = tx.init(X)
  grads = jax.tree.map(lambda x: jnp.ones_like(x[:m]), X)
  early = nonblocking.EarlyReduction(nonblocking.NonBlockingEASGDState, [1.0], state.count)
  with nonblocking.issued_early(early), pytest.raises(ValueError, match="structure"):
    tx.update(grads, state, X)
  found = nonblocking.overlap_states(optax.chain(optax.scale(1.0), tx).init(X))
  assert [type(f) for f in found] == [nonblocking.NonBlockingEASGDState]


# --- The compiled period program: where the collective runs -------------------------------
#
# The optimized HLO of the sharded period step (8 fake CPU devices), read as a graph of
# instructions (name -> operands) per computation.


def _hlo(tx, m, v, tau):
  from coopjax.parallel import sharding

  mesh = sharding.worker_mesh()
  X = sharding.shard(coopjax.replicate(ref.init_params(), m, v), mesh, v)
  state = sharding.init(tx, X, mesh, v)
  A, b = ref.make_batches(tau, m, seed=40)
  # The mixing's collectives alone: no reducing metrics (on by default).
  off = dict(with_loss=False, with_consensus=False, with_grad_norm=False)
  period = coopjax.make_period_step(ref.loss_fn, tx, mesh, **off)
  text = period.lower(X, state, (jnp.asarray(A), jnp.asarray(b))).compile().as_text()
  return text, coopjax.cost.report.parse_hlo(text)


class Graph:
  """The instructions of an HLO module: ``comps[c][name] = (opcode, operands, text)``."""

  def __init__(self, text):
    from coopjax.cost.report import _OPERAND
    from coopjax.cost.report import _operands
    from coopjax.cost.report import _parse

    parsed, _, self.entry = _parse(text)
    self.comps = {
      c: {i.name: (i.opcode, _OPERAND.findall(_operands(i.text)), i.text) for i in instrs}
      for c, instrs in parsed.items()
    }

  def ancestors(self, comp, name):
    """Every instruction of ``comp`` that ``name`` depends on (transitively), itself excluded."""
    seen, todo = set(), list(self.comps[comp][name][1])
    while todo:
      n = todo.pop()
      if n in seen or n not in self.comps[comp]:
        continue
      seen.add(n)
      todo.extend(self.comps[comp][n][1])
    return seen

  def of(self, comp, opcode):
    return [n for n, (op, _, _) in self.comps[comp].items() if op == opcode]

  def reachable(self, comp):
    """Computations called (transitively) from ``comp``: loop bodies, branches, fusions."""
    seen, todo = set(), [comp]
    while todo:
      c = todo.pop()
      if c in seen or c not in self.comps:
        continue
      seen.add(c)
      for _, _, text in self.comps[c].values():
        todo.extend(n for n in re.findall(r"%([\w.\-]+)", text) if n in self.comps)
    return seen


OVERLAPPED = {
  "nonblocking_easgd_m8": (
    lambda m: coopjax.nonblocking_easgd(optax.sgd(LR), tau=4, alpha=0.05, num_workers=m),
    8,
    1,
  ),
  "nonblocking_easgd_m16": (
    lambda m: coopjax.nonblocking_easgd(optax.sgd(LR), tau=4, alpha=0.05, num_workers=m),
    16,
    1,
  ),
  "overlap_local_sgd_m8": (
    lambda m: coopjax.overlap_local_sgd(
      optax.sgd(LR), tau=4, alpha=0.3, num_workers=m, anchor_momentum=0.5
    ),
    8,
    1,
  ),
}


@pytest.mark.parametrize("name", sorted(OVERLAPPED))
def test_compiled_period_issues_the_reduction_before_the_loop(name):
  """The all-reduce of the pending operand sits in the entry computation, fed by the program's
  parameters only; the loop of local steps does not read it; the closing mix (a conditional
  after the loop) does."""
  make, m, v = OVERLAPPED[name]
  tau = 4
  text, report = _hlo(make(m), m, v, tau)
  g = Graph(text)
  entry = g.comps[g.entry]
  early = [c for c in report if c.kind == "all-reduce" and c.computation == g.entry]
  assert len(early) == 1, report.table()
  assert not early[0].in_branch and "early_reduction" in entry[early[0].name][2]
  up = g.ancestors(g.entry, early[0].name)
  assert not {n for n in up if entry[n][0] in ("while", "conditional", "all-reduce")}
  params = [n for n in up if entry[n][0] == "parameter"]
  assert params and all("pending" in entry[n][2] for n in params), [entry[n][2] for n in params]
  (loop,) = g.of(g.entry, "while")
  assert early[0].name not in g.ancestors(g.entry, loop)
  closing = [
    n
    for n in g.of(g.entry, "conditional")
    if early[0].name in g.ancestors(g.entry, n) and loop in g.ancestors(g.entry, n)
  ]
  assert len(closing) == 1
  # The loop's own mixing branch still holds a reduction (for a period started mid-way), but
  # no collective of the loop feeds the entry's all-reduce.
  body = re.search(r"body=%([\w.\-]+)", entry[loop][2]).group(1)
  in_loop = g.reachable(body)
  assert any(c.computation in in_loop for c in report if c.kind == "all-reduce")


def test_compiled_blocking_easgd_reduces_inside_the_loop():
  """The contrast: blocking EASGD's only all-reduce runs in the loop's mixing branch."""
  m, tau = 8, 4
  text, report = _hlo(coopjax.easgd(optax.sgd(LR), tau=tau, alpha=0.05, num_workers=m), m, 1, tau)
  g = Graph(text)
  (loop,) = g.of(g.entry, "while")
  body = re.search(r"body=%([\w.\-]+)", g.comps[g.entry][loop][2]).group(1)
  in_loop = g.reachable(body)
  reduces = [c for c in report if c.kind == "all-reduce"]
  assert reduces and all(c.in_branch and c.computation in in_loop for c in reduces), report.table()
  assert not [c for c in report if c.computation == g.entry]


def test_doctest():
  import doctest

  from coopjax.algorithms import _nonblocking as nonblocking

  result = doctest.testmod(nonblocking, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
