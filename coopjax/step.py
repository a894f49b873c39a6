r"""The jitted cooperative step: local gradients, the transformation, metrics.

``make_step(loss_fn, tx)`` returns the card's pure function ``step(X, batch, k)``
in optax form, ``step(X, opt_state, batch) -> (X, opt_state, metrics)``: the
step counter k travels in ``opt_state`` (see :func:`coopjax.step_count`).
One step computes every worker's stochastic gradient on its own batch,

.. math::

   g_i = \nabla_x \ell(x_i; \xi_i), \qquad i = 1..m,

then applies the cooperative transformation (local update and, when
``k mod τ = 0``, the mix) and reports metrics. The per-worker losses reach the
transformation as the extra argument ``value`` (shape [m]), as optax passes
losses to e.g. ``reduce_on_plateau``; transformations that take no extra
arguments ignore it.

One body serves every placement. Without a mesh it runs on the stacked X;
with ``mesh=`` the same body runs inside ``jax.shard_map`` on each device's
block of rows, under a :class:`coopjax.mixing.ShardContext` that gives the
row primitives of :mod:`coopjax.mixing` (``split_rows``, ``worker_sum``, the
mixers) their per-device meaning. The metrics that reduce over workers
(``loss``, ``consensus_distance``, ``avg_grad_norm``) go through
:func:`coopjax.mixing.worker_sum` on both paths, so the defaults are the same
with and without a mesh.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from coopjax import diagnostics
from coopjax import live as live_lib
from coopjax import mixing
from coopjax.algorithms._cooperative import step_count
from coopjax.parallel import context
from coopjax.parallel import sharding
from coopjax.workers import WORKER_AXIS
from coopjax.workers import Layout
from coopjax.workers import num_rows

PyTree = Any

__all__ = ["make_step"]

BLOCK_EVERY = 8
"""A sharded step on several CPU devices waits for its result every this many calls."""

MESH_LOG_EVERY = 100
"""With a mesh, the default ``log_every``: the reducing metrics' all-reduces every 100 steps."""

_REDUCING = ("loss", "consensus_distance", "avg_grad_norm")


def _layout_of_tx(tx) -> Layout | None:
  layout = getattr(tx, "layout", None)
  return layout if isinstance(layout, Layout) else None


