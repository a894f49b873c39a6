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

__all__ = ["Mixer", "mix_dense", "dense_mixer"]


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
