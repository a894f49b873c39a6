"""EASGD with a flax NNX BatchNorm model: split by variable type, stack, mask, merge, evaluate.

  python examples/nnx_batchnorm.py              # digits, m = 4, ~20 s on a CPU

The NNX recipe (:mod:`coopjax.training.nnx_models`):

1. ``nnx.split(model, nnx.Param, nnx.BatchStat)`` into
   ``{"params": ..., "batch_stats": ...}`` (``nnx_models.split``), so the
   linen helpers ``params_mask`` and ``merge_batch_stats`` apply;
2. stack it with ``coopjax.replicate``;
3. keep the statistics per worker: ``mix_mask=models.params_mask(variables)``;
4. the loss merges the module in training mode and returns its new
   statistics (``nnx_models.make_loss_fn``); ``merge_aux`` writes them back;
5. evaluate ``coopjax.evaluation_model(X, tx, opt_state)`` merged in
   evaluation mode (``nnx_models.evaluate``).

Not like this: one state from ``nnx.split(model)`` with ``nnx.merge`` inside the
loss drops every update of the running statistics (they stay at mean 0,
variance 1); ``coopjax.evaluation_model`` warns when it sees such a state.
"""

from __future__ import annotations

import argparse

import optax
from flax import nnx

import coopjax
from coopjax.training import data
from coopjax.training import models
from coopjax.training import nnx_models


class MLP(nnx.Module):
  """64 -> 64 (BatchNorm, ReLU) -> 10, as ``models.MLP(features=(64,), norm="batch")``."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 64, rngs=rngs)
    self.bn = nnx.BatchNorm(64, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.out(nnx.relu(self.bn(self.hidden(x))))


def main(argv=None) -> dict:

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--workers", type=int, default=4)
  args = parser.parse_args(argv)
  m = args.workers

  ds = data.load_dataset("digits")
  graphdef, variables = nnx_models.split(MLP(nnx.Rngs(0)))

  tx = coopjax.easgd(
    optax.sgd(0.1), tau=4, alpha=0.2, num_workers=m, mix_mask=models.params_mask(variables)
  )
  step = coopjax.make_step(
    nnx_models.make_loss_fn(graphdef), tx, has_aux=True, merge_aux=models.merge_batch_stats
  )
  X = coopjax.replicate(variables, m, tx.layout.num_aux)
  opt_state = tx.init(X)
  shards = data.split_iid(len(ds.train_y), m, seed=0)
  batches = data.make_worker_batches(ds.train_x, ds.train_y, shards, 32, seed=0)
  for _ in range(args.steps):
    X, opt_state, metrics = step(X, opt_state, next(batches))

  u = coopjax.evaluation_model(X, tx, opt_state)
  result = nnx_models.evaluate(graphdef, u, ds.test_x, ds.test_y)
  print(f"NNX + BatchNorm, EASGD: test accuracy {result['accuracy']:.4f}")
  return result


if __name__ == "__main__":
  main()
