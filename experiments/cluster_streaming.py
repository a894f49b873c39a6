r"""The ``--preset streaming`` run set of ``experiments/cluster_compare.py`` (needs root).

  sudo python experiments/cluster_compare.py --preset streaming           # ~8 min
  sudo python experiments/cluster_compare.py --preset streaming --quick   # ~3 min, 1 repeat

On m = 4 nodes of the emulated cluster (:mod:`benchmarks.cluster`, 100 Mbit/s
links, one JAX process and one worker per node, gloo) and the MLP/digits set-up
of ``cluster_compare.py`` (per-worker batch 512, SGD lr 0.1) it measures:

* **DiLoCo against Streaming DiLoCo**: :func:`coopjax.diloco` with H = 16 and
  :func:`coopjax.streaming_diloco` with H = 16, P ∈ {1, 2, 4} fragments,
  overlap delay τ = 1, α = 0.5 (torchft's schedule), float32 and int4 outer
  gradients (``coopjax.compress.int4()``); outer Nesterov, lr 0.7, momentum
  0.9, as in ``experiments/streaming.py``. Every run executes one compiled
  program per period (:func:`coopjax.make_period_step`): DiLoCo 16 steps with
  its all-reduce at the end; Streaming DiLoCo h = H/P steps that start at a
  snapshot, the fragment's reduction issued first, before the τ delayed steps,
  and consumed at step τ (``tx.consume_at``), after a first program of h − τ
  steps that issues nothing (``consume_at=0``).
* **Uncompressed against compressed gossip and averaging**, one program per
  step (:func:`coopjax.make_step`): D-PSGD on a ring against CHOCO-SGD
  (:func:`coopjax.choco`) with top-k 1 % on the same ring (γ = 0.05); local
  SGD τ = 4 against error-feedback local SGD (``local_sgd(...,
  compressor=...)``) with int4 and with biased 4-bit QSGD.

The MLP is 64-288-288-288-288-10 (1.03 MiB, as large as ``cluster_compare``'s
64-512-448-10): its three 288 × 288 kernels make P = 2 and P = 4 fragments of
near-equal size (a fragment is a set of whole leaves; with the 64-512-448-10
MLP one kernel is 85 % of the model and P = 4 would not lower the peak).

For each run it records every program's time on every node, each worker's
training loss per step, and the transformation's own cost record of every
sync (``tx.comm(k, state)``: collective, volume, rounds, fragment fraction and
``wire_fraction``, the payload bytes over the float32 bytes). The runs are
repeated ``--repeats`` times in turn (load on the shared cores varies; the
load average is recorded at every run).

The model of a run's time: the measured compute time per step t_c (local SGD
with no mix, run the same way: one program per step, or one per 16 steps)
plus :func:`coopjax.netmodel.mix_time` of every sync's cost record, on the
nominal link (α = 0, β = 8/rate) and on (α, β) fitted to all-reduces measured
on the same cluster. *Blocking*: every sync adds its time at its step.
*Overlapped* (Streaming DiLoCo with τ > 0): a sync starts at its snapshot and
must have arrived at its apply step (``experiments/streaming.py``'s
``streaming_clock``). Writes ``results.json``, ``loss_vs_time.png``,
``model_vs_measured.png`` and ``summary.md`` to ``--outdir`` (default
``experiments/results/cluster_streaming/``).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import cluster_compare as cc  # noqa: E402

MIB = 2**20
SIZES = "64,288,288,288,288,10"
OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9}

#: (label, group, options). The first run of each group is its uncompressed reference.
RUNS: tuple[tuple[str, str, dict], ...] = (
  ("DiLoCo H=16", "diloco", {"kind": "diloco", "H": 16}),
  ("Streaming P=1", "diloco", {"kind": "streaming", "fragments": 1, "bits": 0}),
  ("Streaming P=2", "diloco", {"kind": "streaming", "fragments": 2, "bits": 0}),
  ("Streaming P=4", "diloco", {"kind": "streaming", "fragments": 4, "bits": 0}),
  ("Streaming P=1 int4", "diloco", {"kind": "streaming", "fragments": 1, "bits": 4}),
  ("Streaming P=2 int4", "diloco", {"kind": "streaming", "fragments": 2, "bits": 4}),
  ("Streaming P=4 int4", "diloco", {"kind": "streaming", "fragments": 4, "bits": 4}),
  ("D-PSGD ring", "ring", {"kind": "dpsgd"}),
  ("CHOCO top-k 1% ring", "ring", {"kind": "choco", "compressor": "top_k:0.01", "gamma": 0.05}),
  ("local SGD τ=4", "periodic", {"kind": "local_sgd", "tau": 4}),
  ("EF local SGD τ=4 int4", "periodic", {"kind": "local_sgd", "tau": 4, "compressor": "int4"}),
  (
    "EF local SGD τ=4 qsgd-4 biased",
    "periodic",
    {"kind": "local_sgd", "tau": 4, "compressor": "qsgd_biased:4"},
  ),
)

#: The compute-only runs (t_c), one per way of running: local SGD that never mixes.
COMPUTE = (
  ("compute (one program per step)", "compute", {"kind": "compute", "path": "step"}),
  ("compute (one program per 16 steps)", "compute", {"kind": "compute", "path": "period"}),
)

DEFAULTS = {"H": 16, "delay": 1, "alpha": 0.5}


def path_of(options: dict) -> str:
  """``"period"`` (one program per period) for the DiLoCo family, else ``"step"``."""
  if "path" in options:
    return options["path"]
  return "period" if options["kind"] in ("diloco", "streaming") else "step"


# ----------------------------------------------------------------------------------------------
# On each node
# ----------------------------------------------------------------------------------------------


def build(options: dict, cfg: dict, m: int):
  """The run's transformation (the public coopjax API only) and its program lengths.

  Returns:
    ``(tx, prelude, period)``: a first program of ``prelude`` steps that issues
    nothing early (0: none), then programs of ``period`` steps (1: make_step).
  """
  import optax
  import registry

  import coopjax
  from coopjax import compress
  from coopjax import topology

  local = optax.sgd(cfg["lr"])
  kind = options["kind"]
  outer = optax.sgd(OUTER["outer_lr"], momentum=OUTER["outer_momentum"], nesterov=True)
  H = cfg["H"]
  if kind == "compute":
    tx = coopjax.local_sgd(local, tau=10**6, num_workers=m)
    return tx, 0, H if path_of(options) == "period" else 1
  if kind == "diloco":
    return coopjax.diloco(local, outer=outer, tau=H, num_workers=m), 0, H
  if kind == "streaming":
    P, delay = options["fragments"], cfg["delay"]
    tx = coopjax.streaming_diloco(
      local,
      outer=outer,
      H=H,
      fragments=P,
      delay=delay,
      alpha=cfg["alpha"],
      compressor=compress.int4() if options["bits"] == 4 else None,
      num_workers=m,
    )
    h = H // P
    return tx, h - delay, h  # torchft's schedule: the first snapshot at step h − τ
  if kind == "dpsgd":
    return coopjax.dpsgd(local, W=topology.ring(m)), 0, 1
  if kind == "choco":
    tx = coopjax.choco(
      local,
      tau=1,
      W=topology.ring(m),
      compressor=registry.make_compressor(options["compressor"]),
      gamma=options["gamma"],
    )
    return tx, 0, 1
  if kind == "local_sgd":
    comp = registry.make_compressor(options.get("compressor", "none"))
    kw = {} if comp is None else {"compressor": comp}
    return coopjax.local_sgd(local, tau=options["tau"], num_workers=m, **kw), 0, 1
  raise ValueError(f"unknown run kind {kind!r}")


def program_lengths(prelude: int, period: int, steps: int) -> list[int]:
  """Programs covering at least ``steps`` steps: ``prelude`` (if any), then ``period`` each.

  Examples:
    >>> program_lengths(3, 4, 10)
    [3, 4, 4]
    >>> program_lengths(0, 1, 3)
    [1, 1, 1]
  """
  lengths = [prelude] if prelude else []
  while sum(lengths) < steps:
    lengths.append(period)
  return lengths


def sync_costs(tx, params0, m: int, steps: int) -> list:
  """``[k, MixCost fields]`` of every step k ≤ steps that communicates (``tx.comm(k, state)``)."""
  import coopjax

  state = tx.init(coopjax.replicate(params0, m))
  out = []
  for k in range(1, steps + 1):
    cost = tx.comm(k, state)
    if cost.collective != "none":
      out.append([k, dict(cost._asdict())])
  return out


def node_runs(spec: dict, mesh, m: int, params0: dict, host_batch, stacked) -> dict:
  """Runs the preset on this node; returns ``{label: [one record per repeat]}`` and extras.

  Args:
    spec: the preset's spec (``runs``, ``repeats``, ``steps``, the config).
    mesh: the workers' mesh (one device per node).
    m: the number of workers.
    params0: the initial model.
    host_batch: ``k -> (x, y)`` host arrays ``[m, B, ...]`` of step k (from 0).
    stacked: ``(k0, n) -> batches`` ``[n, m, B, ...]`` for steps k0 .. k0 + n − 1, placed.
  """
  import jax

  import coopjax
  from benchmarks.cluster import node
  from coopjax import sharding

  cfg = spec["config"]
  kw = cc.STEP_KW

  def fresh(tx):
    X = coopjax.shard(coopjax.replicate(params0, m), mesh)
    return X, sharding.init(tx, X, mesh)

  def batch_fn(k):
    return coopjax.shard_batch(host_batch(k), mesh)

  compiled, info = {}, {}
  for label, _, options in spec["runs"]:
    tx, prelude, period = build(options, cfg, m)
    steps = spec["steps"][label]
    if path_of(options) == "step":
      programs = {"step": coopjax.make_step(cc.mlp_loss, tx, mesh=mesh, **kw)}
    else:
      programs = {"period": coopjax.make_period_step(cc.mlp_loss, tx, mesh, **kw)}
      if prelude:
        programs["prelude"] = coopjax.make_period_step(cc.mlp_loss, tx, mesh, consume_at=0, **kw)
    compiled[label] = (tx, prelude, period, programs)
    info[label] = {
      "steps": steps,
      "prelude": prelude,
      "period": period,
      "lengths": program_lengths(prelude, period, steps),
      "syncs": sync_costs(tx, params0, m, sum(program_lengths(prelude, period, steps))),
      "bytes_per_sync": int(tx.bytes_per_sync(params0)) if hasattr(tx, "bytes_per_sync") else None,
    }

  def run(label, warm: bool):
    tx, prelude, period, programs = compiled[label]
    X, state = fresh(tx)
    if period == 1:
      n = 4 if warm else spec["steps"][label]
      X, state, times, losses = node.run_steps(programs["step"], X, state, batch_fn, n)
      return {"times": times.tolist(), "losses": losses.tolist()}
    lengths = info[label]["lengths"]
    if warm:  # compiles every program once
      lengths = lengths[:2] if prelude else lengths[:1]
    times, losses, k0 = [], [], 0
    for i, n in enumerate(lengths):
      program = programs["prelude"] if (prelude and i == 0) else programs["period"]
      batches = stacked(k0, n)
      t = time.perf_counter()
      X, state, metrics = program(X, state, batches)
      jax.block_until_ready((X, state))
      loss = node.local_value(metrics["worker_loss"]).reshape(n, -1).mean(axis=1)
      times.append(time.perf_counter() - t)
      losses.extend(float(v) for v in loss)
      k0 += n
    return {"times": times, "losses": losses}

  for label, _, _ in spec["runs"]:
    run(label, warm=True)
  repeats = {label: [] for label, _, _ in spec["runs"]}
  for _ in range(spec["repeats"]):
    for label, _, _ in spec["runs"]:
      load = os.getloadavg()
      record = run(label, warm=False)
      record["load"] = list(load)
      repeats[label].append(record)
  return {"runs": spec["runs"], "info": info, "repeats": repeats}


# ----------------------------------------------------------------------------------------------
# The orchestrator: spec, analysis, figures, summary
# ----------------------------------------------------------------------------------------------


def make_spec(args) -> dict:
  steps = {}
  for label, group, _ in COMPUTE + RUNS:
    if group == "compute":
      steps[label] = args.compute_steps
    elif group == "diloco":
      steps[label] = args.diloco_steps
    else:
      steps[label] = args.gossip_steps
  return {
    "preset": "streaming",
    "mlp_sizes": [int(s) for s in args.sizes.split(",")],
    "cal_sizes": [4096, 65536, MIB // 4, MIB, 4 * MIB],
    "batch": args.batch,
    "reps": args.reps,
    "calibrate": True,
    "algorithms": [],
    "overlap": None,
    "timeout": 1800,
    "params": {},
    "config": {"lr": args.lr, **DEFAULTS},
    "runs": [list(r) for r in COMPUTE + RUNS],
    "steps": steps,
    "repeats": args.repeats,
  }


def _nodes_clock(per_node_times: list, lengths: list) -> np.ndarray:
  """Cumulative seconds after every step: the nodes' mean clock, spread evenly within a program."""
  t = np.mean(np.asarray(per_node_times, np.float64), axis=0)
  out, clock = [], 0.0
  for dt, n in zip(t, lengths, strict=True):
    out.extend(clock + dt * (j + 1) / n for j in range(n))
    clock += dt
  return np.asarray(out)


