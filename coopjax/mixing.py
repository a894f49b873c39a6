r"""Mixing: the one interface through which the stacked rows communicate.

A mix is a linear map of the rows of X, written in the paper's layout (a
column per node) as

.. math::

   X \leftarrow X W, \qquad x_i^{\text{new}} = \sum_j W_{ji}\, x_j ,

with W static (``(m + v) × (m + v)``, auxiliary rows last, or ``m × m``). Every
algorithm of coopjax communicates only through :class:`Mix` objects: the
period's mix of A(τ, W, v), EASGD's anchor reduction, DiLoCo's mean of the
workers, a MATCHA matching, a group mean. A :class:`Mix` is the single place
that defines

* its dense reference, ``einsum("ji,j...->i...", W, x)`` on every leaf;
* its sharded lowering (:mod:`coopjax.parallel.collectives`): one all-reduce
  for ``W = J`` (or ``aI + cJ``), collective-permutes of the boundary rows
  for sparse W (ring, torus, hypercube, exponential, matchings, groups), an
  all-reduce of the workers' rows into replicated auxiliaries (EASGD), an
  all-gather with the dense einsum for any other W — with the leaves of one
  dtype packed into one buffer, so that a mix costs one collective per
  neighbour offset, not one per leaf;
* its cost record (:class:`coopjax.cost.pattern.MixCost`: collective,
  payloads per worker, latency rounds), read by the α–β model, the
  transformations' self-description and ``comm_report``'s comparisons;
* which leaves it mixes (``mask``; the others keep their rows).

Wrappers that change every mix of every algorithm act on :class:`Mix`:
:meth:`Mix.restrict` (a fragment selector: mix only the leaves a mask
selects); a compressor or a live mask replaces how the rows are combined
while the algorithms stay as they are.

Sharded meaning. Under a sharded step (``coopjax.make_step(..., mesh=mesh)``)
the transformation runs inside ``jax.shard_map`` and sees, on each device, its
block of ``b = m / D`` worker rows followed by a replicated copy of the ``v``
auxiliary rows; a :class:`coopjax.parallel.context.ShardContext` is then
active and the row primitives of this module (:func:`split_rows`,
:func:`join_rows`, :func:`worker_mean`, :func:`worker_sum`, and every
:class:`Mix`) take their per-device meaning. Call a :class:`Mix` inside the
mixing branch of a ``lax.cond`` when it should cost nothing on off-steps, and
pass it to ``lax.cond``/``lax.switch`` inside a fresh closure
(``lambda X: mix(X)``), not as the branch itself: JAX caches a branch's trace by
its callable, and a mix traces differently under a shard or live context.

  >>> import jax.numpy as jnp
  >>> from coopjax import mixing, topology
  >>> mix = mixing.Mix(topology.ring(4), num_workers=4)
  >>> X = {"w": jnp.arange(4.0)}
  >>> [round(float(x), 4) for x in mix(X)["w"]]
  [1.3333, 1.0, 2.0, 1.6667]
  >>> mix.cost.collective, mix.cost.volume
  ('neighbor_exchange', 2.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from coopjax import compress
from coopjax import workers
from coopjax.cost import pattern
from coopjax.parallel import collectives
from coopjax.parallel import context
from coopjax.parallel.context import ShardContext
from coopjax.workers import sum_rows

PyTree = Any
Mixer = Callable[[PyTree], PyTree]

__all__ = [
  "Mix",
  "Mixer",
  "mix_dense",
  "dense_mixer",
  "split_rows",
  "join_rows",
  "worker_mean",
  "worker_sum",
  "permute",
  "group_mean",
  "global_rows",
  "to_global_rows",
  "ShardContext",
  "shard_context",
  "sharded",
  "LiveStructure",
  "live_structure",
  "live_weights",
  "live_components",
  "live_connected",
  "check_live",
  "local_live",
  "quantized_mean",
]


shard_context = context.current
sharded = context.sharded
to_global_rows = context.to_global_rows


def global_rows(tree: PyTree, name: str = "X") -> int:
  """The global leading-axis size of ``tree`` (``m`` or ``m + v``), sharded or not.

  Same as :func:`coopjax.workers.num_rows`, which counts rows globally inside
  a sharded step (:func:`to_global_rows`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing
    >>> mixing.global_rows({"w": jnp.zeros((4, 3))})
    4
  """
  return workers.num_rows(tree, name)


einsum = collectives.einsum


def mix_dense(X: PyTree, W: jax.Array | np.ndarray) -> PyTree:
  """Returns ``X·W``: row i becomes ``Σ_j W[j, i] X[j]`` on every leaf (the reference).

  In a sharded step: all-gather of the workers' rows, then the einsum for this
  device's columns of W (the fallback for any W, also a traced one).

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing, topology
    >>> out = mixing.mix_dense({"w": jnp.arange(4.0)}, topology.ring(4))
    >>> [round(x, 4) for x in out["w"].tolist()]
    [1.3333, 1.0, 2.0, 1.6667]
  """
  ctx = shard_context()
  if ctx is not None:
    return collectives.mix_gathered(X, W, ctx)

  def mix_leaf(x):
    w = jnp.asarray(W, dtype=x.dtype)
    return einsum("ji,j...->i...", w, x)

  return jax.tree.map(mix_leaf, X)


def _select(mask: PyTree | None, mixed: PyTree, kept: PyTree) -> PyTree:
  """Leaf-wise: ``mixed`` where ``mask`` is True, else ``kept`` (mask: a pytree prefix of bools)."""
  if mask is None:
    return mixed
  return jax.tree.map(
    lambda keep, x, y: jax.tree.map(lambda u, w: u if keep else w, x, y), mask, mixed, kept
  )


def leaf_flags(mask: PyTree | None, X: PyTree) -> list[bool]:
  """One boolean per leaf of X (in ``jax.tree.leaves`` order) from a prefix ``mask``."""
  if mask is None:
    return [True] * len(jax.tree.leaves(X))
  full = jax.tree.map(lambda keep, sub: jax.tree.map(lambda _: bool(keep), sub), mask, X)
  return [bool(f) for f in jax.tree.leaves(full)]


def check_mask(mask: PyTree | None, like: PyTree | None = None, name: str = "mix_mask"):
  """``mask`` must be None or a pytree prefix of ``like`` with Python/NumPy booleans."""
  if mask is None:
    return None
  for leaf in jax.tree.leaves(mask):
    if not isinstance(leaf, (bool, np.bool_)):
      raise TypeError(
        f"{name} leaves must be booleans (True = mix the leaf, False = keep it per worker), "
        f"got {leaf!r} of type {type(leaf).__name__}."
      )
  if like is not None:
    try:
      jax.tree.map(lambda keep, sub: None, mask, like)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"{name} must have the structure of one model (a pytree prefix of X's leaves: the same "
        f"keys, with True to mix a leaf or a whole subtree and False to keep it per worker); "
        f"build it with jax.tree.map(lambda _: True, params) and set the leaves to keep to "
        f"False. Mismatch: {e}"
      ) from None
  return mask


def _averaging(W: np.ndarray, m: int) -> tuple[float, float] | None:
  """``(a, c)`` when ``W = aI + cJ`` over workers only (full averaging), else None.

  Applied as ``a·x_i + c·Σ_j x_j``: a sum over the rows instead of an einsum,
  which XLA's CPU backend runs much faster over a small leading axis.
  """
  if W.shape[0] != m or m < 2:
    return None
  c = W[0, 1]
  a = W[0, 0] - c
  return (float(a), float(c)) if np.array_equal(W, a * np.eye(m) + c) else None


def _positive_workers(num_workers) -> int:
  """``num_workers`` as an int, refused unless it is at least 1."""
  m = int(num_workers)
  if m < 1:
    raise ValueError(f"num_workers must be at least 1, got {num_workers}.")
  return m


def _check_live_shape(live, m: int) -> None:
  """A live mask has one flag per worker."""
  if np.shape(live) != (m,):
    raise ValueError(
      f"live must hold one flag per worker, shape ({m},), got shape {np.shape(live)}; it marks "
      "the workers of W's first num_workers rows (auxiliary rows are always live)."
    )


class Mix:
  r"""The mix ``X ← X·W`` of the stacked rows: reference, sharded lowering, cost.

  Args:
    W: the static mixing matrix, ``x_i ← Σ_j W[j, i] x_j``; ``(m + v) × (m + v)``
      (auxiliary rows last, replicated on every device when sharded) or ``m × m``.
    num_workers: m, the number of worker rows (the first m rows).
    mask: optional pytree prefix of one model with booleans: leaves marked
      False keep their rows (e.g. BatchNorm statistics kept per worker).
    overlappable: whether this mix's communication overlaps the following
      local steps (recorded in :attr:`cost`).

  Attributes:
    matrix: W as a float64 NumPy array.
    num_workers: m.
    mask: the leaf mask or None.
    cost: the :class:`coopjax.cost.pattern.MixCost` of one application.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing, topology
    >>> easgd = mixing.Mix(topology.easgd(2, 0.25), num_workers=2)  # 2 workers + anchor
    >>> X = {"w": jnp.array([0.0, 2.0, 4.0])}
    >>> easgd(X)["w"].tolist()   # x_i ← 0.75 x_i + 0.25 z;  z ← 0.5 z + 0.25 (x_1 + x_2)
    [1.0, 2.5, 2.5]
    >>> easgd.cost.collective
    'all_reduce'
  """

  def __init__(
    self,
    W,
    num_workers: int,
    *,
    mask: PyTree | None = None,
    overlappable: bool = False,
  ):
    W = np.asarray(W, dtype=np.float64)
    m = int(num_workers)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
      raise ValueError(
        f"a mix needs a square (m + v) x (m + v) matrix W (m workers, v auxiliary rows), got "
        f"shape {W.shape}."
      )
    if not 1 <= m <= W.shape[0]:
      raise ValueError(
        f"num_workers={m} must count W's worker rows, between 1 and its {W.shape[0]} rows (the "
        f"first m rows are workers, the rest auxiliary); pass num_workers={W.shape[0]} when W "
        "has no auxiliary rows."
      )
    if not np.all(np.isfinite(W)):
      raise ValueError(f"a mix needs a finite matrix W, got non-finite entries in {W.tolist()}.")
    self.matrix = W
    self.num_workers = m
    self.mask = check_mask(mask, name="Mix mask")
    self.overlappable = bool(overlappable)
    self._averaging = _averaging(W, m)

  @property
  def num_rows(self) -> int:
    """``m + v``, the rows this mix acts on."""
    return self.matrix.shape[0]

  @property
  def cost(self) -> pattern.MixCost:
    """What one application communicates (:func:`coopjax.cost.pattern.matrix_cost`).

    Payloads are counted in models of the mixed leaves: with a ``mask``, price
    them with the bytes of the leaves the mask selects.
    """
    return pattern.matrix_cost(self.matrix, self.num_workers, overlappable=self.overlappable)

  def wire_fraction(self, compressor: compress.Compressor, like: PyTree) -> float:
    """Payload bytes over dense bytes of one worker's message of the mixed leaves.

    Args:
      compressor: a :class:`coopjax.compress.Compressor`.
      like: one worker's model (arrays or ``jax.ShapeDtypeStruct``, no worker
        axis); with a ``mask`` only the leaves it selects count.

    Examples:
      >>> import jax.numpy as jnp
      >>> from coopjax import compress, mixing, topology
      >>> mix = mixing.Mix(topology.ring(8), num_workers=8)
      >>> mix.wire_fraction(compress.identity(), {"w": jnp.zeros((10, 10))})
      1.0
    """
    compressor = compress.check_compressor(compressor)
    leaves = [x for x, keep in zip(jax.tree.leaves(like), self._flags(like), strict=True) if keep]
    dense = sum(
      int(np.prod(np.shape(x), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize for x in leaves
    )
    if dense == 0:
      return 1.0
    return compress.payload_bytes(compressor, leaves) / dense

  def compressed_cost(self, compressor: compress.Compressor, like: PyTree) -> pattern.MixCost:
    """The cost record of :meth:`exchange` with ``compressor`` on messages shaped like ``like``.

    :func:`coopjax.cost.pattern.compressed_cost` with this mix's W and
    :meth:`wire_fraction`: the sparse W's neighbour exchange, or an all-gather
    of payloads where the uncompressed mix all-reduces; priced by payload
    bytes (``cost.bytes_sent(dense_model_bytes)``,
    :func:`coopjax.cost.netmodel.mix_time`).

    Args:
      compressor: a :class:`coopjax.compress.Compressor`.
      like: one worker's model (arrays or ``jax.ShapeDtypeStruct``, no worker axis).

    Examples:
      >>> import jax.numpy as jnp
      >>> from coopjax import compress, mixing
      >>> mix = mixing.Mix.average(8)
      >>> cost = mix.compressed_cost(compress.identity(), {"w": jnp.zeros(100)})
      >>> cost.collective, cost.volume, cost.bytes_sent(400)  # 7 payloads of 400 bytes
      ('all_gather', 7.0, 2800.0)
    """
    return pattern.compressed_cost(
      self.matrix,
      self.num_workers,
      self.wire_fraction(compressor, like),
      overlappable=self.overlappable,
    )

  def _flags(self, tree: PyTree) -> list[bool]:
    """One flag per leaf of ``tree``; a mask that is not a prefix of it is refused by name."""
    return leaf_flags(check_mask(self.mask, tree, name="Mix mask"), tree)

  def restrict(self, mask: PyTree | None) -> Mix:
    """The same mix on the leaves ``mask`` selects only (a fragment selector)."""
    if mask is None:
      return self
    return Mix(self.matrix, self.num_workers, mask=mask, overlappable=self.overlappable)

  def __call__(self, X: PyTree) -> PyTree:
    """``X·W`` on the selected leaves (rows counted globally, sharded or not)."""
    if self.mask is None:
      return self._apply(X)
    leaves, treedef = jax.tree.flatten(X)
    flags = self._flags(X)
    mixed = iter(self._apply([x for x, keep in zip(leaves, flags, strict=True) if keep]))
    return jax.tree.unflatten(
      treedef, [next(mixed) if keep else x for x, keep in zip(leaves, flags, strict=True)]
    )

  def exchange(
    self, messages: PyTree, compressor: compress.Compressor, key: jax.Array, step
  ) -> tuple[PyTree, PyTree]:
    r"""Every row sends a compressed message; returns ``(own, mixed)``.

    Row j sends ``payload_j = encode(messages_j, key_j)`` with
    ``key_j = message_key(key, step, j)`` (j the global row index), and every
    receiver reconstructs ``Q_j = decode(payload_j)``:

    .. math::

       \text{own}_i = Q_i, \qquad \text{mixed}_i = \sum_j W_{ji}\, Q_j .

    Only payloads travel: sharded (:func:`coopjax.parallel.collectives.exchange`),
    the payload leaves go through the collectives of this mix (the permute
    plan of a sparse W; an all-gather for full averaging, an auxiliary row fed
    by the workers or a dense W: never an all-reduce of compressed data) and
    are decoded on the receiving device; the replicated auxiliary rows are
    encoded and decoded identically on every device. Leaves outside ``mask``
    are not sent and come back unchanged in both outputs. Its cost record is
    :meth:`compressed_cost`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from coopjax import compress, mixing, topology
      >>> mix = mixing.Mix(topology.ring(4), num_workers=4)
      >>> own, mixed = mix.exchange({"w": jnp.arange(4.0)}, compress.identity(),
      ...                           jax.random.key(0), step=1)
      >>> [round(x, 4) for x in mixed["w"].tolist()]
      [1.3333, 1.0, 2.0, 1.6667]
    """
    leaves, treedef = jax.tree.flatten(messages)
    compressor = compress.check_compressor(compressor)
    flags = self._flags(messages)
    sent = [x for x, keep in zip(leaves, flags, strict=True) if keep]
    if sent:
      own_sent, mixed_sent = self._exchange(sent, compressor, key, step)
    else:
      own_sent, mixed_sent = [], []
    own_it, mixed_it = iter(own_sent), iter(mixed_sent)
    own = [next(own_it) if keep else x for x, keep in zip(leaves, flags, strict=True)]
    mixed = [next(mixed_it) if keep else x for x, keep in zip(leaves, flags, strict=True)]
    return jax.tree.unflatten(treedef, own), jax.tree.unflatten(treedef, mixed)

  def _exchange(self, leaves: list, compressor, key, step) -> tuple[list, list]:
    """Dense reference: every row's message encoded and decoded, then mixed as usual."""
    ctx = shard_context()
    lc = context.current_live()
    self._check_live_graph(lc)
    if ctx is not None and lc is not None:
      return self._exchange_live(leaves, compressor, key, step, ctx, lc)
    if ctx is not None:
      return collectives.exchange(self.matrix, leaves, compressor, key, step, ctx)
    n = workers.num_rows(leaves, "messages")
    if n != self.num_rows:
      raise ValueError(
        f"messages have {n} rows but this mix acts on {self.num_rows}; pass one message per row."
      )

    def roundtrip(row, sender):
      k = compress.message_key(key, step, sender)
      return compress.decode_tree(compressor, compress.encode_tree(compressor, row, k), row, k)

    own = jax.vmap(roundtrip)(leaves, jnp.arange(n))
    return own, self._apply(own)

  def _exchange_live(self, leaves, compressor, key, step, ctx, lc):
    """Sharded exchange under a live mask: all live, the payload exchange; else decoded rows.

    With a worker masked, each device decodes its own rows' messages (the same
    keys as the payload exchange) and the live-masked mix moves the decoded
    rows: the same result as the dense reference, at the traffic of an
    uncompressed mix, on masked steps only.
    """

    def all_live(leaves):
      with context.live_masked(None):
        return collectives.exchange(self.matrix, leaves, compressor, key, step, ctx)

    def masked(leaves):
      m, n, b = self.num_workers, self.num_rows, ctx.block
      senders = jax.lax.axis_index(ctx.axis_name) * b + jnp.arange(b)
      if n > m:
        senders = jnp.concatenate([senders, jnp.arange(m, n)])

      def roundtrip(row, sender):
        k = compress.message_key(key, step, sender)
        return compress.decode_tree(compressor, compress.encode_tree(compressor, row, k), row, k)

      own = jax.vmap(roundtrip)(leaves, senders)
      return own, self._apply_live(own, lc.live, lc.fallback)

    return jax.lax.cond(jnp.all(lc.live), all_live, masked, leaves)

  def _apply(self, X: PyTree) -> PyTree:
    if not jax.tree.leaves(X):
      return X
    lc = context.current_live()
    if lc is None:
      return self._apply_static(X)
    self._check_live_graph(lc)

    def all_live(X):
      with context.live_masked(None):  # today's program, bit for bit
        return self._apply_static(X)

    return jax.lax.cond(
      jnp.all(lc.live), all_live, lambda X: self._apply_live(X, lc.live, lc.fallback), X
    )

  @property
  def live_structure(self) -> LiveStructure:
    """How this mix treats masked workers (:func:`live_structure`), computed once."""
    if getattr(self, "_live_structure", None) is None:
      self._live_structure = live_structure(self.matrix, self.num_workers)
    return self._live_structure

  def _check_live_graph(self, lc) -> None:
    """A graph mix under a live mask must stay on the graph its connectivity is judged on.

    ``set_live`` and ``disconnected="fallback"`` test the live workers'
    connectivity on ``tx.graph``; an edge of this mix outside it would let a
    split live subgraph pass silently (each part then mixing on its own).
    """
    if lc is None or lc.graph is None or self.live_structure.kind not in ("graph", "permutation"):
      return
    support = np.asarray(lc.graph, bool)
    own = self.live_structure.graph
    if support.shape != own.shape:
      return
    outside = np.argwhere(np.triu(own & ~support))
    if outside.size:
      pairs = [tuple(int(i) for i in p) for p in outside[:4]]
      raise ValueError(
        f"this mix exchanges between workers {pairs}{' ...' if len(outside) > 4 else ''}, "
        "which the transformation's communication graph (tx.graph, on which set_live and "
        "disconnected='fallback' judge the live workers' connectivity) does not contain; "
        "pass graph=W (the union of the workers' mixing matrices) to "
        "coopjax.algorithms._skeleton.transformation."
      )

  def _apply_live(self, X: PyTree, live, fallback) -> PyTree:
    """The live-masked mix: masked rows selected out first, kept unchanged after."""
    m, n = self.num_workers, self.num_rows
    ctx = shard_context()
    if ctx is None and workers.num_rows(X, "X") != n:
      return self._apply_static(X)  # raises the row-count error
    W_L = live_weights(self.matrix, m, live, fallback=fallback, structure=self.live_structure)
    keep = jnp.concatenate([local_live(live), jnp.ones((n - m,), bool)])

    def rows_mask(x):
      return keep.reshape(keep.shape + (1,) * (x.ndim - 1))

    selected = jax.tree.map(lambda x: jnp.where(rows_mask(x), x, jnp.zeros_like(x)), X)
    if ctx is not None:
      mixed = collectives.lower_live(self.matrix, self.live_structure, ctx)(
        selected, W_L, live, fallback
      )
    else:
      mixed = jax.tree.map(
        lambda x: einsum("ji,j...->i...", W_L.astype(x.dtype), x).astype(x.dtype), selected
      )
    return jax.tree.map(lambda y, x: jnp.where(rows_mask(x), y, x), mixed, X)

  def _apply_static(self, X: PyTree) -> PyTree:
    ctx = shard_context()
    if ctx is not None:
      return collectives.lower(self.matrix, ctx)(X)
    n = workers.num_rows(X, "X")
    if n != self.num_rows:
      raise ValueError(
        f"X has {n} rows but this mix acts on {self.num_rows} ({self.num_workers} workers + "
        f"{self.num_rows - self.num_workers} auxiliary); build X with coopjax.replicate(params, "
        "tx) so that its rows match the transformation's layout."
      )
    if self._averaging is not None:
      a, c = self._averaging
      total = worker_sum(X)
      return jax.tree.map(
        lambda x, t: jnp.asarray(a, x.dtype) * x + jnp.asarray(c, x.dtype) * t[None], X, total
      )
    return mix_dense(X, self.matrix)

  def __repr__(self) -> str:
    return f"Mix({self.num_rows}x{self.num_rows}, num_workers={self.num_workers}, {self.cost})"

  @classmethod
  def average(cls, num_workers: int, **kwargs) -> Mix:
    """Full averaging ``W = J``: every worker row becomes the mean of all workers."""
    m = _positive_workers(num_workers)
    return cls(np.full((m, m), 1.0 / m), m, **kwargs)

  @classmethod
  def mean_into_aux(cls, num_workers: int, **kwargs) -> Mix:
    r"""Workers unchanged; one auxiliary row receives their mean, ``z ← (1/m) Σ_i x_i``."""
    m = _positive_workers(num_workers)
    W = np.zeros((m + 1, m + 1))
    W[:m, :m] = np.eye(m)
    W[:m, m] = 1.0 / m
    return cls(W, m, **kwargs)

  @classmethod
  def sum_into_aux(cls, num_workers: int, **kwargs) -> Mix:
    r"""Workers unchanged; one auxiliary row receives their sum, ``z ← Σ_i x_i``."""
    m = _positive_workers(num_workers)
    W = np.zeros((m + 1, m + 1))
    W[:m, :m] = np.eye(m)
    W[:m, m] = 1.0
    return cls(W, m, **kwargs)

  @classmethod
  def permutation(cls, source) -> Mix:
    """Row ``i`` becomes row ``source[i]`` (a static permutation of the m worker rows)."""
    src = np.asarray(source, dtype=np.int64)
    if src.ndim != 1 or sorted(src.tolist()) != list(range(len(src))):
      raise ValueError(f"source must be a permutation of 0..m-1, got {list(src)}.")
    A = np.zeros((len(src), len(src)))
    A[src, np.arange(len(src))] = 1.0
    return cls(A, len(src))

  @classmethod
  def groups(cls, groups) -> Mix:
    r"""Every row becomes the mean of its group, ``x_i ← (1/|g|) Σ_{j ∈ g(i)} x_j``."""
    groups = [[int(i) for i in g] for g in groups]
    members = sorted(i for g in groups for i in g)
    m = len(members)
    if members != list(range(m)) or any(len(g) == 0 for g in groups):
      raise ValueError(f"groups must be non-empty lists partitioning 0..m-1, got {groups}.")
    ids = np.zeros(m, dtype=np.int64)
    for gi, g in enumerate(groups):
      ids[g] = gi
    sizes = np.array([len(g) for g in groups])
    return cls((ids[:, None] == ids[None, :]) / sizes[ids][None, :], m)


