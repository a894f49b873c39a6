r"""Mixing: applying a mixing matrix to the stacked models.

The reference path is a dense einsum over the worker axis,

.. math::

   x_i^{\text{new}} = \sum_j W_{ji}\, x_j
   \quad\Longleftrightarrow\quad
   X^{\text{new}} = X W \text{ (paper layout, a column per node)},

written ``einsum("ji,j...->i...", W, x)`` on every leaf. Faster lowerings
(an all-reduce for ``W = J``, one collective-permute per circulant offset)
are tested against it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
]


def mix_dense(X: PyTree, W: jax.Array | np.ndarray) -> PyTree:
  """Returns ``X·W``: row i becomes ``Σ_j W[j, i] X[j]`` on every leaf."""

  def mix_leaf(x):
    w = jnp.asarray(W, dtype=x.dtype)
    return jnp.einsum("ji,j...->i...", w, x)

  return jax.tree.map(mix_leaf, X)


def dense_mixer(W: np.ndarray) -> Mixer:
  """A mixer that applies ``W`` with the dense einsum."""
  W = np.asarray(W)
  return lambda X: mix_dense(X, W)


def split_rows(X: PyTree, num_workers: int) -> tuple[PyTree, PyTree]:
  """Splits X into ``(workers, aux)``: rows ``[:m]`` and ``[m:]`` of every leaf.

  Algorithms address rows only through :func:`split_rows`, :func:`join_rows`,
  :func:`worker_mean` and :func:`worker_sum` (and the mixers), so that the
  sharded execution path can give these a per-device meaning.
  """
  return (
    jax.tree.map(lambda x: x[:num_workers], X),
    jax.tree.map(lambda x: x[num_workers:], X),
  )


def join_rows(workers: PyTree, aux: PyTree) -> PyTree:
  """Inverse of :func:`split_rows`: stacks worker rows then auxiliary rows."""
  return jax.tree.map(lambda w, a: jnp.concatenate([w, a.astype(w.dtype)], axis=0), workers, aux)


def worker_mean(workers: PyTree) -> PyTree:
  """Mean over all workers' rows (leading axis), e.g. ``x̄ = (1/m) Σ_i x_i``."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), workers)


def worker_sum(workers: PyTree) -> PyTree:
  """Sum over all workers' rows (leading axis), e.g. ``Σ_i x_i``."""
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), workers)


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

  def leaf(x):
    if x.shape[0] != m:
      raise ValueError(f"group_mean got {x.shape[0]} rows but the groups cover {m} workers.")
    sums = jax.ops.segment_sum(x, ids, num_segments=len(groups))
    inv = jnp.asarray(1.0 / sizes, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return (sums * inv)[ids]

  return jax.tree.map(leaf, workers)
