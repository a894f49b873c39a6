"""The analysis of ``cluster_compare.py --preset streaming`` on synthetic node outputs.

Known step times, sync costs and an α–β-exact calibration: the measured time
per step, the measured cost of a sync, the modelled clocks (blocking and
overlapped) and the time to the target loss are re-derived by hand.
"""

import argparse
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import cluster_streaming as cs  # noqa: E402

ALPHA, BETA, M = 1e-3, 8 / 100e6, 2
MODEL = 1_000_000
T_C = 0.01


def _all_reduce(size):
  return 2 * (M - 1) * ALPHA + 2 * (M - 1) / M * BETA * size


def _cost(fraction=1.0, wire=1.0):
  return {
    "collective": "all_reduce",
    "volume": 2 * (M - 1) / M,
    "rounds": 2 * (M - 1),
    "overlappable": False,
    "fraction": fraction,
    "wire_fraction": wire,
  }


def _outputs():
  runs = [
    ["compute step", "compute", {"kind": "compute", "path": "step"}],
    ["compute period", "compute", {"kind": "compute", "path": "period"}],
    ["DiLoCo", "diloco", {"kind": "diloco"}],
    ["Streaming P=2", "diloco", {"kind": "streaming", "fragments": 2, "bits": 0}],
    ["local SGD", "periodic", {"kind": "local_sgd", "tau": 4}],
  ]
  sizes = [4096, 65536, 262144, 1048576]
  cal = {k: {str(s): [_all_reduce(s)] * 3 for s in sizes} for k in ("all_reduce", "permute")}
  info = {
    "compute step": {"steps": 8, "prelude": 0, "period": 1, "lengths": [1] * 8, "syncs": []},
    "compute period": {"steps": 16, "prelude": 0, "period": 16, "lengths": [16], "syncs": []},
    # DiLoCo: two programs of 16 steps, a sync closing each
    "DiLoCo": {
      "steps": 32,
      "prelude": 0,
      "period": 16,
      "lengths": [16, 16],
      "syncs": [[16, _cost()], [32, _cost()]],
    },
    # h = 8, τ = 1: a prelude of 7 steps, then programs of 8 whose first step applies
    "Streaming P=2": {
      "steps": 32,
      "prelude": 7,
      "period": 8,
      "lengths": [7, 8, 8, 8, 8],
      "syncs": [[k, _cost(0.5)] for k in (8, 16, 24, 32, 40)],
    },
    "local SGD": {
      "steps": 8,
      "prelude": 0,
      "period": 1,
      "lengths": [1] * 8,
      "syncs": [[4, _cost()], [8, _cost()]],
    },
  }
  extra = {"DiLoCo": 0.05, "Streaming P=2": 0.02, "local SGD": 0.03}
  losses = {label: list(np.linspace(2.0, 0.1, i["steps"] + 8)) for label, i in info.items()}
  repeats = {}
  for label, i in info.items():
    if i["period"] > 1:
      times = [
        n * T_C + (extra.get(label, 0.0) if (label != "Streaming P=2" or j) else 0.0)
        for j, n in enumerate(i["lengths"])
      ]
    else:
      times = [T_C + (extra.get(label, 0.0) if k % 4 == 0 else 0.0) for k in range(1, 9)]
    repeats[label] = [{"times": times, "losses": losses[label], "load": [1.0, 1.0, 1.0]}]
  node = {
    "m": M,
    "model_bytes": MODEL,
    "calibration": cal,
    "preset": {"runs": runs, "info": info, "repeats": repeats},
  }
  return [node, node]


def test_program_lengths():
  assert cs.program_lengths(7, 8, 32) == [7, 8, 8, 8, 8]
  assert cs.program_lengths(0, 16, 32) == [16, 16]
  assert cs.program_lengths(0, 1, 3) == [1, 1, 1]


def test_analysis_re_derived():
  args = argparse.Namespace(rate_bits=100e6)
  result = cs.analyse_preset(_outputs(), args)
  assert result["calibration"]["alpha_s"] == pytest.approx(ALPHA, rel=1e-6)
  assert result["compute_step_s"] == {"step": pytest.approx(T_C), "period": pytest.approx(T_C)}
  sync = _all_reduce(MODEL)
  rows = result["rows"]

  d = rows["DiLoCo"]
  assert d["measured_step_s"] == pytest.approx((32 * T_C + 2 * 0.05) / 32)
  assert d["measured_sync_overhead_s"] == pytest.approx(0.05)
  assert d["modelled_sync_s"] == pytest.approx(sync)
  assert d["modelled_step_s"]["calibrated"]["blocking"] == pytest.approx(T_C + 2 * sync / 32)
  assert d["bytes_sent_per_worker"] == pytest.approx(2 * MODEL)  # volume 1 at m = 2
  # the target is DiLoCo's own running-mean loss at 2/3 of its steps: reached there
  assert d["steps_to_target"] == 21

  s = rows["Streaming P=2"]
  half = _all_reduce(MODEL / 2)
  assert s["payload_per_sync_bytes"] == pytest.approx(MODEL / 2)
  assert s["modelled_sync_s"] == pytest.approx(half)
  # blocking: 4 syncs at steps 8..32; overlapped: issued at 7, 15, 23, 31 and awaited one
  # step later, so only what exceeds one step's compute shows
  assert s["modelled_step_s"]["calibrated"]["blocking"] == pytest.approx(T_C + 4 * half / 32)
  assert s["modelled_step_s"]["calibrated"]["overlapped"] == pytest.approx(
    T_C + 4 * max(half - T_C, 0) / 32
  )
  assert s["measured_step_s"] == pytest.approx((32 * T_C + 3 * 0.02 + 0.02 / 8) / 32)
  assert s["measured_step_median_over_periods_s"] == pytest.approx(T_C + 0.02 / 8)
  assert s["measured_sync_overhead_s"] == pytest.approx(0.02)

  loc = rows["local SGD"]
  assert loc["measured_sync_overhead_s"] == pytest.approx(0.03)  # mix steps minus the others
  assert loc["measured_step_median_over_periods_s"] == pytest.approx(T_C + 0.03 / 4)
  clock = np.cumsum([T_C + (0.03 if k % 4 == 0 else 0.0) for k in range(1, 9)])
  assert loc["measured_time_to_target_s"] == [pytest.approx(clock[loc["steps_to_target"] - 1])]
