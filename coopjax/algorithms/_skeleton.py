r"""The one transformation skeleton every coopjax algorithm is built on.

Each step k (counted from 1) of every algorithm is

.. math::

   U_k = \text{local}(G_k) \text{ on each worker (zero on auxiliary rows)}, \qquad
   X_{k+1} = \begin{cases}
     \mathcal M_k(X_k + U_k) & \text{step then mix (paper eq. 10)} \\
     \mathcal M_k(X_k) + U_k & \text{mix then step (Remark 1)} \\
   \end{cases}
   \text{ if the schedule mixes at } k, \text{ else } X_k + U_k,

where ``local`` is any optax optimizer vmapped over the m workers and
:math:`\mathcal M_k` is the algorithm's mix hook: ``X·W`` for A(τ, W, v), a
pull toward an anchor for EASGD, an outer optimizer step for DiLoCo. The hook
runs inside the taken branch of ``lax.cond``, so its communication (which
goes through :class:`coopjax.mixing.Mix`) happens on mixing steps only.
What the skeleton does for every algorithm alike:

* the local optimizer's state at a mix (``local_state_policy``: ``"keep"``,
  ``"mix"`` with the step's own mix, ``"reset"``);
* ``mix_mask``: leaves marked False keep their rows at every mix;
* ``warmup_steps``: steps ``1..w`` are fully synchronous SGD (the workers
  averaged after every local step, auxiliary rows set to that average), then
  the algorithm starts from the synchronised models with its own schedule
  counting from 1 (post-local SGD, Lin et al. 2020);
* the state, always a NamedTuple ``(count, local_state, *extra)``;
* the self-description (:class:`CooperativeTransformation`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coopjax import mixing
from coopjax._validation import check_int
from coopjax.cost import pattern
from coopjax.parallel import context
from coopjax.workers import Layout
from coopjax.workers import num_rows

PyTree = Any

__all__ = ["CooperativeTransformation", "StepInputs", "transformation", "every", "periodic"]

ORDERS = ("step_then_mix", "mix_then_step")


class StepInputs(NamedTuple):
  """What a mix hook sees besides X and its state fields.

  Attributes:
    args: ``update``'s extra keyword arguments (e.g. ``value``, the per-worker losses).
    prefetched: the ``prefetch`` hook's result, computed outside the mixing
      branch (a reduction issued early), or None.
  """

  args: dict
  prefetched: Any


STATE_POLICIES = ("keep", "mix", "reset")


class CooperativeTransformation(optax.GradientTransformationExtraArgs):
  r"""An optax transformation that also describes its layout and its communication.

  It is an ``optax.GradientTransformationExtraArgs`` (``init``, ``update``),
  so it composes with ``optax.chain`` and every optax utility; in addition it
  carries, as attributes:

  * ``layout``: the :class:`coopjax.Layout` of X (m workers, v auxiliary rows);
  * ``mix_mask``: the leaves kept per worker (False) or None;
  * ``comm(k, opt_state)``: host-side, the :class:`coopjax.cost.pattern.MixCost`
    of step k (counted from 1; ``opt_state`` is the state after step k, needed
    by algorithms whose schedule adapts), :data:`coopjax.cost.pattern.NO_COMM`
    when step k does not communicate;
  * ``overlaps``: whether a mix's communication runs during the next local steps;
  * ``settle(X, opt_state)``: X with any reduction still in flight completed
    (non-blocking algorithms), else X;
  * ``mix_cost``: the :class:`coopjax.cost.pattern.MixCost` of its regular mix;
  * ``period``: the steps between mixes (the first period for adaptive algorithms);
  * ``name``: the algorithm's name.

  Examples:
    >>> import optax, coopjax
    >>> tx = coopjax.easgd(optax.sgd(0.1), tau=4, alpha=0.1, num_workers=8)
    >>> tx.layout
    Layout(num_workers=8, num_aux=1)
    >>> tx.comm(4, None).collective, tx.comm(5, None).collective
    ('all_reduce', 'none')
  """

  def describe(self, **attributes) -> CooperativeTransformation:
    for key, value in attributes.items():
      setattr(self, key, value)
    return self


def check_local(local) -> optax.GradientTransformation:
  """``local`` must be an optax GradientTransformation."""
  if not (hasattr(local, "init") and hasattr(local, "update")):
    raise TypeError(
      f"local must be an optax GradientTransformation (e.g. optax.sgd(0.1)), got "
      f"{type(local).__name__}."
    )
  return local


def check_tau(tau, name: str = "tau") -> int:
  """τ (the steps between mixes) must be an integer >= 1."""
  return check_int(name, tau, 1)


def check_order(order, allowed=ORDERS, name: str = "this algorithm") -> str:
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
  if order not in allowed:
    raise ValueError(
      f"order={order!r} is not defined for {name}: its rule fixes the order "
      f"{allowed[0]!r}; drop the order argument."
    )
  return order


def check_state_policy(policy, allowed=STATE_POLICIES, name: str = "this algorithm") -> str:
  if policy not in STATE_POLICIES:
    raise ValueError(
      f"local_state_policy must be one of {STATE_POLICIES}, got {policy!r}: 'keep' leaves each "
      "worker's optimizer state alone, 'mix' mixes it with the same matrix as the models, "
      "'reset' zeroes its buffers at every mixing step."
    )
  if policy not in allowed:
    raise ValueError(
      f"local_state_policy={policy!r} is not defined for {name}; use one of {allowed}."
    )
  return policy


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def mix_local_state(local_state, mix: Callable[[PyTree], PyTree], num_workers: int, num_aux: int):
  """Mixes the floating-point leaves of the stacked local state with the models' mix.

  Auxiliary rows have no optimizer state; they enter the mix as zeros and are
  dropped afterwards, so a worker's buffers lose the auxiliaries' weight: with
  EASGD's W_α each worker's momentum becomes ``(1 − α)·buf_i`` at every mix.
  Integer leaves (step counts) are kept.
  """
  leaves, treedef = jax.tree.flatten(local_state)
  float_idx = [i for i, x in enumerate(leaves) if _is_float(x) and x.ndim >= 1]
  if not float_idx:
    return local_state
  workers = [leaves[i] for i in float_idx]
  aux = jax.tree.map(lambda x: jnp.zeros((num_aux, *x.shape[1:]), x.dtype), workers)
  mixed, _ = mixing.split_rows(mix(mixing.join_rows(workers, aux)), num_workers)
  for i, x in zip(float_idx, mixed, strict=True):
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


def reset_local_state(local_state, fresh_state):
  """Floating-point buffers from ``fresh_state``; integer counters kept from ``local_state``."""
  return jax.tree.map(lambda old, new: new if _is_float(old) else old, local_state, fresh_state)


def _local_update(local, grads, local_state, params_w, extra_args):
  def one(g, s, p, extra):
    return local.update(g, s, p, **extra)

  local = optax.with_extra_args_support(local)
  return jax.vmap(one)(grads, local_state, params_w, extra_args)


def _check_grads(grads: PyTree, m: int, n: int) -> PyTree:
  rows = num_rows(grads, "grads")
  if rows not in (m, n):
    raise ValueError(
      f"grads have leading axis {rows} but there are {m} workers"
      + (f" and {n - m} auxiliary variables" if n > m else "")
      + f"; pass one gradient per worker (leading axis {m})."
    )
  return jax.tree.map(lambda x: x[:m], grads) if rows != m else grads


def _check_rows(params, layout: Layout, name: str, what: str = "params"):
  rows = num_rows(params, what)
  if rows != layout.num_rows:
    m, v = layout
    n = m + v
    raise ValueError(
      f"{what} have leading axis {rows} but W (each mixing matrix) is {n}x{n} for {name} "
      + (f"({m} workers + {v} auxiliary)" if v else f"({m} workers and no auxiliary rows)")
      + "; build X with coopjax.replicate(params, tx) "
      f"(num_workers={m}, num_aux={v})."
    )


def _add(X, U):
  return jax.tree.map(lambda x, u: x + u.astype(x.dtype), X, U)


def _sub(X, Y):
  return jax.tree.map(jnp.subtract, X, Y)


def _synchronise(X: PyTree, layout: Layout) -> PyTree:
  """Every row (workers and auxiliaries) set to the workers' average: one all-reduce."""
  m, v = layout
  workers, aux = mixing.split_rows(X, m)
  mean = mixing.Mix.average(m)(workers)
  if v == 0:
    return mean
  if context.current_live() is not None:  # row 0 may be masked: the mean over the live rows
    live_mean = mixing.worker_mean(workers)
    return mixing.join_rows(
      mean, jax.tree.map(lambda z, u: 0 * z + u[None].astype(z.dtype), aux, live_mean)
    )
  return mixing.join_rows(mean, jax.tree.map(lambda z, u: 0 * z + u[:1].astype(z.dtype), aux, mean))