def dense_mixer(W: np.ndarray) -> Mixer:
  """``X -> X·W`` as a function (a :class:`Mix` over all rows as workers).

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing, topology
    >>> mixing.dense_mixer(topology.complete(4))({"w": jnp.arange(4.0)})["w"].tolist()
    [1.5, 1.5, 1.5, 1.5]
  """
  W = np.asarray(W)
  return Mix(W, W.shape[0])


def split_rows(X: PyTree, num_workers: int) -> tuple[PyTree, PyTree]:
  """Splits X into ``(workers, aux)``: rows ``[:m]`` and ``[m:]`` of every leaf.

  Algorithms address rows only through :func:`split_rows`, :func:`join_rows`,
  :func:`worker_mean` and :func:`worker_sum` (and the mixers), so that the
  sharded execution path can give these a per-device meaning.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing
    >>> workers, aux = mixing.split_rows({"w": jnp.arange(5.0)}, num_workers=4)
    >>> workers["w"].tolist(), aux["w"].tolist()
    ([0.0, 1.0, 2.0, 3.0], [4.0])
  """
  ctx = shard_context()
  if ctx is not None:
    if num_workers != ctx.num_workers:
      raise ValueError(
        f"split_rows got num_workers={num_workers} inside a sharded step over "
        f"{ctx.num_workers} workers."
      )
    num_workers = ctx.block
  return (
    jax.tree.map(lambda x: x[:num_workers], X),
    jax.tree.map(lambda x: x[num_workers:], X),
  )


