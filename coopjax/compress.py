r"""Compressors: what one worker sends instead of its full message.

A compressor is a pair of pure functions acting on **one worker's message,
leaf by leaf** (every k, norm and scale below is per leaf):

* ``encode(x, key) -> payload``: a pytree of arrays with static shapes and
  wire dtypes (``uint8``, ``int32``, ``float32``): exactly what travels;
* ``decode(payload, like, key) -> x̂``: the receiver's reconstruction, with the
  shape and dtype of ``like`` (a ``jax.ShapeDtypeStruct`` or an array of the
  message's shape). The receiver also gets ``key``: compressors whose random
  choices the receiver can regenerate (random-k's indices) send values only.

The key of a message is derived from the step k and the sender i
(:func:`message_key`), never drawn from hidden state, so sender and receiver
agree on it without sending it.

The compressors, with their payloads (d the leaf's size):

=======================  ==========================================  ==============================
compressor               payload                                     bytes
=======================  ==========================================  ==============================
:func:`identity`         ``x``                                       ``d·itemsize``
:func:`top_k`            ``{"values", "indices": int32}``            ``k·(itemsize + 4)``
:func:`random_k`         ``{"values"}`` (indices from the key)       ``k·itemsize``
:func:`qsgd`             ``{"norm": float32, "codes": uint8}``       ``4 + ⌈d·(bits+1)/8⌉``
:func:`scaled_sign`      ``{"scale": float32, "signs": uint8}``      ``4 + ⌈d/8⌉``
:func:`int8`             ``{"scales": float32, "q": uint8}``         ``4·rows + d``
:func:`int4`             ``{"scales": float32, "q": uint8}``         ``4·rows + ⌈d/2⌉``
=======================  ==========================================  ==============================

Values travel as ``float32`` or, for any other float dtype, as their bytes
(``uint8``); codes are packed by :func:`pack_bits` and int8 codes bitcast to
``uint8`` (``lax.bitcast_convert_type``): a collective on a float8/int4 array
would be lowered at 16 or 8 bits per value, one on the packed ``uint8`` moves
exactly the payload. :func:`tune_gamma` picks CHOCO's consensus step size for
a mixing matrix and a compressor by simulation.

  >>> import jax, jax.numpy as jnp
  >>> from coopjax import compress
  >>> q = compress.identity()
  >>> key = compress.message_key(jax.random.key(0), step=3, sender=1)
  >>> x = jnp.array([1.0, -2.0])
  >>> q.decode(q.encode(x, key), x, key).tolist()
  [1.0, -2.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from coopjax import topology

PyTree = Any

__all__ = [
  "Compressor",
  "identity",
  "top_k",
  "random_k",
  "qsgd",
  "scaled_sign",
  "int8",
  "int4",
  "pack_bits",
  "unpack_bits",
  "num_kept",
  "message_key",
  "leaf_keys",
  "encode_tree",
  "decode_tree",
  "payload_bytes",
  "GammaTuning",
  "tune_gamma",
  "check_compressor",
]


class Compressor(NamedTuple):
  """A message compressor: ``encode(x, key) -> payload``, ``decode(payload, like, key) -> x̂``.

  Attributes:
    name: a short description (``"top_k(fraction=0.01)"``), used in reports.
    encode: ``encode(x, key)``: one leaf of one worker's message to its payload.
    decode: ``decode(payload, like, key)``: the payload back to an array shaped like ``like``.
  """

  name: str
  encode: Callable[[jax.Array, jax.Array], PyTree]
  decode: Callable[[PyTree, Any, jax.Array], jax.Array]


def identity() -> Compressor:
  """The message itself: ``Q(x) = x`` (payload: x in its own dtype).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from coopjax import compress
    >>> q = compress.identity()
    >>> q.encode(jnp.arange(3.0), jax.random.key(0)).tolist()
    [0.0, 1.0, 2.0]
  """
  return Compressor(
    name="identity",
    encode=lambda x, key: x,
    decode=lambda payload, like, key: jnp.asarray(payload, like.dtype),
  )


def check_compressor(compressor, name: str = "compressor") -> Compressor:
  """``compressor`` must be a :class:`Compressor` (``encode`` and ``decode``); returns it.

  Examples:
    >>> from coopjax import compress
    >>> compress.check_compressor(compress.int4).name
    Traceback (most recent call last):
    ...
    TypeError: compressor must be a coopjax.compress.Compressor ..., got function: call the factory, int4().
  """
  if not (
    callable(getattr(compressor, "encode", None)) and callable(getattr(compressor, "decode", None))
  ):
    hint = ""
    if callable(compressor) and hasattr(compressor, "__name__"):
      hint = f": call the factory, {compressor.__name__}()"
    raise TypeError(
      f"{name} must be a coopjax.compress.Compressor (e.g. coopjax.compress.identity(), "
      f"coopjax.compress.top_k(fraction=0.01)), got {type(compressor).__name__}{hint}."
    )
  return compressor


# --- wire format -------------------------------------------------------------------------------

WIRE_DTYPES = (jnp.uint8, jnp.int32, jnp.float32)


def pack_bits(codes: jax.Array, width: int) -> jax.Array:
  r"""Packs unsigned ``width``-bit codes densely into bytes (``uint8``), least significant first.

  Code ``i`` occupies bits ``[i·width, (i+1)·width)`` of the stream; stream bit
  ``b`` is bit ``b mod 8`` of byte ``⌊b/8⌋``. For ``width = 4`` element ``2i`` is
  the low nibble of byte ``i`` and element ``2i+1`` its high nibble. The last
  byte is padded with zero bits; ``n`` codes take ``⌈n·width/8⌉`` bytes.

  Args:
    codes: integer array (any shape, read flattened) with values in ``[0, 2^width)``;
      higher bits are dropped.
    width: bits per code, ``1 ≤ width ≤ 16``.

  Returns:
    A ``uint8`` vector of ``⌈codes.size·width/8⌉`` bytes.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import compress
    >>> compress.pack_bits(jnp.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist()
    [13, 1]
    >>> compress.pack_bits(jnp.array([3, 10, 15]), 4).tolist()
    [163, 15]
    >>> compress.unpack_bits(compress.pack_bits(jnp.array([5, 0, 7]), 3), 3, 3).tolist()
    [5, 0, 7]
  """
  width = _check_width(width)
  codes = jnp.ravel(codes).astype(jnp.uint32) & jnp.uint32((1 << width) - 1)
  n = codes.size
  nbytes = -(-n * width // 8)
  if 8 % width == 0:  # whole codes per byte: shift and add in place
    per = 8 // width
    grouped = jnp.pad(codes, (0, nbytes * per - n)).reshape(nbytes, per)
    shifts = (jnp.arange(per, dtype=jnp.uint32) * width)[None, :]
    return jnp.sum(grouped << shifts, axis=1, dtype=jnp.uint32).astype(jnp.uint8)
  # Any other width: 8 codes fill exactly `width` bytes; byte j of a group ORs the codes that
  # overlap its bits, each shifted into place (no per-bit intermediate).
  groups = -(-n // 8)
  grouped = jnp.pad(codes, (0, groups * 8 - n)).reshape(groups, 8)
  out = [
    sum(_shifted(grouped[:, t], t * width - 8 * j) for t in _overlapping(j, width))
    for j in range(width)
  ]
  return (jnp.stack(out, axis=1) & jnp.uint32(0xFF)).astype(jnp.uint8).reshape(-1)[:nbytes]


def unpack_bits(packed: jax.Array, width: int, n: int) -> jax.Array:
  """Inverse of :func:`pack_bits`: the first ``n`` ``width``-bit codes, as ``uint32``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import compress
    >>> compress.unpack_bits(jnp.array([163, 15], jnp.uint8), 4, 3).tolist()
    [3, 10, 15]
  """
  width = _check_width(width)
  packed = jnp.ravel(packed).astype(jnp.uint32)
  mask = jnp.uint32((1 << width) - 1)
  if 8 % width == 0:
    per = 8 // width
    shifts = (jnp.arange(per, dtype=jnp.uint32) * width)[None, :]
    return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]
  groups = -(-n // 8)
  size = groups * width
  packed = packed[:size] if packed.size >= size else jnp.pad(packed, (0, size - packed.size))
  grouped = packed.reshape(groups, width)
  codes = [
    sum(
      _shifted(grouped[:, j], 8 * j - t * width)
      for j in range(width)
      if t in _overlapping(j, width)
    )
    for t in range(8)
  ]
  return (jnp.stack(codes, axis=1) & mask).reshape(-1)[:n]


def _overlapping(j: int, width: int) -> range:
  """The codes ``t`` of a group of 8 whose bits ``[t·width, (t+1)·width)`` meet byte ``j``."""
  return range(max(0, (8 * j - width) // width + 1), min(8, (8 * j + 8 + width - 1) // width))


def _shifted(x: jax.Array, shift: int) -> jax.Array:
  """``x << shift`` for ``shift ≥ 0``, ``x >> −shift`` otherwise (static shift)."""
  return x << jnp.uint32(shift) if shift >= 0 else x >> jnp.uint32(-shift)


def _check_width(width) -> int:
  if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= 16:
    raise ValueError(f"width must be an integer in [1, 16] bits; got {width!r}.")
  return int(width)


def _values_to_wire(values: jax.Array) -> jax.Array:
  """Values in their own precision on the wire: float32 as is, any other dtype as its bytes."""
  if values.dtype == jnp.float32:
    return values
  return lax.bitcast_convert_type(values, jnp.uint8)


def _values_from_wire(wire: jax.Array, dtype) -> jax.Array:
  if dtype == jnp.float32:
    return wire
  return lax.bitcast_convert_type(wire, dtype)


def _floating(x, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
      f"{name} compresses floating-point messages; got a leaf of dtype {x.dtype}. "
      "Leave integer leaves out of the mix (Mix(mask=...))."
    )
  return x


def _like(like) -> tuple[tuple[int, ...], Any]:
  return tuple(np.shape(like)), like.dtype


# --- sparsifiers ---------------------------------------------------------------------------------


def num_kept(d: int, *, k: int | None = None, fraction: float | None = None) -> int:
  r"""How many of ``d`` coordinates a sparsifier keeps: ``min(k, d)`` or ``max(1, ⌊d·fraction⌋)``.

  ``fraction`` is the part kept; ``⌊d·fraction⌋`` is taken with a relative
  tolerance of ``1e-9`` so that decimal fractions count as written
  (``0.29 · 100`` keeps 29, not 28).

  Examples:
    >>> from coopjax import compress
    >>> compress.num_kept(10_000, fraction=0.01), compress.num_kept(10, fraction=0.01)
    (100, 1)
    >>> compress.num_kept(100, fraction=0.29), compress.num_kept(5, k=8)
    (29, 5)
  """
  if d <= 0:
    return 0
  if k is not None:
    return min(int(k), d)
  return max(1, min(d, int(np.floor(d * fraction * (1 + 1e-9)))))


_BISECT_MIN_SIZE = 32_768
_BISECT_MIN_FRACTION = 1 / 20


def _bisects(d: int, k: int) -> bool:
  """Whether :func:`_largest_k_by_bisection` beats ``lax.top_k`` for k of d (static).

  ``lax.top_k``'s cost grows with k (on CPU about 0.5 µs per kept entry at
  d = 2·10⁵); the bisection costs about 31 passes over d whatever k: it wins
  from about 5 % of a large leaf on.
  """
  return d >= _BISECT_MIN_SIZE and k >= d * _BISECT_MIN_FRACTION


def _largest_k_by_bisection(keys: jax.Array, k: int, bits: int) -> jax.Array:
  r"""Indices (ascending, int32) of the k largest of ``keys`` (uint32 below 2^bits), ties low.

  The k-th largest key t is found bit by bit, from the highest:

  .. math::

     t = \max\{\, u : |\{ j : 	ext{keys}_j \ge u \}| \ge k \,\},

  then S = {j : keys_j > t} plus the lowest-indexed entries equal to t until
  |S| = k: the set ``lax.top_k`` selects, in index order.
  """

  def refine(b, t):
    candidate = t | jnp.left_shift(jnp.uint32(1), (bits - 1 - b).astype(jnp.uint32))
    enough = jnp.sum(keys >= candidate, dtype=jnp.int32) >= k
    return jnp.where(enough, candidate, t)

  t = lax.fori_loop(0, bits, refine, jnp.uint32(0))
  above = keys > t
  at = keys == t
  room = k - jnp.sum(above, dtype=jnp.int32)
  take = above | (at & (jnp.cumsum(at, dtype=jnp.int32) <= room))
  return jnp.nonzero(take, size=k)[0].astype(jnp.int32)


def _top_magnitudes(x: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest ``|x_j|`` of a flat x, ties to the lower index (the set is exact)."""
  magnitude = jnp.abs(x)
  if _bisects(x.size, k) and jnp.dtype(x.dtype).itemsize <= 4:
    # |x| as float32 is exact for 16- and 32-bit floats; its bits order as its values.
    keys = lax.bitcast_convert_type(magnitude.astype(jnp.float32), jnp.uint32)
    return _largest_k_by_bisection(keys, k, bits=31)
  return lax.top_k(magnitude, k)[1].astype(jnp.int32)


