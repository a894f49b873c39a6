r"""Cooperative SGD algorithms as optax gradient transformations.

The framework A(τ, W, v) of Wang & Joshi (JMLR 2021, eq. 10): m workers and v
auxiliary variables stacked as ``X = [x_1..x_m, z_1..z_v]`` evolve by

.. math::

   X_{k+1} = (X_k - \eta G_k)\, S_k, \qquad
   S_k = \begin{cases} W & k \bmod \tau = 0 \\ I & \text{otherwise,} \end{cases}

where ``G_k`` holds the workers' stochastic gradients (zero for auxiliaries).
Steps are counted from 1, so the first mix happens after local step τ. The
other order of Remark 1, ``X_{k+1} = X_k S_k − η G_k`` with ``G_k`` taken at
``X_k`` ("mix then step"), is how classic EASGD (Zhang et al., 2015) and D-PSGD
(Lian et al., 2017) are written; pass ``order="mix_then_step"`` for it.

``−ηG`` generalises to any optax optimizer ``local`` applied to each worker
separately (``jax.vmap`` over the worker axis, so ``clip_by_global_norm`` clips
each worker's gradient by its own norm); auxiliary rows receive no local
update.

Usage: ``update(grads, state, X)`` takes ``grads`` with a leading axis of
``m`` (or ``m + v``, whose auxiliary rows are ignored) and ``X`` with a leading
axis of ``m + v``, and returns ``updates`` such that
``optax.apply_updates(X, updates)`` is ``X_{k+1}`` (up to float rounding of
``X + (X_{k+1} − X)``).

  >>> import jax.numpy as jnp, optax, coopjax
  >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=2)
  >>> X = {"w": jnp.array([[0.0], [1.0]])}
  >>> state = tx.init(X)
  >>> grads = {"w": jnp.array([[1.0], [1.0]])}
  >>> updates, state = tx.update(grads, state, X)    # k = 1: local step only
  >>> X = optax.apply_updates(X, updates); [round(x, 4) for x in X["w"].ravel().tolist()]
  [-0.1, 0.9]
  >>> updates, state = tx.update(grads, state, X)    # k = 2: local step, then average
  >>> X = optax.apply_updates(X, updates); [round(x, 4) for x in X["w"].ravel().tolist()]
  [0.3, 0.3]
"""

from __future__ import annotations

from typing import Any
from typing import Literal
from typing import NamedTuple

import chex
import jax
import optax

import coopjax.algorithms._compressed as _compressed
import coopjax.algorithms._skeleton as _skeleton
from coopjax import compress
from coopjax import mixing
from coopjax import topology
from coopjax._validation import check_int
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._skeleton import check_tau
from coopjax.workers import Layout

PyTree = Any
Order = Literal["step_then_mix", "mix_then_step"]

__all__ = [
  "CooperativeState",
  "cooperative",
  "sync_sgd",
  "local_sgd",
  "easgd",
  "dpsgd",
  "elastic_averaging",
  "elastic_hierarchical",
  "step_count",
  "find_state",
]


class CooperativeState(NamedTuple):
  """State of :func:`cooperative`.

  Attributes:
    count: number of local steps taken so far (k − 1 before step k), int32.
    local_state: the local optimizer's state, stacked over the m workers.
  """

  count: chex.Array
  local_state: optax.OptState


def scheduled_mixing(
  name: str,
  local: optax.GradientTransformation,
  layout: Layout,
  schedule,
  comm,
  mix_cost,
  *,
  state_cls: type = CooperativeState,
  period: int = 1,
  **options,
) -> CooperativeTransformation:
  """The skeleton for algorithms whose mix is a (scheduled) linear map of the rows.

  ``schedule(k) -> (should_mix, mix)`` gives, from the traced step k, whether
  step k mixes and the mix (``X -> X`` over all ``m + v`` rows, built from
  :class:`coopjax.mixing.Mix` objects); the same mix moves the optimizer
  state under ``local_state_policy="mix"``.
  """
  return _skeleton.transformation(
    name,
    local,
    layout,
    state_cls=state_cls,
    should_mix=lambda k, extra: schedule(k)[0],
    on_mix=lambda k, X, extra, _inputs: (schedule(k)[1](X), extra),
    state_mix=lambda k: schedule(k)[1],
    comm=comm,
    mix_cost=mix_cost,
    period=period,
    **options,
  )


