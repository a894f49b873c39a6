"""Benchmark of the sharded worker axis: the local step and structured mixing.

Two comparisons, side by side in one run:

1. The local step (an off-step of local SGD: gradients and the local update,
   no mixing) of ``coopjax.make_step(..., mesh=mesh)`` against a hand-written
   ``jax.shard_map`` SGD step on the same model and data (target: ≤ 1.05×).
2. Mixing alone, the dense einsum with W under ``jax.jit`` on the sharded X
   (XLA lowers it to an all-gather) against the structured lowering of
   :mod:`coopjax.collectives` (ring: collective-permutes; J: one all-reduce),
   for m ∈ {8, 16, 64, 256} workers of a small model (target: ≥ 10× at m = 64).

Runs on all local devices: on a CPU host, fake N devices with ``--devices N``
(default 8); on one GPU all m workers share the device. Every step is waited
for (``jax.block_until_ready``): on fake CPU devices, loops of unblocked steps
with collectives deadlock.

Usage::

  python benchmarks/bench_devices.py --out results.json            # all devices
  python benchmarks/bench_devices.py --quick                       # smaller, faster
  python benchmarks/bench_devices.py --devices 8 --out benchmarks/results/devices_cpu8.json
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
  p.add_argument("--out", default=None, help="JSON output path (default: benchmarks/results/)")
  p.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
  add_devices_flag(p)
  p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else parse_args([])
if __name__ == "__main__":
  force_host_devices(ARGS.devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import timeit_pair  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import coopjax  # noqa: E402
from coopjax import collectives  # noqa: E402
from coopjax import mixing  # noqa: E402
from coopjax import sharding  # noqa: E402
from coopjax import topology  # noqa: E402

AX = coopjax.WORKER_AXIS
LR = 0.01


# Models, in plain JAX so that both steps run exactly the same computation.
def mlp_init(key, sizes=(784, 256, 10)):
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jax.random.normal(sub, (a, b), jnp.float32) / np.sqrt(a)
    params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
  return params


def mlp_loss(params, batch):
  x, y = batch
  n = len([k for k in params if k.startswith("w")])
  for i in range(n):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, y))


def cnn_init(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "c1": jax.random.normal(k1, (3, 3, 3, 16), jnp.float32) * 0.2,
    "c2": jax.random.normal(k2, (3, 3, 16, 32), jnp.float32) * 0.1,
    "d": jax.random.normal(k3, (8 * 8 * 32, 10), jnp.float32) * 0.01,
  }


def cnn_loss(params, batch):
  x, y = batch
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.nn.relu(
    jax.lax.conv_general_dilated(x, params["c1"], (2, 2), "SAME", dimension_numbers=dn)
  )
  x = jax.nn.relu(
    jax.lax.conv_general_dilated(x, params["c2"], (2, 2), "SAME", dimension_numbers=dn)
  )
  logits = x.reshape(x.shape[0], -1) @ params["d"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def make_data(model, m, per_worker, seed=0):
  rng = np.random.default_rng(seed)
  if model == "mlp":
    x = rng.normal(size=(m, per_worker, 784)).astype(np.float32)
  else:
    x = rng.normal(size=(m, per_worker, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 10, size=(m, per_worker)).astype(np.int32)
  return x, y


def hand_written_step(loss_fn, mesh, block):
  """A plain shard_map SGD step: every device updates its own workers, no collectives."""

  def body(X, batch):
    vg = jax.value_and_grad(loss_fn)
    if block == 1:
      squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
      loss, g = vg(squeeze(X), squeeze(batch))
      loss, g = loss[None], jax.tree.map(lambda a: a[None], g)
    else:
      loss, g = jax.vmap(vg)(X, batch)
    return jax.tree.map(lambda p, d: p - LR * d, X, g), loss

  mapped = jax.shard_map(body, mesh=mesh, in_specs=(P(AX), P(AX)), out_specs=(P(AX), P(AX)))
  return jax.jit(mapped, donate_argnums=0)


def bench_local_step(model, m, mesh, reps, per_worker=32):
  D = sharding.num_devices(mesh)
  init, loss_fn = (mlp_init, mlp_loss) if model == "mlp" else (cnn_init, cnn_loss)
  params = init(jax.random.key(0))
  batch = coopjax.shard_batch(make_data(model, m, per_worker), mesh)

  # coopjax: local SGD whose period is never reached, so every timed step is an off-step.
  tx = coopjax.local_sgd(optax.sgd(LR), tau=10**9, num_workers=m)
  X = coopjax.shard(coopjax.replicate(params, m), mesh)
  state = sharding.init(tx, X, mesh)
  step = coopjax.make_step(loss_fn, tx, mesh=mesh, donate=True)
  hand = hand_written_step(loss_fn, mesh, m // D)
  X_hand = coopjax.shard(coopjax.replicate(params, m), mesh)
  ours, base = timeit_pair(
    lambda s: step(s[0], s[1], batch)[:2],
    (X, state),
    lambda s: hand(s, batch)[0],
    X_hand,
    reps,
    warmup=3,
  )
  return {
    "model": model,
    "num_workers": m,
    "workers_per_device": m // D,
    "per_worker_batch": per_worker,
    "coopjax_ms": ours * 1e3,
    "shard_map_sgd_ms": base * 1e3,
    "ratio": ours / base,
    "target": "<= 1.05",
    "met": bool(ours / base <= 1.05),
  }


def bench_mixing(name, m, mesh, reps, num_params=10_000):
  D = sharding.num_devices(mesh)
  W = topology.ring(m) if name == "ring" else topology.complete(m)
  rng = np.random.default_rng(m)
  X = coopjax.shard({"w": rng.normal(size=(m, num_params)).astype(np.float32)}, mesh)
  spec = NamedSharding(sharding._auto_mesh(mesh), P(AX))

  dense = jax.jit(lambda x: mixing.mix_dense(x, W), in_shardings=spec, out_shardings=spec)
  ctx = mixing.ShardContext(AX, D, m, 0)

  def body(x):
    with mixing.sharded(ctx):
      return mixing.dense_mixer(W)(x)

  structured = jax.jit(
    jax.shard_map(body, mesh=sharding._auto_mesh(mesh), in_specs=P(AX), out_specs=P(AX))
  )
  # Same numbers from both (the dense einsum is the reference).
  np.testing.assert_allclose(
    np.asarray(dense(X)["w"]), np.asarray(structured(X)["w"]), rtol=1e-4, atol=1e-5
  )
  t_dense, t_struct = timeit_pair(dense, X, structured, X, reps, warmup=3)
  rep_dense = coopjax.comm_report(dense, X)
  rep_struct = coopjax.comm_report(structured, X)
  return {
    "W": name,
    "num_workers": m,
    "workers_per_device": m // D,
    "params_per_worker": num_params,
    "plan": collectives.plan_kind(W, ctx),
    "dense_ms": t_dense * 1e3,
    "structured_ms": t_struct * 1e3,
    "speedup": t_dense / t_struct,
    "dense_collectives": sorted(set(rep_dense.kinds())),
    "dense_bytes": rep_dense.total_bytes,
    "structured_collectives": sorted(set(rep_struct.kinds())),
    "structured_bytes": rep_struct.total_bytes,
  }


def markdown(results):
  lines = [
    f"Device: {results['device']} × {results['num_devices']}, jax {results['jax']}"
    f"{' (quick)' if results['quick'] else ''}.",
    "",
    "| local step | m | workers/device | coopjax (ms) | hand-written shard_map SGD (ms) | ratio (target ≤ 1.05) |",
    "|---|---|---|---|---|---|",
  ]
  for r in results["local_step"]:
    lines.append(
      f"| {r['model']} | {r['num_workers']} | {r['workers_per_device']} | {r['coopjax_ms']:.2f} "
      f"| {r['shard_map_sgd_ms']:.2f} | {r['ratio']:.2f}{'' if r['met'] else ' (missed)'} |"
    )
  lines += [
    "",
    "| mixing | m | workers/device | dense einsum (ms) | structured (ms) | speedup | dense lowers to | structured lowers to |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results["mixing"]:
    lines.append(
      f"| {r['W']} | {r['num_workers']} | {r['workers_per_device']} | {r['dense_ms']:.3f} "
      f"| {r['structured_ms']:.3f} | {r['speedup']:.1f}× | {', '.join(r['dense_collectives']) or 'none'} "
      f"({r['dense_bytes']} B) | {', '.join(r['structured_collectives']) or 'none'} ({r['structured_bytes']} B) |"
    )
  return "\n".join(lines)


def main(args):
  devices = jax.devices()
  mesh = coopjax.worker_mesh()
  D = len(devices)
  reps = args.reps or (5 if args.quick else 20) * (1 if devices[0].platform == "cpu" else 5)
  results = {
    "device": devices[0].device_kind,
    "platform": devices[0].platform,
    "num_devices": D,
    "jax": jax.__version__,
    "host": platform.node(),
    "quick": bool(args.quick),
    "reps": reps,
    "local_step": [],
    "mixing": [],
  }
  m_local = [D] if D > 1 else [8]
  if not args.quick:
    m_local.append(2 * m_local[0])
  for model in ("mlp", "cnn"):
    for m in m_local:
      r = bench_local_step(model, m, mesh, reps)
      print(
        f"local step {model:>4} m={m:<4} coopjax {r['coopjax_ms']:8.2f} ms   "
        f"shard_map SGD {r['shard_map_sgd_ms']:8.2f} ms   ratio {r['ratio']:.3f}",
        flush=True,
      )
      results["local_step"].append(r)
  sizes = [8, 16, 64] if args.quick else [8, 16, 64, 256]
  for name in ("ring", "complete"):
    for m in sizes:
      if m % D:
        continue
      r = bench_mixing(name, m, mesh, reps)
      print(
        f"mixing {name:>8} m={m:<4} dense {r['dense_ms']:9.3f} ms   structured "
        f"{r['structured_ms']:8.3f} ms   speedup {r['speedup']:6.1f}x   "
        f"({'/'.join(r['dense_collectives']) or 'none'} -> "
        f"{'/'.join(r['structured_collectives']) or 'none'})",
        flush=True,
      )
      results["mixing"].append(r)
  table = markdown(results)
  print()
  print(table)
  out = args.out
  if out is None:
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "results", f"devices_{results['platform']}{D}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump({**results, "markdown": table}, f, indent=2)
  print(f"\nwrote {out}")
  return results


if __name__ == "__main__":
  main(ARGS)
