r"""Training loss vs iterations and vs modelled wall-clock: the seed's comparison.

  python experiments/compare.py                         # digits, m = 8, MLP, CPU, ~1–2 min
  python experiments/compare.py --quick                 # a 20-step smoke run into a temp folder
  python experiments/compare.py --preset cifar10_vgg16 --data_dir DIR   # the paper's setup (GPU)

Runs, with the same data, model, local SGD and learning rate,

* fully synchronous SGD, A(1, J, 0);
* periodic averaging (PASGD / local SGD) with τ ∈ {2, 8, 32}, A(τ, J, 0);
* EASGD, A(τ, W_α, 1), blocking, and non-blocking EASGD (the same iterates;
  its anchor all-reduce overlaps the next τ local steps);
* D-PSGD on a ring, A(1, W_ring, 0);

sync SGD runs ``num_steps`` steps and sets the target (its final training
loss); every other algorithm runs twice as many steps (``budget``), so that
it can reach the target even if it needs more iterations;

through ``experiments/train.py`` and writes to ``--out`` (default
``experiments/results/compare/``): ``loss_vs_iterations.png``,
``loss_vs_wallclock.png``, ``nonblocking_easgd.png``, ``results.json`` and
``summary.md`` (the table also printed).

Modelled wall-clock. Each algorithm's local step is the same computation, so
every run is charged the same fixed compute time per step :math:`t_c`
(``config.compute_time``, ``--compute_time``; default 1 ms, about this
machine's measured step), so that timing noise from other processes does not
decide the ranking, plus its communication in the α–β model
(:mod:`coopjax.netmodel`, the transformation's own ``tx.comm``): a ring
all-reduce of the B-byte model costs :math:`2(m-1)\alpha + 2\frac{m-1}{m}B\beta`,
a ring exchange :math:`2(\alpha + B\beta)`; blocking mixes add to the step,
non-blocking ones overlap the next steps
(:func:`coopjax.netmodel.modelled_wallclock`). The network is the one every
CLI uses by default (latency 100 µs, 1 Gbit/s), which makes sync SGD
communication-bound: one all-reduce costs more than one local step.
``--compute_time 0`` charges each run its own measured step times instead.

Compressed communication (CHOCO-SGD, error-feedback local SGD) against bytes
sent per worker: ``experiments/compressed_comm.py``.

The table reports, per algorithm, the averaged model's final training loss
and test accuracy, the modelled time at which its training loss (on the
whole training set, evaluated every ``eval_every`` steps) first reaches sync
SGD's final training loss, and that time divided by sync SGD's.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import registry  # noqa: E402
import train  # noqa: E402

from coopjax.cost import netmodel  # noqa: E402
from coopjax.cost import pattern  # noqa: E402

# EASGD's α = 2/(m+2) > 1/m gives the anchor a negative self-weight, on purpose.
warnings.filterwarnings("ignore", message="alpha=.*the anchor keeps weight")

__all__ = ["RUNS", "PRESETS", "run_compare", "time_to_reach", "main"]

#: (label, config overrides) of the compared runs.
RUNS: tuple[tuple[str, dict[str, Any]], ...] = (
  ("sync SGD", {"algorithm": "sync_sgd"}),
  ("PASGD τ=2", {"algorithm": "local_sgd", "tau": 2}),
  ("PASGD τ=8", {"algorithm": "local_sgd", "tau": 8}),
  ("PASGD τ=32", {"algorithm": "local_sgd", "tau": 32}),
  ("EASGD τ=4", {"algorithm": "easgd", "tau": 4}),
  ("non-blocking EASGD τ=4", {"algorithm": "nonblocking_easgd", "tau": 4}),
  ("D-PSGD ring", {"algorithm": "dpsgd", "topology": "ring"}),
)

#: preset → (config file[:arg], overrides shared by every run).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
  "digits": (
    os.path.join(_HERE, "configs", "default.py"),
    {
      "num_steps": 600,
      "eval_every": 10,
      "log_every": 10,
      "lr": 0.1,
      "alpha": 0.2,  # 2 / (m + 2), the EASGD bound's best α for m = 8
      "progress": False,
    },
  ),
  "cifar10_vgg16": (
    os.path.join(_HERE, "configs", "cifar10_vgg16.py"),
    {"eval_every": 480, "log_every": 48, "progress": True},
  ),
}


def _set(config, overrides: dict[str, Any]):
  for key, value in overrides.items():
    if isinstance(value, dict):
      _set(config[key], value)
    else:
      with config.ignore_type():
        config[key] = value
  return config


def time_to_reach(steps, losses, times, target: float) -> float | None:
  """Modelled time of the first evaluation whose loss is ``<= target`` (None if never)."""
  for loss, t in zip(losses, times, strict=True):
    if loss is not None and loss <= target:
      return float(t)
  return None


def value_at(xs, values, x: float):
  """The value at the last evaluation with ``xs <= x`` (None if there is none)."""
  out = None
  for xi, v in zip(xs, values, strict=True):
    if xi <= x + 1e-12:
      out = v
  return out


def run_compare(
  preset: str = "digits",
  outdir: str = os.path.join(_HERE, "results", "compare"),
  *,
  extra: dict[str, Any] | None = None,
  runs=RUNS,
  budget: float = 2.0,
  plots: bool = True,
) -> dict:
  """Runs every entry of ``runs`` under ``preset`` and writes figures, JSON and a table.

  Args:
    preset: a key of :data:`PRESETS`.
    outdir: output folder; each run's metrics go to ``outdir/runs/<n>``.
    extra: more config overrides for every run (e.g. ``{"num_steps": 100}``).
    runs: ``(label, overrides)`` pairs; the first is the reference (sync SGD).
    budget: every other run gets ``budget`` times the reference's steps (or
      epochs), so that it can reach the reference's final loss.
    plots: draw the PNG figures.

  Returns:
    The results dict written to ``outdir/results.json``.
  """
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}.")
  config_file, shared = PRESETS[preset]
  os.makedirs(outdir, exist_ok=True)
  results, configs = [], []
  for i, (label, overrides) in enumerate(runs):
    config = _set(_set(train.load_config(config_file), shared), {**(extra or {}), **overrides})
    if i > 0:
      with config.ignore_type():
        config.num_steps = int(round(budget * config.num_steps))
        config.num_epochs = budget * config.num_epochs
    workdir = os.path.join(outdir, "runs", f"{i}_{config.algorithm}")
    print(f"[{i + 1}/{len(runs)}] {label} ...", flush=True)
    summary = train.train(config, workdir)
    rows = train._read_rows(os.path.join(workdir, "metrics.jsonl"))
    results.append({"label": label, "summary": summary, "rows": rows})
    configs.append(config)

  for r in results:
    evals = [row for row in r["rows"] if row.get("train_loss") is not None]
    r["eval_steps"] = [row["step"] for row in evals]
    r["train_loss"] = [row["train_loss"] for row in evals]
    r["test_accuracy"] = [row["test_accuracy"] for row in evals]
    r["modelled_time"] = [row["modelled_time"] for row in evals]
  sources = {r["summary"]["compute_source"] for r in results}
  fixed = sources == {"fixed"}
  t_c = (
    float(configs[0].compute_time)
    if fixed
    else float(np.median([r["summary"]["compute_time_per_step"] for r in results]))
  )

  ref = results[0]
  target = ref["train_loss"][-1]
  ref_time = time_to_reach(ref["eval_steps"], ref["train_loss"], ref["modelled_time"], target)
  ref_steps, ref_total = ref["eval_steps"][-1], ref["modelled_time"][-1]
  table = []
  for r in results:
    reach = time_to_reach(r["eval_steps"], r["train_loss"], r["modelled_time"], target)
    table.append(
      {
        "algorithm": r["label"],
        "steps": r["eval_steps"][-1],
        "final_train_loss": r["train_loss"][-1],
        "train_loss_at_equal_steps": value_at(r["eval_steps"], r["train_loss"], ref_steps),
        "train_loss_at_equal_time": value_at(r["modelled_time"], r["train_loss"], ref_total),
        "test_accuracy": r["test_accuracy"][-1],
        "modelled_total_time": r["modelled_time"][-1],
        "time_to_sync_loss": reach,
        "ratio_vs_sync": None if reach is None or not ref_time else reach / ref_time,
      }
    )
  net = results[0]["summary"]["network"]
  out = {
    "preset": preset,
    "target_train_loss": target,
    "compute_time_per_step": t_c,
    "compute_source": "fixed" if fixed else "measured (each run its own)",
    "network": net,
    "model_bytes": results[0]["summary"]["model_bytes"],
    "num_workers": configs[0].num_workers,
    "sync_comm_time_per_step": netmodel.mix_time(
      pattern.all_reduce(configs[0].num_workers),
      results[0]["summary"]["model_bytes"],
      netmodel.NetworkModel(net["latency"], net["bandwidth"]),
    ),
    "table": table,
    "runs": [
      {k: r[k] for k in ("label", "eval_steps", "train_loss", "test_accuracy", "modelled_time")}
      for r in results
    ],
  }
  _nonblocking_ratio(out, results)
  train.write_results(outdir, out, _table_text(out))
  if plots:
    _plot(out, outdir)
  return out


def _nonblocking_ratio(out: dict, results: list[dict]) -> None:
  by_alg = {r["summary"]["algorithm"]: r for r in results}
  if "easgd" in by_alg and "nonblocking_easgd" in by_alg:
    blocking, nonblocking = by_alg["easgd"], by_alg["nonblocking_easgd"]
    out["nonblocking_easgd"] = {
      "blocking_time": blocking["modelled_time"][-1],
      "nonblocking_time": nonblocking["modelled_time"][-1],
      "time_ratio": nonblocking["modelled_time"][-1] / blocking["modelled_time"][-1],
      "max_loss_difference": float(
        np.max(np.abs(np.subtract(blocking["train_loss"], nonblocking["train_loss"])))
      ),
    }


def _fmt(x, spec: str) -> str:
  return "—" if x is None else format(x, spec)


def _table_text(out: dict) -> str:
  net = out["network"]
  lines = [
    f"preset {out['preset']}: m = {out['num_workers']}, model {out['model_bytes']} bytes, "
    f"compute {out['compute_time_per_step'] * 1e3:.3f} ms/step ({out['compute_source']}), network "
    f"latency {net['latency'] * 1e6:.0f} µs, bandwidth {net['bandwidth'] * 8 / 1e9:.2f} Gbit/s "
    f"(sync all-reduce {out['sync_comm_time_per_step'] * 1e3:.3f} ms/step, modelled)",
    f"target: sync SGD's final training loss {out['target_train_loss']:.4f}",
    "",
    "Train loss at equal steps: at sync SGD's last step; at equal modelled time: at sync SGD's "
    "total modelled time (the last evaluation at or before it); final: at the run's own last "
    "step (steps column).",
    "",
    "| algorithm | steps | train loss, equal steps | train loss, equal modelled time "
    "| final train loss | test accuracy | modelled time (s) | time to sync loss (s) "
    "| ratio vs sync |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in out["table"]:
    lines.append(
      f"| {row['algorithm']} | {row['steps']} | {_fmt(row['train_loss_at_equal_steps'], '.4f')} "
      f"| {_fmt(row['train_loss_at_equal_time'], '.4f')} "
      f"| {row['final_train_loss']:.4f} | {row['test_accuracy']:.4f} "
      f"| {row['modelled_total_time']:.3f} | {_fmt(row['time_to_sync_loss'], '.3f')} "
      f"| {_fmt(row['ratio_vs_sync'], '.3f')} |"
    )
  nb = out.get("nonblocking_easgd")
  if nb:
    lines += [
      "",
      f"non-blocking vs blocking EASGD: modelled time {nb['nonblocking_time']:.3f} s vs "
      f"{nb['blocking_time']:.3f} s (ratio {nb['time_ratio']:.3f}); largest training-loss "
      f"difference {nb['max_loss_difference']:.2e}",
    ]
  return "\n".join(lines) + "\n"


def _plot(out: dict, outdir: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = out["runs"]
  styles = {"non-blocking": "--"}

  def style(label):
    return next((s for key, s in styles.items() if key in label), "-")

  for name, xkey, xlabel in (
    ("loss_vs_iterations", "eval_steps", "iteration"),
    ("loss_vs_wallclock", "modelled_time", "modelled wall-clock (s)"),
  ):
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for r in runs:
      ax.plot(r[xkey], r["train_loss"], style(r["label"]), label=r["label"], lw=1.4)
    ax.axhline(out["target_train_loss"], color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (averaged model)")
    net = out["network"]
    title = f"{out['preset']}, m = {out['num_workers']}"
    if xkey == "modelled_time":
      title += f"; α = {net['latency'] * 1e6:.0f} µs, {net['bandwidth'] * 8 / 1e9:.2g} Gbit/s"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, f"{name}.png"))
    plt.close(fig)

  pair = [r for r in runs if "EASGD" in r["label"]]
  if len(pair) == 2 and out.get("nonblocking_easgd"):
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for r in pair:
      axes[0].plot(r["eval_steps"], r["train_loss"], style(r["label"]), label=r["label"])
      axes[1].plot(r["modelled_time"], r["train_loss"], style(r["label"]), label=r["label"])
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("modelled wall-clock (s)")
    for ax in axes:
      ax.set_yscale("log")
      ax.set_ylabel("training loss")
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=7)
    nb = out["nonblocking_easgd"]
    fig.suptitle(
      f"non-blocking / blocking EASGD modelled time = {nb['time_ratio']:.2f}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "nonblocking_easgd.png"))
    plt.close(fig)


def main(argv=None) -> dict | None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="digits", choices=tuple(PRESETS))
  parser.add_argument(
    "--out",
    "--outdir",
    dest="outdir",
    default=None,
    help="output folder (default: experiments/results/compare[/PRESET])",
  )
  parser.add_argument("--data_dir", default=None, help="TFDS data folder (cifar10_vgg16)")
  parser.add_argument("--steps", type=int, default=None, help="override num_steps")
  parser.add_argument(
    "--quick", action="store_true", help="a smoke run: 20 steps, into a temporary folder"
  )
  parser.add_argument("--epochs", type=float, default=None, help="override num_epochs")
  parser.add_argument(
    "--compute_time",
    type=float,
    default=None,
    help="seconds of compute charged per step to every run (default: the config's, 1 ms; "
    "0: each run's measured time)",
  )
  parser.add_argument(
    "--algorithms",
    default=None,
    help="comma-separated registry names to add to the comparison (e.g. slowmo,diloco)",
  )
  args = parser.parse_args(argv)
  if args.quick and args.outdir is None:
    import tempfile

    args.outdir = tempfile.mkdtemp(prefix="coopjax_compare_")
  outdir = args.outdir or os.path.join(
    _HERE, "results", "compare", *(() if args.preset == "digits" else (args.preset,))
  )
  extra: dict[str, Any] = {}
  if args.data_dir:
    extra["data_dir"] = args.data_dir
  if args.quick:
    extra.update(num_steps=20, eval_every=10, log_every=10)
  if args.steps is not None:
    extra["num_steps"] = args.steps
  if args.epochs is not None:
    extra["num_steps"], extra["num_epochs"] = 0, args.epochs
  if args.compute_time is not None:
    extra["compute_time"] = args.compute_time
  runs = list(RUNS)
  for name in filter(None, (args.algorithms or "").split(",")):
    if registry.ALIASES.get(name, name) not in registry.ALGORITHMS:
      parser.error(f"unknown algorithm {name!r}; known: {registry.names()}")
    runs.append((name, {"algorithm": name}))
  try:
    return run_compare(args.preset, outdir, extra=extra, runs=tuple(runs))
  except FileNotFoundError as error:
    print(
      f"{args.preset}: the data are not available, nothing was run.\n{error}\n"
      "Prepare the dataset (see docs/experiments.md) and pass --data_dir.",
      file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
  main()