def join_rows(workers: PyTree, aux: PyTree) -> PyTree:
  """Inverse of :func:`split_rows`: stacks worker rows then auxiliary rows.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing
    >>> mixing.join_rows({"w": jnp.zeros(2)}, {"w": jnp.ones(1)})["w"].tolist()
    [0.0, 0.0, 1.0]
  """
  return jax.tree.map(lambda w, a: jnp.concatenate([w, a.astype(w.dtype)], axis=0), workers, aux)


def worker_mean(workers: PyTree) -> PyTree:
  """Mean over all workers' rows (leading axis), e.g. ``x̄ = (1/m) Σ_i x_i``.

  :func:`worker_sum` divided by the number of workers m.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing
    >>> mixing.worker_mean({"w": jnp.arange(4.0)})["w"].tolist()
    1.5
  """
  ctx = shard_context()
  sums = worker_sum(workers)
  lc = context.current_live()
  if lc is not None:
    count = jnp.maximum(jnp.sum(lc.live.astype(jnp.int32)), 1)
    return jax.tree.map(lambda s: s / count.astype(s.dtype), sums)
  if ctx is not None:
    return jax.tree.map(lambda s: s / jnp.asarray(ctx.num_workers, s.dtype), sums)
  return jax.tree.map(lambda x, s: s / jnp.asarray(x.shape[0], s.dtype), workers, sums)


