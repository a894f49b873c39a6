r"""Compressed messages for the all-reduce family: error-feedback averaging.

Local SGD, DiLoCo and SlowMo all close a period with the mean of the
workers' displacements from a common reference model. With a compressor
(:mod:`coopjax.compress`) each worker sends a compressed message instead and
keeps what the compression dropped in an error buffer ``e_i``, which it adds
to its next message (error feedback). At a mix, with ``x_i`` the workers'
models after the local step:

.. math::

   \Delta_i = x_{\text{ref}} - x_i, \qquad
   v_i = \beta e_i + \Delta_i, \qquad
   c_i = Q(v_i), \qquad
   e_i \leftarrow v_i - c_i, \\
   x_{\text{ref}} \leftarrow x_{\text{ref}} - \eta\, \tfrac1m \textstyle\sum_i c_i
   \ (\text{or the outer optimizer on } \tfrac1m \textstyle\sum_i c_i), \qquad
   x_i \leftarrow x_{\text{ref}},

with ``e = 0`` initially and the inner optimizer's state kept. β = 1
(``error_decay``) and η = 1 is Qsparse-local-SGD (Basu et al., 2019); β < 1
is SparseLoCo's decayed memory. ``Q`` acts on one worker's message, leaf by
leaf, with the key :func:`coopjax.compress.message_key` of the step and the
sender.

The one communication is the mean of the ``c_i``: every worker sends its
payload and every worker decodes and sums them
(:meth:`coopjax.mixing.Mix.exchange` of the full average, whose sharded
lowering gathers payloads; never a low-precision all-reduce).

What error feedback preserves. For the outer step
``x_ref ← x_ref − η·mean(c)`` (local SGD: η = 1; DiLoCo with
``optax.sgd(η)``), ``mean(e') = β·mean(e) + mean(Δ) − mean(c)`` gives, for
every compressor, exactly

.. math::

   x_{\text{ref}}' - \eta\,\overline{e}' = x_{\text{ref}} - \eta\beta\,\overline{e}
     - \eta\,\overline{\Delta},

so with β = 1 the virtual model ``y = x_ref − η·mean(e)`` moves as the
uncompressed reference does, ``y' = y − η·mean_i(x_ref − x_i)``: what the
compressor withholds is delayed, never lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import coopjax.algorithms._skeleton as _skeleton
from coopjax import compress
from coopjax import mixing
from coopjax._validation import check_real
from coopjax.cost import pattern
from coopjax.workers import Layout

PyTree = Any

__all__ = [
  "ErrorFeedbackState",
  "check_compressor",
  "check_error_decay",
  "default_key",
  "error_feedback_mean",
  "gathered_cost",
  "payload_fraction",
  "compressed_comm",
  "error_feedback_averaging",
  "check_uncompressed_options",
]


class ErrorFeedbackState(NamedTuple):
  """State of local SGD, DiLoCo and SlowMo with a compressor (error-feedback averaging).

  Attributes:
    count: local steps taken so far, int32.
    local_state: the inner optimizer's state, stacked over the m workers.
    x_ref: the reference model (the last sync point; X's worker mean at
      first), replicated, no worker axis.
    outer_state: the outer optimizer's state (DiLoCo), the slow momentum
      (SlowMo), or ``optax.EmptyState()`` (local SGD).
    error: the error buffers ``e_i``, one row per worker (zeros at first).
  """

  count: chex.Array
  local_state: optax.OptState
  x_ref: PyTree
  outer_state: Any
  error: PyTree


def check_compressor(compressor, name: str = "compressor") -> compress.Compressor:
  """``compressor`` must be a :class:`coopjax.compress.Compressor` (encode, decode)."""
  if not (hasattr(compressor, "encode") and hasattr(compressor, "decode")):
    raise TypeError(
      f"{name} must be a coopjax.compress.Compressor (e.g. coopjax.compress.identity()), got "
      f"{type(compressor).__name__}."
    )
  return compressor


def check_error_decay(error_decay) -> float:
  """β, the decay of the error memory, must be in [0, 1]."""
  beta = check_real("error_decay", error_decay)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(
      f"error_decay must be in [0, 1] (1: full error feedback, Qsparse-local-SGD; < 1: a "
      f"decayed memory; 0: no memory), got {beta}."
    )
  return beta


def default_key(key) -> jax.Array:
  """``key``, or ``jax.random.key(0)`` when None (the compressors' random draws)."""
  return jax.random.key(0) if key is None else key


def error_feedback_mean(
  average: mixing.Mix,
  compressor: compress.Compressor,
  key: jax.Array,
  beta: float,
  k,
  X: PyTree,
  x_ref: PyTree,
  error: PyTree,
) -> tuple[PyTree, PyTree]:
  r"""One error-feedback round: returns ``(mean_i c_i, e')`` (one model, m rows).

  ``Δ_i = x_ref − x_i``, ``v_i = β e_i + Δ_i``, ``c_i = Q(v_i)`` sent through
  ``average.exchange`` (key ``message_key(key, k, i)``), ``e_i' = v_i − c_i``.
  The mean comes back on every row; its first row (every device's, when
  sharded) is the one model returned.
  """
  v = jax.tree.map(
    lambda x, r, e: (beta * e + (jnp.expand_dims(r, 0) - x)).astype(x.dtype), X, x_ref, error
  )
  own, mixed = average.exchange(v, compressor, key, k)
  error = jax.tree.map(lambda v, c: v - c.astype(v.dtype), v, own)
  return jax.tree.map(lambda c: c[0], mixed), error


def gathered_cost(num_workers: int) -> pattern.MixCost:
  """The mean of compressed messages: every worker's payload to every other (a ring all-gather).

  ``m − 1`` payloads sent per worker in ``m − 1`` rounds (the payload's share
  of the model in ``fraction``, see :func:`compressed_comm`).

  Examples:
    >>> from coopjax.algorithms import _compressed
    >>> _compressed.gathered_cost(8)
    MixCost(collective='all_gather', volume=7.0, rounds=7, overlappable=False, fraction=1.0)
  """
  m = int(num_workers)
  if m <= 1:
    return pattern.NO_COMM
  return pattern.MixCost("all_gather", float(m - 1), m - 1, False)


def payload_fraction(compressor: compress.Compressor, model: PyTree, mask=None) -> float:
  """Payload bytes of one worker's message over the bytes of its whole model.

  Only the leaves ``mask`` selects are sent (all when None).

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import compress
    >>> from coopjax.algorithms import _compressed
    >>> _compressed.payload_fraction(compress.identity(), {"w": jnp.zeros(8), "b": jnp.zeros(8)},
    ...                              mask={"w": True, "b": False})
    0.5
  """
  leaves = jax.tree.leaves(model)
  dense = sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in leaves)
  flags = mixing.leaf_flags(mask, model)
  sent = [x for x, keep in zip(leaves, flags, strict=True) if keep]
  if not sent or dense == 0:
    return 0.0
  return compress.payload_bytes(compressor, sent) / dense


