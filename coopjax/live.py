r"""Live masks: training on with some workers masked out, and re-admitting them.

A live mask :math:`\ell \in \{0, 1\}^m` (L its support) is runtime state: an
array inside the optimizer state, so changing it does not recompile. Every
algorithm communicates through :class:`coopjax.mixing.Mix`, and under a mask
every mix applies its live weights (:func:`coopjax.mixing.live_weights`):

* a graph W: Metropolis–Hastings on the live subgraph,
  :math:`w_{ij} = 1/(1 + \max(d_i^L, d_j^L))` for live neighbours, the rest on
  the diagonal; ``W = J`` (local SGD, sync SGD, DiLoCo's and SlowMo's outer
  mean, a hierarchical group mean): the mean over the live workers;
* EASGD's anchor: :math:`z \leftarrow (1 - |L|\alpha) z + \alpha \sum_{i \in L} x_i`;
* a masked worker is frozen: its row and column of W are :math:`e_i` and it
  takes no local step (its optimizer state is kept as it was).

Masked values never reach a sum by multiplication (a NaN row is selected out
before any weighted sum). With every worker live the wrapped update runs the
algorithm's own update (a ``lax.cond`` on ``all(ℓ)`` around the whole update,
so XLA fuses it as before): the iterates are unchanged bit for bit. Each mix
also has that ``lax.cond`` for direct ``tx.update(..., live=ℓ)`` callers. A
transformation not wrapped by :func:`with_live_mask` compiles to exactly the
program it compiled to before.

Disconnected live subgraphs (a ring with two non-adjacent masked workers)
cannot be refused inside a compiled step. :func:`with_live_mask` takes
``disconnected="error"`` (default): :func:`set_live` raises a ValueError
naming the components before the step runs, and a step that masks workers
itself (quarantine) reports ``live_connected=False`` in its metrics, which
:func:`check_quarantine` turns into the same error on the host (meanwhile
each component mixes within itself). With ``disconnected="fallback"`` the
step averages the live workers (``J_L``) whenever their subgraph is split.

  >>> import jax.numpy as jnp, optax, coopjax
  >>> tx = coopjax.with_live_mask(coopjax.local_sgd(optax.sgd(0.1), tau=1, num_workers=4))
  >>> X = coopjax.replicate({"w": jnp.zeros(())}, tx)
  >>> state = coopjax.set_live(tx, tx.init(X), [True, True, False, True])
  >>> g = {"w": jnp.array([1.0, 2.0, jnp.nan, 3.0])}  # worker 2 is broken
  >>> updates, state = tx.update(g, state, X)
  >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]
  [-0.2, -0.2, 0.0, -0.2]
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coopjax import mixing
from coopjax.algorithms._nonblocking import DelayedState
from coopjax.algorithms._nonblocking import NonBlockingEASGDState
from coopjax.algorithms._nonblocking import OverlapState
from coopjax.algorithms._nonblocking import StreamingDiLoCoState
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._skeleton import reset_local_state
from coopjax.parallel import context
from coopjax.workers import Layout

PyTree = Any

__all__ = [
  "LiveMaskState",
  "with_live_mask",
  "find_live_state",
  "replace_live_state",
  "set_live",
  "rejoin",
  "check_quarantine",
  "DISCONNECTED",
]

DISCONNECTED = ("error", "fallback")


class LiveMaskState(NamedTuple):
  """State of :func:`with_live_mask`.

  Attributes:
    live: bool [m], the live mask ℓ (replicated when sharded).
    down_since: int32 [m], the step at which each masked worker was masked
      (0 for live workers).
    inner: the wrapped transformation's state.
  """

  live: chex.Array
  down_since: chex.Array
  inner: optax.OptState


def _is_live_state(x) -> bool:
  return isinstance(x, LiveMaskState)


def host_flags(live: jax.Array) -> np.ndarray:
  """The live mask as a NumPy bool array on the host (a replicated mask: this process's copy)."""
  if isinstance(live, jax.Array) and not live.is_fully_addressable:
    live = live.addressable_data(0)  # replicated: every process holds the whole mask
  return np.asarray(live, bool)


def find_live_state(opt_state: PyTree) -> LiveMaskState | None:
  """The first :class:`LiveMaskState` inside ``opt_state`` (e.g. inside ``optax.chain``), or None."""
  for s in jax.tree.leaves(opt_state, is_leaf=_is_live_state):
    if _is_live_state(s):
      return s
  return None


def replace_live_state(opt_state: PyTree, new: LiveMaskState) -> PyTree:
  """``opt_state`` with its :class:`LiveMaskState` replaced by ``new``."""
  return jax.tree.map(lambda s: new if _is_live_state(s) else s, opt_state, is_leaf=_is_live_state)


def with_live_mask(
  tx: CooperativeTransformation, *, disconnected: str = "error"
) -> CooperativeTransformation:
  r"""Wraps a coopjax algorithm so that its state carries a live mask ℓ.

  ``update`` passes ``live=ℓ`` to the algorithm, whose mixes then use the live
  weights (module docstring). ℓ starts all True; change it with
  :func:`set_live`, :func:`rejoin`, or let ``coopjax.make_step(...,
  on_nonfinite="quarantine")`` mask a failing worker inside the step.

  Args:
    tx: a coopjax algorithm (it carries ``layout`` and ``graph``), e.g.
      :func:`coopjax.dpsgd`. Put it inside ``optax.chain`` after wrapping,
      not before.
    disconnected: ``"error"`` (default) or ``"fallback"``: what a split live
      subgraph does (module docstring).

  Returns:
    A :class:`coopjax.algorithms.CooperativeTransformation` with state
    :class:`LiveMaskState`; its descriptive attributes are those of ``tx``.

  Examples:
    >>> import optax, coopjax
    >>> from coopjax import topology
    >>> tx = coopjax.with_live_mask(coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(6)))
    >>> tx.name, tx.disconnected
    ('dpsgd', 'error')
  """
  layout = getattr(tx, "layout", None)
  if not isinstance(layout, Layout) or getattr(tx, "graph", None) is None:
    raise TypeError(
      f"with_live_mask needs a coopjax algorithm (with .layout and .graph), got "
      f"{type(tx).__name__}; wrap the algorithm itself and put the wrapper inside optax.chain."
    )
  if disconnected not in DISCONNECTED:
    raise ValueError(
      f"disconnected must be one of {DISCONNECTED}, got {disconnected!r}: 'error' refuses a "
      "split live subgraph (host-side), 'fallback' averages the live workers (J_L) while it is "
      "split."
    )
  m = layout.num_workers
  graph = np.asarray(tx.graph)

  def init_fn(params):
    return LiveMaskState(jnp.ones((m,), bool), jnp.zeros((m,), jnp.int32), tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    def all_live(inner):  # the wrapped algorithm's own update, bit for bit
      return tx.update(updates, inner, params, **extra_args)

    def masked(inner):
      fallback = None
      if disconnected == "fallback":
        fallback = jnp.logical_not(mixing.live_connected(graph, state.live))
      return tx.update(
        updates, inner, params, live=state.live, live_fallback=fallback, **extra_args
      )

    out, inner = jax.lax.cond(jnp.all(state.live), all_live, masked, state.inner)
    return out, state._replace(inner=inner)

  def inner_state(opt_state):
    return opt_state.inner if _is_live_state(opt_state) else opt_state

  def comm(k, opt_state=None):
    """``tx.comm``; while a worker is masked, ``tx.masked_comm`` where ``tx`` has one."""
    masked = getattr(tx, "masked_comm", None)
    if masked is not None and _is_live_state(opt_state) and not host_flags(opt_state.live).all():
      return masked(k, opt_state.inner)
    return tx.comm(k, inner_state(opt_state))

  wrapped = CooperativeTransformation(init_fn, update_fn)
  attributes = {k: v for k, v in vars(tx).items()}
  attributes.update(
    comm=comm,
    settle=lambda X, opt_state: tx.settle(X, inner_state(opt_state)),
    disconnected=disconnected,
    inner=tx,
  )
  return wrapped.describe(**attributes)


def set_live(tx: CooperativeTransformation, opt_state: PyTree, live, *, step=None) -> PyTree:
  """Host-side: ``opt_state`` with the live mask set to ``live`` (bool [m]).

  Under ``disconnected="error"`` a live set that splits ``tx.graph`` raises
  a ValueError naming the components (:func:`coopjax.mixing.check_live`).
  Workers newly masked get ``down_since = step`` (the state's step count when
  None). Re-admit a worker with :func:`rejoin`, which also resets its model
  and optimizer state.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax import topology
    >>> tx = coopjax.with_live_mask(coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(6)))
    >>> state = tx.init(coopjax.replicate({"w": jnp.zeros(())}, tx))
    >>> coopjax.set_live(tx, state, [1, 0, 1, 1, 1, 1]).live.tolist()
    [True, False, True, True, True, True]
    >>> coopjax.set_live(tx, state, [1, 0, 1, 1, 0, 1])
    Traceback (most recent call last):
    ...
    ValueError: the live workers split into 2 disconnected components [[0, 5], [2, 3]] ...
  """
  ls = find_live_state(opt_state)
  if ls is None:
    raise ValueError(
      "opt_state holds no LiveMaskState; build the transformation with "
      "coopjax.with_live_mask(tx) and its state with its init."
    )
  live = np.asarray(live).astype(bool)
  m = ls.live.shape[0]
  if live.shape != (m,):
    raise ValueError(f"live must have shape ({m},), one flag per worker, got {live.shape}.")
  if getattr(tx, "disconnected", "error") == "error":
    mixing.check_live(tx.graph, live)
  elif not live.any():
    raise ValueError("every worker is masked; at least one must stay live.")
  if step is None:
    from_state = [s for s in jax.tree.leaves(ls.inner, is_leaf=_has_count) if _has_count(s)]
    step = int(from_state[0].count) if from_state else 0
  old = np.asarray(ls.live)
  since = np.where(old & ~live, step, np.where(live, 0, np.asarray(ls.down_since)))
  inner = ls.inner
  rederive = getattr(tx, "resized", None)  # state derived from W (CHOCO's s = W·x̂)
  if rederive is not None and live.all() and not old.all():
    inner = jax.tree.map(_placed_like, rederive(inner), inner)
  new = LiveMaskState(
    _placed_like(jnp.asarray(live, bool), ls.live),
    _placed_like(jnp.asarray(since, jnp.int32), ls.down_since),
    inner,
  )
  return replace_live_state(opt_state, new)


def _placed_like(new: jax.Array, old) -> jax.Array:
  """``new`` on the devices (and sharding) of ``old``."""
  sharding = getattr(old, "sharding", None)
  return new if sharding is None else jax.device_put(new, sharding)


def _has_count(x) -> bool:
  return isinstance(x, tuple) and hasattr(x, "count") and hasattr(x, "local_state")


def _where_rows(keep, new: PyTree, old: PyTree) -> PyTree:
  return jax.tree.map(
    lambda y, x: jnp.where(keep.reshape(keep.shape + (1,) * (jnp.ndim(x) - 1)), y, x), new, old
  )


def _check_workers(workers, m: int) -> jax.Array:
  """``workers`` as an array of m flags; indices (or any other shape) are refused."""
  workers = jnp.asarray(workers)
  hint = f"to re-admit workers by index, pass np.isin(np.arange({m}), indices)"
  if workers.shape != (m,):
    raise ValueError(
      f"workers must be a bool mask of shape ({m},), one flag per worker, got shape "
      f"{workers.shape}; {hint}."
    )
  if workers.dtype != jnp.bool_ and not isinstance(workers, jax.core.Tracer):
    values = np.asarray(workers)
    if np.any((values != 0) & (values != 1)):
      raise ValueError(
        f"workers must be a bool mask over the {m} workers, got values {values.tolist()}; {hint}."
      )
  return workers


def rejoin(X: PyTree, opt_state: PyTree, tx: CooperativeTransformation, workers) -> tuple:
  r"""Re-admits ``workers`` (bool [m]): model, optimizer state and mask (pure, jittable).

  ``workers`` is a mask over the m workers, not a list of indices (a list of
  another length raises); workers already live are left as they are.

  For each re-admitted worker r:

  .. math::

     x_r \leftarrow \begin{cases}
       z & \text{one auxiliary row (EASGD's anchor)} \\
       x_{\text{start}} & \text{DiLoCo, SlowMo (the outer model)} \\
       \frac{1}{|L|} \sum_{i \in L} x_i & \text{otherwise,}
     \end{cases}
     \qquad \text{its local optimizer state reset}, \qquad \ell_r \leftarrow 1 .

  on the leaves ``tx`` mixes; the leaves it keeps per worker (``mix_mask``
  False: BatchNorm statistics, which the anchor and ``x_start`` do not track)
  take the live workers' mean :math:`\frac{1}{|L|} \sum_{i \in L} x_i`.
  Streaming DiLoCo: the worker's row of the sync in flight (``pending``,
  snapshotted while it was masked) takes the live workers' mean of that
  buffer, so the apply step averages the snapshots of the workers live at it.
  The non-blocking algorithms' reduction in flight (``pending``): its row
  becomes the anchor z (:func:`coopjax.nonblocking_easgd`: the next anchor
  step is then the masked rule's), the live rows' mean of ``pending``
  (:func:`coopjax.overlap_local_sgd`) or its new model (:func:`coopjax.delayed`:
  the snapshot of the period that starts); kept, its frozen or NaN row entered
  the next mix of every worker.

  Integer counters of the optimizer state (learning-rate schedules) are kept:
  they count steps, which the worker missed but the others did not. Call it
  right after a mixing step (the live workers then agree). Works in a sharded
  step too.

  Returns:
    ``(X, opt_state)``.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.with_live_mask(coopjax.local_sgd(optax.sgd(0.1), tau=1, num_workers=3))
    >>> X = {"w": jnp.array([1.0, jnp.nan, 3.0])}
    >>> state = coopjax.set_live(tx, tx.init(X), [True, False, True])
    >>> X, state = coopjax.rejoin(X, state, tx, jnp.array([False, True, False]))
    >>> X["w"].tolist(), state.live.tolist()
    ([1.0, 2.0, 3.0], [True, True, True])
  """
  ls = find_live_state(opt_state)
  if ls is None:
    raise ValueError("opt_state holds no LiveMaskState; build tx with coopjax.with_live_mask.")
  m, v = tx.layout
  workers = _check_workers(workers, m)
  workers = workers.astype(bool) & jnp.logical_not(ls.live)
  coop = [s for s in jax.tree.leaves(ls.inner, is_leaf=_has_count) if _has_count(s)][0]
  rows, aux = mixing.split_rows(X, m)
  mix_mask = getattr(tx, "mix_mask", None)

  def live_mean(tree):
    with context.live_masked(context.LiveContext(ls.live)):
      return mixing.worker_mean(tree)

  if hasattr(coop, "x_start"):
    target = coop.x_start
  elif v == 1:
    target = jax.tree.map(lambda z: z[0], aux)
  else:
    target = live_mean(rows)
  if mix_mask is not None and (hasattr(coop, "x_start") or v == 1):
    # Leaves kept per worker (BatchNorm statistics) are never mixed into z or x_start (the
    # anchor keeps its initial copy, x_start's is moved by the outer optimizer): the live
    # workers' mean, as coopjax.evaluation_model takes them.
    target = mixing._select(mix_mask, target, live_mean(rows))
  local = mixing.local_live(workers)
  rows = _where_rows(
    local,
    jax.tree.map(lambda x, t: jnp.broadcast_to(t.astype(x.dtype), x.shape), rows, target),
    rows,
  )
  fresh = reset_local_state(coop.local_state, jax.vmap(tx.local.init)(rows))
  new_coop = coop._replace(local_state=_where_rows(local, fresh, coop.local_state))
  # A reduction in flight was snapshotted while the worker was masked (its row frozen or NaN).
  seed = None
  if isinstance(coop, (StreamingDiLoCoState, OverlapState)):
    # The live rows' mean: the reduction over all rows is then the one over L (Streaming
    # DiLoCo with delay=0 has nothing in flight, pending = ()).
    seed = jax.tree.map(
      lambda p, s: jnp.broadcast_to(s.astype(p.dtype), p.shape),
      coop.pending,
      live_mean(coop.pending),
    )
  elif isinstance(coop, NonBlockingEASGDState):  # z: Σ over all = the masked rule's (1 − |L|α)
    seed = jax.tree.map(
      lambda p, z: jnp.broadcast_to(z[:1].astype(p.dtype), p.shape), coop.pending, aux
    )
  elif isinstance(coop, DelayedState):  # the snapshot of the period that starts now: its model
    seed = rows
  if seed is not None:
    new_coop = new_coop._replace(pending=_where_rows(local, seed, coop.pending))
  inner = jax.tree.map(lambda s: new_coop if s is coop else s, ls.inner, is_leaf=_has_count)
  live = ls.live | workers
  rederive = getattr(tx, "resized", None)  # state derived from W (CHOCO's s = W·x̂)
  if rederive is not None:  # all live again: the full W's sums
    inner = jax.lax.cond(jnp.all(live), rederive, lambda s: s, inner)
  new = LiveMaskState(live, jnp.where(workers, 0, ls.down_since).astype(jnp.int32), inner)
  return mixing.join_rows(rows, aux), replace_live_state(opt_state, new)


def check_quarantine(metrics: dict, disconnected: str = "error", graph=None) -> list[tuple]:
  """Host-side: the quarantine events of one step's metrics, as ``(worker, step)`` pairs.

  Reads ``quarantined`` and ``step`` from the metrics of
  ``coopjax.make_step(..., on_nonfinite="quarantine")``. Under
  ``disconnected="error"`` a step whose live workers no longer form one
  connected subgraph (``live_connected`` False) raises a ValueError naming the
  components (pass ``graph``, e.g. ``tx.graph``, to name them).

  Examples:
    >>> import numpy as np
    >>> from coopjax import live
    >>> live.check_quarantine({"quarantined": np.array([False, True]), "step": np.array(7),
    ...                        "live_connected": np.array(True)})
    [(1, 7)]
  """
  flags = np.asarray(metrics["quarantined"])
  step = int(np.asarray(metrics["step"]))
  events = [(int(i), step) for i in np.flatnonzero(flags)]
  if disconnected == "error" and not bool(np.asarray(metrics.get("live_connected", True))):
    live = np.asarray(metrics["live"])
    if graph is not None:
      mixing.check_live(graph, live)
    raise ValueError(
      f"at step {step} the live workers {np.flatnonzero(live).tolist()} no longer form one "
      "connected subgraph of the mixing graph; re-admit workers or use "
      "coopjax.with_live_mask(tx, disconnected='fallback')."
    )
  return events
