r"""The model to evaluate: the averaged model of paper eq. 13, right for kept-local leaves.

The paper evaluates the averaged model :math:`u_k = X_k \mathbf 1_{m+v}/(m+v)`
(eq. 13): the mean over all m + v rows, auxiliary variables included. That is
right for every leaf the algorithm mixes. Leaves kept per worker (``mix_mask``
False, e.g. BatchNorm running statistics) are never mixed: the workers'
rows are refreshed by their own forward passes, while an auxiliary row (EASGD's
anchor) keeps the value it started with (mean 0, variance 1 for BatchNorm).
Averaging those into the model to evaluate gives a model whose statistics
match none of the workers. :func:`evaluation_model` therefore averages

.. math::

   \bar x^{(\ell)} = \begin{cases}
     \frac{1}{m+v}\sum_{i=1}^{m+v} X^{(\ell)}_i & \text{leaf } \ell \text{ mixed (eq. 13)} \\
     \frac{1}{m}\sum_{i=1}^{m} X^{(\ell)}_i & \text{leaf } \ell \text{ kept per worker}
   \end{cases}

after completing any reduction still in flight (non-blocking algorithms,
``tx.settle``).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from coopjax import mixing
from coopjax.live import find_live_state
from coopjax.workers import layout_of
from coopjax.workers import num_rows

PyTree = Any

__all__ = ["evaluation_model", "check_nnx_state"]


def _row_mean(x: jax.Array, stop: int) -> jax.Array:
  # an unrolled sum: XLA's CPU backend reduces over a small leading axis slowly
  total = x[0].astype(jnp.promote_types(x.dtype, jnp.float32))
  for i in range(1, stop):
    total = total + x[i]
  return (total / stop).astype(x.dtype)


def _nnx_kinds(X: PyTree) -> set[str] | None:
  """Variable types inside a single ``flax.nnx.State`` X, or None if X is not one."""
  if type(X).__name__ != "State" or "flax" not in type(X).__module__:
    return None
  kinds = set()

  def visit(x):
    kinds.add(type(x).__name__)
    return x

  jax.tree.map(visit, X, is_leaf=lambda x: "flax" in type(x).__module__ and x is not X)
  return kinds


def check_nnx_state(X: PyTree) -> None:
  """Warns when X is one ``nnx.split`` state holding both parameters and BatchNorm statistics.

  With one state, a loss that calls ``nnx.merge(graphdef, state)(x)`` updates
  the running statistics only inside its traced copy of the module: the
  update is dropped and the statistics keep their initial values (mean 0,
  variance 1), which silently wrecks the evaluation. The recipe that keeps
  them: split by variable type, ``nnx.split(model, nnx.Param, nnx.BatchStat)``,
  into ``{"params": ..., "batch_stats": ...}``, return the fresh statistics
  from the loss and write them back
  (:func:`coopjax.training.nnx_models.split`, ``make_loss_fn``).

  Args:
    X: stacked models (or one model).

  Examples:
    >>> import jax.numpy as jnp
    >>> from coopjax import evaluation
    >>> evaluation.check_nnx_state({"params": {"w": jnp.zeros(2)}})  # not NNX: silent
  """
  kinds = _nnx_kinds(X)
  if kinds and "BatchStat" in kinds and "Param" in kinds:
    warnings.warn(
      "X is a single nnx.State holding both nnx.Param and nnx.BatchStat variables. A loss that "
      "calls nnx.merge(graphdef, state) updates the BatchNorm statistics only in its traced "
      "copy, so they are dropped and stay at their initial values. Split by type instead: "
      "graphdef, variables = coopjax.training.nnx_models.split(model) (nnx.split(model, "
      "nnx.Param, nnx.BatchStat) into {'params', 'batch_stats'}), build the loss with "
      "nnx_models.make_loss_fn(graphdef, ...) and pass merge_aux=models.merge_batch_stats to "
      "make_step (see examples/nnx_batchnorm.py).",
      UserWarning,
      stacklevel=3,
    )


def evaluation_model(
  X: PyTree,
  spec: Any,
  opt_state: Any = None,
  *,
  mix_mask: PyTree | None = None,
  num_aux: int | None = None,
) -> PyTree:
  r"""The one model to evaluate from the stacked models X.

  Mixed leaves are averaged over all m + v rows (paper eq. 13); leaves kept
  per worker (``mix_mask`` False, e.g. BatchNorm statistics) over the m
  workers only, so an auxiliary row's never-updated copy (EASGD's anchor keeps
  its initial statistics) never enters an evaluation:

  .. math::

     \bar x^{(\ell)} = \tfrac{1}{m+v}\textstyle\sum_{i \le m+v} X^{(\ell)}_i
     \text{ if } \ell \text{ is mixed, else } \tfrac1m \textstyle\sum_{i \le m} X^{(\ell)}_i .

  A reduction still in flight (non-blocking algorithms) is completed first
  with ``tx.settle(X, opt_state)``. When ``opt_state`` carries a live mask
  (:func:`coopjax.with_live_mask`), the masked workers' rows are left out.

  Args:
    X: stacked models, leading axis m + v on every leaf (unsharded, or global
      arrays sharded over devices).
    spec: the coopjax transformation that trains X (its ``layout``,
      ``mix_mask`` and ``settle`` are used), or a :class:`coopjax.Layout`, or
      the number of workers m (then give ``num_aux`` and ``mix_mask``).
    opt_state: the transformation's state; needed for algorithms whose mixes
      overlap the next steps (``tx.overlaps``), whose rows are only final once
      the pending reduction is settled.
    mix_mask: a pytree prefix of one model with booleans (False = kept per
      worker); by default the transformation's own ``tx.mix_mask``.
    num_aux: v, only with an int ``spec``.

  Returns:
    One model (X's structure without the leading axis).

  Raises:
    ValueError: if ``mix_mask`` disagrees with the transformation's, does not
      fit X, or the transformation overlaps its mixes and ``opt_state`` is
      missing.

  Examples:
    EASGD with a kept-local leaf ``s``: the anchor's row (last) is excluded
    from ``s`` only.

    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.easgd(optax.sgd(0.1), tau=2, alpha=0.25, num_workers=2,
    ...                    mix_mask={"w": True, "s": False})
    >>> X = {"w": jnp.array([1.0, 2.0, 6.0]), "s": jnp.array([1.0, 3.0, 100.0])}
    >>> u = coopjax.evaluation_model(X, tx)
    >>> float(u["w"]), float(u["s"])
    (3.0, 2.0)

  References:
    Wang & Joshi, Cooperative SGD (JMLR 2021), eq. 13.
  """
  layout = layout_of(spec, num_aux)
  m, v = layout
  own_mask = getattr(spec, "mix_mask", None)
  if mix_mask is None:
    mix_mask = own_mask
  elif own_mask is not None and (
    jax.tree.structure(mix_mask) != jax.tree.structure(own_mask)
    or jax.tree.leaves(mix_mask) != jax.tree.leaves(own_mask)
  ):
    raise ValueError(
      "mix_mask disagrees with the transformation's own mix_mask; drop the mix_mask argument: "
      "the transformation knows which leaves it mixes."
    )
  check_nnx_state(X)
  rows = num_rows(X)
  if rows != layout.num_rows:
    raise ValueError(
      f"X has {rows} rows but the layout has {layout.num_rows} (num_workers={m}, num_aux={v}); "
      "pass the transformation that trains X."
    )
  if opt_state is not None and hasattr(spec, "settle"):
    X = spec.settle(X, opt_state)
  elif getattr(spec, "overlaps", False):
    raise ValueError(
      "this algorithm's mixes overlap the next local steps: pass opt_state "
      "(evaluation_model(X, tx, opt_state)) so the reduction in flight is completed first."
    )
  flags = mixing.leaf_flags(mixing.check_mask(mix_mask, jax.tree.map(lambda x: x[0], X)), X)
  leaves, treedef = jax.tree.flatten(X)
  live_state = None if opt_state is None else find_live_state(opt_state)
  if live_state is not None:  # masked workers (frozen, maybe non-finite) are left out
    keep = jnp.concatenate([jnp.asarray(live_state.live, bool), jnp.ones((v,), bool)])
    out = [
      _live_row_mean(x, keep if mixed else keep[:m]) for x, mixed in zip(leaves, flags, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)
  out = [_row_mean(x, rows if mixed else m) for x, mixed in zip(leaves, flags, strict=True)]
  return jax.tree.unflatten(treedef, out)


def _live_row_mean(x, keep):
  """The mean of the rows of x where ``keep`` holds (selected, never multiplied)."""
  x = x[: keep.shape[0]]
  wide = keep.reshape(keep.shape + (1,) * (x.ndim - 1))
  total = jnp.sum(jnp.where(wide, x, jnp.zeros_like(x)), axis=0)
  return (total / jnp.sum(keep).astype(total.dtype)).astype(x.dtype)
