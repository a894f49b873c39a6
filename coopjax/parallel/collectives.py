r"""Structured mixers: lowering a mixing matrix W to the cheapest collective.

Inside a sharded step (``jax.shard_map`` over ``coopjax.WORKER_AXIS``) each of
the D devices holds a block of ``b = m / D`` consecutive workers' rows
``x_{db}, …, x_{db+b-1}`` and a replicated copy of the v auxiliary rows
(:mod:`coopjax.sharding`). Mixing ``x_i ← Σ_j W_{ji} x_j`` is split into the
blocks of

.. math::

   W = \begin{bmatrix} A & B \\ C & E \end{bmatrix}
   \quad (A: m \times m \text{ workers} \to \text{workers},\;
          B: m \times v,\; C: v \times m,\; E: v \times v),

   x_i \leftarrow \sum_{j < m} A_{ji} x_j + \sum_l C_{li} z_l, \qquad
   z_l \leftarrow \sum_{j < m} B_{jl} x_j + \sum_{l'} E_{l'l} z_{l'} .

The terms with ``C`` and ``E`` are local (the auxiliaries are replicated); the
term with ``B`` is one all-reduce (``lax.psum`` of each device's partial sum),
so every device updates its copy of the auxiliaries identically. The
workers' block ``A`` is lowered by :func:`worker_plan` to the first that fits:

* ``identity`` / ``diagonal``: no traffic;
* ``allreduce``: ``A = aI + c\mathbf 1\mathbf 1^\top`` (full averaging
  ``J``): one ``lax.psum`` of the local sum;
* ``permute``: any sparse A (circulant ring and exponential graphs, the torus,
  the hypercube, matchings, groups). Each device needs, from the device δ
  places ahead, only the rows its workers read there (for a ring with
  several workers per device: one boundary row each way). One
  ``lax.ppermute`` per device offset δ moves them; the new rows are weighted
  sums of static gathers from ``[local block, received rows]``. Chosen when
  it moves fewer rows than an all-gather, or uses at most two offsets;
* ``gather``: the fallback for any other W, ``lax.all_gather`` of the
  workers' rows and the dense einsum for this device's columns.

Every lowering equals the dense reference :func:`coopjax.mixing.mix_dense` up
to float rounding (tests compare them for every kind).

Compressed messages (:func:`exchange`, the sharded
:meth:`coopjax.mixing.Mix.exchange`) reuse these plans for their payloads: a
sparse A sends the boundary rows' payloads through the same
collective-permutes and the receiver decodes them; full averaging, an
auxiliary fed by the workers or a dense A all-gather the payloads and every
device decodes and sums them (a psum would add compressed data). Only
payload bytes travel, one buffer per collective (:func:`exchange_kind`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from coopjax import compress
from coopjax.parallel.context import ShardContext
from coopjax.workers import sum_rows

PyTree = Any

__all__ = [
  "WorkerPlan",
  "worker_plan",
  "plan_kind",
  "lower",
  "apply_worker_matrix",
  "mix_gathered",
  "lower_live",
  "worker_sum",
  "worker_mean",
  "exchange",
  "exchange_kind",
  "pack_bytes",
  "unpack_bytes",
  "quantized_mean",
]

_ATOL = 1e-12


class WorkerPlan(NamedTuple):
  """How the workers' block A of W is applied on D devices of b rows each.

  Attributes:
    kind: ``"identity"``, ``"diagonal"``, ``"allreduce"``, ``"permute"`` or
      ``"gather"``.
    rows_sent: rows each device sends per mix (``permute``: Σ over offsets;
      ``gather``: ``(D−1)·b``; 0 when no worker rows move).
    offsets: device offsets δ with one collective-permute each (``permute``).
    apply: ``apply(workers_local) -> workers_local`` inside ``shard_map``.
    apply_weighted: ``permute`` and ``gather`` plans: ``apply_weighted(workers_local, A)``
      with a traced m × m matrix A whose support lies within the planned one
      (the same collectives, weights read from A at run time).

  Examples:
    A ring of eight workers on four devices (two each): every device sends one
    boundary row to the device ahead and one to the device behind (offsets 3
    and 1, i.e. −1 and +1 modulo 4). Planning is static; no device is needed.

    >>> from coopjax import topology
    >>> from coopjax.parallel.context import ShardContext
    >>> plan = worker_plan(topology.ring(8), ShardContext("workers", 4, 8, 0))
    >>> plan.kind, plan.rows_sent, plan.offsets
    ('permute', 2, (3, 1))
  """

  kind: str
  rows_sent: int
  offsets: tuple[int, ...]
  apply: Callable[[PyTree], PyTree]
  apply_weighted: Callable[[PyTree, Any], PyTree] | None = None


def einsum(spec: str, *operands) -> jax.Array:
  """``jnp.einsum`` at full float32 precision.

  Accelerators otherwise run float32 contractions in reduced precision (TF32
  on NVIDIA GPUs), which would make a mix with W differ from the exact
  weighted average by about 1e-3.
  """
  return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST)


def _device(ctx: ShardContext):
  return lax.axis_index(ctx.axis_name)


def _static_rows(x, idx: np.ndarray):
  """Rows ``idx`` of x (static) as slices of contiguous runs, concatenated."""
  runs, start = [], 0
  for i in range(1, len(idx) + 1):
    if i == len(idx) or idx[i] != idx[i - 1] + 1:
      runs.append(x[int(idx[start]) : int(idx[i - 1]) + 1])
      start = i
  return runs[0] if len(runs) == 1 else jnp.concatenate(runs, axis=0)


def _rows(x, table: np.ndarray, ctx: ShardContext):
  """Rows ``table[d]`` of x on device d (static slices when all devices read the same rows)."""
  if np.all(table == table[:1]):
    return _static_rows(x, table[0])
  return jnp.take(x, jnp.asarray(table, jnp.int32)[_device(ctx)], axis=0, mode="clip")


def _per_device(values: np.ndarray, ctx: ShardContext, dtype, ndim: int):
  """``values[d]`` (shape [D, b]) on device d, broadcastable against rows of rank ``ndim``."""
  if np.allclose(values, values.flat[0], atol=0.0, rtol=0.0):
    return jnp.asarray(values.flat[0], dtype)
  if np.all(values == values[:1]):
    w = jnp.asarray(values[0], dtype)
  else:
    w = jnp.asarray(values, dtype)[_device(ctx)]
  return w.reshape(w.shape + (1,) * (ndim - 1))


def _columns(M: np.ndarray, ctx: ShardContext, axis: int, dtype):
  """This device's b-block of M along ``axis`` (static when all blocks are equal)."""
  D = ctx.num_devices
  blocks = np.stack(np.split(np.asarray(M), D, axis=axis))
  if np.all(blocks == blocks[:1]):
    return jnp.asarray(blocks[0], dtype)
  return jnp.asarray(blocks, dtype)[_device(ctx)]