def _check_k_fraction(name: str, k, fraction) -> None:
  if (k is None) == (fraction is None):
    raise ValueError(
      f"{name} takes exactly one of k (coordinates kept) or fraction (part kept); "
      f"got k={k!r}, fraction={fraction!r}."
    )
  if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
    raise ValueError(f"{name}: k must be a positive integer; got k={k!r}.")
  if fraction is not None and (
    isinstance(fraction, bool)
    or not isinstance(fraction, (int, float, np.integer, np.floating))
    or not 0.0 < float(fraction) <= 1.0
  ):
    raise ValueError(f"{name}: fraction is the part kept, in (0, 1]; got fraction={fraction!r}.")


def _sparsity_name(name: str, k, fraction, **extra) -> str:
  args = [f"k={k}" if k is not None else f"fraction={fraction}"]
  args += [f"{key}={value}" for key, value in extra.items()]
  return f"{name}({', '.join(args)})"


def top_k(k: int | None = None, fraction: float | None = None) -> Compressor:
  r"""Keeps the k coordinates of largest magnitude (per leaf), zeros the rest.

  .. math::

     Q(x)_j = x_j \,[\, j \in S \,], \qquad
     S = \text{the } k \text{ indices of largest } |x_j| ,

  with ``k = min(k, d)`` or ``k = max(1, ⌊d·fraction⌋)`` (:func:`num_kept`),
  d the leaf's size; among equal magnitudes the lower (flattened) index is
  kept. Deterministic (the key is unused); biased, with
  ``‖Q(x) − x‖² ≤ (1 − k/d)‖x‖²``. S is found by ``lax.top_k`` or, for
  k ≥ 5 % of a leaf of at least 32768 entries (where ``lax.top_k``'s cost,
  growing with k, exceeds it), by a bisection on the bits of ``|x|`` as
  float32 (31 counting passes): the same set, sent in index order.

  Payload: ``{"values": x[S], "indices": S}``, the values in ``x``'s own
  precision (``float32``, or the bytes of any other float dtype as ``uint8``
  of shape ``(k, itemsize)``) and the indices as ``int32`` into the flattened
  leaf: ``k·(itemsize + 4)`` bytes.

  Args:
    k: coordinates kept per leaf (capped at the leaf's size).
    fraction: the part of each leaf kept, in ``(0, 1]``. Give exactly one of ``k``, ``fraction``.

  Returns:
    A :class:`Compressor`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from coopjax import compress
    >>> q = compress.top_k(k=2)
    >>> x = jnp.array([0.5, -3.0, 2.0, 2.0])
    >>> key = jax.random.key(0)
    >>> q.decode(q.encode(x, key), x, key).tolist()
    [0.0, -3.0, 2.0, 0.0]
    >>> compress.payload_bytes(compress.top_k(fraction=0.01), jnp.zeros(10_000))
    800

  References:
    S. U. Stich, J.-B. Cordonnier, M. Jaggi, "Sparsified SGD with memory", NeurIPS 2018;
    A. Koloskova, S. U. Stich, M. Jaggi, "Decentralized stochastic optimization and gossip
    algorithms with compressed communication", ICML 2019 (``top_a``).
  """
  _check_k_fraction("top_k", k, fraction)

  def encode(x, key):
    x = _floating(x, "top_k").reshape(-1)
    kept = num_kept(x.size, k=k, fraction=fraction)
    indices = _top_magnitudes(x, kept)  # ties: the lower index first
    return {"values": _values_to_wire(x[indices]), "indices": indices}

  def decode(payload, like, key):
    shape, dtype = _like(like)
    values = _values_from_wire(payload["values"], dtype)
    flat = jnp.zeros(int(np.prod(shape)), dtype).at[payload["indices"]].set(values)
    return flat.reshape(shape)

  return Compressor(name=_sparsity_name("top_k", k, fraction), encode=encode, decode=decode)


