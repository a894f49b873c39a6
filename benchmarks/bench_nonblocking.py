"""Benchmark of one communication period: blocking EASGD against non-blocking EASGD.

Times ``coopjax.make_period_step`` (τ local steps and the closing mix in one
compiled program, workers sharded over the mesh) for τ ∈ {1, 4} and m = 8
workers of a small model, side by side in one run:

* ``easgd``: blocking EASGD; its all-reduce runs inside the loop's mixing
  branch, after the period's last local step.
* ``nonblocking_easgd``: the reduction of the period's starting ``pending``
  is issued before the loop (``coopjax.algorithms._nonblocking.issued_early``), so the
  compiler may run it while the workers compute.

For each program the compiled HLO is read (``coopjax.comm_report``) and the
table says where the all-reduce sits: ``entry`` (issued in the entry
computation, outside the loop and any branch: free to overlap) or ``branch``
(only inside a mixing branch, which for τ > 1 is in the loop body). The ratio is
non-blocking / blocking period time.

What the numbers can show. Overlap hides communication latency only where
there is an interconnect and asynchronous collectives: several GPUs (or
hosts) with XLA's latency-hiding scheduler. On fake CPU devices all
"devices" share the host's cores and a collective is a memory copy, and on
one GPU (D = 1) the all-reduce over one device is elided: there the ratio
measures the cost of the restructured program, not overlap. The output says
which case applies.

``--xla-overlap-flags`` adds XLA's GPU scheduling flags to ``XLA_FLAGS``
(``--xla_gpu_enable_latency_hiding_scheduler=true``; asynchronous
collectives are XLA:GPU's default, ``--xla_gpu_disable_async_collectives``
turns them off). Each flag is first tried in a subprocess and passed only if
this jaxlib accepts it: an unknown XLA flag aborts the process.

Usage::

  python benchmarks/bench_nonblocking.py --devices 8 --out benchmarks/results/nonblocking_cpu8.json
  python benchmarks/bench_nonblocking.py --xla-overlap-flags --out results.json   # GPU(s)
  python benchmarks/bench_nonblocking.py --quick                                   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys

from _devices import add_devices_flag
from _devices import force_host_devices

OVERLAP_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="JSON output path (default: print only)")
  p.add_argument("--quick", action="store_true", help="fewer repetitions, smaller batches")
  add_devices_flag(p)
  p.add_argument("--workers", type=int, default=8, help="m, the number of workers (default 8)")
  p.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="model (default mlp)")
  p.add_argument("--batch", type=int, default=None, help="per-worker batch (default 32; quick 8)")
  p.add_argument("--reps", type=int, default=None, help="timed periods per measurement")
  p.add_argument(
    "--xla-overlap-flags",
    action="store_true",
    help=f"add {' '.join(OVERLAP_FLAGS)} to XLA_FLAGS (each checked first)",
  )
  return p.parse_args(argv)


def accepted_flags(flags) -> tuple[list[str], list[str]]:
  """The XLA flags this jaxlib accepts (tried one by one in a subprocess), and the rejected."""
  ok, bad = [], []
  for flag in flags:
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""))
    code = "import jax, jax.numpy as jnp; jnp.ones(1).block_until_ready()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    (ok if run.returncode == 0 else bad).append(flag)
  return ok, bad


ARGS = parse_args() if __name__ == "__main__" else parse_args([])
FLAGS_USED, FLAGS_REJECTED = [], []
if __name__ == "__main__" and "jax" not in sys.modules:
  if ARGS.xla_overlap_flags:
    FLAGS_USED, FLAGS_REJECTED = accepted_flags(OVERLAP_FLAGS)
  force_host_devices(ARGS.devices, extra=FLAGS_USED)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import timeit_alternating  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import coopjax  # noqa: E402
from coopjax import sharding  # noqa: E402

LR, ALPHA = 0.01, 0.05


# The plain-JAX models of the device benchmark (its directory is on sys.path when run).
from bench_devices import cnn_init  # noqa: E402
from bench_devices import cnn_loss  # noqa: E402
from bench_devices import mlp_init  # noqa: E402
from bench_devices import mlp_loss  # noqa: E402

MODELS = {"mlp": (mlp_init, mlp_loss, (784,)), "cnn": (cnn_init, cnn_loss, (32, 32, 3))}


def make_batches(model, tau, m, per_worker, mesh, seed=0):
  """``[τ, m, per_worker, ...]`` inputs and labels, the worker axis sharded over the mesh."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tau, m, per_worker, *MODELS[model][2])).astype(np.float32)
  y = rng.integers(0, 10, size=(tau, m, per_worker)).astype(np.int32)
  place = NamedSharding(sharding._auto_mesh(mesh), P(None, coopjax.WORKER_AXIS))
  return jax.device_put(x, place), jax.device_put(y, place)