def worker_sum(workers: PyTree, ctx: ShardContext) -> PyTree:
  """``Σ_i x_i`` over all m workers: one all-reduce per dtype, replicated on every device.

  Call it inside ``jax.shard_map`` over ``ctx.axis_name``.

  Examples:
    With ``x_i = i`` the sum is ``m(m − 1)/2`` on any number of devices:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> from coopjax import topology, worker_mesh
    >>> from coopjax.parallel.context import ShardContext
    >>> D = len(jax.devices())
    >>> m = 4 * D  # four workers per device
    >>> ctx = ShardContext("workers", num_devices=D, num_workers=m, num_aux=0)
    >>> f = jax.jit(jax.shard_map(
    ...   lambda x: worker_sum(x, ctx), mesh=worker_mesh(), in_specs=P("workers"), out_specs=P()
    ... ))
    >>> float(f(jnp.arange(m, dtype=jnp.float32))) == m * (m - 1) / 2
    True
  """
  summed = bucketed(
    lambda bufs: [lax.psum(jnp.sum(x, axis=0, keepdims=True), ctx.axis_name) for x in bufs]
  )
  return jax.tree.map(lambda x: x[0], summed(workers))


def worker_mean(workers: PyTree, ctx: ShardContext) -> PyTree:
  """``(1/m) Σ_i x_i`` over all m workers: one all-reduce, replicated.

  Call it inside ``jax.shard_map`` over ``ctx.axis_name``.

  Examples:
    With ``x_i = i`` the mean is ``(m − 1)/2`` on any number of devices:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> from coopjax import topology, worker_mesh
    >>> from coopjax.parallel.context import ShardContext
    >>> D = len(jax.devices())
    >>> m = 4 * D  # four workers per device
    >>> ctx = ShardContext("workers", num_devices=D, num_workers=m, num_aux=0)
    >>> f = jax.jit(jax.shard_map(
    ...   lambda x: worker_mean(x, ctx), mesh=worker_mesh(), in_specs=P("workers"), out_specs=P()
    ... ))
    >>> float(f(jnp.arange(m, dtype=jnp.float32))) == (m - 1) / 2
    True
  """
  m = ctx.num_workers
  return jax.tree.map(lambda s: s / jnp.asarray(m, s.dtype), worker_sum(workers, ctx))


def _identity_plan() -> WorkerPlan:
  return WorkerPlan("identity", 0, (), lambda w: w)


def _gather_plan(A: np.ndarray, ctx: ShardContext) -> WorkerPlan:
  D, b = ctx.num_devices, ctx.block

  def apply(workers):
    def leaf(x):
      full = lax.all_gather(x, ctx.axis_name, axis=0, tiled=True)
      cols = _columns(A, ctx, axis=1, dtype=x.dtype)
      return einsum("ji,j...->i...", cols, full)

    return jax.tree.map(leaf, workers)

  def apply_weighted(workers, A_t):
    def leaf(x):
      full = lax.all_gather(x, ctx.axis_name, axis=0, tiled=True)
      cols = lax.dynamic_slice_in_dim(A_t.astype(x.dtype), _device(ctx) * b, b, axis=1)
      return einsum("ji,j...->i...", cols, full)

    return jax.tree.map(leaf, workers)

  return WorkerPlan("gather", (D - 1) * b, (), apply, apply_weighted)


class _PermuteLayout(NamedTuple):
  """The static data of the sparse lowering of A (:func:`_permute_layout`).

  On device d the pool of rows is ``[received from behind, local block,
  received from ahead]``; ``senders[δ][d]`` names the global rows that fill
  the slots received from δ devices ahead, and every new row is
  ``Σ_terms pool[idx[d, p]] · w[d, p]``.
  """

  deltas: tuple[int, ...]
  behind: tuple[int, ...]
  send: dict  # δ -> [D, k_δ] local rows that device e sends to device e − δ
  pairs: dict  # δ -> the source-target pairs of its collective-permute
  senders: dict  # δ -> [D, k_δ] global row of each slot received from δ ahead
  terms: tuple  # (idx [D, b], w [D, b]) per source offset
  rows_sent: int


def _permute_layout(A: np.ndarray, ctx: ShardContext) -> _PermuteLayout | None:
  """The sparse lowering of A, or None when an all-gather moves no more rows."""
  D, b, m = ctx.num_devices, ctx.block, ctx.num_workers
  src, dst = np.nonzero(np.abs(A) > _ATOL)  # A[src, dst]: row dst reads row src
  offsets = sorted({int(s) for s in (src - dst) % m})
  # Rows device d reads from device (d + delta) % D, as local positions there.
  need: dict[tuple[int, int], set[int]] = {}
  for j, i in zip(src.tolist(), dst.tolist(), strict=True):
    d, e = i // b, j // b
    if e != d:
      need.setdefault((d, (e - d) % D), set()).add(j % b)
  # Signed offsets: rows from devices behind come before the local block, rows from
  # devices ahead after it, so circulant shifts read contiguous slices of the pool.
  signed = lambda delta: delta - D if delta > D // 2 else delta
  deltas = sorted({delta for _, delta in need}, key=signed)
  k = {delta: max(len(need.get((d, delta), ())) for d in range(D)) for delta in deltas}
  rows_sent = sum(k.values())
  if D > 1 and rows_sent >= (D - 1) * b and len(deltas) > 2:
    return None
  # Device e sends to d = e - delta the rows d needs; candidates on d: [local, recv...].
  send, senders, pairs = {}, {}, {}
  cand = [dict() for _ in range(D)]  # global row -> index in the pool, per device
  behind = [delta for delta in deltas if signed(delta) < 0]
  local_at = sum(k[delta] for delta in behind)
  for d in range(D):
    for p in range(b):
      cand[d][d * b + p] = local_at + p
  base = 0
  for delta in deltas:
    if delta not in behind and base == local_at:
      base += b  # the local block sits between the rows from behind and from ahead
    table = np.zeros((D, k[delta]), np.int64)
    for d in range(D):
      rows = sorted(need.get((d, delta), ()))
      e = (d + delta) % D
      table[e, : len(rows)] = rows
      for slot, q in enumerate(rows):
        cand[d][e * b + q] = base + slot
    send[delta] = table
    # Slot s on device d holds row table[e, s] of device e = d + δ (padding slots too).
    ahead = (np.arange(D) + delta) % D
    senders[delta] = ahead[:, None] * b + table[ahead]
    # Only devices that read rows from δ places ahead receive (a matching or a group
    # mean leaves the others out); the rest get zeros, which no weight reads.
    pairs[delta] = [(e, (e - delta) % D) for e in range(D) if need.get(((e - delta) % D, delta))]
    base += k[delta]
  terms = []
  for s in offsets:
    idx = np.zeros((D, b), np.int64)
    w = np.zeros((D, b))
    for d in range(D):
      for p in range(b):
        i = d * b + p
        j = (i + s) % m
        idx[d, p] = cand[d][j] if abs(A[j, i]) > _ATOL else local_at + p
        w[d, p] = A[j, i] if abs(A[j, i]) > _ATOL else 0.0
    terms.append((idx, w))
  return _PermuteLayout(tuple(deltas), tuple(behind), send, pairs, senders, tuple(terms), rows_sent)


