r"""Measured wall-clock on an emulated cluster, beside the α–β model's (needs root).

  sudo python experiments/cluster_compare.py                      # m = 4 at 100 Mbit/s, ~6 min
  sudo python experiments/cluster_compare.py --quick              # smaller, ~2 min
  sudo python experiments/cluster_compare.py --preset streaming   # Streaming DiLoCo and
                                                                  # compression, ~8 min

``--preset streaming`` runs the set of ``experiments/cluster_streaming.py``
(DiLoCo against Streaming DiLoCo, uncompressed against compressed gossip and
averaging) instead, into ``experiments/results/cluster_streaming/``.

Brings up m nodes (:mod:`benchmarks.cluster`: one network namespace each,
``tbf``-limited links), runs one JAX process per node (``jax.distributed``,
gloo; one CPU device, one worker per node) and measures, on the same data
(scikit-learn digits), model (an MLP of about 1 MiB) and local SGD:

* calibration: ring all-reduces and one-step ring shifts (``ppermute``) of
  several sizes; (α, β) fitted to the all-reduces;
* compute: the local step alone (local SGD with a period longer than the run);
* per algorithm (sync SGD, local SGD τ ∈ {2, 8, 32}, EASGD and non-blocking
  EASGD, D-PSGD on a ring, the one-peer exponential graph, MATCHA, DiLoCo):
  the time of every step and every worker's training loss; sync SGD runs
  ``--steps`` steps, the others twice as many;
* hierarchical local SGD on a second cluster of two groups joined by a slower
  link (``--group-rate``), beside local SGD on the same cluster;
* overlap: period time of blocking EASGD against non-blocking EASGD (and of
  local SGD against Overlap Local-SGD), each run (a) as one compiled program
  per period (:func:`coopjax.make_period_step`) and (b) with the reduction as
  its own program on a second thread (:mod:`coopjax.parallel.overlap`),
  interleaved, with the iterates compared.

The model of a step: the measured compute time :math:`t_c` plus the α–β time
of what the step communicates (:mod:`coopjax.netmodel`), priced twice: with
the *nominal* link (α = 0, β = 8/rate) and with the *calibrated* (α, β).
Writes ``results.json``, ``loss_vs_time.png``, ``model_vs_measured.png``,
``overlap.png`` and ``summary.md`` to ``--outdir``
(default ``experiments/results/cluster/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

MIB = 2**20

#: The step's metrics: no reducing metric (``loss``, ``consensus_distance``, ``avg_grad_norm``
#: each add an all-reduce, the last two of the model's size, to every step); every node reads
#: its own ``worker_loss``.
STEP_KW = {"with_loss": False, "with_consensus": False, "with_grad_norm": False}


# ----------------------------------------------------------------------------------------------
# What each node runs
# ----------------------------------------------------------------------------------------------


def mlp_init(sizes, seed=0):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    params[f"w{i}"] = (rng.normal(size=(a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
    params[f"b{i}"] = np.zeros(b, np.float32)
  return params


def mlp_loss(params, batch):
  import jax
  import jax.numpy as jnp

  x, y = batch
  n = len(params) // 2
  for i in range(n):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      x = jax.nn.relu(x)
  logp = jax.nn.log_softmax(x)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def build(name, spec, m):
  """``(tx, num_aux, tau)`` for a named algorithm (the public coopjax API only)."""
  import jax
  import optax

  import coopjax
  from coopjax import topology

  lr, tau = spec["lr"], spec.get("tau", 1)
  local = optax.sgd(lr)
  if name == "compute_only":
    return coopjax.local_sgd(local, tau=10**6, num_workers=m), 0, 10**6
  if name == "sync_sgd":
    return coopjax.sync_sgd(local, num_workers=m), 0, 1
  if name.startswith("local_sgd"):
    return coopjax.local_sgd(local, tau=tau, num_workers=m), 0, tau
  if name == "easgd":
    return coopjax.easgd(local, tau=tau, alpha=spec["alpha"], num_workers=m), 1, tau
  if name == "nonblocking_easgd":
    return coopjax.nonblocking_easgd(local, tau=tau, alpha=spec["alpha"], num_workers=m), 1, tau
  if name == "overlap_local_sgd":
    return (
      coopjax.overlap_local_sgd(local, tau=tau, alpha=spec["alpha"], num_workers=m),
      1,
      tau,
    )
  if name == "dpsgd_ring":
    return coopjax.dpsgd(local, W=topology.ring(m)), 0, 1
  if name == "one_peer_exp":
    period = topology.one_peer_exponential_period(m)
    schedule = [topology.one_peer_exponential(m, r) for r in range(period)]
    return coopjax.time_varying(local, tau=1, schedule=schedule), 0, 1
  if name == "matcha":
    key = jax.random.key(spec.get("seed", 0))
    return (
      coopjax.matcha(local, graph=topology.ring(m), budget=spec["budget"], num_workers=m, key=key),
      0,
      1,
    )
  if name == "hierarchical":
    size = m // 2
    groups = [list(range(g * size, (g + 1) * size)) for g in range(2)]
    return coopjax.hierarchical(local, tau1=tau, tau2=spec["tau2"], groups=groups), 0, spec["tau2"]
  if name == "diloco":
    outer = optax.sgd(spec["outer_lr"], momentum=spec["outer_momentum"], nesterov=True)
    return coopjax.diloco(local, outer=outer, tau=tau, num_workers=m), 0, tau
  raise ValueError(f"unknown algorithm {name!r}")


def node_main(spec_path, out_dir):
  from benchmarks.cluster import node

  info = node.join()
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import coopjax
  from coopjax import sharding
  from coopjax.parallel import overlap
  from coopjax.training import data

  with open(spec_path, encoding="utf-8") as f:
    spec = json.load(f)
  mesh = coopjax.worker_mesh()
  m = info.device_count
  out = {"node": info.process_index, "m": m}

  if spec.get("calibrate"):
    out["calibration"] = {
      kind: {
        str(s): node.time_collective(kind, s, mesh, reps=spec["reps"]) for s in spec["cal_sizes"]
      }
      for kind in ("all_reduce", "permute")
    }

  ds = data.load_digits()
  xs = ds.train_x.reshape(len(ds.train_x), -1)
  shards = data.split_iid(len(xs), m, seed=0)
  B = spec["batch"]

  def host_batch(k):
    rng = np.random.default_rng(1000 + k)
    idx = np.stack([rng.choice(s, B) for s in shards])
    return xs[idx], ds.train_y[idx]

  def batch_fn(k):
    return coopjax.shard_batch(host_batch(k), mesh)

  def stacked_batches(k0, n):
    """Steps k0 .. k0 + n − 1 stacked on a leading axis, placed [n, m, ...] on the mesh."""
    hb = [host_batch(k0 + t) for t in range(n)]
    stacked = (np.stack([h[0] for h in hb]), np.stack([h[1] for h in hb]))
    put = NamedSharding(sharding._auto_mesh(mesh), P(None, "workers"))
    return jax.make_array_from_callback(
      stacked[0].shape, put, lambda i: stacked[0][i]
    ), jax.make_array_from_callback(stacked[1].shape, put, lambda i: stacked[1][i])

  def period_batches(p, tau):
    return stacked_batches(p * tau, tau)

  params0 = mlp_init(spec["mlp_sizes"])
  out["model_bytes"] = int(sum(v.nbytes for v in params0.values()))

  def fresh(tx, v):
    X = coopjax.shard(coopjax.replicate(params0, m, v), mesh, v)
    return X, sharding.init(tx, X, mesh, v)

  if spec.get("preset") == "streaming":
    import cluster_streaming

    out["preset"] = cluster_streaming.node_runs(spec, mesh, m, params0, host_batch, stacked_batches)

  out["runs"] = {}
  for name, steps in spec["algorithms"]:
    tx, v, tau = build(name, spec["params"][name], m)
    step = coopjax.make_step(mlp_loss, tx, mesh=mesh, **STEP_KW)
    X, state = fresh(tx, v)
    warm = min(max(tau, 2), spec["warmup_max"])
    node.run_steps(step, X, state, batch_fn, warm)  # compile, connect; then start afresh
    X, state = fresh(tx, v)
    X, state, times, losses = node.run_steps(step, X, state, batch_fn, steps)
    out["runs"][name] = {"times": times.tolist(), "losses": losses.tolist(), "tau": tau}

  if spec.get("overlap"):
    res = {}
    for blocking, nonblocking in spec["overlap"]:
      tau = spec["params"][nonblocking]["tau"]
      txb, vb, _ = build(blocking, spec["params"][blocking], m)
      txn, vn, _ = build(nonblocking, spec["params"][nonblocking], m)
      programs = {
        f"{blocking} (one program)": (
          txb,
          vb,
          coopjax.make_period_step(mlp_loss, txb, mesh, **STEP_KW),
        ),
        f"{nonblocking} (one program)": (
          txn,
          vn,
          coopjax.make_period_step(mlp_loss, txn, mesh, **STEP_KW),
        ),
        f"{nonblocking} (overlapped)": (
          txn,
          vn,
          overlap.make_overlapped_period(mlp_loss, txn, mesh, tau=tau, **STEP_KW),
        ),
      }
      states = {key: fresh(tx, v) for key, (tx, v, _) in programs.items()}
      times = {key: [] for key in programs}
      periods = spec["overlap_periods"]
      for p in range(periods + 1):  # period 0 compiles and is not timed
        batches = period_batches(p, tau)
        for key, (_, _, period) in programs.items():
          X, state = states[key]
          t = time.perf_counter()
          X, state, _ = period(X, state, batches)
          jax.block_until_ready((X, state))
          if p:
            times[key].append(time.perf_counter() - t)
          states[key] = (X, state)
      workers = {
        key: [np.asarray(a) for a in jax.tree.leaves(coopjax.unshard(states[key][0], mesh, v))]
        for key, (_, v, _) in programs.items()
      }
      keys = list(programs)
      diff_exact = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(workers[keys[1]], workers[keys[2]], strict=True)
      )
      diff_blocking = max(
        float(np.max(np.abs(a[:m] - b[:m])))
        for a, b in zip(workers[keys[0]], workers[keys[2]], strict=True)
      )
      r_alone = []
      _, state = states[keys[2]]
      pending = overlap._only(state).pending
      reduce = overlap._reduce_program(overlap.default_reduce(type(overlap._only(state)), m), mesh)
      jax.block_until_ready(reduce(pending))
      for _ in range(spec["reps"]):
        t = time.perf_counter()
        jax.block_until_ready(reduce(pending))
        r_alone.append(time.perf_counter() - t)
      res[nonblocking] = {
        "tau": tau,
        "times": times,
        "reduce_alone": r_alone,
        "max_abs_diff_overlapped_vs_one_program": diff_exact,
        "max_abs_diff_workers_vs_blocking": diff_blocking,
      }
    out["overlap"] = res

  with open(os.path.join(out_dir, f"node{info.process_index}.json"), "w", encoding="utf-8") as f:
    json.dump(out, f)


# ----------------------------------------------------------------------------------------------
# The orchestrator: bring up, run, model, plot
# ----------------------------------------------------------------------------------------------


def run_cluster(spec, nodes, rate, *, groups=None, group_rate=None, tag="", threads=1):
  from benchmarks.cluster import Cluster

  with tempfile.TemporaryDirectory() as tmp:
    spec_path = os.path.join(tmp, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
      json.dump(spec, f)
    flags = "--xla_cpu_multi_thread_eigen=false" if threads == 1 else ""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), "--node", spec_path, tmp]
    with Cluster(nodes, rate, groups=groups, group_rate=group_rate, tag=tag) as cluster:
      results = cluster.run(cmd, env=env, timeout=spec["timeout"])
    bad = [r for r in results if r.returncode]
    if bad:
      raise RuntimeError(
        "node(s) failed:\n" + "\n".join(f"--- node {r.node}\n{r.stdout[-4000:]}" for r in bad)
      )
    outs = []
    for i in range(nodes):
      with open(os.path.join(tmp, f"node{i}.json"), encoding="utf-8") as f:
        outs.append(json.load(f))
  return outs


def algorithm_params(args):
  p = {
    "compute_only": {"lr": args.lr},
    "sync_sgd": {"lr": args.lr},
    "easgd": {"lr": args.lr, "tau": args.easgd_tau, "alpha": args.alpha},
    "nonblocking_easgd": {"lr": args.lr, "tau": args.easgd_tau, "alpha": args.alpha},
    "local_sgd_8": {"lr": args.lr, "tau": args.easgd_tau},
    "overlap_local_sgd": {"lr": args.lr, "tau": args.easgd_tau, "alpha": 0.5},
    "dpsgd_ring": {"lr": args.lr},
    "one_peer_exp": {"lr": args.lr},
    "matcha": {"lr": args.lr, "budget": 0.5, "seed": 0},
    "hierarchical": {"lr": args.lr, "tau": 2, "tau2": 8},
    "diloco": {"lr": args.lr, "tau": 8, "outer_lr": 0.7, "outer_momentum": 0.9},
  }
  for tau in (2, 8, 32):
    p[f"local_sgd_{tau}"] = {"lr": args.lr, "tau": tau}
  return p


def comm_per_step(name, k, m, nbytes, net, params, net_slow=None, lowered=False):
  r"""Modelled seconds of step k's communication (k from 1), α–β (coopjax.netmodel).

  ``nbytes`` is the model's size (the sharded step buckets the leaves into one
  collective), or a list of sizes, one message each. With
  ``net_slow`` (a grouped cluster) an all-reduce over all m nodes, and any
  ring shift, crosses the slow link between groups. ``lowered=True`` prices
  what the sharded step actually sends (its compiled HLO): MATCHA's active
  matching and the hierarchical group mean are two full ring shifts (±1),
  not one exchange within pairs.
  """
  import jax

  from coopjax import netmodel

  leaves = nbytes if isinstance(nbytes, (list, tuple)) else [nbytes]
  wide = net_slow or net

  def all_reduce(nodes, on):
    return sum(netmodel.allreduce_time(b, nodes, on) for b in leaves)

  def shifts(count, on):
    return count * sum(netmodel.neighbor_exchange_time(b, 1, on) for b in leaves)

  p = params[name]
  if name == "compute_only":
    return 0.0
  if name == "sync_sgd":
    return all_reduce(m, wide)
  if name.startswith("local_sgd") or name in ("easgd", "nonblocking_easgd", "diloco"):
    return all_reduce(m, wide) if k % p["tau"] == 0 else 0.0
  if name == "dpsgd_ring":
    return shifts(2, wide)  # two neighbours: a shift each way
  if name == "one_peer_exp":
    return shifts(1, wide)
  if name == "matcha":
    import coopjax
    from coopjax import topology
    from coopjax.algorithms._time_varying import matcha_flags

    design = coopjax.matcha_design(topology.ring(m), p["budget"])
    flags = np.asarray(matcha_flags(jax.random.key(p["seed"]), k, np.asarray(design.probabilities)))
    return float(flags.sum()) * shifts(2 if lowered else 1, wide)
  if name == "hierarchical":
    if k % p["tau2"] == 0:
      return all_reduce(m, wide)
    if k % p["tau"] == 0:
      return shifts(2, wide) if lowered else all_reduce(m // 2, net)
    return 0.0
  raise ValueError(name)


def summarize_times(times):
  t = np.asarray(times, np.float64)
  return {
    "median": float(np.median(t)),
    "p25": float(np.percentile(t, 25)),
    "p75": float(np.percentile(t, 75)),
    "min": float(t.min()),
    "max": float(t.max()),
    "all": t.tolist(),
  }


def smooth(x, w=8):
  x = np.asarray(x, np.float64)
  c = np.cumsum(np.insert(x, 0, 0.0))
  out = np.empty_like(x)
  for i in range(len(x)):
    lo = max(0, i - w + 1)
    out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
  return out


def compute_time(outs):
  """t_c: the slowest node's mean local-step time (the others wait for it at every mix)."""
  return float(max(np.mean(o["runs"]["compute_only"]["times"]) for o in outs))