def worker_sum(workers: PyTree) -> PyTree:
  """Sum over all workers' rows (leading axis), e.g. ``Σ_i x_i``.

  Rows are added pairwise (:func:`coopjax.workers.sum_rows`), never reduced
  over the leading axis, which XLA's CPU backend does tens of times more
  slowly; in a sharded step each device adds its own rows and one all-reduce
  adds the devices' sums.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing
    >>> mixing.worker_sum({"w": jnp.arange(4.0)})["w"].tolist()
    6.0
  """
  ctx = shard_context()
  lc = context.current_live()
  if lc is not None:  # masked rows selected out (never multiplied: 0·NaN = NaN)
    keep = local_live(lc.live)
    workers = jax.tree.map(
      lambda x: jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)),
      workers,
    )
  if ctx is not None:
    return collectives.worker_sum(jax.tree.map(lambda x: sum_rows(x)[None], workers), ctx)
  return jax.tree.map(sum_rows, workers)


def permute(workers: PyTree, source) -> PyTree:
  """Row ``i`` becomes row ``source[i]``: ``x_i ← x_{source[i]}`` on every leaf.

  ``source`` is a static permutation of the m rows (a shift, a matching's
  involution); sharded, one collective-permute per device offset
  (:meth:`Mix.permutation`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing
    >>> mixing.permute({"w": jnp.arange(4.0)}, [1, 0, 3, 2])["w"].tolist()  # swap matched pairs
    [1.0, 0.0, 3.0, 2.0]
  """
  return Mix.permutation(source)(workers)