def _where_rows(keep, new: PyTree, old: PyTree) -> PyTree:
  """Row-wise select: ``new`` on the rows where ``keep`` (bool [rows]) holds, else ``old``."""
  return jax.tree.map(
    lambda y, x: jnp.where(keep.reshape(keep.shape + (1,) * (jnp.ndim(x) - 1)), y, x), new, old
  )


def transformation(
  name: str,
  local: optax.GradientTransformation,
  layout: Layout,
  *,
  state_cls: type,
  should_mix: Callable[[jax.Array, tuple], jax.Array],
  on_mix: Callable[[jax.Array, PyTree, tuple, StepInputs], tuple[PyTree, tuple]],
  init_extra: Callable[[PyTree], tuple] = lambda X: (),
  every_step: Callable[[jax.Array, tuple, dict], tuple] | None = None,
  prefetch: Callable[[jax.Array, tuple], Any] | None = None,
  state_mix: Callable[[jax.Array], Callable[[PyTree], PyTree]] | None = None,
  comm: Callable[[int, Any], pattern.MixCost],
  mix_cost: pattern.MixCost,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
  settle: Callable[[PyTree, Any], PyTree] | None = None,
  overlaps: bool = False,
  period: int = 1,
  orders: tuple[str, ...] = ORDERS,
  policies: tuple[str, ...] = STATE_POLICIES,
  graph=None,
) -> CooperativeTransformation:
  r"""Builds an algorithm from its hooks (see the module docstring for the step).

  Args:
    name: the algorithm's name (in messages and ``tx.name``).
    local: the local optax optimizer, vmapped over the workers.
    layout: m workers and v auxiliary rows.
    state_cls: a NamedTuple ``(count, local_state, *extra)``.
    should_mix: ``should_mix(k, extra) -> bool`` (traced), k the algorithm's
      step (after the warm-up) counted from 1.
    on_mix: ``on_mix(k, X, extra, inputs) -> (X, extra)`` on all ``m + v``
      rows, run inside the mixing branch (``inputs``: :class:`StepInputs`).
    init_extra: ``init_extra(X) -> extra``, the state fields after
      ``local_state`` (also re-run on the synchronised X of every warm-up step).
    every_step: optional ``every_step(k, extra, extra_args) -> extra`` run at
      every step before the schedule is read.
    prefetch: optional ``prefetch(k, extra) -> value`` traced outside the
      mixing branch, its value handed to ``on_mix`` (``StepInputs.prefetched``):
      a communication whose operand is known before the step (a reduction
      issued early) is then not inside the branch.
    state_mix: ``state_mix(k) -> mix`` over the ``m + v`` rows, the mix that
      ``local_state_policy="mix"`` applies to the optimizer state (None
      refuses that policy).
    comm: ``comm(k, opt_state) -> MixCost`` for k the algorithm's step.
    mix_cost: the cost of the algorithm's regular mix (``tx.mix_cost``).
    order, local_state_policy, mix_mask, warmup_steps: the user's options.
    settle: ``settle(X, opt_state) -> X`` completing a pending reduction.
    overlaps: whether the mix overlaps the next local steps.
    period: the steps between mixes (for descriptions).
    orders, policies: the options this algorithm defines; others are refused.
    graph: the support of all the workers' communication over a schedule
      period (its non-zeros; the union for time-varying mixes; ``(m + v)``
      square to join workers through auxiliary rows), used
      to check that the live workers stay connected; None: every pair
      communicates (full averaging, auxiliary rows). An algorithm that mixes
      with a graph W (gossip, group means, matchings) must pass it: under a
      live mask such a mix outside ``graph`` raises a ValueError while tracing.

  Returns:
    A :class:`CooperativeTransformation` with state ``state_cls``.

  Examples:
    Local SGD written directly on the skeleton: the mix is ``Mix.average``
    every τ steps, no extra state.

    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax.algorithms import _skeleton
    >>> from coopjax.algorithms._cooperative import CooperativeState
    >>> average = coopjax.mixing.Mix.average(4)
    >>> tx = _skeleton.transformation(
    ...   "my_local_sgd", optax.sgd(0.1), coopjax.Layout(4), state_cls=CooperativeState,
    ...   on_mix=lambda k, X, extra, inputs: (average(X), extra),
    ...   **_skeleton.periodic(2, average.cost))
    >>> X = {"w": jnp.zeros(4)}
    >>> state = tx.init(X)
    >>> for _ in range(2):
    ...   updates, state = tx.update({"w": jnp.array([1.0, 3.0, 1.0, 3.0])}, state, X)
    ...   X = optax.apply_updates(X, updates)
    >>> [round(x, 4) for x in X["w"].tolist()], tx.comm(2).collective
    ([-0.4, -0.4, -0.4, -0.4], 'all_reduce')
  """
  local = check_local(local)
  m, v = layout
  order = check_order(order, orders, name)
  if state_mix is None:
    policies = tuple(p for p in policies if p != "mix")
  policy = check_state_policy(local_state_policy, policies, name)
  mix_mask = mixing.check_mask(mix_mask)
  warmup = check_int("warmup_steps", warmup_steps, 0)
  support = _graph(graph, m)
  # None declares full averaging only: a graph mix under a live mask then asks for graph=.
  declared = support if graph is not None else np.zeros((m, m), bool)
  # The warm-up's mix of the optimizer state: the workers averaged, auxiliary rows (zeros) kept.
  sync_state = mixing.Mix(
    np.block([[np.full((m, m), 1.0 / m), np.zeros((m, v))], [np.zeros((v, m)), np.eye(v)]]), m
  )

  def init_fn(params):
    _check_rows(params, layout, name)
    if mix_mask is not None:
      mixing.check_mask(mix_mask, mixing.split_rows(params, m)[0])
    workers = mixing.split_rows(params, m)[0]
    return state_cls(jnp.zeros([], jnp.int32), jax.vmap(local.init)(workers), *init_extra(params))

  def step(updates, state, params, extra_args):
    grads = _check_grads(updates, m, m + v)
    k = optax.safe_int32_increment(state.count)
    kk = k - warmup if warmup else k  # the algorithm's own step
    extra = tuple(state)[2:]
    if every_step is not None:
      extra = tuple(every_step(kk, extra, extra_args))
    workers, aux = mixing.split_rows(params, m)
    live_ctx = context.current_live()
    if live_ctx is not None:  # masked workers' gradients never reach the local optimizer
      live_w = mixing.local_live(live_ctx.live)
      grads = _where_rows(live_w, grads, jax.tree.map(jnp.zeros_like, grads))
    local_updates, local_state = _local_update(local, grads, state.local_state, workers, extra_args)
    # U: the local updates with zero rows for the auxiliaries, in the models' dtypes.
    U = mixing.join_rows(
      jax.tree.map(lambda w, u: u.astype(w.dtype), workers, local_updates),
      jax.tree.map(jnp.zeros_like, aux),
    )
    inputs = StepInputs(extra_args, None if prefetch is None else prefetch(kk, extra))

    def apply_policy(opt_state, mix):
      if policy == "mix":
        return mix_local_state(opt_state, mix, m, v)
      if policy == "reset":
        return reset_local_state(opt_state, jax.vmap(local.init)(workers))
      return opt_state

    def on(opt_state, extra):
      base = _add(params, U) if order == "step_then_mix" else params
      mixed, extra = on_mix(kk, base, extra, inputs)
      mixed = mixing._select(mix_mask, mixed, base)
      opt_state = apply_policy(opt_state, state_mix(kk) if policy == "mix" else None)
      out = _sub(mixed, params)
      return (out if order == "step_then_mix" else _add(out, U)), opt_state, tuple(extra)

    def off(opt_state, extra):
      return U, opt_state, extra  # the update is exactly the local one

    def scheduled(opt_state, extra):
      return jax.lax.cond(should_mix(kk, extra), on, off, opt_state, extra)

    if not warmup:
      out, local_state, extra = scheduled(local_state, extra)
    else:

      def warm(opt_state, extra):
        synced = mixing._select(mix_mask, _synchronise(_add(params, U), layout), _add(params, U))
        opt_state = apply_policy(opt_state, sync_state)
        return _sub(synced, params), opt_state, tuple(init_extra(synced))

      out, local_state, extra = jax.lax.cond(k <= warmup, warm, scheduled, local_state, extra)
    return out, state_cls(k, local_state, *extra)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        f"{name}: cooperative transformations need the stacked models: call "
        "tx.update(grads, state, X) with params=X."
      )
    _check_rows(params, layout, name)
    live = extra_args.pop("live", None)
    fallback = extra_args.pop("live_fallback", None)
    if live is None:
      return step(updates, state, params, extra_args)
    live = jnp.asarray(live).astype(bool)
    if live.shape != (m,):
      raise ValueError(
        f"{name}: live must be a bool array of shape ({m},), one flag per worker, got shape "
        f"{live.shape}."
      )
    with context.live_masked(context.LiveContext(live, fallback, declared)):
      out, new_state = step(updates, state, params, extra_args)
      live_w = mixing.local_live(live)
      workers_out, aux_out = mixing.split_rows(out, m)
      workers_out = _where_rows(live_w, workers_out, jax.tree.map(jnp.zeros_like, workers_out))
      local_state = _where_rows(live_w, new_state.local_state, state.local_state)
    return mixing.join_rows(workers_out, aux_out), new_state._replace(local_state=local_state)

  warm_cost = pattern.all_reduce(m)

  def comm_fn(k: int, opt_state=None) -> pattern.MixCost:
    k = check_int("k", k, 1)
    if k <= warmup:
      return warm_cost
    return comm(k - warmup, opt_state)

  def settle_fn(X, opt_state):
    return X if settle is None else settle(X, opt_state)

  tx = CooperativeTransformation(init_fn, update_fn)
  return tx.describe(
    name=name,
    layout=layout,
    mix_mask=mix_mask,
    comm=comm_fn,
    mix_cost=mix_cost,
    overlaps=overlaps,
    settle=settle_fn,
    period=period,
    warmup_steps=warmup,
    local=local,
    graph=support,
    order=order,
    local_state_policy=policy,
  )