def analyse_overlap(outs, t_c):
  """Period times (slowest node per period) of blocking, one-program and overlapped runs."""
  overlap = {}
  for name, res in outs[0]["overlap"].items():
    per_node = [o["overlap"][name] for o in outs]
    keys = list(res["times"])
    times = {k: np.mean([pn["times"][k] for pn in per_node], axis=0) for k in keys}
    t_reduce = float(np.median(np.max([pn["reduce_alone"] for pn in per_node], axis=0)))
    tau = res["tau"]
    t_local = tau * t_c
    blocking = float(np.median(times[keys[0]]))
    ours = float(np.median(times[keys[2]]))
    overlap[name] = {
      "tau": tau,
      "compute_step_s": t_c,
      "period_s": {k: summarize_times(v) for k, v in times.items()},
      "reduce_alone_s": t_reduce,
      "tau_local_steps_s": t_local,
      "speedup_overlapped_vs_blocking": blocking / ours,
      "speedup_one_program_vs_blocking": blocking / float(np.median(times[keys[1]])),
      "ceiling": (t_local + t_reduce) / max(t_local, t_reduce),
      "modelled_blocking_period_s": t_local + t_reduce,
      "modelled_nonblocking_period_s": max(t_local, t_reduce),
      "max_abs_diff_overlapped_vs_one_program": max(
        pn["max_abs_diff_overlapped_vs_one_program"] for pn in per_node
      ),
      # Overlap Local-SGD is not local SGD: only non-blocking EASGD has blocking iterates.
      "max_abs_diff_workers_vs_blocking": max(
        pn["max_abs_diff_workers_vs_blocking"] for pn in per_node
      )
      if name == "nonblocking_easgd"
      else None,
    }
  return overlap


