"""A process SIGKILLed mid-run: the survivors drop its workers and finish the run.

Starts ``--processes`` CPU processes (one device and one worker each, gloo
collectives, :func:`coopjax.distributed.initialize` with ``recoverable=True``)
running :func:`coopjax.distributed.resilient_loop` on a least-squares problem
(local SGD with momentum, D-PSGD on a ring, or EASGD). When the victim (never
process 0, whose loss is fatal) has printed step ``--kill-at``, it is
SIGKILLed. The survivors rebuild the mesh, drop the victim's rows from X and
the optimizer state, rebuild the algorithm for m′ = m − 1 (W of the ring for
m′, EASGD's α rescaled by ``coopjax.elastic.scale_alpha``), re-split the data
over m′ workers and run the remaining steps.

Written to JSON: the survivors' rows of X and of the momentum, the NumPy
reference that drops the victim's rows at the failed step (:func:`numpy_reference`)
and the largest difference, and the times measured from the kill (one
machine, one clock):

* ``detection_seconds``: kill → the survivors get ``ProcessFailureError``
  (bounded by ``--heartbeat``, the coordination service's timeout);
* ``recovery_seconds``: kill → the first step completed on the survivors
  (detection, rebuild, recompilation and the step itself).

With ``--repeats R`` these are medians over R independent runs (all values
are kept in ``*_all``); the rows written are those of the first run, and the
error is the largest over all runs.

Usage::

  python benchmarks/bench_failover.py --repeats 3 --out benchmarks/results/failover_cpu3.json
  python benchmarks/bench_failover.py --algorithm easgd --victim 1 --repeats 3 \
    --out benchmarks/results/failover_cpu3_easgd.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ("local_sgd", "dpsgd", "easgd")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="JSON output path (default: print only)")
  p.add_argument("--processes", type=int, default=3, help="processes = devices = workers m")
  p.add_argument("--victim", type=int, default=2, help="the process to kill (not 0)")
  p.add_argument("--kill-at", type=int, default=10, help="kill once the victim printed this step")
  p.add_argument("--steps", type=int, default=40, help="steps of the whole run")
  p.add_argument("--algorithm", choices=ALGORITHMS, default="local_sgd")
  p.add_argument("--tau", type=int, default=2, help="steps between mixes (local SGD, EASGD)")
  p.add_argument("--alpha", type=float, default=0.2, help="EASGD's α for the initial m")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--examples", type=int, default=96)
  p.add_argument("--dim", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--heartbeat", type=int, default=5, help="heartbeat_timeout_seconds")
  p.add_argument("--step-sleep", type=float, default=0.05, help="pause after each step (s)")
  p.add_argument("--timeout", type=float, default=120.0, help="hard limit for the whole run (s)")
  p.add_argument("--repeats", type=int, default=1, help="independent runs (a fresh port each)")
  p.add_argument("--worker", nargs=3, metavar=("PID", "PORT", "OUT"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if not 0 < args.victim < args.processes:
    p.error(f"--victim must be in [1, {args.processes}): process 0 hosts the coordinator.")
  if not 0 < args.kill_at < args.steps:
    p.error("--kill-at must lie between 0 and --steps.")
  return args


# -- the problem, the algorithms and the NumPy reference --------------------------------------


def problem(args):
  from coopjax.training import data

  return data.least_squares(num_examples=args.examples, dim=args.dim, seed=args.seed)


def make_tx_factory(args):
  import optax

  import coopjax
  from coopjax import elastic
  from coopjax import topology

  local = optax.sgd(args.lr, momentum=args.momentum)
  m0 = args.processes

  def make_tx(m):
    if args.algorithm == "local_sgd":
      return coopjax.local_sgd(local, tau=args.tau, num_workers=m)
    if args.algorithm == "dpsgd":
      return coopjax.dpsgd(local, W=topology.ring(m))
    alpha = elastic.scale_alpha(args.alpha, m0, m)
    return coopjax.easgd(local, tau=args.tau, alpha=alpha, num_workers=m)

  return make_tx


def numpy_w(algorithm: str, m: int, alpha0: float, m0: int) -> np.ndarray:
  """W for m workers, written out (the ring as (I + P + Pᵀ)/3; EASGD's W_α)."""
  if algorithm == "local_sgd":
    return np.full((m, m), 1.0 / m)
  if algorithm == "dpsgd":
    W = np.zeros((m, m))
    for i in range(m):
      for j in (i - 1, i, i + 1):
        W[i, j % m] += 1.0 / 3.0
    return W
  alpha = alpha0 * (m0 + 1) / (m + 1)
  W = np.zeros((m + 1, m + 1))
  W[:m, :m] = (1 - alpha) * np.eye(m)
  W[:m, m] = W[m, :m] = alpha
  W[m, m] = 1 - m * alpha
  return W


def numpy_reference(args, fail_step: int, dropped) -> tuple[np.ndarray, np.ndarray]:
  """X (workers, then EASGD's anchor) and the momentum after ``--steps`` steps, in float64.

  ``m = --processes`` workers up to step ``fail_step − 1``; then the rows in
  ``dropped`` are removed (models and momentum), the data re-split over the
  workers left from that step on, and the run continues with W for m′.
  """
  from coopjax.training import data

  p = problem(args)
  m, v = args.processes, int(args.algorithm == "easgd")
  tau = 1 if args.algorithm == "dpsgd" else args.tau
  X = np.zeros((m + v, args.dim))
  buf = np.zeros((m, args.dim))
  split = lambda m: data.split_iid(args.examples, m, seed=args.seed)  # noqa: E731
  batches = data.make_worker_batches(
    p.x, p.y, split(m), args.batch_size, args.seed, keys=("x", "y")
  )
  for k in range(1, args.steps + 1):
    if k == fail_step:
      keep = [i for i in range(m) if i not in set(dropped)]
      X, buf, m = np.vstack([X[keep], X[m:]]), buf[keep], len(keep)
      batches = batches.resplit(split(m))
    batch = next(batches)
    xb, yb = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    G = np.stack([xb[i].T @ (xb[i] @ X[i] - yb[i]) / args.batch_size for i in range(m)])
    buf = G + args.momentum * buf
    X[:m] -= args.lr * buf
    if k % tau == 0:
      X = numpy_w(args.algorithm, m, args.alpha, args.processes).T @ X
  return X, buf


# -- one process -------------------------------------------------------------------------------


def worker(args) -> None:
  pid, port, out_path = int(args.worker[0]), int(args.worker[1]), args.worker[2]
  from coopjax.parallel import distributed

  distributed.initialize(
    f"127.0.0.1:{port}",
    num_processes=args.processes,
    process_id=pid,
    num_cpu_devices=1,
    heartbeat_timeout_seconds=args.heartbeat,
    shutdown_timeout_seconds=5,
    initialization_timeout=60,
    recoverable=True,
  )
  import jax

  import coopjax
  from coopjax.training import data

  p = problem(args)
  make_tx = make_tx_factory(args)
  make_shards = lambda m: data.split_iid(args.examples, m, seed=args.seed)  # noqa: E731
  m = args.processes
  tx = make_tx(m)
  mesh = coopjax.worker_mesh()
  X = coopjax.shard(coopjax.replicate(np.zeros(args.dim, np.float32), tx), mesh, tx)
  opt_state = coopjax.sharding.init(tx, X, mesh)
  batches = data.make_worker_batches(
    p.x, p.y, make_shards(m), args.batch_size, args.seed, keys=("x", "y")
  )

  def on_step(k, metrics):
    print(f"step {k}", flush=True)
    time.sleep(args.step_sleep)

  out = distributed.resilient_loop(
    data.least_squares_loss,
    tx,
    X,
    opt_state,
    batches,
    make_tx=make_tx,
    make_shards=make_shards,
    num_steps=args.steps,
    mesh=mesh,
    step_options=dict(with_consensus=False, with_grad_norm=False),
    on_step=on_step,
  )
  devices = list(out.mesh.devices.flat)
  trace = [
    x for x in jax.tree.leaves(coopjax.algorithms.find_state(out.opt_state).local_state) if x.ndim
  ][0]
  rows = {}
  for name, leaf in (("X", out.X), ("momentum", trace)):
    for shard in leaf.addressable_shards:
      rows.setdefault(name, []).append(
        {"position": devices.index(shard.device), "rows": np.asarray(shard.data).tolist()}
      )
  result = {
    "process": pid,
    "num_workers": out.tx.layout.num_workers,
    "steps": int(coopjax.step_count(out.opt_state).addressable_data(0)),
    "failures": [f._asdict() for f in out.failures],
    "rows": rows,
  }
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f)
  distributed.shutdown()
  print("done", flush=True)