@_compressed.uncompressed
def cooperative(
  local: optax.GradientTransformation,
  *,
  tau: int,
  W,
  num_aux: int = 0,
  order: Order = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  mixer: mixing.Mixer | None = None,
  symmetric: bool = True,
  allow_negative: bool = False,
  warmup_steps: int = 0,
  name: str = "cooperative",
) -> CooperativeTransformation:
  r"""Cooperative SGD A(τ, W, v) with any optax optimizer as the local update.

  .. math::

     \text{step\_then\_mix (eq. 10):}\quad X_{k+1} = (X_k + U_k)\,S_k, \qquad
     \text{mix\_then\_step (Remark 1):}\quad X_{k+1} = X_k S_k + U_k,

  where ``U_k`` stacks ``local``'s update for each worker (``−ηg_i(x_i^{(k)})``
  for SGD, the gradient always taken at ``X_k``) and zeros for the
  auxiliaries, and ``S_k = W`` if ``k mod τ = 0`` else ``I``
  (``lax.cond`` on the step counter k = 1, 2, …). Under both orders the
  averaged model moves by ``u_{k+1} = u_k − η m/(m+v)·mean_i g_i`` (eq. 14).

  What is mixed. The models' rows are mixed (all leaves, or those selected by
  ``mix_mask``). The local optimizer's state at a mixing step (momentum
  buffers, Adam moments) follows ``local_state_policy``:

  * ``"keep"`` (default): each worker keeps its own state, as PyTorch's
    ``PeriodicModelAverager`` / post-local SGD does and as the local SGD and
    EASGD papers do (their workers keep their momentum).
  * ``"mix"``: the floating-point leaves are mixed with the same ``S_k`` as the
    models (auxiliary rows, which hold no state, enter as zeros); integer
    counters are kept. D-PSGD-with-momentum variants and SlowMo's "average
    buffers" option do this.
  * ``"reset"``: floating-point buffers are re-initialised (zeroed) at every
    mixing step, counters (and so learning-rate schedules) continue; SlowMo's
    "reset buffers" option.

  The policy is applied at step k after the local update, in both orders.
  Non-trainable state kept inside X (e.g. BatchNorm statistics stored as
  leaves of the worker's pytree) is mixed like the parameters by default; set
  ``mix_mask`` (a pytree prefix of X with booleans, False = keep local) to keep
  such leaves per worker. A leaf excluded by the mask is neither mixed nor,
  for auxiliary rows, meaningful.

  Args:
    local: optax optimizer applied to each worker separately (vmapped); its
      state is stacked over the m workers.
    tau: communication period τ ≥ 1.
    W: mixing matrix of size ``(m + v) × (m + v)``, auxiliaries last; validated
      with :func:`coopjax.topology.validate`.
    num_aux: v, the number of auxiliary variables.
    order: ``"step_then_mix"`` (paper eq. 10, default) or ``"mix_then_step"``
      (Remark 1; classic EASGD and D-PSGD).
    local_state_policy: ``"keep"``, ``"mix"`` or ``"reset"`` (see above).
    mix_mask: optional pytree prefix of X of booleans selecting mixed leaves.
    mixer: how to apply W (a callable ``X -> X``); defaults to
      :class:`coopjax.mixing.Mix` of W (dense reference, sharded lowering). Its
      cost is described as W's.
    symmetric: require W symmetric (the theory's condition).
    allow_negative: accept negative weights (EASGD with α > 1/m).
    warmup_steps: steps of fully synchronous SGD before the first step of the
      algorithm (post-local SGD).
    name: the algorithm's name in messages and ``tx.name``.

  Returns:
    A :class:`coopjax.algorithms.CooperativeTransformation` (an optax
    ``GradientTransformationExtraArgs``); extra keyword arguments of ``update``
    are split over the workers (leading axis m) and passed to ``local``.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax import topology
    >>> tx = coopjax.cooperative(optax.sgd(0.1), tau=1, W=topology.complete(2))
    >>> X = {"w": jnp.array([0.0, 1.0])}
    >>> updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]  # mean(-0.1, 0.7)
    [0.3, 0.3]

  References:
    Wang & Joshi, Cooperative SGD, JMLR 22(213), 2021, eqs. 7 and 10, Remark 1.
  """
  tau = check_tau(tau)
  v = check_int("num_aux", num_aux, 0)
  W = topology.validate(W, symmetric=symmetric, allow_negative=allow_negative)
  n = W.shape[0]
  m = n - v
  if m < 1:
    raise ValueError(f"W is {n}x{n} but num_aux={v}: no rows are left for workers.")
  mix = mixing.Mix(W, m, mask=mixing.check_mask(mix_mask))
  apply = mixer if mixer is not None else mix
  return scheduled_mixing(
    name,
    local,
    Layout(m, v),
    lambda k: (k % tau == 0, apply),
    _skeleton.every(tau, mix.cost),
    mix.cost,
    period=tau,
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
    graph=W,
  )