def calibrate(flat, rate):
  """``(calibration, nets)``: (α, β) fitted to node 0's all-reduces; the nominal and fitted nets."""
  from benchmarks.cluster import node as cnode
  from coopjax import netmodel

  m = flat[0]["m"]
  cal = flat[0]["calibration"]
  sizes = [int(s) for s in cal["all_reduce"]]
  med = {kind: [float(np.median(cal[kind][str(s)])) for s in sizes] for kind in cal}
  alpha, beta = cnode.fit_alpha_beta(sizes, med["all_reduce"], m)
  nets = {
    "nominal": netmodel.NetworkModel(latency=1e-12, bandwidth=rate / 8),
    "calibrated": netmodel.NetworkModel(latency=max(alpha, 1e-12), bandwidth=1 / beta),
  }
  nets["calibrated_as_lowered"] = nets["calibrated"]
  calibration = {
    "sizes": sizes,
    "all_reduce_median_s": med["all_reduce"],
    "permute_median_s": med["permute"],
    "all_reduce_spread_s": [
      [min(cal["all_reduce"][str(s)]), max(cal["all_reduce"][str(s)])] for s in sizes
    ],
    "permute_spread_s": [[min(cal["permute"][str(s)]), max(cal["permute"][str(s)])] for s in sizes],
    "alpha_s": alpha,
    "beta_s_per_byte": beta,
    "fitted_bandwidth_mbit": 8 / beta / 1e6,
    "all_reduce_predicted_nominal_s": [
      netmodel.allreduce_time(s, m, nets["nominal"]) for s in sizes
    ],
    "all_reduce_predicted_calibrated_s": [
      netmodel.allreduce_time(s, m, nets["calibrated"]) for s in sizes
    ],
    "permute_predicted_nominal_s": [
      netmodel.neighbor_exchange_time(s, 1, nets["nominal"]) for s in sizes
    ],
    "permute_predicted_calibrated_s": [
      netmodel.neighbor_exchange_time(s, 1, nets["calibrated"]) for s in sizes
    ],
  }

  return calibration, nets