def group_mean(workers: PyTree, groups) -> PyTree:
  r"""Every row becomes the mean of its group: ``x_i ← (1/|g|) Σ_{j ∈ g(i)} x_j``.

  ``groups`` is a static list of lists of row indices partitioning ``0..m-1``
  (:meth:`Mix.groups`); sharded, no traffic when every group lies within one
  device.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing
    >>> mixing.group_mean({"w": jnp.arange(4.0)}, [[0, 1], [2, 3]])["w"].tolist()
    [0.5, 0.5, 2.5, 2.5]
  """
  return Mix.groups(groups)(workers)


# ----------------------------------------------------------------------------------------------
# Live masks: any mix with some workers masked out


class LiveStructure(NamedTuple):
  """The static part of a mix's live-masked weights (:func:`live_structure`).

  Attributes:
    kind: how the workers' block A is re-weighted: ``"diagonal"`` (no
      exchange, unchanged), ``"average"`` (``A = aI + cJ``: the mean over the
      live workers), ``"permutation"`` (``x_i ← x_{σ(i)}`` only when both are
      live, else ``x_i`` kept) or ``"graph"`` (Metropolis–Hastings weights on
      the live subgraph).
    graph: bool [m, m], the undirected support of A without its diagonal.
    scale: float [m], the column sums ``s_i = Σ_j A_ji`` (the weight the
      workers' block carries; ``1 − α`` for elastic averaging).
    average_a: ``a`` of ``A = aI + cJ`` (kind ``"average"``), else 0.
    aux_modes: per auxiliary row, ``"elastic"`` (the row is read by the
      workers: a masked worker's weight stays with the row), ``"mean"`` (a
      mean of the workers: renormalised over the live ones) or ``"sum"``.
  """

  kind: str
  graph: np.ndarray
  scale: np.ndarray
  average_a: float
  aux_modes: tuple[str, ...]