def _pool(local, received: dict, layout: _PermuteLayout):
  """``[rows from behind, local block, rows from ahead]`` (one leaf, rows first)."""
  parts = [received[delta] for delta in layout.behind] + [local]
  parts += [received[delta] for delta in layout.deltas if delta not in layout.behind]
  return jnp.concatenate(parts, axis=0) if len(parts) > 1 else local


def _device_offsets(layout: _PermuteLayout, ctx: ShardContext):
  """``(δ, send, permute)`` for every device offset δ of the layout.

  ``send`` is the ``[D, k_δ]`` table of the local rows that each device gives to the
  device δ places behind it, and ``permute(buf)`` the collective-permute that brings
  this device the matching rows from δ places ahead.
  """
  for delta in layout.deltas:
    yield (
      delta,
      layout.send[delta],
      partial(lax.ppermute, axis_name=ctx.axis_name, perm=layout.pairs[delta]),
    )


def _combine(pool, layout: _PermuteLayout, ctx: ShardContext):
  """The new local rows ``Σ_terms pool[idx] · w`` (one leaf)."""
  total = None
  for idx, w in layout.terms:
    term = _rows(pool, idx, ctx) * _per_device(w, ctx, pool.dtype, pool.ndim)
    total = term if total is None else total + term
  return total


def _permute_plan(A: np.ndarray, ctx: ShardContext) -> WorkerPlan | None:
  """The sparse lowering of A, or None when an all-gather moves no more rows."""
  layout = _permute_layout(A, ctx)
  if layout is None:
    return None

  def pool(x):  # one leaf: [rows from behind, local block, rows from ahead]
    received = {
      delta: permute(_rows(x, send, ctx)) for delta, send, permute in _device_offsets(layout, ctx)
    }
    return _pool(x, received, layout)

  def apply(workers):
    def leaf(x):
      return _combine(pool(x), layout, ctx)

    return jax.tree.map(leaf, workers)

  src, dst = np.nonzero(np.abs(A) > _ATOL)
  offsets = sorted({int(s) for s in (src - dst) % ctx.num_workers})  # the terms' order
  m, b = ctx.num_workers, ctx.block

  def apply_weighted(workers, A_t):
    cols = np.arange(m)

    def leaf(x):
      rows = pool(x)
      total = None
      for (idx, _), s in zip(layout.terms, offsets, strict=True):
        planned = jnp.asarray(np.abs(A[(cols + s) % m, cols]) > _ATOL, x.dtype)
        weights = A_t.astype(x.dtype)[(cols + s) % m, cols] * planned  # [m], static gather
        own = lax.dynamic_slice_in_dim(weights, _device(ctx) * b, b)
        term = _rows(rows, idx, ctx) * own.reshape((b,) + (1,) * (x.ndim - 1))
        total = term if total is None else total + term
      return total

    return jax.tree.map(leaf, workers)

  return WorkerPlan("permute", layout.rows_sent, layout.deltas, apply, apply_weighted)


def worker_plan(A, ctx: ShardContext) -> WorkerPlan:
  """Chooses how to apply the workers' block ``A`` (m × m, static) on ``ctx``'s devices.

  Args:
    A: the m × m matrix, ``x_i ← Σ_j A[j, i] x_j``.
    ctx: the sharded step's :class:`coopjax.parallel.context.ShardContext`.

  Returns:
    A :class:`WorkerPlan` (see the module docstring for the rules).

  Examples:
    Eight workers on four devices. Full averaging is one all-reduce; a dense
    random A would send ``(D − 1)·b = 6`` rows through any permutation
    scheme, so it is all-gathered:

    >>> import numpy as np
    >>> from coopjax import topology
    >>> from coopjax.parallel.context import ShardContext
    >>> ctx = ShardContext("workers", num_devices=4, num_workers=8, num_aux=0)
    >>> worker_plan(topology.complete(8), ctx).kind
    'allreduce'
    >>> A = np.random.default_rng(0).random((8, 8))
    >>> plan = worker_plan(A / A.sum(axis=0), ctx)
    >>> plan.kind, plan.rows_sent
    ('gather', 6)
  """
  A = np.asarray(A, np.float64)
  m = ctx.num_workers
  if A.shape != (m, m):
    raise ValueError(f"the workers' block of W must be {m}x{m} for m={m}, got {A.shape}.")
  diag = np.diag(A).copy()
  off = A - np.diag(diag)
  if not np.any(np.abs(off) > _ATOL):
    if np.allclose(diag, 1.0, atol=_ATOL, rtol=0.0):
      return _identity_plan()

    def scale(workers):
      return jax.tree.map(
        lambda x: x * _per_device(diag.reshape(ctx.num_devices, -1), ctx, x.dtype, x.ndim),
        workers,
      )

    return WorkerPlan("diagonal", 0, (), scale)
  c = off[0, 1] if m > 1 else 0.0
  a = diag[0] - c
  if m > 2 and np.allclose(A, a * np.eye(m) + c, atol=_ATOL, rtol=0.0):

    def allreduce(workers):
      total = worker_sum(workers, ctx)
      return jax.tree.map(
        lambda x, s: jnp.asarray(a, x.dtype) * x + jnp.asarray(c, x.dtype) * s[None], workers, total
      )

    return WorkerPlan("allreduce", 0, (), allreduce)
  plan = _permute_plan(A, ctx)
  return plan if plan is not None else _gather_plan(A, ctx)


def plan_kind(W, ctx: ShardContext) -> str:
  """The :class:`WorkerPlan` kind chosen for the workers' block of ``W``.

  Examples:
    >>> import numpy as np
    >>> from coopjax import topology
    >>> from coopjax.parallel.context import ShardContext
    >>> ctx = ShardContext("workers", num_devices=4, num_workers=8, num_aux=0)
    >>> [plan_kind(W, ctx) for W in (np.eye(8), topology.complete(8), topology.ring(8))]
    ['identity', 'allreduce', 'permute']
    >>> plan_kind(topology.easgd(8, 0.1), ctx)  # workers' block (1 - alpha) I
    'diagonal'
  """
  W = np.asarray(W, np.float64)
  m = ctx.num_workers
  return worker_plan(W[:m, :m], ctx).kind