def random_k(
  k: int | None = None, fraction: float | None = None, unbiased: bool = False
) -> Compressor:
  r"""Keeps k coordinates drawn uniformly without replacement from the message's key.

  .. math::

     Q(x)_j = c\, x_j \,[\, j \in S \,], \qquad
     S = \text{the } k \text{ indices of largest } \lfloor b_j / 4 \rfloor, \qquad
     c = \begin{cases} d/k & \text{unbiased} \\ 1 & \text{otherwise,} \end{cases}

  with ``b = jax.random.bits(key, (d,), uint32)`` (30-bit random keys ``⌊b_j/4⌋``,
  ties to the lower index), ``k`` as in :func:`top_k`, d the leaf's size: a
  uniformly drawn k-subset (the order of i.i.d. keys; a tie at the k-th key has
  probability about ``d/2^30``). The receiver gets the key, regenerates S and
  places the values: only the values travel. Unbiased (``E Q(x) = x``) with
  ``c = d/k``. S is selected as :func:`top_k` selects (``lax.top_k`` on the
  keys as positive normal float32 numbers, their bits plus ``2^23``: the same
  order; or, for k ≥ 5 % of a leaf of at least 32768 entries, a bisection on
  the keys' bits: the same set), where a random permutation of the d indices
  would cost a sort of d keys in several rounds.

  Payload: ``{"values": x[S]}`` in ``x``'s own precision (``float32``, or the
  bytes of another float dtype as ``uint8`` of shape ``(k, itemsize)``): ``k·itemsize`` bytes.

  Args:
    k: coordinates kept per leaf (capped at the leaf's size).
    fraction: the part of each leaf kept, in ``(0, 1]``. Give exactly one of ``k``, ``fraction``.
    unbiased: scale the kept values by ``d/k``.

  Returns:
    A :class:`Compressor`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from coopjax import compress
    >>> q = compress.random_k(k=2)
    >>> x = jnp.arange(1.0, 7.0)
    >>> key = compress.message_key(jax.random.key(0), step=1, sender=0)
    >>> payload = q.encode(x, key)
    >>> list(payload), payload["values"].shape
    (['values'], (2,))
    >>> x_hat = q.decode(payload, x, key)
    >>> int((x_hat != 0).sum()), bool(jnp.all((x_hat == 0) | (x_hat == x)))
    (2, True)

  References:
    S. U. Stich, J.-B. Cordonnier, M. Jaggi, "Sparsified SGD with memory", NeurIPS 2018;
    A. Koloskova, S. U. Stich, M. Jaggi, ICML 2019 (``rand_a``).
  """
  _check_k_fraction("random_k", k, fraction)
  if not isinstance(unbiased, bool):
    raise TypeError(f"random_k: unbiased must be True or False; got {unbiased!r}.")

  def indices(key, d):
    kept = num_kept(d, k=k, fraction=fraction)
    keys = jax.random.bits(key, (d,), jnp.uint32) >> 2  # 30-bit keys
    if _bisects(d, kept):
      return _largest_k_by_bisection(keys, kept, bits=30), kept
    # As positive normal floats (the same order): lax.top_k is fast on float32.
    floats = lax.bitcast_convert_type(keys + jnp.uint32(1 << 23), jnp.float32)
    return lax.top_k(floats, kept)[1].astype(jnp.int32), kept

  def encode(x, key):
    x = _floating(x, "random_k").reshape(-1)
    idx, _ = indices(key, x.size)
    return {"values": _values_to_wire(x[idx])}

  def decode(payload, like, key):
    shape, dtype = _like(like)
    d = int(np.prod(shape))
    idx, kept = indices(key, d)
    values = _values_from_wire(payload["values"], dtype)
    if unbiased and kept:
      values = (values.astype(jnp.float32) * jnp.float32(d / kept)).astype(dtype)
    return jnp.zeros(d, dtype).at[idx].set(values).reshape(shape)

  name = _sparsity_name("random_k", k, fraction, **({"unbiased": True} if unbiased else {}))
  return Compressor(name=name, encode=encode, decode=decode)


