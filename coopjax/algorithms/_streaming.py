r"""Streaming DiLoCo: fragments synced in turn, each sync overlapped with inner steps.

DiLoCo (:func:`coopjax.diloco`) synchronises the whole model every H inner
steps. Streaming DiLoCo (Douillard et al., 2025) partitions the parameters
into P fragments and synchronises one fragment every ``h = H/P`` steps, so
each fragment still syncs every H steps but the peak bandwidth is 1/P of
DiLoCo's; a sync's reduction runs during the next τ inner steps, and the
outer gradients may travel quantized.

The schedule (steps counted from 1; "at step k" is after the inner step k).
Sync n = 1, 2, … concerns fragment

.. math::

   p_n = (n - 1 + o) \bmod P,

is snapshotted at step ``s_n = n h − c`` and applied at ``a_n = s_n + τ``
(``0 ≤ τ < h``, so at most one sync is pending at a time):

* ``schedule="torchft"`` (the default, torchft's ``local_sgd.py``): c = τ,
  o = 0; fragment 0 first, applied at the multiples of h;
* ``schedule="maxtext"`` (MaxText's JAX version): c = 0, o = 1; fragment 1
  first, snapshotted at the multiples of h.

At the snapshot every worker records ``Δ_i[p] = x_start[p] − x_i[p]``; at
the apply step

.. math::

   x_{\text{start}}[p] \leftarrow \mathrm{outer}_p\big(x_{\text{start}}[p],\;
     \tfrac1m \textstyle\sum_i Q(\Delta_i[p])\big), \qquad
   x_i[p] \leftarrow (1 - \alpha)\, x_{\text{start}}[p] + \alpha\, x_i[p],

with one optax outer state per fragment and ``x_i[p]`` the worker's fragment
*now*, after the τ delayed steps (α = 0 discards them on that fragment).
Other fragments and the inner optimizer state are untouched.

Fragments. ``fragments`` is a count P or labels as ``optax.multi_transform``
takes them (a pytree of labels for one model, or a function of one model
returning it; fragments ordered by sorted label). A count P assigns the
leaves, largest first (ties in ``jax.tree.leaves`` order), each to the
fragment with the fewest elements so far (the lowest index on ties): P
groups of near-equal size (:func:`fragment_leaves`).

Wire format. A fragment's leaves travel as one flat buffer of S values, S
the largest fragment's size (smaller fragments zero-padded), so every sync
issues the same collective whatever its fragment: one all-reduce of S
values, or with a compressor (a per-row quantizer such as
``coopjax.compress.int4()``) the buffer cut into rows of ``block_size``
values and averaged as :func:`coopjax.mixing.quantized_mean` does (an
all-to-all and an all-gather of ``uint8`` payloads, torchft's scheme).

Overlap. The reduction's operand is fixed at the snapshot and first read at
the apply step τ steps later: ``state.pending`` holds it, and
:func:`coopjax.make_period_step` over the h steps that start at a snapshot
issues the reduction first (outside every branch and loop) and consumes it
at the program's τ-th step (``tx.consume_at``). One step at a time
(:func:`coopjax.make_step`) the reduction runs inside the apply step's
branch. Where one program runs its collectives synchronously (XLA:CPU with
gloo), :func:`coopjax.parallel.overlap.make_overlapped_period` runs the
reduction as its own program from a second thread beside the τ − 1 steps
before the apply (``tx.reduce_pending``).

  >>> import jax.numpy as jnp, optax, coopjax
  >>> tx = coopjax.streaming_diloco(optax.sgd(0.1), outer=optax.sgd(1.0), H=2, fragments=2,
  ...                               num_workers=2)
  >>> X = coopjax.replicate({"a": jnp.zeros(()), "b": jnp.zeros(())}, 2)
  >>> state = tx.init(X)
  >>> g = {"a": jnp.array([1.0, 3.0]), "b": jnp.array([1.0, 3.0])}
  >>> updates, state = tx.update(g, state, X)
  >>> X = optax.apply_updates(X, updates)  # step 1 = h: fragment 0 ("a") averaged
  >>> [round(x, 4) for x in X["a"].tolist()], [round(x, 4) for x in X["b"].tolist()]
  ([-0.2, -0.2], [-0.1, -0.3])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import coopjax.algorithms._skeleton as _skeleton
from coopjax import compress
from coopjax import mixing
from coopjax._validation import check_int
from coopjax._validation import check_real
from coopjax.algorithms._nonblocking import StreamingDiLoCoState
from coopjax.algorithms._nonblocking import _issue_early
from coopjax.algorithms._nonblocking import _reduce_into_aux
from coopjax.algorithms._nonblocking import _reduction
from coopjax.algorithms._nonblocking import overlap_states
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.cost import pattern
from coopjax.workers import Layout

PyTree = Any

__all__ = [
  "StreamingDiLoCoState",
  "streaming_diloco",
  "fragment_leaves",
  "SCHEDULES",
  "Sync",
  "streaming_syncs",
]

SCHEDULES = {"torchft": "c = τ, o = 0", "maxtext": "c = 0, o = 1"}
"""The published schedules: ``(c, o)`` of the snapshot offset and the first fragment."""


def _schedule_constants(schedule: str, delay: int) -> tuple[int, int]:
  if schedule not in SCHEDULES:
    raise ValueError(
      f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}: 'torchft' snapshots at "
      "n·h − τ and applies at n·h (fragment 0 first); 'maxtext' snapshots at n·h and applies "
      "at n·h + τ (fragment 1 first)."
    )
  return (delay, 0) if schedule == "torchft" else (0, 1)


class Sync(NamedTuple):
  """One sync of the schedule (:func:`streaming_syncs`).

  Attributes:
    n: the sync's index, counted from 1.
    fragment: p_n, the fragment it concerns.
    snapshot: the step after which Δ is recorded (n·h − c).
    apply: the step after which the outer update lands (snapshot + τ).
  """

  n: int
  fragment: int
  snapshot: int
  apply: int


def streaming_syncs(
  *, H: int, fragments: int, delay: int = 0, schedule: str = "torchft", steps: int
) -> list[Sync]:
  """The syncs whose apply step is at most ``steps`` (host-side, for plans and plots).

  Examples:
    >>> [tuple(s) for s in streaming_syncs(H=4, fragments=2, delay=1, steps=6)]  # torchft: c = τ, o = 0
    [(1, 0, 1, 2), (2, 1, 3, 4), (3, 0, 5, 6)]
    >>> [tuple(s) for s in streaming_syncs(H=4, fragments=2, delay=1, schedule="maxtext", steps=6)]
    [(1, 1, 2, 3), (2, 0, 4, 5)]
  """
  h, P, delay = _check_schedule(H, fragments, delay)
  c, o = _schedule_constants(schedule, delay)
  out, n = [], 1
  while n * h - c + delay <= steps:
    out.append(Sync(n, (n - 1 + o) % P, n * h - c, n * h - c + delay))
    n += 1
  return out


def _check_schedule(H, P, delay) -> tuple[int, int, int]:
  H = check_int("H", H, 1)
  P = check_int("fragments", P, 1)
  delay = check_int("delay", delay, 0)
  if H % P:
    raise ValueError(
      f"H={H} is not divisible by the number of fragments P={P}: fragments sync every h = H/P "
      "steps; choose H a multiple of P."
    )
  h = H // P
  if delay >= h:
    raise ValueError(
      f"delay={delay} must be smaller than h = H/P = {h} (one sync in flight at a time); use "
      f"delay < {h} or fewer fragments."
    )
  return h, P, delay


def fragment_leaves(model: PyTree, fragments, mix_mask: PyTree | None = None) -> list[list[int]]:
  """The partition of ``model``'s leaves (indices in ``jax.tree.leaves`` order) into fragments.

  Args:
    model: one model (no worker axis), arrays or ``jax.ShapeDtypeStruct``.
    fragments: a count P (near-equal sizes: leaves largest first, ties in
      leaf order, each to the fragment with the fewest elements so far, the
      lowest index on ties), or labels as ``optax.multi_transform`` takes
      them: a pytree of labels with the model's structure, or a function of
      the model returning one; fragments are ordered by sorted label.
    mix_mask: optional pytree prefix of ``model`` with booleans: leaves
      marked False (e.g. BatchNorm statistics kept per worker) belong to no
      fragment and are never synced.

  Returns:
    P lists of leaf indices, each sorted.

  Examples:
    >>> import jax.numpy as jnp
    >>> model = {"a": jnp.zeros(6), "b": jnp.zeros(4), "c": jnp.zeros(3)}
    >>> fragment_leaves(model, 2)  # sizes 6 | 4 + 3
    [[0], [1, 2]]
    >>> fragment_leaves(model, lambda p: {"a": "x", "b": "y", "c": "x"})
    [[0, 2], [1]]
    >>> fragment_leaves(model, 2, mix_mask={"a": False, "b": True, "c": True})
    [[1], [2]]
  """
  if mix_mask is not None:
    flags = mixing.leaf_flags(mixing.check_mask(mix_mask, model), model)
    kept = [i for i, keep in enumerate(flags) if keep]
    if not kept:
      raise ValueError("mix_mask selects no leaf: there is nothing to sync.")
    if isinstance(fragments, (int, np.integer)) and not isinstance(fragments, bool):
      if check_int("fragments", fragments, 1) > len(kept):
        raise ValueError(
          f"fragments={fragments} but mix_mask syncs only {len(kept)} of the model's "
          f"{len(flags)} leaves (leaves are not split); use at most {len(kept)} fragments or "
          "label the leaves yourself."
        )
      groups = fragment_leaves([jax.tree.leaves(model)[i] for i in kept], fragments)
      return [[kept[j] for j in g] for g in groups]
    groups = [[i for i in g if flags[i]] for g in fragment_leaves(model, fragments)]
    return [g for g in groups if g]
  leaves = jax.tree.leaves(model)
  if isinstance(fragments, (int, np.integer)) and not isinstance(fragments, bool):
    P = check_int("fragments", fragments, 1)
    if P > len(leaves):
      raise ValueError(
        f"fragments={P} but the model has only {len(leaves)} leaves (leaves are not split); "
        f"use at most {len(leaves)} fragments or label the leaves yourself."
      )
    sizes = [int(np.prod(np.shape(x), dtype=np.int64)) for x in leaves]
    order = sorted(range(len(leaves)), key=lambda i: (-sizes[i], i))
    load, groups = [0] * P, [[] for _ in range(P)]
    for i in order:
      p = min(range(P), key=lambda q: (load[q], q))
      load[p] += sizes[i]
      groups[p].append(i)
    return [sorted(g) for g in groups]
  labels = fragments(model) if callable(fragments) else fragments
  try:
    flat = jax.tree.leaves(
      jax.tree.map(lambda _, label: label, model, labels, is_leaf=lambda x: x is None)
    )
  except (ValueError, TypeError) as e:
    raise ValueError(
      "fragments labels must have the structure of one model (one label per leaf, as "
      f"optax.multi_transform takes them); mismatch: {e}"
    ) from None
  try:
    names = sorted(set(flat))
  except TypeError:
    raise TypeError(
      f"fragment labels must be mutually comparable (all str or all int), got {set(flat)}."
    ) from None
  return [[i for i, label in enumerate(flat) if label == name] for name in names]


class _Layout(NamedTuple):
  """Where each fragment's leaves sit in the flat buffer (static)."""

  groups: tuple[tuple[int, ...], ...]
  shapes: tuple[tuple[int, ...], ...]  # per leaf, without the worker axis
  size: int  # S: the padded buffer's length
  dtype: Any