# -- the parent ---------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _assemble(results, name: str, v: int) -> np.ndarray:
  blocks = sorted((b for r in results for b in r["rows"][name]), key=lambda b: b["position"])
  rows = [np.asarray(b["rows"]) for b in blocks]
  b = rows[0].shape[0] - v
  workers = np.concatenate([r[:b] for r in rows])
  return np.concatenate([workers, rows[0][b:]]) if v else workers


def run(args) -> dict:
  """Starts the processes, kills the victim, collects and checks the survivors' rows."""
  workdir = tempfile.mkdtemp(prefix="failover-")
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
    [ROOT] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
  )
  argv = _forward(args)
  procs, logs = [], []
  for i in range(args.processes):
    out = os.path.join(workdir, f"out{i}.json")
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          "-u",
          os.path.abspath(__file__),
          *argv,
          "--worker",
          str(i),
          str(port),
          out,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
    logs.append([])
  killed = threading.Event()
  kill_time = [None]

  def read(i):
    for line in procs[i].stdout:
      logs[i].append(line)
      if i == args.victim and line.strip() == f"step {args.kill_at}" and not killed.is_set():
        procs[i].send_signal(signal.SIGKILL)
        kill_time[0] = time.time()
        killed.set()

  readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(args.processes)]
  for t in readers:
    t.start()
  deadline = time.monotonic() + args.timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
  for t in readers:
    t.join(timeout=5)
  survivors = [i for i in range(args.processes) if i != args.victim]
  text = {i: "".join(logs[i]) for i in range(args.processes)}
  if not killed.is_set():
    raise RuntimeError(
      f"the victim never reached step {args.kill_at}:\n{text[args.victim][-3000:]}"
    )
  bad = [i for i in survivors if procs[i].returncode != 0]
  if bad:
    raise RuntimeError(
      "survivor(s) failed:\n" + "\n".join(f"-- process {i}:\n{text[i][-3000:]}" for i in bad)
    )
  results = []
  for i in survivors:
    with open(os.path.join(workdir, f"out{i}.json"), encoding="utf-8") as f:
      results.append(json.load(f))
  failures = [r["failures"] for r in results]
  if (
    any(len(f) != 1 for f in failures)
    or len({(f[0]["step"], tuple(f[0]["dropped_workers"])) for f in failures}) != 1
  ):
    raise RuntimeError(f"the survivors disagree on the failure (or saw none): {failures}")
  failure = failures[0][0]
  v = int(args.algorithm == "easgd")
  X = _assemble(results, "X", v)
  momentum = _assemble(results, "momentum", 0)
  X_ref, momentum_ref = numpy_reference(args, failure["step"], failure["dropped_workers"])
  kill = kill_time[0]
  return {
    "benchmark": "failover",
    "algorithm": args.algorithm,
    "processes": args.processes,
    "victim": args.victim,
    "kill_after_step": args.kill_at,
    "steps": args.steps,
    "heartbeat_timeout_seconds": args.heartbeat,
    "failed_step": failure["step"],
    "dropped_workers": failure["dropped_workers"],
    "num_workers_after": failure["new_num_workers"],
    "survivor_steps": [r["steps"] for r in results],
    "detection_seconds": max(r["failures"][0]["detected_at"] for r in results) - kill,
    "recovery_seconds": max(r["failures"][0]["resumed_at"] for r in results) - kill,
    "rebuild_and_step_seconds": max(
      r["failures"][0]["resumed_at"] - r["failures"][0]["detected_at"] for r in results
    ),
    "X": X.tolist(),
    "X_reference": X_ref.tolist(),
    "momentum": momentum.tolist(),
    "momentum_reference": momentum_ref.tolist(),
    "max_abs_error_X": float(np.max(np.abs(X - X_ref))),
    "max_abs_error_momentum": float(np.max(np.abs(momentum - momentum_ref))),
    "python": platform.python_version(),
    "command": "python benchmarks/bench_failover.py " + " ".join(_forward(args)),
  }


