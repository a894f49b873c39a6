r"""The stacked-worker layout X = [x_1, ..., x_m, z_1, ..., z_v].

Every leaf of X carries a leading axis of size ``m + v``: rows ``0..m-1`` are
the workers' models, rows ``m..m+v-1`` the auxiliary variables (EASGD's
anchor). The averaged model of the paper is the mean over all rows,

.. math::

   u_k = X_k \frac{\mathbf 1_{m+v}}{m+v},

and the discrepancy among the models (the network error of Lemma 2) is the
consensus distance :math:`\|X_k (I - J)\|_F^2 = \sum_i \|x_i - u_k\|^2`.

Flax models stack the same way, since their parameters are plain pytrees.
With linen::

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import coopjax
  >>> model = nn.Dense(3)
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 2)))
  >>> X = coopjax.replicate(params, num_workers=4)
  >>> X["params"]["kernel"].shape
  (4, 2, 3)
  >>> y = jax.vmap(model.apply, in_axes=(0, None))(X, jnp.ones((1, 2)))
  >>> y.shape
  (4, 1, 3)

With NNX, ``nnx.split`` gives the graph definition and a state pytree; stack the
state and ``nnx.merge`` one row back into a module when needed::

  >>> from flax import nnx
  >>> net = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> graphdef, state = nnx.split(net)
  >>> X = coopjax.replicate(state, num_workers=4)
  >>> def loss_fn(state, batch):
  ...   return jnp.mean(nnx.merge(graphdef, state)(batch["x"]) ** 2)
  >>> losses = jax.vmap(loss_fn)(X, {"x": jnp.ones((4, 5, 2))})
  >>> losses.shape
  (4,)
  >>> worker0 = nnx.merge(graphdef, coopjax.worker(X, 0))
  >>> worker0(jnp.ones((1, 2))).shape
  (1, 3)

Differently initialised workers come from :func:`stack` over a list of pytrees.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from coopjax._validation import check_int
from coopjax.parallel import context

PyTree = Any

__all__ = [
  "WORKER_AXIS",
  "Layout",
  "layout_of",
  "replicate",
  "stack",
  "worker",
  "average",
  "consensus_distance",
  "num_rows",
  "check_stacked",
]

WORKER_AXIS = "workers"
"""Name of the worker axis in meshes and collectives."""


class Layout(NamedTuple):
  """How the rows of X are laid out: ``m`` worker rows, then ``v`` auxiliary rows.

  Every coopjax transformation carries its layout (``tx.layout``), so the
  functions that need m and v (:func:`replicate`, :func:`average`,
  :func:`coopjax.shard`, …) can take them from the transformation.

  Attributes:
    num_workers: m, the number of workers.
    num_aux: v, the number of auxiliary variables (1 for EASGD's anchor).

  Examples:
    >>> import coopjax
    >>> layout = coopjax.Layout(num_workers=4, num_aux=1)
    >>> layout.num_rows
    5
  """

  num_workers: int
  num_aux: int = 0

  @property
  def num_rows(self) -> int:
    """``m + v``, the leading-axis size of every leaf of X."""
    return self.num_workers + self.num_aux


def layout_of(spec, num_aux: int | None = None) -> Layout:
  """The :class:`Layout` described by ``spec``.

  Args:
    spec: a :class:`Layout`, anything with a ``layout`` attribute (every coopjax
      transformation), or the number of workers m as an int.
    num_aux: v, only with an int ``spec`` (default 0); with a layout or a
      transformation it must be None or agree with it.

  Returns:
    The layout.

  Examples:
    >>> import coopjax
    >>> coopjax.layout_of(4, num_aux=1)
    Layout(num_workers=4, num_aux=1)
  """
  layout = getattr(spec, "layout", spec)
  if isinstance(layout, Layout):
    if num_aux is not None and int(num_aux) != layout.num_aux:
      raise ValueError(
        f"num_aux={num_aux} disagrees with the layout's {layout.num_aux} auxiliary rows; drop "
        "num_aux: the transformation knows it."
      )
    return layout
  if isinstance(spec, bool) or not isinstance(spec, numbers.Integral):
    raise TypeError(
      f"expected a coopjax transformation, a coopjax.Layout or the number of workers (int), got "
      f"{spec!r} of type {type(spec).__name__}."
    )
  m = check_int("num_workers", spec, 1)
  v = check_int("num_aux", 0 if num_aux is None else num_aux, 0)
  return Layout(m, v)


def _leaves(tree: PyTree, name: str) -> list:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{name} has no array leaves; pass a pytree of arrays (model parameters).")
  for leaf in leaves:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(
        f"{name} has a leaf of type {type(leaf).__name__}; every leaf must be an array."
      )
  return leaves


def replicate(params: PyTree, num_workers: int, num_aux: int = 0) -> PyTree:
  """Stacks ``m + v`` copies of ``params``: all models start at the same point u_1.

  Args:
    params: a pytree of arrays, one model.
    num_workers: m, the number of workers.
    num_aux: v, the number of auxiliary variables (1 for EASGD's anchor).

  Returns:
    X, the same pytree with a leading axis of size ``m + v`` on every leaf.
  """
  m = check_int("num_workers", num_workers, 1)
  v = check_int("num_aux", num_aux, 0)
  for leaf in _leaves(params, "params"):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
        f"params has a leaf of dtype {leaf.dtype}; model parameters must be floating point."
      )
  return jax.tree.map(lambda p: jnp.broadcast_to(jnp.asarray(p), (m + v, *jnp.shape(p))), params)


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Stacks a list of same-structured pytrees along a new leading axis."""
  if len(trees) == 0:
    raise ValueError("stack needs at least one pytree.")
  structs = {jax.tree.structure(t) for t in trees}
  if len(structs) != 1:
    raise ValueError("stack needs pytrees of identical structure (the same model).")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def worker(X: PyTree, i: int) -> PyTree:
  """Row ``i`` of X: worker i's model (or an auxiliary variable for i >= m)."""
  return jax.tree.map(lambda x: x[i], X)


def num_rows(X: PyTree, name: str = "X") -> int:
  """The common leading-axis size ``m + v`` of X, with a clear error if leaves disagree."""
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in _leaves(X, name)}
  if None in sizes:
    raise ValueError(f"{name} has a scalar leaf; every leaf needs the leading worker axis.")
  if len(sizes) != 1:
    raise ValueError(
      f"{name} leaves have different leading-axis sizes {sorted(sizes)}; every leaf must "
      "be stacked over the same m + v rows (use coopjax.replicate)."
    )
  return context.to_global_rows(sizes.pop())  # inside a sharded step: the global count


def check_stacked(X: PyTree, rows: int, name: str = "X") -> None:
  """Raises ValueError unless every leaf of X has leading axis ``rows``."""
  n = num_rows(X, name)
  if n != rows:
    raise ValueError(
      f"{name} has leading axis {n} but this algorithm has {rows} rows (num_workers + num_aux); "
      f"build it with coopjax.replicate(params, num_workers, num_aux) to match."
    )


def average(X: PyTree, num_aux: int = 0, *, workers_only: bool = False) -> PyTree:
  r"""The averaged model :math:`u_k = X_k \mathbf 1/(m+v)` (paper eq. 13).

  Args:
    X: stacked models, leading axis ``m + v``.
    num_aux: v, the number of auxiliary rows (last rows of X).
    workers_only: if True, average the m workers only, excluding auxiliaries.
  """
  v = check_int("num_aux", num_aux, 0)
  n = num_rows(X)
  if v >= n:
    raise ValueError(f"num_aux={v} leaves no worker rows in X (leading axis {n}).")
  stop = n - v if workers_only else n
  return jax.tree.map(lambda x: jnp.mean(x[:stop], axis=0), X)


def consensus_distance(X: PyTree) -> jax.Array:
  r"""Consensus distance :math:`\|X (I - J)\|_F^2 = \sum_i \|x_i - u\|^2` over all leaves.

  ``u`` is the mean over all ``m + v`` rows. Zero iff all rows are equal.
  """
  num_rows(X)

  def leaf_sq(x):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)))

  return sum(jax.tree.leaves(jax.tree.map(leaf_sq, X)), start=jnp.zeros((), jnp.float32))