def live_structure(W, num_workers: int) -> LiveStructure:
  """Classifies W for live masking (static; see :class:`LiveStructure`).

  Examples:
    >>> from coopjax import mixing, topology
    >>> [mixing.live_structure(W, 4).kind for W in (topology.ring(4), topology.complete(4))]
    ['graph', 'average']
    >>> mixing.live_structure(topology.easgd(4, 0.1), 4).aux_modes
    ('elastic',)
  """
  W = np.asarray(W, np.float64)
  m = int(num_workers)
  A, B, C = W[:m, :m], W[:m, m:], W[m:, :m]
  nz = np.abs(A) > 1e-12
  off = nz & ~np.eye(m, dtype=bool)
  graph = off | off.T
  scale = A.sum(axis=0)
  avg = _averaging(W[:m, :m], m) if m > 2 else None
  if not off.any():
    kind, a = "diagonal", 0.0
  elif avg is not None:
    kind, a = "average", avg[0]
  elif np.all(nz.sum(axis=0) == 1) and np.all(nz.sum(axis=1) == 1) and np.allclose(A[nz], 1.0):
    kind, a = "permutation", 0.0
  else:
    kind, a = "graph", 0.0
  modes = []
  for col in range(W.shape[0] - m):
    if np.any(np.abs(C[col]) > 1e-12):
      modes.append("elastic")
    elif np.isclose(B[:, col].sum(), 1.0):
      modes.append("mean")
    else:
      modes.append("sum")
  return LiveStructure(kind, graph, scale, float(a), tuple(modes))


