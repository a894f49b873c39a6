r"""The sharded worker axis: meshes, placement, and the per-device step.

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

The step (``coopjax.make_step(loss_fn, tx, mesh=mesh)``) runs entirely inside
one ``jax.shard_map``: every device computes its own workers' gradients and
local updates with no cross-device traffic, and the mixing primitives of
:mod:`coopjax.mixing` lower to collectives inside the ``lax.cond`` branch of
mixing steps (:mod:`coopjax.collectives`), so off-steps move no data.

  >>> import jax, jax.numpy as jnp, optax, coopjax
  >>> mesh = coopjax.worker_mesh()
  >>> m = 2 * len(jax.devices())
  >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=m)
  >>> X = coopjax.shard(coopjax.replicate({"w": jnp.zeros(3)}, m), mesh)
  >>> opt_state = coopjax.sharding.init(tx, X, mesh)
  >>> loss_fn = lambda p, batch: jnp.mean((batch @ p["w"] - 1.0) ** 2)
  >>> step = coopjax.make_step(loss_fn, tx, mesh=mesh)
  >>> batch = coopjax.shard_batch(jnp.ones((m, 4, 3)), mesh)
  >>> X, opt_state, metrics = step(X, opt_state, batch)
  >>> metrics["worker_loss"].shape == (m,)
  True
  >>> coopjax.unshard(X, mesh)["w"].shape == (m, 3)
  True
"""

from __future__ import annotations

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
from coopjax.mixing import ShardContext
from coopjax.step import apply_transformation
from coopjax.step import split_value
from coopjax.workers import WORKER_AXIS
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
  "make_sharded_step",
  "consensus_distance",
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


def _auto_mesh(mesh) -> Mesh:
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
  return int(_auto_mesh(mesh).shape[WORKER_AXIS])


def worker_sharding(mesh: Mesh) -> NamedSharding:
  """``NamedSharding(mesh, P("workers"))``: the leading axis split over the workers."""
  return NamedSharding(_auto_mesh(mesh), P(WORKER_AXIS))


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


def shard(X: PyTree, mesh: Mesh, num_aux: int = 0) -> PyTree:
  """Places X (``[m + v, ...]`` rows, auxiliaries last) in the sharded representation.

  Args:
    X: stacked models, e.g. from :func:`coopjax.replicate`.
    mesh: a mesh with a ``"workers"`` axis of D devices (m a multiple of D).
    num_aux: v, the number of auxiliary rows (1 for EASGD).

  Returns:
    X with ``D·(b + v)`` rows per leaf, device d holding ``[x_{db+1}..x_{db+b}, z]``.
  """
  D = num_devices(mesh)
  n = num_rows(X)
  v = int(num_aux)
  b = _blocks(n - v, D)

  def leaf(x):
    x = _host(x)
    if v == 0:
      return _put(x, mesh)
    workers = x[: n - v].reshape((D, b) + x.shape[1:])
    aux = np.broadcast_to(x[n - v :], (D, v) + x.shape[1:])
    return _put(np.concatenate([workers, aux], axis=1).reshape((D * (b + v),) + x.shape[1:]), mesh)

  return jax.tree.map(leaf, X)


def unshard(X: PyTree, mesh: Mesh, num_aux: int = 0) -> PyTree:
  """Inverse of :func:`shard`: ``[m + v, ...]`` rows (auxiliaries from device 0's copy)."""
  D = num_devices(mesh)
  v = int(num_aux)

  def leaf(x):
    x = _host(x)
    rows = x.shape[0]
    if rows % D or rows // D <= v:
      raise ValueError(
        f"X has {rows} rows, not D*(b+v) for D={D} devices and num_aux={v}; was it made by "
        "coopjax.shard with the same mesh and num_aux?"
      )
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


def _context(mesh: Mesh, num_workers: int, num_aux: int) -> ShardContext:
  D = num_devices(mesh)
  _blocks(num_workers, D)
  return ShardContext(WORKER_AXIS, D, int(num_workers), int(num_aux))


def _local_shapes(fn: Callable, mesh: Mesh, ctx: ShardContext, *args) -> PyTree:
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