def _buffer_layout(model: PyTree, fragments, block: int | None, mix_mask=None) -> _Layout:
  leaves = jax.tree.leaves(model)
  groups = tuple(tuple(g) for g in fragment_leaves(model, fragments, mix_mask))
  for i in sorted(i for g in groups for i in g):
    if not jnp.issubdtype(leaves[i].dtype, jnp.floating):
      raise TypeError(
        f"streaming_diloco syncs floating-point parameters only, got a leaf of dtype "
        f"{leaves[i].dtype}; keep it out of the syncs with mix_mask."
      )
  shapes = tuple(tuple(np.shape(x)) for x in leaves)
  sizes = [sum(int(np.prod(shapes[i], dtype=np.int64)) for i in g) for g in groups]
  size = max(sizes)
  if block is not None:
    size = -(-size // block) * block
  synced = [leaves[i] for g in groups for i in g]
  dtype = jnp.float32 if block is not None else jnp.result_type(*[x.dtype for x in synced])
  return _Layout(groups, shapes, size, dtype)


def _one_model(X: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), X)


def _gather(leaves: list, layout: _Layout, p: int) -> jax.Array:
  """Fragment p of stacked leaves (``[rows, ...]``) as one buffer ``[rows, S]``."""
  rows = leaves[0].shape[0]
  parts = [leaves[i].reshape(rows, -1).astype(layout.dtype) for i in layout.groups[p]]
  used = sum(x.shape[1] for x in parts)
  if used < layout.size:
    parts.append(jnp.zeros((rows, layout.size - used), layout.dtype))
  return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _scatter(buffer: jax.Array, layout: _Layout, p: int, like: list) -> list:
  """The buffer ``[S]`` as fragment p's leaves (shapes and dtypes of ``like``, one model)."""
  out, start = [], 0
  for i, x in zip(layout.groups[p], like, strict=True):
    n = int(np.prod(layout.shapes[i], dtype=np.int64))
    out.append(buffer[start : start + n].reshape(layout.shapes[i]).astype(x.dtype))
    start += n
  return out


