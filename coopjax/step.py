r"""The jitted cooperative step: local gradients, the transformation, metrics.

``make_step(loss_fn, tx)`` returns the card's pure function ``step(X, batch, k)``
in optax form, ``step(X, opt_state, batch) -> (X, opt_state, metrics)``: the
step counter k travels in ``opt_state`` (see :func:`coopjax.step_count`).
One step computes every worker's stochastic gradient on its own batch,

.. math::

   g_i = \nabla_x \ell(x_i; \xi_i), \qquad i = 1..m,

then applies the cooperative transformation (local update and, when
``k mod τ = 0``, the mix) and reports metrics. The per-worker losses reach the
transformation as the extra argument ``value`` (shape [m]), as optax passes
losses to e.g. ``reduce_on_plateau``; transformations that take no extra
arguments ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from coopjax import diagnostics
from coopjax.workers import consensus_distance
from coopjax.workers import num_rows

PyTree = Any

__all__ = ["make_step"]


def _batch_rows(batch: PyTree, num_workers: int | None) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch has no array leaves; pass per-worker data with leading axis m.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
      f"every batch leaf needs the same leading worker axis m, got leading sizes "
      f"{sorted(s for s in sizes if s is not None)}"
      + (" and a scalar leaf" if None in sizes else "")
      + "; reshape the batch to [m, per_worker_batch, ...]."
    )
  m = sizes.pop()
  if num_workers is not None and m != num_workers:
    raise ValueError(
      f"batch has leading axis {m} but num_workers={num_workers}; give each worker its own "
      f"batch: shape [{num_workers}, per_worker_batch, ...]."
    )
  return m


def split_value(value, has_aux: bool, rows: int):
  """``(losses, aux)`` from the vmapped ``loss_fn`` output, checking one scalar per worker."""
  losses, aux = value if has_aux else (value, None)
  if jnp.shape(losses) != (rows,):
    raise ValueError(f"loss_fn must return a scalar per worker, got shape {jnp.shape(losses)[1:]}.")
  return losses, aux


def apply_transformation(tx, X, opt_state, grads, losses, aux, merge_aux):
  """Merges ``aux`` into X if asked, applies ``tx``; returns ``(X_before, X_new, opt_state)``."""
  if merge_aux is not None:
    X = merge_aux(X, aux)
  updates, opt_state = tx.update(grads, opt_state, X, value=losses)
  return X, optax.apply_updates(X, updates), opt_state


def make_step(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  *,
  num_workers: int | None = None,
  has_aux: bool = False,
  merge_aux: Callable[[Any, Any], Any] | None = None,
  with_consensus: bool | None = None,
  with_grad_norm: bool | None = None,
  with_loss: bool | None = None,
  donate: bool = False,
  jit: bool = True,
  mesh=None,
  check_finite: bool = False,
):
  r"""Builds the cooperative step ``step(X, opt_state, batch) -> (X, opt_state, metrics)``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` for ONE worker (or
      ``(scalar, aux)`` with ``has_aux=True``).
    tx: a coopjax transformation (e.g. :func:`coopjax.local_sgd`), possibly
      inside ``optax.chain``.
    num_workers: m; when given, the batch's leading axis is checked against it.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux is reported per
      worker in ``metrics["aux"]``.
    merge_aux: optional ``merge_aux(X, aux) -> X`` applied before the
      transformation, e.g. :func:`coopjax.models.merge_batch_stats` to write
      fresh BatchNorm statistics into X, so that a mixing step mixes (or, with
      a ``mix_mask``, keeps local) the current statistics.
    with_consensus: report ``‖X_{k+1}(I − J)‖²_F`` (a reduction over workers);
      default True without a mesh, False with one (see ``mesh``).
    with_grad_norm: report ``‖(1/m)Σ_i g_i‖``, the norm of the averaged
      gradient that moves u_k (eq. 14); when the models agree it is the
      averaged model's stochastic gradient norm. Default as ``with_consensus``.
    with_loss: report ``loss``, the mean over workers. Default as
      ``with_consensus``.
    donate: donate X and opt_state buffers to the step (saves memory; the
      inputs cannot be reused after the call).
    jit: wrap in ``jax.jit`` (False gives the raw function, e.g. for
      ``chex.assert_max_traces``).
    mesh: a ``jax.sharding.Mesh`` with a ``"workers"`` axis: run the step
      sharded (:func:`coopjax.sharding.make_sharded_step`): X in the sharded
      representation (:func:`coopjax.shard`), opt_state from
      :func:`coopjax.sharding.init`. There the metrics that reduce over
      workers (``loss``, ``consensus_distance``, ``avg_grad_norm``) are off by
      default, since each puts an all-reduce on every step.
    check_finite: add the divergence flags of
      :func:`coopjax.diagnostics.finite_metrics`: ``nonfinite_workers`` (bool
      [m]: worker i's loss, gradient or model at step k is NaN/Inf) and
      ``nonfinite_rows`` (bool [m + v]: rows of X_{k+1}); check them on the
      host with :func:`coopjax.diagnostics.check_finite`. With a mesh only
      ``nonfinite_workers`` from the losses is reported.

  Returns:
    ``step``; ``metrics`` holds ``loss`` (mean over workers), ``worker_loss``
    (shape [m]), ``step`` (k), and the optional ``consensus_distance``,
    ``avg_grad_norm`` and ``aux``.
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}.")
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(f"tx must be an optax GradientTransformation, got {type(tx).__name__}.")
  if num_workers is not None and (
    isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1
  ):
    raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}.")
  if merge_aux is not None and not has_aux:
    raise ValueError("merge_aux needs has_aux=True: loss_fn must return (loss, aux).")
  default = mesh is None
  with_consensus = default if with_consensus is None else with_consensus
  with_grad_norm = default if with_grad_norm is None else with_grad_norm
  with_loss = default if with_loss is None else with_loss
  if mesh is not None:
    from coopjax.parallel.sharding import make_sharded_step

    step = make_sharded_step(
      loss_fn,
      tx,
      mesh,
      num_workers=num_workers,
      has_aux=has_aux,
      merge_aux=merge_aux,
      with_consensus=with_consensus,
      with_grad_norm=with_grad_norm,
      with_loss=with_loss,
      donate=donate,
      jit=jit,
    )
    return _with_loss_flags(step) if check_finite else step
  tx = optax.with_extra_args_support(tx)
  grad_fn = jax.vmap(jax.value_and_grad(loss_fn, has_aux=has_aux))

  def step(X, opt_state, batch):
    from coopjax.algorithms._cooperative import step_count

    n = num_rows(X, "X")
    m = _batch_rows(batch, num_workers)
    if m > n:
      raise ValueError(
        f"batch has {m} worker rows but X has only {n} rows; X must stack m + v models "
        "(coopjax.replicate(params, m, num_aux))."
      )
    X_workers = jax.tree.map(lambda x: x[:m], X)
    value, grads = grad_fn(X_workers, batch)
    losses, aux = split_value(value, has_aux, m)
    X_before, X, opt_state = apply_transformation(tx, X, opt_state, grads, losses, aux, merge_aux)
    metrics = {"worker_loss": losses, "step": step_count(opt_state)}
    if check_finite:
      metrics.update(diagnostics.finite_metrics(losses, grads, X_before, X))
    if with_loss:
      metrics["loss"] = jnp.mean(losses)
    if with_consensus:
      metrics["consensus_distance"] = consensus_distance(X)
    if with_grad_norm:
      metrics["avg_grad_norm"] = optax.tree.norm(jax.tree.map(lambda g: jnp.mean(g, 0), grads))
    if has_aux:
      metrics["aux"] = aux
    return X, opt_state, metrics

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _with_loss_flags(step):
  """Adds ``nonfinite_workers`` from the per-worker losses (sharded path)."""

  def flagged(X, opt_state, batch):
    X, opt_state, metrics = step(X, opt_state, batch)
    return X, opt_state, dict(metrics, nonfinite_workers=~jnp.isfinite(metrics["worker_loss"]))

  return flagged