# --- quantizers ----------------------------------------------------------------------------------


def qsgd(bits: int, unbiased: bool = True) -> Compressor:
  r"""QSGD: the norm and ``s = 2^bits − 1`` stochastic levels per coordinate (per leaf).

  .. math::

     Q(x)_j = c\, \|x\|_2 \operatorname{sign}(x_j)\, \frac{\xi_j}{s}, \qquad
     \xi_j = \lfloor r_j \rfloor + [\, u_j < r_j - \lfloor r_j \rfloor \,], \quad
     r_j = \frac{s\,|x_j|}{\|x\|_2},

  with ``u = jax.random.uniform(key, (d,), float32)`` (d the leaf's size),
  ``ξ_j ≤ s``, ``Q(0) = 0``, and ``c = 1`` (unbiased: ``E Q(x) = x``) or
  ``c = 1 / (1 + min(d/s², √d/s))`` (biased: the variance-optimal shrinkage of
  Koloskova et al., making ``Q`` a contraction). In float32: the norm, then
  ``r = |x|·fl(s/‖x‖)``; the receiver applies ``c`` and ``1/s``.

  Payload: ``{"norm": float32 (), "codes": uint8}``: per coordinate the level
  ``ξ_j`` (``bits`` bits) and the sign (bit ``bits``, set for ``x_j < 0``), as
  a ``bits + 1``-bit code packed densely by :func:`pack_bits`:
  ``4 + ⌈d·(bits+1)/8⌉`` bytes.

  Args:
    bits: bits per level, ``1 ≤ bits ≤ 15`` (``s = 2^bits − 1`` levels).
    unbiased: ``c = 1``; ``False`` scales by ``1 / (1 + min(d/s², √d/s))``.

  Returns:
    A :class:`Compressor`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from coopjax import compress
    >>> q = compress.qsgd(bits=2)  # s = 3 levels of ‖x‖/3
    >>> x = jnp.array([3.0, 0.0, -4.0])  # ‖x‖ = 5
    >>> key = jax.random.key(0)
    >>> x_hat = q.decode(q.encode(x, key), x, key)
    >>> [round(v * 3 / 5, 4) for v in x_hat.tolist()]  # levels: 1 or 2, 0, -2 or -3
    [1.0, 0.0, -3.0]
    >>> compress.payload_bytes(compress.qsgd(bits=4), jnp.zeros(1000))  # 4 + 1000·5/8
    629

  References:
    D. Alistarh, D. Grubic, J. Li, R. Tomioka, M. Vojnovic, "QSGD: communication-efficient
    SGD via gradient quantization and encoding", NeurIPS 2017;
    A. Koloskova, S. U. Stich, M. Jaggi, ICML 2019 (``qsgd_s``, biased variant).
  """
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 15:
    raise ValueError(f"qsgd: bits must be an integer in [1, 15]; got bits={bits!r}.")
  if not isinstance(unbiased, bool):
    raise TypeError(f"qsgd: unbiased must be True or False; got {unbiased!r}.")
  bits = int(bits)
  s = (1 << bits) - 1

  def encode(x, key):
    x = _floating(x, "qsgd").reshape(-1).astype(jnp.float32)
    d = x.size
    norm = jnp.sqrt(jnp.sum(x * x))
    inv = jnp.where(norm > 0, jnp.float32(s) / jnp.where(norm > 0, norm, 1), jnp.float32(0))
    r = jnp.abs(x) * inv
    low = jnp.floor(r)
    u = jax.random.uniform(key, (d,), jnp.float32)
    level = jnp.minimum(low + (u < r - low).astype(jnp.float32), jnp.float32(s))
    code = level.astype(jnp.uint32) | ((x < 0).astype(jnp.uint32) << bits)
    return {"norm": norm, "codes": pack_bits(code, bits + 1)}

  def decode(payload, like, key):
    shape, dtype = _like(like)
    d = int(np.prod(shape))
    code = unpack_bits(payload["codes"], bits + 1, d)
    level = (code & jnp.uint32(s)).astype(jnp.float32)
    sign = jnp.float32(1) - jnp.float32(2) * (code >> bits).astype(jnp.float32)
    c = 1.0 if unbiased else 1.0 / (1.0 + min(d / s**2, np.sqrt(d) / s))
    scale = payload["norm"] * jnp.float32(c / s)
    return (scale * level * sign).astype(dtype).reshape(shape)

  name = f"qsgd(bits={bits})" if unbiased else f"qsgd(bits={bits}, unbiased=False)"
  return Compressor(name=name, encode=encode, decode=decode)


