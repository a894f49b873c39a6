r"""Overlapped periods: the pending reduction as its own program, run beside the local steps.

Non-blocking EASGD, Overlap Local-SGD and delayed mixing fix the operand of
their reduction when a period starts (``state.pending``) and first read the
result at the period's closing mix. :func:`coopjax.make_period_step` issues
that reduction first inside one compiled program; whether it then runs during
the loop is up to the backend (XLA:GPU with asynchronous collectives and the
latency-hiding scheduler can; XLA:CPU runs a gloo all-reduce synchronously,
so inside one CPU program communication and compute add up).

:func:`make_overlapped_period` splits the period into three programs instead:

.. code-block:: text

   R:  r    = reduce(s_k.pending)                    # dispatched from a second thread
   H:  X, s = step ∘ … ∘ step (X, s, batches[:τ−1])  # main thread, meanwhile
   C:  X, s = step(X, s, batches[τ−1]; r)            # the closing mix reads r

R and H are separately compiled, dispatched from different threads, and the
CPU client runs programs from different threads (different execution
streams) concurrently, so the reduction's communication proceeds while the
workers compute. C is the algorithm's own closing step, traced under
:func:`coopjax.algorithms._nonblocking.issued_early` with the reduction
supplied as ``result``: the iterates and optimizer state are exactly those of
τ calls of :func:`coopjax.make_step`. A period costs about
``max(t_H, t_R) + t_C`` instead of ``t_H + t_R + t_C``.

Only one collective program is in flight at a time (H and C hold none: off-steps
take the skip branch, and C's mixing branch uses ``r``), and every process
dispatches R, H, C in the same order, as multi-process gloo needs.

Streaming DiLoCo (:func:`coopjax.streaming_diloco`, delay τ ≥ 1) applies a
sync τ steps after its snapshot: a call runs the h = H/P steps that start
right after a snapshot as R beside the first τ − 1 steps, C (the apply,
step τ, ``tx.consume_at``) and the h − τ steps up to the next snapshot
(which take no collective either), with ``reduce`` defaulting to the
transformation's own ``tx.reduce_pending`` (the float mean, or the quantized
mean's all-to-all and all-gather).

  >>> import jax.numpy as jnp, optax, coopjax
  >>> from coopjax.parallel import overlap
  >>> loss = lambda p, b: jnp.mean((p["w"] * b - 1.0) ** 2)
  >>> tx = coopjax.nonblocking_easgd(optax.sgd(0.1), tau=2, alpha=0.2, num_workers=2)
  >>> X = coopjax.replicate({"w": jnp.zeros(())}, 2, num_aux=1)
  >>> period = overlap.make_overlapped_period(loss, tx, tau=2)
  >>> X1, s1, metrics = period(X, tx.init(X), jnp.ones((2, 2, 3)))
  >>> step = coopjax.make_step(loss, tx)
  >>> X2, s2 = X, tx.init(X)
  >>> for b in jnp.ones((2, 2, 3)):
  ...   X2, s2, _ = step(X2, s2, b)
  >>> bool(jnp.all(X1["w"] == X2["w"])), metrics["worker_loss"].shape
  (True, (2, 2))
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from coopjax import mixing
from coopjax.algorithms import _nonblocking as nonblocking
from coopjax.parallel import sharding
from coopjax.step import make_step

PyTree = Any

__all__ = ["make_overlapped_period", "default_reduce"]


def default_reduce(kind: type, num_workers: int) -> Callable[[PyTree], PyTree]:
  """The reduction of the state type ``kind`` over m workers, computed as the algorithm does.

  Non-blocking EASGD: ``Σ_i pending_i``; Overlap Local-SGD: ``mean_i pending_i``,
  each as the auxiliary row of the algorithm's own mix
  (``coopjax.mixing.Mix.sum_into_aux`` / ``mean_into_aux``) applied to
  ``[pending, 0]``, so the result is bit for bit the one its closing step
  would compute.
  """
  if kind is nonblocking.StreamingDiLoCoState:
    raise ValueError(
      "Streaming DiLoCo's reduction depends on its fragments and compressor: pass "
      "reduce=tx.reduce_pending (make_overlapped_period does so for the transformation itself)."
    )
  if kind is nonblocking.NonBlockingEASGDState:
    mix = mixing.Mix.sum_into_aux(num_workers, overlappable=True)
  elif kind is nonblocking.OverlapState:
    mix = mixing.Mix.mean_into_aux(num_workers, overlappable=True)
  else:
    raise ValueError(
      f"no default reduction for {kind.__name__}; pass reduce= (for coopjax.delayed: the mix "
      "it was built with, coopjax.mixing.Mix(W, m, overlappable=True), or its mixer)."
    )

  def reduce(pending):
    zero = jax.tree.map(lambda x: jnp.zeros_like(x[:1]), pending)
    aux = mixing.split_rows(mix(mixing.join_rows(pending, zero)), num_workers)[1]
    return jax.tree.map(lambda z: z[0], aux)

  return reduce


class _ResultState(NamedTuple):
  """The closing step's state: the reduction computed by R, the period's start, the algorithm's."""

  result: Any
  start: chex.Array
  inner: optax.OptState


