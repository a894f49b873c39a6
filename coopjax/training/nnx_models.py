r"""The flax NNX recipe, BatchNorm included: split by variable type, stack, mask, merge, evaluate.

coopjax works on plain pytrees; NNX gives one with ``nnx.split``. A model with
BatchNorm needs its running statistics split apart from its parameters, into
the same ``{"params": ..., "batch_stats": ...}`` form as linen variables, so
that :func:`coopjax.models.params_mask` and
:func:`coopjax.models.merge_batch_stats` apply unchanged:

1. ``graphdef, variables = split(model)``
   (``nnx.split(model, nnx.Param, nnx.BatchStat)``);
2. ``X = coopjax.replicate(variables, m, num_aux)``;
3. ``tx = coopjax.easgd(local, tau=..., mix_mask=coopjax.models.params_mask(variables))``
   (the statistics stay per worker);
4. ``loss_fn = make_loss_fn(graphdef)``: merges the module in training mode and
   returns ``(loss, new_batch_stats)``; ``coopjax.make_step(loss_fn, tx,
   has_aux=True, merge_aux=coopjax.models.merge_batch_stats)`` writes every
   worker's fresh statistics into its row;
5. evaluate :func:`coopjax.evaluation_model` ``(X, tx, opt_state)`` with
   :func:`evaluate` (the module merged in evaluation mode, running statistics).

One ``nnx.split(model)`` state with ``nnx.merge`` in the loss silently drops
the statistics' updates (they stay at mean 0, variance 1);
:func:`coopjax.evaluation.check_nnx_state` warns about it.

Examples:
  >>> import jax, jax.numpy as jnp, optax, coopjax
  >>> from flax import nnx
  >>> from coopjax.training import nnx_models
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.dense = nnx.Linear(4, 8, rngs=rngs)
  ...     self.bn = nnx.BatchNorm(8, rngs=rngs)
  ...     self.out = nnx.Linear(8, 3, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.out(nnx.relu(self.bn(self.dense(x))))
  >>> graphdef, variables = nnx_models.split(Net(nnx.Rngs(0)))
  >>> sorted(variables)
  ['batch_stats', 'params']
  >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=2,
  ...                        mix_mask=coopjax.models.params_mask(variables))
  >>> step = coopjax.make_step(nnx_models.make_loss_fn(graphdef), tx, has_aux=True,
  ...                          merge_aux=coopjax.models.merge_batch_stats)
  >>> X = coopjax.replicate(variables, num_workers=2)
  >>> opt_state = tx.init(X)
  >>> batch = {"image": jnp.ones((2, 5, 4)), "label": jnp.zeros((2, 5), jnp.int32)}
  >>> X, opt_state, _ = step(X, opt_state, batch)
  >>> bool(jnp.all(X["batch_stats"]["bn"]["mean"][...] != 0))  # statistics updated
  True
  >>> u = coopjax.evaluation_model(X, tx, opt_state)
  >>> sorted(nnx_models.evaluate(graphdef, u, jnp.ones((5, 4)), jnp.zeros(5, jnp.int32)))
  ['accuracy', 'loss']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coopjax.training import models

PyTree = Any

__all__ = ["split", "merge", "make_loss_fn", "evaluate"]


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  """``nnx.split`` by variable type: ``(graphdef, {"params": ..., "batch_stats": ...})``.

  The graph definition is taken in training mode (BatchNorm normalises with
  the minibatch's statistics and updates its running averages); :func:`merge`
  switches to evaluation mode.

  Args:
    model: an NNX module whose state is ``nnx.Param`` and (optionally)
      ``nnx.BatchStat`` variables.

  Returns:
    The graph definition and the variables dict (``"batch_stats"`` only when
    the model has BatchNorm statistics).

  Raises:
    ValueError: if the model holds other variables (e.g. the ``nnx.RngState``
      of Dropout), which this recipe does not carry.
  """
  model.train()
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    kinds = sorted({type(x).__name__ for x in jax.tree.leaves(rest, is_leaf=_is_variable)})
    raise ValueError(
      f"the model holds variables other than nnx.Param and nnx.BatchStat ({kinds}); "
      "remove them (e.g. pass deterministic Dropout) or split them yourself and keep them "
      "outside X."
    )
  variables = {"params": params}
  if jax.tree.leaves(batch_stats):
    variables["batch_stats"] = batch_stats
  return graphdef, variables


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def merge(graphdef: nnx.GraphDef, variables: dict, *, train: bool = False) -> nnx.Module:
  """One module from ``variables`` (``{"params", "batch_stats"?}``), in evaluation mode by default."""
  if not (isinstance(variables, dict) and "params" in variables):
    raise ValueError(
      "variables must be {'params': ..., 'batch_stats': ...} from coopjax.training.nnx_models."
      "split(model)."
    )
  parts = [variables["params"]]
  if "batch_stats" in variables:
    parts.append(variables["batch_stats"])
  module = nnx.merge(graphdef, *parts)
  if train:
    module.train()
  else:
    module.eval()
  return module


def make_loss_fn(
  graphdef: nnx.GraphDef,
  loss: Callable[[jax.Array, jax.Array], jax.Array] = models.cross_entropy,
  *,
  image_key: str = "image",
  label_key: str = "label",
) -> Callable[[dict, dict], tuple[jax.Array, PyTree]]:
  r"""``loss_fn(variables, batch) -> (loss, new_batch_stats)`` for one worker.

  The module is merged in training mode and called on ``batch[image_key]``;
  its updated running statistics are returned as the auxiliary output (an
  empty dict for a model without BatchNorm). Use with
  ``coopjax.make_step(loss_fn, tx, has_aux=True,
  merge_aux=coopjax.models.merge_batch_stats)``. The gradient with respect to
  the statistics is zero: they change only through ``merge_aux``.

  Args:
    graphdef: from :func:`split`.
    loss: ``loss(logits, labels) -> scalar`` (default: mean cross-entropy).
    image_key: batch entry holding the inputs.
    label_key: batch entry holding the labels.

  Returns:
    The loss function.
  """

  def loss_fn(variables, batch):
    module = merge(graphdef, variables, train=True)
    logits = module(batch[image_key])
    value = loss(logits, batch[label_key])
    new_stats = nnx.state(module, nnx.BatchStat) if "batch_stats" in variables else {}
    return value, new_stats

  return loss_fn


def evaluate(
  graphdef: nnx.GraphDef, variables: dict, x: np.ndarray, y: np.ndarray, batch_size: int = 500
) -> dict[str, float]:
  """Loss and accuracy of one model (running statistics, evaluation mode) on ``(x, y)``.

  Args:
    graphdef: from :func:`split`.
    variables: one model, e.g. :func:`coopjax.evaluation_model` of X.
    x: inputs ``[N, ...]``.
    y: integer labels ``[N]``.
    batch_size: evaluation batch size.

  Returns:
    ``{"loss": mean cross-entropy, "accuracy": fraction correct}`` as floats.
  """
  x, y = np.asarray(x), np.asarray(y)
  if len(y) == 0 or x.shape[0] != len(y):
    raise ValueError(f"x and y must hold the same positive number of examples, got {x.shape}.")

  @jax.jit
  def batch_sums(variables, xb, yb):
    logits = merge(graphdef, variables)(xb)
    losses = models.cross_entropy(logits, yb) * len(yb)
    return losses, jnp.sum(jnp.argmax(logits, -1) == yb)

  total, correct = 0.0, 0.0
  for start in range(0, len(y), batch_size):
    loss_sum, hits = batch_sums(
      variables, x[start : start + batch_size], y[start : start + batch_size]
    )
    total += float(loss_sum)
    correct += float(hits)
  return {"loss": total / len(y), "accuracy": correct / len(y)}
