r"""The sharded worker axis: meshes and placement.

The m workers are spread over the D devices of the mesh axis
``coopjax.WORKER_AXIS`` (``"workers"``), ``b = m / D`` consecutive workers per
device (m any multiple of D; one real GPU runs all m workers with D = 1).

Sharded representation of X. Each device holds its b workers' rows followed
by a copy of the v auxiliary rows (EASGD's anchor), so the global array has
``D·(b + v)`` rows, sharded along the first axis with
``NamedSharding(mesh, P("workers"))``:

.. math::

   X_{\text{sharded}} = [\underbrace{x_1..x_b, z_1..z_v}_{\text{device }0},\;
                         \underbrace{x_{b+1}..x_{2b}, z_1..z_v}_{\text{device }1},\; \dots]

With ``v = 0`` this is exactly the unsharded layout ``[x_1..x_m]``. The copies
of the auxiliaries are updated identically on every device (the reductions
that feed them are all-reduces). :func:`shard` and :func:`unshard` convert
between the two layouts; batches are ``[m, ...]`` sharded the same way
(:func:`shard_batch`). The optimizer state made by :func:`init` holds the
per-worker leaves sharded and the rest (the step counter) replicated.

The layout (m and v) is given once, by the transformation: :func:`shard`,
:func:`unshard` and :func:`init` take it from ``tx`` (or a
:class:`coopjax.Layout`). The step (``coopjax.make_step(loss_fn, tx, mesh=mesh)``,
:mod:`coopjax.step`) runs entirely inside one ``jax.shard_map``: every device computes its own workers' gradients and
local updates with no cross-device traffic, and the mixing primitives of
:mod:`coopjax.mixing` lower to collectives inside the ``lax.cond`` branch of
mixing steps (:mod:`coopjax.collectives`), so off-steps move no data.

  >>> import jax, jax.numpy as jnp, optax, coopjax
  >>> mesh = coopjax.worker_mesh()
  >>> m = 2 * len(jax.devices())
  >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=m)
  >>> X = coopjax.shard(coopjax.replicate({"w": jnp.zeros(3)}, tx), mesh, tx)
  >>> opt_state = coopjax.sharding.init(tx, X, mesh)
  >>> loss_fn = lambda p, batch: jnp.mean((batch @ p["w"] - 1.0) ** 2)
  >>> step = coopjax.make_step(loss_fn, tx, mesh=mesh)
  >>> batch = coopjax.shard_batch(jnp.ones((m, 4, 3)), mesh)
  >>> X, opt_state, metrics = step(X, opt_state, batch)
  >>> metrics["worker_loss"].shape == (m,)
  True
  >>> coopjax.unshard(X, mesh, tx)["w"].shape == (m, 3)
  True
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from coopjax import mixing
from coopjax._validation import check_int
from coopjax.mixing import ShardContext
from coopjax.workers import WORKER_AXIS
from coopjax.workers import Layout
from coopjax.workers import layout_of
from coopjax.workers import num_rows

PyTree = Any

__all__ = [
  "worker_mesh",
  "num_devices",
  "worker_sharding",
  "shard",
  "unshard",
  "shard_batch",
  "init",
]


# The shard_maps below run with check_vma=False: the transformations' lax.cond branches may
# return a reduced (device-invariant) value in one branch and a per-device value in the other
# (a global mean vs a group mean), which the varying-axes type check rejects. Outputs declared
# replicated (P()) are those every device computes identically: results of all-reduces and of
# replicated inputs.


def worker_mesh(num_devices: int | None = None, devices=None) -> Mesh:
  """A 1-D mesh over ``num_devices`` devices (default: all) with axis ``"workers"``."""
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}.")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (WORKER_AXIS,), axis_types=(AxisType.Auto,))


def auto_mesh(mesh) -> Mesh:
  """The same devices and axes with Auto axis types (``jax.make_mesh`` defaults to Explicit)."""
  if not isinstance(mesh, Mesh):
    raise TypeError(
      f"mesh must be a jax.sharding.Mesh (jax.make_mesh or coopjax.worker_mesh), got "
      f"{type(mesh).__name__}."
    )
  if WORKER_AXIS not in mesh.axis_names:
    raise ValueError(
      f"mesh has axes {mesh.axis_names} but no {WORKER_AXIS!r} axis to shard the workers "
      f"over; build it with jax.make_mesh((D,), ({WORKER_AXIS!r},))."
    )
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def num_devices(mesh: Mesh) -> int:
  """D, the size of the mesh's worker axis."""
  return int(auto_mesh(mesh).shape[WORKER_AXIS])


def worker_sharding(mesh: Mesh) -> NamedSharding:
  """``NamedSharding(mesh, P("workers"))``: the leading axis split over the workers."""
  return NamedSharding(auto_mesh(mesh), P(WORKER_AXIS))