def _only(inner) -> Any:
  found = nonblocking.overlap_states(inner)
  if len(found) != 1:
    raise ValueError(
      "make_overlapped_period needs exactly one state of non-blocking EASGD, Overlap Local-SGD "
      f"or delayed mixing in opt_state (also inside optax.chain), found {len(found)}."
    )
  return found[0]


def _with_result(tx: optax.GradientTransformation, reduce) -> optax.GradientTransformation:
  """``tx`` on :class:`_ResultState`: the closing mix consumes ``state.result``."""
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):  # shapes only: the driver builds the state itself
    inner = tx.init(params)
    state = _only(inner)
    return _ResultState(reduce(state.pending), state.count, inner)

  def update_fn(updates, state, params=None, **extra_args):
    pending = _only(state.inner)
    early = nonblocking.EarlyReduction(type(pending), pending.pending, state.start, state.result)
    with nonblocking.issued_early(early):
      updates, inner = tx.update(updates, state.inner, params, **extra_args)
    return updates, _ResultState(state.result, state.start, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_overlapped_period(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  mesh=None,
  *,
  tau: int,
  reduce: Callable[[PyTree], PyTree] | None = None,
  **step_kwargs,
):
  r"""Builds ``period(X, opt_state, batches) -> (X, opt_state, metrics)`` with the reduction overlapped.

  The iterates equal τ calls of ``coopjax.make_step(loss_fn, tx, mesh=mesh)``
  (and so, for :func:`coopjax.nonblocking_easgd`, blocking EASGD's worker
  models); the reduction of the period's starting ``pending`` runs as its
  own program from a second thread while the first τ − 1 steps run:

  .. math::

     T_{\text{period}} \approx \max\big((\tau-1)\,t_{\text{step}},\; T_{\text{reduce}}\big)
       + t_{\text{step}} .

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` for one worker.
    tx: a transformation whose state holds exactly one of
      :data:`coopjax.algorithms._nonblocking.OVERLAP_STATES`
      (:func:`coopjax.nonblocking_easgd`, :func:`coopjax.overlap_local_sgd`,
      :func:`coopjax.delayed`, also inside ``optax.chain``; or
      :func:`coopjax.streaming_diloco` itself, with delay ≥ 1).
    mesh: a mesh with a ``"workers"`` axis for the sharded path (X from
      :func:`coopjax.shard`, opt_state from :func:`coopjax.sharding.init`), or
      None.
    tau: the period τ of ``tx`` (Streaming DiLoCo: h = H/P, the steps
      from one snapshot to the next).
    reduce: the algorithm's reduction of ``pending`` (default: Σ for
      non-blocking EASGD, mean for Overlap Local-SGD, ``tx.reduce_pending``
      for Streaming DiLoCo; required for delayed mixing: its mixer).
    **step_kwargs: forwarded to :func:`coopjax.make_step`.

  Returns:
    ``period``: ``batches`` has leaves ``[τ, m, ...]``; ``opt_state``'s step
    count must be a multiple of τ (whole periods; Streaming DiLoCo: a
    snapshot step, so that the call's one sync applies at its step
    ``tx.consume_at``); ``metrics`` are stacked over the τ steps. It blocks
    until the period is done.
  """
  if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
    raise ValueError(f"tau must be a positive integer, got {tau!r}.")
  if mesh is not None:
    step_kwargs = {**step_kwargs, "mesh": mesh}
  step = make_step(loss_fn, tx, jit=False, **step_kwargs)
  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coopjax-reduce")
  cache: dict = {}

  def head_fn(X, opt_state, batches):
    def body(carry, batch):
      X, opt_state = carry
      X, opt_state, metrics = step(X, opt_state, batch)
      return (X, opt_state), metrics

    (X, opt_state), metrics = jax.lax.scan(body, (X, opt_state), batches)
    return X, opt_state, metrics

  head = jax.jit(head_fn)

  def programs(kind, num_workers):
    if kind not in cache:
      red = reduce
      if red is None and kind is nonblocking.StreamingDiLoCoState:
        red = getattr(tx, "reduce_pending", None)
      if red is None:
        red = default_reduce(kind, num_workers)
      closing = make_step(loss_fn, _with_result(tx, red), **step_kwargs)
      cache[kind] = (_reduce_program(red, mesh), closing)
    return cache[kind]

  def period(X, opt_state, batches):
    leaves = jax.tree.leaves(batches)
    if not leaves or any(jnp.shape(b)[:1] != (tau,) for b in leaves):
      raise ValueError(
        f"batches needs a leading period axis of tau={tau} on every leaf ([tau, m, ...]), got "
        f"{[jnp.shape(b) for b in leaves]}."
      )
    state = _only(opt_state)
    start = int(state.count)
    if isinstance(state, nonblocking.StreamingDiLoCoState):
      at = _streaming_consume_at(tx, opt_state, start, tau)
    else:
      at = tau
      if start % tau:
        raise ValueError(
          f"the period must start at a step count that is a multiple of tau={tau}, got "
          f"{start}; run whole periods from tx.init."
        )
    num_workers = jax.tree.leaves(state.pending)[0].shape[0]
    reduce_program, closing = programs(type(state), num_workers)
    future = executor.submit(lambda: jax.block_until_ready(reduce_program(state.pending)))
    parts = []
    try:
      if at > 1:
        X, opt_state, metrics = head(X, opt_state, jax.tree.map(lambda b: b[: at - 1], batches))
        jax.block_until_ready((X, opt_state))
        parts.append(metrics)
      result = future.result()
    except BaseException:
      future.cancel()
      raise
    early = _ResultState(result, state.count, opt_state)
    X, early, last = closing(X, early, jax.tree.map(lambda b: b[at - 1], batches))
    opt_state = early.inner
    parts.append(jax.tree.map(lambda b: b[None], last))
    if at < tau:  # Streaming DiLoCo: the steps after the apply, up to the next snapshot
      X, opt_state, metrics = head(X, opt_state, jax.tree.map(lambda b: b[at:], batches))
      parts.append(metrics)
    metrics = jax.tree.map(lambda *a: jnp.concatenate(a), *parts) if len(parts) > 1 else parts[0]
    return X, opt_state, metrics

  return period


def _streaming_consume_at(tx, opt_state, start: int, tau: int) -> int:
  """The program step (from 1) that applies the one sync of a Streaming DiLoCo period.

  The period must start right after a snapshot and hold exactly one apply,
  at step ``tx.consume_at`` (τ, the delay): then the steps before it and
  after it communicate nothing, and the reduction runs beside the first τ − 1.
  """
  at = getattr(tx, "consume_at", None)
  if not hasattr(tx, "comm") or at is None:
    raise ValueError(
      "make_overlapped_period needs the coopjax.streaming_diloco transformation itself (not "
      "wrapped in optax.chain): its schedule (tx.comm, tx.consume_at) places the sync."
    )
  if at < 1:
    raise ValueError(
      "Streaming DiLoCo with delay=0 applies each sync in the step that snapshots it: there "
      "is nothing to overlap. Use delay >= 1, or coopjax.make_period_step / make_step."
    )
  applies = [j for j in range(1, tau + 1) if tx.comm(start + j, opt_state).collective != "none"]
  if applies != [at]:
    raise ValueError(
      f"a Streaming DiLoCo period must start right after a snapshot and apply its one sync "
      f"at its step tx.consume_at={at}; from step count {start} the {tau} steps apply syncs "
      f"at program steps {applies}. {_streaming_fix(tx, opt_state, start, at)}"
    )
  return at


def _streaming_fix(tx, opt_state, start: int, at: int) -> str:
  """Where a Streaming DiLoCo period can start: the next snapshot's step count and h."""
  warm = int(getattr(tx, "warmup_steps", 0) or 0)
  span = 2 * int(getattr(tx, "period", 1) or 1) + at + 1  # the period is h, or H ≥ h (labels)
  first = max(start, warm) + 1
  applies = [
    k for k in range(first, first + 2 * span) if tx.comm(k, opt_state).collective != "none"
  ]
  applies = [k for k in applies if k - at >= start][:2]
  if len(applies) < 2:
    return "Run tau = h = H/P steps per call, starting right after a snapshot."
  h, snapshot = applies[1] - applies[0], applies[0] - at
  return (
    f"Run tau = h = {h} steps per call, starting right after a snapshot: the next snapshot "
    f"is at step count {snapshot}, so take {snapshot - start} step(s) with coopjax.make_step "
    f"first (make_overlapped_period(..., tau={h}))."
  )


def _reduce_program(reduce, mesh):
  """``pending -> reduce(pending)`` compiled alone (inside a shard_map on the mesh)."""
  if mesh is None:
    return jax.jit(reduce)
  mesh = sharding._auto_mesh(mesh)
  spec = P(sharding.WORKER_AXIS)

  def run(pending):
    m = jax.tree.leaves(pending)[0].shape[0]
    ctx = sharding._context(mesh, m, 0)

    def body(local):
      with mixing.sharded(ctx):
        return reduce(local)

    local_shapes = sharding._local_shapes(body, mesh, ctx, pending)
    out_specs = jax.tree.map(
      lambda loc, x: P() if loc.shape == x.shape[1:] else spec, local_shapes, pending
    )
    mapped = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=out_specs, check_vma=False)
    return mapped(pending)

  return jax.jit(run)
