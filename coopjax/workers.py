r"""The stacked-worker layout X = [x_1, ..., x_m, z_1, ..., z_v].

Every leaf of X carries a leading axis of size ``m + v``: rows ``0..m-1`` are
the workers' models, rows ``m..m+v-1`` the auxiliary variables (EASGD's
anchor). The averaged model of the paper is the mean over all rows,

.. math::

   u_k = X_k \frac{\mathbf 1_{m+v}}{m+v},

and the discrepancy among the models (the network error of Lemma 2) is the
consensus distance :math:`\|X_k (I - J)\|_F^2 = \sum_i \|x_i - u_k\|^2`
(:func:`coopjax.consensus_distance`).

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
  "sum_rows",
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


def replicate(params: PyTree, num_workers, num_aux: int = 0) -> PyTree:
  """Stacks ``m + v`` copies of ``params``: all models start at the same point u_1.

  Args:
    params: a pytree of arrays, one model.
    num_workers: the transformation (``tx.layout`` gives m and v), a
      :class:`Layout`, or m as an int.
    num_aux: v, the number of auxiliary variables (1 for EASGD's anchor), with
      an int ``num_workers`` (a layout or transformation already knows it).

  Returns:
    X, the same pytree with a leading axis of size ``m + v`` on every leaf.

  Examples:
    >>> import jax.numpy as jnp, coopjax
    >>> X = coopjax.replicate({"w": jnp.zeros(3)}, coopjax.Layout(num_workers=4, num_aux=1))
    >>> X["w"].shape
    (5, 3)
  """
  if isinstance(getattr(num_workers, "layout", num_workers), Layout):
    layout = layout_of(num_workers, None if num_aux == 0 else num_aux)
  else:
    layout = Layout(check_int("num_workers", num_workers, 1), check_int("num_aux", num_aux, 0))
  for leaf in _leaves(params, "params"):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
        f"params has a leaf of dtype {leaf.dtype}; model parameters must be floating point."
      )
  n = layout.num_rows
  return jax.tree.map(lambda p: jnp.broadcast_to(jnp.asarray(p), (n, *jnp.shape(p))), params)


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


def sum_rows(x: jax.Array) -> jax.Array:
  r"""``Σ_i x[i]`` over the leading axis, as a pairwise sum of row blocks.

  The same value as ``jnp.sum(x, axis=0)`` up to rounding, written as
  elementwise additions of row slices (``x[:h] + x[h:]``, then the rows
  left): XLA's CPU backend reduces over a small leading axis tens of times
  more slowly than it adds rows, and accelerators add rows at full bandwidth
  too. Floating-point inputs below 32 bits are summed in float32.

  Examples:
    >>> import jax.numpy as jnp, coopjax
    >>> coopjax.workers.sum_rows(jnp.arange(6.0).reshape(3, 2)).tolist()
    [6.0, 9.0]
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("sum_rows needs an array with a leading axis.")
  dtype = x.dtype
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    x = x.astype(jnp.float32)
  n = x.shape[0]
  if n == 0:
    return jnp.zeros(x.shape[1:], dtype)
  while n > 1 and n % 2 == 0:
    n //= 2
    x = x[:n] + x[n:]
  rows = [x[i] for i in range(n)]
  while len(rows) > 1:
    pairs = [rows[i] + rows[i + 1] for i in range(0, len(rows) - 1, 2)]
    rows = pairs + rows[len(pairs) * 2 :]
  # A reduction over one row: free (XLA makes it a reshape), and it keeps a reduce_sum in
  # the jaxpr, where tools that read programs look for reductions over the workers.
  return jnp.sum(rows[0][None], axis=0).astype(dtype)


def average(X: PyTree, num_aux=None, *, workers_only: bool = False) -> PyTree:
  r"""The averaged model :math:`u_k = X_k \mathbf 1/(m+v)` (paper eq. 13).

  Args:
    X: stacked models, leading axis ``m + v``.
    num_aux: the transformation (``tx.layout``), a :class:`Layout`, or v as an
      int (the auxiliary rows are the last rows of X). Needed with
      ``workers_only``: X alone does not say which rows are auxiliary.
    workers_only: if True, average the m workers only, excluding auxiliaries.

  Returns:
    The averaged model, one row's pytree.

  Examples:
    >>> import jax.numpy as jnp, coopjax
    >>> X = {"w": jnp.array([[1.0], [3.0], [8.0]])}  # two workers and an anchor
    >>> coopjax.average(X)["w"].tolist()
    [4.0]
    >>> coopjax.average(X, coopjax.Layout(2, num_aux=1), workers_only=True)["w"].tolist()
    [2.0]
  """
  n = num_rows(X)
  if num_aux is None:
    if workers_only:
      raise ValueError(
        "average(X, workers_only=True) needs to know which rows are auxiliary (EASGD's "
        "anchor): pass the transformation or a coopjax.Layout, e.g. "
        "coopjax.average(X, tx, workers_only=True) (or num_aux=0 when X has none)."
      )
    v = 0
  elif isinstance(getattr(num_aux, "layout", num_aux), Layout):
    layout = layout_of(num_aux)
    if layout.num_rows != n:
      raise ValueError(
        f"X has {n} rows but the layout has {layout.num_workers} workers + {layout.num_aux} "
        "auxiliary rows."
      )
    v = layout.num_aux
  else:
    v = check_int("num_aux", num_aux, 0)
  if v >= n:
    raise ValueError(f"num_aux={v} leaves no worker rows in X (leading axis {n}).")
  stop = n - v if workers_only else n
  return jax.tree.map(lambda x: sum_rows(x[:stop]) / jnp.asarray(stop, x.dtype), X)