def live_weights(W, num_workers: int, live, *, fallback=None, structure=None) -> jax.Array:
  r"""The mixing matrix of W with only the ``live`` workers (traced; float32, ``n × n``).

  With L the live set, d^L the live degree in the support G of W's workers'
  block A and s_i its column sums:

  .. math::

     w_{ij} = \frac{s_j}{1 + \max(d_i^L, d_j^L)} \ \ (i \ne j,\ \{i, j\} \in G,\ i, j \in L),
     \qquad w_{jj} = s_j - \sum_{i \ne j} w_{ij},

  (Metropolis–Hastings on the live subgraph; ``A = aI + cJ``: ``a I + (s − a) J_L``;
  a permutation: the partner's row when both are live, else one's own; a
  diagonal A: unchanged). Auxiliary rows: an elastic anchor
  ``z ← (1 − |L|α) z + α Σ_{i∈L} x_i`` (a masked worker's weight stays with z),
  a mean of the workers renormalised over L, a sum over L. A masked worker's
  row and column are ``e_i`` (it is frozen); ``fallback`` (traced bool) puts
  ``J_L`` in place of a graph's weights.

  Args:
    W: the static ``n × n`` matrix (``m`` workers, then auxiliaries).
    num_workers: m.
    live: bool [m].
    fallback: None or a bool scalar (the disconnected-graph fallback).
    structure: :func:`live_structure` of W (computed when None).

  Returns:
    The traced ``n × n`` matrix ``W_L`` (``x_i ← Σ_j W_L[j, i] x_j``).

  Examples:
    A ring of 4 with worker 3 masked: the path 0–1–2 with MH weights.

    >>> import jax.numpy as jnp, numpy as np
    >>> from coopjax import mixing, topology
    >>> W_L = mixing.live_weights(topology.ring(4), 4, jnp.array([True, True, True, False]))
    >>> np.round(np.asarray(W_L) * 6).astype(int).tolist()
    [[4, 2, 0, 0], [2, 2, 2, 0], [0, 2, 4, 0], [0, 0, 0, 6]]
  """
  W = np.asarray(W, np.float64)
  m, n = int(num_workers), W.shape[0]
  _check_live_shape(live, m)
  st = live_structure(W, m) if structure is None else structure
  lv = jnp.asarray(live).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(lv), 1.0)
  eye = jnp.eye(m, dtype=jnp.float32)
  both = lv[:, None] * lv[None, :]
  scale = jnp.asarray(st.scale, jnp.float32)
  J_L = both / count + jnp.diag(1.0 - lv)
  if st.kind == "diagonal":
    A = jnp.asarray(W[:m, :m], jnp.float32)
  elif st.kind == "average":
    a = st.average_a
    A = a * eye + (scale[None, :] - a) * lv[:, None] / count
  elif st.kind == "permutation":
    P = jnp.asarray(W[:m, :m], jnp.float32) * both
    A = P + jnp.diag(1.0 - jnp.sum(P, axis=0))
  else:
    G = jnp.asarray(st.graph, jnp.float32) * both
    d = jnp.sum(G, axis=0)
    mh = G / (1.0 + jnp.maximum(d[:, None], d[None, :]))
    mh = mh + jnp.diag(1.0 - jnp.sum(mh, axis=0))
    if fallback is not None:
      mh = jnp.where(fallback, J_L, mh)
    A = mh * scale[None, :]
  if n == m:
    return _freeze_masked(A, lv)
  B = jnp.asarray(W[:m, m:], jnp.float32)
  C = jnp.asarray(W[m:, :m], jnp.float32)
  E = jnp.asarray(W[m:, m:], jnp.float32)
  cols, extra = [], []
  for col, mode in enumerate(st.aux_modes):
    b = B[:, col] * lv
    if mode == "mean":
      b = b / jnp.maximum(jnp.sum(b), 1e-30) * float(W[:m, m + col].sum())
    cols.append(b)
    extra.append(jnp.sum(B[:, col] * (1.0 - lv)) if mode == "elastic" else 0.0)
  B_L = jnp.stack(cols, axis=1)
  E_L = E + jnp.diag(jnp.asarray(extra, jnp.float32))
  keep = jnp.concatenate([lv, jnp.ones((n - m,), jnp.float32)])
  return _freeze_masked(jnp.block([[A, B_L], [C, E_L]]), keep)


def _freeze_masked(W_L: jax.Array, keep: jax.Array) -> jax.Array:
  """``W_L`` with row and column i set to ``e_i`` where ``keep[i] == 0`` (a frozen row).

  The workers' blocks above leave a masked worker's column as the live mean
  (``A = aI + cJ``), its own weight ``a`` or ``1 − α`` (a diagonal or an
  elastic A) and the anchor's pull ``C``; the mix selects masked rows out and
  restores them, so only a caller applying ``W_L`` itself would see them.
  """
  both = keep[:, None] * keep[None, :]
  return W_L * both + jnp.diag(1.0 - keep)