def _check_row_wise(compressor: compress.Compressor, block: int) -> None:
  """Refuses a compressor that does not quantize a ``[rows, block]`` buffer row by row.

  The quantized mean cuts the buffer into rows and sends each chunk of rows to
  its owner device (:func:`coopjax.mixing.quantized_mean`): the payload of two
  rows must be the two rows' payloads stacked, and each row's reconstruction
  must not depend on the other row (a per-leaf norm, scale or top-k fails).
  """
  key = jax.random.key(0)

  def payload_sizes(rows: int) -> list[int]:
    like = jax.ShapeDtypeStruct((rows, block), jnp.float32)
    return [
      int(np.prod(p.shape)) for p in jax.tree.leaves(jax.eval_shape(compressor.encode, like, key))
    ]

  ramp = np.arange(1, block + 1, dtype=np.float32) * np.where(np.arange(block) % 2, -1, 1)
  two = jnp.asarray(np.stack([ramp, 100 * ramp[::-1]]))
  same_shape = payload_sizes(2) == [2 * n for n in payload_sizes(1)]
  alone = compressor.decode(compressor.encode(two[:1], key), two[:1], key)
  together = compressor.decode(compressor.encode(two, key), two, key)[:1]
  if not (same_shape and bool(jnp.array_equal(alone, together))):
    raise ValueError(
      f"streaming_diloco's compressor must quantize row by row (block_size={block} values per "
      f"row, each with its own scale), as compress.int8() and compress.int4() with an even "
      f"block_size do; {compressor.name!r} does not (its payload or reconstruction of a row "
      "depends on the other rows). Use compress.int8() / compress.int4(), or compressor=None "
      "for float32 outer gradients."
    )