@_compressed.uncompressed
def sync_sgd(local: optax.GradientTransformation, *, num_workers: int, **kwargs):
  r"""Fully synchronous SGD, A(1, J, 0): average the models after every step.

  With SGD as ``local`` this equals large-batch SGD on the averaged gradient:
  :math:`x_{k+1} = x_k - \eta \frac1m \sum_i g_i(x_k)`.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.sync_sgd(optax.sgd(0.1), num_workers=2)
    >>> X = {"w": jnp.zeros(2)}
    >>> updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]  # −0.1·mean(g)
    [-0.2, -0.2]
  """
  m = check_int("num_workers", num_workers, 1)
  return cooperative(local, tau=1, W=topology.complete(m), **{"name": "sync_sgd", **kwargs})


def local_sgd(
  local: optax.GradientTransformation,
  *,
  tau: int,
  num_workers: int,
  compressor: compress.Compressor | None = None,
  error_decay: float = 1.0,
  key: jax.Array | None = None,
  **kwargs,
):
  r"""Periodic averaging / local SGD, A(τ, J, 0) (Stich, ICLR 2019).

  Workers take τ local steps, then all models are averaged.

  With a ``compressor``: error-feedback averaging (Qsparse-local-SGD, Basu et
  al., 2019; :mod:`coopjax.algorithms._compressed`). With ``x_ref`` the last
  sync point (X's worker mean at first) and ``e_i`` worker i's error (0 at
  first), each mix computes

  .. math::

     v_i = \beta e_i + x_{\text{ref}} - x_i,\quad c_i = Q(v_i),\quad
     e_i \leftarrow v_i - c_i,\quad
     x_{\text{ref}} \leftarrow x_{\text{ref}} - \tfrac1m \textstyle\sum_i c_i,\quad
     x_i \leftarrow x_{\text{ref}},

  sending only the payloads of the ``c_i``, and keeps the inner optimizer's
  state. ``x_ref − mean(e)`` then moves exactly as the uncompressed average
  (``x_ref' − ē' = x_ref − βē − mean_i(x_ref − x_i)``), and Q = identity is
  local SGD itself (up to float rounding).

  Args:
    local: optax optimizer applied to each worker separately.
    tau: communication period τ.
    num_workers: m.
    compressor: None (default): the exact average (an all-reduce); a
      :class:`coopjax.compress.Compressor`: error-feedback averaging, state
      :class:`coopjax.algorithms.ErrorFeedbackState`.
    error_decay: β of the error memory (compressed only).
    key: PRNG key of the compressor's random draws (compressed only;
      ``jax.random.key(0)`` when None).
    **kwargs: :func:`cooperative`'s options; with a compressor
      ``local_state_policy``, ``mix_mask``, ``warmup_steps``, ``order``
      (``"step_then_mix"`` only) and ``name``.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=2)
    >>> X = {"w": jnp.zeros(2)}
    >>> updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]  # k = 1: no mix
    [-0.1, -0.3]
    >>> from coopjax import compress
    >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=1, num_workers=2,
    ...                        compressor=compress.identity())
    >>> updates, state = tx.update({"w": jnp.array([1.0, 3.0])}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]  # Q = I: the mean
    [-0.2, -0.2]
  """
  m = check_int("num_workers", num_workers, 1)
  _compressed.check_uncompressed_options(compressor, error_decay, key)
  if compressor is None:
    return cooperative(local, tau=tau, W=topology.complete(m), **{"name": "local_sgd", **kwargs})
  unknown = sorted(set(kwargs) - _COMPRESSED_OPTIONS)
  if unknown:
    raise ValueError(
      f"local_sgd with a compressor takes the options {sorted(_COMPRESSED_OPTIONS)}, not "
      f"{unknown}: the mix is the error-feedback mean of the workers."
    )
  options = dict(kwargs)
  name = options.pop("name", "local_sgd")

  def outer_step(k, mean_c, x_ref, outer):
    return jax.tree.map(lambda r, c: r - c.astype(r.dtype), x_ref, mean_c), outer

  return _compressed.error_feedback_averaging(
    name,
    local,
    check_tau(tau),
    m,
    compressor,
    error_decay,
    key,
    lambda x_ref: optax.EmptyState(),
    outer_step,
    **options,
  )


