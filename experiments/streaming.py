r"""DiLoCo vs Streaming DiLoCo (P = 1, 2, 4; float32 and 4-bit outer gradients) on digits.

  python experiments/streaming.py            # m = 4, an MLP on digits, CPU, about a minute
  python experiments/streaming.py --quick    # 40 steps into a temporary folder

Every run has the same data, model (an MLP of four hidden layers of 48, whose
four large kernels make P = 4 fragments of near-equal size), inner optimizer
(SGD with momentum 0.9) and outer optimizer (Nesterov, lr 0.7, momentum 0.9):

* DiLoCo with period H (:func:`coopjax.diloco`);
* Streaming DiLoCo (:func:`coopjax.streaming_diloco`, torchft's schedule) with
  the same H, P ∈ {1, 2, 4} fragments, an overlap of τ = 1 inner step and
  α = 0.5, with float32 outer gradients and with ``coopjax.compress.int4()``.

For each run it records the workers' mean training loss at every step, the
bytes each worker has sent (``tx.comm(k, state).bytes_sent``), the modelled
wall clock, the bytes of one sync (the peak a worker sends at once) and the
final test accuracy of the outer model ``x_start``.

Modelled time (:mod:`coopjax.cost.netmodel`): a fixed compute time per inner
step plus each sync's collective priced by :func:`coopjax.netmodel.mix_time`
(a ring all-reduce of the fragment's wire bytes). DiLoCo's sync blocks the
step that mixes. A Streaming DiLoCo sync starts at its snapshot and must have
arrived at its apply step, τ steps later:

.. math::

   t \mathrel{+}= t_c \text{ per step}, \qquad
   \text{done}_n = t(s_n) + T_{\text{sync}}, \qquad t(a_n) \leftarrow \max(t(a_n), \text{done}_n).

Writes ``results.json``, ``loss.png`` (loss against steps, bytes sent and
modelled time) and ``summary.md`` to ``--out`` (default
``experiments/results/streaming/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import coopjax
from coopjax import compress
from coopjax import data
from coopjax import models
from coopjax.cost import netmodel

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import train  # noqa: E402

__all__ = ["RUNS", "run_one", "run_all", "streaming_clock", "main"]

#: (label, algorithm options); "diloco" or Streaming DiLoCo's P and bits.
RUNS = (
  ("DiLoCo", {"algorithm": "diloco"}),
  ("Streaming P=1", {"fragments": 1, "bits": 0}),
  ("Streaming P=2", {"fragments": 2, "bits": 0}),
  ("Streaming P=4", {"fragments": 4, "bits": 0}),
  ("Streaming P=1 int4", {"fragments": 1, "bits": 4}),
  ("Streaming P=2 int4", {"fragments": 2, "bits": 4}),
  ("Streaming P=4 int4", {"fragments": 4, "bits": 4}),
)

DEFAULTS = dict(
  num_workers=4,
  H=16,
  delay=1,
  alpha=0.5,
  steps=600,
  batch_size=32,
  lr=0.02,
  hidden=(48, 48, 48, 48),
  compute_time=1e-3,  # seconds charged per inner step
  latency=100e-6,
  bandwidth=1.25e7,  # bytes/s: 100 Mbit/s, a low-bandwidth link
  seed=0,
)


def make_tx(options: dict, cfg: dict):
  """The run's transformation."""
  local = optax.sgd(cfg["lr"], momentum=0.9)
  outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  m = cfg["num_workers"]
  if options.get("algorithm") == "diloco":
    return coopjax.diloco(local, outer=outer, tau=cfg["H"], num_workers=m)
  bits = options.get("bits", 0)
  return coopjax.streaming_diloco(
    local,
    outer=outer,
    H=cfg["H"],
    fragments=options["fragments"],
    delay=cfg["delay"],
    alpha=cfg["alpha"],
    compressor={0: None, 4: compress.int4, 8: compress.int8}[bits]() if bits else None,
    num_workers=m,
  )


def streaming_clock(compute_time: float, issue: dict, consume: dict, steps: int) -> np.ndarray:
  """Cumulative modelled time after each step, a sync issued at one step and awaited at another.

  Args:
    compute_time: seconds per inner step.
    issue: step → seconds of the collective started after that step.
    consume: step → the issuing step whose collective must have arrived after it.
    steps: number of steps.

  Examples:
    >>> streaming_clock(1.0, {2: 2.5}, {2: 2}, 3).tolist()  # blocking: issued and awaited at 2
    [1.0, 4.5, 5.5]
    >>> streaming_clock(1.0, {2: 2.5}, {3: 2}, 3).tolist()  # awaited one step later
    [1.0, 2.0, 4.5]
  """
  clock, done, out = 0.0, {}, []
  for k in range(1, steps + 1):
    clock += compute_time
    if k in issue:
      done[k] = clock + issue[k]
    if k in consume:
      clock = max(clock, done.pop(consume[k]))
    out.append(clock)
  return np.asarray(out)


