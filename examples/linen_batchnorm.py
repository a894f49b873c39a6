"""EASGD with a linen BatchNorm model: statistics kept per worker, evaluated right.

  python examples/linen_batchnorm.py            # digits, m = 4, ~20 s on a CPU

The BatchNorm running statistics are not trained by the gradient: each worker
keeps its own (``mix_mask=params_mask(variables)``) and writes them back after
every step (``merge_aux=merge_batch_stats``). The model to evaluate is
``coopjax.evaluation_model(X, tx, opt_state)``: the parameters averaged over
all rows (paper eq. 13), the statistics over the workers only (the anchor's
copy never moves from its initial values).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import coopjax
from coopjax.training import data
from coopjax.training import models


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--workers", type=int, default=4)
  args = parser.parse_args(argv)
  m = args.workers

  ds = data.load_dataset("digits")  # 8x8 digits shipped with scikit-learn
  model = models.MLP(features=(64,), num_classes=10, norm="batch")
  variables = model.init(jax.random.key(0), jnp.zeros((1, *ds.train_x.shape[1:])))

  tx = coopjax.easgd(
    optax.sgd(0.1), tau=4, alpha=0.2, num_workers=m, mix_mask=models.params_mask(variables)
  )
  step = coopjax.make_step(
    models.make_bn_loss_fn(model), tx, has_aux=True, merge_aux=models.merge_batch_stats
  )
  X = coopjax.replicate(variables, m, tx.layout.num_aux)
  opt_state = tx.init(X)
  shards = data.split_iid(len(ds.train_y), m, seed=0)
  batches = data.make_worker_batches(ds.train_x, ds.train_y, shards, 32, seed=0)
  for _ in range(args.steps):
    X, opt_state, metrics = step(X, opt_state, next(batches))

  u = coopjax.evaluation_model(X, tx, opt_state)
  result = models.evaluate(model, u, ds.test_x, ds.test_y)
  print(f"linen + BatchNorm, EASGD: test accuracy {result['accuracy']:.4f}")
  return result


if __name__ == "__main__":
  main()