def scaled_sign() -> Compressor:
  r"""The sign of every coordinate, scaled by the mean magnitude (per leaf).

  .. math::

     Q(x) = \frac{\|x\|_1}{d}\, \operatorname{sgn}(x), \qquad
     \operatorname{sgn}(t) = \begin{cases} +1 & t \ge 0 \\ -1 & t < 0 , \end{cases}

  d the leaf's size (``sgn(0) = +1``, also for ``−0.0``). Deterministic, biased.

  Payload: ``{"scale": float32 (), "signs": uint8}``: one bit per coordinate,
  set for ``x_j < 0``, packed by :func:`pack_bits`: ``4 + ⌈d/8⌉`` bytes.

  Returns:
    A :class:`Compressor`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from coopjax import compress
    >>> q = compress.scaled_sign()
    >>> x = jnp.array([1.0, -2.0, 0.0, 5.0])  # ‖x‖₁/d = 2
    >>> key = jax.random.key(0)
    >>> q.decode(q.encode(x, key), x, key).tolist()
    [2.0, -2.0, 2.0, 2.0]
    >>> compress.payload_bytes(q, jnp.zeros(1000))
    129

  References:
    J. Bernstein, Y.-X. Wang, K. Azizzadenesheli, A. Anandkumar, "signSGD", ICML 2018;
    S. P. Karimireddy, Q. Rebjock, S. U. Stich, M. Jaggi, "Error feedback fixes SignSGD and
    other gradient compression schemes", ICML 2019.
  """

  def encode(x, key):
    x = _floating(x, "scaled_sign").reshape(-1).astype(jnp.float32)
    scale = jnp.sum(jnp.abs(x)) / jnp.float32(max(x.size, 1))
    return {"scale": scale, "signs": pack_bits(x < 0, 1)}

  def decode(payload, like, key):
    shape, dtype = _like(like)
    negative = unpack_bits(payload["signs"], 1, int(np.prod(shape))).astype(jnp.float32)
    return (
      (payload["scale"] * (jnp.float32(1) - jnp.float32(2) * negative)).astype(dtype).reshape(shape)
    )

  return Compressor(name="scaled_sign", encode=encode, decode=decode)