def _put(host: np.ndarray, mesh: Mesh):
  """A global array from a host array that every process holds in full."""
  sharding = worker_sharding(mesh)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _blocks(m: int, D: int) -> int:
  if m % D:
    raise ValueError(
      f"m={m} workers cannot be split evenly over the {D} devices of the mesh; use a multiple "
      f"of {D} (several workers per device are fine)."
    )
  return m // D


def _layout_arg(layout, num_aux) -> tuple[int | None, int | None]:
  """``(m, v)`` from a placement function's layout argument; None where it is not given.

  ``layout`` is a coopjax transformation or a :class:`coopjax.Layout` (both give
  m and v), or, as in earlier releases, an int taken as ``num_aux``.
  """
  if layout is None:
    return None, None if num_aux is None else check_int("num_aux", num_aux, 0)
  if isinstance(layout, numbers.Integral) and not isinstance(layout, bool):
    if num_aux is not None and int(num_aux) != int(layout):
      raise ValueError(f"num_aux given twice: {layout} and num_aux={num_aux}.")
    return None, check_int("num_aux", layout, 0)
  if not isinstance(getattr(layout, "layout", layout), Layout):
    raise TypeError(
      f"layout must be a coopjax transformation (which knows m and v) or a coopjax.Layout, got "
      f"{type(layout).__name__}."
    )
  spec = layout_of(layout, num_aux)
  return spec.num_workers, spec.num_aux


def shard(X: PyTree, mesh: Mesh, layout=None, *, num_aux: int | None = None) -> PyTree:
  r"""Places X (``[m + v, ...]`` rows, auxiliaries last) in the sharded representation.

  Device d of the D devices receives its block of ``b = m / D`` workers and a
  copy of the v auxiliary rows:

  .. math::

     [x_1..x_m, z_1..z_v] \mapsto
     [x_{db+1}..x_{db+b}, z_1..z_v]_{d = 0..D-1}.

  Args:
    X: stacked models, e.g. from :func:`coopjax.replicate`.
    mesh: a mesh with a ``"workers"`` axis of D devices (m a multiple of D).
    layout: the transformation (``tx.layout`` gives m and v) or a
      :class:`coopjax.Layout`. Without it X is taken to have no auxiliary
      rows; an int is read as ``num_aux`` (the earlier call form).
    num_aux: v, the number of auxiliary rows (1 for EASGD), when no layout
      is given.

  Returns:
    X with ``D·(b + v)`` rows per leaf, device d holding ``[x_{db+1}..x_{db+b}, z]``.

  Examples:
    >>> import jax, jax.numpy as jnp, coopjax
    >>> mesh = coopjax.worker_mesh()
    >>> D = len(jax.devices())
    >>> layout = coopjax.Layout(num_workers=2 * D, num_aux=1)
    >>> Xs = coopjax.shard(coopjax.replicate({"w": jnp.zeros(3)}, layout), mesh, layout)
    >>> Xs["w"].shape == (D * 3, 3)  # b = 2 workers and the anchor's copy per device
    True
  """
  D = num_devices(mesh)
  n = num_rows(X)
  m, v = _layout_arg(layout, num_aux)
  if m is not None and n != m + v:
    raise ValueError(
      f"X has {n} rows but the layout has {m} workers + {v} auxiliary rows; build X with "
      "coopjax.replicate(params, tx) for the same transformation."
    )
  if m is None and v is None:
    v = 0
    if n % D:
      raise ValueError(
        f"X has {n} rows, which cannot be split evenly over the {D} devices of the mesh. If X "
        "has auxiliary rows (EASGD's anchor), pass the transformation or a coopjax.Layout: "
        f"coopjax.shard(X, mesh, tx); otherwise use a multiple of {D} workers (several "
        "workers per device are fine)."
      )
  if n - v < 1:
    raise ValueError(f"num_aux={v} leaves no worker rows in X ({n} rows).")
  b = _blocks(n - v, D)

  def leaf(x):
    x = _host(x)
    if v == 0:
      return _put(x, mesh)
    workers = x[: n - v].reshape((D, b) + x.shape[1:])
    aux = np.broadcast_to(x[n - v :], (D, v) + x.shape[1:])
    return _put(np.concatenate([workers, aux], axis=1).reshape((D * (b + v),) + x.shape[1:]), mesh)

  return jax.tree.map(leaf, X)