def analyse(flat, hier, args, params, extra_overlap=None):
  """Everything the figures and the summary need, from the node outputs."""
  from coopjax import netmodel

  m = flat[0]["m"]
  nbytes = flat[0]["model_bytes"]
  rate = args.rate_bits
  calibration, nets = calibrate(flat, rate)

  def mean_loss(outs, name):
    return np.mean([o["runs"][name]["losses"] for o in outs], axis=0)

  def step_times(outs, name):
    # Mean over nodes: its running sum is the mean of the nodes' clocks (which the collectives
    # keep together); a per-step maximum would add up every node's worst step.
    return np.mean([o["runs"][name]["times"] for o in outs], axis=0)

  t_c = compute_time(flat)
  rows = {}
  sources = [(flat, name) for name in flat[0]["runs"] if name != "compute_only"]
  if hier:
    sources += [(hier, name) for name in hier[0]["runs"] if name != "compute_only"]
  for outs, name in sources:
    key = name if outs is flat else f"{name} (grouped)"
    times = step_times(outs, name)
    steps = len(times)
    t_c_here = t_c if outs is flat else compute_time(hier)
    models = {}
    for which, net in nets.items():
      slow = None
      if outs is hier:
        slow = netmodel.NetworkModel(net.latency, net.bandwidth * args.group_rate_bits / rate)
      size = nbytes
      comm = np.array(
        [
          comm_per_step(
            name, k, m, size, net, params, slow, lowered=which == "calibrated_as_lowered"
          )
          for k in range(1, steps + 1)
        ]
      )
      models[which] = t_c_here + comm
    measured = float(np.mean(times))
    mixed = np.array(
      [
        comm_per_step(name, k, m, nbytes, nets["nominal"], params, slow) > 0
        for k in range(1, steps + 1)
      ]
    )
    rows[key] = {
      "measured_mix_step_median_s": float(np.median(times[mixed])) if mixed.any() else None,
      "measured_off_step_median_s": float(np.median(times[~mixed])) if (~mixed).any() else None,
      "modelled_mix_step_calibrated_s": float(np.median(models["calibrated"][mixed]))
      if mixed.any()
      else None,
      "steps": steps,
      "measured_step_s": measured,
      "measured_step_median_s": float(np.median(times)),
      "modelled_step_nominal_s": float(np.mean(models["nominal"])),
      "modelled_step_calibrated_s": float(np.mean(models["calibrated"])),
      "ratio_measured_to_nominal": measured / float(np.mean(models["nominal"])),
      "ratio_measured_to_calibrated": measured / float(np.mean(models["calibrated"])),
      "modelled_step_as_lowered_s": float(np.mean(models["calibrated_as_lowered"])),
      "ratio_measured_to_as_lowered": measured / float(np.mean(models["calibrated_as_lowered"])),
      "compute_step_s": t_c_here,
      "measured_time": np.cumsum(times).tolist(),
      "modelled_time_calibrated": np.cumsum(models["calibrated"]).tolist(),
      "loss": mean_loss(outs, name).tolist(),
    }
  # Time to sync SGD's final (smoothed) loss, measured.
  target = float(smooth(rows["sync_sgd"]["loss"])[-1]) if "sync_sgd" in rows else None
  for row in rows.values():
    s = smooth(row["loss"])
    hit = np.nonzero(s <= target)[0] if target is not None else []
    row["steps_to_target"] = int(hit[0]) + 1 if len(hit) else None
    row["time_to_target_s"] = float(row["measured_time"][hit[0]]) if len(hit) else None
    row["modelled_time_to_target_s"] = (
      float(row["modelled_time_calibrated"][hit[0]]) if len(hit) else None
    )
    sync_t = rows["sync_sgd"]["time_to_target_s"] if "sync_sgd" in rows else None
    row["speedup_vs_sync"] = (
      sync_t / row["time_to_target_s"] if sync_t and row["time_to_target_s"] else None
    )

  overlap = {f"m={m}": analyse_overlap(flat, t_c)} if flat[0].get("overlap") else {}
  for outs in extra_overlap or []:
    t_c_here = compute_time(outs)
    overlap[f"m={outs[0]['m']}"] = analyse_overlap(outs, t_c_here)
  return {
    "calibration": calibration,
    "compute_step_s": t_c,
    "target_loss": target,
    "rows": rows,
    "overlap": overlap,
  }