def _batch_rows(batch: PyTree, num_workers: int | None, source: str) -> int:
  """The batch's leading worker axis m, checked against ``num_workers`` when known."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch has no array leaves; pass per-worker data with leading axis m.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
      f"every batch leaf needs the same leading worker axis m, got leading sizes "
      f"{sorted(s for s in sizes if s is not None)}"
      + (" and a scalar leaf" if None in sizes else "")
      + "; reshape the batch to [m, per_worker_batch, ...]."
    )
  m = sizes.pop()
  if num_workers is not None and m != num_workers:
    raise ValueError(
      f"batch has leading axis {m} but {source}; give each worker its own batch: shape "
      f"[{num_workers}, per_worker_batch, ...]."
    )
  return m


def _is_example_leaf(x) -> bool:
  """Leaves that hold examples (not PRNG keys or raw uint32 key data)."""
  dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
  return not (
    jnp.issubdtype(dtype, jax.dtypes.prng_key) or jnp.issubdtype(dtype, jnp.unsignedinteger)
  )


def _check_worker_axis(batch: PyTree, m: int) -> None:
  r"""Flags a batch that lacks the worker axis although its first dimension is m.

  With the worker axis every example leaf reads ``[m, B, ...]``: per worker,
  each has a leading example axis B, the same for all leaves. A batch
  ``(x [B, d], y [B])`` with ``B = m`` instead gives per-worker shapes
  ``(d,)`` and ``()``: a per-worker floating-point scalar next to arrays, or
  leading sizes that disagree among the arrays. What shapes cannot tell
  passes: a single leaf ``[m, d]`` (m workers with one example each) and
  integer labels ``[B]`` next to ``[B, d]`` (an integer per worker, e.g. its
  index, next to a vector).
  """
  leaves = [x for x in jax.tree.leaves(batch) if _is_example_leaf(x)]
  shapes = [jnp.shape(x)[1:] for x in leaves]
  if len(shapes) < 2:
    return
  # A per-worker integer scalar next to arrays may be a worker's id or index: allowed.
  float_scalars = [
    x for x, s in zip(leaves, shapes, strict=True) if not s and jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  leading = {s[0] for s in shapes if s}
  if (float_scalars and len(leading) > 0) or len(leading) > 1:
    raise ValueError(
      f"the batch's leaves have per-worker shapes {[tuple(s) for s in shapes]} after the "
      f"leading axis of size m={m}: they share no example axis, as a batch WITHOUT the worker "
      f"axis whose first dimension happens to equal m would. Give each worker its own batch, "
      f"shape [m, per_worker_batch, ...] (e.g. x.reshape(m, -1, *x.shape[1:])). If these "
      f"per-worker shapes are intended, pass check_batch=False to coopjax.make_step."
    )


def _checked_loss(loss_fn: Callable, has_aux: bool) -> Callable:
  """``loss_fn`` with its output checked while tracing (one worker's view)."""

  def checked(params, batch):
    out = loss_fn(params, batch)
    if has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
          "make_step(..., has_aux=True) needs loss_fn to return (loss, aux), got "
          f"{type(out).__name__}; drop has_aux or return a pair."
        )
      loss = out[0]
    else:
      if isinstance(out, (tuple, list)):
        raise TypeError(
          f"loss_fn returned a {type(out).__name__} of {len(out)} values; if it returns "
          "(loss, aux), pass has_aux=True to coopjax.make_step."
        )
      loss = out
    shape = jnp.shape(loss)
    if shape != ():
      raise ValueError(
        f"loss_fn must return one scalar for ONE worker's batch, got shape {shape}: "
        "coopjax.make_step calls loss_fn(params, batch) per worker, with that worker's "
        "params and batch (no leading worker axis); reduce over the examples, e.g. "
        "jnp.mean(...)."
      )
    if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
      raise TypeError(f"loss_fn must return a floating-point scalar, got {jnp.result_type(loss)}.")
    return out

  return checked


def _worker_grads(loss_fn: Callable, has_aux: bool, rows: int) -> Callable:
  """Per-worker ``value_and_grad`` over ``rows`` stacked workers (no vmap for one)."""
  vg = jax.value_and_grad(_checked_loss(loss_fn, has_aux), has_aux=has_aux)
  if rows != 1:
    return jax.vmap(vg)

  def one(X_w, batch):
    squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
    out = vg(squeeze(X_w), squeeze(batch))
    return jax.tree.map(lambda a: jnp.expand_dims(a, 0), out)

  return one


def _live_tx(tx):
  """The :func:`coopjax.with_live_mask` transformation inside ``tx`` (itself or in a chain)."""
  if getattr(tx, "disconnected", None) is not None and getattr(tx, "graph", None) is not None:
    return tx
  raise ValueError(
    "on_nonfinite='quarantine' keeps the live mask in the optimizer state: build the "
    "transformation with coopjax.with_live_mask(tx) (and its state with its init)."
  )


def _apply_updates(X: PyTree, updates: PyTree) -> PyTree:
  """``X + U`` leafwise in X's dtypes (optax.apply_updates without its extra casts)."""
  return jax.tree.map(
    lambda x, u: x if u is None else (x + u).astype(x.dtype),
    X,
    updates,
    is_leaf=lambda u: u is None,
  )


