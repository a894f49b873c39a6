r"""CHOCO-SGD: decentralized SGD with compressed gossip on any fixed W.

Koloskova, Stich & Jaggi (ICML 2019; Koloskova, Lin, Stich & Jaggi, ICLR
2020) on the schedule of A(τ, W): each worker i keeps a public copy
``x̂_i`` of its model, known to its neighbours, and ``s_i = Σ_j W_ji x̂_j``
(its own weight included); only compressed changes of the public copies
travel. Mixing happens after the local steps τ, 2τ, …; at a mix, with
``x½`` the models after the local step:

.. math::

   \text{paper order:}\quad
   q_i = Q(x^{1/2}_i - \hat x_i), \quad
   \hat x_i \mathrel{+}= q_i, \quad
   s_i \mathrel{+}= \textstyle\sum_j W_{ji}\, q_j, \quad
   x_i = x^{1/2}_i + \gamma\,(s_i - \hat x_i);

   \text{overlap order:}\quad
   x_i = x^{1/2}_i + \gamma\,(s_i - \hat x_i), \quad
   q_i = Q(x_i - \hat x_i), \quad
   \hat x_i \mathrel{+}= q_i, \quad
   s_i \mathrel{+}= \textstyle\sum_j W_{ji}\, q_j .

The overlap order (the authors' ``epfml`` code) consensus-steps with the old
copies, so its exchange can run during the next period's local steps. The
exchange of the ``q_j`` is :meth:`coopjax.mixing.Mix.exchange`: sharded,
only payloads travel, through W's collective-permute plan.

Invariants, for a doubly stochastic W: ``Σ_i s_i = Σ_i x̂_i`` at all times,
so every mix preserves the workers' mean. With Q the identity, ``x̂ = x½``
after each exchange and ``s = W·x̂``: the paper order at γ = 1 is
:func:`coopjax.cooperative` (step then mix), the overlap order at γ = 1 is
:func:`coopjax.delayed` (up to its first mix when the rows of X differ and
``hat_init="zeros"``, see :func:`choco`).
"""

from __future__ import annotations

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
from coopjax import topology
from coopjax._validation import check_real
from coopjax.algorithms._compressed import compressed_comm
from coopjax.algorithms._compressed import default_key
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._skeleton import check_tau
from coopjax.cost import pattern
from coopjax.parallel import context
from coopjax.workers import Layout

PyTree = Any

__all__ = ["ChocoState", "choco", "CHOCO_ORDERS", "HAT_INITS"]

CHOCO_ORDERS = ("paper", "overlap")
HAT_INITS = ("zeros", "x0")


class ChocoState(NamedTuple):
  """State of :func:`choco`.

  Attributes:
    count: local steps taken so far, int32.
    local_state: the local optimizer's state, stacked over the m workers.
    hat: the public copies ``x̂_i`` (m rows, sharded like X).
    s: ``s_i = Σ_j W_ji x̂_j``, kept up to date incrementally (m rows).
  """

  count: chex.Array
  local_state: optax.OptState
  hat: PyTree
  s: PyTree


def _check_fixed_W(W):
  """A schedule of matrices (a function of the mix index, or a sequence of matrices) is refused."""
  sequence = isinstance(W, list | tuple) and len(W) > 0 and np.ndim(W[0]) == 2
  if callable(W) or sequence or np.ndim(W) == 3:
    raise TypeError(
      "choco needs one fixed mixing matrix W: s_i = Σ_j W_ji x̂_j is updated incrementally "
      "(s += W·q), which equals W_k·x̂ only when W never changes; got a schedule of "
      "matrices. Pass a single (m, m) matrix, or use coopjax.time_varying without "
      "compression."
    )


