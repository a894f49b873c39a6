r"""AdaComm: periodic averaging whose period adapts to the training loss.

Wang & Joshi (SysML 2019, "Adaptive communication strategies to achieve the
best error-runtime trade-off in local-update SGD") start with a large
communication period τ₀, which trains fast in wall-clock time, and shrink it
as the loss falls, which lowers the error floor of periodic averaging
(paper eq. 24: the floor grows with τ).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

import coopjax.algorithms._compressed as _compressed
import coopjax.algorithms._skeleton as _skeleton
from coopjax import mixing
from coopjax._validation import check_int
from coopjax._validation import check_real
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._skeleton import check_tau
from coopjax.cost import pattern
from coopjax.workers import Layout
from coopjax.workers import num_rows

PyTree = Any

__all__ = ["AdaCommState", "adacomm"]


class AdaCommState(NamedTuple):
  """State of :func:`adacomm`.

  Attributes:
    count: number of local steps taken so far (k − 1 before step k), int32.
    local_state: the local optimizer's state, stacked over the m workers.
    tau: the current communication period τ_l, int32.
    last_mix: the step of the last averaging (0 before the first), int32; the
      next averaging is at step ``last_mix + tau``.
    loss0: F(x_0), float32: the loss of x_0 on the evaluation batch
      (``loss_estimate="averaged_model"``, evaluated by ``init``) or the mean
      worker loss at step 1 (``"worker_losses"``; 0 before step 1).
    decide_at: the first step at or after which an averaging re-decides τ, int32
      (0: every averaging does).
  """

  count: chex.Array
  local_state: optax.OptState
  tau: chex.Array
  last_mix: chex.Array
  loss0: chex.Array
  decide_at: chex.Array


LOSS_ESTIMATES = ("averaged_model", "worker_losses")


def _check_loss_estimate(loss_estimate, loss_fn, eval_batch) -> bool:
  """True for the averaged-model rule; checks that its inputs are there."""
  if loss_estimate not in LOSS_ESTIMATES:
    raise ValueError(f"loss_estimate must be one of {LOSS_ESTIMATES}, got {loss_estimate!r}.")
  if loss_estimate == "worker_losses":
    if loss_fn is not None or eval_batch is not None:
      raise ValueError(
        "loss_fn and eval_batch are used only by loss_estimate='averaged_model'; drop them, "
        "or drop loss_estimate='worker_losses' to use the averaged model's loss."
      )
    return False
  if loss_fn is None or eval_batch is None:
    raise ValueError(
      "adacomm's default rule evaluates F, the training loss of the averaged model, on a fixed "
      "batch: pass loss_fn=(params, batch) -> scalar and eval_batch (e.g. a fixed subset of the "
      "training set). Or pass loss_estimate='worker_losses' for the mean per-worker minibatch "
      "loss (no extra forward pass, biased low on non-IID data)."
    )
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be a function (params, batch) -> scalar, got {loss_fn!r}.")
  return True


@_compressed.uncompressed
def adacomm(
  local: optax.GradientTransformation,
  *,
  tau0: int,
  num_workers: int,
  lr0: float | None = None,
  lr_schedule: Callable[[Any], Any] | None = None,
  max_tau: int | None = None,
  local_state_policy: str = "keep",
  order: str = "step_then_mix",
  mix_mask: Any = None,
  warmup_steps: int = 0,
  loss_fn: Callable[[PyTree, Any], Any] | None = None,
  eval_batch: Any = None,
  loss_estimate: str = "averaged_model",
  interval: int | None = None,
) -> CooperativeTransformation:
  r"""AdaComm (Wang & Joshi, 2019): periodic averaging with an adaptive period.

  Workers take local steps and average all models (``x_i ← (1/m) Σ_j x_j``)
  when the current period τ_l has elapsed since the last averaging. τ changes
  only at an averaging step, never cutting a period short; after the l-th
  averaging

  .. math::

     \tau_l = \Bigl\lceil \sqrt{\tfrac{F(x_l)}{F(x_0)}}\; \tau_0 \Bigr\rceil
     \ \text{(fixed lr)}, \qquad
     \tau_l = \Bigl\lceil \sqrt{\tfrac{\eta_0}{\eta_l}\,\tfrac{F(x_l)}{F(x_0)}}\;
     \tau_0 \Bigr\rceil \ \text{(decaying lr)},

  clipped to ``[1, max_tau]``. Steps k are counted from 1; the first
  averaging is after step τ₀.

  F is the training loss. Two estimates (``loss_estimate``):

  * ``"averaged_model"`` (default, the paper's rule): F(x) =
    ``loss_fn(x̄, eval_batch)``, the loss of the averaged model x̄ on a fixed
    evaluation batch (e.g. a fixed subset of the training set). F(x_l) is
    evaluated on the freshly averaged model, inside the averaging branch of
    the step and only when τ is re-decided; F(x_0) by ``init`` (and at the end
    of a warm-up), on x_0. Cost: one forward pass over ``eval_batch`` per
    decision, none on the other steps.
  * ``"worker_losses"``: F(x_l) ≈ the mean of the per-worker minibatch losses
    at the step that averages, i.e. of the local models just before that
    step's update and averaging; F(x_0) is their mean at step 1. No extra
    forward pass: the losses reach the transformation as the extra argument
    ``value``, shape ``[m]`` (:func:`coopjax.make_step` passes them;
    ``tx.update(grads, state, X, value=losses)``). With non-IID data each
    worker's model scores low on its own shard, so this F is biased low and
    τ shrinks faster than the paper's rule makes it.

  When τ is re-decided (``interval``): the paper re-decides at the start of
  each wall-clock interval of fixed length. Here an interval is ``interval``
  local steps (with a steady step time, T₀ seconds are T₀/step-time steps):
  the first averaging at or after each multiple of ``interval`` re-decides,
  the other averagings keep τ. ``interval=None`` re-decides at every
  averaging.

  With a decaying lr, ``η_l = lr_schedule(k)`` is the lr of the next local
  step (optax schedules see the number of updates taken so far, k after
  step k) and ``η_0 = lr0`` (default ``lr_schedule(0)``).

  Args:
    local: optax optimizer applied to each worker separately (vmapped); extra
      arguments of ``update``, ``value`` included, are split over the workers
      and passed to it.
    tau0: the initial period τ₀ ≥ 1.
    num_workers: m.
    lr0: η₀ for the decaying-lr rule (requires ``lr_schedule``).
    lr_schedule: the local optimizer's learning-rate schedule ``count -> η``;
      when given, the decaying-lr rule is used.
    max_tau: optional upper bound on τ_l.
    local_state_policy: ``"keep"``, ``"mix"`` (average the buffers too) or
      ``"reset"``, as in :func:`coopjax.cooperative`.
    order: ``"step_then_mix"`` (default) or ``"mix_then_step"``.
    mix_mask: optional pytree prefix of X of booleans; leaves marked False stay
      per worker.
    warmup_steps: steps of fully synchronous SGD first (post-local SGD).
    loss_fn: ``loss_fn(params, batch) -> scalar`` for one model (the training
      loss); required by ``loss_estimate="averaged_model"``.
    eval_batch: the fixed batch F is evaluated on (a pytree ``loss_fn``
      accepts); required by ``loss_estimate="averaged_model"``.
    loss_estimate: ``"averaged_model"`` (default) or ``"worker_losses"``, see
      above.
    interval: local steps per decision interval; None re-decides at every
      averaging.

  Returns:
    An optax ``GradientTransformationExtraArgs`` with state :class:`AdaCommState`.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> loss = lambda p, b: jnp.mean((p["w"] * b - 1.0) ** 2)
    >>> tx = coopjax.adacomm(optax.sgd(0.1), tau0=4, num_workers=2, loss_fn=loss, eval_batch=jnp.ones(3))
    >>> X = coopjax.replicate({"w": jnp.zeros(())}, 2)
    >>> step = coopjax.make_step(loss, tx)
    >>> state = tx.init(X)
    >>> for _ in range(4):
    ...   X, state, _ = step(X, state, jnp.ones((2, 3)))
    >>> int(state.tau)  # F(x̄) = 0.8⁸, F(x_0) = 1: ⌈√(0.8⁸)·4⌉ = ⌈1.64⌉
    2

    The worker-loss estimate takes the per-worker losses as ``value``:

    >>> tx = coopjax.adacomm(
    ...   optax.sgd(0.1), tau0=2, num_workers=2, loss_estimate="worker_losses"
    ... )
    >>> X = {"w": jnp.zeros(2)}
    >>> state = tx.init(X)
    >>> for _ in range(2):  # the first average is after τ₀ = 2 steps
    ...   updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, state, X, value=jnp.ones(2))
    ...   X = optax.apply_updates(X, updates)
    >>> [round(x, 4) for x in X["w"].tolist()], int(state.tau)  # F unchanged: τ stays τ₀
    ([-0.4, -0.4], 2)

  References:
    J. Wang and G. Joshi, "Adaptive communication strategies to achieve the best
    error-runtime trade-off in local-update SGD", SysML 2019 (arXiv 1810.08313).
  """
  tau0 = check_tau(tau0)
  m = check_int("num_workers", num_workers, 1)
  if lr_schedule is not None and not callable(lr_schedule):
    raise TypeError(
      f"lr_schedule must be a function count -> learning rate (an optax schedule), got "
      f"{type(lr_schedule).__name__}."
    )
  if lr0 is not None:
    if lr_schedule is None:
      raise ValueError(
        "lr0 is only used by the decaying-lr rule; pass lr_schedule (the local optimizer's "
        "schedule) too, or drop lr0 for a fixed learning rate."
      )
    lr0 = check_real("lr0", lr0)
    if lr0 <= 0:
      raise ValueError(f"lr0 must be > 0, got {lr0}.")
  if max_tau is not None:
    max_tau = check_int("max_tau", max_tau, 1)
  if interval is not None:
    interval = check_int("interval", interval, 1)
  averaged = _check_loss_estimate(loss_estimate, loss_fn, eval_batch)
  average = mixing.Mix.average(m, mask=mixing.check_mask(mix_mask))

  def averaged_model_loss(avg):
    """F of the averaged model: every row of ``avg`` holds it; row 0 is evaluated."""
    model = jax.tree.map(lambda x: x[0], avg)
    return jnp.asarray(loss_fn(model, eval_batch), jnp.float32)

  def init_extra(params):
    if averaged:  # F(x_0): all rows hold x_0 (also after a warm-up's synchronisation)
      loss0 = averaged_model_loss(mixing.split_rows(params, m)[0])
    else:
      loss0 = jnp.zeros([], jnp.float32)
    return (
      jnp.asarray(tau0, jnp.int32),
      jnp.zeros([], jnp.int32),
      loss0,
      jnp.asarray(interval or 0, jnp.int32),
    )

  def next_tau(k, loss, loss0):
    ratio = jnp.where(loss0 > 0, loss / loss0, 1.0)
    if lr_schedule is not None:
      eta0 = lr_schedule(0) if lr0 is None else lr0
      ratio = ratio * jnp.asarray(eta0, jnp.float32) / jnp.asarray(lr_schedule(k), jnp.float32)
    tau = jnp.ceil(jnp.sqrt(jnp.maximum(ratio, 0.0)) * tau0)
    tau = jnp.maximum(tau, 1.0)
    if max_tau is not None:
      tau = jnp.minimum(tau, float(max_tau))
    return tau.astype(jnp.int32)

  def losses_of(args):
    if args.get("value") is None:
      raise ValueError(
        "adacomm needs the per-worker losses: call tx.update(grads, state, X, value=losses) "
        "with losses of shape [m] (coopjax.make_step passes them)."
      )
    losses = jnp.asarray(args["value"], jnp.float32)
    if losses.ndim != 1 or num_rows(losses, "value") != m:
      raise ValueError(f"value must hold one loss per worker, shape ({m},), got {losses.shape}.")
    return losses

  def every_step(k, extra, args):
    tau, last_mix, loss0, decide_at = extra
    losses = losses_of(args)
    # F(x_0): an all-reduce at step 1 only (inside the branch).
    loss0 = jax.lax.cond(k == 1, lambda: mixing.worker_mean(losses), lambda: loss0)
    return tau, last_mix, loss0, decide_at

  def on_mix(k, X, extra, inputs):
    tau, _, loss0, decide_at = extra
    mixed = average(X)
    if averaged:
      loss = lambda: averaged_model_loss(mixed)  # noqa: E731
    else:
      loss = lambda: mixing.worker_mean(losses_of(inputs.args))  # noqa: E731

    def redo():  # evaluated only when τ is re-decided
      nxt = jnp.zeros([], jnp.int32) if interval is None else (k // interval + 1) * interval
      return next_tau(k, loss(), loss0), jnp.asarray(nxt, jnp.int32)

    tau, decide_at = jax.lax.cond(k >= decide_at, redo, lambda: (tau, decide_at))
    return mixed, (tau, k, loss0, decide_at)

  def comm(k, state):
    if state is None:
      raise ValueError(
        "adacomm's schedule adapts: tx.comm(k, opt_state) needs the state after step k."
      )
    found = [
      s
      for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, AdaCommState))
      if isinstance(s, AdaCommState)
    ]
    return average.cost if int(found[0].last_mix) == k else pattern.NO_COMM

  return _skeleton.transformation(
    "adacomm",
    local,
    Layout(m, 0),
    state_cls=AdaCommState,
    should_mix=lambda k, extra: k - extra[1] == extra[0],
    on_mix=on_mix,
    init_extra=init_extra,
    every_step=None if averaged else every_step,
    state_mix=lambda k: average,
    comm=comm,
    mix_cost=average.cost,
    period=tau0,
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
  )