def _merge_live(X: PyTree, merged: PyTree, opt_state: PyTree, m: int) -> PyTree:
  """``merged`` on the live workers' rows, ``X`` on the masked ones (a masked worker is frozen).

  Without a live mask in ``opt_state`` this is ``merged``. With one, the rows
  of the workers it masks (including those quarantined at this step, whose
  auxiliary output may be non-finite) keep their values; auxiliary rows come
  from ``merged``.
  """
  ls = live_lib.find_live_state(opt_state)
  if ls is None:
    return merged
  keep = mixing.local_live(ls.live)
  old, _ = mixing.split_rows(X, m)
  new, aux = mixing.split_rows(merged, m)
  rows = jax.tree.map(
    lambda n, o: jnp.where(keep.reshape(keep.shape + (1,) * (n.ndim - 1)), n, o), new, old
  )
  return mixing.join_rows(rows, aux)


def make_step(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  *,
  num_workers: int | None = None,
  has_aux: bool = False,
  merge_aux: Callable[[Any, Any], Any] | None = None,
  with_consensus: bool = True,
  with_grad_norm: bool = True,
  with_loss: bool = True,
  consensus_mask=None,
  donate: bool = False,
  jit: bool = True,
  mesh=None,
  check_finite: bool = False,
  check_batch: bool = True,
  log_every: int | None = None,
  on_nonfinite: str | None = None,
  readmit_after: int | None = None,
):
  r"""Builds the cooperative step ``step(X, opt_state, batch) -> (X, opt_state, metrics)``.

  .. math::

     g_i = \nabla \ell(x_i; \xi_i), \qquad
     (U, s_{k+1}) = \texttt{tx.update}(g, s_k, X_k), \qquad X_{k+1} = X_k + U.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` for ONE worker (or
      ``(scalar, aux)`` with ``has_aux=True``); checked while tracing.
    tx: a coopjax transformation (e.g. :func:`coopjax.local_sgd`), possibly
      inside ``optax.chain``. Its layout (``tx.layout``: m and v) checks X.
    num_workers: m; the batch's leading axis is checked against it (default:
      the m of ``tx.layout``, when ``tx`` has one).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux is reported per
      worker in ``metrics["aux"]``.
    merge_aux: optional ``merge_aux(X, aux) -> X`` applied before the
      transformation, e.g. :func:`coopjax.models.merge_batch_stats` to write
      fresh BatchNorm statistics into X, so that a mixing step mixes (or, with
      a ``mix_mask``, keeps local) the current statistics. Under a live mask
      (:func:`coopjax.with_live_mask`) only the live workers' rows are
      written: a masked or just quarantined worker's row stays as it was.
    with_consensus: report ``consensus_distance`` ``‖X_{k+1}(I − J)‖²_F``
      over the mixed leaves (:func:`coopjax.consensus_distance`).
    with_grad_norm: report ``avg_grad_norm`` ``‖(1/m)Σ_i g_i‖``, the norm of
      the averaged gradient that moves u_k (eq. 14); when the models agree it
      is the averaged model's stochastic gradient norm.
    with_loss: report ``loss``, the mean over workers. Under a live mask
      (:func:`coopjax.with_live_mask`) the reducing metrics (``loss``,
      ``consensus_distance``, ``avg_grad_norm``) are over the live workers.
    consensus_mask: the leaves the consensus distance counts: None (default)
      for the leaves ``tx`` mixes (its ``mix_mask``; all leaves when it has
      none), True for all leaves, or a pytree prefix of X with booleans.
    donate: donate X and opt_state buffers to the step (saves memory and a
      copy; the inputs cannot be reused after the call).
    jit: wrap in ``jax.jit`` (False gives the raw function, e.g. for
      ``chex.assert_max_traces``).
    mesh: a ``jax.sharding.Mesh`` with a ``"workers"`` axis: run the same
      step body inside ``jax.shard_map``, each device on its block of workers.
      X comes from :func:`coopjax.shard`, opt_state from
      :func:`coopjax.sharding.init`, the batch from :func:`coopjax.shard_batch`
      (a batch not yet on the mesh, e.g. a NumPy array, is placed by the
      step's input sharding when it is called, in the same layout). The
      reducing metrics add all-reduces (``consensus_distance`` and
      ``avg_grad_norm`` of the model's size): by default they run every
      :data:`MESH_LOG_EVERY` steps only (``log_every``), so off-steps stay
      free of communication. On several CPU devices the step waits
      for its result every :data:`BLOCK_EVERY` calls: without it, loops of
      unwaited steps with collectives deadlock (the CPU client runs out of
      threads; XLA reports a stuck ``RendezvousKey`` and aborts).
    check_finite: add the divergence flags of
      :func:`coopjax.diagnostics.finite_metrics`: ``nonfinite_workers`` (bool
      [m]: worker i's loss, gradient or model at step k is NaN/Inf) and
      ``nonfinite_rows`` (bool [m + v]: rows of X_{k+1}); check them on the
      host with :func:`coopjax.diagnostics.check_finite`.
    log_every: compute the metrics that reduce over workers (``loss``,
      ``consensus_distance``, ``avg_grad_norm``) only on the steps k that it
      divides, the steps a training loop logs; they are NaN on the others
      (``worker_loss`` is always there). Inside a ``lax.cond``, so with a mesh
      their all-reduces run on those steps only. Default (None): every step
      without a mesh; with a mesh every :data:`MESH_LOG_EVERY` (100) steps, so
      that the default step adds no model-sized all-reduce to an algorithm
      that communicates every τ steps (``log_every=1`` for every step).
    check_batch: check that the batch has the worker axis (its example leaves
      share an example axis after it); False skips that check for batches
      whose per-worker leaves differ in shape on purpose.
    on_nonfinite: None (default) or ``"quarantine"``: a live worker whose
      loss, gradient or model is NaN/Inf at step k is masked out of the live
      mask at step k (it takes no step and no mix; the others go on, mixing
      over the live workers). Needs ``tx`` built with
      :func:`coopjax.with_live_mask`. Adds the metrics ``live`` (bool [m],
      after the step), ``quarantined`` (bool [m], masked at this step),
      ``rejoined`` (bool [m]) and ``live_connected``; read them on the host
      with :func:`coopjax.live.check_quarantine`. ``loss`` and the other
      reductions then run over the live workers.
    readmit_after: with ``on_nonfinite="quarantine"``, re-admit a quarantined
      worker by :func:`coopjax.rejoin` (the live mean, EASGD's anchor or
      DiLoCo's outer model; its optimizer state reset) at the first step k
      with ``k − k_masked >= readmit_after`` that ends a period
      (``k mod tx.period == 0``); None never re-admits.

  Returns:
    ``step``; ``metrics`` holds ``worker_loss`` (shape [m]), ``step`` (k),
    ``loss`` (mean over workers), ``consensus_distance``, ``avg_grad_norm``
    (each unless turned off) and ``aux``.

  Raises:
    ValueError, TypeError: when the arguments, or (at the first call) the
      shapes of X and the batch or the output of ``loss_fn``, do not fit; the
      message names the argument to change.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=4)
    >>> X = coopjax.replicate({"w": jnp.zeros(3)}, num_workers=4)
    >>> loss_fn = lambda p, batch: jnp.mean((batch @ p["w"] - 1.0) ** 2)
    >>> step = coopjax.make_step(loss_fn, tx)
    >>> X, opt_state, metrics = step(X, tx.init(X), jnp.ones((4, 8, 3)))
    >>> sorted(metrics)
    ['avg_grad_norm', 'consensus_distance', 'loss', 'step', 'worker_loss']
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}.")
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(f"tx must be an optax GradientTransformation, got {type(tx).__name__}.")
  if num_workers is not None and (
    isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1
  ):
    raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}.")
  if merge_aux is not None and not has_aux:
    raise ValueError("merge_aux needs has_aux=True: loss_fn must return (loss, aux).")
  if log_every is None:
    log_every = 1 if mesh is None else MESH_LOG_EVERY
  if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
    raise ValueError(f"log_every must be a positive integer (steps) or None, got {log_every!r}.")
  if on_nonfinite not in (None, "quarantine"):
    raise ValueError(
      f"on_nonfinite must be None or 'quarantine', got {on_nonfinite!r}; to skip or stop on a "
      "NaN use check_finite=True with coopjax.diagnostics.skip_nonfinite / check_finite."
    )
  quarantine = on_nonfinite == "quarantine"
  if readmit_after is not None:
    if not quarantine:
      raise ValueError("readmit_after needs on_nonfinite='quarantine'.")
    if isinstance(readmit_after, bool) or not isinstance(readmit_after, int) or readmit_after < 1:
      raise ValueError(f"readmit_after must be a positive integer (steps), got {readmit_after!r}.")
  live_tx = _live_tx(tx) if quarantine else None
  layout = _layout_of_tx(tx)
  source = f"num_workers={num_workers}"
  if num_workers is None and layout is not None:  # the batch's rows are the workers of tx
    num_workers = layout.num_workers
    source = f"tx has {num_workers} workers (tx.layout)"
  mask = tx if consensus_mask is None else consensus_mask
  on = {"loss": with_loss, "consensus_distance": with_consensus, "avg_grad_norm": with_grad_norm}
  tx = optax.with_extra_args_support(tx)
  if mesh is not None:
    mesh = sharding.auto_mesh(mesh)

  def reducing_metrics(losses, grads, X_new, k) -> dict:
    """The metrics that reduce over workers, on the steps ``k`` that ``log_every`` divides."""

    def compute(_):
      out = {}
      if on["loss"]:
        out["loss"] = mixing.worker_mean(losses).astype(jnp.float32)
      if on["consensus_distance"]:
        out["consensus_distance"] = diagnostics.consensus_distance(X_new, mask)
      if on["avg_grad_norm"]:
        out["avg_grad_norm"] = optax.tree.norm(mixing.worker_mean(grads)).astype(jnp.float32)
      return out

    if log_every == 1 or not any(on.values()):
      return compute(None)
    skipped = lambda _: {name: jnp.full((), jnp.nan, jnp.float32) for name in on if on[name]}
    return jax.lax.cond(k % log_every == 0, compute, skipped, None)

  def body(X, opt_state, batch, m: int, ctx):
    """The step on m worker rows (all of X, or one device's block under ``ctx``)."""
    with context.sharded(ctx) if ctx is not None else contextlib.nullcontext():
      rows = m if ctx is None else ctx.block
      X_workers, _ = mixing.split_rows(X, m)
      value, grads = _worker_grads(loss_fn, has_aux, rows)(X_workers, batch)
      losses, aux = value if has_aux else (value, None)
      if quarantine:
        opt_state, grads, q = _quarantine(losses, grads, X_workers, opt_state, ctx)
      if merge_aux is not None:
        X = _merge_live(X, merge_aux(X, aux), opt_state, m)
      updates, opt_state = tx.update(grads, opt_state, X, value=losses)
      X_new = _apply_updates(X, updates)
      metrics = {"worker_loss": losses, "step": step_count(opt_state)}
      if quarantine:
        X_new, opt_state, q = _readmit(X_new, opt_state, q, metrics["step"])
        metrics.update(q)
      if check_finite:
        metrics.update(diagnostics.finite_metrics(losses, grads, X, X_new))
      live_state = live_lib.find_live_state(opt_state)
      scope = (  # metrics over the live workers: a masked worker's row may be non-finite
        context.live_masked(context.LiveContext(live_state.live))
        if live_state is not None
        else contextlib.nullcontext()
      )
      with scope:
        metrics.update(reducing_metrics(losses, grads, X_new, metrics["step"]))
      if has_aux:
        metrics["aux"] = aux
      return X_new, opt_state, metrics

  def _quarantine(losses, grads, X_workers, opt_state, ctx):
    """Masks out the live workers whose loss, gradient or model is non-finite at this step."""
    ls = live_lib.find_live_state(opt_state)
    bad = ~jnp.isfinite(losses)
    bad = bad | diagnostics.nonfinite_rows(grads) | diagnostics.nonfinite_rows(X_workers)
    if ctx is not None:
      bad = jax.lax.all_gather(bad, ctx.axis_name, axis=0, tiled=True)
    k = step_count(opt_state) + 1
    newly = ls.live & bad
    live = ls.live & ~bad
    since = jnp.where(newly, k, ls.down_since).astype(jnp.int32)
    opt_state = live_lib.replace_live_state(opt_state, ls._replace(live=live, down_since=since))
    keep = mixing.local_live(live)
    grads = jax.tree.map(
      lambda g: jnp.where(keep.reshape(keep.shape + (1,) * (g.ndim - 1)), g, jnp.zeros_like(g)),
      grads,
    )
    return opt_state, grads, {"quarantined": newly}

  def _readmit(X_new, opt_state, q, k):
    """Re-admits workers masked ``readmit_after`` steps ago, at the end of a period."""
    ls = live_lib.find_live_state(opt_state)
    rejoined = jnp.zeros_like(ls.live)
    if readmit_after is not None:
      period = int(getattr(live_tx, "period", 1) or 1)
      warm = int(getattr(live_tx, "warmup_steps", 0) or 0)
      ends = (k <= warm) | ((k - warm) % period == 0)
      rejoined = ~ls.live & (k - ls.down_since >= readmit_after) & ends
      X_new, opt_state = jax.lax.cond(
        jnp.any(rejoined),
        lambda X, s: live_lib.rejoin(X, s, live_tx, rejoined),
        lambda X, s: (X, s),
        X_new,
        opt_state,
      )
      ls = live_lib.find_live_state(opt_state)
    connected = mixing.live_connected(live_tx.graph, ls.live)
    return (
      X_new,
      opt_state,
      {**q, "live": ls.live, "rejoined": rejoined, "live_connected": connected},
    )

  def check_rows(X, m: int, per_device: int | None):
    n = num_rows(X, "X")
    num_aux = None if layout is None else layout.num_aux
    if per_device is None:  # plain
      if layout is not None and n != layout.num_rows:
        raise ValueError(
          f"X has {n} rows but the transformation has {layout.num_workers} workers + "
          f"{layout.num_aux} auxiliary rows (tx.layout); build X with "
          "coopjax.replicate(params, tx)."
        )
      if m > n:
        raise ValueError(
          f"batch has {m} worker rows but X has only {n} rows; X must stack m + v models "
          "(coopjax.replicate(params, tx))."
        )
      return n - m
    D = per_device
    b, v = sharding.split_counts(X, D, m)
    if num_aux is not None and v != num_aux:
      raise ValueError(
        f"X has {n} rows: {b} workers and {v} auxiliary rows per device, but the "
        f"transformation has {num_aux} auxiliary rows; place X with coopjax.shard(X, mesh, tx)."
      )
    return v

  def plain_step(X, opt_state, batch):
    m = _batch_rows(batch, num_workers, source)
    if check_batch:
      _check_worker_axis(batch, m)
    check_rows(X, m, None)
    return body(X, opt_state, batch, m, None)

  def sharded_step(X, opt_state, batch):
    D = sharding.num_devices(mesh)
    m = _batch_rows(batch, num_workers, source)
    if check_batch:
      _check_worker_axis(batch, m)
    v = check_rows(X, m, D)
    ctx = sharding.context_for(mesh, m, v)
    spec = P(WORKER_AXIS)
    local_state = sharding.local_shapes(tx.init, mesh, ctx, sharding.struct(X))
    state_specs = jax.tree.map(
      lambda loc, g: sharding.spec_of(loc.shape, jnp.shape(g)), local_state, opt_state
    )
    metric_specs = {"worker_loss": spec, "step": P()}
    metric_specs.update({name: P() for name in _REDUCING if on[name]})
    if check_finite:
      metric_specs.update(nonfinite_workers=spec, nonfinite_rows=(spec, P()))
    if quarantine:
      metric_specs.update(quarantined=P(), live=P(), rejoined=P(), live_connected=P())
    if has_aux:
      metric_specs["aux"] = spec

    def per_device(X, opt_state, batch):
      X, opt_state, metrics = body(X, opt_state, batch, m, ctx)
      if check_finite:  # rows of this device: its workers, then the replicated auxiliaries
        flags = metrics["nonfinite_rows"]
        metrics["nonfinite_rows"] = (flags[: ctx.block], flags[ctx.block :])
      return X, opt_state, metrics

    # check_vma=False: the transformations' lax.cond branches may return a reduced
    # (device-invariant) value in one branch and a per-device value in the other.
    mapped = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(spec, state_specs, spec),
      out_specs=(spec, state_specs, metric_specs),
      check_vma=False,
    )
    X, opt_state, metrics = mapped(X, opt_state, batch)
    if check_finite:
      metrics["nonfinite_rows"] = jnp.concatenate(metrics["nonfinite_rows"])
    return X, opt_state, metrics

  step = plain_step if mesh is None else sharded_step
  if not jit:
    return step
  donate_argnums = (0, 1) if donate else ()
  if mesh is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  placed = jax.jit(
    step,
    donate_argnums=donate_argnums,
    in_shardings=(None, None, sharding.worker_sharding(mesh)),
  )
  devices = list(mesh.devices.flat)
  on_cpu = len(devices) > 1 and all(d.platform == "cpu" for d in devices)
  block_every = BLOCK_EVERY if on_cpu else 0
  return _ShardedStep(placed, step, mesh, block_every)


