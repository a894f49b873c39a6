r"""Hierarchical local SGD: frequent averaging within groups, rarer global averaging.

Lin et al. (ICLR 2020, "Don't use large mini-batches, use local SGD") average
the models of a group of workers (e.g. the GPUs of one host) every τ₁ steps
and all workers every τ₂ steps; PyTorch's ``HierarchicalModelAverager`` does
the same with one step counter. In Cooperative SGD terms it is
``A(τ₁, W_k, 0)`` with ``W_k = J`` when ``k mod τ₂ = 0`` and the block-diagonal
group-averaging matrix otherwise.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

import coopjax.algorithms._compressed as _compressed
from coopjax import mixing
from coopjax.algorithms._cooperative import CooperativeState
from coopjax.algorithms._cooperative import scheduled_mixing
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._skeleton import check_tau
from coopjax.cost import pattern
from coopjax.workers import Layout
from coopjax.workers import num_rows

PyTree = Any

__all__ = ["HierarchicalState", "hierarchical", "global_mean"]


HierarchicalState = CooperativeState
"""State of :func:`hierarchical`: ``(count, local_state)``, as :class:`CooperativeState`."""


def global_mean(workers: PyTree) -> PyTree:
  """Every row becomes the mean of all rows (:meth:`coopjax.mixing.Mix.average`)."""
  return mixing.Mix.average(num_rows(workers, "workers"))(workers)


def _check_groups(groups) -> list[list[int]]:
  try:
    groups = [[int(i) for i in g] for g in groups]
  except TypeError as e:
    raise TypeError(f"groups must be a list of lists of worker indices, got {groups!r}.") from e
  members = sorted(i for g in groups for i in g)
  m = len(members)
  if m == 0 or members != list(range(m)) or any(len(g) == 0 for g in groups):
    raise ValueError(
      f"groups must be non-empty lists of worker indices that partition 0..m-1 (each worker "
      f"in exactly one group), got {groups}."
    )
  return groups


@_compressed.uncompressed
def hierarchical(
  local: optax.GradientTransformation,
  *,
  tau1: int,
  tau2: int,
  groups,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
) -> CooperativeTransformation:
  r"""Hierarchical local SGD (Lin et al., 2020): group averaging every τ₁, global every τ₂.

  With steps k counted from 1 and ``g(i)`` worker i's group,

  .. math::

     x_i \leftarrow \begin{cases}
       \frac1m \sum_{j=1}^m x_j & k \bmod \tau_2 = 0, \\
       \frac1{|g(i)|} \sum_{j \in g(i)} x_j & k \bmod \tau_1 = 0 \text{ otherwise}, \\
       x_i & \text{otherwise,}
     \end{cases}

  applied after the local step (``order="mix_then_step"``: before it, to
  ``X_k``). τ₁ must divide τ₂. One group is periodic averaging with τ₁
  (:func:`coopjax.local_sgd`); groups of size 1 are periodic averaging with
  τ₂. The group mean is :func:`coopjax.mixing.group_mean`: with contiguous
  equal groups (e.g. the workers of one host) on a 2-D device mesh
  (across hosts × within a host) it is an all-reduce over the within-host
  axis, and the global mean an all-reduce over both.

  Args:
    local: optax optimizer applied to each worker separately (vmapped).
    tau1: group averaging period τ₁ ≥ 1.
    tau2: global averaging period τ₂, a multiple of τ₁.
    groups: list of lists of worker indices partitioning ``0..m-1``.
    order: ``"step_then_mix"`` (default) or ``"mix_then_step"``.
    local_state_policy: ``"keep"``, ``"mix"`` or ``"reset"``, as in
      :func:`coopjax.cooperative` (``"mix"`` averages the buffers with the same
      groups).
    mix_mask: optional pytree prefix of X of booleans selecting mixed leaves.

  Returns:
    An optax ``GradientTransformationExtraArgs`` with state
    :class:`HierarchicalState`; X has ``m`` rows (no auxiliaries).

  Examples:
    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.hierarchical(optax.sgd(0.1), tau1=1, tau2=2, groups=[[0, 1], [2, 3]])
    >>> X = {"w": jnp.arange(4.0)[:, None]}
    >>> state = tx.init(X)
    >>> zero = {"w": jnp.zeros((4, 1))}
    >>> updates, state = tx.update(zero, state, X)      # k = 1: group means
    >>> X = optax.apply_updates(X, updates); X["w"].ravel().tolist()
    [0.5, 0.5, 2.5, 2.5]
    >>> updates, state = tx.update(zero, state, X)      # k = 2: global mean
    >>> X = optax.apply_updates(X, updates); X["w"].ravel().tolist()
    [1.5, 1.5, 1.5, 1.5]

  References:
    T. Lin, S. U. Stich, K. K. Patel, M. Jaggi, "Don't use large mini-batches, use
    local SGD", ICLR 2020; PyTorch ``torch.distributed.algorithms.model_averaging.
    hierarchical_model_averager.HierarchicalModelAverager``.
  """
  tau1 = check_tau(tau1)
  tau2 = check_tau(tau2)
  if tau2 % tau1:
    raise ValueError(
      f"tau1={tau1} must divide tau2={tau2} (global averaging happens on a group-averaging "
      f"step); e.g. tau2={tau1 * max(1, round(tau2 / tau1))}."
    )
  groups = _check_groups(groups)
  m = sum(len(g) for g in groups)
  mask = mixing.check_mask(mix_mask)
  everyone = mixing.Mix.average(m, mask=mask)
  within = mixing.Mix.groups(groups).restrict(mask)

  def schedule(k):
    def mix(X):
      # Fresh closures: JAX caches a branch's trace by its callable, and a mix traces
      # differently under a shard or live context.
      return jax.lax.cond(k % tau2 == 0, lambda X: everyone(X), lambda X: within(X), X)

    return k % tau1 == 0, mix

  def comm(k, _state=None):
    if k % tau2 == 0:
      return everyone.cost
    return within.cost if k % tau1 == 0 else pattern.NO_COMM

  return scheduled_mixing(
    "hierarchical",
    local,
    Layout(m, 0),
    schedule,
    comm,
    within.cost,
    state_cls=HierarchicalState,
    period=tau1,
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
  )