_COMPRESSED_OPTIONS = {"local_state_policy", "mix_mask", "warmup_steps", "order", "name"}


@_compressed.uncompressed
def easgd(
  local: optax.GradientTransformation, *, tau: int, alpha: float, num_workers: int, **kwargs
):
  r"""Elastic averaging SGD, A(τ, W_α, 1) (Zhang et al., NeurIPS 2015; paper eq. 11).

  At every mixing step each worker and the anchor z (the last row of X) pull
  toward each other:

  .. math::

     x_i \leftarrow (1-\alpha) x_i + \alpha z, \qquad
     z \leftarrow (1 - m\alpha) z + \alpha \sum_i x_i .

  Valid for ``0 < α < 2/(m+1)``; ``α = 2/(m+2)`` minimises the bound's floor.
  X must be built with ``num_aux=1``. With ``order="mix_then_step"`` this is
  Zhang et al.'s update, where the gradient is taken before the pull.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.easgd(optax.sgd(0.1), tau=1, alpha=0.25, num_workers=2)
    >>> X = {"w": jnp.array([0.0, 1.0, 2.0])}  # two workers, then the anchor z
    >>> updates, state = tx.update({"w": jnp.zeros(2)}, tx.init(X), X)
    >>> optax.apply_updates(X, updates)["w"].tolist()  # x_i ← .75 x_i + .25 z; z ← .5 z + .25 Σ x_i
    [0.5, 1.25, 1.25]
  """
  m = check_int("num_workers", num_workers, 1)
  W = topology.easgd(m, alpha)
  return cooperative(
    local, tau=tau, W=W, num_aux=1, allow_negative=True, **{"name": "easgd", **kwargs}
  )


@_compressed.uncompressed
def dpsgd(local: optax.GradientTransformation, *, W, **kwargs):
  r"""Decentralized parallel SGD, A(1, W, 0) (Lian et al., NeurIPS 2017).

  Every step each worker averages its neighbours' models with weights W.
  ``order="mix_then_step"`` gives Lian et al.'s
  :math:`x_i \leftarrow \sum_j W_{ji} x_j - \eta g_i(x_i)`.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax import topology
    >>> tx = coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(4))
    >>> X = {"w": jnp.array([0.0, 3.0, 6.0, 9.0])}
    >>> updates, state = tx.update({"w": jnp.zeros(4)}, tx.init(X), X)
    >>> optax.apply_updates(X, updates)["w"].tolist()  # x_i ← (x_{i-1} + x_i + x_{i+1}) / 3
    [4.0, 3.0, 6.0, 5.0]
  """
  return cooperative(local, tau=1, W=W, **{"name": "dpsgd", **kwargs})