def _spec_of(local_shape, global_shape) -> P:
  return P() if tuple(local_shape) == tuple(global_shape) else P(WORKER_AXIS)


def _struct(X: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), X)


def _split_counts(X: PyTree, D: int, num_workers: int) -> tuple[int, int]:
  rows = num_rows(X, "X")
  b = _blocks(num_workers, D)
  if rows % D or rows // D < b:
    raise ValueError(
      f"X has {rows} rows but a sharded step over {num_workers} workers on {D} devices needs "
      f"D*(b+v) = {D}*({b}+v) rows; build it with coopjax.shard(X, mesh, num_aux)."
    )
  return b, rows // D - b


def init(tx: optax.GradientTransformation, X: PyTree, mesh: Mesh, num_aux: int = 0) -> PyTree:
  """``tx.init`` in the sharded representation.

  Leaves with one row per worker (the local optimizer's state) are sharded
  over the workers; leaves that are the same on every device (the step
  counter, a replicated outer model) are replicated.

  Args:
    tx: a coopjax transformation.
    X: X in the sharded representation (:func:`shard`).
    mesh: the mesh X is sharded over.
    num_aux: v, the number of auxiliary rows of X.

  Returns:
    The optimizer state, placed on the mesh.
  """
  mesh = _auto_mesh(mesh)
  D = num_devices(mesh)
  v = int(num_aux)
  rows = num_rows(X, "X")
  if rows % D or rows // D <= v:
    raise ValueError(
      f"X has {rows} rows, not D*(b+v) for D={D} and num_aux={v}; shard it with "
      "coopjax.shard(X, mesh, num_aux) first."
    )
  b = rows // D - v
  ctx = _context(mesh, D * b, v)
  X = jax.tree.map(lambda x: jax.device_put(x, worker_sharding(mesh)), X)
  local = _local_shapes(tx.init, mesh, ctx, _struct(X))
  unsharded = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((D * b + v,) + x.shape[1:], x.dtype), _struct(X)
  )
  reference = jax.eval_shape(tx.init, unsharded)
  specs = jax.tree.map(lambda loc, ref: _spec_of(loc.shape, ref.shape), local, reference)

  def body(X_local):
    with mixing.sharded(ctx):
      return tx.init(X_local)

  mapped = jax.shard_map(body, mesh=mesh, in_specs=P(WORKER_AXIS), out_specs=specs, check_vma=False)
  return jax.jit(mapped)(X)


def consensus_distance(X: PyTree, ctx: ShardContext) -> jax.Array:
  r"""``‖X(I − J)‖²_F`` over all m + v rows, from inside a sharded step (two all-reduces)."""
  b, v = ctx.block, ctx.num_aux
  n = ctx.num_workers + v
  f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))

  def leaf(x):
    x = f32(x)
    w, z = x[:b], x[b:]
    # Every device holds a copy of the auxiliaries: each adds 1/D of their share.
    D = ctx.num_devices
    u = jax.lax.psum(jnp.sum(w, 0) + jnp.sum(z, 0) / D, ctx.axis_name)[None] / n
    local = jnp.sum(jnp.square(w - u)) + jnp.sum(jnp.square(z - u)) / D
    return jax.lax.psum(local, ctx.axis_name)

  return sum(jax.tree.leaves(jax.tree.map(leaf, X)), start=jnp.zeros((), jnp.float32))


def _worker_grads(loss_fn, has_aux: bool, block: int):
  """Per-worker ``value_and_grad`` over the local block (no vmap for one worker per device)."""
  vg = jax.value_and_grad(loss_fn, has_aux=has_aux)
  if block != 1:
    return jax.vmap(vg)

  def one(X_w, batch):
    squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
    out = vg(squeeze(X_w), squeeze(batch))
    return jax.tree.map(lambda a: jnp.expand_dims(a, 0), out)

  return one