def apply_worker_matrix(workers: PyTree, A, ctx: ShardContext) -> PyTree:
  r"""``x_i ← Σ_j A[j, i] x_j`` on the local block of worker rows (A static, m × m).

  .. math::

     x_i \leftarrow \sum_{j < m} A_{ji}\, x_j .

  Call it inside ``jax.shard_map`` over ``ctx.axis_name``; the plan of each A
  (:func:`worker_plan`) is cached.

  Examples:
    Worker 0 holds 1, the others 0; after a ring mix worker 0 and its two
    neighbours hold 1/3:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> from coopjax import topology, worker_mesh
    >>> from coopjax.parallel.context import ShardContext
    >>> D = len(jax.devices())
    >>> m = 4 * D  # four workers per device
    >>> ctx = ShardContext("workers", num_devices=D, num_workers=m, num_aux=0)
    >>> mix = jax.jit(jax.shard_map(
    ...   lambda x: apply_worker_matrix(x, topology.ring(m), ctx),
    ...   mesh=worker_mesh(), in_specs=P("workers"), out_specs=P("workers"),
    ... ))
    >>> X = jnp.zeros((m, 1)).at[0].set(1.0)
    >>> np.round(3 * mix(X)[jnp.array([m - 1, 0, 1, 2]), 0], 4).tolist()
    [1.0, 1.0, 1.0, 0.0]
  """
  return _cached_plan(np.asarray(A, np.float64), ctx).apply(workers)


def _memo_by_matrix(build: Callable, limit: int = 256) -> Callable:
  """``build(A, ctx)`` memoised on A's shape and bytes and on ctx (emptied past ``limit``).

  Plans and layouts are built in NumPy from static matrices at trace time; a step
  retraced with the same W reuses them.
  """
  cache: dict = {}

  def cached(A: np.ndarray, ctx: ShardContext):
    key = (A.shape, A.tobytes(), ctx)
    if key not in cache:
      if len(cache) > limit:
        cache.clear()
      cache[key] = build(A, ctx)
    return cache[key]

  return cached


_cached_plan = _memo_by_matrix(worker_plan)


def _split_local(X: PyTree, n: int, ctx: ShardContext):
  """The local block as ``(workers, aux)`` for an n × n matrix (``aux`` None when n = m)."""
  m, b = ctx.num_workers, ctx.block
  if n == m:
    return X, None
  if n < m:
    raise ValueError(f"W is {n}x{n} but the sharded step has m={m} workers; W needs >= m rows.")
  rows = {x.shape[0] for x in jax.tree.leaves(X)}
  if rows != {b + n - m}:
    raise ValueError(
      f"W is {n}x{n} ({m} workers + {n - m} auxiliary) but the local block has {sorted(rows)} "
      f"rows; each device needs its b={b} workers' rows followed by the {n - m} replicated "
      "auxiliary rows."
    )
  return jax.tree.map(lambda x: x[:b], X), jax.tree.map(lambda x: x[b:], X)