def _forward(args) -> list[str]:
  """The options a worker process needs, as command-line arguments."""
  out = []
  for name in (
    "processes", "victim", "kill_at", "steps", "algorithm", "tau", "alpha", "lr", "momentum",
    "batch_size", "examples", "dim", "seed", "heartbeat", "step_sleep",
  ):  # fmt: skip
    out += ["--" + name.replace("_", "-"), str(getattr(args, name))]
  return out


def main(argv=None) -> dict | None:
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return None
  runs = [run(args) for _ in range(max(1, args.repeats))]
  result = dict(runs[0])
  for name in ("detection_seconds", "recovery_seconds", "rebuild_and_step_seconds"):
    values = [r[name] for r in runs]
    result[name] = float(np.median(values))
    result[name.replace("_seconds", "_seconds_all")] = values
  result["max_abs_error_X"] = max(r["max_abs_error_X"] for r in runs)
  result["max_abs_error_momentum"] = max(r["max_abs_error_momentum"] for r in runs)
  result["repeats"] = len(runs)
  result["command"] += f" --repeats {len(runs)}"
  result["failed_steps_all"] = [r["failed_step"] for r in runs]
  summary = {k: result[k] for k in result if not k.startswith(("X", "momentum"))}
  print(json.dumps(summary, indent=1))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