def make_sharded_step(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  num_workers: int | None = None,
  has_aux: bool = False,
  merge_aux: Callable[[Any, Any], Any] | None = None,
  with_consensus: bool = False,
  with_grad_norm: bool = False,
  with_loss: bool = False,
  donate: bool = False,
  jit: bool = True,
):
  r"""The cooperative step on a mesh: ``step(X, opt_state, batch) -> (X, opt_state, metrics)``.

  Same update as :func:`coopjax.make_step` without a mesh; X is in the sharded
  representation (:func:`shard`), ``opt_state`` from :func:`init`, ``batch``
  has leading axis m (:func:`shard_batch`). Everything runs inside one
  ``jax.shard_map``: gradients and local updates are per device; collectives
  appear only where the algorithm mixes (inside its ``lax.cond`` branch).

  Metrics. ``worker_loss`` (sharded, ``[m]``) and ``step`` always. The
  reductions over workers put an all-reduce on every step, so they are off
  unless asked for: ``loss`` (``with_loss``), ``consensus_distance``
  (``with_consensus``), ``avg_grad_norm`` (``with_grad_norm``). The mean loss
  is also ``jnp.mean(metrics["worker_loss"])`` at logging time.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` for one worker.
    tx: a coopjax transformation.
    mesh: a mesh with a ``"workers"`` axis (``jax.make_mesh`` or
      ``jax.sharding.Mesh``; Explicit axes are run as Auto).
    num_workers: m; checked against the batch when given.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is reported per worker.
    merge_aux: optional ``merge_aux(X_local, aux_local) -> X_local``.
    with_consensus: report ``‖X(I − J)‖²_F`` (two all-reduces per step).
    with_grad_norm: report ``‖(1/m)Σ_i g_i‖`` (one all-reduce per step).
    with_loss: report the mean loss over workers (one all-reduce per step).
    donate: donate X and opt_state to the step.
    jit: wrap in ``jax.jit``.

  Returns:
    ``step``.
  """
  from coopjax.algorithms._cooperative import step_count

  mesh = _auto_mesh(mesh)
  D = num_devices(mesh)
  tx = optax.with_extra_args_support(tx)
  spec = P(WORKER_AXIS)

  def body(ctx: ShardContext, X, opt_state, batch):
    with mixing.sharded(ctx):
      b = ctx.block
      X_workers, _ = mixing.split_rows(X, ctx.num_workers)
      value, grads = _worker_grads(loss_fn, has_aux, b)(X_workers, batch)
      losses, aux = split_value(value, has_aux, b)
      _, X, opt_state = apply_transformation(tx, X, opt_state, grads, losses, aux, merge_aux)
      metrics = {"worker_loss": losses, "step": step_count(opt_state)}
      if with_loss:
        metrics["loss"] = mixing.worker_mean(losses)
      if with_consensus:
        metrics["consensus_distance"] = consensus_distance(X, ctx)
      if with_grad_norm:
        metrics["avg_grad_norm"] = optax.tree.norm(mixing.worker_mean(grads))
      if has_aux:
        metrics["aux"] = aux
      return X, opt_state, metrics

  def step(X, opt_state, batch):
    leaves = jax.tree.leaves(batch)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
      raise ValueError("batch needs array leaves with a leading worker axis m.")
    m = {jnp.shape(x)[0] for x in leaves}
    if len(m) != 1:
      raise ValueError(f"every batch leaf needs the same leading worker axis, got {sorted(m)}.")
    m = m.pop()
    if num_workers is not None and m != num_workers:
      raise ValueError(f"batch has leading axis {m} but num_workers={num_workers}.")
    b, v = _split_counts(X, D, m)
    ctx = _context(mesh, m, v)
    local_state = _local_shapes(tx.init, mesh, ctx, _struct(X))
    state_specs = jax.tree.map(
      lambda loc, g: _spec_of(loc.shape, jnp.shape(g)), local_state, opt_state
    )
    metric_specs = {"worker_loss": spec, "step": P()}
    for name, on in (
      ("loss", with_loss),
      ("consensus_distance", with_consensus),
      ("avg_grad_norm", with_grad_norm),
    ):
      if on:
        metric_specs[name] = P()
    if has_aux:
      metric_specs["aux"] = spec
    mapped = jax.shard_map(
      lambda *a: body(ctx, *a),
      mesh=mesh,
      in_specs=(spec, state_specs, spec),
      out_specs=(spec, state_specs, metric_specs),
      check_vma=False,
    )
    return mapped(X, opt_state, batch)

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())