def run_one(label: str, options: dict, cfg: dict, ds=None) -> dict:
  """Trains one run and returns its record (losses, bytes, modelled time, accuracy)."""
  ds = data.load_digits() if ds is None else ds
  m = cfg["num_workers"]
  model = models.MLP(features=tuple(cfg["hidden"]), num_classes=ds.num_classes)
  params = model.init(jax.random.key(cfg["seed"]), jnp.zeros((1, *ds.train_x.shape[1:])))
  loss_fn = models.make_loss_fn(model)
  tx = make_tx(options, cfg)
  X = coopjax.replicate(params, m)
  state = tx.init(X)
  step = coopjax.make_step(loss_fn, tx, with_consensus=False, with_grad_norm=False)
  batches = data.make_worker_batches(
    ds.train_x, ds.train_y, data.split_iid(len(ds.train_y), m, cfg["seed"]), cfg["batch_size"]
  )
  model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  net = netmodel.NetworkModel(cfg["latency"], cfg["bandwidth"])
  losses, sent, costs = [], [], {}
  total = 0.0
  start = time.perf_counter()
  for k in range(1, cfg["steps"] + 1):
    X, state, metrics = step(X, state, next(batches))
    cost = tx.comm(k, state)
    if cost.collective != "none":
      costs[k] = cost
      total += cost.bytes_sent(model_bytes)
    losses.append(float(metrics["loss"]))
    sent.append(total)
  wall = time.perf_counter() - start
  if options.get("algorithm") == "diloco":
    issue = {k: netmodel.mix_time(c, model_bytes, net) for k, c in costs.items()}
    consume = {k: k for k in costs}
    per_sync = model_bytes
  else:
    delay = cfg["delay"]
    issue = {k - delay: netmodel.mix_time(c, model_bytes, net) for k, c in costs.items()}
    consume = {k: k - delay for k in costs}
    per_sync = tx.bytes_per_sync(params)
  clock = streaming_clock(cfg["compute_time"], issue, consume, cfg["steps"])
  outer_model = state.x_start
  acc = models.evaluate(model, outer_model, ds.test_x, ds.test_y)["accuracy"]
  return {
    "label": label,
    "options": options,
    "loss": losses,
    "bytes_sent": sent,
    "modelled_time": clock.tolist(),
    "bytes_per_sync": int(per_sync),
    "sync_time_s": float(max(issue.values())) if issue else 0.0,
    "syncs": len(costs),
    "model_bytes": int(model_bytes),
    "test_accuracy": float(acc),
    "final_loss": float(np.mean(losses[-20:])),
    "measured_wallclock_s": wall,
  }


def run_all(cfg: dict, runs=RUNS) -> list[dict]:
  ds = data.load_digits()
  return [run_one(label, options, cfg, ds) for label, options in runs]


def _plot(results: list[dict], outdir: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for r in results:
    steps = np.arange(1, len(r["loss"]) + 1)
    smooth = np.convolve(r["loss"], np.ones(10) / 10, mode="same")
    style = "--" if "int4" in r["label"] else "-"
    xs = (steps, np.asarray(r["bytes_sent"]) / 1e6, r["modelled_time"])
    for ax, x in zip(axes, xs, strict=True):
      ax.plot(x, smooth, style, label=r["label"])
  names = ("inner steps", "MB sent per worker", "modelled time (s)")
  for ax, name in zip(axes, names, strict=True):
    ax.set_xlabel(name)
    ax.set_ylabel("training loss (workers' mean, 10-step average)")
    ax.set_yscale("log")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, "loss.png"))
  plt.close(fig)


def _table(results: list[dict], cfg: dict) -> str:
  rows = [
    f"m = {cfg['num_workers']}, H = {cfg['H']}, τ = {cfg['delay']}, α = {cfg['alpha']}, "
    f"{cfg['steps']} steps; network {cfg['bandwidth'] * 8 / 1e6:g} Mbit/s, "
    f"{cfg['latency'] * 1e6:g} µs; compute {cfg['compute_time'] * 1e3:g} ms/step",
    "",
    "| run | bytes per sync (peak) | one sync (ms) | MB sent | modelled time (s) | final loss "
    "| test accuracy |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    rows.append(
      f"| {r['label']} | {r['bytes_per_sync']} ({r['bytes_per_sync'] / r['model_bytes']:.3f}"
      f" model) | {r['sync_time_s'] * 1e3:.2f} | {r['bytes_sent'][-1] / 1e6:.3f} | {r['modelled_time'][-1]:.3f} | "
      f"{r['final_loss']:.4f} | {r['test_accuracy']:.4f} |"
    )
  return "\n".join(rows)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "streaming"))
  parser.add_argument("--quick", action="store_true", help="40 steps into a temporary folder")
  parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
  args = parser.parse_args(argv)
  cfg = dict(DEFAULTS, steps=40 if args.quick else args.steps)
  out = tempfile.mkdtemp() if args.quick else args.out
  os.makedirs(out, exist_ok=True)
  results = run_all(cfg)
  train.write_results(out, {"config": cfg, "runs": results}, _table(results, cfg))
  _plot(results, out)
  print(f"written to {out}")
  return results


if __name__ == "__main__":
  main()
