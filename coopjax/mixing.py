r"""Mixing: applying a mixing matrix to the stacked models.

The reference path is a dense einsum over the worker axis,

.. math::

   x_i^{\text{new}} = \sum_j W_{ji}\, x_j
   \quad\Longleftrightarrow\quad
   X^{\text{new}} = X W \text{ (paper layout, a column per node)},

written ``einsum("ji,j...->i...", W, x)`` on every leaf. Faster lowerings
(an all-reduce for ``W = J``, one collective-permute per circulant offset)
are tested against it.

Sharded meaning. Algorithms address rows only through the primitives of this
module (:func:`split_rows`, :func:`join_rows`, :func:`worker_mean`,
:func:`worker_sum`, :func:`permute`, :func:`group_mean`, :func:`mix_dense`,
the mixers from :func:`dense_mixer`; shape checks through
:func:`coopjax.workers.num_rows` count global rows). Under a sharded step (``coopjax.make_step(..., mesh=mesh)``) the
transformation runs inside ``jax.shard_map`` and sees, on each device, its
block of ``b = m / D`` worker rows followed by a replicated copy of the ``v``
auxiliary rows; a :class:`ShardContext` is then active and every primitive
takes its per-device meaning (:mod:`coopjax.collectives`):

* ``split_rows(X, m)`` splits the local block at ``b``; ``join_rows`` is local;
* ``worker_mean`` / ``worker_sum`` are one all-reduce (``lax.psum``) whose
  result is replicated;
* the mixer of ``W`` lowers to the cheapest collective: one all-reduce for
  ``W = J`` (or ``aI + cJ``), collective-permutes of the boundary rows for
  circulant and other sparse ``W`` (ring, torus, hypercube, exponential),
  an all-reduce of the workers' rows into replicated auxiliaries (EASGD),
  and an all-gather with the dense einsum for any other ``W``;
* ``permute`` and ``group_mean`` are the same sparse lowering of their
  matrices (no traffic when every group or pair lies within one device).

Only call them inside the mixing branch of a ``lax.cond`` when they should
cost nothing on off-steps: outside a branch a collective runs every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coopjax import workers
from coopjax.parallel import collectives
from coopjax.parallel import context
from coopjax.parallel.context import ShardContext
from coopjax.workers import sum_rows

PyTree = Any
Mixer = Callable[[PyTree], PyTree]

__all__ = [
  "Mixer",
  "mix_dense",
  "dense_mixer",
  "split_rows",
  "join_rows",
  "worker_mean",
  "worker_sum",
  "permute",
  "group_mean",
  "global_rows",
  "to_global_rows",
  "ShardContext",
  "shard_context",
  "sharded",
]


shard_context = context.current
sharded = context.sharded
to_global_rows = context.to_global_rows


def global_rows(tree: PyTree, name: str = "X") -> int:
  """The global leading-axis size of ``tree`` (``m`` or ``m + v``), sharded or not.

  Same as :func:`coopjax.workers.num_rows`, which counts rows globally inside
  a sharded step (:func:`to_global_rows`).
  """
  return workers.num_rows(tree, name)


einsum = collectives.einsum


def mix_dense(X: PyTree, W: jax.Array | np.ndarray) -> PyTree:
  """Returns ``X·W``: row i becomes ``Σ_j W[j, i] X[j]`` on every leaf.

  In a sharded step: all-gather of the workers' rows, then the einsum for this
  device's columns of W (the fallback for any W, also a traced one).
  """
  ctx = shard_context()
  if ctx is not None:
    return collectives.mix_gathered(X, W, ctx)

  def mix_leaf(x):
    w = jnp.asarray(W, dtype=x.dtype)
    return einsum("ji,j...->i...", w, x)

  return jax.tree.map(mix_leaf, X)


def dense_mixer(W: np.ndarray) -> Mixer:
  """A mixer that applies ``W`` with the dense einsum.

  In a sharded step it applies ``W`` with the cheapest collective instead
  (:func:`coopjax.collectives.lower`); the result is the same up to rounding.
  """
  W = np.asarray(W)

  def mix(X):
    ctx = shard_context()
    if ctx is not None:
      return collectives.lower(W, ctx)(X)
    return mix_dense(X, W)

  return mix


def split_rows(X: PyTree, num_workers: int) -> tuple[PyTree, PyTree]:
  """Splits X into ``(workers, aux)``: rows ``[:m]`` and ``[m:]`` of every leaf.

  Algorithms address rows only through :func:`split_rows`, :func:`join_rows`,
  :func:`worker_mean` and :func:`worker_sum` (and the mixers), so that the
  sharded execution path can give these a per-device meaning.
  """
  ctx = shard_context()
  if ctx is not None:
    if num_workers != ctx.num_workers:
      raise ValueError(
        f"split_rows got num_workers={num_workers} inside a sharded step over "
        f"{ctx.num_workers} workers."
      )
    num_workers = ctx.block
  return (
    jax.tree.map(lambda x: x[:num_workers], X),
    jax.tree.map(lambda x: x[num_workers:], X),
  )


def join_rows(workers: PyTree, aux: PyTree) -> PyTree:
  """Inverse of :func:`split_rows`: stacks worker rows then auxiliary rows."""
  return jax.tree.map(lambda w, a: jnp.concatenate([w, a.astype(w.dtype)], axis=0), workers, aux)


def worker_mean(workers: PyTree) -> PyTree:
  """Mean over all workers' rows (leading axis), e.g. ``x̄ = (1/m) Σ_i x_i``.

  :func:`worker_sum` divided by the number of workers m.
  """
  ctx = shard_context()
  sums = worker_sum(workers)
  if ctx is not None:
    return jax.tree.map(lambda s: s / jnp.asarray(ctx.num_workers, s.dtype), sums)
  return jax.tree.map(lambda x, s: s / jnp.asarray(x.shape[0], s.dtype), workers, sums)


def worker_sum(workers: PyTree) -> PyTree:
  """Sum over all workers' rows (leading axis), e.g. ``Σ_i x_i``.

  Rows are added pairwise (:func:`coopjax.workers.sum_rows`), never reduced
  over the leading axis, which XLA's CPU backend does tens of times more
  slowly; in a sharded step each device adds its own rows and one all-reduce
  adds the devices' sums.
  """
  ctx = shard_context()
  if ctx is not None:
    return collectives.worker_sum(jax.tree.map(lambda x: sum_rows(x)[None], workers), ctx)
  return jax.tree.map(sum_rows, workers)


def permute(workers: PyTree, source) -> PyTree:
  """Row ``i`` becomes row ``source[i]``: ``x_i ← x_{source[i]}`` on every leaf.

  ``source`` is a static sequence of m row indices (a permutation, e.g. a
  shift ``source[i] = (i − s) mod m`` or a matching's involution). The plain
  implementation gathers rows; a sharded path lowers it to one
  collective-permute with pairs ``(source[i], i)``.
  """
  src = np.asarray(source, dtype=np.int64)
  if src.ndim != 1 or sorted(src.tolist()) != list(range(len(src))):
    raise ValueError(f"source must be a permutation of 0..m-1, got {list(src)}.")
  ctx = shard_context()
  if ctx is not None:
    A = np.zeros((len(src), len(src)))
    A[src, np.arange(len(src))] = 1.0
    return collectives.apply_worker_matrix(workers, A, ctx)

  def leaf(x):
    if x.shape[0] != len(src):
      raise ValueError(f"permute got {x.shape[0]} rows but source has {len(src)} entries.")
    return x[src]

  return jax.tree.map(leaf, workers)


def group_mean(workers: PyTree, groups) -> PyTree:
  r"""Every row becomes the mean of its group: ``x_i ← (1/|g|) Σ_{j ∈ g(i)} x_j``.

  ``groups`` is a static list of lists of row indices partitioning ``0..m-1``.
  The plain implementation is a segment sum. Contiguous equal groups
  ``[[0..s-1], [s..2s-1], …]`` map onto a 2-D mesh of shape
  ``(num_groups, s)`` (across hosts × within a host) on which the group mean is
  an all-reduce over the within-host axis only.
  """
  groups = [[int(i) for i in g] for g in groups]
  members = sorted(i for g in groups for i in g)
  m = len(members)
  if members != list(range(m)) or any(len(g) == 0 for g in groups):
    raise ValueError(f"groups must be non-empty lists partitioning 0..m-1, got {groups}.")
  ids = np.zeros(m, dtype=np.int32)
  for gi, g in enumerate(groups):
    ids[g] = gi
  sizes = np.array([len(g) for g in groups])
  ctx = shard_context()
  if ctx is not None:
    A = (ids[:, None] == ids[None, :]) / sizes[ids][None, :]
    return collectives.apply_worker_matrix(workers, A, ctx)

  def leaf(x):
    if x.shape[0] != m:
      raise ValueError(f"group_mean got {x.shape[0]} rows but the groups cover {m} workers.")
    sums = jax.ops.segment_sum(x, ids, num_segments=len(groups))
    inv = jnp.asarray(1.0 / sizes, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return (sums * inv)[ids]

  return jax.tree.map(leaf, workers)
