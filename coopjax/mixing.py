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