def choco(
  local: optax.GradientTransformation,
  *,
  tau: int,
  W,
  compressor: compress.Compressor,
  gamma: float,
  order: str = "paper",
  hat_init: str = "zeros",
  key: jax.Array | None = None,
  symmetric: bool = True,
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
) -> CooperativeTransformation:
  r"""CHOCO-SGD (Koloskova et al., 2019) with any optax local optimizer, mixing every τ steps.

  At step k (counted from 1) every worker takes its local step
  ``x½_i = x_i + local(g_i)``; when ``k mod τ = 0`` it then gossips (see the
  module docstring for the two orders):

  .. math::

     q_i = Q(x^{1/2}_i - \hat x_i),\quad \hat x_i \mathrel{+}= q_i,\quad
     s_i \mathrel{+}= \textstyle\sum_j W_{ji} q_j,\quad
     x_i = x^{1/2}_i + \gamma (s_i - \hat x_i)
     \qquad (\texttt{order="paper"}).

  ``Q`` is ``compressor`` acting on one worker's message leaf by leaf, with
  the key :func:`coopjax.compress.message_key` ``(key, k, i)``; k is the
  algorithm's step (counted from 1 after ``warmup_steps``).

  The theory needs a contraction, ``E‖Q(x) − x‖² ≤ (1 − δ)‖x‖²`` with
  δ > 0 (top-k, scaled sign, ``qsgd(bits, unbiased=False)``), and γ of
  order δ; the unbiased QSGD at few bits is not one and can diverge.

  Initial copies. ``hat_init="zeros"`` (default): ``x̂ = s = 0``, as the
  authors' deep-learning code and the MATCHA code base; the first messages
  are then compressed whole models. ``"x0"``: ``x̂ = X_0`` and
  ``s = X_0·W``, as their convex code (``init`` computes ``s`` with one
  uncompressed mix of ``X_0``).

  Special cases (exact up to float rounding): Q = identity and γ = 1 is
  :func:`coopjax.cooperative` with step-then-mix in the paper order and
  :func:`coopjax.delayed` in the overlap order (with ``hat_init="x0"``, or
  with any ``hat_init`` when the rows of ``X_0`` are equal: with zero copies
  the first overlap mix adds ``γ(s − x̂) = 0`` where delayed mixes ``X_0``);
  γ = 0 is local steps only (the copies still travel).

  Args:
    local: optax optimizer applied to each worker separately.
    tau: communication period τ.
    W: the fixed m × m mixing matrix (validated like :func:`coopjax.cooperative`'s);
      a schedule of matrices is refused.
    compressor: a :class:`coopjax.compress.Compressor`, e.g.
      ``compress.top_k(fraction=0.1)``.
    gamma: the consensus step size γ ∈ [0, 1].
    order: ``"paper"`` (default) or ``"overlap"``.
    hat_init: ``"zeros"`` (default) or ``"x0"``.
    key: a JAX PRNG key for the compressors' random draws
      (``jax.random.key(0)`` when None).
    symmetric: require W symmetric.
    local_state_policy: the local optimizer's state at a mix, ``"keep"``
      (default) or ``"reset"``.
    mix_mask: optional pytree prefix of X of booleans; leaves marked False
      are neither sent nor mixed (their copies stay as they are).
    warmup_steps: steps of fully synchronous SGD first (post-local SGD); the
      copies are re-initialised from the synchronised models.

  Returns:
    An optax transformation with state :class:`ChocoState`. Its ``comm(k,
    opt_state)`` is :meth:`coopjax.mixing.Mix.compressed_cost`: W's
    neighbour exchange (an all-gather for a dense W) with ``wire_fraction``
    the payload's bytes over the message's.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax import compress, topology
    >>> tx = coopjax.choco(optax.sgd(0.1), tau=1, W=topology.ring(4),
    ...                    compressor=compress.identity(), gamma=1.0)
    >>> X = {"w": jnp.array([0.0, 3.0, 6.0, 9.0])}
    >>> updates, state = tx.update({"w": jnp.zeros(4)}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]  # Q = I, γ = 1: X·W
    [4.0, 3.0, 6.0, 5.0]
    >>> tx.comm(1, state).collective
    'neighbor_exchange'

  References:
    Koloskova, Stich & Jaggi, Decentralized stochastic optimization and gossip
    algorithms with compressed communication, ICML 2019, Algorithm 2;
    Koloskova, Lin, Stich & Jaggi, Decentralized deep learning with arbitrary
    communication compression, ICLR 2020, Algorithm 1.
  """
  tau = check_tau(tau)
  _check_fixed_W(W)
  W = topology.validate(W, symmetric=symmetric)
  m = W.shape[0]
  compressor = compress.check_compressor(compressor)
  gamma = check_real("gamma", gamma)
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"gamma (the consensus step size) must be in [0, 1], got {gamma}.")
  if order not in CHOCO_ORDERS:
    raise ValueError(
      f"order must be one of {CHOCO_ORDERS} for choco, got {order!r}: 'paper' compresses after "
      "the local step, 'overlap' consensus-steps with the old copies first."
    )
  if hat_init not in HAT_INITS:
    raise ValueError(
      f"hat_init must be one of {HAT_INITS}, got {hat_init!r}: 'zeros' starts the public "
      "copies at 0, 'x0' at the initial models."
    )
  key = default_key(key)
  mix_mask = mixing.check_mask(mix_mask)
  mix = mixing.Mix(W, m, mask=mix_mask)
  # A masked mixing step moves the decoded rows through the live W (the exchange) and mixes the
  # copies afresh, W_L·x̂: once after the exchange (paper order), before and after it (overlap).
  comm, record, masked_comm = compressed_comm(
    tau, mix, compressor, ChocoState, lambda state: state.hat, 2 if order == "paper" else 3
  )
  described = {}

  def init_extra(params):
    cost = record(params)
    if "tx" in described:
      described["tx"].mix_cost = cost  # the payload's share known from the model's shapes
    if hat_init == "zeros":
      zeros = jax.tree.map(jnp.zeros_like, params)
      return zeros, zeros
    hat = jax.tree.map(jnp.asarray, params)
    return hat, mix(hat)

  def consensus(X, hat, s):
    return jax.tree.map(lambda x, h, t: x + (gamma * (t - h)).astype(x.dtype), X, hat, s)

  def exchange(k, X, hat, s):
    own, mixed = mix.exchange(jax.tree.map(jnp.subtract, X, hat), compressor, key, k)
    new_hat = jax.tree.map(lambda h, q: h + q.astype(h.dtype), hat, own)
    new_s = jax.tree.map(lambda t, q: t + q.astype(t.dtype), s, mixed)
    # Leaves outside mix_mask are not sent: their copies stay.
    return mixing._select(mix_mask, new_hat, hat), mixing._select(mix_mask, new_s, s)

  def live_sums(hat, s):
    """``s``, or ``W_L·x̂`` afresh while a worker is masked (``s`` holds the full W's sums).

    The running sums are exact for one W only: kept across a change of the
    live weights they would hold the old weights' sums, and the live mean
    would drift by ``γ·Σ_{i∈L}(s_i − x̂_i)/|L|`` at every consensus step. On
    masked steps the copies are mixed uncompressed instead (the compressed
    exchange moves decoded rows there anyway).
    """
    lc = context.current_live()
    if lc is None:
      return s
    return jax.lax.cond(jnp.all(lc.live), lambda h, t: t, lambda h, t: mix(h), hat, s)

  def on_mix(k, X, extra, _inputs):
    hat, s = extra
    if order == "paper":
      hat, s = exchange(k, X, hat, s)
      s = live_sums(hat, s)
      return consensus(X, hat, s), (hat, s)
    s = live_sums(hat, s)
    X = consensus(X, hat, s)
    hat, s = exchange(k, X, hat, s)
    return X, (hat, live_sums(hat, s))

  tx = _skeleton.transformation(
    "choco",
    local,
    Layout(m, 0),
    state_cls=ChocoState,
    should_mix=lambda k, extra: k % tau == 0,
    on_mix=on_mix,
    init_extra=init_extra,
    comm=comm,
    mix_cost=pattern.compressed_cost(W, m, 1.0),  # priced by the model once init sees it
    period=tau,
    overlaps=False,
    orders=("step_then_mix",),
    policies=("keep", "reset"),
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
    graph=W,
  )
  described["tx"] = tx

  def resized(opt_state):
    """``opt_state`` with every CHOCO state's ``s`` re-derived as ``W·x̂`` for this W.

    After a change of workers (:func:`coopjax.elastic.resize`) the kept rows of
    ``s`` sum the old neighbours' copies, and after masked steps (a live mask)
    the live weights' sums: left so, ``Σ_i (s_i − x̂_i) ≠ 0`` and every
    consensus step would move the worker mean by ``γ`` times it.
    """
    is_choco = lambda x: isinstance(x, ChocoState)  # noqa: E731
    return jax.tree.map(
      lambda x: x._replace(s=mix(x.hat)) if is_choco(x) else x, opt_state, is_leaf=is_choco
    )

  return tx.describe(
    gamma=gamma,
    compressor=compressor,
    choco_order=order,
    hat_init=hat_init,
    resized=resized,
    masked_comm=masked_comm,
  )