def live_components(graph, live) -> list[list[int]]:
  """Host-side: the connected components of the live subgraph (lists of worker indices).

  Examples:
    >>> from coopjax import mixing, topology
    >>> mixing.live_components(topology.ring(6), [True, False, True, True, False, True])
    [[0, 5], [2, 3]]
  """
  live = np.asarray(live, bool)
  G = np.abs(np.asarray(graph, np.float64)) > 1e-12
  _check_live_shape(live, G.shape[0])
  G = G | G.T
  seen, comps = set(), []
  for start in np.flatnonzero(live).tolist():
    if start in seen:
      continue
    comp, stack = [], [start]
    seen.add(start)
    while stack:
      i = stack.pop()
      comp.append(i)
      for j in np.flatnonzero(G[i] & live).tolist():
        if j not in seen:
          seen.add(j)
          stack.append(j)
    comps.append(sorted(comp))
  return comps


def live_connected(graph, live) -> jax.Array:
  """Traced: whether the live workers form one connected subgraph of ``graph``.

  Reachability from the first live worker by ``⌈log₂ m⌉`` squarings of the
  live adjacency (with self loops); runs inside the compiled step.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import mixing, topology
    >>> bool(mixing.live_connected(topology.ring(6), jnp.array([1, 0, 1, 1, 1, 1], bool)))
    True
    >>> bool(mixing.live_connected(topology.ring(6), jnp.array([1, 0, 1, 1, 0, 1], bool)))
    False
  """
  G = np.abs(np.asarray(graph, np.float64)) > 1e-12
  m = G.shape[0]
  lv = jnp.asarray(live).astype(jnp.float32)
  R = jnp.minimum(
    jnp.asarray(G | G.T | np.eye(m, dtype=bool), jnp.float32) * lv[:, None] * lv[None, :]
    + jnp.eye(m),
    1.0,
  )
  for _ in range(max(1, int(np.ceil(np.log2(max(m, 2)))))):
    R = jnp.minimum(R @ R, 1.0)
  first = jnp.argmax(lv)
  reached = R[first] > 0
  return jnp.all(reached | (lv == 0))


def check_live(graph, live) -> list[list[int]]:
  """Host-side: raises ValueError naming the components when the live subgraph is disconnected.

  Returns the one component (the live workers) otherwise.

  Examples:
    >>> from coopjax import mixing, topology
    >>> mixing.check_live(topology.ring(6), [True, False, True, True, False, True])
    Traceback (most recent call last):
    ...
    ValueError: the live workers split into 2 disconnected components [[0, 5], [2, 3]] ...
  """
  live = np.asarray(live, bool)
  _check_live_shape(live, np.shape(graph)[0])
  if not live.any():
    raise ValueError("every worker is masked; at least one must stay live.")
  comps = live_components(graph, live)
  if len(comps) > 1:
    raise ValueError(
      f"the live workers split into {len(comps)} disconnected components {comps} of the "
      f"mixing graph (masked: {np.flatnonzero(~live).tolist()}); they would no longer reach "
      "consensus. Re-admit a worker that joins them (coopjax.rejoin), or build the mask "
      "with coopjax.with_live_mask(tx, disconnected='fallback') to average the live workers "
      "(J_L) while the graph is split."
    )
  return comps


def local_live(live) -> jax.Array:
  """This device's block of the live mask [m] (the whole mask outside a sharded step)."""
  ctx = shard_context()
  live = jnp.asarray(live)
  if ctx is None:
    return live
  start = jax.lax.axis_index(ctx.axis_name) * ctx.block
  return jax.lax.dynamic_slice_in_dim(live, start, ctx.block)


def quantized_mean(workers: jax.Array, compressor: compress.Compressor, key: jax.Array):
  r"""The mean of the workers' arrays, each sent quantized, the mean re-quantized (torchft's scheme).

  .. math::

     \bar q = Q\Big(\frac1m \sum_i Q(x_i)\Big), \qquad Q = \text{decode} \circ \text{encode},

  with the sum in float32 in worker order (:func:`coopjax.workers.sum_rows`).
  ``workers`` is ``[m, R, C]``: each worker's array of R rows, which a
  row-wise compressor (a per-row absmax quantizer) quantizes row by row.
  Sharded, this is an all-to-all of each worker's quantized chunks, a local
  float32 sum by each chunk's owner, a requantization and an all-gather, with
  the payloads on the wire as ``uint8`` (:func:`coopjax.parallel.collectives.quantized_mean`),
  equal to this reference bit for bit.

  Args:
    workers: ``[m, R, C]`` float (the local block ``[b, R, C]`` when sharded).
    compressor: a row-wise :class:`coopjax.compress.Compressor`.
    key: the key handed to ``encode``/``decode`` (deterministic quantizers ignore it).

  Returns:
    ``[R, C]``, replicated when sharded.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from coopjax import compress, mixing
    >>> x = jnp.arange(8.0).reshape(2, 2, 2)
    >>> mixing.quantized_mean(x, compress.identity(), jax.random.key(0)).tolist()
    [[2.0, 3.0], [4.0, 5.0]]
  """
  ctx = shard_context()
  lc = context.current_live()
  if ctx is not None:
    live = None if lc is None else lc.live
    return collectives.quantized_mean(workers, compressor, key, ctx, live)
  like = jax.ShapeDtypeStruct(workers.shape[1:], workers.dtype)
  Q = lambda x: compressor.decode(compressor.encode(x, key), like, key)
  if lc is not None:  # the mean over the live workers (masked rows selected out)
    keep = lc.live.reshape((-1,) + (1,) * (workers.ndim - 1))
    total = sum_rows(jnp.where(keep, jax.vmap(Q)(workers), 0))
    return Q(total / jnp.maximum(jnp.sum(lc.live), 1).astype(total.dtype))
  total = sum_rows(jax.vmap(Q)(workers))
  return Q(total / jnp.asarray(workers.shape[0], total.dtype))
