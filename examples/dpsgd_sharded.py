"""D-PSGD on a ring with the worker axis sharded over devices (8 fake CPU devices here).

  python examples/dpsgd_sharded.py               # m = 8 workers on 8 devices

The documented sharded usage: ``coopjax.shard`` the stacked models,
``coopjax.sharding.init`` the state, ``make_step(..., mesh=mesh)`` (a
``jax.shard_map`` step whose ring mix lowers to collective-permutes) and
``coopjax.shard_batch`` every batch. On fake CPU devices, wait for each step
(``jax.block_until_ready``): a loop that queues many steps with collectives
deadlocks XLA's CPU client. Real GPUs and TPUs do not need it.
"""

from __future__ import annotations

import os

# On a CPU, pretend to have 8 devices (must be set before jax is imported).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import coopjax  # noqa: E402
from coopjax import topology  # noqa: E402
from coopjax.training import data  # noqa: E402
from coopjax.training import models  # noqa: E402


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args(argv)

  mesh = coopjax.worker_mesh()  # a 1-D mesh over jax.devices(), axis "workers"
  m = len(jax.devices())  # one worker per device (any multiple of it works too)
  ds = data.load_dataset("digits")
  model = models.MLP(features=(64,), num_classes=10)
  params = model.init(jax.random.key(0), jnp.zeros((1, *ds.train_x.shape[1:])))

  tx = coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(m))
  X = coopjax.shard(coopjax.replicate(params, m), mesh)
  opt_state = coopjax.sharding.init(tx, X, mesh)
  step = coopjax.make_step(models.make_loss_fn(model), tx, mesh=mesh, donate=True)

  batches = data.make_worker_batches(
    ds.train_x, ds.train_y, data.split_iid(len(ds.train_y), m, seed=0), 32, seed=0
  )
  for _ in range(args.steps):
    X, opt_state, metrics = step(X, opt_state, coopjax.shard_batch(next(batches), mesh))
    jax.block_until_ready(X)  # fake CPU devices: one step in flight at a time

  u = coopjax.evaluation_model(coopjax.unshard(X, mesh, tx), tx)
  result = models.evaluate(model, u, ds.test_x, ds.test_y)
  print(
    f"D-PSGD ring, {m} workers on {len(jax.devices())} devices: "
    f"test accuracy {result['accuracy']:.4f}"
  )
  return result


if __name__ == "__main__":
  main()
