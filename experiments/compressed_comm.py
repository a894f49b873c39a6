r"""Compressed communication on digits: loss and accuracy against bytes sent per worker.

  python experiments/compressed_comm.py            # digits, m = 8, MLP, CPU, a few minutes
  python experiments/compressed_comm.py --quick    # a 30-step smoke run into a temp folder

Runs, with the same data, model (MLP 64-64-64-10: two hidden layers of 64), local
SGD, learning rate and number of steps, through ``experiments/train.py``:

* decentralized, on a ring (W = ring(8), a mix after every step): D-PSGD
  (uncompressed, A(1, W_ring)) and CHOCO-SGD (:func:`coopjax.choco`) with
  top-k 10 %, top-k 1 %, QSGD 4 bits and scaled sign (QSGD biased, scaled by
  1/(1 + ω): CHOCO needs a contraction, and the unbiased 4-bit QSGD, whose
  variance factor ω = min(d/s², √d/s) exceeds 1 on these layers, diverged);
* periodic averaging, τ = 4: local SGD (an all-reduce of the models) and
  error-feedback local SGD (Qsparse-local-SGD, ``local_sgd(...,
  compressor=...)``) with QSGD 4 bits (biased, as for CHOCO: with the
  unbiased QSGD, ``E‖v − Q(v)‖² = ω‖v‖²`` with ω > 1 makes the error
  memory grow, and the run diverged at step 320) and top-k 1 %.

Bytes sent per worker are the transformations' own cost records
(``tx.comm(k, state).bytes_sent(model_bytes)``): payload bytes of the
compressed messages (:meth:`coopjax.mixing.Mix.compressed_cost`: a ring
exchange sends 2 payloads per mix; the mean of compressed messages is an
all-gather of m − 1 payloads, since compressed messages cannot be reduced in
flight), the full model for uncompressed mixes (a ring all-reduce sends
2(m−1)/m models).

Writes to ``--out`` (default ``experiments/results/compression/``):
``results.json`` (every run's evaluations, the table, the checks),
``loss_vs_bytes.png``, ``accuracy_vs_bytes.png`` and ``summary.md``.

The checks: CHOCO with top-k 10 % on the ring and QSGD-4-bit error-feedback
local SGD end within 1 % test accuracy (absolute) of their uncompressed
versions; for every run, the bytes sent per worker until its test accuracy
first reaches the uncompressed version's final accuracy minus 1 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import train  # noqa: E402

__all__ = ["RUNS", "SHARED", "run_compression", "bytes_to_reach", "main"]

#: Overrides shared by every run (on top of ``configs/default.py``).
SHARED: dict[str, Any] = {
  "num_workers": 8,
  "hidden": (64, 64),
  "num_steps": 600,
  "eval_every": 20,
  "log_every": 20,
  "lr": 0.1,
  "progress": False,
}

RING = {"topology": "ring", "tau": 1}
LOCAL = {"algorithm": "local_sgd", "tau": 4}

#: (label, group, config overrides); the first run of each group is its uncompressed version.
RUNS: tuple[tuple[str, str, dict[str, Any]], ...] = (
  ("D-PSGD ring", "ring", {"algorithm": "dpsgd", **RING}),
  (
    "CHOCO top-k 10%",
    "ring",
    {"algorithm": "choco", "compressor": "top_k:0.1", "gamma": 0.4, **RING},
  ),
  (
    "CHOCO top-k 1%",
    "ring",
    {"algorithm": "choco", "compressor": "top_k:0.01", "gamma": 0.05, **RING},
  ),
  (
    "CHOCO qsgd 4 bits",
    "ring",
    {"algorithm": "choco", "compressor": "qsgd_biased:4", "gamma": 0.5, **RING},
  ),
  ("CHOCO sign", "ring", {"algorithm": "choco", "compressor": "sign", "gamma": 0.3, **RING}),
  ("local SGD τ=4", "local", dict(LOCAL)),
  ("EF local SGD qsgd 4 bits", "local", {**LOCAL, "compressor": "qsgd_biased:4"}),
  ("EF local SGD top-k 1%", "local", {**LOCAL, "compressor": "top_k:0.01"}),
)

#: (compressed run, its uncompressed version): must end within 1 % test accuracy.
CHECKS = (("CHOCO top-k 10%", "D-PSGD ring"), ("EF local SGD qsgd 4 bits", "local SGD τ=4"))


def bytes_to_reach(rows: list[dict], accuracy: float) -> float | None:
  """Bytes sent per worker at the first evaluation with test accuracy ``>= accuracy``."""
  for row in rows:
    if row.get("test_accuracy") is not None and row["test_accuracy"] >= accuracy:
      return float(row["bytes_sent"])
  return None


def _set(config, overrides: dict[str, Any]):
  for key, value in overrides.items():
    with config.ignore_type():
      config[key] = value
  return config


def run_compression(outdir: str, *, extra: dict[str, Any] | None = None, plots: bool = True):
  """Runs :data:`RUNS` and writes ``results.json``, ``summary.md`` and the figures.

  Each run's own metrics and checkpoints go to a temporary folder; what the
  figures and the table need is copied into ``results.json``.
  """
  os.makedirs(outdir, exist_ok=True)
  base = os.path.join(_HERE, "configs", "default.py")
  runs = []
  scratch = tempfile.TemporaryDirectory(prefix="coopjax_compression_runs_")
  for i, (label, group, overrides) in enumerate(RUNS):
    config = _set(_set(train.load_config(base), SHARED), {**(extra or {}), **overrides})
    workdir = os.path.join(scratch.name, f"{i}_{config.algorithm}")
    print(f"[{i + 1}/{len(RUNS)}] {label} ...", flush=True)
    summary = train.train(config, workdir)
    evals = [
      r
      for r in train._read_rows(os.path.join(workdir, "metrics.jsonl"))
      if r.get("train_loss") is not None
    ]
    runs.append(
      {
        "label": label,
        "group": group,
        "overrides": overrides,
        "model_bytes": summary["model_bytes"],
        "steps": [r["step"] for r in evals],
        "train_loss": [r["train_loss"] for r in evals],
        "test_accuracy": [r["test_accuracy"] for r in evals],
        "bytes_sent": [r["bytes_sent"] for r in evals],
        "rows": evals,
      }
    )
  scratch.cleanup()
  by_label = {r["label"]: r for r in runs}
  reference = {g: next(r for r in runs if r["group"] == g) for g in ("ring", "local")}
  table = []
  for r in runs:
    ref = reference[r["group"]]
    target = ref["test_accuracy"][-1] - 0.01
    table.append(
      {
        "run": r["label"],
        "uncompressed_version": ref["label"],
        "final_train_loss": r["train_loss"][-1],
        "final_test_accuracy": r["test_accuracy"][-1],
        "accuracy_gap": ref["test_accuracy"][-1] - r["test_accuracy"][-1],
        "target_accuracy": target,
        "bytes_per_worker_to_target": bytes_to_reach(r["rows"], target),
        "bytes_per_worker_total": r["bytes_sent"][-1],
      }
    )
  checks = [
    {
      "compressed": a,
      "uncompressed": b,
      "accuracy_gap": by_label[b]["test_accuracy"][-1] - by_label[a]["test_accuracy"][-1],
      "within_1_percent": by_label[b]["test_accuracy"][-1] - by_label[a]["test_accuracy"][-1]
      <= 0.01,
    }
    for a, b in CHECKS
  ]
  out = {
    "shared": SHARED,
    "model_bytes": runs[0]["model_bytes"],
    "table": table,
    "checks": checks,
    "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
  }
  train.write_results(outdir, out, _table_text(out))
  if plots:
    _plot(out, outdir)
  return out


def _fmt_bytes(x) -> str:
  if x is None:
    return "—"
  return f"{x / 1e6:.2f} MB" if x >= 1e5 else f"{x / 1e3:.1f} kB"


def _table_text(out: dict) -> str:
  lines = [
    f"digits, m = 8, MLP 64-64-64-10 ({out['model_bytes']} bytes), {out['shared']['num_steps']} "
    "steps; bytes sent per worker from the transformations' cost records.",
    "",
    "| run | final train loss | final test acc. | gap to uncompressed | bytes/worker to "
    "(uncompressed acc. − 1 %) | bytes/worker total |",
    "|---|---|---|---|---|---|",
  ]
  for row in out["table"]:
    lines.append(
      f"| {row['run']} | {row['final_train_loss']:.4f} | {row['final_test_accuracy']:.4f} | "
      f"{row['accuracy_gap']:+.4f} | {_fmt_bytes(row['bytes_per_worker_to_target'])} | "
      f"{_fmt_bytes(row['bytes_per_worker_total'])} |"
    )
  lines.append("")
  for c in out["checks"]:
    verdict = "yes" if c["within_1_percent"] else "NO"
    lines.append(
      f"- {c['compressed']} within 1 % test accuracy of {c['uncompressed']}: {verdict} "
      f"(gap {c['accuracy_gap']:+.4f})"
    )
  return "\n".join(lines) + "\n"


def _plot(out: dict, outdir: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for key, name, ylabel in (
    ("train_loss", "loss_vs_bytes.png", "training loss (averaged model)"),
    ("test_accuracy", "accuracy_vs_bytes.png", "test accuracy (averaged model)"),
  ):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, group, title in (
      (axes[0], "ring", "ring, a mix every step"),
      (axes[1], "local", "periodic averaging, τ = 4"),
    ):
      for r in out["runs"]:
        if r["group"] == group:  # from the first evaluation after a mix (log scale)
          points = [(b, y) for b, y in zip(r["bytes_sent"], r[key], strict=True) if b > 0]
          ax.plot(*zip(*points, strict=True), label=r["label"], marker=".", markersize=3)
      ax.set_xscale("log")
      ax.set_xlabel("bytes sent per worker")
      ax.set_title(title)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    axes[0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, name), dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "compression"))
  parser.add_argument("--quick", action="store_true", help="30 steps into a temporary folder")
  args = parser.parse_args(argv)
  if args.quick:
    outdir = tempfile.mkdtemp(prefix="coopjax_compression_")
    return run_compression(outdir, extra={"num_steps": 30, "eval_every": 10, "log_every": 10})
  return run_compression(args.out)


if __name__ == "__main__":
  main()