def _graph(graph, m: int) -> np.ndarray:
  """The bool m × m communication support (complete when None), symmetric."""
  if graph is None:
    return ~np.eye(m, dtype=bool) if m > 1 else np.zeros((1, 1), bool)
  S = np.abs(np.asarray(graph, np.float64)) > 1e-12
  S = S | S.T
  G = S[:m, :m]
  if S.shape[0] > m:  # workers joined through auxiliary rows (paths over auxiliaries only)
    reach = S[m:, m:] | np.eye(S.shape[0] - m, dtype=bool)
    for _ in range(S.shape[0] - m):
      reach = (reach.astype(int) @ reach.astype(int)) > 0
    G = G | ((S[:m, m:].astype(int) @ reach.astype(int) @ S[m:, :m].astype(int)) > 0)
  return G & ~np.eye(m, dtype=bool)


def every(tau: int, cost: pattern.MixCost) -> Callable[[int, Any], pattern.MixCost]:
  """``comm`` of a fixed period: ``cost`` at steps τ, 2τ, …, nothing otherwise.

  Examples:
    >>> from coopjax.algorithms import _skeleton
    >>> from coopjax.cost import pattern
    >>> comm = _skeleton.every(2, pattern.all_reduce(4))
    >>> [comm(k).collective for k in (1, 2, 3, 4)]
    ['none', 'all_reduce', 'none', 'all_reduce']
  """
  return lambda k, _state=None: cost if k % tau == 0 else pattern.NO_COMM


def periodic(tau: int, cost: pattern.MixCost) -> dict:
  """The schedule arguments of :func:`transformation` for a mix of cost ``cost`` every τ steps.

  Examples:
    >>> from coopjax.algorithms import _skeleton
    >>> from coopjax.cost import pattern
    >>> sorted(_skeleton.periodic(4, pattern.all_reduce(8)))
    ['comm', 'mix_cost', 'period', 'should_mix']
  """
  return dict(
    should_mix=lambda k, extra: k % tau == 0,
    comm=every(tau, cost),
    mix_cost=cost,
    period=tau,
  )
