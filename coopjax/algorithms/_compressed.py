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

  >>> import jax.numpy as jnp, optax, coopjax
  >>> from coopjax import compress
  >>> tx = coopjax.local_sgd(optax.sgd(1.0), tau=1, num_workers=2,
  ...                        compressor=compress.top_k(k=1))
  >>> X = {"w": jnp.zeros((2, 2))}
  >>> _, state = tx.update({"w": jnp.array([[1.0, 2.0], [0.0, 4.0]])}, tx.init(X), X)
  >>> state.x_ref["w"].tolist()  # Δ = [[1, 2], [0, 4]] sends [[0, 2], [0, 4]]
  [0.0, -3.0]
  >>> (state.x_ref["w"] - state.error["w"].mean(0)).tolist()  # = mean(x½), as uncompressed
  [-0.5, -3.0]

Which compressors. The error stays bounded for a contraction,
``E‖Q(v) − v‖² ≤ (1 − δ)‖v‖²`` with δ > 0: top-k, random-k without
scaling, scaled sign, int8/int4, ``qsgd(bits, unbiased=False)``. The
unbiased QSGD has ``E‖Q(v) − v‖² = ω‖v‖²`` with ``ω = min(d/s², √d/s)``,
above 1 for large leaves at few bits (ω ≈ 4.3 for a 64×64 layer at 4 bits):
the error memory then grows, and training diverges.
"""

from __future__ import annotations

import functools
import inspect
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
  "check_error_decay",
  "default_key",
  "error_feedback_mean",
  "compressed_comm",
  "error_feedback_averaging",
  "check_uncompressed_options",
  "COMPRESSION_OPTIONS",
  "no_compression_error",
  "uncompressed",
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


def _find(opt_state, state_cls):
  is_state = lambda x: isinstance(x, state_cls)
  for s in jax.tree.leaves(opt_state, is_leaf=is_state):
    if is_state(s):
      return s
  return None


def compressed_comm(
  tau: int,
  mix: mixing.Mix,
  compressor: compress.Compressor,
  state_cls: type,
  rows_of: Callable[[Any], PyTree],
  masked_mixes: int = 1,
):
  """``comm(k, opt_state)``: ``mix``'s compressed cost at steps τ, 2τ, …, nothing otherwise.

  The cost is :meth:`coopjax.mixing.Mix.compressed_cost` on one worker's
  message, whose shapes come from one row of ``rows_of(state)`` (the state
  of type ``state_cls`` found inside ``opt_state``, also through
  ``optax.chain``), or from the model last seen by ``init`` when no state is
  given. Returns ``(comm, record, masked_comm)``: ``record(rows)`` stores the
  shapes of one row of the stacked ``rows`` (called by ``init``) and returns
  the cost; ``masked_comm(k, opt_state)`` is the cost of a mixing step while a
  live mask leaves a worker out: the exchange then moves decoded rows through
  the uncompressed mix (:meth:`coopjax.mixing.Mix.exchange`), ``masked_mixes``
  uncompressed applications of ``mix`` in all (:attr:`coopjax.mixing.Mix.cost`).
  """
  seen = {}

  def cost_of(rows) -> pattern.MixCost:
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), rows)
    shapes = tuple((x.shape, jnp.dtype(x.dtype).name) for x in jax.tree.leaves(like))
    if shapes not in seen:
      seen[shapes] = mix.compressed_cost(compressor, like)
    seen["last"] = seen[shapes]
    return seen[shapes]

  def comm(k: int, opt_state=None) -> pattern.MixCost:
    if k % tau:
      return pattern.NO_COMM
    state = _find(opt_state, state_cls) if opt_state is not None else None
    if state is not None:
      return cost_of(rows_of(state))
    if "last" in seen:
      return seen["last"]
    raise ValueError(
      "the cost of a compressed mix depends on the model's shapes: call tx.init(X) first or "
      "pass the optimizer state, tx.comm(k, opt_state)."
    )

  def masked_comm(k: int, opt_state=None) -> pattern.MixCost:
    del opt_state  # dense messages: the cost does not depend on the model's shapes
    return pattern.NO_COMM if k % tau else pattern.combine(*[mix.cost] * masked_mixes)

  return comm, cost_of, masked_comm


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
  compressor = compress.check_compressor(compressor)
  beta = check_error_decay(error_decay)
  key = default_key(key)
  mix_mask = mixing.check_mask(mix_mask)
  average = mixing.Mix.average(m, mask=mix_mask)
  comm, record, masked_comm = compressed_comm(
    tau, average, compressor, ErrorFeedbackState, lambda s: s.error
  )
  described = {}

  def init_extra(params):
    cost = record(params)
    if "tx" in described:
      described["tx"].mix_cost = cost
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
    mix_cost=pattern.compressed_cost(average.matrix, m, 1.0),  # priced by the model at init
    period=tau,
    orders=("step_then_mix",),
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
  )
  described["tx"] = tx
  return tx.describe(compressor=compressor, error_decay=beta, masked_comm=masked_comm)


def check_uncompressed_options(compressor, error_decay, key) -> None:
  """``error_decay`` and ``key`` apply only with a ``compressor``."""
  if compressor is None and (error_decay != 1.0 or key is not None):
    raise ValueError(
      "error_decay and key apply to compressed averaging only; pass compressor= (e.g. "
      "coopjax.compress.top_k(fraction=0.01)) or drop them."
    )


COMPRESSION_OPTIONS = ("compressor", "error_decay", "key")


def no_compression_error(name: str, given) -> TypeError:
  """The error of a factory without compressed communication given ``compressor=`` and the like."""
  return TypeError(
    f"{name} takes no {', '.join(given)}: its mix is uncompressed. Compressed communication "
    "is coopjax.choco(local, tau=, W=, compressor=, gamma=) (gossip on a graph W) or "
    "compressor= on coopjax.local_sgd, coopjax.diloco or coopjax.slowmo (error-feedback "
    "averaging); see docs/compression.md."
  )


def uncompressed(factory: Callable) -> Callable:
  """Marks an algorithm factory whose mix is uncompressed: ``compressor=`` (and ``error_decay=``,
  ``key=`` where the factory has no such parameter) is refused by :func:`no_compression_error`,
  which names the algorithms that compress, instead of Python's "unexpected keyword argument"."""
  refused = [o for o in COMPRESSION_OPTIONS if o not in inspect.signature(factory).parameters]

  @functools.wraps(factory)
  def wrapped(*args, **kwargs):
    given = [option for option in refused if option in kwargs]
    if given:
      raise no_compression_error(factory.__name__, given)
    return factory(*args, **kwargs)

  return wrapped