def _find(opt_state, state_cls):
  is_state = lambda x: isinstance(x, state_cls)
  for s in jax.tree.leaves(opt_state, is_leaf=is_state):
    if is_state(s):
      return s
  return None


def compressed_comm(
  base: Callable[[int, Any], pattern.MixCost],
  compressor: compress.Compressor,
  state_cls: type,
  rows_of: Callable[[Any], PyTree],
  mask=None,
):
  """``comm(k, opt_state)`` pricing each mix of ``base`` by the compressor's payload.

  The payload's share of the model (``MixCost.fraction``) comes from the
  static shapes of one worker's row of ``rows_of(state)`` (the state of type
  ``state_cls`` found inside ``opt_state``, also through ``optax.chain``),
  or from the model last seen by ``init`` when no state is given. Returns
  ``(comm, record)``: ``record(rows)`` stores the shapes of one row of the
  stacked ``rows`` (called by ``init``).
  """
  seen = {}

  def fraction_of(model) -> float:
    shapes = tuple((np.shape(x), jnp.dtype(x.dtype).name) for x in jax.tree.leaves(model))
    if shapes not in seen:
      seen[shapes] = payload_fraction(compressor, model, mask)
    seen["last"] = seen[shapes]
    return seen[shapes]

  def record(rows):
    fraction_of(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), rows))

  def comm(k: int, opt_state=None) -> pattern.MixCost:
    cost = base(k, opt_state)
    if cost.collective == "none":
      return cost
    state = _find(opt_state, state_cls) if opt_state is not None else None
    if state is not None:
      rows = rows_of(state)
      fraction = fraction_of(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), rows)
      )
    elif "last" in seen:
      fraction = seen["last"]
    else:
      raise ValueError(
        "the cost of a compressed mix depends on the model's shapes: call tx.init(X) first or "
        "pass the optimizer state, tx.comm(k, opt_state)."
      )
    return cost._replace(fraction=fraction)

  return comm, record