def _time_at(clock: np.ndarray, step: int | None) -> float | None:
  return None if step is None else float(clock[step - 1])


def analyse_preset(flat: list, args) -> dict:
  """Tables and curves from the nodes' outputs."""
  import streaming as streaming_experiment

  from coopjax import netmodel
  from coopjax.cost import pattern

  calibration, nets = cc.calibrate(flat, args.rate_bits)
  nbytes = flat[0]["model_bytes"]
  info = flat[0]["preset"]["info"]
  runs = [tuple(r) for r in flat[0]["preset"].get("runs", COMPUTE + RUNS)]
  compute = [r for r in runs if r[1] == "compute"]
  runs = [r for r in runs if r[1] != "compute"]
  reps = [o["preset"]["repeats"] for o in flat]
  labels = list(info)
  R = len(reps[0][labels[0]])

  def clocks(label):
    """One cumulative clock per repeat."""
    lengths = (
      info[label]["lengths"] if info[label]["period"] > 1 else [1] * len(reps[0][label][0]["times"])
    )
    n = info[label]["steps"]  # the programs may run past it: the clock is cut there
    return [_nodes_clock([rn[label][r]["times"] for rn in reps], lengths)[:n] for r in range(R)]

  def losses(label):
    n = info[label]["steps"]
    return np.mean([[rn[label][r]["losses"][:n] for r in range(R)] for rn in reps], axis=(0, 1))

  def per_step(label):
    """Measured seconds per step of each repeat (total clock over steps)."""
    return [float(c[-1] / len(c)) for c in clocks(label)]

  # t_c per way of running: the slowest node's mean per-step compute time, pooled over repeats
  t_c = {}
  for label, _, options in compute:
    n = (
      sum(info[label]["lengths"]) if info[label]["period"] > 1 else len(reps[0][label][0]["times"])
    )
    t_c[path_of(options)] = float(
      max(np.sum([r["times"] for r in rn[label]]) / (R * n) for rn in reps)
    )
  groups = {}
  for label, group, _ in runs:
    groups.setdefault(group, []).append(label)
  targets = {}
  for group, members in groups.items():
    ref = cc.smooth(losses(members[0]))
    targets[group] = float(ref[(2 * len(ref)) // 3 - 1])

  rows = {}
  for label, group, options in runs:
    steps = len(losses(label))
    tc = t_c[path_of(options)]
    syncs = [(k, pattern.MixCost(**c)) for k, c in info[label]["syncs"] if k <= steps]
    delay = DEFAULTS["delay"] if options["kind"] == "streaming" else 0
    model = {}
    for which in ("nominal", "calibrated"):
      net = nets[which]
      sync_s = {k: netmodel.mix_time(c, nbytes, net) for k, c in syncs}
      blocking = streaming_experiment.streaming_clock(
        tc, dict(sync_s), {k: k for k in sync_s}, steps
      )
      overlapped = streaming_experiment.streaming_clock(
        tc, {k - delay: s for k, s in sync_s.items()}, {k: k - delay for k in sync_s}, steps
      )
      model[which] = {"blocking": blocking, "overlapped": overlapped, "sync_s": sync_s}
    loss = losses(label)
    s = cc.smooth(loss)
    hit = np.nonzero(s <= targets[group])[0]
    k_hit = int(hit[0]) + 1 if len(hit) else None
    cl = clocks(label)
    measured = per_step(label)
    # measured cost of a sync: program (or step) time minus the same program's compute
    per_node = [[r["times"] for r in rn[label]] for rn in reps]
    times = np.mean(np.asarray(per_node, np.float64), axis=0)  # [R, programs]
    lengths = info[label]["lengths"] if info[label]["period"] > 1 else [1] * times.shape[1]
    ends = np.cumsum(lengths)
    sync_steps = {k for k, _ in info[label]["syncs"]}
    has_sync = np.array(
      [any(e - n < k <= e for k in sync_steps) for e, n in zip(ends, lengths, strict=True)]
    )
    lengths_a = np.asarray(lengths, np.float64)
    if has_sync.any() and (~has_sync).any() and info[label]["period"] == 1:
      overhead = float(np.median(times[:, has_sync]) - np.median(times[:, ~has_sync]))
    elif has_sync.any():
      overhead = float(np.median((times - lengths_a * tc)[:, has_sync]))
    else:
      overhead = None
    # robust to load spikes: the median over sync periods (a program, or the steps up to and
    # including a sync) of seconds per step, pooled over repeats
    if info[label]["period"] > 1:
      blocks = [(i, i + 1) for i in range(len(lengths)) if not (info[label]["prelude"] and i == 0)]
    else:
      cuts = [0] + sorted(k for k in sync_steps if k <= times.shape[1])
      blocks = [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)] or [(0, steps)]
    per_block = [
      float(np.sum(times[r, a:b]) / np.sum(lengths_a[a:b])) for r in range(R) for a, b in blocks
    ]
    sent = [c.bytes_sent(nbytes) for _, c in syncs]
    payload = [c.fraction * c.wire_fraction * nbytes for _, c in syncs]
    rows[label] = {
      "group": group,
      "options": options,
      "path": path_of(options),
      "steps": steps,
      "syncs": len(syncs),
      "measured_step_s": float(np.median(measured)),
      "measured_step_s_repeats": measured,
      "measured_step_median_over_periods_s": float(np.median(per_block)),
      "compute_step_s": tc,
      "modelled_step_s": {
        w: {k: float(model[w][k][-1] / steps) for k in ("blocking", "overlapped")} for w in model
      },
      "ratio_measured_to_calibrated_blocking": float(
        np.median(measured) / (model["calibrated"]["blocking"][-1] / steps)
      ),
      "measured_sync_overhead_s": overhead,
      "modelled_sync_s": float(max(model["calibrated"]["sync_s"].values())) if syncs else 0.0,
      "modelled_sync_nominal_s": float(max(model["nominal"]["sync_s"].values())) if syncs else 0.0,
      "payload_per_sync_bytes": float(max(payload)) if payload else 0.0,
      "sent_per_sync_bytes": float(max(sent)) if sent else 0.0,
      "bytes_per_sync_tx": info[label].get("bytes_per_sync"),
      "bytes_sent_per_worker": float(sum(sent)),
      "loss": loss.tolist(),
      "final_loss": float(s[-1]),
      "target_loss": targets[group],
      "steps_to_target": k_hit,
      "measured_time_to_target_s": [_time_at(c, k_hit) for c in cl],
      "modelled_time_to_target_s": {
        k: _time_at(model["calibrated"][k], k_hit) for k in ("blocking", "overlapped")
      },
      "measured_time": [c.tolist() for c in cl],
      "modelled_time_calibrated": {
        k: model["calibrated"][k].tolist() for k in ("blocking", "overlapped")
      },
      "load_1min": [[rn[label][r]["load"][0] for r in range(R)] for rn in reps[:1]][0],
    }
  return {
    "calibration": calibration,
    "compute_step_s": t_c,
    "targets": targets,
    "rows": rows,
    "repeats": R,
    "model_bytes": nbytes,
    "m": flat[0]["m"],
  }


def plot(result: dict, outdir: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["rows"]
  panels = (("diloco", "DiLoCo vs Streaming DiLoCo"), (("ring", "periodic"), "gossip / averaging"))
  fig, axes = plt.subplots(1, 2, figsize=(14, 5))
  for ax, (groups, title) in zip(axes, panels, strict=True):
    groups = (groups,) if isinstance(groups, str) else groups
    i = 0
    for label, row in rows.items():
      if row["group"] not in groups:
        continue
      clock = np.median(np.asarray(row["measured_time"]), axis=0)
      ls = "--" if ("int4" in label or "qsgd" in label or "top-k" in label) else "-"
      ax.plot(clock, cc.smooth(row["loss"]), ls, color=plt.cm.tab10(i % 10), label=label)
      i += 1
    for g in groups:
      ax.axhline(result["targets"][g], color="k", lw=0.5, ls=":")
    ax.set_xlabel("measured seconds (nodes' mean clock, median of repeats)")
    ax.set_ylabel("training loss (mean over workers, 8-step running mean)")
    ax.set_yscale("log")
    ax.set_title(f"{title}, m = {result['m']} at {result['rate']}", fontsize=10)
    ax.legend(fontsize=8)
  cc.save_figure(fig, os.path.join(outdir, "loss_vs_time.png"))

  names = list(rows)
  med = np.array([rows[n]["measured_step_s"] for n in names]) * 1e3
  spread = np.array(
    [
      [
        rows[n]["measured_step_s"] - min(rows[n]["measured_step_s_repeats"]),
        max(rows[n]["measured_step_s_repeats"]) - rows[n]["measured_step_s"],
      ]
      for n in names
    ]
  ).T
  model = lambda way: [rows[n]["modelled_step_s"]["calibrated"][way] * 1e3 for n in names]
  cc.plot_step_bars(
    names,
    [
      (-0.3, med, {"yerr": spread * 1e3, "capsize": 3, "label": "measured (median, min–max)"}),
      (-0.1, model("blocking"), {"label": "model: t_c + calibrated α–β, blocking"}),
      (0.1, model("overlapped"), {"label": "model: calibrated, sync overlapped with τ steps"}),
      (
        0.3,
        [rows[n]["compute_step_s"] * 1e3 for n in names],
        {"color": "0.7", "label": "t_c (compute alone)"},
      ),
    ],
    os.path.join(outdir, "model_vs_measured.png"),
    figsize=(13, 4.8),
    bottom=10,
    legend_fontsize=8,
  )


def _fmt(v, f="{:.2f}"):
  return "—" if v is None else f.format(v)


def write_summary(result: dict, args, outdir: str, command: str) -> str:
  cal = result["calibration"]
  rows = result["rows"]
  B = result["model_bytes"]
  loads = [v for r in rows.values() for v in r["load_1min"]]
  lines = [
    "# Streaming DiLoCo and compressed communication on the emulated cluster",
    "",
    f"`{command}`",
    "",
    f"m = {result['m']} nodes (one process, one CPU device, one worker each) at {args.rate}; "
    f"MLP {args.sizes} ({B / MIB:.2f} MiB), digits, per-worker batch {args.batch}, SGD lr "
    f"{args.lr}. Each run repeated {result['repeats']}× in turn; 1-minute load average at the "
    f"runs' starts {min(loads):.1f}–{max(loads):.1f} on 2 shared cores.",
    "",
    f"Calibration: α = {cal['alpha_s'] * 1e6:.0f} µs, 1/β = {cal['fitted_bandwidth_mbit']:.1f} "
    "Mbit/s fitted to ring all-reduces of "
    + ", ".join(f"{s // 1024} KiB" for s in cal["sizes"])
    + " (measured medians "
    + ", ".join(f"{t * 1e3:.1f}" for t in cal["all_reduce_median_s"])
    + " ms). t_c = "
    + ", ".join(f"{v * 1e3:.1f} ms ({k})" for k, v in result["compute_step_s"].items())
    + ".",
    "",
    "Model = t_c + `netmodel.mix_time` of each sync's cost record (payload bytes: "
    "`fraction × wire_fraction × model`), calibrated α–β; *blocking*: every sync adds its "
    "time; *overlapped*: a streaming sync starts at its snapshot and must arrive by its apply "
    "step. Target loss per group: the reference's (first row's) 8-step running-mean loss at "
    "2/3 of its steps.",
    "",
    "| run | program | steps | measured ms/step (median; min–max) | median over sync periods | model blocking | "
    "model overlapped | measured / blocking | sync: measured ms | sync: model ms | "
    "payload per sync (KB; × model) | sent per worker per sync (KB) | MB sent per worker | "
    "steps to target | measured s to target | model s (blocking / overlapped) | final loss |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for label, r in rows.items():
    rep = r["measured_step_s_repeats"]
    mt = [t for t in r["measured_time_to_target_s"] if t is not None]
    mod = r["modelled_time_to_target_s"]
    lines.append(
      f"| {label} | {'period' if r['path'] == 'period' else 'step'} | {r['steps']} "
      f"| {r['measured_step_s'] * 1e3:.1f} ({min(rep) * 1e3:.1f}–{max(rep) * 1e3:.1f}) "
      f"| {r['measured_step_median_over_periods_s'] * 1e3:.1f} "
      f"| {r['modelled_step_s']['calibrated']['blocking'] * 1e3:.1f} "
      f"| {r['modelled_step_s']['calibrated']['overlapped'] * 1e3:.1f} "
      f"| {r['ratio_measured_to_calibrated_blocking']:.2f} "
      f"| {_fmt(None if r['measured_sync_overhead_s'] is None else r['measured_sync_overhead_s'] * 1e3, '{:.0f}')} "
      f"| {r['modelled_sync_s'] * 1e3:.1f} "
      f"| {r['payload_per_sync_bytes'] / 1e3:.1f} ({r['payload_per_sync_bytes'] / B:.3f}) "
      f"| {r['sent_per_sync_bytes'] / 1e3:.1f} | {r['bytes_sent_per_worker'] / 1e6:.2f} "
      f"| {_fmt(r['steps_to_target'], '{}')} "
      f"| {_fmt(float(np.median(mt)) if mt else None)}"
      + (f" ({min(mt):.2f}–{max(mt):.2f})" if len(mt) > 1 else "")
      + f" | {_fmt(mod['blocking'])} / {_fmt(mod['overlapped'])} | {r['final_loss']:.4f} |"
    )
  lines += [
    "",
    "Targets: " + ", ".join(f"{g} {t:.4f}" for g, t in result["targets"].items()) + ".",
    "",
  ]
  text = "\n".join(lines)
  with open(os.path.join(outdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return text


def finish(flat: list, args, command: str, outdir: str) -> dict:
  """Writes results.json (analysis and raw node outputs), the figures and summary.md."""
  return cc.analyse_and_write(
    {"flat": flat},
    args,
    command,
    outdir,
    lambda: analyse_preset(flat, args),
    plot,
    write_summary,
    rate=args.rate,
  )


def main(args, command: str) -> dict:
  """Brings up the cluster, runs the preset, and writes the results."""
  t0 = time.time()
  flat = cc.run_cluster(make_spec(args), args.nodes, args.rate, threads=args.threads)
  print(f"cluster done in {time.time() - t0:.0f} s", flush=True)
  return finish(flat, args, command, args.outdir)
