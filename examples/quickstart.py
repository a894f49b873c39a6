"""Quick start: the four classic algorithms on scikit-learn's digits, on the CPU.

  python examples/quickstart.py

Trains softmax regression on the 1797 8×8 digits shipped with scikit-learn
(no download), split across m = 8 workers, with fully synchronous SGD, local
SGD (τ = 8), EASGD (τ = 4, α = 0.1) and D-PSGD on a ring, and prints the
averaged model's training loss and test accuracy.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import coopjax
from coopjax import topology


def loss_fn(params, batch):
  x, y = batch
  logits = x @ params["w"] + params["b"][None, :]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=8)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--lr", type=float, default=0.2)
  args = parser.parse_args(argv)
  m = args.workers

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  rng = np.random.default_rng(0)
  perm = rng.permutation(len(x))
  test, train = perm[:360], perm[360:]
  shards = np.array_split(rng.permutation(train), m)

  algorithms = {
    "sync": coopjax.sync_sgd(optax.sgd(args.lr), num_workers=m),
    "local_sgd(tau=8)": coopjax.local_sgd(optax.sgd(args.lr), tau=8, num_workers=m),
    "easgd(tau=4)": coopjax.easgd(optax.sgd(args.lr), tau=4, alpha=0.1, num_workers=m),
    "dpsgd(ring)": coopjax.dpsgd(optax.sgd(args.lr), W=topology.ring(m)),
  }
  params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros((10,))}
  print(f"{'algorithm':<18} {'train loss':>10} {'test acc':>9}")
  for name, tx in algorithms.items():
    X = coopjax.replicate(params, m, tx.layout.num_aux)
    state = tx.init(X)
    step = coopjax.make_step(loss_fn, tx, num_workers=m, donate=True)
    batch_rng = np.random.default_rng(1)
    for _ in tqdm(range(args.steps), desc=name, leave=False):
      idx = np.stack([batch_rng.choice(s, args.batch) for s in shards])
      X, state, metrics = step(X, state, (jnp.asarray(x[idx]), jnp.asarray(y[idx])))
    u = coopjax.evaluation_model(X, tx)  # the averaged model of eq. 13
    train_loss = float(loss_fn(u, (x[train], y[train])))
    acc = float(jnp.mean(jnp.argmax(x[test] @ u["w"] + u["b"][None, :], -1) == y[test]))
    print(f"{name:<18} {train_loss:>10.4f} {acc:>9.3f}")
  jax.block_until_ready(X)


if __name__ == "__main__":
  main()