def _rows(x: jax.Array) -> jax.Array:
  """A leaf as rows over its last axis (a 0-d leaf is one row of length 1), in float32."""
  if not x.ndim:
    return x.astype(jnp.float32).reshape(1, 1)
  return x.astype(jnp.float32).reshape(int(np.prod(x.shape[:-1])), x.shape[-1])


def _absmax_quantize(x: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
  """Per-row ``σ = max|x|·(1/levels)`` and ``q = clip(round_half_even(x·(1/σ)), ±levels)``."""
  rows = _rows(x)
  scale = jnp.max(jnp.abs(rows), axis=1, initial=0.0) * jnp.float32(1 / levels)
  inv = jnp.where(scale > 0, 1 / jnp.where(scale > 0, scale, jnp.float32(1)), jnp.float32(0))
  q = jnp.clip(jnp.round(rows * inv[:, None]), -levels, levels)
  return scale, jnp.where(rows == 0, jnp.float32(0), q).astype(jnp.int32)


def _dequantize(scale: jax.Array, q: jax.Array, like) -> jax.Array:
  shape, dtype = _like(like)
  return (q.astype(jnp.float32) * scale[:, None]).astype(dtype).reshape(shape)


def int8() -> Compressor:
  r"""Symmetric 8-bit quantization with one absmax scale per row of the last axis.

  .. math::

     \sigma_r = \frac{\max_j |x_{rj}|}{127}, \qquad
     q_{rj} = \operatorname{clip}\!\big(\operatorname{round}(x_{rj} / \sigma_r), -127, 127\big),
     \qquad Q(x)_{rj} = \sigma_r\, q_{rj},

  rows r over all leading axes (a 0-d leaf is one row of length 1), round half
  to even; a zero row has ``σ_r = 0`` and ``q = 0``. In float32 as
  ``σ_r = max|x_r|·fl(1/127)`` and ``x/σ_r = x·fl(1/σ_r)``: the products XLA
  compiles a division by a per-row scalar into, written out so that every
  backend and a NumPy re-derivation agree bit for bit.
  Deterministic, biased, ``|Q(x) − x| ≤ σ_r/2``.

  Payload: ``{"scales": float32 (rows,), "q": uint8 (rows, n)}``, the int8 codes
  bitcast to uint8 (``lax.bitcast_convert_type``) so that collectives carry
  u8: ``4·rows + rows·n`` bytes.

  Returns:
    A :class:`Compressor`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from coopjax import compress
    >>> q = compress.int8()
    >>> x = jnp.array([[127.0, -63.5, 0.5], [0.0, 0.0, 0.0]])  # σ = 1 and 0
    >>> key = jax.random.key(0)
    >>> payload = q.encode(x, key)
    >>> payload["scales"].tolist(), jax.lax.bitcast_convert_type(payload["q"], jnp.int8).tolist()
    ([1.0, 0.0], [[127, -64, 0], [0, 0, 0]])
    >>> q.decode(payload, x, key).tolist()
    [[127.0, -64.0, 0.0], [0.0, 0.0, 0.0]]
    >>> compress.payload_bytes(q, jnp.zeros((10, 100)))  # 10·4 + 1000
    1040

  References:
    T. Dettmers, M. Lewis, Y. Belkada, L. Zettlemoyer, "LLM.int8()", NeurIPS 2022 (absmax
    quantization).
  """

  def encode(x, key):
    scale, q = _absmax_quantize(_floating(x, "int8"), 127)
    return {"scales": scale, "q": lax.bitcast_convert_type(q.astype(jnp.int8), jnp.uint8)}

  def decode(payload, like, key):
    return _dequantize(payload["scales"], lax.bitcast_convert_type(payload["q"], jnp.int8), like)

  return Compressor(name="int8", encode=encode, decode=decode)


def int4() -> Compressor:
  r"""Symmetric 4-bit quantization with one absmax scale per row, two values per byte.

  .. math::

     \sigma_r = \frac{\max_j |x_{rj}|}{7}, \qquad
     q_{rj} = \operatorname{clip}\!\big(\operatorname{round}(x_{rj} / \sigma_r), -7, 7\big),
     \qquad Q(x)_{rj} = \sigma_r\, q_{rj},

  as :func:`int8` with 7 in place of 127. The codes are 4-bit two's complement
  nibbles of the flattened leaf (all rows back to back), packed by
  :func:`pack_bits`: value ``2i`` in the low nibble of byte ``i``, value
  ``2i + 1`` in its high nibble.

  Payload: ``{"scales": float32 (rows,), "q": uint8 (⌈rows·n/2⌉,)}``:
  ``4·rows + ⌈rows·n/2⌉`` bytes.

  Returns:
    A :class:`Compressor`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from coopjax import compress
    >>> q = compress.int4()
    >>> x = jnp.array([7.0, -3.5, 2.5, -1.0, 0.0])  # σ = 1; round half to even
    >>> key = jax.random.key(0)
    >>> q.decode(q.encode(x, key), x, key).tolist()
    [7.0, -4.0, 2.0, -1.0, 0.0]
    >>> compress.payload_bytes(q, jnp.zeros((10, 100)))  # 10·4 + 1000/2
    540
  """

  def encode(x, key):
    scale, q = _absmax_quantize(_floating(x, "int4"), 7)
    return {"scales": scale, "q": pack_bits(q & 0xF, 4)}

  def decode(payload, like, key):
    n = int(np.prod(np.shape(like)))
    nibble = unpack_bits(payload["q"], 4, n).astype(jnp.int32)
    q = (nibble ^ 8) - 8  # sign-extend the two's complement nibble
    rows = payload["scales"].shape[0]
    return _dequantize(payload["scales"], q.reshape(rows, n // max(rows, 1)), like)

  return Compressor(name="int4", encode=encode, decode=decode)


def message_key(key: jax.Array, step, sender) -> jax.Array:
  """The key of the message that worker ``sender`` sends at step ``step``.

  ``fold_in(fold_in(key, step), sender)``: any receiver regenerates it from the
  step and the sender's global index.

  Examples:
    >>> import jax
    >>> from coopjax import compress
    >>> a = compress.message_key(jax.random.key(0), step=5, sender=2)
    >>> b = compress.message_key(jax.random.key(0), step=5, sender=2)
    >>> bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
    True
  """
  return jax.random.fold_in(jax.random.fold_in(key, step), sender)


def leaf_keys(key: jax.Array, tree: PyTree) -> PyTree:
  """One key per leaf of ``tree``: ``fold_in(key, leaf_index)`` in ``jax.tree.leaves`` order."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [jax.random.fold_in(key, i) for i in range(len(leaves))])


def encode_tree(compressor: Compressor, tree: PyTree, key: jax.Array) -> PyTree:
  """Encodes every leaf of one worker's message (leaf keys from :func:`leaf_keys`).

  Returns a list with one payload per leaf, in ``jax.tree.leaves`` order.
  """
  leaves = jax.tree.leaves(tree)
  keys = jax.tree.leaves(leaf_keys(key, tree))
  return [compressor.encode(x, k) for x, k in zip(leaves, keys, strict=True)]


def decode_tree(compressor: Compressor, payloads: list, like: PyTree, key: jax.Array) -> PyTree:
  """Inverse of :func:`encode_tree`: the decoded message, with the structure of ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.tree.leaves(leaf_keys(key, like))
  return jax.tree.unflatten(
    treedef,
    [compressor.decode(p, x, k) for p, x, k in zip(payloads, leaves, keys, strict=True)],
  )


def payload_bytes(compressor: Compressor, like: PyTree) -> int:
  """Bytes one worker sends for a message shaped like ``like`` (all leaves), from the payload's
  static shapes and dtypes (nothing is computed).

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import compress
    >>> compress.payload_bytes(compress.identity(), {"w": jnp.zeros((10, 10))})
    400
  """
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
  shapes = jax.eval_shape(
    lambda t: encode_tree(compressor, t, jax.random.key(0)),
    like,
  )
  return int(
    sum(np.prod(s.shape, dtype=np.int64) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
  )


# --- choosing the consensus step size --------------------------------------------------------------


class GammaTuning(NamedTuple):
  """The result of :func:`tune_gamma`.

  Attributes:
    gamma: the chosen consensus step size.
    grid: the step sizes tried, ascending.
    errors: the relative consensus error after the last round for each step size
      (``inf`` where the simulation diverged).
  """

  gamma: float
  grid: np.ndarray
  errors: np.ndarray


def tune_gamma(
  W,
  compressor: Compressor,
  *,
  grid=None,
  rounds: int = 500,
  dim: int = 1000,
  seed: int = 0,
  order: str = "paper",
  floor: float = 1e-10,
) -> GammaTuning:
  r"""Picks CHOCO's consensus step size γ for a mixing matrix and a compressor by simulation.

  Runs CHOCO-Gossip (consensus only, no gradients) from ``x_i ~ N(0, I_dim)``,
  ``x̂_i = 0``, for every γ of a logarithmic grid:

  .. math::

     q_i = Q(x_i - \hat x_i), \quad \hat x_i \mathrel{+}= q_i, \quad
     x_i \mathrel{+}= \gamma \sum_j W_{ji} (\hat x_j - \hat x_i)

  (``order="paper"``, as in CHOCO-SGD; ``"overlap"`` moves x first with the
  old copies, then compresses, as CHOCO-Gossip's Algorithm 1), ``rounds``
  times, with message keys ``message_key(key, round, i)`` as in a mix. The
  error is the relative consensus distance
  ``Σ_i ‖x_i − x̄‖² / Σ_i ‖x_i⁰ − x̄⁰‖²``; the chosen γ is the largest one whose
  error is within float32 resolution (``floor``) of the smallest. The same
  random draws serve every γ.

  This is a tuning aid: Koloskova et al. tune γ on a logarithmic grid by the
  consensus error after many rounds. The best γ for training also depends on
  the learning rate and how fast the models move; use the result as a starting
  point (or the upper end of a training sweep). A compressor with a size-based
  ``k`` sees leaves of size ``dim``; give ``dim`` the size of a typical leaf.

  Args:
    W: the ``m × m`` mixing matrix, doubly stochastic (the worker mean is kept; checked by
      :func:`coopjax.topology.validate`, directed graphs allowed).
    compressor: the message compressor.
    grid: the γ to try, in ``(0, 1]``; default 13 points from 1e-3 to 1, four per decade.
    rounds: gossip rounds simulated.
    dim: the length of each worker's vector.
    seed: seeds the initial x and the message keys.
    order: ``"paper"`` (compress, then move) or ``"overlap"`` (move, then compress).
    floor: relative errors below this count as converged (equal).

  Returns:
    A :class:`GammaTuning` ``(gamma, grid, errors)``.

  Examples:
    >>> from coopjax import compress, topology
    >>> W = topology.ring(8)
    >>> compress.tune_gamma(W, compress.identity(), rounds=200, dim=100).gamma
    1.0
    >>> tuned = compress.tune_gamma(W, compress.top_k(fraction=0.01), rounds=500, dim=1000)
    >>> tuned.gamma < 0.5
    True

  References:
    A. Koloskova, S. U. Stich, M. Jaggi, "Decentralized stochastic optimization and gossip
    algorithms with compressed communication", ICML 2019, Algorithm 1 and §6.
  """
  # Doubly stochastic (directed allowed): otherwise the gossip does not keep the worker mean,
  # the consensus error measures nothing, and choco refuses the same W.
  W = topology.validate(W, symmetric=False)
  check_compressor(compressor)
  if order not in ("paper", "overlap"):
    raise ValueError(f'order must be "paper" or "overlap"; got {order!r}.')
  for name, value in (("rounds", rounds), ("dim", dim)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer; got {value!r}.")
  grid = np.logspace(-3, 0, 13) if grid is None else np.sort(np.asarray(grid, np.float64))
  if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
    raise ValueError(f"grid must be a non-empty list of positive step sizes; got {grid!r}.")
  if np.any(grid > 1):
    raise ValueError(
      f"grid must lie in (0, 1], the consensus step sizes coopjax.choco accepts; got {grid!r}."
    )
  floor = float(floor)
  if not (np.isfinite(floor) and floor >= 0):
    raise ValueError(f"floor must be a finite relative error ≥ 0; got {floor!r}.")
  m = W.shape[0]
  Wt = jnp.asarray(W.T, jnp.float32)
  colsum = jnp.asarray(W.sum(axis=0), jnp.float32)[:, None]
  key = jax.random.key(seed)
  x0 = jax.random.normal(jax.random.fold_in(key, 0), (m, int(dim)), jnp.float32)
  base = jax.random.fold_in(key, 1)

  def compress_rows(delta, t):
    def one(row, sender):
      k = message_key(base, t, sender)
      return decode_tree(compressor, encode_tree(compressor, row, k), row, k)

    return jax.vmap(one)(delta, jnp.arange(m))

  def run(gamma):
    def move(x, x_hat):
      return x + gamma * (jnp.matmul(Wt, x_hat, precision=lax.Precision.HIGHEST) - colsum * x_hat)

    def body(carry, t):
      x, x_hat = carry
      if order == "overlap":
        x = move(x, x_hat)
        x_hat = x_hat + compress_rows(x - x_hat, t)
      else:
        x_hat = x_hat + compress_rows(x - x_hat, t)
        x = move(x, x_hat)
      return (x, x_hat), None

    (x, _), _ = lax.scan(body, (x0, jnp.zeros_like(x0)), jnp.arange(rounds))
    return jnp.sum((x - jnp.mean(x, axis=0, keepdims=True)) ** 2)

  start = float(jnp.sum((x0 - jnp.mean(x0, axis=0, keepdims=True)) ** 2))
  final = np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(grid, jnp.float32)), np.float64)
  errors = np.where(np.isfinite(final), final / max(start, np.finfo(np.float64).tiny), np.inf)
  if not np.any(np.isfinite(errors)):
    raise ValueError(f"the gossip diverged for every γ in {grid.tolist()}; try smaller step sizes.")
  score = np.maximum(errors, floor)
  best = np.flatnonzero(score <= score.min())[-1]
  return GammaTuning(gamma=float(grid[best]), grid=grid, errors=errors)
