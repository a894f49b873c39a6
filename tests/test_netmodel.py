"""The α–β communication model against closed forms."""

import numpy as np
import pytest

from coopjax import topology
from coopjax.cost import netmodel

NET = netmodel.NetworkModel(latency=1e-4, bandwidth=1e9)


def test_collective_formulas():
  B, m = 4e6, 8
  assert netmodel.allreduce_time(B, m, NET) == pytest.approx(14e-4 + 2 * 7 / 8 * B / 1e9)
  assert netmodel.allgather_time(B, m, NET) == pytest.approx(7 * (1e-4 + B / 1e9))
  assert netmodel.neighbor_exchange_time(B, 2, NET) == pytest.approx(2 * (1e-4 + B / 1e9))
  assert netmodel.parameter_server_time(B, m, NET) == pytest.approx(2e-4 + 2 * m * B / 1e9)
  assert netmodel.allreduce_time(B, 1, NET) == 0.0


def test_mix_time_picks_the_collective():
  B, m = 1e6, 8
  assert netmodel.mix_time(topology.complete(m), B, NET) == netmodel.allreduce_time(B, m, NET)
  ring = netmodel.mix_time(topology.ring(m), B, NET)
  assert ring == netmodel.neighbor_exchange_time(B, 2, NET)
  assert netmodel.mix_degree(topology.exponential(8)) == 5  # offsets ±1, ±2, 4
  assert netmodel.mix_time(topology.easgd(m, 0.1), B, NET, num_aux=1) == netmodel.allreduce_time(
    B, m, NET
  )
  assert netmodel.mix_time(np.eye(m), B, NET) == 0.0


@pytest.mark.parametrize("comm", [0.5, 3.0])
def test_blocking_and_overlapped_wallclock_closed_form(comm):
  tau, t, periods = 4, 0.25, 5  # tau * t = 1 second of compute per period
  times = [t] * (tau * periods)
  mixed = [(k + 1) % tau == 0 for k in range(tau * periods)]
  blocking = netmodel.modelled_wallclock(times, mixed, comm)
  assert blocking[-1] == pytest.approx(periods * (tau * t + comm))
  overlapped = netmodel.modelled_wallclock(times, mixed, comm, overlap=True)
  # Communication hides behind a period's compute when it is shorter; otherwise the
  # mixes are back to back after the first period.
  expected = periods * tau * t if comm <= tau * t else tau * t + (periods - 1) * comm
  assert overlapped[-1] == pytest.approx(expected)
  assert np.all(np.diff(overlapped) >= 0)


def test_bad_arguments():
  with pytest.raises(ValueError, match="same length"):
    netmodel.modelled_wallclock([1.0], [True, False], 0.1)
  with pytest.raises(ValueError, match="bandwidth"):
    netmodel.allreduce_time(1.0, 2, netmodel.NetworkModel(bandwidth=0.0))
  with pytest.raises(ValueError, match="comm_time"):
    netmodel.modelled_wallclock([1.0], [True], -1.0)
