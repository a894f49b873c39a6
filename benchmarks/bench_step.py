"""Benchmark of the cooperative step: metrics, overhead against hand-written steps, DrJAX.

Measured side by side in one run, each pair timed alternately (``timeit_pair``),
repeated ``--rounds`` times so that the spread on a shared machine shows:

1. Plain step (one device, MLP 784-256-10, m = 4 workers, batch 32 per
   worker, local SGD τ = 4, plain SGD), every call waited for:

   * ``defaults / no_metrics``: ``coopjax.make_step(loss_fn, tx)`` with its
     default metrics (loss, consensus distance, averaged-gradient norm)
     against ``with_loss=with_consensus=with_grad_norm=False``, over whole
     periods of τ steps (τ − 1 off-steps and one mixing step) (target ≤ 1.10);
   * ``local_step / hand``: the local step (an off-step: a period that is
     never reached) without reducing metrics against a hand-written
     ``jax.vmap`` local-SGD step (``lax.cond(k % τ == 0, mean, identity)``)
     on the same data (target ≤ 1.05).

2. Sharded step on D fake CPU devices (``--devices``, default 8; m = 8, one
   worker per device), with the documented usage (``coopjax.shard``,
   ``coopjax.sharding.init``, ``coopjax.shard_batch``, ``donate=True``, no
   reducing metrics) against a DrJAX local-SGD step (``drjax.map_fn`` of the
   SGD step over the placed workers, ``drjax.reduce_mean`` and
   ``drjax.broadcast`` on mixing steps) on the same placed data
   (target: coopjax at least as fast, ratio ≤ 1.0); and the same step fed an
   unplaced NumPy batch (placed by the step's input sharding) against
   ``shard_batch`` of the same NumPy batch before every call.

   The plain part also times ``log_every=40`` (the reducing metrics on every
   40th step only) against no metrics.

Usage::

  python benchmarks/bench_step.py                      # writes benchmarks/results/step_cpu.json
  python benchmarks/bench_step.py --rounds 3 --reps 50 --out /tmp/step.json
  python benchmarks/bench_step.py --skip-sharded       # plain step only
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from _devices import add_devices_flag
from _devices import force_host_devices


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--out", default=None, help="JSON output (default benchmarks/results/step_cpu.json)"
  )
  p.add_argument("--rounds", type=int, default=5, help="repetitions of every comparison")
  p.add_argument("--reps", type=int, default=40, help="timed calls per measurement")
  add_devices_flag(p, help="fake CPU devices for the sharded part")
  p.add_argument("--skip-sharded", action="store_true", help="plain step only")
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else parse_args([])
if __name__ == "__main__":
  force_host_devices(ARGS.devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import run_steps  # noqa: E402
from _timing import spread  # noqa: E402
from _timing import timeit_pair  # noqa: E402
from bench_devices import mlp_init  # noqa: E402
from bench_devices import mlp_loss  # noqa: E402

import coopjax  # noqa: E402

LR = 0.01
TAU = 4
PER_WORKER = 32


def make_batches(m, count, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(count, m, PER_WORKER, 784)).astype(np.float32)
  y = rng.integers(0, 10, size=(count, m, PER_WORKER)).astype(np.int32)
  return [(x[i], y[i]) for i in range(count)]


def hand_written_local_sgd(loss_fn, tau):
  """Local SGD by hand: vmapped gradients, SGD, and the average every τ steps."""
  grad = jax.vmap(jax.grad(loss_fn))

  def step(X, k, batch):
    g = grad(X, batch)
    X = jax.tree.map(lambda x, d: x - LR * d, X, g)
    k = k + 1

    def average(X):  # rows added one by one: jnp.mean(x, 0) is slow on XLA:CPU
      mean = lambda x: sum(x[i] for i in range(1, x.shape[0])) / x.shape[0] + x[0] / x.shape[0]
      return jax.tree.map(lambda x: jnp.broadcast_to(mean(x), x.shape), X)

    return jax.lax.cond(k % tau == 0, average, lambda X: X, X), k

  return jax.jit(step, donate_argnums=(0,))


def bench_plain(rounds, reps):
  m = 4
  params = mlp_init(jax.random.key(0))
  batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in make_batches(m, TAU)]
  tx = coopjax.local_sgd(optax.sgd(LR), tau=TAU, num_workers=m)
  off = dict(with_loss=False, with_consensus=False, with_grad_norm=False)
  default = coopjax.make_step(mlp_loss, tx, donate=True)
  logged = coopjax.make_step(mlp_loss, tx, donate=True, log_every=TAU * 10)
  bare = coopjax.make_step(mlp_loss, tx, donate=True, **off)
  # The local step alone: a period that is never reached, on both sides.
  never = 10**9
  local_tx = coopjax.local_sgd(optax.sgd(LR), tau=never, num_workers=m)
  local = coopjax.make_step(mlp_loss, local_tx, donate=True, **off)
  hand = hand_written_local_sgd(mlp_loss, never)

  def run(step):
    return run_steps(step, batches)

  def run_hand(s):
    X, k = s
    for batch in batches:
      X, k = hand(X, k, batch)
    return X, k

  def fresh(t=tx):
    X = coopjax.replicate(params, m)
    return X, t.init(X)

  out = {
    "defaults_over_no_metrics": [],
    "log_every_40_over_no_metrics": [],
    "local_over_hand": [],
    "ms": [],
  }
  for _ in range(rounds):
    d, n = timeit_pair(run(default), fresh(), run(bare), fresh(), reps)
    b, h = timeit_pair(
      run(local),
      fresh(local_tx),
      run_hand,
      (coopjax.replicate(params, m), jnp.zeros((), jnp.int32)),
      reps,
    )
    g, n2 = timeit_pair(run(logged), fresh(), run(bare), fresh(), reps)
    out["log_every_40_over_no_metrics"].append(g / n2)
    out["defaults_over_no_metrics"].append(d / n)
    out["local_over_hand"].append(b / h)
    per = 1e3 / TAU
    out["ms"].append(
      {"defaults": d * per, "no_metrics": n * per, "local_step": b * per, "hand": h * per}
    )
  return out


def drjax_local_sgd(loss_fn, m, tau, mesh):
  """A DrJAX local-SGD step: SGD mapped over the clients, the mean broadcast every τ steps."""
  import drjax

  grad = jax.grad(loss_fn)

  def sgd(x, batch):
    return jax.tree.map(lambda p, d: p - LR * d, x, grad(x, batch))

  @drjax.program(placements={"clients": m})
  def step(X, k, batch):
    X = drjax.map_fn(sgd, (X, batch))
    k = k + 1

    def average(X):
      return drjax.broadcast(drjax.reduce_mean(X))

    return jax.lax.cond(k % tau == 0, average, lambda X: X, X), k

  return step


class _Placed:
  """A host batch that ``coopjax.shard_batch`` places at each use."""

  def __init__(self, batch, mesh):
    self.batch, self.mesh = batch, mesh

  def get(self):
    return coopjax.shard_batch(self.batch, self.mesh)


def bench_sharded(rounds, reps):
  from jax.sharding import AxisType
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = coopjax.worker_mesh()
  D = coopjax.sharding.num_devices(mesh)
  m = D
  params = mlp_init(jax.random.key(0))
  host_batches = make_batches(m, TAU)
  batches = [coopjax.shard_batch(b, mesh) for b in host_batches]
  tx = coopjax.local_sgd(optax.sgd(LR), tau=TAU, num_workers=m)
  off = dict(with_loss=False, with_consensus=False, with_grad_norm=False)
  step = coopjax.make_step(mlp_loss, tx, mesh=mesh, donate=True, **off)

  def fresh():
    X = coopjax.shard(coopjax.replicate(params, m), mesh)
    return X, coopjax.sharding.init(tx, X, mesh)

  def run(data):
    def period(s):
      X, state = s
      for batch in data:
        batch = batch.get() if isinstance(batch, _Placed) else batch
        X, state, _ = step(X, state, batch)
        jax.block_until_ready(X)  # fake CPU devices: wait for every step
      return X, state

    return period

  out = {"coopjax_over_drjax": [], "unplaced_over_placed": [], "ms": [], "drjax": None}
  try:
    import drjax  # noqa: F401
  except ImportError as e:  # reported, not hidden
    out["drjax"] = f"not installed: {e}"
  if out["drjax"] is None:
    out["drjax"] = __import__("drjax").__version__
    # DrJAX places its "clients" on a mesh axis of that name: the same devices, renamed.
    clients = Mesh(mesh.devices, ("clients",), axis_types=(AxisType.Auto,))
    placed = NamedSharding(clients, P("clients"))
    with jax.set_mesh(clients):
      dr = jax.jit(
        drjax_local_sgd(mlp_loss, m, TAU, clients),
        in_shardings=(placed, None, placed),
        out_shardings=(placed, None),
        donate_argnums=(0,),
      )
    dr_batches = [jax.device_put(b, placed) for b in host_batches]

    def run_dr(s):
      X, k = s
      with jax.set_mesh(clients):
        for batch in dr_batches:
          X, k = dr(X, k, batch)
          jax.block_until_ready(X)
      return X, k

    def fresh_dr():
      return jax.device_put(coopjax.replicate(params, m), placed), jnp.zeros((), jnp.int32)

  for _ in range(rounds):
    row = {}
    if isinstance(out["drjax"], str) and not out["drjax"].startswith("not"):
      c, d = timeit_pair(run(batches), fresh(), run_dr, fresh_dr(), reps)
      out["coopjax_over_drjax"].append(c / d)
      row.update(coopjax=c * 1e3 / TAU, drjax=d * 1e3 / TAU)
    placing = [_Placed(b, mesh) for b in host_batches]  # shard_batch on every call
    u, p = timeit_pair(run(host_batches), fresh(), run(placing), fresh(), reps)
    out["unplaced_over_placed"].append(u / p)
    row.update(unplaced=u * 1e3 / TAU, placed=p * 1e3 / TAU)
    out["ms"].append(row)
  return out


def main():
  result = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": len(jax.devices()),
    "machine": platform.machine(),
    "rounds": ARGS.rounds,
    "reps": ARGS.reps,
    "model": "MLP 784-256-10, batch 32 per worker, local SGD tau=4, plain SGD",
  }
  plain = bench_plain(ARGS.rounds, ARGS.reps)
  result["plain_m4"] = {
    "defaults_over_no_metrics": spread(plain["defaults_over_no_metrics"]),
    "defaults_target": "<= 1.10",
    "log_every_40_over_no_metrics": spread(plain["log_every_40_over_no_metrics"]),
    "local_over_hand": spread(plain["local_over_hand"]),
    "local_target": "<= 1.05",
    "ms_per_step": plain["ms"],
  }
  print(json.dumps(result["plain_m4"], indent=1, default=float))
  if not ARGS.skip_sharded:
    sh = bench_sharded(ARGS.rounds, ARGS.reps)
    result["sharded_m8_cpu"] = {
      "drjax": sh["drjax"],
      "coopjax_over_drjax": spread(sh["coopjax_over_drjax"]) if sh["coopjax_over_drjax"] else None,
      "drjax_target": "<= 1.0",
      "unplaced_over_placed": spread(sh["unplaced_over_placed"]),
      "ms_per_step": sh["ms"],
    }
    print(json.dumps(result["sharded_m8_cpu"], indent=1, default=float))
  out = ARGS.out or os.path.join(os.path.dirname(__file__), "results", "step_cpu.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1, default=float)
  print("wrote", out)


if __name__ == "__main__":
  main()
