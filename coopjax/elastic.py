r"""Changing the number of workers: dropping rows, adding rows, rebuilding the algorithm.

A run of A(τ, W, v) with m workers is resized to m′ workers by a row map
:math:`R` from the old rows to the new ones. With ``keep`` the old workers
that stay (in order) and :math:`\bar x_K = \frac{1}{|K|}\sum_{i \in K} x_i`
their mean,

.. math::

   x'_j = x_{\text{keep}[j]} \quad (j < |K|), \qquad
   x'_j = \bar x_K \quad (|K| \le j < m'), \qquad
   z'_l = z_l \quad (l < v),

so a grown run's new workers start at the mean of the old ones, never at
zeros, and the auxiliary rows (EASGD's anchor) are kept. The optimizer state
follows the same map leaf by leaf (:func:`resize`): each kept worker keeps its
local optimizer state, a new worker's floating-point buffers (momentum, Adam
moments) start fresh, and its integer counters (the local optimizer's step,
which drives a learning-rate schedule) are copied from a kept worker, so
nobody rejoins with a restarted schedule. What depends on m but is not a row
(the mixing matrix W, EASGD's α, the data assignment) is rebuilt: W and α by
the user's factory ``make_tx(m′)`` (the same algorithm and topology family for
the new m; :func:`scale_alpha` keeps EASGD's α at the same place in its
stability range), the data by :meth:`coopjax.data.WorkerBatches.resplit`.

Two places use this: an elastic restart from a checkpoint with a different m
(restore the m-worker state, :func:`resize`, continue), and the multi-process
loop of :func:`coopjax.distributed.resilient_loop`, which drops the rows of a
dead process's devices (``docs/elastic.md``).

  >>> import jax.numpy as jnp, optax, coopjax
  >>> from coopjax import elastic
  >>> make_tx = lambda m: coopjax.local_sgd(optax.sgd(0.1, momentum=0.9), tau=2, num_workers=m)
  >>> X = {"w": jnp.array([[1.0], [2.0], [6.0]])}
  >>> X4, state4 = elastic.resize(X, make_tx(3).init(X), make_tx(3), make_tx(4))
  >>> X4["w"].ravel().tolist()  # the new worker at the mean of the old three
  [1.0, 2.0, 6.0, 3.0]
  >>> X2, state2 = elastic.resize(X, make_tx(3).init(X), make_tx(3), make_tx(2), keep=[0, 2])
  >>> X2["w"].ravel().tolist()
  [1.0, 6.0]
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from coopjax import live as live_lib
from coopjax._validation import check_int
from coopjax.algorithms._nonblocking import OverlapState
from coopjax.algorithms._nonblocking import StreamingDiLoCoState
from coopjax.workers import Layout
from coopjax.workers import layout_of
from coopjax.workers import num_rows
from coopjax.workers import sum_rows

PyTree = Any

__all__ = ["RowMap", "row_map", "remap_rows", "resize", "scale_alpha"]


class RowMap(NamedTuple):
  """Where each worker row of the resized run comes from.

  Attributes:
    num_workers: m, the old number of workers.
    new_num_workers: m′.
    keep: the old worker indices kept, in order: new row ``j < len(keep)`` is
      old row ``keep[j]``; rows ``len(keep) .. m′ − 1`` are new (the mean of the
      kept rows).

  Examples:
    >>> from coopjax import elastic
    >>> rmap = elastic.RowMap(num_workers=3, new_num_workers=4, keep=(0, 2))
    >>> rmap.num_new, rmap.is_identity
    (2, False)
  """

  num_workers: int
  new_num_workers: int
  keep: tuple[int, ...]

  @property
  def num_new(self) -> int:
    """m′ − len(keep): the rows that start at the mean."""
    return self.new_num_workers - len(self.keep)

  @property
  def is_identity(self) -> bool:
    """Whether every row stays where it is (nothing to do)."""
    return self.keep == tuple(range(self.num_workers)) and self.num_new == 0


def row_map(num_workers: int, new_num_workers: int, keep: Sequence[int] | None = None) -> RowMap:
  """Checks and completes the row map from m to m′ workers.

  Args:
    num_workers: m.
    new_num_workers: m′.
    keep: the old workers that stay, strictly increasing indices in
      ``[0, m)``, at most m′ of them. Default: all m when growing
      (``m′ ≥ m``), the first m′ when shrinking.

  Returns:
    The :class:`RowMap`.

  Raises:
    ValueError: naming the bad index or count.

  Examples:
    >>> from coopjax import elastic
    >>> elastic.row_map(8, 6, keep=[0, 1, 2, 4, 5, 7])
    RowMap(num_workers=8, new_num_workers=6, keep=(0, 1, 2, 4, 5, 7))
    >>> elastic.row_map(6, 8).num_new
    2
    >>> elastic.row_map(3, 2, keep=[2, 0])
    Traceback (most recent call last):
    ...
    ValueError: keep must be strictly increasing worker indices in [0, 3), got [2, 0].
  """
  m = check_int("num_workers", num_workers, 1)
  m_new = check_int("new_num_workers", new_num_workers, 1)
  if keep is None:
    keep = range(min(m, m_new))
  keep_list = list(keep)
  if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in keep_list):
    raise ValueError(f"keep must hold integer worker indices, got {keep_list!r}.")
  keep_t = tuple(int(i) for i in keep_list)
  if any(i < 0 or i >= m for i in keep_t) or any(
    a >= b for a, b in zip(keep_t[:-1], keep_t[1:], strict=True)
  ):
    raise ValueError(
      f"keep must be strictly increasing worker indices in [0, {m}), got {list(keep_t)}."
    )
  if not keep_t:
    raise ValueError("keep is empty: at least one worker must stay (its rows seed the new ones).")
  if len(keep_t) > m_new:
    raise ValueError(
      f"keep lists {len(keep_t)} workers but the resized run has only {m_new}; keep at most "
      f"{m_new}."
    )
  rmap = RowMap(m, m_new, keep_t)
  if m == m_new and not rmap.is_identity:
    raise ValueError(
      f"keep={list(keep_t)} drops workers and adds as many back (m stays {m}): the per-worker "
      "leaves of the optimizer state cannot be told from the others when m does not change. "
      "Resize in two calls: first to len(keep) workers, then back to m."
    )
  return rmap


def _rows(
  x: jax.Array,
  rmap: RowMap,
  num_aux: int,
  new_rows: jax.Array | None,
  seeds: Sequence[int] | None = None,
) -> jax.Array:
  """``x`` (leading axis m + v) with its worker rows mapped; auxiliary rows kept.

  ``new_rows`` holds the rows for ``len(keep) .. m′ − 1``; None puts the mean
  of the old rows ``seeds`` there (default: the kept rows).
  """
  m = rmap.num_workers
  kept = x[np.asarray(rmap.keep)]
  parts = [kept]
  if rmap.num_new:
    if new_rows is None:
      seed_rows = kept if seeds is None else x[np.asarray(seeds)]
      mean = sum_rows(seed_rows) / jnp.asarray(seed_rows.shape[0], kept.dtype)
      new_rows = jnp.broadcast_to(mean[None], (rmap.num_new, *x.shape[1:])).astype(x.dtype)
    parts.append(new_rows)
  if num_aux:
    parts.append(x[m : m + num_aux])
  return jnp.concatenate(parts, axis=0)


def remap_rows(X: PyTree, rmap: RowMap, num_aux: int = 0) -> PyTree:
  r"""X with its worker rows mapped by ``rmap``: kept rows, then the kept rows' mean; aux kept.

  Args:
    X: stacked models, leading axis ``m + v``.
    rmap: from :func:`row_map`.
    num_aux: v, the auxiliary rows at the end of X (kept as they are).

  Returns:
    X with leading axis ``m′ + v``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import elastic
    >>> X = {"w": jnp.array([1.0, 2.0, 4.0, 9.0])}  # three workers and an anchor
    >>> elastic.remap_rows(X, elastic.row_map(3, 4, keep=[0, 2]), num_aux=1)["w"].tolist()
    [1.0, 4.0, 2.5, 2.5, 9.0]
  """
  v = check_int("num_aux", num_aux, 0)
  n = num_rows(X)
  if n != rmap.num_workers + v:
    raise ValueError(
      f"X has {n} rows but the row map is from {rmap.num_workers} workers + {v} auxiliary "
      "rows; pass the layout X was built with."
    )
  return jax.tree.map(lambda x: _rows(jnp.asarray(x), rmap, v, None), X)


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _state_leaf(old, fresh, rmap: RowMap, v: int):
  """One leaf of the resized optimizer state (see :func:`resize` for the rules)."""
  m, m_new, k = rmap.num_workers, rmap.new_num_workers, len(rmap.keep)
  old_shape, fresh_shape = tuple(old.shape), tuple(fresh.shape)
  for lead, lead_new, aux in ((m, m_new, 0), (m + v, m_new + v, v)):
    if old_shape[:1] == (lead,) and fresh_shape == (lead_new, *old_shape[1:]) and lead != lead_new:
      if not rmap.num_new:
        new_rows = None
      elif _is_float(old):  # buffers of a new worker: fresh, as the new transformation starts them
        new_rows = jnp.asarray(fresh)[k:m_new].astype(old.dtype)
      else:  # counters: a kept worker's (the local step, which drives a schedule)
        new_rows = jnp.broadcast_to(old[rmap.keep[0]][None], (rmap.num_new, *old_shape[1:]))
      return _rows(jnp.asarray(old), rmap, aux, new_rows)
  if old_shape == fresh_shape:
    return old
  return fresh


def resize(
  X: PyTree,
  opt_state: PyTree,
  tx,
  new_tx,
  *,
  keep: Sequence[int] | None = None,
) -> tuple[PyTree, PyTree]:
  r"""Maps X and the optimizer state of an m-worker run to the ``new_tx`` run's m′ workers.

  X follows :func:`remap_rows`. The optimizer state is matched leaf by leaf
  with ``new_tx.init`` of the resized X (both states must have the same
  structure: ``new_tx`` is the same algorithm built for m′), and each leaf is

  * **per worker** (leading axis m, the local optimizer's state; or m + v, a
    copy of X's rows): kept workers' rows as they were; a new worker's
    floating-point rows from ``new_tx.init`` (fresh buffers, e.g. zero momentum;
    a copy of X's rows there is the new row's mean model) and its integer rows
    (step counters) from ``keep[0]``; auxiliary rows kept. Under a live mask
    (:func:`coopjax.with_live_mask`) kept workers keep their flags, new workers
    are live and start at the mean of the kept *live* workers (a masked row,
    frozen or NaN, never seeds them);
  * **the same shape for m and m′** (the step counter, an outer optimizer's
    state, a replicated model, random keys): kept;
  * **anything else that depends on m** (a matrix over the workers): taken
    from ``new_tx.init``.

  State that is a function of W is then re-derived for ``new_tx`` (its
  ``resized(opt_state′)`` hook): CHOCO-SGD's ``s = W·x̂`` from the kept
  and fresh copies ``x̂`` and the new W (kept as it was, it would hold the old
  neighbours' sums and shift the worker mean at every consensus step).

  With m′ = m the leaves cannot be told apart, so the map must then be the
  identity (resize in two calls to replace workers).

  The non-blocking algorithms' reduction in flight (``pending``) is completed
  by the next mix over the kept workers: resize them as they are, *not* after
  :func:`coopjax.settle_easgd` / :func:`coopjax.settle_overlap` (which move
  X's anchor only: the state's ``pending`` would then be reduced a second
  time, and Overlap's anchor momentum would be lost). Non-blocking EASGD's
  new workers' rows are the anchor z (from ``new_tx.init``), so its next
  anchor is ``(1 − |K|α′) z + α′ Σ_{i∈K} s_i`` over the kept (live) workers K,
  as a mask would give; Overlap's take the mean of the kept live rows; a
  ``delayed`` new worker's snapshot is its model. Streaming DiLoCo's
  sync in flight (``pending``, ``[m, S]``) keeps the kept workers' rows and
  gives a new worker the mean of the kept (live) rows, so the sync averages
  the kept workers' snapshots (a fresh zero row would enter the mean as a
  fragment model of zeros).

  Args:
    X: stacked models of the m-worker run, leading axis ``m + v``
      (unsharded: :func:`coopjax.unshard` a sharded X first).
    opt_state: its optimizer state (unsharded).
    tx: the m-worker transformation (its ``layout`` gives m and v).
    new_tx: the same algorithm for m′ workers, e.g. ``make_tx(m′)``; it brings
      the new W and α. It must have the same number of auxiliary rows v.
    keep: the old workers that stay (see :func:`row_map`); default all when
      growing, the first m′ when shrinking.

  Returns:
    ``(X′, opt_state′)`` for ``new_tx``.

  Examples:
    Eight EASGD workers restarted as six: workers 3 and 6 are dropped, the
    anchor kept, and α rescaled for the new m.

    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax import elastic
    >>> make_tx = lambda m: coopjax.easgd(
    ...   optax.sgd(0.1), tau=2, alpha=elastic.scale_alpha(0.1, 8, m), num_workers=m)
    >>> X = {"w": jnp.arange(9.0)}  # x_0..x_7, then z = 8
    >>> X6, state6 = elastic.resize(X, make_tx(8).init(X), make_tx(8), make_tx(6),
    ...                             keep=[0, 1, 2, 4, 5, 7])
    >>> X6["w"].tolist()
    [0.0, 1.0, 2.0, 4.0, 5.0, 7.0, 8.0]
    >>> int(state6.count)
    0
  """
  layout, new_layout = _layout(tx, "tx"), _layout(new_tx, "new_tx")
  m, v = layout
  if new_layout.num_aux != v:
    raise ValueError(
      f"new_tx has {new_layout.num_aux} auxiliary rows but tx has {v}; make_tx(m) must build "
      "the same algorithm for every m."
    )
  rmap = row_map(m, new_layout.num_workers, keep)
  if rmap.is_identity:
    return X, opt_state
  live_state = live_lib.find_live_state(opt_state)
  seeds = None
  if live_state is not None and rmap.num_new:  # new workers start from the live kept ones
    flags = np.asarray(live_state.live)[np.asarray(rmap.keep)]
    if not flags.any():
      raise ValueError(
        f"every kept worker {list(rmap.keep)} is masked by the live mask, so the new workers "
        "have no live model to start from; keep a live worker, or rejoin / set_live one first."
      )
    seeds = [i for i, f in zip(rmap.keep, flags, strict=True) if f]
  if num_rows(X) != m + v:
    raise ValueError(
      f"X has {num_rows(X)} rows but tx has {m} workers + {v} auxiliary rows; pass the "
      "layout X was built with (coopjax.unshard a sharded X first)."
    )
  X_new = jax.tree.map(lambda x: _rows(jnp.asarray(x), rmap, v, None, seeds), X)
  fresh = new_tx.init(X_new)
  old_leaves, old_def = jax.tree.flatten(opt_state)
  fresh_leaves, fresh_def = jax.tree.flatten(fresh)
  if old_def != fresh_def:
    raise ValueError(
      "opt_state does not have the structure of new_tx.init(X′): new_tx must be the same "
      f"algorithm as tx, built for {new_layout.num_workers} workers (make_tx(m)); got "
      f"{old_def} and {fresh_def}."
    )
  leaves = [_state_leaf(o, f, rmap, v) for o, f in zip(old_leaves, fresh_leaves, strict=True)]
  state = jax.tree.unflatten(old_def, leaves)
  if live_state is not None and rmap.num_new:  # a new worker is live, never masked
    ls = live_lib.find_live_state(state)
    k = len(rmap.keep)
    ls = ls._replace(live=ls.live.at[k:].set(True), down_since=ls.down_since.at[k:].set(0))
    state = live_lib.replace_live_state(state, ls)
  if rmap.num_new:
    state = _seed_pending(state, opt_state, rmap, seeds)
  rederive = getattr(new_tx, "resized", None)  # state derived from W (CHOCO's s = W·x̂)
  return X_new, (state if rederive is None else rederive(state))


def _seed_pending(state, old_state, rmap: RowMap, seeds):
  r"""A new worker's row of a reduction in flight (Streaming DiLoCo, Overlap): the kept rows' mean.

  ``pending`` is the operand of the sync in flight (the workers' fragment
  models x_i[p], or their Δ_i[p], taken at its snapshot); the apply step
  averages it over the workers. A new worker took no snapshot: a fresh (zero)
  row would enter that mean as a fragment model of zeros. With the row
  ``mean_{i ∈ K} pending_i`` (K the kept live workers) the mean over the m′
  rows is the mean over K (exactly for float outer gradients, up to
  quantization otherwise). Overlap Local-SGD's ``pending`` likewise: its next
  anchor is the mean of the kept live rows (a row from ``new_tx.init`` holds
  the anchor ``z_q`` and pulled the next anchor back toward it).
  """
  is_state = lambda x: isinstance(x, (StreamingDiLoCoState, OverlapState))
  old = [s for s in jax.tree.leaves(old_state, is_leaf=is_state) if is_state(s)]
  if not old:
    return state
  rows = list(rmap.keep if seeds is None else seeds)
  it = iter(old)
  k = len(rmap.keep)

  def seed(s):
    if not is_state(s):
      return s
    before = next(it)
    idx = np.asarray(rows)
    seeded = jax.tree.map(  # Streaming DiLoCo with delay=0 has no sync kept: pending = ()
      lambda new, old: new.at[k:].set(jnp.mean(jnp.asarray(old)[idx], axis=0).astype(new.dtype)),
      s.pending,
      before.pending,
    )
    return s._replace(pending=seeded)

  return jax.tree.map(seed, state, is_leaf=is_state)


def _layout(tx, name: str) -> Layout:
  if not isinstance(getattr(tx, "layout", None), Layout):
    raise TypeError(
      f"{name} must be a coopjax transformation (it carries its layout: m and v), got "
      f"{type(tx).__name__}."
    )
  return layout_of(tx)


def scale_alpha(alpha: float, num_workers: int, new_num_workers: int) -> float:
  r"""EASGD's α for m′ workers at the same place in the stability range as α for m.

  EASGD (and elastic averaging) is stable for :math:`0 < \alpha < 2/(m+1)`;
  :math:`\zeta(W_\alpha) = \max\{|1-\alpha|, |1-(m+1)\alpha|\}`. Scaling

  .. math::

     \alpha' = \alpha \, \frac{m + 1}{m' + 1}

  keeps :math:`(m'+1)\alpha' = (m+1)\alpha`: the anchor's factor
  :math:`1 - (m+1)\alpha` is unchanged and α′ lies in :math:`(0, 2/(m'+1))`
  exactly when α lies in :math:`(0, 2/(m+1))`.

  Args:
    alpha: α for m workers, in ``(0, 2/(m+1))``.
    num_workers: m.
    new_num_workers: m′.

  Returns:
    α′.

  Raises:
    ValueError: if α is outside the stability range for m.

  Examples:
    >>> from coopjax import elastic
    >>> round(elastic.scale_alpha(0.1, 8, 6), 6)  # 0.1 · 9 / 7
    0.128571
    >>> elastic.scale_alpha(0.3, 8, 6)
    Traceback (most recent call last):
    ...
    ValueError: alpha=0.3 is outside EASGD's stability range (0, 2/(m+1)) = (0, 0.222222) for m=8.
  """
  m = check_int("num_workers", num_workers, 1)
  m_new = check_int("new_num_workers", new_num_workers, 1)
  if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not np.isfinite(alpha):
    raise ValueError(f"alpha must be a finite real number, got {alpha!r}.")
  upper = 2.0 / (m + 1)
  if not 0.0 < float(alpha) < upper:
    raise ValueError(
      f"alpha={alpha} is outside EASGD's stability range (0, 2/(m+1)) = (0, {upper:.6g}) for m={m}."
    )
  return float(alpha) * (m + 1) / (m_new + 1)
