"""Cooperative SGD with your own graph: two cliques joined by one edge (a barbell).

  python examples/custom_topology.py

Any connected undirected graph gives a symmetric doubly stochastic W with
Metropolis–Hastings weights (``topology.from_adjacency``); ``topology.zeta``
is its second-largest eigenvalue modulus, which sets the network error of the
paper's bound (larger ζ: slower consensus). ``coopjax.cooperative(local, tau=tau,
W=W)`` mixes with it every τ steps; the transformation says what one mix sends
(``tx.comm``).
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


def barbell(half: int) -> np.ndarray:
  """Adjacency of two cliques of ``half`` nodes joined by the edge (half-1, half)."""
  m = 2 * half
  A = np.zeros((m, m), bool)
  A[:half, :half] = A[half:, half:] = True
  A[half - 1, half] = A[half, half - 1] = True
  np.fill_diagonal(A, False)
  return A


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args(argv)

  W = topology.from_adjacency(barbell(4))  # m = 8
  m = W.shape[0]
  topology.validate(W)  # symmetric, doubly stochastic, non-negative
  print(
    f"barbell of {m} nodes: zeta = {topology.zeta(W):.3f} (ring: "
    f"{topology.zeta(topology.ring(m)):.3f}, complete: 0)"
  )

  ds = data.load_dataset("digits")
  model = models.MLP(features=(32,), num_classes=10)
  params = model.init(jax.random.key(0), jnp.zeros((1, *ds.train_x.shape[1:])))
  tx = coopjax.cooperative(optax.sgd(0.1), tau=2, W=W)
  print("one mix sends:", tx.comm(2, None))
  step = coopjax.make_step(models.make_loss_fn(model), tx)
  X = coopjax.replicate(params, m)
  opt_state = tx.init(X)
  batches = data.make_worker_batches(
    ds.train_x, ds.train_y, data.split_iid(len(ds.train_y), m, seed=0), 32, seed=0
  )
  for _ in range(args.steps):
    X, opt_state, metrics = step(X, opt_state, next(batches))
  result = models.evaluate(model, coopjax.evaluation_model(X, tx), ds.test_x, ds.test_y)
  print(
    f"consensus distance {float(metrics['consensus_distance']):.2e}, "
    f"test accuracy {result['accuracy']:.4f}"
  )
  return result


if __name__ == "__main__":
  main()
