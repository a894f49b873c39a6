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
and its end after it. Executed step by step (:func:`coopjax.make_step`)
there is no program to overlap in.

:func:`comm_pattern` describes, per algorithm, what one mix communicates and
whether it can run during the next period's computation: the inputs of a
modelled wall clock (an α–β network time model).
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

__all__ = [
  "make_period_step",
  "CommPattern",
  "comm_pattern",
  "COMM_ALGORITHMS",
]


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

    found = nonblocking.overlap_states(opt_state)
    if len(found) != 1:  # nothing to issue early (or no single owner for it): one scan
      (X, opt_state), metrics = jax.lax.scan(body, (X, opt_state), batches, unroll=unroll)
      return X, opt_state, metrics
    # The closing step reduces the period's starting pending outside its mixing branch; the
    # loop over the first length - 1 steps does not read that reduction.
    start = found[0]
    head = jax.tree.map(lambda b: b[:-1], batches)
    last = jax.tree.map(lambda b: b[-1], batches)
    if length > 1:
      (X, opt_state), metrics = jax.lax.scan(body, (X, opt_state), head, unroll=unroll)
    early = _EarlyState(start.pending, start.count, opt_state)
    X, early, closing_metrics = closing(X, early, last)
    if length > 1:
      metrics = jax.tree.map(
        lambda a, b: jnp.concatenate([a, jnp.expand_dims(b, 0)]), metrics, closing_metrics
      )
    else:
      metrics = jax.tree.map(lambda b: jnp.expand_dims(b, 0), closing_metrics)
    return X, early.inner, metrics

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


class CommPattern(NamedTuple):
  r"""What one mix communicates, per worker, for a modelled wall clock.

  With model size ``d`` bytes, an α–β model prices one mix at about
  ``rounds·α + volume·d·β``; a mix with ``overlappable=True`` can run while
  the workers compute the next period's τ local steps, so a period costs
  ``max(τ·t_step, t_comm)`` instead of ``τ·t_step + t_comm``.

  Attributes:
    collective: ``"all_reduce"`` (a sum or mean over all workers),
      ``"neighbor_exchange"`` (each worker sends its model to its graph
      neighbours, e.g. collective-permutes) or ``"none"``.
    volume: model-sized payloads sent per worker per mix: ``2(m−1)/m`` for a
      ring all-reduce (reduce-scatter + all-gather), the maximum number of
      neighbours for an exchange (paper Table 3 counts sent + received data,
      twice these figures).
    rounds: sequential message rounds per mix (latency terms): ``2(m−1)``
      for a ring all-reduce, the maximum number of neighbours for an exchange.
    overlappable: whether the mix's communication can proceed during the
      next period's local steps (its operand is known at the mix and its
      result is first needed at the next mix).
    period: τ, local steps between mixes (the mix happens once per period).
  """

  collective: str
  volume: float
  rounds: int
  overlappable: bool
  period: int


COMM_ALGORITHMS = (
  "sync_sgd",
  "local_sgd",
  "easgd",
  "dpsgd",
  "cooperative",
  "nonblocking_easgd",
  "overlap_local_sgd",
  "delayed",
  "slowmo",
  "diloco",
)

_OVERLAPPABLE = {"nonblocking_easgd", "overlap_local_sgd", "delayed"}
_ALL_REDUCE = {"sync_sgd", "local_sgd", "easgd", "nonblocking_easgd", "overlap_local_sgd"}
_ALL_REDUCE |= {"slowmo", "diloco"}


def _all_reduce(m: int) -> tuple[float, int]:
  return (2.0 * (m - 1) / m, 2 * (m - 1)) if m > 1 else (0.0, 0)


def comm_pattern(
  algorithm: str,
  num_workers: int,
  tau: int = 1,
  W=None,
  num_aux: int = 0,
) -> CommPattern:
  r"""The communication of one mix of ``algorithm`` with ``num_workers`` workers.

  * ``sync_sgd`` (τ = 1), ``local_sgd``, ``slowmo``, ``diloco``: an
    all-reduce of the workers' models (mean); blocking, since the next local
    step starts from its result.
  * ``easgd``: an all-reduce of ``Σ_i x_i`` (each worker then updates its
    replica of the anchor); blocking as :func:`coopjax.easgd` computes it.
  * ``nonblocking_easgd``, ``overlap_local_sgd``: the same all-reduce, but
    of models fixed at the previous mix, consumed at the next: overlappable.
  * ``delayed``: mixing the period-start snapshot with ``W`` (an all-reduce
    when ``W = J``, else a neighbour exchange); overlappable.
  * ``dpsgd`` / ``cooperative``: mixing with ``W`` (all-reduce when the
    workers' block is ``J``, else a neighbour exchange with the graph's
    maximum degree); an auxiliary row adds nothing when every worker only
    pulls from replicated auxiliaries (an all-reduce updates them).

  Args:
    algorithm: one of :data:`COMM_ALGORITHMS`.
    num_workers: m.
    tau: communication period τ (1 for ``sync_sgd`` and ``dpsgd``).
    W: mixing matrix (``delayed``, ``dpsgd``, ``cooperative``), auxiliaries
      last.
    num_aux: auxiliary rows of ``W`` (``cooperative``).

  Returns:
    A :class:`CommPattern`.
  """
  if algorithm not in COMM_ALGORITHMS:
    raise ValueError(f"algorithm must be one of {COMM_ALGORITHMS}, got {algorithm!r}.")
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}.")
  if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
    raise ValueError(f"tau must be a positive integer, got {tau!r}.")
  m = num_workers
  if algorithm in ("sync_sgd", "dpsgd"):
    tau = 1
  overlappable = algorithm in _OVERLAPPABLE
  if algorithm in _ALL_REDUCE:
    volume, rounds = _all_reduce(m)
    return CommPattern("all_reduce", volume, rounds, overlappable, tau)
  if W is None:
    raise ValueError(f"comm_pattern({algorithm!r}) needs the mixing matrix W.")
  W = np.asarray(W, dtype=np.float64)
  if W.shape != (m + num_aux, m + num_aux):
    raise ValueError(
      f"W has shape {W.shape} but num_workers={m} and num_aux={num_aux} need "
      f"({m + num_aux}, {m + num_aux})."
    )
  block = W[:m, :m]
  aux_coupled = num_aux > 0 and bool(np.any(np.abs(W[:m, m:]) > 0))
  off = np.abs(block - np.diag(np.diag(block))) > 0
  if m > 1 and block[0, 0] > 0 and np.allclose(block, block[0, 0], rtol=0.0, atol=1e-12):
    volume, rounds = _all_reduce(m)
    return CommPattern("all_reduce", volume, rounds, overlappable, tau)
  degree = int(off.sum(0).max()) if m > 1 else 0
  if degree == 0:
    if aux_coupled:
      volume, rounds = _all_reduce(m)
      return CommPattern("all_reduce", volume, rounds, overlappable, tau)
    return CommPattern("none", 0.0, 0, True, tau)
  if aux_coupled:
    volume, rounds = _all_reduce(m)
    return CommPattern("neighbor_exchange", degree + volume, degree + rounds, overlappable, tau)
  return CommPattern("neighbor_exchange", float(degree), degree, overlappable, tau)
