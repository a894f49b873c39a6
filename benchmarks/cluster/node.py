r"""What runs on each node of the emulated cluster: join the job, time collectives and steps.

A node program calls :func:`join` first (it reads the ``CJ_*`` variables that
:class:`benchmarks.cluster.Cluster` sets and calls
``coopjax.distributed.initialize`` with gloo), then builds the mesh with
``coopjax.worker_mesh()`` (one CPU device per node, so m = N workers, one per
node) and runs coopjax unchanged: every collective crosses the emulated links.

:func:`time_collective` times one jitted ``shard_map`` all-reduce (``psum``) or
ring shift (``ppermute`` to the next node) of a given size; :func:`fit_alpha_beta`
fits the Hockney model :math:`T = \alpha + \beta S` per message to measured
all-reduces (ring algorithm: :math:`T = 2(m-1)\alpha + 2\frac{m-1}{m}\beta S`).
:func:`run_steps` times a training loop step by step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def join(**kwargs):
  """``coopjax.distributed.initialize`` from the node's ``CJ_*`` environment; returns ProcessInfo."""
  import coopjax

  try:
    coordinator = os.environ["CJ_COORDINATOR"]
    num = int(os.environ["CJ_NUM_NODES"])
    node = int(os.environ["CJ_NODE"])
  except KeyError as err:
    raise RuntimeError(
      f"{err.args[0]} is not set: run this program on the emulated cluster "
      "(benchmarks.cluster.Cluster.run)."
    ) from None
  kwargs.setdefault("initialization_timeout", 120)
  return coopjax.distributed.initialize(coordinator, num_processes=num, process_id=node, **kwargs)


def local_value(x) -> np.ndarray:
  """This process's block of a sharded array (blocks until it is ready)."""
  return np.concatenate([np.asarray(s.data).reshape(-1) for s in x.addressable_shards])


def collective_program(kind: str, mesh) -> Callable:
  """A jitted ``shard_map`` over the mesh's ``"workers"`` axis: ``"all_reduce"`` or ``"permute"``."""
  import jax
  from jax.sharding import PartitionSpec as P

  D = mesh.shape["workers"]

  def body(x):
    if kind == "all_reduce":
      return jax.lax.psum(x, "workers")
    if kind == "permute":
      return jax.lax.ppermute(x, "workers", [(i, (i + 1) % D) for i in range(D)])
    raise ValueError(f"kind must be 'all_reduce' or 'permute', got {kind!r}.")

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("workers"), out_specs=P("workers")))


def time_collective(kind: str, nbytes: int, mesh, reps: int = 5) -> list[float]:
  """Seconds of each of ``reps`` runs of one collective of ``nbytes`` per node (after a warm-up)."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  D = mesh.shape["workers"]
  n = max(int(nbytes) // 4, 1)
  x = jax.make_array_from_callback(
    (D * n,), NamedSharding(mesh, P("workers")), lambda idx: np.ones(n, np.float32)
  )
  fn = collective_program(kind, mesh)
  jax.block_until_ready(fn(x))
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(x))
    out.append(time.perf_counter() - t)
  return out


def fit_alpha_beta(sizes, times, m: int) -> tuple[float, float]:
  r"""Least-squares (α, β) of the ring all-reduce model from measured (bytes, seconds) pairs.

  .. math:: T(S) = 2(m-1)\,\alpha + 2\tfrac{m-1}{m}\,\beta\, S .

  Returns:
    ``(alpha, beta)`` in seconds and seconds per byte (α clipped at 0).
  """
  S = np.asarray(sizes, np.float64)
  T = np.asarray(times, np.float64)
  A = np.stack([np.full_like(S, 2.0 * (m - 1)), 2.0 * (m - 1) / m * S], 1)
  (alpha, beta), *_ = np.linalg.lstsq(A, T, rcond=None)
  return max(float(alpha), 0.0), float(beta)


def run_steps(step, X, state, batch_fn: Callable[[int], Any], steps: int, start: int = 0):
  """Runs ``steps`` steps, waiting for each; returns ``(X, state, seconds[steps], local_losses)``."""
  import jax

  times, losses = [], []
  for k in range(start, start + steps):
    batch = batch_fn(k)
    t = time.perf_counter()
    X, state, metrics = step(X, state, batch)
    jax.block_until_ready((X, state))
    loss = local_value(metrics["worker_loss"])
    times.append(time.perf_counter() - t)
    losses.append(float(np.mean(loss)))
  return X, state, np.asarray(times), np.asarray(losses)