def bucketed(apply: Callable[[list], list]) -> Callable[[PyTree], PyTree]:
  """Runs ``apply`` on one buffer per dtype instead of one array per leaf.

  Every leaf ``[rows, ...]`` is flattened to ``[rows, size]`` and the leaves
  of one dtype are concatenated along the second axis, so that a row-wise
  collective (a collective-permute of boundary rows, an all-reduce of row
  sums, an all-gather) is issued once per dtype rather than once per leaf.
  ``apply`` maps the list of 2-D buffers to a list of buffers of the same
  shapes; the result is unpacked into X's structure.
  """

  def run(X: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(X)
    if len(leaves) <= 1:
      return jax.tree.unflatten(
        treedef,
        [_unflat(y, x) for y, x in zip(apply([_flat(x) for x in leaves]), leaves, strict=True)],
      )
    by_dtype: dict = {}
    for i, x in enumerate(leaves):
      by_dtype.setdefault(jnp.dtype(x.dtype), []).append(i)
    groups = list(by_dtype.values())
    buffers = [
      jnp.concatenate([_flat(leaves[i]) for i in idx], axis=1)
      if len(idx) > 1
      else _flat(leaves[idx[0]])
      for idx in groups
    ]
    mixed = apply(buffers)
    out = [None] * len(leaves)
    for idx, buf in zip(groups, mixed, strict=True):
      start = 0
      for i in idx:
        size = int(np.prod(leaves[i].shape[1:], dtype=np.int64))
        out[i] = _unflat(buf[:, start : start + size], leaves[i])
        start += size
    return jax.tree.unflatten(treedef, out)

  return run


def _flat(x):
  return x.reshape((x.shape[0], -1))


def _unflat(y, like):
  return y.reshape((y.shape[0],) + like.shape[1:])


def mix_gathered(X: PyTree, W, ctx: ShardContext) -> PyTree:
  """The dense fallback: all-gather the workers' rows, einsum with this device's columns.

  Works for any W, also a traced one (e.g. a matrix drawn at run time).

  Examples:
    W passed as a (replicated) argument, as a matrix drawn at run time would be:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> from coopjax import topology, worker_mesh
    >>> from coopjax.parallel.context import ShardContext
    >>> D = len(jax.devices())
    >>> m = 4 * D  # four workers per device
    >>> ctx = ShardContext("workers", num_devices=D, num_workers=m, num_aux=0)
    >>> mix = jax.jit(jax.shard_map(
    ...   lambda x, w: mix_gathered(x, w, ctx),
    ...   mesh=worker_mesh(), in_specs=(P("workers"), P()), out_specs=P("workers"),
    ... ))
    >>> X = jnp.zeros((m, 1)).at[0].set(1.0)
    >>> W = jnp.asarray(topology.ring(m), jnp.float32)
    >>> np.round(3 * mix(X, W)[jnp.array([m - 1, 0, 1, 2]), 0], 4).tolist()
    [1.0, 1.0, 1.0, 0.0]
  """
  n = W.shape[0]
  m, b = ctx.num_workers, ctx.block
  workers, aux = _split_local(X, n, ctx)
  W = jnp.asarray(W)

  def leaf(x, z):
    full = lax.all_gather(x, ctx.axis_name, axis=0, tiled=True)
    if z is not None:
      full = jnp.concatenate([full, z.astype(full.dtype)], axis=0)
    w = W.astype(x.dtype)
    own = lax.dynamic_slice_in_dim(w, _device(ctx) * b, b, axis=1)
    out = einsum("ji,j...->i...", own, full)
    if z is None:
      return out
    return jnp.concatenate([out, einsum("ji,j...->i...", w[:, m:], full)], axis=0)

  if aux is None:
    return jax.tree.map(lambda x: leaf(x, None), workers)
  return jax.tree.map(leaf, workers, aux)


def lower(W, ctx: ShardContext) -> Callable[[PyTree], PyTree]:
  r"""The per-device mixer of a static W on ``ctx``'s devices, leaves bucketed by dtype.

  W is ``m × m`` (applied to the local workers' rows) or ``(m+v') × (m+v')``
  (applied to the local block ``[workers, auxiliaries]``, the v' auxiliary
  rows replicated on every device).

  Args:
    W: the static mixing matrix, ``x_i ← Σ_j W[j, i] x_j``.
    ctx: the sharded step's :class:`coopjax.parallel.context.ShardContext`.

  Returns:
    ``mix(X_local) -> X_local``, equal to the dense einsum up to rounding; one
    collective per neighbour offset (or reduction) per dtype of X's leaves.

  Examples:
    A ring mix of a pytree, compared with the dense reference ``Wᵀ X``:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> from coopjax import topology, worker_mesh
    >>> from coopjax.parallel.context import ShardContext
    >>> D = len(jax.devices())
    >>> m = 4 * D  # four workers per device
    >>> ctx = ShardContext("workers", num_devices=D, num_workers=m, num_aux=0)
    >>> W = topology.ring(m)
    >>> mix = jax.jit(jax.shard_map(
    ...   lower(W, ctx), mesh=worker_mesh(), in_specs=P("workers"), out_specs=P("workers")
    ... ))
    >>> X = {"w": jnp.arange(2.0 * m).reshape(m, 2), "b": jnp.ones(m)}
    >>> out = mix(X)
    >>> bool(np.allclose(out["w"], W.T @ np.asarray(X["w"]), atol=1e-5))
    True
    >>> np.asarray(out["b"]).round(4).tolist() == [1.0] * m
    True
  """
  W = np.asarray(W, np.float64)
  n, m = W.shape[0], ctx.num_workers
  plan = _cached_plan(np.ascontiguousarray(W[:m, :m]), ctx)
  if n == m:
    return bucketed(plan.apply)
  if n < m:
    _split_local({}, n, ctx)
  if plan.kind == "gather":
    return bucketed(lambda bufs: mix_gathered(bufs, W, ctx))
  b = ctx.block
  C, B, E = W[m:, :m], W[:m, m:], W[m:, m:]
  has_C = bool(np.any(np.abs(C) > _ATOL))
  has_B = bool(np.any(np.abs(B) > _ATOL))

  def mix(buffers):
    workers = [x[:b] for x in buffers]
    aux = [x[b:] for x in buffers]
    new_w = plan.apply(workers)
    if has_C:
      new_w = [
        y + einsum("li,l...->i...", _columns(C, ctx, 1, z.dtype), z)
        for y, z in zip(new_w, aux, strict=True)
      ]

    def new_aux(x, z):
      out = einsum("kl,k...->l...", jnp.asarray(E, z.dtype), z)
      if has_B:
        part = einsum("il,i...->l...", _columns(B, ctx, 0, x.dtype), x)
        out = out + lax.psum(part, ctx.axis_name).astype(z.dtype)
      return out

    new_z = [new_aux(x, z) for x, z in zip(workers, aux, strict=True)]
    return [
      jnp.concatenate([y, z.astype(y.dtype)], axis=0) for y, z in zip(new_w, new_z, strict=True)
    ]

  run = bucketed(mix)

  def checked(X):
    _split_local(X, n, ctx)
    return run(X)

  return checked


def lower_live(W, structure, ctx: ShardContext) -> Callable:
  r"""The per-device live-masked mixer of a static W: the same collectives, traced weights.

  Returns ``mix(X_local, W_L, live, fallback) -> X_local`` where ``W_L`` is the
  traced ``n × n`` matrix of :func:`coopjax.mixing.live_weights` and X_local's
  masked rows are already zero (selected out). The workers' block goes
  through

  * a diagonal W: its static plan (no traffic);
  * ``A = aI + cJ``: one all-reduce of the live rows' sum,
    ``x_i ← a x_i + (s_i − a)/|L| Σ_{j∈L} x_j``;
  * a graph or a permutation: the collective-permute plan of the support of
    W and its transpose with weights read from ``W_L`` (or the all-gather
    plan when that moves fewer rows); with ``fallback`` set, a
    ``lax.cond`` between that and the all-reduce of ``J_L``;

  and the auxiliary rows are updated as in :func:`lower`, with ``W_L``'s
  blocks (one all-reduce of the partial sums for ``B``).
  """
  W = np.asarray(W, np.float64)
  n, m, b = W.shape[0], ctx.num_workers, ctx.block
  kind = structure.kind
  scale = np.asarray(structure.scale, np.float64)

  def local(vec, dtype):  # this device's block of an [m] vector, as a column
    v = lax.dynamic_slice_in_dim(jnp.asarray(vec, dtype), _device(ctx) * b, b)
    return v

  def averaged(bufs, live, a):
    count = jnp.maximum(jnp.sum(live.astype(jnp.float32)), 1.0)
    totals = [lax.psum(jnp.sum(x, axis=0, keepdims=True), ctx.axis_name) for x in bufs]
    out = []
    for x, t in zip(bufs, totals, strict=True):
      coef = (local(scale, jnp.float32) - a) / count
      out.append(jnp.asarray(a, x.dtype) * x + coef.astype(x.dtype)[:, None] * t)
    return out

  if kind == "diagonal":
    static = _cached_plan(np.ascontiguousarray(W[:m, :m]), ctx)

    def workers_fn(bufs, W_L, live, fallback):
      return static.apply(bufs)

  elif kind == "average":

    def workers_fn(bufs, W_L, live, fallback):
      return averaged(bufs, live, structure.average_a)

  else:
    support = (np.abs(W[:m, :m]) > _ATOL) | structure.graph | np.eye(m, dtype=bool)
    plan = _cached_plan(np.ascontiguousarray(support.astype(np.float64)), ctx)
    if plan.apply_weighted is None:
      plan = _gather_plan(support.astype(np.float64), ctx)

    def workers_fn(bufs, W_L, live, fallback):
      weighted = lambda bufs: plan.apply_weighted(bufs, W_L[:m, :m])  # noqa: E731
      if fallback is None:
        return weighted(bufs)
      return lax.cond(fallback, lambda bufs: averaged(bufs, live, 0.0), weighted, bufs)

  def mix(buffers, W_L, live, fallback):
    if n == m:
      return workers_fn(buffers, W_L, live, fallback)
    workers = [x[:b] for x in buffers]
    aux = [x[b:] for x in buffers]
    new_w = workers_fn(workers, W_L, live, fallback)
    C = W_L[m:, :m]
    B = W_L[:m, m:]
    E = W_L[m:, m:]
    own_C = lax.dynamic_slice_in_dim(C, _device(ctx) * b, b, axis=1)
    own_B = lax.dynamic_slice_in_dim(B, _device(ctx) * b, b, axis=0)
    new_w = [
      y + einsum("li,l...->i...", own_C.astype(z.dtype), z).astype(y.dtype)
      for y, z in zip(new_w, aux, strict=True)
    ]
    new_z = []
    for x, z in zip(workers, aux, strict=True):
      part = einsum("il,i...->l...", own_B.astype(x.dtype), x)
      out = einsum("kl,k...->l...", E.astype(z.dtype), z)
      new_z.append(out + lax.psum(part, ctx.axis_name).astype(z.dtype))
    return [
      jnp.concatenate([y, z.astype(y.dtype)], axis=0) for y, z in zip(new_w, new_z, strict=True)
    ]

  def run(X, W_L, live, fallback):
    if n > m:
      _split_local(X, n, ctx)
    return bucketed(lambda bufs: mix(bufs, W_L, live, fallback))(X)

  return run


def _to_wire(x, as_bytes: bool):
  """A payload leaf ``[rows, ...]`` as the 2-D buffer ``[rows, k]`` that a collective sends.

  Collectives on 8-bit floats are lowered as f16 and those on 4- and 2-bit
  types as s8: such leaves travel as their bits in ``uint8`` (sub-byte values
  packed ``8 / bits`` to a byte, each row zero-padded to whole bytes), and
  booleans as ``uint8``. With ``as_bytes`` every leaf travels as the bytes of
  its values (``uint8``), so that payloads of several dtypes share one
  buffer; otherwise other dtypes travel as they are.
  """
  flat = x.reshape((x.shape[0], -1))
  if x.dtype == jnp.bool_:
    return flat.astype(jnp.uint8)
  bits = jax.dtypes.itemsize_bits(x.dtype)
  if bits < 8:
    per_byte = 8 // bits
    pad = -flat.shape[1] % per_byte
    if pad:
      flat = jnp.concatenate([flat, jnp.zeros((flat.shape[0], pad), flat.dtype)], axis=1)
    return lax.bitcast_convert_type(flat.reshape((flat.shape[0], -1, per_byte)), jnp.uint8)
  if x.dtype == jnp.uint8 or not (
    as_bytes or (bits == 8 and jnp.issubdtype(x.dtype, jnp.floating))
  ):
    return flat
  return lax.bitcast_convert_type(flat, jnp.uint8).reshape((flat.shape[0], -1))


def _from_wire(y, like):
  """Inverse of :func:`_to_wire`: the rows of ``y`` in ``like``'s dtype and row shape."""
  rows = y.shape[0]
  shape = (rows,) + tuple(like.shape[1:])
  if y.dtype == like.dtype:
    return y.reshape(shape)
  if like.dtype == jnp.bool_:
    return (y != 0).reshape(shape)
  bits = jax.dtypes.itemsize_bits(like.dtype)
  if bits > 8:
    y = y.reshape((rows, -1, bits // 8))
  x = lax.bitcast_convert_type(y, like.dtype).reshape((rows, -1))
  size = int(np.prod(like.shape[1:], dtype=np.int64))
  return x[:, :size].reshape(shape)


def _transport(payloads: PyTree, move: Callable) -> PyTree:
  """Moves the rows of every payload leaf with ``move`` (a row-wise collective).

  All payload leaves of a message go into one buffer, so that a mix costs one
  collective per neighbour offset (or one all-gather): a payload of one dtype
  travels in that dtype, a payload of several (values and indices, levels and
  a scale) as the bytes of its leaves in ``uint8``; 8-bit floats and sub-byte
  types always travel as ``uint8`` bits (:func:`_to_wire`), never widened.
  ``move`` maps a ``[rows, size]`` buffer to ``[rows', size]``.
  """
  leaves, treedef = jax.tree.flatten(payloads)
  plain = [_to_wire(x, as_bytes=False) for x in leaves]
  wire = plain
  if len({y.dtype for y in plain}) > 1:
    wire = [_to_wire(x, as_bytes=True) for x in leaves]
  moved = bucketed(lambda bufs: [move(buf) for buf in bufs])(wire)
  return jax.tree.unflatten(treedef, [_from_wire(y, x) for y, x in zip(moved, leaves, strict=True)])


def _encode_rows(compressor, rows: list, key, step, senders):
  """Payloads of the rows of ``rows`` (a list of leaves, rows first) sent by ``senders``."""

  def one(row, sender):
    return compress.encode_tree(compressor, row, compress.message_key(key, step, sender))

  return jax.vmap(one)(rows, senders)


def _decode_rows(compressor, payloads, like: list, key, step, senders) -> list:
  """The decoded messages ``Q_j`` of payload rows sent by ``senders`` (rows first)."""

  def one(payload, sender):
    return compress.decode_tree(compressor, payload, like, compress.message_key(key, step, sender))

  return jax.vmap(one)(payloads, senders)


def exchange_kind(W, ctx: ShardContext) -> str:
  """How :func:`exchange` moves the payloads of a static W on ``ctx``'s devices.

  * ``"local"``: no worker reads another worker's message and no auxiliary
    row is fed by the workers (W diagonal on the workers): nothing travels;
  * ``"permute"``: a sparse workers' block (the permute plan of
    :func:`worker_plan`) and no auxiliary fed by the workers: the boundary
    rows' payloads through one collective-permute per device offset;
  * ``"gather"``: anything else (full averaging ``J``, EASGD's anchor, a dense
    W): one all-gather of the payloads, decoded and summed on every device.

  Examples:
    >>> from coopjax import topology
    >>> from coopjax.parallel.context import ShardContext
    >>> ctx = ShardContext("workers", num_devices=4, num_workers=8, num_aux=0)
    >>> [exchange_kind(W, ctx) for W in (topology.ring(8), topology.complete(8))]
    ['permute', 'gather']
    >>> exchange_kind(topology.easgd(8, 0.1), ctx._replace(num_aux=1))
    'gather'
  """
  W = np.asarray(W, np.float64)
  m = ctx.num_workers
  kind = _cached_plan(np.ascontiguousarray(W[:m, :m]), ctx).kind
  feeds_aux = bool(np.any(np.abs(W[:m, m:]) > _ATOL))
  if feeds_aux or kind in ("allreduce", "gather"):
    return "gather"
  return "local" if kind in ("identity", "diagonal") else "permute"


_cached_layout = _memo_by_matrix(_permute_layout)


def exchange(W, leaves: list, compressor, key, step, ctx: ShardContext) -> tuple[list, list]:
  r"""Sharded :meth:`coopjax.mixing.Mix.exchange`: only payloads travel.

  Each device encodes its own workers' rows (global sender ``d·b + p`` for
  local row p of device d) and every device encodes the replicated auxiliary
  rows (senders ``m, …, m + v − 1``) identically, keyed by
  :func:`coopjax.compress.message_key`. Then, by :func:`exchange_kind`:

  * ``"permute"``: the payloads of the boundary rows go through the
    collective-permutes of :func:`worker_plan`'s sparse lowering; the
    receiver decodes them with the senders' keys and applies the weights;
  * ``"gather"``: one all-gather of all workers' payloads; every device
    decodes the m messages and forms its rows' weighted sums locally (never a
    reduction of low-precision data);
  * ``"local"``: no payload leaves the device.

  .. math::

     \text{own}_i = Q_i = \mathrm{decode}(\mathrm{encode}(x_i)), \qquad
     \text{mixed}_i = \sum_j W_{ji}\, Q_j .

  The payload leaves of all messages travel in one buffer per collective: in
  their dtype when they share one, else as their bytes in ``uint8``; 8-bit
  floats and sub-byte types always as ``uint8`` bits (never widened to the
  f16 / s8 that a collective on them would be lowered to).

  Args:
    W: the static ``n × n`` mixing matrix (``n = m`` or ``m + v``).
    leaves: the local blocks of the messages' leaves (``b`` or ``b + v`` rows).
    compressor: a :class:`coopjax.compress.Compressor`.
    key: the base key of the messages.
    step: the step k (may be traced).
    ctx: the sharded step's :class:`coopjax.parallel.context.ShardContext`.

  Returns:
    ``(own, mixed)``: lists of local blocks shaped like ``leaves``.

  Examples:
    Identity messages on a ring equal the plain mix:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> from coopjax import compress, topology, worker_mesh
    >>> from coopjax.parallel.context import ShardContext
    >>> D = len(jax.devices())
    >>> m = 2 * D
    >>> ctx = ShardContext("workers", num_devices=D, num_workers=m, num_aux=0)
    >>> f = jax.jit(jax.shard_map(
    ...   lambda x: exchange(topology.ring(m), [x], compress.identity(), jax.random.key(0), 0,
    ...                      ctx)[1][0],
    ...   mesh=worker_mesh(), in_specs=P("workers"), out_specs=P("workers")))
    >>> x = jnp.arange(m, dtype=jnp.float32)
    >>> bool(np.allclose(f(x), topology.ring(m).T @ np.arange(m), atol=1e-5))
    True
  """
  W = np.asarray(W, np.float64)
  n, m, b = W.shape[0], ctx.num_workers, ctx.block
  if n < m:
    _split_local({}, n, ctx)
  workers, aux = _split_local(leaves, n, ctx)
  like = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in leaves]
  senders = _device(ctx) * b + jnp.arange(b)
  payloads = _encode_rows(compressor, workers, key, step, senders)
  own_w = _decode_rows(compressor, payloads, like, key, step, senders)
  own_z = None
  if aux is not None:
    aux_senders = jnp.arange(m, n)
    own_z = _decode_rows(
      compressor,
      _encode_rows(compressor, aux, key, step, aux_senders),
      like,
      key,
      step,
      aux_senders,
    )
  kind = exchange_kind(W, ctx)
  A = np.ascontiguousarray(W[:m, :m])
  if kind == "gather":
    gathered = _transport(payloads, lambda buf: lax.all_gather(buf, ctx.axis_name, tiled=True))
    Q = _decode_rows(compressor, gathered, like, key, step, jnp.arange(m))
    plan = _cached_plan(A, ctx)
    if aux is None and plan.kind == "allreduce":
      a, c = _averaging_weights(A)
      mixed = [
        jnp.asarray(a, x.dtype) * x + jnp.asarray(c, x.dtype) * sum_rows(q)[None]
        for x, q in zip(own_w, Q, strict=True)
      ]
    else:
      full = (
        Q if aux is None else [jnp.concatenate([q, z], 0) for q, z in zip(Q, own_z, strict=True)]
      )
      mixed = [einsum("ji,j...->i...", _columns(W[:, :m], ctx, 1, q.dtype), q) for q in full]
      if aux is not None:
        mixed = [
          jnp.concatenate([y, einsum("ji,j...->i...", jnp.asarray(W[:, m:], q.dtype), q)], 0)
          for y, q in zip(mixed, full, strict=True)
        ]
    return _join(own_w, own_z), mixed
  if kind == "local":
    diag = np.diag(A).reshape(ctx.num_devices, b)
    new_w = [x * _per_device(diag, ctx, x.dtype, x.ndim) for x in own_w]
  else:
    layout = _cached_layout(A, ctx)
    received = {
      delta: _transport(_tree_rows(payloads, send, ctx), permute)
      for delta, send, permute in _device_offsets(layout, ctx)
    }
    decoded = {
      delta: _decode_rows(
        compressor, p, like, key, step, _per_device_rows(layout.senders[delta], ctx)
      )
      for delta, p in received.items()
    }
    new_w = [
      _combine(_pool(x, {delta: q[i] for delta, q in decoded.items()}, layout), layout, ctx)
      for i, x in enumerate(own_w)
    ]
  if aux is None:
    return own_w, new_w
  C, E = W[m:, :m], W[m:, m:]
  if np.any(np.abs(C) > _ATOL):
    new_w = [
      y + einsum("li,l...->i...", _columns(C, ctx, 1, z.dtype), z)
      for y, z in zip(new_w, own_z, strict=True)
    ]
  new_z = [einsum("kl,k...->l...", jnp.asarray(E, z.dtype), z) for z in own_z]
  return _join(own_w, own_z), _join(new_w, new_z)


def _join(workers: list, aux: list | None) -> list:
  if aux is None:
    return workers
  return [jnp.concatenate([x, z], axis=0) for x, z in zip(workers, aux, strict=True)]


def _tree_rows(tree: PyTree, table: np.ndarray, ctx: ShardContext) -> PyTree:
  """Rows ``table[d]`` of every leaf of ``tree`` on device d."""
  return jax.tree.map(lambda x: _rows(x, table, ctx), tree)


def _per_device_rows(table: np.ndarray, ctx: ShardContext):
  """``table[d]`` on device d, as int32 (static when all devices agree)."""
  if np.all(table == table[:1]):
    return jnp.asarray(table[0], jnp.int32)
  return jnp.asarray(table, jnp.int32)[_device(ctx)]


def _averaging_weights(A: np.ndarray) -> tuple[float, float]:
  """``(a, c)`` of ``A = aI + cJ``."""
  c = A[0, 1]
  return float(A[0, 0] - c), float(c)


def pack_bytes(payload: PyTree, rows: int, batch: int = 0) -> jax.Array:
  """Every leaf of ``payload`` as unsigned bytes, concatenated per row.

  Each leaf is read as ``[*batch axes, rows, -1]`` (its first ``batch`` axes
  kept, the rest split into ``rows`` equal row-major pieces: a row-wise
  compressor's codes and scales, also when they are stored flat), bitcast to
  ``uint8`` (a float32 scale becomes 4 bytes) and concatenated, so that a
  collective of the result travels as ``u8`` whatever the payload's dtypes.

  Args:
    payload: a pytree of arrays sharing their first ``batch`` axes.
    rows: the rows each leaf holds after those axes.
    batch: the number of leading batch axes kept.

  Returns:
    ``uint8[*batch axes, rows, bytes_per_row]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> packed = pack_bytes({"q": jnp.zeros(6, jnp.uint8), "s": jnp.ones(3)}, rows=3)
    >>> packed.shape, str(packed.dtype)  # 2 code bytes and a 4-byte scale per row
    ((3, 6), 'uint8')
  """
  parts = []
  for x in jax.tree.leaves(payload):
    front = x.shape[:batch]
    if int(np.prod(x.shape[batch:], dtype=np.int64)) % rows:
      raise ValueError(
        f"the compressor's payload leaf of shape {x.shape[batch:]} does not split into {rows} "
        "rows: a quantized mean needs a compressor that encodes row by row (int8, or int4 with "
        "an even block_size)."
      )
    flat = x.reshape(front + (rows, -1))
    if flat.dtype != jnp.uint8:
      flat = lax.bitcast_convert_type(flat, jnp.uint8).reshape(front + (rows, -1))
    parts.append(flat)
  return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def unpack_bytes(packed: jax.Array, template: PyTree) -> PyTree:
  """Inverse of :func:`pack_bytes`: ``packed`` back to ``template``'s shapes and dtypes.

  ``packed`` is ``[*batch axes, rows, bytes_per_row]``; ``template`` holds
  ``jax.ShapeDtypeStruct`` leaves of ONE payload of those ``rows`` (e.g.
  ``jax.eval_shape`` of the encoder). The result keeps the batch axes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> payload = {"q": jnp.arange(6, dtype=jnp.uint8), "s": jnp.arange(3.0)}
    >>> template = jax.eval_shape(lambda: payload)
    >>> back = unpack_bytes(pack_bytes(payload, rows=3), template)
    >>> back["s"].tolist(), back["q"].tolist()
    ([0.0, 1.0, 2.0], [0, 1, 2, 3, 4, 5])
  """
  leaves, treedef = jax.tree.flatten(template)
  front, rows = packed.shape[:-2], packed.shape[-2]
  out, start = [], 0
  for t in leaves:
    size = jnp.dtype(t.dtype).itemsize
    per_row = int(np.prod(t.shape, dtype=np.int64)) // rows
    piece = packed[..., start : start + per_row * size]
    start += per_row * size
    if jnp.dtype(t.dtype) != jnp.uint8:
      piece = lax.bitcast_convert_type(piece.reshape(front + (rows, per_row, size)), t.dtype)
    out.append(piece.reshape(front + t.shape))
  return jax.tree.unflatten(treedef, out)


def quantized_mean(
  workers: jax.Array, compressor, key: jax.Array, ctx: ShardContext, live: jax.Array | None = None
) -> jax.Array:
  r"""The mean of the workers' rows sent quantized: all-to-all (u8), float32 sum, all-gather (u8).

  ``workers`` is this device's block ``[b, R, C]`` (b workers, each an
  ``R × C`` array quantized row by row). With ``Q = decode ∘ encode`` and
  the rows cut into D chunks (chunk d owned by device d, zero rows padded to
  a multiple of D):

  .. code-block:: text

     1. every worker encodes its chunks;    all-to-all of the payloads (u8 bytes)
     2. owner d decodes the m payloads of chunk d, sums them in float32 (worker
        order, pairwise as coopjax.workers.sum_rows), divides by m,
        re-encodes the mean;                 all-gather of the payloads (u8 bytes)
     3. every device decodes all chunks:     Q(1/m Σ_i Q(x_i))   (replicated)

  which is torchft's scheme for a quantized all-reduce. Payloads are packed
  into ``uint8`` (:func:`pack_bytes`) before each collective: jax lowers
  collectives of float8/float4 arrays as f16 and of int4 as s8. The result
  equals :func:`coopjax.mixing.quantized_mean` (the unsharded reference) bit
  for bit when the compressor quantizes each row on its own.

  Args:
    workers: ``[b, R, C]`` float, this device's workers' arrays.
    compressor: a row-wise :class:`coopjax.compress.Compressor`.
    key: the key handed to ``encode``/``decode``.
    ctx: the sharded step's :class:`coopjax.parallel.context.ShardContext`.
    live: optional ``[m]`` booleans (global): the mean over the live workers,
      masked workers' chunks selected out before the sum (their bytes still
      travel: the collectives are static).

  Returns:
    ``[R, C]``: the dequantized mean, the same on every device.
  """
  D, b, m = ctx.num_devices, ctx.block, ctx.num_workers
  R, C = workers.shape[1:]
  r = -(-R // D)
  if r * D != R:
    workers = jnp.concatenate([workers, jnp.zeros((b, r * D - R, C), workers.dtype)], axis=1)
  chunks = workers.reshape(b, D, r, C)
  like = jax.ShapeDtypeStruct((r, C), workers.dtype)
  template = jax.eval_shape(lambda x: compressor.encode(x, key), like)
  encode = lambda x: compressor.encode(x, key)
  decode = lambda p: compressor.decode(p, like, key)
  sent = pack_bytes(jax.vmap(jax.vmap(encode))(chunks), rows=r, batch=2)  # [b, D, r, B] u8
  sent = jnp.swapaxes(sent, 0, 1)  # [D, b, r, B]: the chunk owner first
  got = lax.all_to_all(sent, ctx.axis_name, 0, 0, tiled=True)  # [D, b, r, B]: the source first
  got = got.reshape((m,) + got.shape[2:])  # [m, r, B]
  decoded = jax.vmap(decode)(unpack_bytes(got, template))  # [m, r, C], worker order
  if live is None:
    mean = sum_rows(decoded) / jnp.asarray(m, decoded.dtype)
  else:
    total = sum_rows(jnp.where(live.reshape(m, 1, 1), decoded, 0))
    mean = total / jnp.maximum(jnp.sum(live), 1).astype(total.dtype)
  own = pack_bytes(encode(mean), rows=r)  # [r, B] u8
  every = lax.all_gather(own, ctx.axis_name, axis=0, tiled=False)  # [D, r, B]
  out = jax.vmap(decode)(unpack_bytes(every, template))  # [D, r, C]
  return out.reshape(D * r, C)[:R]