class _ShardedStep:
  """The jitted sharded step: places stray batches and, on CPU devices, waits periodically."""

  def __init__(self, jitted, raw, mesh, block_every: int):
    self._jitted = jitted
    self._raw = raw
    self._mesh = mesh
    self._block_every = block_every
    self._calls = 0
    self._warned = False
    self.lower = jitted.lower
    self.trace = jitted.trace
    self.eval_shape = jitted.eval_shape
    self.__wrapped__ = jitted

  def __call__(self, X, opt_state, batch):
    try:
      out = self._jitted(X, opt_state, batch)
    except ValueError as e:
      jax.eval_shape(self._raw, X, opt_state, batch)  # the step's own checks name the fix
      if "incompatible devices" in str(e):
        raise ValueError(
          "X or opt_state is committed to devices other than the step's mesh (e.g. restored "
          "from a checkpoint onto one device). Place them on the mesh first: "
          "X = coopjax.shard(X, mesh, tx); opt_state = coopjax.sharding.init(tx, X, mesh) "
          "(docs/devices.md) — or restore a checkpoint with a target built from a state already "
          "on the mesh "
          "(checkpoint.abstract_target keeps shardings). JAX said: " + str(e).splitlines()[0]
        ) from None
      if "does not match the sharding" not in str(e):
        raise
      if not self._warned:
        warnings.warn(
          "the batch is committed to devices other than its workers' and is moved on every "
          "call; place it once with coopjax.shard_batch(batch, mesh).",
          stacklevel=2,
        )
        self._warned = True
      batch = jax.device_put(batch, sharding.worker_sharding(self._mesh))
      out = self._jitted(X, opt_state, batch)
    if self._block_every:
      self._calls += 1
      metrics = out[2]
      if self._calls % self._block_every == 0 and not any(
        isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(metrics)
      ):
        jax.block_until_ready(metrics)
    return out