def error_feedback_averaging(
  name: str,
  local: optax.GradientTransformation,
  tau: int,
  num_workers: int,
  compressor: compress.Compressor,
  error_decay: float,
  key: jax.Array | None,
  init_outer: Callable[[PyTree], Any],
  outer_step: Callable[[Any, PyTree, PyTree, Any], tuple[PyTree, Any]],
  *,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
):
  r"""Inner steps; at ``k mod τ = 0`` one error-feedback round, the outer step, a restart.

  ``outer_step(k, mean_c, x_ref, outer) -> (x_ref, outer)`` receives the mean
  of the compressed messages as its pseudo-gradient (local SGD:
  ``x_ref − mean_c``). State :class:`ErrorFeedbackState`; the inner state
  follows ``local_state_policy`` (``"mix"`` averages it uncompressed).
  """
  m = int(num_workers)
  compressor = check_compressor(compressor)
  beta = check_error_decay(error_decay)
  key = default_key(key)
  mix_mask = mixing.check_mask(mix_mask)
  average = mixing.Mix.average(m, mask=mix_mask)
  cost = gathered_cost(m)
  comm, record = compressed_comm(
    lambda k, _state=None: cost if k % tau == 0 else pattern.NO_COMM,
    compressor,
    ErrorFeedbackState,
    lambda st: st.error,
    mix_mask,
  )
  described = {}

  def init_extra(params):
    record(params)
    if "tx" in described:
      described["tx"].mix_cost = comm(tau)
    x_ref = mixing.worker_mean(params)  # x_0 when X is replicated
    return x_ref, init_outer(x_ref), jax.tree.map(jnp.zeros_like, params)

  def on_mix(k, X, extra, _inputs):
    x_ref, outer, error = extra
    mean_c, new_error = error_feedback_mean(average, compressor, key, beta, k, X, x_ref, error)
    # Leaves outside mix_mask are not sent: no pseudo-gradient, their errors stay.
    mean_c = mixing._select(mix_mask, mean_c, jax.tree.map(jnp.zeros_like, mean_c))
    error = mixing._select(mix_mask, new_error, error)
    x_ref, outer = outer_step(k, mean_c, x_ref, outer)
    X = jax.tree.map(lambda r, x: 0 * x + jnp.expand_dims(r, 0).astype(x.dtype), x_ref, X)
    return X, (x_ref, outer, error)

  tx = _skeleton.transformation(
    name,
    local,
    Layout(m, 0),
    state_cls=ErrorFeedbackState,
    should_mix=lambda k, extra: k % tau == 0,
    on_mix=on_mix,
    init_extra=init_extra,
    state_mix=lambda k: mixing.Mix.average(m),
    comm=comm,
    mix_cost=cost,
    period=tau,
    orders=("step_then_mix",),
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
  )
  described["tx"] = tx
  return tx.describe(compressor=compressor, error_decay=beta)


def check_uncompressed_options(compressor, error_decay, key) -> None:
  """``error_decay`` and ``key`` apply only with a ``compressor``."""
  if compressor is None and (error_decay != 1.0 or key is not None):
    raise ValueError(
      "error_decay and key apply to compressed averaging only; pass compressor= (e.g. "
      "coopjax.compress.top_k(fraction=0.01)) or drop them."
    )
