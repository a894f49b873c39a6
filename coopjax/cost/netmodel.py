r"""An α–β model of communication time, for modelled wall-clock on one machine.

On a single CPU machine the workers' communication is not real, so coopjax
reports *modelled* wall-clock: the measured compute time of each step plus
the time the mixing collective would take on a network with per-message
latency α (seconds) and per-byte time β = 1/bandwidth (Hockney's model):

.. math::

   T(\text{message of } B \text{ bytes}) = \alpha + \beta B .

Collective algorithms (Thakur, Rabenseifner & Gropp, 2005; Patarasuk & Yuan,
2009), for m nodes each holding a model of B bytes:

* all-reduce (ring: reduce-scatter + all-gather), used for ``W = J`` and for
  EASGD's anchor reduction: :math:`2(m-1)\alpha + 2\frac{m-1}{m} \beta B`;
* neighbour exchange for a sparse W with Δ peers per node (one
  collective-permute per peer, sends serialised on one link):
  :math:`\Delta(\alpha + \beta B)`;
* all-gather (the dense fallback for an unstructured W):
  :math:`(m-1)(\alpha + \beta B)`;
* parameter server (push and pull through one server link):
  :math:`2\alpha + 2 m \beta B`.

A compressed mix sends payloads of :math:`\rho B` bytes (``wire_fraction``
ρ, :func:`coopjax.cost.pattern.compressed_cost`) through the neighbour
exchange of a sparse W, or through an all-gather where the uncompressed mix
would all-reduce (compressed messages are decoded, not summed in flight).

A *blocking* mix adds its time to the step that mixes. A *non-blocking* mix
(non-blocking EASGD, Overlap Local-SGD) runs during the next period's local
steps, so a period costs :math:`\max(\tau t_c, T_{mix})` instead of
:math:`\tau t_c + T_{mix}`. This is a model, not a measurement: it ignores
contention, stragglers and compute slowed by concurrent communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

import coopjax.cost.pattern as pattern

__all__ = [
  "NetworkModel",
  "DEFAULT_NETWORK",
  "allreduce_time",
  "allgather_time",
  "neighbor_exchange_time",
  "parameter_server_time",
  "mix_time",
  "mix_degree",
  "modelled_wallclock",
]


class NetworkModel(NamedTuple):
  """Network parameters of the α–β model.

  Attributes:
    latency: α, seconds per message (default 50 µs, commodity Ethernet + MPI).
    bandwidth: bytes per second per link (default 1.25e9 = 10 Gbit/s).

  Examples:
    >>> NetworkModel()
    NetworkModel(latency=5e-05, bandwidth=1250000000.0)
    >>> NetworkModel(latency=1e-3, bandwidth=0.0).check()
    Traceback (most recent call last):
    ...
    ValueError: NetworkModel.bandwidth must be a finite positive number, got 0.0.
  """

  latency: float = 50e-6
  bandwidth: float = 1.25e9

  def check(self) -> NetworkModel:
    for name in ("latency", "bandwidth"):
      value = getattr(self, name)
      if not np.isfinite(value) or value < 0 or (name == "bandwidth" and value == 0):
        raise ValueError(f"NetworkModel.{name} must be a finite positive number, got {value}.")
    return self


DEFAULT_NETWORK = NetworkModel()


def allreduce_time(nbytes: float, m: int, net: NetworkModel = DEFAULT_NETWORK) -> float:
  r"""Ring all-reduce of ``nbytes`` over ``m`` nodes (reduce-scatter + all-gather).

  .. math::

     T = 2(m - 1)\,\alpha + 2\frac{m - 1}{m}\,\beta B .

  Examples:
    A slow toy network, 1 ms per message and 1 MB/s, makes the terms easy to
    check; :data:`DEFAULT_NETWORK` is 50 µs and 10 Gbit/s.

    >>> net = NetworkModel(latency=1e-3, bandwidth=1e6)
    >>> round(allreduce_time(1e6, 4, net), 6)  # 6 ms + 1.5 s
    1.506
  """
  net.check()
  if m <= 1:
    return 0.0
  return 2 * (m - 1) * net.latency + 2 * (m - 1) / m * nbytes / net.bandwidth


def allgather_time(nbytes: float, m: int, net: NetworkModel = DEFAULT_NETWORK) -> float:
  r"""Ring all-gather of one ``nbytes`` block per node.

  .. math::

     T = (m - 1)(\alpha + \beta B) .

  Examples:
    A slow toy network, 1 ms per message and 1 MB/s, makes the terms easy to
    check; :data:`DEFAULT_NETWORK` is 50 µs and 10 Gbit/s.

    >>> net = NetworkModel(latency=1e-3, bandwidth=1e6)
    >>> round(allgather_time(1e6, 4, net), 6)  # 3 x (1 ms + 1 s)
    3.003
  """
  net.check()
  return (m - 1) * (net.latency + nbytes / net.bandwidth)


def neighbor_exchange_time(
  nbytes: float, degree: int, net: NetworkModel = DEFAULT_NETWORK
) -> float:
  r"""Each node sends its model to ``degree`` peers (one message each).

  .. math::

     T = \Delta(\alpha + \beta B) .

  Examples:
    A slow toy network, 1 ms per message and 1 MB/s, makes the terms easy to
    check; :data:`DEFAULT_NETWORK` is 50 µs and 10 Gbit/s.

    >>> net = NetworkModel(latency=1e-3, bandwidth=1e6)
    >>> round(neighbor_exchange_time(1e6, 2, net), 6)  # a ring: 2 peers
    2.002
  """
  net.check()
  return degree * (net.latency + nbytes / net.bandwidth)


def parameter_server_time(nbytes: float, m: int, net: NetworkModel = DEFAULT_NETWORK) -> float:
  r"""Push to and pull from one parameter server over its single link.

  .. math::

     T = 2\alpha + 2 m \beta B .

  Examples:
    A slow toy network, 1 ms per message and 1 MB/s, makes the terms easy to
    check; :data:`DEFAULT_NETWORK` is 50 µs and 10 Gbit/s.

    >>> net = NetworkModel(latency=1e-3, bandwidth=1e6)
    >>> round(parameter_server_time(1e6, 4, net), 6)  # 2 ms + 8 s
    8.002
  """
  net.check()
  return 2 * net.latency + 2 * m * nbytes / net.bandwidth


def mix_degree(W: np.ndarray) -> int:
  """Largest number of other nodes any node receives from (non-zero off-diagonal entries).

  Examples:
    >>> import numpy as np
    >>> from coopjax import topology
    >>> mix_degree(topology.ring(8)), mix_degree(topology.exponential(8)), mix_degree(np.eye(3))
    (2, 5, 0)
  """
  W = np.asarray(W)
  off = np.abs(W - np.diag(np.diag(W))) > 1e-12
  return int(off.sum(axis=0).max()) if W.size else 0


def mix_time(mix, nbytes: float, net: NetworkModel = DEFAULT_NETWORK, num_aux: int = 0) -> float:
  r"""Modelled time of one mix: ``rounds·α + volume·fraction·wire_fraction·B·β``.

  Args:
    mix: a :class:`coopjax.cost.pattern.MixCost` (``tx.comm(k, state)``,
      ``tx.mix_cost``, ``Mix.cost``, ``Mix.compressed_cost(...)``), or a mixing
      matrix W, whose cost record is :func:`coopjax.cost.pattern.matrix_cost`
      (``W = J``: an all-reduce; an anchor fed by the workers: an all-reduce;
      a sparse W: a neighbour exchange with the largest in-degree; the
      identity: 0).
    nbytes: B, the bytes of one model (of the mixed leaves), uncompressed.
    net: the network.
    num_aux: with a matrix, its auxiliary rows (the last ones).

  Returns:
    Seconds.

  A compressed mix is priced by its payload bytes: its record's
  ``wire_fraction`` (payload bytes over dense bytes) scales the β term, and an
  all-gather of payloads replaces the all-reduce it cannot use.

  .. math::

     T_{\text{mix}} = \text{rounds}\cdot\alpha
     + \text{volume}\cdot\text{fraction}\cdot\text{wire\_fraction}\cdot B\beta .

  Examples:
    A ring (two peers: 2 rounds, 2 payloads) and full averaging over four
    workers (a ring all-reduce: 6 rounds, 1.5 payloads):

    >>> from coopjax import topology
    >>> from coopjax.cost import pattern
    >>> net = NetworkModel(latency=1e-3, bandwidth=1e6)
    >>> round(mix_time(topology.ring(8), 1e6, net), 6)
    2.002
    >>> round(mix_time(topology.complete(4), 1e6, net), 6)
    1.506

    The ring with top-k messages carrying 2 % of the bytes (values and
    indices), and full averaging of 4-bit messages (an all-gather, 3 payloads
    of 1/8 model):

    >>> round(mix_time(pattern.compressed_cost(topology.ring(8), 8, 0.02), 1e6, net), 6)
    0.042
    >>> round(mix_time(pattern.compressed_cost(topology.complete(4), 4, 0.125), 1e6, net), 6)
    0.378
  """
  net.check()
  if not isinstance(mix, pattern.MixCost):
    W = np.asarray(mix, dtype=np.float64)
    mix = pattern.matrix_cost(W, W.shape[0] - num_aux)
  return mix.rounds * net.latency + mix.bytes_sent(nbytes) / net.bandwidth


def modelled_wallclock(
  compute_times: Sequence[float],
  mixed: Sequence[bool],
  comm_time: float,
  *,
  overlap: bool = False,
) -> np.ndarray:
  r"""Cumulative modelled wall-clock after each step.

  Args:
    compute_times: measured compute seconds of each step.
    mixed: whether each step ends with a mix.
    comm_time: modelled seconds of one mix (:func:`mix_time`).
    overlap: non-blocking execution: a mix runs in the background while the
      following steps compute; a step that must consume a mix still in flight
      (the next mix) waits for it.

  Returns:
    Array of the same length as ``compute_times``: wall-clock at the end of
    each step.

  Examples:
    Four 1-second steps mixing after steps 2 and 4, a mix taking 2.5 s. Blocking,
    each mix adds 2.5 s; overlapped, the first mix hides behind steps 3 and 4
    and only the last one is waited for (by the next mix, at 4.5 s):

    >>> mixed = [False, True, False, True]
    >>> modelled_wallclock([1.0] * 4, mixed, 2.5).tolist()
    [1.0, 4.5, 5.5, 9.0]
    >>> modelled_wallclock([1.0] * 4, mixed, 2.5, overlap=True).tolist()
    [1.0, 2.0, 3.0, 4.5]
  """
  compute_times = np.asarray(compute_times, dtype=np.float64)
  mixed = np.asarray(mixed, dtype=bool)
  if compute_times.shape != mixed.shape:
    raise ValueError(
      f"compute_times and mixed must have the same length, got {compute_times.shape} and "
      f"{mixed.shape}."
    )
  if comm_time < 0 or not np.isfinite(comm_time):
    raise ValueError(f"comm_time must be a finite non-negative number, got {comm_time}.")
  clock = 0.0
  pending_until = 0.0  # when the in-flight non-blocking mix completes
  out = np.empty_like(compute_times)
  for k, (t, mix) in enumerate(zip(compute_times, mixed, strict=True)):
    clock += t
    if mix:
      if overlap:
        clock = max(clock, pending_until)  # the previous mix must have arrived
        pending_until = clock + comm_time
      else:
        clock += comm_time
    out[k] = clock
  return out
