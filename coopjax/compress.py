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

PyTree = Any

__all__ = [
  "Compressor",
  "identity",
  "message_key",
  "leaf_keys",
  "encode_tree",
  "decode_tree",
  "payload_bytes",
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