def unshard(X: PyTree, mesh: Mesh, layout=None, *, num_aux: int | None = None) -> PyTree:
  """Inverse of :func:`shard`: ``[m + v, ...]`` rows (auxiliaries from device 0's copy).

  Args:
    X: X in the sharded representation (from :func:`shard` or the step).
    mesh: the mesh X is sharded over.
    layout: the transformation or a :class:`coopjax.Layout` (an int is read
      as ``num_aux``). Needed whenever a device holds more than one row: X
      alone does not say which rows are workers and which are copies of the
      auxiliaries.
    num_aux: v, when no layout is given.

  Returns:
    X with ``m + v`` rows on every leaf.
  """
  D = num_devices(mesh)
  rows = num_rows(X)
  m, v = _layout_arg(layout, num_aux)
  if v is None:
    if rows != D:
      raise ValueError(
        f"unshard needs the layout of X: its {rows} rows on {D} devices are each device's "
        "workers followed by its copy of the auxiliary rows (EASGD's anchor), and X alone "
        "does not say how many of those there are. Pass the transformation or a "
        "coopjax.Layout: coopjax.unshard(X, mesh, tx) (or num_aux=0 when X has no auxiliary "
        "rows)."
      )
    v = 0
  if rows % D or rows // D <= v or (m is not None and rows != D * (m // D + v)):
    raise ValueError(
      f"X has {rows} rows, not D*(b+v) for D={D} devices and num_aux={v}; was it made by "
      "coopjax.shard with the same mesh and transformation?"
    )

  def leaf(x):
    x = _host(x)
    blocks = x.reshape((D, rows // D) + x.shape[1:])
    workers = blocks[:, : rows // D - v].reshape((-1,) + x.shape[1:])
    return jnp.asarray(np.concatenate([workers, blocks[0, rows // D - v :]], axis=0))

  return jax.tree.map(leaf, X)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Places per-worker data (leading axis m) on the devices of their workers."""
  D = num_devices(mesh)

  def leaf(x):
    x = _host(x)
    _blocks(x.shape[0], D)
    return _put(x, mesh)

  return jax.tree.map(leaf, batch)


def context_for(mesh: Mesh, num_workers: int, num_aux: int) -> ShardContext:
  D = num_devices(mesh)
  _blocks(num_workers, D)
  return ShardContext(WORKER_AXIS, D, int(num_workers), int(num_aux))


def local_shapes(fn: Callable, mesh: Mesh, ctx: ShardContext, *args) -> PyTree:
  """Per-device output shapes of ``fn(*local_args)`` run under ``ctx`` (traced, not run)."""

  def body(*local):
    with mixing.sharded(ctx):
      out = fn(*local)
    return jax.tree.map(lambda y: jnp.expand_dims(y, 0), out)

  spec = P(WORKER_AXIS)
  mapped = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), jax.eval_shape(mapped, *args)
  )


def spec_of(local_shape, global_shape) -> P:
  return P() if tuple(local_shape) == tuple(global_shape) else P(WORKER_AXIS)


def struct(X: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), X)


def split_counts(X: PyTree, D: int, num_workers: int) -> tuple[int, int]:
  rows = num_rows(X, "X")
  b = _blocks(num_workers, D)
  if rows % D or rows // D < b:
    raise ValueError(
      f"X has {rows} rows but a sharded step over {num_workers} workers on {D} devices needs "
      f"D*(b+v) = {D}*({b}+v) rows; build it with coopjax.shard(X, mesh, tx)."
    )
  return b, rows // D - b


def init(tx: optax.GradientTransformation, X: PyTree, mesh: Mesh, num_aux: int | None = None):
  """``tx.init`` in the sharded representation.

  Leaves with one row per worker (the local optimizer's state) are sharded
  over the workers; leaves that are the same on every device (the step
  counter, a replicated outer model) are replicated.

  Args:
    tx: a coopjax transformation; its layout (``tx.layout``) gives v.
    X: X in the sharded representation (:func:`shard`).
    mesh: the mesh X is sharded over.
    num_aux: v, the number of auxiliary rows of X, for a transformation that
      does not carry its layout (e.g. inside ``optax.chain``); default 0.

  Returns:
    The optimizer state, placed on the mesh.
  """
  mesh = auto_mesh(mesh)
  D = num_devices(mesh)
  layout = getattr(tx, "layout", None)
  m, v = _layout_arg(layout if isinstance(layout, Layout) else None, num_aux)
  v = 0 if v is None else v
  rows = num_rows(X, "X")
  if rows % D or rows // D <= v or (m is not None and rows != D * (m // D + v)):
    raise ValueError(
      f"X has {rows} rows, not D*(b+v) for D={D} and num_aux={v}; shard it with "
      "coopjax.shard(X, mesh, tx) first."
    )
  b = rows // D - v
  ctx = context_for(mesh, D * b, v)
  X = jax.tree.map(lambda x: jax.device_put(x, worker_sharding(mesh)), X)
  local = local_shapes(tx.init, mesh, ctx, struct(X))
  unsharded = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((D * b + v,) + x.shape[1:], x.dtype), struct(X)
  )
  reference = jax.eval_shape(tx.init, unsharded)
  specs = jax.tree.map(lambda loc, ref: spec_of(loc.shape, ref.shape), local, reference)

  def body(X_local):
    with mixing.sharded(ctx):
      return tx.init(X_local)

  mapped = jax.shard_map(body, mesh=mesh, in_specs=P(WORKER_AXIS), out_specs=specs, check_vma=False)
  return jax.jit(mapped)(X)


# Earlier private names, still used by scripts outside the package.
_auto_mesh = auto_mesh
_context = context_for
_local_shapes = local_shapes