def placement(period, X, state, batches) -> dict:
  """Where the compiled program's all-reduces run: the entry computation or inside the loop."""
  text = period.lower(X, state, batches).compile().as_text()
  entry = re.search(r"^ENTRY\s+%([\w.\-]+)", text, re.M).group(1)
  report = coopjax.cost.report.parse_hlo(text)
  reduces = [c for c in report if c.kind == "all-reduce"]
  outside = [c for c in reduces if c.computation == entry and not c.in_branch]
  return {
    "all_reduces": len(reduces),
    "issued_outside_loop": len(outside),
    "collective_kinds": sorted({c.kind for c in report}),
    "where": "entry" if outside else ("branch" if reduces else "none"),
  }


def setup(name, tau, m, model, per_worker, mesh):
  init, loss, _ = MODELS[model]
  make = {"easgd": coopjax.easgd, "nonblocking_easgd": coopjax.nonblocking_easgd}[name]
  tx = make(optax.sgd(LR), tau=tau, alpha=ALPHA, num_workers=m)
  X = sharding.shard(coopjax.replicate(init(jax.random.key(0)), m, 1), mesh, 1)
  state = sharding.init(tx, X, mesh, 1)
  period = coopjax.make_period_step(loss, tx, mesh, tau=tau)
  batches = make_batches(model, tau, m, per_worker, mesh)
  where = placement(period, X, state, batches)
  run = lambda s: period(s[0], s[1], batches)[:2]
  return run, (X, state), where


def note(platform_name: str, D: int) -> str:
  if D == 1:
    return (
      "one device: the all-reduce over a single device moves no data, so there is no "
      "communication to hide; the ratio is the cost of the restructured program only."
    )
  if platform_name == "cpu":
    return (
      f"{D} fake CPU devices share the host's cores and have no interconnect: a collective is "
      "a memory copy done by the same cores, so overlap cannot hide latency here; the ratio is "
      "the cost of the restructured program, not a measure of overlap."
    )
  return (
    f"{D} {platform_name} devices: the early all-reduce can overlap the local steps when XLA "
    "runs collectives asynchronously and the latency-hiding scheduler is on "
    "(--xla-overlap-flags); compare runs with and without it."
  )


def main(args):
  devices = jax.devices()
  D = len(devices)
  mesh = coopjax.worker_mesh()
  m = args.workers
  if m % D:
    raise SystemExit(f"--workers {m} must be a multiple of the {D} devices.")
  on_cpu = devices[0].platform == "cpu"
  per_worker = args.batch or (8 if args.quick else 32)
  reps = args.reps or ((5 if args.quick else 20) * (1 if on_cpu else 10))
  results = {
    "benchmark": "bench_nonblocking",
    "device": devices[0].device_kind,
    "platform": devices[0].platform,
    "num_devices": D,
    "jax": jax.__version__,
    "host": platform.node(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "overlap_flags_used": FLAGS_USED,
    "overlap_flags_rejected": FLAGS_REJECTED,
    "model": args.model,
    "num_workers": m,
    "per_worker_batch": per_worker,
    "reps": reps,
    "note": note(devices[0].platform, D),
    "rows": [],
    "ratios": {},
  }
  print(
    f"{D} x {devices[0].device_kind} ({devices[0].platform}), m={m}, {args.model}, "
    f"batch {per_worker}/worker, {reps} timed periods, XLA_FLAGS={results['xla_flags']!r}"
  )
  if FLAGS_REJECTED:
    print(f"rejected (unknown to this jaxlib): {' '.join(FLAGS_REJECTED)}")
  head = f"{'tau':>3}  {'algorithm':<18}{'period ms':>10}{'step ms':>9}  all-reduce in   HLO"
  print(head)
  print("-" * len(head))
  for tau in (1, 4):
    names = ("easgd", "nonblocking_easgd")
    built = [setup(n, tau, m, args.model, per_worker, mesh) for n in names]
    times = timeit_alternating([b[0] for b in built], [b[1] for b in built], reps)
    for name, (_, _, where), t in zip(names, built, times, strict=True):
      row = {
        "tau": tau,
        "algorithm": name,
        "period_ms": 1e3 * t,
        "step_ms": 1e3 * t / tau,
        **where,
      }
      results["rows"].append(row)
      print(
        f"{tau:>3}  {name:<18}{row['period_ms']:>10.2f}{row['step_ms']:>9.2f}  "
        f"{where['where']:<15}{where['all_reduces']} all-reduce(s), "
        f"{where['issued_outside_loop']} outside the loop",
        flush=True,
      )
    ratio = times[1] / times[0]
    results["ratios"][f"tau={tau}"] = ratio
    print(f"     non-blocking / blocking at tau={tau}: {ratio:.3f}")
  print(f"note: {results['note']}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main(ARGS)