@_compressed.uncompressed
def elastic_averaging(
  local: optax.GradientTransformation, *, W, alpha: float, tau: int = 1, **kwargs
):
  r"""Generalised elastic averaging A(τ, W′, 1) (paper §6.2, Theorem 4).

  Workers mix among themselves through W and pull toward one anchor:

  .. math::

     W' = \begin{bmatrix} (1-\alpha) W & \alpha \mathbf 1 \\
                          \alpha \mathbf 1^\top & 1 - m\alpha \end{bmatrix},
     \qquad \zeta(W') = \max\{(1-\alpha)\zeta(W), |1-(m+1)\alpha|\}.

  ``W = I`` gives EASGD's ``W_α``; ``W = J`` adds full averaging among the workers. The
  bound is smallest at ``α = (1+ζ)/(m+1+ζ)`` (:func:`coopjax.theory.elastic_best_alpha`).
  X must be built with ``num_aux=1``.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax import topology
    >>> tx = coopjax.elastic_averaging(optax.sgd(0.1), W=topology.complete(2), alpha=0.25)
    >>> X = {"w": jnp.array([0.0, 2.0, 4.0])}  # two workers, then the anchor
    >>> updates, state = tx.update({"w": jnp.zeros(2)}, tx.init(X), X)
    >>> optax.apply_updates(X, updates)["w"].tolist()  # x_i ← .75·mean(x) + .25 z
    [1.75, 1.75, 2.5]
  """
  return cooperative(
    local,
    tau=tau,
    W=topology.elastic(W, alpha),
    num_aux=1,
    allow_negative=True,
    **{"name": "elastic_averaging", **kwargs},
  )


@_compressed.uncompressed
def elastic_hierarchical(
  local: optax.GradientTransformation,
  *,
  tau: int,
  groups,
  alpha: float,
  W_aux=None,
  **kwargs,
):
  r"""Elastic hierarchical averaging (paper §6.3): one auxiliary variable per group.

  With ``g`` groups, X has ``m + g`` rows (``num_aux = g``); at a mixing step
  (:func:`coopjax.topology.elastic_hierarchical`)

  .. math::

     x_i \leftarrow (1-\alpha) x_i + \alpha z_{g(i)}, \qquad
     z_g \leftarrow \sum_l (W_{aux})_{lg} z_l + \alpha \sum_{i \in g}(x_i - z_g).

  Difference from the paper: in §6.3 the auxiliaries communicate among
  themselves (through ``W_aux``) during the workers' local steps; here they
  mix at the same step as the workers, in the one matrix above, every τ
  steps.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.elastic_hierarchical(
    ...   optax.sgd(0.1), tau=1, groups=[[0, 1], [2, 3]], alpha=0.25
    ... )
    >>> X = {"w": jnp.array([0.0, 2.0, 4.0, 6.0, 1.0, 5.0])}  # 4 workers, 2 anchors
    >>> updates, state = tx.update({"w": jnp.zeros(4)}, tx.init(X), X)
    >>> optax.apply_updates(X, updates)["w"].tolist()
    [0.25, 1.75, 4.25, 5.75, 3.0, 3.0]
  """
  W = topology.elastic_hierarchical(groups, alpha, W_aux)
  num_groups = len(groups)
  return cooperative(
    local,
    tau=tau,
    W=W,
    num_aux=num_groups,
    allow_negative=True,
    **{"name": "elastic_hierarchical", **kwargs},
  )


def find_state(opt_state: PyTree, cls: type = CooperativeState):
  """The first state of type ``cls`` inside ``opt_state`` (e.g. inside ``optax.chain``).

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = optax.chain(optax.clip(1.0), coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=2))
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> type(coopjax.algorithms.find_state(state)).__name__
    'CooperativeState'
  """
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
    if isinstance(s, cls)
  ]
  if not found:
    raise ValueError(f"opt_state holds no {cls.__name__}; was it made by a coopjax algorithm?")
  return found[0]


def _is_cooperative_state(x) -> bool:
  return isinstance(x, tuple) and hasattr(x, "count") and hasattr(x, "local_state")


def step_count(opt_state: PyTree) -> jax.Array:
  """The number of local steps taken so far (k of the last step).

  Finds the first coopjax algorithm state (a NamedTuple with ``count`` and
  ``local_state``) inside ``opt_state``, so it works through ``optax.chain``.

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = optax.chain(optax.clip(1.0), coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=2))
    >>> X = {"w": jnp.zeros(2)}
    >>> _, state = tx.update({"w": jnp.ones(2)}, tx.init(X), X)
    >>> int(coopjax.step_count(state))
    1
  """
  for s in jax.tree.leaves(opt_state, is_leaf=_is_cooperative_state):
    if _is_cooperative_state(s):
      return s.count
  raise ValueError(
    "opt_state holds no coopjax algorithm state; was it made by a coopjax algorithm?"
  )
