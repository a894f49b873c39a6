r"""What one mix communicates: the cost record of the mixing interface.

Every mix in coopjax is a linear map of the stacked rows, ``X ← X·W``
(:class:`coopjax.mixing.Mix`). Its communication follows from W alone, with
the lowering :mod:`coopjax.parallel.collectives` gives it on devices:

* the workers' block ``A = W[:m, :m]`` equal to ``aI + cJ`` (full averaging):
  one **all-reduce** of the workers' rows;
* a sparse A (rings, tori, hypercubes, exponential graphs, matchings, group
  means): a **neighbour exchange**, each worker sending its model to Δ peers
  (Δ the largest in-degree, one collective-permute per peer);
* auxiliary rows fed by the workers (``W[:m, m:] ≠ 0``, EASGD's anchor): an
  **all-reduce** of the workers' contributions into the replicated
  auxiliaries (the pull toward them is local);
* no off-diagonal weight and no auxiliary fed by the workers: nothing.

A compressed mix (:meth:`coopjax.mixing.Mix.exchange`) sends payloads, not
models: a sparse W keeps its neighbour exchange, and every pattern that
would reduce (full averaging, an anchor fed by the workers) becomes an
**all-gather** of the payloads (compressed messages are decoded before they
are summed, so they cannot be reduced in flight), ``m − 1`` payloads in
``m − 1`` rounds. ``wire_fraction`` (payload bytes per byte of the dense
message) scales the bytes (:func:`compressed_cost`).

For a modelled wall clock (:mod:`coopjax.cost.netmodel`) a record gives the
model-sized payloads each worker sends (``volume``) and the sequential
message rounds (``rounds``, latency terms), with a ring all-reduce at
``2(m−1)/m`` payloads in ``2(m−1)`` rounds (reduce-scatter + all-gather):

.. math::

   T_{\text{mix}} = \text{rounds}\cdot\alpha + \text{volume}\cdot B\beta .

  >>> import numpy as np
  >>> from coopjax import topology
  >>> from coopjax.cost import pattern
  >>> pattern.matrix_cost(topology.complete(4), num_workers=4)
  MixCost(collective='all_reduce', volume=1.5, rounds=6, overlappable=False, fraction=1.0,
          wire_fraction=1.0)
  >>> pattern.matrix_cost(topology.ring(8), num_workers=8).collective
  'neighbor_exchange'
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
  "MixCost",
  "NO_COMM",
  "COLLECTIVES",
  "CommPattern",
  "all_reduce",
  "all_gather",
  "matrix_cost",
  "combine",
  "compressed_cost",
  "comm_pattern",
]

COLLECTIVES = ("none", "all_reduce", "neighbor_exchange", "all_gather")

_ATOL = 1e-12


class MixCost(NamedTuple):
  r"""What one mix communicates, per worker.

  Attributes:
    collective: one of :data:`COLLECTIVES`.
    volume: model-sized payloads each worker sends (``2(m−1)/m`` for a ring
      all-reduce, Δ for a neighbour exchange with Δ peers).
    rounds: sequential message rounds (latency terms).
    overlappable: whether the mix's communication can run while the workers
      compute the next local steps (its operand is fixed at the mix and its
      result first needed at the next one): a period then costs
      ``max(τ·t_step, t_comm)`` instead of ``τ·t_step + t_comm``.
    fraction: the part of the model's bytes each payload carries (1 for a
      whole model; less for a mix of some leaves only).
    wire_fraction: bytes on the wire per byte of the dense message (1
      uncompressed; a compressed mix's payload bytes over its message's
      bytes, :meth:`coopjax.mixing.Mix.compressed_cost`).

  Examples:
    >>> cost = MixCost("all_reduce", volume=1.5, rounds=6)
    >>> cost.bytes_sent(100.0)  # 1.5 payloads of 100 bytes
    150.0
    >>> MixCost("neighbor_exchange", 2.0, 2, wire_fraction=0.02).bytes_sent(100.0)
    4.0
  """

  collective: str
  volume: float
  rounds: int
  overlappable: bool = False
  fraction: float = 1.0
  wire_fraction: float = 1.0

  def bytes_sent(self, model_bytes: float) -> float:
    r"""Bytes each worker sends in one such mix, for a model of ``model_bytes`` bytes.

    .. math::

       \text{volume}\cdot\text{fraction}\cdot\text{wire\_fraction}\cdot B .
    """
    return self.volume * self.fraction * self.wire_fraction * model_bytes


NO_COMM = MixCost("none", 0.0, 0, False)
"""The cost record of a step that does not communicate."""


def all_reduce(num_workers: int, *, overlappable: bool = False) -> MixCost:
  """A ring all-reduce over ``num_workers`` workers: ``2(m−1)/m`` payloads in ``2(m−1)`` rounds.

  Examples:
    >>> all_reduce(4)
    MixCost(collective='all_reduce', volume=1.5, rounds=6, overlappable=False, fraction=1.0,
            wire_fraction=1.0)
    >>> all_reduce(1).collective
    'none'
  """
  m = int(num_workers)
  if m <= 1:
    return NO_COMM._replace(overlappable=overlappable)
  return MixCost("all_reduce", 2.0 * (m - 1) / m, 2 * (m - 1), overlappable)


def matrix_cost(W, num_workers: int, *, overlappable: bool = False) -> MixCost:
  """The cost record of the mix ``X ← X·W`` with the first ``num_workers`` rows workers.

  Args:
    W: the ``(m + v) × (m + v)`` (or ``m × m``) mixing matrix, ``x_i ← Σ_j W[j, i] x_j``.
    num_workers: m; the remaining rows are auxiliary (replicated on every device).
    overlappable: whether the mix overlaps the following local steps.

  Returns:
    A :class:`MixCost` (see the module docstring for the rules).

  Examples:
    A ring sends to two peers; EASGD's anchor (the last row) is fed by an
    all-reduce of the workers; the identity sends nothing:

    >>> import numpy as np
    >>> from coopjax import topology
    >>> matrix_cost(topology.ring(8), 8)
    MixCost(collective='neighbor_exchange', volume=2.0, rounds=2, overlappable=False, fraction=1.0,
            wire_fraction=1.0)
    >>> matrix_cost(topology.easgd(4, 0.2), 4).collective
    'all_reduce'
    >>> matrix_cost(np.eye(4), 4).collective
    'none'
  """
  W = np.asarray(W, dtype=np.float64)
  m = int(num_workers)
  if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] < m:
    raise ValueError(f"W must be a square matrix with at least {m} rows, got shape {W.shape}.")
  A = W[:m, :m]
  feeds_aux = bool(np.any(np.abs(W[:m, m:]) > _ATOL))
  off = np.abs(A - np.diag(np.diag(A))) > _ATOL
  if not off.any():
    return all_reduce(m, overlappable=overlappable) if feeds_aux else NO_COMM
  c = A[0, 1] if m > 1 else 0.0
  a = A[0, 0] - c
  if m > 2 and np.allclose(A, a * np.eye(m) + c, atol=_ATOL, rtol=0.0):
    return all_reduce(m, overlappable=overlappable)
  degree = int(off.sum(axis=0).max())
  exchange = MixCost("neighbor_exchange", float(degree), degree, overlappable)
  return combine(exchange, all_reduce(m)) if feeds_aux else exchange


def combine(*costs: MixCost) -> MixCost:
  """Costs of mixes run one after the other in the same step: volumes and rounds add.

  The collective is the first one that communicates; the result overlaps only
  if every part does.

  Examples:
    A ring exchange (2 payloads, 2 rounds) followed by an all-reduce over 8
    workers (1.75 payloads, 14 rounds):

    >>> ring = MixCost("neighbor_exchange", 2.0, 2)
    >>> combine(ring, all_reduce(8))
    MixCost(collective='neighbor_exchange', volume=3.75, rounds=16, overlappable=False, fraction=1.0,
            wire_fraction=1.0)
  """
  moving = [c for c in costs if c.collective != "none"]
  if not moving:
    return NO_COMM._replace(overlappable=all(c.overlappable for c in costs))
  sent = sum(c.volume * c.fraction * c.wire_fraction for c in moving)
  fraction = max(c.fraction for c in moving)
  wire = max(c.wire_fraction for c in moving)
  return MixCost(
    moving[0].collective,
    sent / (fraction * wire) if fraction * wire > 0 else 0.0,
    sum(c.rounds for c in moving),
    all(c.overlappable for c in moving),
    fraction,
    wire,
  )


def all_gather(num_workers: int, *, overlappable: bool = False) -> MixCost:
  """A ring all-gather over ``num_workers`` workers: ``m − 1`` payloads in ``m − 1`` rounds.

  Examples:
    >>> all_gather(4).volume, all_gather(4).rounds
    (3.0, 3)
  """
  m = int(num_workers)
  if m <= 1:
    return NO_COMM._replace(overlappable=overlappable)
  return MixCost("all_gather", float(m - 1), m - 1, overlappable)


def compressed_cost(
  W, num_workers: int, wire_fraction: float, *, overlappable: bool = False
) -> MixCost:
  """The cost record of the mix ``X ← X·W`` of compressed messages.

  The payloads travel through the sharded lowering of
  :func:`coopjax.parallel.collectives.exchange`: a sparse workers' block
  keeps its neighbour exchange (Δ payloads in Δ rounds); full averaging or an
  auxiliary row fed by the workers is an all-gather of the payloads
  (``m − 1`` payloads in ``m − 1`` rounds: compressed messages are decoded,
  not reduced, so no all-reduce); a diagonal W sends nothing.

  Args:
    W: the ``(m + v) × (m + v)`` (or ``m × m``) mixing matrix.
    num_workers: m.
    wire_fraction: payload bytes per byte of the dense message
      (:meth:`coopjax.mixing.Mix.compressed_cost` computes it from a
      compressor and a model).
    overlappable: whether the mix overlaps the following local steps.

  Returns:
    A :class:`MixCost` with ``wire_fraction`` set.

  Examples:
    Top-k at 1 % with int32 indices (``wire_fraction = 0.02``) on a ring, and
    full averaging of 4-bit messages (about 1/8):

    >>> from coopjax import topology
    >>> compressed_cost(topology.ring(8), 8, 0.02).bytes_sent(1e6)
    40000.0
    >>> cost = compressed_cost(topology.complete(8), 8, 0.125)
    >>> cost.collective, cost.volume, cost.bytes_sent(1e6)
    ('all_gather', 7.0, 875000.0)
  """
  wire = float(wire_fraction)
  if not np.isfinite(wire) or wire < 0:
    raise ValueError(
      f"wire_fraction must be a finite non-negative number (payload bytes / dense bytes), got "
      f"{wire_fraction}."
    )
  W = np.asarray(W, dtype=np.float64)
  dense = matrix_cost(W, num_workers, overlappable=overlappable)
  feeds_aux = bool(np.any(np.abs(W[: int(num_workers), int(num_workers) :]) > _ATOL))
  if dense.collective == "none":
    return dense
  if dense.collective == "neighbor_exchange" and not feeds_aux:
    return dense._replace(wire_fraction=wire)
  return all_gather(num_workers, overlappable=overlappable)._replace(wire_fraction=wire)


class CommPattern(NamedTuple):
  r"""What one regular mix of a transformation communicates, and how often.

  With model size ``d`` bytes, an α–β model prices one mix at about
  ``rounds·α + volume·d·β``; a mix with ``overlappable=True`` can run while
  the workers compute the next period's τ local steps, so a period costs
  ``max(τ·t_step, t_comm)`` instead of ``τ·t_step + t_comm``.

  Attributes:
    collective: one of :data:`COLLECTIVES`.
    volume: model-sized payloads sent per worker per mix.
    rounds: sequential message rounds per mix.
    overlappable: whether the mix overlaps the next period's local steps.
    period: τ, local steps between mixes.

  Examples:
    >>> p = CommPattern("all_reduce", volume=1.5, rounds=6, overlappable=False, period=4)
    >>> p.volume / p.period  # payloads per worker per step
    0.375
  """

  collective: str
  volume: float
  rounds: int
  overlappable: bool
  period: int


def comm_pattern(tx) -> CommPattern:
  """The :class:`CommPattern` of a coopjax transformation's regular mix.

  Args:
    tx: a transformation made by a coopjax factory (it describes itself:
      ``tx.mix_cost``, ``tx.period``).

  Returns:
    A :class:`CommPattern`.

  Examples:
    >>> import optax, coopjax
    >>> coopjax.comm_pattern(coopjax.local_sgd(optax.sgd(0.1), tau=4, num_workers=8))
    CommPattern(collective='all_reduce', volume=1.75, rounds=14, overlappable=False, period=4)
  """
  cost = getattr(tx, "mix_cost", None)
  if cost is None:
    raise TypeError(
      f"comm_pattern needs a transformation made by a coopjax factory (it carries tx.mix_cost), "
      f"got {type(tx).__name__}; inside optax.chain, pass the coopjax transformation itself."
    )
  return CommPattern(cost.collective, cost.volume, cost.rounds, cost.overlappable, tx.period)
