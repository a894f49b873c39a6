"""Side-by-side timing for the benchmarks: programs timed in turn, every call waited for.

Alternating the programs keeps slow drifts of a shared machine from favouring either, and
waiting for every call is required on fake CPU devices, where queued collectives deadlock.
Figures are medians of the per-call times; ratios across rounds are summarised by
:func:`spread`.
"""

from __future__ import annotations

import statistics
import time

import jax


def timeit_alternating(fns, states, reps, warmup=2):
  """Median seconds of ``s = f(s)`` per function, timed in turn, every call waited for.

  Args:
    fns: the programs, each ``state -> state``.
    states: their initial states, one per program (donated buffers are replaced by the result).
    reps: timed calls per program.
    warmup: untimed calls per program first (compilation, caches).

  Returns:
    A list of median seconds per call, one per program.
  """
  states = list(states)
  for _ in range(warmup):
    states = [jax.block_until_ready(f(s)) for f, s in zip(fns, states, strict=True)]
  times = [[] for _ in fns]
  for _ in range(reps):
    for i, f in enumerate(fns):
      t = time.perf_counter()
      states[i] = jax.block_until_ready(f(states[i]))
      times[i].append(time.perf_counter() - t)
  return [statistics.median(t) for t in times]


def timeit_pair(fa, sa, fb, sb, reps, warmup=2):
  """Median seconds of ``s = f(s)`` for two programs, alternating a and b (``timeit_alternating``)."""
  ta, tb = timeit_alternating([fa, fb], [sa, sb], reps, warmup)
  return ta, tb


def run_steps(step, batches, wait=False):
  """``(X, state) -> (X, state)`` after one ``step(X, state, batch)`` per batch.

  With ``wait=True`` every step is waited for (fake CPU devices: queued collectives deadlock).
  """

  def period(s):
    X, state = s
    for batch in batches:
      X, state, _ = step(X, state, batch)
      if wait:
        jax.block_until_ready(X)
    return X, state

  return period


def spread(values):
  """Median, min, max and every value of a list of measurements."""
  return {
    "median": statistics.median(values),
    "min": min(values),
    "max": max(values),
    "all": values,
  }
