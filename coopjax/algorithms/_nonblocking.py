r"""Mixes whose communication overlaps the next period's local steps.

Each algorithm here fixes the operand of its reduction at a mixing step and
first needs the result at the next one, so the reduction can run while the
workers take their next τ local steps (paper §3.3). The state carries the
pending operand, and the reduction is computed inside the *next* mixing
branch: in the program of one period (:func:`coopjax.make_period_step`) the
collective's operand is an input of the program and only the closing mix
reads its result, so nothing in the period's local steps waits for it.

* :func:`nonblocking_easgd`: EASGD whose anchor update lags by one period in
  the state but whose worker models are exactly blocking EASGD's.
* :func:`overlap_local_sgd`: Overlap Local-SGD (Wang, Liang & Joshi, 2020),
  an anchor with momentum.
* :func:`delayed`: the mix acts on a snapshot taken when the period starts
  (CoCoD-SGD, Shen et al., 2019, for ``W = J``).

Where the overlap happens. Executed one step at a time
(:func:`coopjax.make_step`) there is nothing to overlap with: each step is
its own program, and the reduction runs inside the mixing branch of the
step that needs it. :func:`coopjax.make_period_step` compiles a period into
one program and *issues* the reduction first: it finds this module's state
inside ``opt_state`` (:data:`OVERLAP_STATES`, also through ``optax.chain``),
runs the period's first τ − 1 steps as a loop that never reads the
reduction, and runs the closing step under :func:`issued_early`, which makes
the transformation reduce the period's starting ``pending`` outside its
mixing branch (an operand that is an input of the program, so the
collective can run during the loop) and consume the result in the branch.

State layout (all three): ``count`` (int32 steps taken), ``local_state``
(the local optimizer's state stacked over the m workers) and ``pending`` (m
worker rows: the operand of the reduction in flight), nothing else. EASGD and
Overlap keep their anchor ``z`` as the auxiliary row of X (``num_aux=1``,
``X = [x_1..x_m, z]``), holding the anchor of the last pull. On the sharded
path ``local_state`` and ``pending`` are sharded like X's workers and
``count`` is replicated; one all-reduce (or, for :func:`delayed`, one mix
with W) per mixing step, inside the mixing branch.

  >>> import jax.numpy as jnp, optax, coopjax
  >>> tx = coopjax.nonblocking_easgd(optax.sgd(0.1), tau=1, alpha=0.25, num_workers=2)
  >>> X = coopjax.replicate({"w": jnp.zeros(())}, 2, num_aux=1)
  >>> state = tx.init(X)
  >>> updates, state = tx.update({"w": jnp.array([1.0, 0.0])}, state, X)
  >>> X = optax.apply_updates(X, updates)  # step to [-0.1, 0], pull toward z_1 = 0
  >>> [round(x, 4) for x in X["w"].tolist()]
  [-0.075, 0.0, 0.0]
  >>> settled = coopjax.settle_easgd(X, state, alpha=0.25)  # z_2 = z_1 + α Σ_i (x_i − z_1)
  >>> [round(x, 4) for x in settled["w"].tolist()]
  [-0.075, 0.0, -0.025]
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

import coopjax.algorithms._compressed as _compressed
import coopjax.algorithms._skeleton as _skeleton
from coopjax import mixing
from coopjax import topology
from coopjax._validation import check_int
from coopjax._validation import check_real
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._skeleton import check_tau
from coopjax.parallel import context
from coopjax.workers import Layout
from coopjax.workers import num_rows

PyTree = Any
LearningRate = float | Callable[[chex.Numeric], chex.Numeric]

__all__ = [
  "NonBlockingEASGDState",
  "OverlapState",
  "DelayedState",
  "StreamingDiLoCoState",
  "nonblocking_easgd",
  "overlap_local_sgd",
  "delayed",
  "settle_easgd",
  "settle_overlap",
  "OVERLAP_STATES",
  "EarlyReduction",
  "issued_early",
  "overlap_states",
]


class NonBlockingEASGDState(NamedTuple):
  """State of :func:`nonblocking_easgd`.

  Attributes:
    count: local steps taken so far, int32.
    local_state: the local optimizer's state, stacked over the m workers.
    pending: the workers' models just before the pull of the last mix
      (``[m, ...]``, the anchor itself before the first mix): the operand of
      the reduction ``Σ_i x_i`` that the next mix consumes.
  """

  count: chex.Array
  local_state: optax.OptState
  pending: PyTree


class OverlapState(NamedTuple):
  """State of :func:`overlap_local_sgd`.

  Attributes:
    count: local steps taken so far, int32.
    local_state: the local optimizer's state, stacked over the m workers.
    pending: ``x_i − η_{k_q} β u_{q−1}`` for the models ``x_i`` just after
      the pull of the last mix q (``[m, ...]``; the anchor before the first
      mix): the operand of the reduction whose mean is the next anchor.
  """

  count: chex.Array
  local_state: optax.OptState
  pending: PyTree


class DelayedState(NamedTuple):
  """State of :func:`delayed`.

  Attributes:
    count: local steps taken so far, int32.
    local_state: the local optimizer's state, stacked over the m workers.
    pending: the snapshot ``s`` of the workers' models taken when the period
      started (``[m, ...]``), which the period's mix mixes.
  """

  count: chex.Array
  local_state: optax.OptState
  pending: PyTree


class StreamingDiLoCoState(NamedTuple):
  """State of :func:`coopjax.streaming_diloco`.

  Attributes:
    count: inner steps taken so far, int32.
    local_state: the inner optimizer's state, stacked over the m workers.
    x_start: the outer model, one model (replicated, no worker axis); fragment
      p's part (its leaves) is ``x_start[p]`` of the rule.
    outer_states: one outer optax state per fragment (a tuple of P states,
      each over the list of that fragment's leaves of ``x_start``).
    pending: the operand of the reduction of the last snapshot, one flat
      buffer per worker (``[m, S]``, S the largest fragment's size, padded
      with zeros): the workers' fragment models ``x_i[p]`` (unquantized) or
      their outer gradients ``Δ_i[p] = x_start[p] − x_i[p]`` (quantized).
      ``()`` when ``delay=0``: the snapshot is then reduced at the step that
      takes it, and nothing waits between steps.
  """

  count: chex.Array
  local_state: optax.OptState
  x_start: PyTree
  outer_states: tuple
  pending: jax.Array | tuple


OVERLAP_STATES = (NonBlockingEASGDState, OverlapState, DelayedState, StreamingDiLoCoState)
"""The states of the transformations whose reduction can be issued early (:func:`issued_early`)."""


class EarlyReduction(NamedTuple):
  """A reduction to issue outside the mixing branch (see :func:`issued_early`).

  Attributes:
    kind: the state type (one of :data:`OVERLAP_STATES`) of the transformation
      that consumes it.
    operand: ``state.pending`` when the program started (m worker rows; the
      local block inside a sharded step).
    start: ``state.count`` when the program started (int32 scalar).
    result: ``reduce(operand)`` already computed by another program
      (:mod:`coopjax.parallel.overlap`), or None to reduce here.
  """

  kind: type
  operand: PyTree
  start: chex.Array
  result: PyTree = None


_EARLY: contextvars.ContextVar[EarlyReduction | None] = contextvars.ContextVar(
  "coopjax_early_reduction", default=None
)


def overlap_states(opt_state: PyTree) -> list:
  """The states of :data:`OVERLAP_STATES` inside ``opt_state`` (through ``optax.chain``)."""
  is_overlap = lambda x: isinstance(x, OVERLAP_STATES)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_overlap) if is_overlap(s)]


@contextlib.contextmanager
def issued_early(early: EarlyReduction) -> Iterator[EarlyReduction]:
  r"""While tracing inside it, the transformation of ``early.kind`` issues its reduction early.

  Its update then computes the reduction of ``early.operand`` (``Σ_i s_i``,
  ``mean_i s_i``, or the mix ``s·W`` of :func:`delayed`) *outside* its
  ``lax.cond`` mixing branch, and the branch consumes the result when no mix
  happened since the program started,

  .. math::

     \text{fresh} \iff k - \tau \le k_0 \quad(\text{so } \texttt{state.pending}
     = \texttt{early.operand}),

  with ``k`` the step being taken and ``k_0 = early.start``; otherwise (a
  program longer than τ steps) the branch reduces ``state.pending`` itself,
  so the iterates are those of :func:`coopjax.make_step` in every case.
  :func:`coopjax.make_period_step` uses it for the closing step of a period,
  whose operand is an input of the period's program: the collective does not
  wait for the period's local steps. The reduction runs on every trace of
  the update inside the context, mixing step or not: use it for one step.
  """
  if early.kind not in OVERLAP_STATES:
    raise TypeError(
      f"early.kind must be one of {[t.__name__ for t in OVERLAP_STATES]}, got {early.kind!r}."
    )
  token = _EARLY.set(early)
  try:
    yield early
  finally:
    _EARLY.reset(token)


def _issue_early(state_cls: type, pending: PyTree, reduce: Callable[[PyTree], PyTree]):
  """The reduction of the early operand, when one is active for ``state_cls`` (else None).

  Called outside the mixing branch (the skeleton's ``prefetch``), so the
  collective depends only on the program's inputs.
  """
  early = _EARLY.get()
  if early is None or early.kind is not state_cls:
    return None
  if jax.tree.structure(early.operand) != jax.tree.structure(pending):
    raise ValueError(
      f"the early reduction's operand has structure {jax.tree.structure(early.operand)} but "
      f"state.pending has {jax.tree.structure(pending)}; pass the state's own pending."
    )
  if early.result is not None:
    return early.result  # reduced by a separate program that ran beside the local steps
  with jax.named_scope("early_reduction"):  # outside the mixing branch: overlaps what precedes it
    return reduce(early.operand)


def _reduction(pending: PyTree, issued, tau: int, k, reduce: Callable[[PyTree], PyTree]):
  """``reduce(pending)``, or ``issued`` when no mix happened since the program started."""
  if issued is None:
    return reduce(pending)
  fresh = k - tau <= _EARLY.get().start
  return jax.lax.cond(fresh, lambda p: issued, reduce, pending)


def as_schedule(lr, name: str = "lr") -> Callable[[chex.Numeric], chex.Numeric]:
  """A float or an optax schedule ``count -> lr`` as a schedule; floats must be > 0."""
  if callable(lr):
    return lr
  lr = check_real(name, lr)
  if lr <= 0:
    raise ValueError(f"{name} must be > 0 (it divides the displacement), got {lr}.")
  return lambda count: lr


def _lr_at(schedule, k, dtype):
  """η_k in ``dtype``: the learning rate of step k (counted from 1), ``schedule(k − 1)`` as optax does.

  ``dtype`` is the parameters' dtype, so a float64 run does not see its learning rate rounded
  to float32.
  """
  return jnp.asarray(schedule(jnp.maximum(k - 1, 0))).astype(dtype)


def _leaf_dtype(tree):
  """The dtype of the first floating leaf of ``tree`` (float32 when there is none)."""
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return jnp.result_type(x)
  return jnp.float32


def _broadcast_rows(rows: PyTree, like: PyTree) -> PyTree:
  """Each leaf of ``rows`` (shape ``[1, ...]`` or ``[...]``) broadcast to ``like``'s rows."""
  return jax.tree.map(
    lambda r, w: jnp.broadcast_to(jnp.reshape(r, (1, *w.shape[1:])), w.shape).astype(w.dtype),
    rows,
    like,
  )


def _like_rows(model: PyTree, rows: PyTree) -> PyTree:
  """One model (no worker axis) broadcast to ``rows``' shape and dtype.

  Written ``0·x + model``, which is exact for finite ``x``, so that on the
  sharded path the result varies over devices exactly as ``rows`` does (as
  both branches of the mixing ``lax.cond`` must).
  """
  return jax.tree.map(lambda s, x: 0 * x + jnp.expand_dims(s, 0).astype(x.dtype), model, rows)


def _reduce_into_aux(mix: mixing.Mix) -> Callable[[PyTree], PyTree]:
  """``pending -> the auxiliary row of mix([pending, 0])`` as one model: the reduction."""
  m = mix.num_workers

  def reduce(pending):
    zero = jax.tree.map(lambda x: jnp.zeros_like(x[:1]), pending)
    return jax.tree.map(
      lambda z: z[0], mixing.split_rows(mix(mixing.join_rows(pending, zero)), m)[1]
    )

  return reduce


def _anchored(
  name, local, tau, num_workers, reduction_mix, on_mix, state_cls, settle, options
) -> CooperativeTransformation:
  """An anchor row fed by a reduction issued one mix ahead (non-blocking EASGD, Overlap).

  ``on_mix(k, workers, anchor, reduced) -> (workers, anchor, pending)`` where
  ``anchor`` is X's auxiliary row (``[1, ...]``) and ``reduced`` is the
  reduction of ``state.pending`` through ``reduction_mix`` (issued early under
  :func:`issued_early`); it runs inside the mixing branch.
  """
  tau = check_tau(tau)
  m = check_int("num_workers", num_workers, 1)
  reduce = _reduce_into_aux(reduction_mix)

  def init_extra(params):
    workers, anchor = mixing.split_rows(params, m)
    return (_broadcast_rows(anchor, workers),)

  def hook(k, X, extra, inputs):
    (pending,) = extra
    workers, anchor = mixing.split_rows(X, m)
    reduced = _reduction(pending, inputs.prefetched, tau, k, reduce)
    workers, anchor, pending = on_mix(k, workers, anchor, reduced)
    return mixing.join_rows(workers, anchor), (pending,)

  return _skeleton.transformation(
    name,
    local,
    Layout(m, 1),
    state_cls=state_cls,
    on_mix=hook,
    init_extra=init_extra,
    prefetch=lambda k, extra: _issue_early(state_cls, extra[0], reduce),
    settle=settle,
    overlaps=True,
    orders=("step_then_mix",),
    **_skeleton.periodic(tau, reduction_mix.cost),
    **options,
  )


@_compressed.uncompressed
def nonblocking_easgd(
  local: optax.GradientTransformation,
  *,
  tau: int,
  alpha: float,
  num_workers: int,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
) -> CooperativeTransformation:
  r"""Non-blocking EASGD (paper §3.3): blocking EASGD's models, the reduction overlapped.

  Blocking EASGD (:func:`coopjax.easgd`, step then mix) at its p-th mix pulls
  the workers toward the replicated anchor ``z_p`` and moves the anchor with
  the pre-pull models:

  .. math::

     x_i \leftarrow (1-\alpha)\, x_i + \alpha z_p, \qquad
     z_{p+1} = (1 - m\alpha)\, z_p + \alpha \textstyle\sum_i x_i .

  ``z_{p+1}`` is first needed at mix p + 1, so here the reduction
  ``Σ_i x_i`` is issued at mix p (its operand, the pre-pull models, goes to
  ``state.pending``) and completed at mix p + 1, which computes ``z_{p+1}``
  and then pulls. The workers' models, and so the losses, equal blocking
  EASGD's exactly; X's anchor row holds ``z_p``, the anchor of the last pull
  (blocking EASGD's row holds ``z_{p+1}``): :func:`settle_easgd` completes
  the pending reduction to give blocking EASGD's X, whose averaged model
  obeys the paper's eq. 14.

  Args:
    local: optax optimizer applied to each worker separately.
    tau: communication period τ.
    alpha: elastic coefficient α (``0 < α < 2/(m+1)`` for convergence).
    num_workers: m; X has m + 1 rows (``coopjax.replicate(p, m, num_aux=1)``).
    local_state_policy: the local optimizer's state at a mix, ``"keep"``
      (default) or ``"reset"``.
    mix_mask: optional pytree prefix of X of booleans; leaves marked False
      stay per worker.
    order: only ``"step_then_mix"``: this algorithm's rule fixes the order
      (another value is refused).
    warmup_steps: steps of fully synchronous SGD first (post-local SGD).

  Returns:
    An optax transformation with state :class:`NonBlockingEASGDState`.

  References:
    Wang & Joshi, Cooperative SGD, JMLR 22(213), 2021, §3.3 and Fig. 4c;
    Zhang, Choromanska & LeCun, Deep learning with Elastic Averaging SGD,
    NeurIPS 2015.
  """
  alpha = check_real("alpha", alpha)
  m = check_int("num_workers", num_workers, 1)

  def on_mix(k, workers, anchor, total):
    # total = Σ_i pending_i: the reduction issued at the previous mix.
    keep = lambda z: (1 - m * alpha) * z  # noqa: E731
    live = context.current_live()
    if live is not None:  # the anchor rule over the live workers: (1 − |L|α) z + α Σ_{i∈L}
      count = jnp.sum(live.live.astype(jnp.float32))
      coef = jnp.where(jnp.all(live.live), jnp.float32(1 - m * alpha), 1.0 - count * alpha)
      keep = lambda z: (coef * z).astype(z.dtype)  # noqa: E731
    anchor = jax.tree.map(
      lambda z, s: keep(z) + alpha * jnp.expand_dims(s, 0).astype(z.dtype),
      anchor,
      total,
    )
    pulled = jax.tree.map(lambda x, z: (1 - alpha) * x + alpha * z.astype(x.dtype), workers, anchor)
    return pulled, anchor, workers

  return _anchored(
    "nonblocking_easgd",
    local,
    tau,
    m,
    mixing.Mix.sum_into_aux(m, overlappable=True),
    on_mix,
    NonBlockingEASGDState,
    lambda X, state: settle_easgd(X, state, alpha),
    dict(
      order=order,
      local_state_policy=local_state_policy,
      mix_mask=mix_mask,
      warmup_steps=warmup_steps,
    ),
  )


def settle_easgd(X: PyTree, opt_state: NonBlockingEASGDState, alpha: float) -> PyTree:
  r"""Completes non-blocking EASGD's pending reduction: blocking EASGD's X.

  .. math::

     z \leftarrow (1 - m\alpha)\, z + \alpha \textstyle\sum_i s_i, \qquad
     s = \text{state.pending},

  on the anchor row; the worker rows are unchanged. Use it to evaluate the
  anchor model or to compare with :func:`coopjax.easgd`.
  """
  alpha = check_real("alpha", alpha)
  m = num_rows(opt_state.pending, "opt_state.pending")
  workers, anchor = mixing.split_rows(X, m)
  total = _reduce_into_aux(mixing.Mix.sum_into_aux(m))(opt_state.pending)
  anchor = jax.tree.map(
    lambda z, s: (1 - m * alpha) * z + alpha * jnp.expand_dims(s, 0).astype(z.dtype), anchor, total
  )
  return mixing.join_rows(workers, anchor)


@_compressed.uncompressed
def overlap_local_sgd(
  local: optax.GradientTransformation,
  *,
  tau: int,
  alpha: float,
  num_workers: int,
  anchor_momentum: float = 0.0,
  lr: LearningRate | None = None,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
) -> CooperativeTransformation:
  r"""Overlap Local-SGD (Wang, Liang & Joshi, 2020): local SGD pulled toward a lagging anchor.

  At the q-th mix (step ``k_q = qτ``) the workers are pulled toward the
  anchor, and the anchor takes a momentum step toward the pulled models:

  .. math::

     x_i \leftarrow (1-\alpha)\, x_i + \alpha z_q, \qquad
     u_q = \beta u_{q-1} + \frac{z_q - \frac1m \sum_i x_i}{\eta_{k_q}}, \qquad
     z_{q+1} = z_q - \eta_{k_q} u_q,

  with ``u_0 = 0``, ``z_1`` the initial anchor row, and the mean over the
  *pulled* models. With ``β = 0`` this is A(τ, W_ov, 1) with the
  column-stochastic ``W_ov = [[(1−α)I, (1−α)1/m], [α1ᵀ, α]]`` (the learning
  rate cancels).

  Execution. Substituting ``u_q`` gives
  ``z_{q+1} = mean_i (x_i − η_{k_q} β u_{q−1})``, one all-reduce whose
  operand is fixed at mix q; it runs during the next τ local steps and mix
  q + 1 consumes it, as the authors' code waits on its asynchronous
  all-reduce only at the next pull. ``state.pending`` holds that operand; the
  momentum needs no buffer of its own, since
  ``u_{q−1} = (z_{q−1} − z_q)/η_{k_{q−1}}`` follows from the anchors of two
  consecutive mixes. The worker models equal the rule's exactly; X's anchor
  row holds ``z_q`` (the anchor of the last pull) and :func:`settle_overlap`
  gives ``z_{q+1}``.

  The learning rate. ``η_k`` is ``lr`` evaluated as optax evaluates a
  schedule at step k: ``lr(k − 1)`` (a float is constant), so passing the
  local optimizer's schedule uses the learning rate of the mixing step. Only
  its variation matters (the ratio ``η_{k_q}/η_{k_{q−1}}``): with a constant
  learning rate the anchor moves by ``t ← βt + (z − x̄), z ← z − t``
  whatever its value, which is what ``lr=None`` (default) computes.

  Args:
    local: optax optimizer applied to each worker separately.
    tau: communication period τ.
    alpha: pull coefficient α ∈ [0, 1]; with α = 0 the workers never move
      toward the anchor (no communication has any effect on them).
    num_workers: m; X has m + 1 rows (``coopjax.replicate(p, m, num_aux=1)``).
    anchor_momentum: β, the anchor's momentum.
    lr: η_k, a float or an optax schedule of the step count; None for
      constant.
    local_state_policy: the local optimizer's state at a mix, ``"keep"``
      (default) or ``"reset"``.
    mix_mask: optional pytree prefix of X of booleans; leaves marked False
      stay per worker.
    order: only ``"step_then_mix"``: this algorithm's rule fixes the order
      (another value is refused).
    warmup_steps: steps of fully synchronous SGD first (post-local SGD).

  Returns:
    An optax transformation with state :class:`OverlapState`.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.overlap_local_sgd(optax.sgd(0.1), tau=1, alpha=0.5, num_workers=2)
    >>> X = {"w": jnp.array([0.0, 2.0, 4.0])}  # two workers, then the anchor z_1
    >>> state = tx.init(X)
    >>> updates, state = tx.update({"w": jnp.zeros(2)}, state, X)
    >>> X = optax.apply_updates(X, updates); X["w"].tolist()  # pulled halfway to z_1 = 4
    [2.0, 3.0, 4.0]
    >>> coopjax.settle_overlap(X, state)["w"].tolist()  # z_2: the mean of the pulled models
    [2.0, 3.0, 2.5]

  References:
    Wang, Liang & Joshi, Overlap Local-SGD: An algorithmic approach to hide
    communication delays in distributed SGD, ICASSP 2020 (arXiv 2002.09539),
    Algorithm 1; Wang & Joshi, Cooperative SGD, JMLR 2021, §3.3.
  """
  alpha = check_real("alpha", alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1] (a convex pull), got {alpha}.")
  beta = check_real("anchor_momentum", anchor_momentum)
  tau = check_tau(tau)
  schedule = as_schedule(1.0 if lr is None else lr)

  def on_mix(k, workers, anchor, mean):
    z = _like_rows(mean, anchor)  # z_q: the reduction issued at mix q-1
    # η_q β u_{q-1} = β (η_q / η_{q-1}) (z_{q-1} − z_q); zero at the first mix (pending = z_1).
    dt = _leaf_dtype(workers)
    ratio = _lr_at(schedule, k, dt) / _lr_at(schedule, jnp.maximum(k - tau, 1), dt)
    lead = jax.tree.map(lambda old, new: beta * ratio.astype(new.dtype) * (old - new), anchor, z)
    pulled = jax.tree.map(lambda x, z: (1 - alpha) * x + alpha * z.astype(x.dtype), workers, z)
    pending = jax.tree.map(lambda x, d: x - d.astype(x.dtype), pulled, lead)
    return pulled, z, pending

  return _anchored(
    "overlap_local_sgd",
    local,
    tau,
    num_workers,
    mixing.Mix.mean_into_aux(check_int("num_workers", num_workers, 1), overlappable=True),
    on_mix,
    OverlapState,
    lambda X, state: settle_overlap(X, state),
    dict(
      order=order,
      local_state_policy=local_state_policy,
      mix_mask=mix_mask,
      warmup_steps=warmup_steps,
    ),
  )


def settle_overlap(
  X: PyTree,
  opt_state: OverlapState,
  tau: int | None = None,
  anchor_momentum: float | None = None,
  lr: LearningRate | None = None,
) -> PyTree:
  r"""Completes Overlap Local-SGD's pending reduction: the anchor ``z_{q+1}`` after mix q.

  .. math::

     z \leftarrow \frac1m \textstyle\sum_i s_i, \qquad s = \text{state.pending}
       = x^{\text{pulled}} - \eta_{k_q} \beta u_{q-1},

  on the anchor row; the worker rows are unchanged. The pending operand
  already holds the momentum term, so ``tau``, ``anchor_momentum`` and
  ``lr`` (:func:`overlap_local_sgd`'s arguments) are accepted but not needed.
  """
  del tau, anchor_momentum, lr
  m = num_rows(opt_state.pending, "opt_state.pending")
  workers, anchor = mixing.split_rows(X, m)
  mean = _reduce_into_aux(mixing.Mix.mean_into_aux(m))(opt_state.pending)
  return mixing.join_rows(workers, _like_rows(mean, anchor))


@_compressed.uncompressed
def delayed(
  local: optax.GradientTransformation,
  *,
  tau: int,
  W,
  mixer: mixing.Mixer | None = None,
  symmetric: bool = True,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
) -> CooperativeTransformation:
  r"""Delayed mixing: the period's mix acts on the snapshot taken when the period started.

  With ``s_i`` worker i's model at the start of the period (just after the
  previous mix; ``x_0`` for the first), the mix at ``k mod τ = 0`` keeps the
  period's local progress ``x_i − s_i`` and replaces the snapshot by its
  mixed version:

  .. math::

     x_i \leftarrow x_i - s_i + \textstyle\sum_j W_{ji}\, s_j ,
     \qquad s_i \leftarrow x_i \text{ (the new snapshot).}

  The mix of ``s`` can run during all τ local steps of the period. With
  ``W = J`` this is CoCoD-SGD: ``x_i ← s̄ + (x_i − s_i)``. For a doubly
  stochastic W the averaged model moves as in eq. 14,
  ``u_{k+1} = u_k − η·mean_i g_i``. X has m rows (no auxiliary variables).

  Args:
    local: optax optimizer applied to each worker separately.
    tau: communication period τ.
    W: m × m mixing matrix (validated like :func:`coopjax.cooperative`'s).
    mixer: how to apply W to the snapshot (a callable ``X -> X``); defaults to
      :class:`coopjax.mixing.Mix` of W.
    symmetric: require W symmetric.
    local_state_policy: the local optimizer's state at a mix, ``"keep"``
      (default) or ``"reset"``.
    mix_mask: optional pytree prefix of X of booleans; leaves marked False
      stay per worker.
    order: only ``"step_then_mix"``: this algorithm's rule fixes the order
      (another value is refused).
    warmup_steps: steps of fully synchronous SGD first (post-local SGD).

  Returns:
    An optax transformation with state :class:`DelayedState`.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax import topology
    >>> tx = coopjax.delayed(optax.sgd(0.1), tau=1, W=topology.complete(2))
    >>> X = {"w": jnp.array([0.0, 2.0])}
    >>> updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]  # s̄ + (x_i − s_i)
    [0.9, 0.7]

  References:
    Shen, Xu, Liu & Wang, Faster distributed deep net training: computation
    and communication decoupled stochastic gradient descent (CoCoD-SGD),
    IJCAI 2019; Wang, Liang & Joshi, Overlap Local-SGD, ICASSP 2020.
  """
  tau = check_tau(tau)
  W = topology.validate(W, symmetric=symmetric)
  m = W.shape[0]
  snapshot_mix = mixing.Mix(W, m, overlappable=True)
  mix = mixer if mixer is not None else snapshot_mix

  def prefetch(k, extra):
    return _issue_early(DelayedState, extra[0], mix)

  def on_mix(k, X, extra, inputs):
    (snapshot,) = extra
    # The communication: its operand was fixed when the period started.
    mixed = _reduction(snapshot, inputs.prefetched, tau, k, mix)
    X = jax.tree.map(lambda x, s, r: x - s + r.astype(x.dtype), X, snapshot, mixed)
    return X, (X,)

  return _skeleton.transformation(
    "delayed",
    local,
    Layout(m, 0),
    state_cls=DelayedState,
    on_mix=on_mix,
    init_extra=lambda params: (jax.tree.map(jnp.asarray, params),),
    prefetch=prefetch,
    overlaps=True,
    orders=("step_then_mix",),
    **_skeleton.periodic(tau, snapshot_mix.cost),
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
    graph=W,
  )
