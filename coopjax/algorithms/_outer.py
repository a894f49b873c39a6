r"""Outer optimizers on the period's average displacement: SlowMo and DiLoCo.

Both run τ local steps from a common start ``x_start``, then treat the
workers' average displacement

.. math::

   \Delta = x_{\text{start}} - \frac1m \sum_i x_i

as a (pseudo-)gradient of an outer optimizer that moves ``x_start``, and
restart every worker from the new ``x_start``. With the identity outer step
(``x_start ← x_start − Δ``) both are periodic averaging,
:func:`coopjax.local_sgd`.

State layout: ``count`` (int32 steps taken), ``local_state`` (the inner
optimizer's state stacked over the m workers), ``x_start`` (one model,
replicated: not a row of X) and the outer optimizer's state (one model,
replicated). X has the m worker rows only (v = 0). The averaged model
``mean_i x_i`` moves as eq. 14, ``u_{k+1} = u_k − η mean_i g_i``, at every
step without a mix, and equals ``x_start`` right after each mix.

  >>> import jax.numpy as jnp, optax, coopjax
  >>> tx = coopjax.diloco(optax.sgd(0.1), outer=optax.sgd(1.0), tau=1, num_workers=2)
  >>> X = coopjax.replicate({"w": jnp.zeros(())}, 2)
  >>> state = tx.init(X)
  >>> updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, state, X)
  >>> X = optax.apply_updates(X, updates)  # workers at -0.1, -0.3; Δ = 0.2; x_start − 1·Δ
  >>> [round(x, 4) for x in X["w"].tolist()]
  [-0.2, -0.2]
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

import coopjax.algorithms._compressed as _compressed
import coopjax.algorithms._skeleton as _skeleton
from coopjax import compress
from coopjax import mixing
from coopjax._validation import check_int
from coopjax._validation import check_real
from coopjax.algorithms._nonblocking import LearningRate
from coopjax.algorithms._nonblocking import _lr_at
from coopjax.algorithms._nonblocking import as_schedule
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._skeleton import check_tau
from coopjax.workers import Layout

PyTree = Any

__all__ = [
  "SlowMoState",
  "DiLoCoState",
  "slowmo",
  "diloco",
  "BASE_BUFFERS",
]

BASE_BUFFERS = ("maintain", "reset", "average")


class SlowMoState(NamedTuple):
  """State of :func:`slowmo`.

  Attributes:
    count: local steps taken so far, int32.
    local_state: the base optimizer's state, stacked over the m workers.
    x_start: the model every worker started the current period from
      (replicated, no worker axis).
    momentum: the slow momentum buffer ``u`` (replicated).
  """

  count: chex.Array
  local_state: optax.OptState
  x_start: PyTree
  momentum: PyTree


class DiLoCoState(NamedTuple):
  """State of :func:`diloco`.

  Attributes:
    count: local (inner) steps taken so far, int32.
    local_state: the inner optimizer's state, stacked over the m workers.
    x_start: the model every worker started the current period from
      (replicated, no worker axis).
    outer_state: the outer optimizer's state for ``x_start`` (replicated).
  """

  count: chex.Array
  local_state: optax.OptState
  x_start: PyTree
  outer_state: optax.OptState


def _broadcast(model: PyTree, like: PyTree) -> PyTree:
  """One model (no worker axis) as every worker row of ``like``."""
  # 0·w + s (exact for finite w) varies over devices as ``like`` does on the sharded path.
  return jax.tree.map(lambda s, w: 0 * w + jnp.expand_dims(s, 0).astype(w.dtype), model, like)


_POLICIES = {"maintain": "keep", "reset": "reset", "average": "mix"}


def _outer_algorithm(
  name, local, tau, num_workers, init_outer, outer_step, compressor, error_decay, key, **options
):
  """Inner steps; at ``k mod τ = 0``: Δ = x_start − mean_i x_i, ``outer_step``, restart.

  ``outer_step(k, delta, x_start, outer) -> (x_start, outer)``. The mean is the
  one communication: an all-reduce (:meth:`coopjax.mixing.Mix.mean_into_aux`);
  with a ``compressor``, the mean of the error-feedback messages instead
  (:func:`coopjax.algorithms._compressed.error_feedback_averaging`).
  """
  tau = check_tau(tau)
  m = check_int("num_workers", num_workers, 1)
  _compressed.check_uncompressed_options(compressor, error_decay, key)
  if compressor is not None:
    return _compressed.error_feedback_averaging(
      name, local, tau, m, compressor, error_decay, key, init_outer, outer_step, **options
    )
  mean = mixing.Mix.mean_into_aux(m)
  average = mixing.Mix.average(m)

  def init_extra(params):
    x_start = mixing.worker_mean(params)  # x_0 when X is replicated
    return x_start, init_outer(x_start)

  def on_mix(k, X, extra, _inputs):
    x_start, outer = extra
    anchor = jax.tree.map(lambda s: jnp.expand_dims(s, 0), x_start)
    mean_row = mixing.split_rows(mean(mixing.join_rows(X, anchor)), m)[1]  # the all-reduce
    delta = jax.tree.map(lambda s, x: s - x[0].astype(s.dtype), x_start, mean_row)
    x_start, outer = outer_step(k, delta, x_start, outer)
    return _broadcast(x_start, X), (x_start, outer)

  return _skeleton.transformation(
    name,
    local,
    Layout(m, 0),
    state_cls=SlowMoState if name == "slowmo" else DiLoCoState,
    on_mix=on_mix,
    init_extra=init_extra,
    state_mix=lambda k: average,
    orders=("step_then_mix",),
    **_skeleton.periodic(tau, mean.cost),
    **options,
  )


def slowmo(
  local: optax.GradientTransformation,
  *,
  tau: int,
  num_workers: int,
  alpha: float,
  beta: float,
  lr: LearningRate | None = None,
  base_buffers: str = "maintain",
  order: str = "step_then_mix",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
  compressor: compress.Compressor | None = None,
  error_decay: float = 1.0,
  key: jax.Array | None = None,
) -> CooperativeTransformation:
  r"""SlowMo (Wang, Tantia, Ballas & Rabbat, ICLR 2020) over local SGD.

  Every τ steps (after the local step k = pτ):

  .. math::

     \bar x = \frac1m \sum_i x_i, \qquad
     u \leftarrow \beta u + \frac{x_{\text{start}} - \bar x}{\gamma_k}, \qquad
     x_{\text{start}} \leftarrow x_{\text{start}} - \alpha \gamma_k u, \qquad
     x_i \leftarrow x_{\text{start}},

  with ``u_0 = 0`` and ``x_start = x_0`` before the first local step.
  ``γ_k`` is ``lr`` at step k as optax evaluates schedules, ``lr(k − 1)``:
  pass the base optimizer's schedule to use its learning rate of the mixing
  step (fairscale's SlowMo reads the base optimizer's current lr). α = 1,
  β = 0 is periodic averaging. With a constant γ the rule is DiLoCo with the
  outer optimizer ``optax.sgd(α, momentum=β)`` on Δ (``t = γu`` is its
  momentum trace), whatever γ: ``lr=None`` (default) computes exactly that,
  ``t ← βt + Δ``, ``x_start ← x_start − α t``.

  Args:
    local: the base optimizer, applied to each worker separately.
    tau: communication period τ.
    num_workers: m; X has m rows.
    alpha: slow learning rate α.
    beta: slow momentum β.
    lr: γ, a float or an optax schedule of the step count; None (default) for
      a constant γ, which cancels out.
    base_buffers: the base optimizer's buffers at a mix: ``"maintain"``
      (default, fairscale's behaviour), ``"reset"`` (zeroed; counters kept)
      or ``"average"`` (averaged over workers; counters kept).
    mix_mask: optional pytree prefix of X of booleans; leaves marked False
      stay per worker (the outer update is applied to the others).
    order: only ``"step_then_mix"``: this algorithm's rule fixes the order
      (another value is refused).
    warmup_steps: steps of fully synchronous SGD first (post-local SGD).
    compressor: None (default): the exact mean. A
      :class:`coopjax.compress.Compressor`: error-feedback averaging
      (:mod:`coopjax.algorithms._compressed`), Δ replaced by the mean of the
      compressed messages ``c_i = Q(β e_i + x_start − x_i)``.
    error_decay: β of the error memory (compressed only; 1 keeps all of it).
    key: PRNG key of the compressor's random draws (compressed only;
      ``jax.random.key(0)`` when None).

  Returns:
    An optax transformation with state :class:`SlowMoState`
    (:class:`coopjax.algorithms.ErrorFeedbackState` with a compressor).

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.slowmo(optax.sgd(0.1), tau=1, num_workers=2, alpha=1.0, beta=0.5, lr=0.1)
    >>> X = {"w": jnp.zeros(2)}
    >>> state = tx.init(X)
    >>> for _ in range(2):  # Δ = 0.2 each period; the slow momentum adds 0.5·0.2 the second time
    ...   updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, state, X)
    ...   X = optax.apply_updates(X, updates)
    >>> [round(x, 4) for x in X["w"].tolist()]
    [-0.5, -0.5]

  References:
    Wang, Tantia, Ballas & Rabbat, SlowMo: Improving communication-efficient
    distributed SGD with slow momentum, ICLR 2020, Algorithm 1.
  """
  alpha = check_real("alpha", alpha)
  beta = check_real("beta", beta)
  schedule = as_schedule(1.0 if lr is None else lr)

  def init_outer(x_start):
    return jax.tree.map(jnp.zeros_like, x_start)

  def outer_step(k, delta, x_start, u):
    u = jax.tree.map(lambda u, d: beta * u + d / _lr_at(schedule, k, d.dtype), u, delta)
    x_start = jax.tree.map(
      lambda x, u: x - (alpha * _lr_at(schedule, k, u.dtype) * u).astype(x.dtype), x_start, u
    )
    return x_start, u

  if base_buffers not in BASE_BUFFERS:
    raise ValueError(
      f"base_buffers must be one of {BASE_BUFFERS}, got {base_buffers!r}: 'maintain' keeps each "
      "worker's optimizer buffers, 'reset' zeroes them and 'average' averages them at every mix."
    )
  return _outer_algorithm(
    "slowmo",
    local,
    tau,
    num_workers,
    init_outer,
    outer_step,
    compressor,
    error_decay,
    key,
    order=order,
    local_state_policy=_POLICIES[base_buffers],
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
  )


def diloco(
  local: optax.GradientTransformation,
  *,
  outer: optax.GradientTransformation,
  tau: int,
  num_workers: int,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
  compressor: compress.Compressor | None = None,
  error_decay: float = 1.0,
  key: jax.Array | None = None,
) -> CooperativeTransformation:
  r"""DiLoCo (Douillard et al., 2023): an outer optimizer on the period's displacement.

  Every τ inner steps (after the inner step k = pτ):

  .. math::

     \Delta = x_{\text{start}} - \frac1m \sum_i x_i, \qquad
     x_{\text{start}} \leftarrow x_{\text{start}}
       + \mathrm{outer}(\Delta;\ \text{outer state}), \qquad
     x_i \leftarrow x_{\text{start}},

  where ``outer`` is any optax optimizer fed Δ as its gradient (the paper:
  ``optax.sgd(0.7, momentum=0.9, nesterov=True)``), and the inner optimizer
  state (e.g. AdamW's moments) is kept per worker. ``optax.sgd(1.0)`` as
  ``outer`` is periodic averaging; ``optax.sgd(α, momentum=β)`` is
  :func:`slowmo` with a constant learning rate.

  Args:
    local: the inner optimizer, applied to each worker separately.
    outer: the outer optax optimizer for ``x_start``.
    tau: communication period τ (H inner steps in the paper).
    num_workers: m; X has m rows.
    local_state_policy: the inner optimizer's state at a mix: ``"keep"``
      (default, DiLoCo keeps each worker's AdamW moments), ``"mix"`` (averaged)
      or ``"reset"``.
    mix_mask: optional pytree prefix of X of booleans; leaves marked False
      stay per worker (the outer update is applied to the others).
    order: only ``"step_then_mix"``: this algorithm's rule fixes the order
      (another value is refused).
    warmup_steps: steps of fully synchronous SGD first (post-local SGD).
    compressor: None (default): the exact mean. A
      :class:`coopjax.compress.Compressor`: error-feedback averaging
      (:mod:`coopjax.algorithms._compressed`): the outer optimizer receives
      the mean of the compressed messages ``c_i = Q(β e_i + x_start − x_i)``,
      each worker keeping ``e_i ← β e_i + Δ_i − c_i``.
    error_decay: β of the error memory (compressed only; 1 keeps all of it,
      < 1 is SparseLoCo's decayed memory).
    key: PRNG key of the compressor's random draws (compressed only;
      ``jax.random.key(0)`` when None).

  Returns:
    An optax transformation with state :class:`DiLoCoState`
    (:class:`coopjax.algorithms.ErrorFeedbackState` with a compressor).

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.diloco(optax.sgd(0.1), outer=optax.sgd(0.5), tau=1, num_workers=2)
    >>> X = {"w": jnp.zeros(2)}
    >>> updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]  # x_start − 0.5·Δ
    [-0.1, -0.1]

    With top-1 messages and error feedback: Δ_1 = [0.1, 0.3] sends [0, 0.3] and keeps
    e_1 = [0.1, 0]; the outer step moves by 0.5·mean(c) = 0.5·[0.15, 0.15].

    >>> from coopjax import compress
    >>> tx = coopjax.diloco(optax.sgd(0.1), outer=optax.sgd(0.5), tau=1, num_workers=2,
    ...                     compressor=compress.top_k(k=1))
    >>> X = {"w": jnp.zeros((2, 2))}
    >>> updates, state = tx.update({"w": jnp.array([[1.0, 3.0], [3.0, 1.0]])}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"][0].tolist()]
    [-0.075, -0.075]
    >>> [[round(x, 4) for x in row] for row in state.error["w"].tolist()]
    [[0.1, 0.0], [0.0, 0.1]]

  References:
    Douillard et al., DiLoCo: Distributed low-communication training of
    language models, arXiv 2311.08105, 2023, Algorithm 1.
  """
  if not (hasattr(outer, "init") and hasattr(outer, "update")):
    raise TypeError(
      f"outer must be an optax GradientTransformation (e.g. optax.sgd(0.7, momentum=0.9, "
      f"nesterov=True)), got {type(outer).__name__}."
    )

  def outer_step(k, delta, x_start, outer_state):
    updates, outer_state = outer.update(delta, outer_state, x_start)
    return optax.apply_updates(x_start, updates), outer_state

  return _outer_algorithm(
    "diloco",
    local,
    tau,
    num_workers,
    outer.init,
    outer_step,
    compressor,
    error_decay,
    key,
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
  )
