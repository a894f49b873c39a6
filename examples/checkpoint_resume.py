"""Checkpoint a run halfway, restore it in fresh objects, and finish: the same iterates.

  python examples/checkpoint_resume.py

The state of a run is ``(X, opt_state)`` on the device plus the data
iterator's position on the host. :class:`coopjax.checkpoint.CheckpointManager`
saves both (arrays with orbax, the rest as JSON); restoring needs an abstract
target (the structure, shapes and dtypes), e.g. :func:`checkpoint.abstract_target`
of a freshly initialised state.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import coopjax
from coopjax import checkpoint
from coopjax.training import data
from coopjax.training import models


def main(argv=None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args(argv)
  m, half = 4, args.steps // 2

  ds = data.load_dataset("digits")
  model = models.MLP(features=(32,), num_classes=10)
  params = model.init(jax.random.key(0), jnp.zeros((1, *ds.train_x.shape[1:])))
  tx = coopjax.local_sgd(optax.sgd(0.1, momentum=0.9), tau=4, num_workers=m)
  step = coopjax.make_step(models.make_loss_fn(model), tx)
  shards = data.split_iid(len(ds.train_y), m, seed=0)

  def fresh():
    X = coopjax.replicate(params, m)
    batches = data.make_worker_batches(ds.train_x, ds.train_y, shards, 32, seed=0)
    return {"X": X, "opt_state": tx.init(X)}, batches

  def run(state, batches, steps):
    X, opt_state = state["X"], state["opt_state"]
    for _ in range(steps):
      X, opt_state, _ = step(X, opt_state, next(batches))
    return {"X": X, "opt_state": opt_state}

  # uninterrupted
  state, batches = fresh()
  straight = run(state, batches, args.steps)

  # interrupted: save after `half` steps (the state that the loop returned) ...
  directory = tempfile.mkdtemp()
  state, batches = fresh()
  state = run(state, batches, half)
  with checkpoint.CheckpointManager(directory, max_to_keep=2) as manager:
    manager.save(half, state, meta={"data": batches.state._asdict()}, force=True)

  # ... and resume in a new process's worth of fresh objects
  template, batches = fresh()
  with checkpoint.CheckpointManager(directory) as manager:
    start = manager.latest_step()
    state = manager.restore(target=checkpoint.abstract_target(template))
    batches.restore(data.IteratorState(**manager.meta()["data"]))
  resumed = run(state, batches, args.steps - start)

  diff = max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(jax.tree.leaves(straight["X"]), jax.tree.leaves(resumed["X"]), strict=True)
  )
  print(
    f"resumed at step {start} of {args.steps}: largest difference to the uninterrupted "
    f"run {diff:.1e}"
  )
  assert diff == 0.0, "the resumed run left the uninterrupted one"
  return diff


if __name__ == "__main__":
  main()
