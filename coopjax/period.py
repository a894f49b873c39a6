r"""One communication period as one compiled program, and what each mix communicates.

:func:`make_period_step` runs the τ local steps of a period and its mix in a
single ``jax.jit`` program, a ``lax.scan`` over τ batches stacked on a leading
axis (``[τ, m, ...]``):

.. math::

   (X_{k+\tau}, s_{k+\tau}) = \mathrm{step}_{k+\tau} \circ \cdots \circ
   \mathrm{step}_{k+1}\,(X_k, s_k),

where ``step`` is exactly the program of :func:`coopjax.make_step`, so the
iterates are those of τ separate calls. With the step counter at a multiple
of τ when the period starts (as it is from ``tx.init``), the mix is the last
thing the program does. One program per period lets the compiler schedule a
communication whose operand is known when the period starts (the pending
reduction of :func:`coopjax.nonblocking_easgd`, :func:`coopjax.overlap_local_sgd`
and :func:`coopjax.delayed`) concurrently with the period's local steps.

For those algorithms the program is laid out so that it can:

.. code-block:: text

   r      = reduce(s_k.pending)                 # issued first: its operand is an input
   X, s   = scan(step, X, s, batches[:τ-1])     # the local steps: never read r
   X, s   = step(X, s, batches[τ-1]; r)         # the closing mix consumes r

(:func:`coopjax.algorithms._nonblocking.issued_early`); the compiled loop takes no
input from the collective, so its start can be scheduled before the loop
and its end after it. Streaming DiLoCo (:func:`coopjax.streaming_diloco`)
consumes its reduction τ steps after its snapshot, not at a period's end: a
program of h steps that starts at a snapshot issues the reduction first,
loops over the τ − 1 delayed steps, applies the fragment at step τ
(``consume_at``) and loops over the remaining h − τ steps. Executed step by step (:func:`coopjax.make_step`)
there is no program to overlap in.

What a mix communicates, and whether it can run during the next period's
computation, is described by the transformation itself (``tx.comm``,
``tx.mix_cost``, :func:`coopjax.comm_pattern`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coopjax.algorithms import _nonblocking as nonblocking
from coopjax.step import make_step

PyTree = Any

__all__ = ["make_period_step"]


def _period_length(batches: PyTree) -> int:
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError("batches has no array leaves; pass [tau, m, per_worker_batch, ...] arrays.")
  sizes = {np.shape(x)[0] if np.ndim(x) >= 2 else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
      "every leaf of batches needs the same leading period axis tau followed by the worker "
      f"axis m ([tau, m, ...]); got leading sizes {sorted(s for s in sizes if s is not None)}"
      + (" and a leaf with fewer than 2 axes" if None in sizes else "")
      + "; stack tau per-step batches with jnp.stack."
    )
  return sizes.pop()


def make_period_step(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  mesh=None,
  *,
  tau: int | None = None,
  unroll: int | bool = 1,
  donate: bool = False,
  jit: bool = True,
  consume_at: int | None = None,
  **step_kwargs,
):
  r"""Builds ``period(X, opt_state, batches) -> (X, opt_state, metrics)``: τ steps in one program.

  .. math::

     \text{for } t = 1..\tau:\quad (X, s, \mathrm{metrics}_t) \leftarrow
     \mathrm{step}(X, s, \mathrm{batches}[t-1])

  as a ``lax.scan`` whose body is :func:`coopjax.make_step`'s step, so the
  iterates, optimizer state and metrics equal those of τ calls of
  ``make_step(loss_fn, tx)`` (the mix happens at the step with
  ``k mod τ = 0``, the last of the period when ``opt_state`` comes from
  ``tx.init`` or from earlier whole periods).

  When ``opt_state`` holds exactly one state of
  :data:`coopjax.algorithms._nonblocking.OVERLAP_STATES` (non-blocking EASGD, Overlap
  Local-SGD, delayed mixing; also inside ``optax.chain``), the scan covers the
  first τ − 1 steps and the closing step runs after it, under
  :func:`coopjax.algorithms._nonblocking.issued_early`: the reduction of the starting
  ``pending`` is issued outside the loop, from the program's inputs, and only
  the closing mix reads it. The iterates are unchanged (a program longer
  than τ, or one starting mid-period, falls back to reducing in the branch).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` for one worker.
    tx: a coopjax transformation (e.g. :func:`coopjax.local_sgd`).
    mesh: a device mesh for the sharded path; passed on to
      :func:`coopjax.make_step`.
    tau: when given, the period length that ``batches``' leading axis must
      have (checked at trace time).
    unroll: ``lax.scan``'s ``unroll`` (True unrolls the whole period).
    donate: donate X and opt_state to the program.
    jit: wrap in ``jax.jit`` (False gives the raw function, e.g. for
      ``jax.make_jaxpr``).
    consume_at: the step of the program (counted from 1) whose mix consumes
      the reduction issued at its start; the steps before it run as one loop
      and the steps after it as another. Default: ``tx.consume_at`` when the
      transformation describes it (:func:`coopjax.streaming_diloco`: its
      delay τ, for programs of h steps that start at a snapshot; 0: nothing
      to issue early), else the last step.
    **step_kwargs: forwarded to :func:`coopjax.make_step` (``num_workers``,
      ``has_aux``, ``with_consensus``, ``with_grad_norm``).

  Returns:
    ``period``; ``batches`` has every leaf shaped ``[τ, m, ...]`` and each
    entry of ``metrics`` is stacked over the τ steps (leading axis τ).

  Example:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> loss = lambda p, b: jnp.mean((p["w"] * b - 1.0) ** 2)
    >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=2)
    >>> X = coopjax.replicate({"w": jnp.zeros(())}, 2)
    >>> period = coopjax.make_period_step(loss, tx, tau=2)
    >>> X, state, metrics = period(X, tx.init(X), jnp.ones((2, 2, 3)))
    >>> metrics["loss"].shape, int(coopjax.step_count(state))
    ((2,), 2)

  References:
    Wang & Joshi, Cooperative SGD, JMLR 22(213), 2021, §3.3 (non-blocking
    execution); Wang, Liang & Joshi, Overlap Local-SGD, ICASSP 2020.
  """
  if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int) or tau < 1):
    raise ValueError(f"tau must be a positive integer or None, got {tau!r}.")
  if mesh is not None:
    step_kwargs = {**step_kwargs, "mesh": mesh}
  if consume_at is None:
    consume_at = getattr(tx, "consume_at", None)
  if consume_at is not None and (
    isinstance(consume_at, bool) or not isinstance(consume_at, int) or consume_at < 0
  ):
    raise ValueError(f"consume_at must be a non-negative integer or None, got {consume_at!r}.")
  step = make_step(loss_fn, tx, jit=False, **step_kwargs)
  closing = make_step(loss_fn, _issue_early(tx), jit=False, **step_kwargs)

  def period(X, opt_state, batches):
    length = _period_length(batches)
    if tau is not None and length != tau:
      raise ValueError(
        f"batches has {length} steps on its leading axis but tau={tau}; pass one batch per "
        f"local step of the period, shape [{tau}, m, ...]."
      )

    def body(carry, batch):
      X, opt_state = carry
      X, opt_state, metrics = step(X, opt_state, batch)
      return (X, opt_state), metrics

    def loop(X, opt_state, part):
      (X, opt_state), metrics = jax.lax.scan(body, (X, opt_state), part, unroll=unroll)
      return X, opt_state, metrics

    found = nonblocking.overlap_states(opt_state)
    at = length if consume_at is None else consume_at
    if len(found) != 1 or not 1 <= at <= length:
      # nothing to issue early (or no single owner for it, or no step to consume it): one scan
      return loop(X, opt_state, batches)
    # The consuming step reduces the program's starting pending outside its mixing branch; the
    # loops over the steps before and after it do not read that reduction.
    start = found[0]
    parts = []
    if at > 1:
      X, opt_state, metrics = loop(X, opt_state, jax.tree.map(lambda b: b[: at - 1], batches))
      parts.append(metrics)
    early = _EarlyState(start.pending, start.count, opt_state)
    X, early, closing_metrics = closing(X, early, jax.tree.map(lambda b: b[at - 1], batches))
    opt_state = early.inner
    parts.append(jax.tree.map(lambda b: jnp.expand_dims(b, 0), closing_metrics))
    if at < length:
      X, opt_state, metrics = loop(X, opt_state, jax.tree.map(lambda b: b[at:], batches))
      parts.append(metrics)
    metrics = jax.tree.map(lambda *a: jnp.concatenate(a), *parts) if len(parts) > 1 else parts[0]
    return X, opt_state, metrics

  if not jit:
    return period
  return jax.jit(period, donate_argnums=(0, 1) if donate else ())


class _EarlyState(NamedTuple):
  """The closing step's optimizer state: the algorithm's, plus the period's starting pending.

  ``operand`` and ``start`` are the ``pending`` and ``count`` of the
  :data:`coopjax.algorithms._nonblocking.OVERLAP_STATES` state when the program started;
  on the sharded path they are placed like that state's fields.
  """

  operand: Any
  start: chex.Array
  inner: optax.OptState


def _issue_early(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` on :class:`_EarlyState`: its update runs under :func:`nonblocking.issued_early`."""
  tx = optax.with_extra_args_support(tx)

  def only(inner):
    found = nonblocking.overlap_states(inner)
    if len(found) != 1:
      raise ValueError(
        f"the closing step needs exactly one of {nonblocking.OVERLAP_STATES} in opt_state, "
        f"found {len(found)}."
      )
    return found[0]

  def init_fn(params):
    inner = tx.init(params)
    state = only(inner)
    return _EarlyState(state.pending, state.count, inner)

  def update_fn(updates, state, params=None, **extra_args):
    kind = type(only(state.inner))
    early = nonblocking.EarlyReduction(kind, state.operand, state.start)
    with nonblocking.issued_early(early):
      updates, inner = tx.update(updates, state.inner, params, **extra_args)
    return updates, _EarlyState(state.operand, state.start, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
