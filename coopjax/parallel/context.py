r"""Where a sharded step runs: the worker axis, the device count and the per-device block.

A cooperative transformation is an optax ``GradientTransformation``: its
``update(grads, state, X)`` sees arrays, not meshes. Under
``coopjax.make_step(..., mesh=mesh)`` it is traced inside ``jax.shard_map``, where
every device holds a block of ``b = m / D`` worker rows followed by a replicated
copy of the ``v`` auxiliary rows. The step activates a :class:`ShardContext`
while it traces the per-device function (:func:`sharded`), and the row
primitives of :mod:`coopjax.mixing` (and the row counts of
:func:`coopjax.workers.num_rows`) read it: this module is the single place
where that per-device meaning is defined. Outside a sharded step no context is
active and every primitive has its plain, whole-array meaning.

  >>> from coopjax.parallel import context
  >>> ctx = context.ShardContext("workers", num_devices=4, num_workers=8, num_aux=1)
  >>> ctx.block
  2
  >>> with context.sharded(ctx):
  ...   (context.to_global_rows(2), context.to_global_rows(3), context.to_global_rows(1))
  (8, 9, 1)
  >>> context.current() is None
  True
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

__all__ = [
  "ShardContext",
  "current",
  "sharded",
  "to_global_rows",
  "LiveContext",
  "current_live",
  "live_masked",
]


class ShardContext(NamedTuple):
  """Where a sharded step runs: the worker axis and the per-device block.

  Attributes:
    axis_name: the mesh axis the workers are sharded over (``coopjax.WORKER_AXIS``).
    num_devices: D, the size of that axis.
    num_workers: m, the global number of workers (a multiple of D).
    num_aux: v, the number of auxiliary rows, replicated on every device.

  Examples:
    Eight workers and one anchor over four devices: each device holds
    ``b = 8/4 = 2`` worker rows and a copy of the anchor.

    >>> ctx = ShardContext("workers", num_devices=4, num_workers=8, num_aux=1)
    >>> ctx.block
    2
  """

  axis_name: str
  num_devices: int
  num_workers: int
  num_aux: int

  @property
  def block(self) -> int:
    """b = m / D, the number of workers on each device."""
    return self.num_workers // self.num_devices


_CONTEXT: contextvars.ContextVar[ShardContext | None] = contextvars.ContextVar(
  "coopjax_shard_context", default=None
)


def current() -> ShardContext | None:
  """The active :class:`ShardContext`, or None outside a sharded step.

  Examples:
    >>> ctx = ShardContext("workers", num_devices=2, num_workers=4, num_aux=0)
    >>> current() is None
    True
    >>> with sharded(ctx):
    ...   current() == ctx
    True
  """
  return _CONTEXT.get()


@contextlib.contextmanager
def sharded(ctx: ShardContext) -> Iterator[ShardContext]:
  """Activates ``ctx`` while tracing a per-device (``shard_map``) function.

  Examples:
    >>> with sharded(ShardContext("workers", 2, 4, 0)) as ctx:
    ...   current().block
    2
    >>> with sharded(ShardContext("workers", 4, 6, 0)):
    ...   pass
    Traceback (most recent call last):
    ...
    ValueError: num_workers=6 is not a multiple of the 4 devices of mesh axis 'workers'; ...
  """
  if ctx.num_workers % ctx.num_devices:
    raise ValueError(
      f"num_workers={ctx.num_workers} is not a multiple of the {ctx.num_devices} devices of "
      f"mesh axis {ctx.axis_name!r}; use m = k * {ctx.num_devices} workers."
    )
  token = _CONTEXT.set(ctx)
  try:
    yield ctx
  finally:
    _CONTEXT.reset(token)


def to_global_rows(rows: int) -> int:
  """A leading-axis size seen on this device, as a global row count.

  Outside a sharded step it is returned unchanged. Inside, a local block of
  ``b`` rows counts as ``m`` and ``b + v`` as ``m + v``; other sizes (e.g. the
  ``v`` auxiliary rows alone, which are replicated) are unchanged.

  Examples:
    With ``m = 8`` workers and ``v = 1`` anchor on four devices (``b = 2``):

    >>> ctx = ShardContext("workers", num_devices=4, num_workers=8, num_aux=1)
    >>> with sharded(ctx):
    ...   to_global_rows(2), to_global_rows(3), to_global_rows(1)
    (8, 9, 1)
    >>> to_global_rows(2)  # outside a sharded step
    2
  """
  ctx = current()
  if ctx is None:
    return rows
  if rows == ctx.block:
    return ctx.num_workers
  if rows == ctx.block + ctx.num_aux:
    return ctx.num_workers + ctx.num_aux
  return rows


class LiveContext(NamedTuple):
  """Which workers are live while a transformation's update is traced.

  Attributes:
    live: bool array [m] over ALL m workers (replicated on every device in a
      sharded step); a traced value, so changing it does not recompile.
    fallback: None, or a traced bool scalar: True makes every graph mix use
      the mean over the live workers (the live subgraph is disconnected and
      the user asked for the fallback).
    graph: None, or the static bool [m, m] support on which the transformation
      judges the live workers' connectivity (``tx.graph``); a mix whose
      workers' graph leaves it is refused while tracing (a connectivity check
      on a smaller graph would pass a split live subgraph).

  Examples:
    >>> import jax.numpy as jnp
    >>> ctx = LiveContext(jnp.array([True, False, True]), None)
    >>> with live_masked(ctx):
    ...   current_live().live.tolist()
    [True, False, True]
    >>> current_live() is None
    True
  """

  live: Any
  fallback: Any = None
  graph: Any = None


_LIVE: contextvars.ContextVar[LiveContext | None] = contextvars.ContextVar(
  "coopjax_live_context", default=None
)


def current_live() -> LiveContext | None:
  """The active :class:`LiveContext`, or None (every worker live, today's program)."""
  return _LIVE.get()


@contextlib.contextmanager
def live_masked(ctx: LiveContext | None) -> Iterator[LiveContext | None]:
  """Activates ``ctx`` (None: no live mask) while tracing a transformation's update."""
  token = _LIVE.set(ctx)
  try:
    yield ctx
  finally:
    _LIVE.reset(token)
