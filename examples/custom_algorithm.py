r"""A new algorithm from ``coopjax.cooperative``: local SGD with partial averaging.

  python examples/custom_algorithm.py

Every τ steps each worker moves only part of the way to the average,

.. math::

   x_i \leftarrow (1-\beta)\, x_i + \beta\, \bar x, \qquad
   W = (1-\beta) I + \beta J ,

which is A(τ, W, 0) of the paper: one call of ``coopjax.cooperative`` with
that W. The transformation it returns describes itself (layout, what each
step sends), steps, shards and checkpoints like every built-in algorithm. The
script checks one mix against the formula above in NumPy.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import coopjax
from coopjax import topology
from coopjax.training import data
from coopjax.training import models


def partial_averaging(local, *, tau: int, beta: float, num_workers: int):
  """Local SGD whose mixes pull each worker a fraction ``beta`` toward the average."""
  W = (1.0 - beta) * np.eye(num_workers) + beta * topology.complete(num_workers)
  return coopjax.cooperative(local, tau=tau, W=W)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args(argv)
  m, tau, beta = 4, 4, 0.5

  # the rule, checked on one mixing step (zero gradients: X changes by the mix only)
  tx = partial_averaging(optax.sgd(0.1), tau=tau, beta=beta, num_workers=m)
  X = {"w": jnp.arange(m * 3, dtype=jnp.float32).reshape(m, 3)}
  state = tx.init(X)
  zero = jax.tree.map(jnp.zeros_like, X)
  Y = X
  for _ in range(tau):
    updates, state = tx.update(zero, state, Y)
    Y = optax.apply_updates(Y, updates)
  x = np.asarray(X["w"])
  np.testing.assert_allclose(Y["w"], (1 - beta) * x + beta * x.mean(0), rtol=1e-6)
  print(f"layout {tx.layout}; step {tau} sends {tx.comm(tau, state)}")

  ds = data.load_dataset("digits")
  model = models.MLP(features=(32,), num_classes=10)
  params = model.init(jax.random.key(0), jnp.zeros((1, *ds.train_x.shape[1:])))
  step = coopjax.make_step(models.make_loss_fn(model), tx)
  X = coopjax.replicate(params, m)
  opt_state = tx.init(X)
  batches = data.make_worker_batches(
    ds.train_x, ds.train_y, data.split_iid(len(ds.train_y), m, seed=0), 32, seed=0
  )
  for _ in range(args.steps):
    X, opt_state, _ = step(X, opt_state, next(batches))
  result = models.evaluate(model, coopjax.evaluation_model(X, tx), ds.test_x, ds.test_y)
  print(f"partial averaging (beta = {beta}): test accuracy {result['accuracy']:.4f}")
  return result


if __name__ == "__main__":
  main()