def streaming_diloco(
  local: optax.GradientTransformation,
  *,
  outer: optax.GradientTransformation,
  H: int,
  fragments: int | PyTree | Callable[[PyTree], PyTree],
  num_workers: int,
  delay: int = 0,
  alpha: float = 0.0,
  compressor: compress.Compressor | None = None,
  block_size: int = 256,
  schedule: str = "torchft",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
) -> CooperativeTransformation:
  r"""Streaming DiLoCo (Douillard et al., 2025): P fragments synced in turn, overlapped, quantized.

  Sync n (n = 1, 2, …) concerns fragment ``p_n = (n − 1 + o) mod P``; it is
  snapshotted at step ``n·h − c`` and applied τ steps later (h = H/P):

  .. math::

     \Delta_i[p] = x_{\text{start}}[p] - x_i[p] \ \text{(snapshot)}, \qquad
     x_{\text{start}}[p] \leftarrow \mathrm{outer}_p\big(x_{\text{start}}[p],
       \tfrac1m \textstyle\sum_i Q(\Delta_i[p])\big), \quad
     x_i[p] \leftarrow (1-\alpha)\, x_{\text{start}}[p] + \alpha\, x_i[p]
     \ \text{(apply)},

  with torchft's schedule (c = τ, o = 0: fragment 0 first, applied at the
  multiples of h; the default) or MaxText's (c = 0, o = 1: fragment 1 first,
  snapshotted at the multiples of h). P = 1, τ = 0, α = 0 is
  :func:`coopjax.diloco` with period H; ``outer=optax.sgd(1.0)`` with
  τ = α = 0 averages every fragment every H steps, at the schedule's phase.
  See the module docstring for the wire format and the overlap.

  Args:
    local: the inner optimizer, applied to each worker separately (its state
      is never touched by a sync).
    outer: the outer optax optimizer; each fragment gets its own state
      (``outer.init`` of the list of its leaves).
    H: the steps between two syncs of the same fragment (DiLoCo's period).
    fragments: a count P or labels (a pytree of labels for one model, or a
      function of one model returning it, as ``optax.multi_transform``);
      see :func:`fragment_leaves` for the order.
    num_workers: m; X has m rows.
    delay: τ, the inner steps between a snapshot and its apply (0 ≤ τ < h).
    alpha: α ∈ [0, 1], the weight of the worker's own fragment in the merge
      (0 takes ``x_start[p]``).
    compressor: None (float outer gradients) or a row-wise quantizer (e.g.
      ``coopjax.compress.int4()``) for ``Q``: the buffer is cut into rows of
      ``block_size`` values, each quantized with its own scale.
    block_size: values per quantized row (with a compressor).
    schedule: ``"torchft"`` (default) or ``"maxtext"``.
    mix_mask: optional pytree prefix of one model with booleans: leaves
      marked False (BatchNorm statistics) are in no fragment and stay per
      worker (a count P then splits the other leaves).
    warmup_steps: steps of fully synchronous SGD first (post-local SGD).

  Returns:
    A :class:`CooperativeTransformation` with state
    :class:`StreamingDiLoCoState`; besides the usual description it carries
    ``consume_at`` (τ: the step of a period program that starts at a
    snapshot whose mix consumes the issued reduction), ``wire_dtype``,
    ``bytes_per_sync(model)`` (one worker's payload of one sync) and
    ``reduce_pending`` (the sync's reduction of ``state.pending``, which
    :func:`coopjax.parallel.overlap.make_overlapped_period` runs as its own
    program).

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.streaming_diloco(optax.sgd(0.1), outer=optax.sgd(0.7, momentum=0.9,
    ...   nesterov=True), H=8, fragments=4, delay=1, num_workers=4)
    >>> [tx.comm(k).collective for k in range(1, 5)]  # applies at 2, 4, 6, 8: one fragment each
    ['none', 'all_reduce', 'none', 'all_reduce']
    >>> tx.bytes_per_sync({"a": jnp.zeros(100), "b": jnp.zeros(100), "c": jnp.zeros(100),
    ...                    "d": jnp.zeros(100)})  # 100 float32 values
    400

  References:
    Douillard et al., Streaming DiLoCo with overlapping communication,
    arXiv 2501.18512, 2025; Douillard et al., DiLoCo, arXiv 2311.08105, 2023;
    torchft ``torchft/local_sgd.py`` (``StreamingDiLoCo``).
  """
  if not (hasattr(outer, "init") and hasattr(outer, "update")):
    raise TypeError(
      f"outer must be an optax GradientTransformation (e.g. optax.sgd(0.7, momentum=0.9, "
      f"nesterov=True)), got {type(outer).__name__}."
    )
  m = check_int("num_workers", num_workers, 1)
  H = check_int("H", H, 1)
  delay = check_int("delay", delay, 0)
  alpha = check_real("alpha", alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(
      f"alpha must be in [0, 1] (the worker's own fragment's weight in the merge "
      f"(1 − α)·x_start + α·x_i), got {alpha}; 0 takes the outer model, 1 keeps the "
      "worker's own fragment."
    )
  c, o = _schedule_constants(schedule, delay)
  count_given = isinstance(fragments, (int, np.integer)) and not isinstance(fragments, bool)
  if count_given:
    _check_schedule(H, fragments, delay)
  elif not callable(fragments) and not jax.tree.leaves(fragments):
    raise TypeError(
      f"fragments must be a count P, a pytree of labels or a label function, got {fragments!r}."
    )
  if compressor is not None and not isinstance(compressor, compress.Compressor):
    raise TypeError(
      f"compressor must be a coopjax.compress.Compressor (e.g. coopjax.compress.int4()) or "
      f"None, got {type(compressor).__name__}."
    )
  block = check_int("block_size", block_size, 1) if compressor is not None else None
  if compressor is not None:
    _check_row_wise(compressor, block)
  key = jax.random.key(0)

  @functools.lru_cache(maxsize=16)
  def layout_of(treedef, shapes) -> _Layout:
    model = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    layout = _buffer_layout(model, fragments, block, mix_mask)
    _check_schedule(H, len(layout.groups), delay)
    return layout

  def layout_for(X) -> _Layout:
    leaves, treedef = jax.tree.flatten(_one_model(X))
    return layout_of(treedef, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves))

  def timing(k, P):
    h = H // P
    snap_n, apply_n = (k + c) // h, (k + c - delay) // h
    snap = ((k + c) % h == 0) & (snap_n >= 1)
    app = ((k + c - delay) % h == 0) & (apply_n >= 1)
    return snap, (snap_n - 1 + o) % P, app, (apply_n - 1 + o) % P

  if compressor is None:
    mean_rows = _reduce_into_aux(mixing.Mix.mean_into_aux(m, overlappable=delay > 0))

    def reduce(pending):  # the workers' fragment models -> their mean
      return mean_rows({"fragment": pending})["fragment"]

  else:

    def reduce(pending):  # the workers' Δ -> Q(mean_i Q(Δ_i))
      rows = pending.reshape(pending.shape[0], -1, block)
      return mixing.quantized_mean(rows, compressor, key).reshape(-1)

  def init_extra(params):
    layout = layout_for(params)
    x_start = mixing.worker_mean(params)  # x_0 when X is replicated
    leaves = jax.tree.leaves(x_start)
    outer_states = tuple(outer.init([leaves[i] for i in g]) for g in layout.groups)
    rows = jax.tree.leaves(params)[0].shape[0]
    if not delay:  # τ = 0 snapshots and applies at one step: nothing to carry between steps
      return x_start, outer_states, ()
    return x_start, outer_states, jnp.zeros((rows, layout.size), layout.dtype)

  def should_mix(k, extra):
    snap, _, app, _ = timing(k, len(extra[1]))
    return snap | app

  def on_mix(k, X, extra, inputs):
    x_start, outer_states, pending = extra
    layout = layout_for(X)
    P = len(layout.groups)
    snap, p_snap, app, p_apply = timing(k, P)
    x_leaves, treedef = jax.tree.flatten(X)
    s_leaves = jax.tree.leaves(x_start)

    def snapshot(_=None):
      def take(p):
        def branch(_):
          rows = _gather(x_leaves, layout, p)
          if compressor is None:
            return rows.astype(layout.dtype)
          anchor = _gather([jnp.expand_dims(s, 0) for s in s_leaves], layout, p)
          return (anchor - rows).astype(layout.dtype)  # Δ_i = x_start − x_i

        return branch

      return jax.lax.switch(p_snap, [take(p) for p in range(P)], None)

    if delay:
      pending = jax.lax.cond(snap, snapshot, lambda q: q, pending)

    def apply(operands):
      x_leaves, s_leaves, outer_states = operands
      if delay:
        reduced = _reduction(pending, inputs.prefetched, delay, k, reduce)
      else:  # τ = 0: the snapshot is taken and reduced at the apply step itself
        reduced = reduce(snapshot())

      def land(p):
        def branch(_):
          idx = layout.groups[p]
          start = [s_leaves[i] for i in idx]
          mean = _scatter(reduced, layout, p, start)
          if compressor is None:
            delta = [s - x for s, x in zip(start, mean, strict=True)]  # x_start − mean_i x_i
          else:
            delta = mean  # mean_i Q(Δ_i)
          updates, state = outer.update(delta, outer_states[p], start)
          new = optax.apply_updates(start, updates)
          states = tuple(state if q == p else s for q, s in enumerate(outer_states))
          xs, ss = list(x_leaves), list(s_leaves)
          for i, s in zip(idx, new, strict=True):
            ss[i] = s
            x = xs[i]
            a = jnp.asarray(alpha, x.dtype)
            xs[i] = (1 - a) * jnp.expand_dims(s, 0).astype(x.dtype) + a * x
          return xs, ss, states

        return branch

      return jax.lax.switch(p_apply, [land(p) for p in range(P)], None)

    x_leaves, s_leaves, outer_states = jax.lax.cond(
      app, apply, lambda ops: ops, (x_leaves, s_leaves, outer_states)
    )
    X = jax.tree.unflatten(treedef, x_leaves)
    x_start = jax.tree.unflatten(jax.tree.structure(x_start), s_leaves)
    return X, (x_start, outer_states, pending)

  def prefetch(k, extra):
    return _issue_early(StreamingDiLoCoState, extra[2], reduce)

  base_cost = pattern.all_reduce(m, overlappable=delay > 0)

  def cost(fraction: float, wire_fraction: float) -> pattern.MixCost:
    """The quantized mean's all-to-all and all-gather move what a ring all-reduce moves."""
    if base_cost.collective == "none":
      return base_cost
    return base_cost._replace(fraction=fraction, wire_fraction=wire_fraction)

  def comm(k: int, opt_state=None) -> pattern.MixCost:
    if opt_state is not None:
      (state,) = [s for s in overlap_states(opt_state) if isinstance(s, StreamingDiLoCoState)]
      P = len(state.outer_states)
      synced = mixing.leaf_flags(mix_mask, state.x_start)  # the mixed leaves: a model's bytes
      model = sum(
        x.size * x.dtype.itemsize
        for x, keep in zip(jax.tree.leaves(state.x_start), synced, strict=True)
        if keep
      )
      layout = _buffer_layout(state.x_start, fragments, block, mix_mask)
      size, dtype = layout.size, layout.dtype
      dense = size * jnp.dtype(dtype).itemsize
      fraction, wire_fraction = dense / model, _wire_bytes(size, dtype) / dense
    elif count_given:
      P, fraction, wire_fraction = int(fragments), 1.0 / int(fragments), nominal_wire
    else:
      raise ValueError(
        "with labelled fragments the schedule depends on the model: call tx.comm(k, opt_state) "
        "with the state from tx.init."
      )
    _, _, app, _ = timing(np.int64(k), P)
    return cost(fraction, wire_fraction) if bool(app) else pattern.NO_COMM

  def _wire_bytes(size: int, dtype) -> int:
    if compressor is None:
      return size * jnp.dtype(dtype).itemsize
    return compress.payload_bytes(compressor, np.zeros((size // block, block), np.float32))

  nominal_wire = 1.0 if compressor is None else _wire_bytes(block, jnp.float32) / (4 * block)

  def bytes_per_sync(model: PyTree) -> int:
    """One worker's payload of one sync, in bytes, for a model shaped like ``model``."""
    layout = _buffer_layout(model, fragments, block, mix_mask)
    return _wire_bytes(layout.size, layout.dtype)

  tx = _skeleton.transformation(
    "streaming_diloco",
    local,
    Layout(m, 0),
    state_cls=StreamingDiLoCoState,
    should_mix=should_mix,
    on_mix=on_mix,
    init_extra=init_extra,
    prefetch=prefetch,
    comm=comm,
    mix_cost=cost(1.0 / int(fragments) if count_given else 1.0, nominal_wire),
    overlaps=delay > 0,
    period=H // int(fragments) if count_given else H,
    orders=("step_then_mix",),
    policies=("keep",),
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
  )
  return tx.describe(
    consume_at=delay,
    delay=delay,
    alpha=alpha,
    schedule=schedule,
    compressor=compressor,
    wire_dtype="float32" if compressor is None else "uint8",
    bytes_per_sync=bytes_per_sync,
    reduce_pending=reduce,
  )
