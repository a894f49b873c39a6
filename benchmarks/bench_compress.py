"""Benchmark of compressed communication: CHOCO, error feedback, Streaming DiLoCo, the codecs.

One CPU device, MLP 784-256-10, m = 8 workers, batch 32 per worker, plain SGD
as the local optimizer, ``coopjax.make_step`` with its default options (loss,
consensus distance and averaged-gradient norm reported on every step). Every
comparison is timed side by side (``timeit_pair``: the two programs
alternate), repeated ``--rounds`` times; the JSON keeps the median, min, max
and every round's ratio. Times are per step.

1. ``choco``: CHOCO-SGD on the ring (τ = 1, paper order, γ = 0.5) with top-k
   10 %, ``qsgd(4, unbiased=False)``, scaled sign and int4, each against
   uncompressed D-PSGD on the same ring (``<name>_over_dpsgd``); and CHOCO
   with top-k 10 % against a hand-written CHOCO step in plain JAX (vmapped
   gradients, ``lax.top_k``, a scatter, the dense einsum with W: the same
   math, no donation as make_step's default), with the default metrics
   (``topk_over_hand``) and without them (``topk_no_metrics_over_hand``).
   Two steps per timed call.
2. ``error_feedback``: local SGD τ = 4 with error feedback (top-k 1 %, int4)
   against plain local SGD τ = 4: off-steps alone (a period never reached on
   both sides, ``<name>_offstep_over_plain``) and whole periods of τ steps
   (``<name>_period_over_plain``); and the int4 off-step with ``donate=True``
   on both sides (``int4_offstep_over_plain_donated``).
3. ``streaming``: Streaming DiLoCo (P = 4 fragments, τ = 1, float and int4
   outer gradients) against DiLoCo with H = 16 (Nesterov outer SGD on both),
   per window of H = 16 steps (``<name>_over_diloco``; ``float_donated``:
   ``donate=True`` on both sides). The MLP's 784 × 256 kernel is 0.99 of the model, so every
   fragment's buffer is padded to nearly the whole model; ``float_balanced`` times the same pair
   on an MLP 784-64-784-64-784-10 whose four kernels are equal (largest fragment 0.28 of the
   model), as the layers of a deep network are; ``*_offstep``: windows of off-steps only (a
   period never reached), on both models, and with τ = 0 (``float_delay0_offstep``).
4. ``codecs``: encode + decode of one worker's 1M-float leaf (1000 × 1000),
   jitted, in µs (``roundtrip_us``) and encode alone (``encode_us``).
5. ``sharded`` (``--sharded``; the whole run then sees 8 fake CPU devices):
   m = 8 workers on 8 devices, the documented usage (``coopjax.shard``,
   ``coopjax.sharding.init``, ``coopjax.shard_batch``, make_step defaults,
   a wait after every step): CHOCO int4, top-k 10 % and qsgd(4,
   unbiased=False) against D-PSGD on the ring, EF local SGD int4 (τ = 4) against plain local SGD, per step.

``--baseline FILE`` embeds an earlier run's summary (e.g. the library before a
change) under ``"before"``, so one JSON holds before and after.

Usage::

  python benchmarks/bench_compress.py              # writes benchmarks/results/compress_cpu.json
  python benchmarks/bench_compress.py --rounds 5 --reps 8 --out /tmp/compress.json
  python benchmarks/bench_compress.py --only codecs choco
  python benchmarks/bench_compress.py --sharded    # also the sharded step on 8 fake CPU devices
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from _devices import force_host_devices

SECTIONS = ("choco", "error_feedback", "streaming", "codecs")
DEVICES = 8


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--out", default=None, help="JSON output (default benchmarks/results/compress_cpu.json)"
  )
  p.add_argument("--rounds", type=int, default=3, help="repetitions of every comparison")
  p.add_argument("--reps", type=int, default=5, help="timed calls per measurement")
  p.add_argument(
    "--only", nargs="*", choices=(*SECTIONS, "sharded"), default=None, help="sections to run"
  )
  p.add_argument("--baseline", default=None, help="an earlier run's JSON, kept under 'before'")
  p.add_argument(
    "--sharded", action="store_true", help=f"also the sharded step on {DEVICES} fake CPU devices"
  )
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else parse_args([])
ARGS.sharded = ARGS.sharded or "sharded" in (ARGS.only or ())
if __name__ == "__main__" and ARGS.sharded:
  force_host_devices(DEVICES)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _timing import run_steps  # noqa: E402
from _timing import spread  # noqa: E402
from _timing import timeit_alternating  # noqa: E402
from _timing import timeit_pair  # noqa: E402
from bench_devices import mlp_init  # noqa: E402
from bench_devices import mlp_loss  # noqa: E402
from bench_step import make_batches  # noqa: E402

import coopjax  # noqa: E402
from coopjax import compress  # noqa: E402
from coopjax import topology  # noqa: E402

M = 8
LR = 0.01
GAMMA = 0.5
NEVER = 10**9  # a period that is never reached: off-steps only
BALANCED_SIZES = (784, 64, 784, 64, 784, 10)  # four 50176-value kernels: balanced fragments


def compressors():
  return {
    "top_k_10pct": compress.top_k(fraction=0.1),
    "qsgd4_biased": compress.qsgd(4, unbiased=False),
    "scaled_sign": compress.scaled_sign(),
    "int4": compress.int4(),
  }


def fresh(tx, params):
  X = coopjax.replicate(params, M)
  return X, tx.init(X)


def top_k_rows(x, k):
  """Top-k of every row of ``x`` (``[m, d]``): the kept values scattered into zeros."""

  def one(row):
    _, idx = jax.lax.top_k(jnp.abs(row), k)
    return jnp.zeros_like(row).at[idx].set(row[idx])

  return jax.vmap(one)(x)


def hand_written_choco(loss_fn, W, fraction, gamma):
  """CHOCO-SGD by hand (τ = 1, paper order, zero copies): one step on X, x̂ and s."""
  grad = jax.vmap(jax.grad(loss_fn))
  Wj = jnp.asarray(W, jnp.float32)

  def q(x):  # one leaf, all workers
    flat = x.reshape(x.shape[0], -1)
    k = compress.num_kept(flat.shape[1], fraction=fraction)
    return top_k_rows(flat, k).reshape(x.shape)

  def step(carry, batch):
    X, hat, s = carry
    g = grad(X, batch)
    half = jax.tree.map(lambda x, d: x - LR * d, X, g)
    qs = jax.tree.map(lambda x, h: q(x - h), half, hat)
    hat = jax.tree.map(jnp.add, hat, qs)
    mixed = jax.tree.map(
      lambda d: jnp.einsum("ji,j...->i...", Wj, d, precision=jax.lax.Precision.HIGHEST), qs
    )
    s = jax.tree.map(jnp.add, s, mixed)
    X = jax.tree.map(lambda x, h, t: x + gamma * (t - h), half, hat, s)
    return X, hat, s

  return jax.jit(step)  # no donation, as make_step's default


def bench_choco(rounds, reps, params, batches):
  batches = batches[:2]  # τ = 1: two steps per timed call
  W = topology.ring(M)
  sgd = optax.sgd(LR)
  dpsgd = coopjax.dpsgd(sgd, W=W)
  base = coopjax.make_step(mlp_loss, dpsgd)
  txs = {
    name: coopjax.choco(sgd, tau=1, W=W, compressor=q, gamma=GAMMA)
    for name, q in compressors().items()
  }
  steps = {name: coopjax.make_step(mlp_loss, tx) for name, tx in txs.items()}
  off = dict(with_loss=False, with_consensus=False, with_grad_norm=False)
  bare = coopjax.make_step(mlp_loss, txs["top_k_10pct"], **off)
  hand = hand_written_choco(mlp_loss, W, 0.1, GAMMA)

  def run_hand(s):
    for batch in batches:
      s = hand(s, batch)
    return s

  def fresh_hand():
    X = coopjax.replicate(params, M)
    return X, jax.tree.map(jnp.zeros_like, X), jax.tree.map(jnp.zeros_like, X)

  out = {f"{n}_over_dpsgd": [] for n in txs}
  out.update(topk_over_hand=[], topk_no_metrics_over_hand=[], ms=[])
  per = 1e3 / len(batches)
  for _ in range(rounds):
    row = {}
    for name, tx in txs.items():
      a, b = timeit_pair(
        run_steps(steps[name], batches),
        fresh(tx, params),
        run_steps(base, batches),
        fresh(dpsgd, params),
        reps,
      )
      out[f"{name}_over_dpsgd"].append(a / b)
      row.update({name: a * per, f"dpsgd_vs_{name}": b * per})
    tx = txs["top_k_10pct"]
    a, h = timeit_pair(
      run_steps(steps["top_k_10pct"], batches), fresh(tx, params), run_hand, fresh_hand(), reps
    )
    c, h2 = timeit_pair(run_steps(bare, batches), fresh(tx, params), run_hand, fresh_hand(), reps)
    out["topk_over_hand"].append(a / h)
    out["topk_no_metrics_over_hand"].append(c / h2)
    row.update(hand=h * per, top_k_no_metrics=c * per)
    out["ms"].append(row)
  return out


def bench_error_feedback(rounds, reps, params, batches):
  sgd = optax.sgd(LR)
  qs = {"top_k_1pct": compress.top_k(fraction=0.01), "int4": compress.int4()}
  out = {"ms": []}
  plain = {tau: coopjax.local_sgd(sgd, tau=tau, num_workers=M) for tau in (4, NEVER)}
  plain_steps = {tau: coopjax.make_step(mlp_loss, tx) for tau, tx in plain.items()}
  ef = {
    (name, tau): coopjax.local_sgd(sgd, tau=tau, num_workers=M, compressor=q)
    for name, q in qs.items()
    for tau in (4, NEVER)
  }
  ef_steps = {key: coopjax.make_step(mlp_loss, tx) for key, tx in ef.items()}
  # The same off-steps with donate=True on both sides: the state is updated in place, so the
  # off-step's unchanged error buffers and reference model are not copied.
  donated = {
    "plain": coopjax.make_step(mlp_loss, plain[NEVER], donate=True),
    "int4": coopjax.make_step(mlp_loss, ef["int4", NEVER], donate=True),
  }
  out["int4_offstep_over_plain_donated"] = []
  for name in qs:
    out[f"{name}_offstep_over_plain"] = []
    out[f"{name}_period_over_plain"] = []
  per = 1e3 / len(batches)
  for _ in range(rounds):
    row = {}
    for name in qs:
      for tau, label in ((NEVER, "offstep"), (4, "period")):
        a, b = timeit_pair(
          run_steps(ef_steps[name, tau], batches),
          fresh(ef[name, tau], params),
          run_steps(plain_steps[tau], batches),
          fresh(plain[tau], params),
          reps,
        )
        out[f"{name}_{label}_over_plain"].append(a / b)
        row.update({f"{name}_{label}": a * per, f"plain_vs_{name}_{label}": b * per})
    a, b = timeit_pair(
      run_steps(donated["int4"], batches),
      fresh(ef["int4", NEVER], params),
      run_steps(donated["plain"], batches),
      fresh(plain[NEVER], params),
      reps,
    )
    out["int4_offstep_over_plain_donated"].append(a / b)
    row.update(int4_offstep_donated=a * per, plain_vs_int4_offstep_donated=b * per)
    out["ms"].append(row)
  return out


def bench_streaming(rounds, reps, params, batches):
  sgd = optax.sgd(LR)
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)

  def pair(H, compressor=None, donate=False, delay=1):
    """(streaming step, its tx, DiLoCo step, its tx) with period H (P = 4)."""
    diloco = coopjax.diloco(sgd, outer=outer, tau=H, num_workers=M)
    stream = coopjax.streaming_diloco(
      sgd, outer=outer, H=H, fragments=4, delay=delay, num_workers=M, compressor=compressor
    )
    make = lambda tx: coopjax.make_step(mlp_loss, tx, donate=donate)
    return make(stream), stream, make(diloco), diloco

  H = 16
  window = [batches[i % len(batches)] for i in range(H)]
  # An MLP whose four large kernels are equal (784-64-784-64-784-10): near-balanced fragments
  # (the largest is 0.28 of the model), as the layers of a deep network are.
  balanced = mlp_init(jax.random.key(1), BALANCED_SIZES)
  never = NEVER  # a period that is never reached (divisible by P = 4): off-steps only
  pairs = {  # name -> (pair, model)
    "float": (pair(H), params),
    "int4": (pair(H, compress.int4()), params),
    "float_donated": (pair(H, donate=True), params),
    "float_balanced": (pair(H), balanced),
    "float_offstep": (pair(never), params),
    "float_balanced_offstep": (pair(never), balanced),
    "float_delay0_offstep": (pair(never, delay=0), params),
  }
  out = {f"{name}_over_diloco": [] for name in pairs}
  out["ms"] = []
  per = 1e3 / H
  for _ in range(rounds):
    row = {}
    for name, ((step, tx, base_step, base_tx), model) in pairs.items():
      a, b = timeit_pair(
        run_steps(step, window),
        fresh(tx, model),
        run_steps(base_step, window),
        fresh(base_tx, model),
        max(2, reps // 2),
      )
      out[f"{name}_over_diloco"].append(a / b)
      row.update({name: a * per, f"diloco_vs_{name}": b * per})
    out["ms"].append(row)
  return out


def bench_sharded(rounds, reps, params, host_batches):
  """CHOCO (ring, τ = 1) and EF local SGD (τ = 4) against their uncompressed peers, sharded."""
  mesh = coopjax.worker_mesh()
  if coopjax.sharding.num_devices(mesh) != M:
    raise SystemExit(f"--sharded needs {M} devices, found {len(jax.devices())}.")
  batches = [coopjax.shard_batch(b, mesh) for b in host_batches]
  sgd = optax.sgd(LR)
  W = topology.ring(M)
  pairs = {
    "choco_int4_over_dpsgd": (
      coopjax.choco(sgd, tau=1, W=W, compressor=compress.int4(), gamma=GAMMA),
      coopjax.dpsgd(sgd, W=W),
    ),
    "choco_top_k_10pct_over_dpsgd": (
      coopjax.choco(sgd, tau=1, W=W, compressor=compress.top_k(fraction=0.1), gamma=GAMMA),
      coopjax.dpsgd(sgd, W=W),
    ),
    "choco_qsgd4_biased_over_dpsgd": (
      coopjax.choco(sgd, tau=1, W=W, compressor=compress.qsgd(4, unbiased=False), gamma=GAMMA),
      coopjax.dpsgd(sgd, W=W),
    ),
    "ef_int4_period_over_plain": (
      coopjax.local_sgd(sgd, tau=4, num_workers=M, compressor=compress.int4()),
      coopjax.local_sgd(sgd, tau=4, num_workers=M),
    ),
  }

  def run(step):  # fake CPU devices: wait for every step
    return run_steps(step, batches, wait=True)

  def fresh_sharded(tx):
    X = coopjax.shard(coopjax.replicate(params, M), mesh)
    return X, coopjax.sharding.init(tx, X, mesh)

  steps = {
    name: tuple(coopjax.make_step(mlp_loss, tx, mesh=mesh) for tx in txs)
    for name, txs in pairs.items()
  }
  out = {name: [] for name in pairs}
  out["ms"] = []
  per = 1e3 / len(batches)
  for _ in range(rounds):
    row = {}
    for name, (tx, peer) in pairs.items():
      a, b = timeit_pair(
        run(steps[name][0]), fresh_sharded(tx), run(steps[name][1]), fresh_sharded(peer), reps
      )
      out[name].append(a / b)
      row.update({name.split("_over_")[0]: a * per, f"peer_of_{name}": b * per})
    out["ms"].append(row)
  return out


def bench_codecs(rounds, reps):
  codecs = {
    "identity": compress.identity(),
    "top_k_1pct": compress.top_k(fraction=0.01),
    "top_k_10pct": compress.top_k(fraction=0.1),
    "random_k_1pct": compress.random_k(fraction=0.01),
    "qsgd4_biased": compress.qsgd(4, unbiased=False),
    "scaled_sign": compress.scaled_sign(),
    "int8": compress.int8(),
    "int4": compress.int4(),
  }
  x = jax.random.normal(jax.random.key(1), (1000, 1000), jnp.float32)
  key = compress.message_key(jax.random.key(0), step=1, sender=0)
  out = {}
  for name, q in codecs.items():
    roundtrip = jax.jit(lambda x, key, q=q: q.decode(q.encode(x, key), x, key))
    encode = jax.jit(q.encode)
    calls = [lambda _, f=roundtrip: f(x, key), lambda _, f=encode: f(x, key)]
    rt, en = [], []
    for i in range(rounds):
      a, b = timeit_alternating(calls, [None, None], reps, warmup=1 if i == 0 else 0)
      rt.append(a * 1e6)
      en.append(b * 1e6)
    out[name] = {"roundtrip_us": spread(rt), "encode_us": spread(en)}
    print(
      f"{name:14s} roundtrip {statistics.median(rt):10.0f} µs  encode {statistics.median(en):10.0f} µs"
    )
  return out


def summarize(section: dict) -> dict:
  """Ratios as spreads; per-round times kept as they are."""
  return {
    key: spread(value) if key != "ms" and isinstance(value, list) else value
    for key, value in section.items()
  }


def main(args):
  result = {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": len(jax.devices()),
    "machine": platform.machine(),
    "rounds": args.rounds,
    "reps": args.reps,
    "sharded_devices": DEVICES if args.sharded else None,
    "model": f"MLP 784-256-10, m={M}, batch 32 per worker, optax.sgd({LR}), make_step defaults",
  }
  sections = [s for s in args.only or SECTIONS if s != "sharded"]
  sections += ["sharded"] if args.sharded else []
  params = mlp_init(jax.random.key(0))
  batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in make_batches(M, 4)]
  start = time.perf_counter()
  for name in sections:
    t = time.perf_counter()
    if name == "choco":
      raw = bench_choco(args.rounds, args.reps, params, batches)
    elif name == "error_feedback":
      raw = bench_error_feedback(args.rounds, args.reps, params, batches)
    elif name == "streaming":
      raw = bench_streaming(args.rounds, args.reps, params, batches)
    elif name == "sharded":
      raw = bench_sharded(args.rounds, args.reps, params, make_batches(M, 4))
    else:
      raw = bench_codecs(args.rounds, args.reps)
    result[name] = summarize(raw) if name != "codecs" else raw
    if name != "codecs":
      medians = {k: round(v["median"], 3) for k, v in result[name].items() if k != "ms"}
      print(name, json.dumps(medians), f"({time.perf_counter() - t:.0f} s)")
  result["seconds"] = time.perf_counter() - start
  if args.baseline:
    with open(args.baseline) as f:
      before = json.load(f)
    result["before"] = {k: before[k] for k in (*SECTIONS, "sharded") if k in before}
  out = args.out or os.path.join(os.path.dirname(__file__), "results", "compress_cpu.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1, default=float)
  print("wrote", out)


if __name__ == "__main__":
  main(ARGS)