def save_figure(fig, path):
  """Lays out, writes (110 dpi) and closes a matplotlib figure."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_step_bars(names, bars, path, *, figsize, bottom=None, legend_fontsize=None):
  """One group of bars per run, in ms per step on a log scale, written to ``path``.

  ``bars``: ``(offset, heights in ms, ax.bar options)`` per bar of a group (width 0.2).
  """
  import matplotlib.pyplot as plt

  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=figsize)
  for offset, heights, options in bars:
    ax.bar(x + offset, heights, 0.2, **options)
  ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("ms per step")
  ax.set_yscale("log")
  if bottom is not None:
    ax.set_ylim(bottom=bottom)
  ax.legend(fontsize=legend_fontsize)
  save_figure(fig, path)


def plot(result, outdir):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["rows"]
  fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
  for i, (name, row) in enumerate(rows.items()):
    style = {"ls": "--" if "grouped" in name else "-", "color": plt.cm.tab20(i), "label": name}
    axes[0].plot(row["measured_time"], smooth(row["loss"]), **style)
    axes[1].plot(row["modelled_time_calibrated"], smooth(row["loss"]), **style)
  for ax, title in zip(
    axes, ["measured wall-clock (emulated cluster)", "modelled (t_c + calibrated α–β)"], strict=True
  ):
    if result["target_loss"] is not None:
      ax.axhline(result["target_loss"], color="k", lw=0.5)
    ax.set_xlabel("seconds")
    ax.set_title(title)
    ax.set_xscale("log")
  axes[0].set_ylabel("training loss (mean over workers, 8-step running mean)")
  axes[1].legend(fontsize=7)
  save_figure(fig, os.path.join(outdir, "loss_vs_time.png"))

  names = list(rows)
  ms = lambda key: [rows[n][key] * 1e3 for n in names]
  plot_step_bars(
    names,
    [
      (-0.3, ms("measured_step_s"), {"label": "measured"}),
      (0.3, ms("modelled_step_as_lowered_s"), {"label": "model, calibrated, as lowered (HLO)"}),
      (-0.1, ms("modelled_step_calibrated_s"), {"label": "model, calibrated α–β"}),
      (0.1, ms("modelled_step_nominal_s"), {"label": "model, nominal link"}),
    ],
    os.path.join(outdir, "model_vs_measured.png"),
    figsize=(12, 4.5),
  )

  panels = [
    (f"{mk}, {name}", res) for mk, d in result["overlap"].items() for name, res in d.items()
  ]
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8))
    axes = np.atleast_1d(axes)
    for ax, (name, res) in zip(axes, panels, strict=True):
      keys = list(res["period_s"])
      med = [res["period_s"][k]["median"] * 1e3 for k in keys]
      err = (
        np.array(
          [
            [
              res["period_s"][k]["median"] - res["period_s"][k]["p25"],
              res["period_s"][k]["p75"] - res["period_s"][k]["median"],
            ]
            for k in keys
          ]
        ).T
        * 1e3
      )
      ax.bar(range(len(keys)), med, yerr=err, capsize=4)
      ax.axhline(
        (res["tau_local_steps_s"] + res["reduce_alone_s"]) * 1e3,
        color="r",
        ls="--",
        lw=1,
        label="τ·t_c + T_reduce (serial)",
      )
      ax.axhline(
        max(res["tau_local_steps_s"], res["reduce_alone_s"]) * 1e3,
        color="g",
        ls="--",
        lw=1,
        label="max(τ·t_c, T_reduce) (ideal)",
      )
      ax.set_xticks(range(len(keys)), [k.replace(" (", "\n(") for k in keys], fontsize=8)
      ax.set_ylabel("ms per period (median, quartiles)")
      ax.set_title(
        f"{name}, τ = {res['tau']}: speed-up {res['speedup_overlapped_vs_blocking']:.2f}× (ceiling {res['ceiling']:.2f}×)",
        fontsize=9,
      )
      ax.legend(fontsize=7)
    save_figure(fig, os.path.join(outdir, "overlap.png"))


def write_summary(result, args, outdir, command):
  cal = result["calibration"]
  lines = [
    "# Measured wall-clock on an emulated cluster",
    "",
    f"`{command}`",
    "",
    f"m = {result['m']} nodes (one process, one CPU device, one worker each) at {args.rate}, "
    f"model {result['model_bytes'] / MIB:.2f} MiB (MLP {args.sizes}), per-worker batch "
    f"{args.batch}, SGD lr {args.lr}; hierarchical on two groups of {result['m'] // 2} "
    f"joined by {args.group_rate}. Two shared CPU cores host every node.",
    "",
    "## Calibration (ring all-reduce and one-step ring shift)",
    "",
    "| bytes | all-reduce measured ms (min–max) | nominal ms | calibrated ms | permute measured ms | nominal ms | calibrated ms |",
    "|---|---|---|---|---|---|---|",
  ]
  for i, s in enumerate(cal["sizes"]):
    lines.append(
      f"| {s} | {cal['all_reduce_median_s'][i] * 1e3:.1f} ({cal['all_reduce_spread_s'][i][0] * 1e3:.1f}–{cal['all_reduce_spread_s'][i][1] * 1e3:.1f}) "
      f"| {cal['all_reduce_predicted_nominal_s'][i] * 1e3:.1f} | {cal['all_reduce_predicted_calibrated_s'][i] * 1e3:.1f} "
      f"| {cal['permute_median_s'][i] * 1e3:.1f} | {cal['permute_predicted_nominal_s'][i] * 1e3:.1f} | {cal['permute_predicted_calibrated_s'][i] * 1e3:.1f} |"
    )
  lines += [
    "",
    f"Fitted to the all-reduces: α = {cal['alpha_s'] * 1e6:.0f} µs, 1/β = {cal['fitted_bandwidth_mbit']:.1f} Mbit/s "
    f"(link {args.rate}). The permutes are predicted from the same fit.",
    "",
    "## Per algorithm: time per step, measured and modelled",
    "",
    f"t_c (local step alone, the slowest node's mean) = {result['compute_step_s'] * 1e3:.1f} ms. Model = t_c + α–β time of the step's communication.",
    "",
    "| algorithm | measured ms/step | calibrated model | ratio | nominal model | ratio | as lowered (HLO) | ratio | measured ms per mixing step / other step | steps to sync's loss | measured s to it | speed-up vs sync |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in result["rows"].items():
    fmt = lambda v, f="{:.2f}": "—" if v is None else f.format(v)
    ms = lambda v: None if v is None else v * 1e3
    lines.append(
      f"| {name} | {r['measured_step_s'] * 1e3:.1f} | {r['modelled_step_calibrated_s'] * 1e3:.1f} | {r['ratio_measured_to_calibrated']:.2f} "
      f"| {r['modelled_step_nominal_s'] * 1e3:.1f} | {r['ratio_measured_to_nominal']:.2f} "
      f"| {r['modelled_step_as_lowered_s'] * 1e3:.1f} | {r['ratio_measured_to_as_lowered']:.2f} "
      f"| {fmt(ms(r['measured_mix_step_median_s']), '{:.0f}')} / {fmt(ms(r['measured_off_step_median_s']), '{:.0f}')} "
      f"| {fmt(r['steps_to_target'], '{}')} "
      f"| {fmt(r['time_to_target_s'])} | {fmt(r['speedup_vs_sync'])} |"
    )
  panels = [
    (f"{mk}, {name}", res) for mk, d in result["overlap"].items() for name, res in d.items()
  ]
  if panels:
    lines += ["", "## Overlap: period time, blocking against non-blocking", ""]
    for name, res in panels:
      lines += [
        f"### {name}, τ = {res['tau']}",
        "",
        f"τ·t_c = {res['tau_local_steps_s'] * 1e3:.0f} ms, reduction alone = {res['reduce_alone_s'] * 1e3:.0f} ms, "
        f"ceiling (τ·t_c + T)/max(τ·t_c, T) = {res['ceiling']:.2f}×.",
        "",
        "| program | median ms/period | min | max |",
        "|---|---|---|---|",
      ]
      for k, v in res["period_s"].items():
        lines.append(
          f"| {k} | {v['median'] * 1e3:.0f} | {v['min'] * 1e3:.0f} | {v['max'] * 1e3:.0f} |"
        )
      lines += [
        "",
        f"Speed-up over blocking: overlapped {res['speedup_overlapped_vs_blocking']:.2f}×, "
        f"one program {res['speedup_one_program_vs_blocking']:.2f}×. Iterates: overlapped vs one program "
        f"max |Δ| = {res['max_abs_diff_overlapped_vs_one_program']:.1e}; worker rows vs the blocking algorithm "
        "max |Δ| = "
        + (
          "n/a (not the same algorithm)"
          if res["max_abs_diff_workers_vs_blocking"] is None
          else f"{res['max_abs_diff_workers_vs_blocking']:.1e}"
        )
        + ".",
        "",
      ]
  with open(os.path.join(outdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--node", nargs=2, metavar=("SPEC", "OUTDIR"), help=argparse.SUPPRESS)
  parser.add_argument(
    "--preset",
    choices=("all", "streaming"),
    default="all",
    help="streaming: DiLoCo vs Streaming DiLoCo and compressed gossip/averaging "
    "(experiments/cluster_streaming.py)",
  )
  parser.add_argument("--repeats", type=int, default=2, help="--preset streaming: runs of each")
  parser.add_argument("--diloco-steps", type=int, default=160, help="--preset streaming")
  parser.add_argument("--gossip-steps", type=int, default=96, help="--preset streaming")
  parser.add_argument("--compute-steps", type=int, default=32, help="--preset streaming")
  parser.add_argument("--nodes", type=int, default=4)
  parser.add_argument("--rate", default="100mbit")
  parser.add_argument("--group-rate", default="50mbit")
  parser.add_argument(
    "--sizes",
    default=None,
    help="MLP layer sizes (64,512,448,10; streaming: 64,288,288,288,288,10)",
  )
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--alpha", type=float, default=0.2)
  parser.add_argument("--easgd-tau", type=int, default=8)
  parser.add_argument(
    "--steps", type=int, default=48, help="sync SGD's steps; others run twice as many"
  )
  parser.add_argument("--overlap-periods", type=int, default=10)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--algorithms", default=None, help="comma list (default: all)")
  parser.add_argument("--skip-overlap", action="store_true")
  parser.add_argument("--skip-hierarchical", action="store_true")
  parser.add_argument(
    "--overlap-nodes", type=int, default=2, help="extra overlap-only cluster size (0: none)"
  )
  parser.add_argument(
    "--threads",
    type=int,
    default=1,
    help="compute threads per node (1: XLA's Eigen single-threaded; each node a one-core host)",
  )
  parser.add_argument(
    "--outdir",
    default=None,
    help="default experiments/results/cluster/ (streaming: experiments/results/cluster_streaming/)",
  )
  parser.add_argument(
    "--reanalyse", default=None, help="recompute tables and figures from a results.json's raw data"
  )
  args = parser.parse_args(argv)
  if args.node:
    return node_main(*args.node)
  streaming = args.preset == "streaming"
  if args.reanalyse:
    with open(args.reanalyse, encoding="utf-8") as f:
      saved = json.load(f)
    old = argparse.Namespace(**saved["result"]["args"])
    raw = saved["raw"]
    command = saved["result"]["command"]
    outdir = args.outdir or os.path.dirname(os.path.abspath(args.reanalyse))
    if getattr(old, "preset", "all") == "streaming":
      import cluster_streaming

      return cluster_streaming.finish(raw["flat"], old, command, outdir)
    return finish(raw["flat"], raw["grouped"], raw.get("overlap") or [], old, command, outdir)
  from benchmarks.cluster import parse_rate

  if args.sizes is None:
    args.sizes = "64,288,288,288,288,10" if streaming else "64,512,448,10"
  if args.outdir is None:
    leaf = "cluster_streaming" if streaming else "cluster"
    args.outdir = os.path.join(ROOT, "experiments", "results", leaf)
  if streaming:
    import cluster_streaming

    if args.quick:
      args.repeats, args.diloco_steps, args.gossip_steps, args.reps = 1, 64, 32, 3
    args.rate_bits = parse_rate(args.rate)
    command = "python experiments/cluster_compare.py " + " ".join(
      argv if argv is not None else sys.argv[1:]
    )
    return cluster_streaming.main(args, command)
  if args.quick:
    args.steps, args.overlap_periods, args.reps = 16, 3, 3
  args.rate_bits = parse_rate(args.rate)
  args.group_rate_bits = parse_rate(args.group_rate)
  params = algorithm_params(args)
  n = args.steps
  names = [
    "compute_only",
    "sync_sgd",
    "local_sgd_2",
    "local_sgd_8",
    "local_sgd_32",
    "easgd",
    "nonblocking_easgd",
    "dpsgd_ring",
    "one_peer_exp",
    "matcha",
    "diloco",
  ]
  if args.algorithms:
    names = ["compute_only"] + [a for a in args.algorithms.split(",") if a != "compute_only"]
  runs = [(name, n if name in ("sync_sgd", "compute_only") else 2 * n) for name in names]
  overlap_pairs = [["easgd", "nonblocking_easgd"], ["local_sgd_8", "overlap_local_sgd"]]
  base = {
    "mlp_sizes": [int(s) for s in args.sizes.split(",")],
    "cal_sizes": [4096, 65536, MIB // 4, MIB, 4 * MIB],
    "batch": args.batch,
    "params": params,
    "reps": args.reps,
    "warmup_max": 32,
    "timeout": 1800,
    "overlap_periods": args.overlap_periods,
  }
  command = "python experiments/cluster_compare.py " + " ".join(
    argv if argv is not None else sys.argv[1:]
  )
  t0 = time.time()
  spec = dict(
    base,
    calibrate=True,
    algorithms=runs,
    overlap=None if args.skip_overlap else overlap_pairs,
  )
  flat = run_cluster(spec, args.nodes, args.rate, threads=args.threads)
  print(f"flat cluster done in {time.time() - t0:.0f} s", flush=True)
  hier = None
  if not args.skip_hierarchical:
    hspec = dict(base, calibrate=False, overlap=None)
    hspec["algorithms"] = [("compute_only", n), ("hierarchical", 2 * n), ("local_sgd_8", 2 * n)]
    hier = run_cluster(
      hspec,
      args.nodes,
      args.rate,
      groups=args.nodes // 2,
      group_rate=args.group_rate,
      tag="grp",
      threads=args.threads,
    )
    print(f"grouped cluster done in {time.time() - t0:.0f} s", flush=True)
  extra = []
  if args.overlap_nodes and not args.skip_overlap and args.overlap_nodes != args.nodes:
    ospec = dict(base, calibrate=False, overlap=overlap_pairs, algorithms=[("compute_only", n)])
    extra.append(run_cluster(ospec, args.overlap_nodes, args.rate, tag="ovl", threads=args.threads))
    print(f"overlap cluster done in {time.time() - t0:.0f} s", flush=True)
  finish(flat, hier, extra, args, command, args.outdir)


def _args(args):
  return {k: v for k, v in vars(args).items() if k not in ("node", "reanalyse")}


def analyse_and_write(raw, args, command, outdir, analyse_fn, plot_fn, summary_fn, **extra):
  """results.json (first the raw node outputs alone, so that they survive a failing analysis;
  then with the analysis, the command, the arguments and ``extra``), the figures and
  summary.md. Returns the analysis."""
  os.makedirs(outdir, exist_ok=True)
  path = os.path.join(outdir, "results.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"result": {"args": _args(args), "command": command}, "raw": raw}, f)
  result = analyse_fn()
  result.update(command=command, args=_args(args), **extra)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"result": result, "raw": raw}, f)
  plot_fn(result, outdir)
  print(summary_fn(result, args, outdir, command))
  return result


def finish(flat, hier, extra, args, command, outdir):
  """Analyses the node outputs and writes results.json, the figures and summary.md."""

  def analysis():
    result = analyse(flat, hier, args, algorithm_params(args), extra)
    result.update(m=flat[0]["m"], model_bytes=flat[0]["model_bytes"])
    return result

  raw = {"flat": flat, "grouped": hier, "overlap": extra}
  analyse_and_write(raw, args, command, outdir, analysis, plot, write_summary)


if __name__ == "__main__":
  main()
