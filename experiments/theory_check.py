r"""Measured error of A(τ, W, v) against the Cooperative SGD bounds, on problems with exact L and σ².

Runs the library's transformation (``coopjax.cooperative(optax.sgd(lr), tau=τ, W=W, num_aux=v)`` driven by
``coopjax.make_step`` inside ``lax.scan``, vmapped over seeds and learning rates) on

* ``quadratic``: F(x) = ½ xᵀAx, A = diag(linspace(0.1, 1, d)), L = 1, F_inf = 0;
* ``least_squares``: F(x) = ‖Bx − y‖²/(2n), L = λ_max(BᵀB/n) (scaled to 1), F_inf exact;
* ``logistic``: F(x) = mean log(1 + exp(−y bᵀx)) + λ‖x‖²/2 with random labels,
  L = λ_max(BᵀB)/(4n) + λ, F_inf from L-BFGS. Its gradient is not linear in x.

Every worker's gradient is the exact gradient plus N(0, σ²/d·I), so E‖g − ∇F‖² = σ² exactly.
For each cell (τ, W) it records the time-averaged ‖∇F(u_k)‖² over k = 1..K (the left side of
eq. 17), its tail average over the last half (the error floor), the measured discrepancy
(1/K)Σ_k ‖X_k(I − J)‖²_F, Theorem 1's bound (eq. 17) with its condition (eq. 16), and Lemma 2's
bound with the measured discrepancy.

Two learning rates per cell: a fixed one, η L = 0.05, and the largest one allowed by eq. 16 for
that cell (``theory.max_lr``), where the bound is proven.

Run (CPU, about 2–4 minutes on 2 cores)::

  python experiments/theory_check.py            # writes experiments/results/theory/
  python experiments/theory_check.py --quick    # a smaller smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
import warnings
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy import optimize  # noqa: E402
from tqdm import tqdm  # noqa: E402

import coopjax  # noqa: E402
from coopjax import mixing  # noqa: E402
from coopjax import theory  # noqa: E402
from coopjax import topology  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "theory"
TAUS = (1, 2, 4, 8, 16, 32)
FIXED_LR_L = 0.05  # η L of the fixed-lr runs


# ---------------------------------------------------------------------------
# Problems.


def make_problem(name: str, d: int, seed: int = 0) -> dict:
  """Returns F (jax), its exact L, F_inf and the starting point x_1."""
  rng = np.random.default_rng(seed)
  if name == "quadratic":
    a = np.linspace(0.1, 1.0, d)
    aj = jnp.asarray(a)
    return dict(F=lambda x: 0.5 * jnp.sum(aj * x * x), L=1.0, F_inf=0.0, x0=np.ones(d))
  n = 4 * d
  B = rng.standard_normal((n, d))
  if name == "least_squares":
    B /= math.sqrt(np.linalg.eigvalsh(B.T @ B / n).max())  # L = 1
    y = B @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n)
    x_ls = np.linalg.lstsq(B, y, rcond=None)[0]
    F_inf = float(np.sum((B @ x_ls - y) ** 2) / (2 * n))
    Bj, yj = jnp.asarray(B), jnp.asarray(y)
    return dict(
      F=lambda x: jnp.sum((Bj @ x - yj) ** 2) / (2 * n),
      L=float(np.linalg.eigvalsh(B.T @ B / n).max()),
      F_inf=F_inf,
      x0=np.zeros(d),
    )
  if name == "logistic":
    lam = 0.01
    B *= 2.0 / math.sqrt(np.linalg.eigvalsh(B.T @ B / n).max())  # λ_max(BᵀB)/(4n) = 1
    y = rng.choice([-1.0, 1.0], size=n)
    L = float(np.linalg.eigvalsh(B.T @ B).max() / (4 * n) + lam)

    def f_np(x):
      z = -y * (B @ x)
      return float(np.mean(np.logaddexp(0.0, z)) + 0.5 * lam * x @ x)

    def g_np(x):
      z = -y * (B @ x)
      s = 0.5 * (1.0 + np.tanh(0.5 * z))
      return B.T @ (-y * s) / n + lam * x

    res = optimize.minimize(
      f_np, np.zeros(d), jac=g_np, method="L-BFGS-B", options={"gtol": 1e-13, "ftol": 1e-16}
    )
    Bj, yj = jnp.asarray(B), jnp.asarray(y)
    return dict(
      F=lambda x: jnp.mean(jnp.logaddexp(0.0, -yj * (Bj @ x))) + 0.5 * lam * jnp.sum(x * x),
      L=L,
      F_inf=float(res.fun),
      x0=np.zeros(d),
    )
  raise ValueError(f"unknown problem {name!r}")


# ---------------------------------------------------------------------------
# One configuration through the library, vmapped over learning rates and seeds.


def build_runner(problem: dict, tau: int, v: int, m: int, d: int, K: int, sigma2: float):
  """Returns jitted ``run(Ws[C, n, n], lrs[C], keys[S]) -> dict of [C, S] arrays``.

  One compilation serves every (W, lr) pair of a given τ and v: the transformation is
  ``coopjax.cooperative`` with the dense reference mixer ``coopjax.mixing.mix_dense`` applied to
  a traced W (the concrete matrix passed for validation only fixes the shape).
  """
  F = problem["F"]
  gradF = jax.grad(F)
  noise_scale = math.sqrt(sigma2 / d)
  n = m + v
  W_shape = topology.complete(n) if v == 0 else _quiet_easgd(m, 1.0 / (m + 1))

  def loss_fn(params, noise):  # gradient = ∇F(x) + noise
    return F(params["w"]) + jnp.vdot(jax.lax.stop_gradient(noise), params["w"])

  def one(W, lr, key):
    tx = coopjax.cooperative(
      optax.sgd(lr),
      tau=tau,
      W=W_shape,
      num_aux=v,
      allow_negative=True,
      mixer=lambda X: mixing.mix_dense(X, W),
    )
    step = coopjax.make_step(
      loss_fn, tx, num_workers=m, with_consensus=False, with_grad_norm=False, jit=False
    )
    X = coopjax.replicate({"w": jnp.asarray(problem["x0"])}, m, num_aux=v)
    state = tx.init(X)

    def body(carry, k):
      X, state = carry
      u = coopjax.average(X)["w"]
      gn2 = jnp.sum(gradF(u) ** 2)
      disc = coopjax.consensus_distance(X)
      noise = noise_scale * jax.random.normal(jax.random.fold_in(key, k), (m, d))
      X, state, _ = step(X, state, noise)
      return (X, state), (gn2, disc)

    _, (gn2, disc) = jax.lax.scan(body, (X, state), jnp.arange(1, K + 1))
    half = K // 2
    return dict(
      grad_avg=jnp.mean(gn2),
      grad_tail=jnp.mean(gn2[half:]),
      disc_avg=jnp.mean(disc),
      disc_tail=jnp.mean(disc[half:]),
    )

  return jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, None, 0)), in_axes=(0, 0, None)))


def _quiet_easgd(m, alpha):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return topology.easgd(m, alpha)


def cell_record(
  problem_name, problem, *, family, tau, W, v, m, lr, lr_kind, res, i, K, sigma2, alpha=None
):
  z = theory.zeta(W)
  z = min(z, 1.0 - 1e-15)
  f_gap = float(problem["F"](jnp.asarray(problem["x0"]))) - problem["F_inf"]
  b = theory.error_bound(lr, problem["L"], sigma2, m, v, tau, z, K, f_gap)
  binf = theory.error_bound(lr, problem["L"], sigma2, m, v, tau, z, math.inf, f_gap)
  g = np.asarray(res["grad_avg"][i])
  gt = np.asarray(res["grad_tail"][i])
  D = float(np.mean(res["disc_avg"][i]))
  lem = theory.lemma2_bound(lr, problem["L"], sigma2, m, v, K, f_gap, D)
  S = g.size
  return dict(
    problem=problem_name,
    family=family,
    tau=tau,
    alpha=alpha,
    zeta=z,
    v=v,
    lr_kind=lr_kind,
    lr=lr,
    lr_eff=b.lr_eff,
    condition_value=b.condition_value,
    condition_holds=b.condition_holds,
    measured_avg=float(g.mean()),
    measured_avg_se=float(g.std(ddof=1) / math.sqrt(S)),
    measured_floor=float(gt.mean()),
    measured_floor_se=float(gt.std(ddof=1) / math.sqrt(S)),
    discrepancy_avg=D,
    discrepancy_tail=float(np.mean(res["disc_tail"][i])),
    bound_total=b.total,
    bound_opt=b.optimization,
    bound_sync=b.sync_noise,
    bound_network=b.network,
    bound_floor=binf.floor,
    lemma2_total=lem.total,
    lemma2_holds=lem.condition_holds,
    measured_le_bound=bool(g.mean() <= b.total),
    measured_le_lemma2=bool(g.mean() <= lem.total),
  )


# ---------------------------------------------------------------------------
# Analysis and output.


def linfit(x, y):
  x, y = np.asarray(x, float), np.asarray(y, float)
  slope, icpt = np.polyfit(x, y, 1)
  pred = slope * x + icpt
  ss_res = float(np.sum((y - pred) ** 2))
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
  return float(slope), float(icpt), r2


def write_csv(path: Path, rows: list[dict]):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def plots(cells, easgd_rows, problems, topo_names, out: Path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = dict(zip(topo_names, ["C0", "C1", "C2", "C3"], strict=True))
  fig, grid = plt.subplots(2, len(problems), figsize=(4.2 * len(problems), 6.6), dpi=80)
  for ax, p in zip(grid[1], problems, strict=True):
    fx = [r for r in cells if r["problem"] == p and r["lr_kind"] == "fixed"]
    ref = next(r for r in fx if r["family"] == "complete" and r["tau"] == 1)["measured_floor"]
    for t in topo_names:
      rows = [r for r in fx if r["family"] == t]
      ax.plot(
        [r["tau"] for r in rows],
        [r["measured_floor"] / ref - 1 for r in rows],
        color=colors[t],
        marker="o",
        ms=3,
        label=t,
      )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("τ")
    ax.set_title(f"{p}: measured floor / sync-SGD floor − 1", fontsize=9)
  grid[1][0].legend(fontsize=6)
  axes = grid[0]
  for ax, p in zip(np.atleast_1d(axes), problems, strict=True):
    for t in topo_names:
      rows = [
        r for r in cells if r["problem"] == p and r["family"] == t and r["lr_kind"] == "fixed"
      ]
      taus = [r["tau"] for r in rows]
      ax.errorbar(
        taus,
        [r["measured_floor"] for r in rows],
        yerr=[r["measured_floor_se"] for r in rows],
        color=colors[t],
        marker="o",
        ms=3,
        label=f"{t} (ζ={rows[0]['zeta']:.2f}) measured",
      )
      ax.plot(taus, [r["bound_floor"] for r in rows], color=colors[t], ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("τ")
    ax.set_title(f"{p}: error floor, ηL={FIXED_LR_L}")
  np.atleast_1d(axes)[0].set_ylabel("tail mean ‖∇F(u_k)‖²  (dashed: eq. 17 floor)")
  np.atleast_1d(axes)[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(out / "floor_vs_tau.png")
  plt.close(fig)

  fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=80)
  for ax, kind in zip(axes, ["fixed", "max"], strict=True):
    rows = [r for r in cells if r["lr_kind"] == kind]
    for key, mk, lab in [("bound_total", "o", "eq. 17"), ("lemma2_total", "x", "Lemma 2")]:
      ok = [
        r for r in rows if (r["condition_holds"] if key == "bound_total" else r["lemma2_holds"])
      ]
      bad = [r for r in rows if r not in ok]
      ax.scatter(
        [r[key] for r in ok],
        [r["measured_avg"] for r in ok],
        marker=mk,
        s=12,
        label=f"{lab} (condition holds)",
      )
      if bad:
        ax.scatter(
          [r[key] for r in bad],
          [r["measured_avg"] for r in bad],
          marker=mk,
          s=12,
          facecolors="none",
          edgecolors="gray",
          label=f"{lab} (condition fails)",
        )
    lo = min(min(r["measured_avg"] for r in rows), min(r["lemma2_total"] for r in rows))
    hi = max(max(r["bound_total"] for r in rows), max(r["measured_avg"] for r in rows))
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bound")
    ax.set_ylabel("measured (1/K)Σ‖∇F(u_k)‖²")
    ax.set_title("lr: ηL=0.05" if kind == "fixed" else "lr: largest allowed by eq. 16")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(out / "measured_vs_bound.png")
  plt.close(fig)

  if easgd_rows:
    taus = sorted({r["tau"] for r in easgd_rows})
    fig, grid = plt.subplots(2, len(problems), figsize=(4.2 * len(problems), 6.6), dpi=80)
    for ax, p in zip(grid[1], problems, strict=True):
      for j, t in enumerate(taus):
        rows = sorted(
          [r for r in easgd_rows if r["problem"] == p and r["tau"] == t], key=lambda r: r["alpha"]
        )
        a = [r["alpha"] for r in rows]
        ax.plot(
          a,
          [r["measured_floor"] for r in rows],
          marker="o",
          ms=3,
          color=f"C{j}",
          label=f"τ={t} floor (last K/2)",
        )
        ax.plot(
          a,
          [r["measured_avg"] for r in rows],
          marker="s",
          ms=3,
          color=f"C{j}",
          ls=":",
          label=f"τ={t} mean over all K",
        )
      ax.axvline(2 / (easgd_rows[0]["m"] + 2), color="k", lw=0.6, ls=":")
      ax.set_yscale("log")
      ax.set_xlabel("α")
      ax.set_title(f"{p}: measured only", fontsize=9)
    grid[1][0].legend(fontsize=6)
    axes = grid[0]
    for ax, p in zip(np.atleast_1d(axes), problems, strict=True):
      for j, t in enumerate(taus):
        rows = sorted(
          [r for r in easgd_rows if r["problem"] == p and r["tau"] == t], key=lambda r: r["alpha"]
        )
        a = [r["alpha"] for r in rows]
        ax.errorbar(
          a,
          [r["measured_floor"] for r in rows],
          yerr=[r["measured_floor_se"] for r in rows],
          marker="o",
          ms=3,
          color=f"C{j}",
          label=f"τ={t} measured",
        )
        ax.plot(
          a,
          [r["bound_floor"] for r in rows],
          color=f"C{j}",
          ls="--",
          lw=1,
          label=f"τ={t} eq. 17 floor",
        )
      m = easgd_rows[0]["m"]
      ax.axvline(2 / (m + 2), color="k", lw=0.6, ls=":")
      ax.set_yscale("log")
      ax.set_xlabel("α  (dotted: 2/(m+2))")
      ax.set_title(f"{p}: EASGD, m={m}, ηL={FIXED_LR_L}")
    np.atleast_1d(axes)[0].set_ylabel("tail mean ‖∇F(u_k)‖²")
    np.atleast_1d(axes)[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "easgd_floor_vs_alpha.png")
    plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--m", type=int, default=16)
  ap.add_argument("--d", type=int, default=32)
  ap.add_argument("--K", type=int, default=2048)
  ap.add_argument("--seeds", type=int, default=8)
  ap.add_argument("--sigma2", type=float, default=1.0)
  ap.add_argument("--quick", action="store_true", help="small smoke run")
  ap.add_argument("--out", type=Path, default=OUT)
  ap.add_argument(
    "--from-json", type=Path, default=None, help="redo analysis/figures from a results.json"
  )
  args = ap.parse_args(argv)
  if args.from_json is not None:
    saved = json.loads(args.from_json.read_text())
    sm = saved["summary"]
    return analyse_and_write(
      saved["cells"], saved["easgd"], sm["settings"], sm["problems"], args.out
    )
  if args.quick:
    args.K, args.seeds = 256, 3
  m, d, K, S, sigma2 = args.m, args.d, args.K, args.seeds, args.sigma2
  taus = [t for t in TAUS if K % t == 0]
  side = int(round(math.sqrt(m)))
  topos = {
    "complete": topology.complete(m),
    "torus": topology.torus(side, m // side),
    "ring": topology.ring(m),
    "exponential": topology.exponential(m),
  }
  alphas = sorted(
    set(
      np.round(np.r_[np.linspace(0.01, 0.95, 10), 0.975, 0.99] * 2 / (m + 1), 5).tolist()
      + [round(2 / (m + 2), 6)]
    )
  )
  easgd_taus = (1, 4)
  problems = ("quadratic", "least_squares", "logistic")
  keys = jax.random.split(jax.random.key(0), S)
  t0 = time.time()

  cache = {p: make_problem(p, d) for p in problems}
  # One job = one compilation: (problem, τ, v) with every (W, lr) pair batched.
  jobs = []
  for p in problems:
    L = cache[p]["L"]
    for tau in taus:
      conf = []
      for name, W in topos.items():
        z = min(theory.zeta(W), 1 - 1e-15)
        conf.append((name, W, None, FIXED_LR_L / L, "fixed"))
        conf.append((name, W, None, theory.max_lr(L, m, 0, tau, z), "max"))
      jobs.append((p, tau, 0, conf))
    for tau in easgd_taus:
      conf = [("easgd", _quiet_easgd(m, a), a, FIXED_LR_L / L, "fixed") for a in alphas]
      jobs.append((p, tau, 1, conf))

  cells, easgd_rows = [], []
  for p, tau, v, conf in tqdm(jobs, desc="compiled batches"):
    prob = cache[p]
    run = build_runner(prob, tau, v, m, d, K, sigma2)
    Ws = jnp.asarray(np.stack([c[1] for c in conf]))
    lrs = jnp.asarray([c[3] for c in conf])
    res = jax.device_get(run(Ws, lrs, keys))
    for i, (name, W, a, lr, kind) in enumerate(conf):
      rec = cell_record(
        p,
        prob,
        family=name,
        tau=tau,
        W=W,
        v=v,
        m=m,
        lr=lr,
        lr_kind=kind,
        res=res,
        i=i,
        K=K,
        sigma2=sigma2,
        alpha=a,
      )
      if v:
        rec["m"] = m
        easgd_rows.append(rec)
      else:
        cells.append(rec)
  settings = dict(
    m=m,
    d=d,
    K=K,
    seeds=S,
    sigma2=sigma2,
    taus=taus,
    alphas=alphas,
    easgd_taus=list(easgd_taus),
    fixed_lr_times_L=FIXED_LR_L,
    zetas={k: theory.zeta(W) for k, W in topos.items()},
    elapsed_s=time.time() - t0,
    jax=jax.__version__,
  )
  info = {p: dict(L=cache[p]["L"], F_inf=cache[p]["F_inf"]) for p in problems}
  return analyse_and_write(cells, easgd_rows, settings, info, args.out)


def analyse_and_write(cells, easgd_rows, settings, info, out: Path) -> dict:
  """Fits, trends and counts; writes CSV, JSON, figures and summary.md under ``out``."""
  problems = list(info)
  taus, easgd_taus, sigma2 = settings["taus"], settings["easgd_taus"], settings["sigma2"]
  topo_names = list(settings["zetas"])
  # --- analysis ---------------------------------------------------------------
  analysis = {}
  for p in problems:
    fx = [r for r in cells if r["problem"] == p and r["lr_kind"] == "fixed"]
    pasgd = [r for r in fx if r["family"] == "complete"]
    slope, icpt, r2 = linfit([r["tau"] for r in pasgd], [r["measured_floor"] for r in pasgd])
    lr = pasgd[0]["lr"]
    L = info[p]["L"]
    sync_floor = pasgd[0]["measured_floor"]
    spread = max(r["measured_floor"] for r in pasgd) / min(r["measured_floor"] for r in pasgd) - 1
    spread_all = max(r["measured_floor"] for r in fx) / min(r["measured_floor"] for r in fx) - 1
    zeta_trend = {}
    for tau in taus:
      rows = sorted([r for r in fx if r["tau"] == tau], key=lambda r: r["zeta"])
      zeta_trend[tau] = dict(
        zetas=[r["zeta"] for r in rows],
        floors=[r["measured_floor"] for r in rows],
        ses=[r["measured_floor_se"] for r in rows],
        monotone_increasing=bool(np.all(np.diff([r["measured_floor"] for r in rows]) > 0)),
        rel_change_last_vs_first=rows[-1]["measured_floor"] / rows[0]["measured_floor"] - 1,
      )
    easgd_p = {}
    for tau in easgd_taus:
      rows = sorted(
        [r for r in easgd_rows if r["problem"] == p and r["tau"] == tau], key=lambda r: r["alpha"]
      )
      fl = [r["measured_floor"] for r in rows]
      j = int(np.argmin(fl))
      easgd_p[tau] = dict(
        alphas=[r["alpha"] for r in rows],
        floors=fl,
        bound_floors=[r["bound_floor"] for r in rows],
        argmin_alpha=rows[j]["alpha"],
        interior_minimum=bool(0 < j < len(rows) - 1),
        bound_argmin_alpha=rows[int(np.argmin([r["bound_floor"] for r in rows]))]["alpha"],
        avg=[r["measured_avg"] for r in rows],
        argmin_alpha_avg=rows[int(np.argmin([r["measured_avg"] for r in rows]))]["alpha"],
        interior_minimum_avg=bool(
          0 < int(np.argmin([r["measured_avg"] for r in rows])) < len(rows) - 1
        ),
      )
    analysis[p] = dict(
      pasgd_fit=dict(
        slope=slope,
        intercept=icpt,
        r2=r2,
        bound_slope=lr**2 * L**2 * sigma2,
        sync_floor=sync_floor,
        rel_spread_over_tau=spread,
        rel_spread_all_topologies=spread_all,
      ),
      zeta_trend=zeta_trend,
      easgd=easgd_p,
    )
  all_rows = cells + easgd_rows
  held = [r for r in all_rows if r["condition_holds"]]
  viol = [r for r in held if not r["measured_le_bound"]]
  lem_viol = [r for r in all_rows if r["lemma2_holds"] and not r["measured_le_lemma2"]]
  summary = dict(
    settings=settings,
    problems=info,
    n_runs=len(all_rows),
    n_condition_holds=len(held),
    n_condition_holds_and_measured_gt_bound=len(viol),
    n_lemma2_violations=len(lem_viol),
    n_fail_but_below=sum(
      1 for r in all_rows if not r["condition_holds"] and r["measured_le_bound"]
    ),
    analysis=analysis,
  )
  out.mkdir(parents=True, exist_ok=True)
  write_csv(out / "cells.csv", cells)
  write_csv(out / "easgd.csv", easgd_rows)
  with open(out / "results.json", "w") as f:
    json.dump(dict(summary=summary, cells=cells, easgd=easgd_rows), f, indent=1, default=float)
  plots(cells, easgd_rows, problems, topo_names, out)
  write_summary(out / "summary.md", summary, cells, easgd_rows, problems, topo_names, taus)
  print(f"done in {settings['elapsed_s']:.0f}s; wrote {out}")
  return summary


def write_summary(path, summary, cells, easgd_rows, problems, topo_names, taus):
  s = summary["settings"]
  L = []
  w = L.append
  w("# Cooperative SGD bounds vs measurement\n")
  w(
    "Generated by `python experiments/theory_check.py` (CPU, "
    f"{s['elapsed_s']:.0f} s). m = {s['m']}, d = {s['d']}, K = {s['K']}, {s['seeds']} seeds, "
    f"σ² = {s['sigma2']} (exact: Gaussian noise added to exact gradients), "
    "step-then-mix through `coopjax.cooperative(optax.sgd(lr), tau=τ, W=W, num_aux=v)` + `coopjax.make_step`. "
    "ζ: " + ", ".join(f"{k} {v:.4f}" for k, v in s["zetas"].items()) + ".\n"
  )
  w(
    "Columns: *measured* = mean over seeds of (1/K)Σ_k‖∇F(u_k)‖² (eq. 17's left side); "
    "*floor* = mean over the last K/2 steps; *eq. 17* = Theorem 1's bound; *Lemma 2* = the "
    "bound with the measured discrepancy (1/K)Σ‖X_k(I−J)‖²_F; *cond* = eq. 16's left side "
    "(≤ 1 needed).  Files: `cells.csv`, `easgd.csv`, `results.json`, `floor_vs_tau.png`, "
    "`measured_vs_bound.png`, `easgd_floor_vs_alpha.png`.\n"
  )
  w("## Does the measured error stay below the bound?\n")
  w(
    f"- {summary['n_runs']} runs; eq. 16 holds in {summary['n_condition_holds']}; among those, "
    f"measured > eq. 17 in **{summary['n_condition_holds_and_measured_gt_bound']}**. "
    f"Lemma 2 (needs only η_eff L ≤ 1) is exceeded in **{summary['n_lemma2_violations']}** runs.\n"
  )
  for p in problems:
    w(
      f"\n### {p} (L = {summary['problems'][p]['L']:.4g}, F_inf = "
      f"{summary['problems'][p]['F_inf']:.6g})\n"
    )
    w(
      "| lr | topology | τ | ζ | cond | holds | measured | eq. 17 | meas ≤ eq.17 | Lemma 2 | "
      "meas ≤ L2 |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in cells:
      if r["problem"] != p:
        continue
      w(
        f"| {'ηL=0.05' if r['lr_kind'] == 'fixed' else 'max (eq.16)'} | {r['family']} | "
        f"{r['tau']} | {r['zeta']:.3f} | {r['condition_value']:.3g} | "
        f"{'yes' if r['condition_holds'] else 'no'} | {r['measured_avg']:.3e} | "
        f"{r['bound_total']:.3e} | {'yes' if r['measured_le_bound'] else 'NO'} | "
        f"{r['lemma2_total']:.3e} | {'yes' if r['measured_le_lemma2'] else 'NO'} |"
      )
  w("\n## Error floor vs τ (periodic averaging, W = J, ηL = 0.05)\n")
  w(
    "| problem | fitted slope | intercept | R² | bound slope η²L²σ² | relative spread of floors "
    "over τ |"
  )
  w("|---|---|---|---|---|---|")
  for p in problems:
    f = summary["analysis"][p]["pasgd_fit"]
    w(
      f"| {p} | {f['slope']:.3e} | {f['intercept']:.3e} | {f['r2']:.3f} | "
      f"{f['bound_slope']:.3e} | {f['rel_spread_over_tau']:.2e} |"
    )
  w("\n## Error floor vs ζ at fixed τ (ηL = 0.05)\n")
  w(
    "| problem | τ | floors in order of ζ (" + " < ".join(topo_names_sorted(s)) + ") | "
    "increasing? | last/first − 1 |"
  )
  w("|---|---|---|---|---|")
  for p in problems:
    for tau, t in summary["analysis"][p]["zeta_trend"].items():
      w(
        f"| {p} | {tau} | "
        + ", ".join(f"{x:.4e}±{e:.1e}" for x, e in zip(t["floors"], t["ses"], strict=True))
        + f" | {'yes' if t['monotone_increasing'] else 'no'} | "
        f"{t['rel_change_last_vs_first']:+.2e} |"
      )
  w("\n## EASGD floor vs α (ηL = 0.05)\n")
  w(
    "| problem | τ | argmin α (measured floor) | interior? | argmin α (measured mean over K) "
    "| interior? | argmin α (eq. 17 floor) | 2/(m+2) |"
  )
  w("|---|---|---|---|---|---|---|---|")
  m = s["m"]
  for p in problems:
    for tau, e in summary["analysis"][p]["easgd"].items():
      w(
        f"| {p} | {tau} | {e['argmin_alpha']:.4f} | {'yes' if e['interior_minimum'] else 'no'} "
        f"| {e['argmin_alpha_avg']:.4f} | {'yes' if e['interior_minimum_avg'] else 'no'} "
        f"| {e['bound_argmin_alpha']:.4f} | {2 / (m + 2):.4f} |"
      )
  w("\n## Findings\n")
  for line in findings(summary, problems):
    w(f"- {line}")
  path.write_text("\n".join(L) + "\n")


def topo_names_sorted(s):
  return [k for k, _ in sorted(s["zetas"].items(), key=lambda kv: kv[1])]


LINEAR = ("quadratic", "least_squares")


def findings(summary, problems) -> list[str]:
  """Plain statements drawn from the analysis (no hand-written conclusions)."""
  s = summary["settings"]
  out = [
    f"Eq. 16 holds in {summary['n_condition_holds']} of {summary['n_runs']} runs; the measured "
    f"error exceeds eq. 17 in {summary['n_condition_holds_and_measured_gt_bound']} of them and "
    f"exceeds Lemma 2 in {summary['n_lemma2_violations']} runs. Where eq. 16 fails (no "
    f"guarantee), the measured error is still below eq. 17's formula in "
    f"{summary['n_fail_but_below']} of {summary['n_runs'] - summary['n_condition_holds']} runs."
  ]
  for p in problems:
    a = summary["analysis"][p]
    f = a["pasgd_fit"]
    if p in LINEAR and f["rel_spread_all_topologies"] < 1e-9:
      out.append(
        f"**{p}: the error floor does not depend on τ or W at all**: the largest relative "
        f"difference between the floors of all {len(s['taus'])}×{len(s['zetas'])} (τ, W) cells is "
        f"{f['rel_spread_all_topologies']:.1e}; the linear fit over τ (W = J) has slope "
        f"{f['slope']:.1e}, i.e. rounding noise, and its R² is meaningless. This is exact, not statistical: with a "
        "gradient linear in x and v = 0, the average u_k of the models obeys "
        "u_{k+1} = u_k − η(∇F(u_k) + mean noise) whatever τ and W are (mixing keeps the "
        "average), so u_k is sync SGD's iterate. Eq. 17's network term "
        f"(slope η²L²σ² = {f['bound_slope']:.2e} per unit τ) is pure slack here. This disagrees "
        "with the paper's reading that larger τ or ζ raises the floor (Fig. 3b); it does not "
        "contradict Theorem 1, which is an upper bound."
      )
    else:
      trend = "decreases" if f["slope"] < 0 else "increases"
      out.append(
        f"**{p}**: the periodic-averaging floor {trend} with τ: linear fit slope "
        f"{f['slope']:.2e} (R² = {f['r2']:.3f}), intercept {f['intercept']:.3e}, total relative "
        f"change {f['rel_spread_over_tau']:.1%} over τ = {s['taus'][0]}..{s['taus'][-1]}; eq. 17 "
        f"predicts slope η²L²σ² = {f['bound_slope']:.2e}."
        + (
          " The sign disagrees with the paper's prediction (larger τ → higher floor)."
          if f["slope"] < 0
          else ""
        )
      )
      zt = a["zeta_trend"]
      inc = [t for t, v in zt.items() if v["monotone_increasing"]]
      rel = {t: v["rel_change_last_vs_first"] for t, v in zt.items()}
      out.append(
        f"**{p}**: at fixed τ the floor increases monotonically with ζ for τ in {inc or 'none'}; "
        "relative change from the smallest to the largest ζ per τ: "
        + ", ".join(f"τ={t}: {r:+.1%}" for t, r in rel.items())
        + ". These differences are below one standard error of the seed mean "
        "but systematic, since every configuration uses the same noise draws."
        if all(abs(v["floors"][-1] - v["floors"][0]) < v["ses"][0] for v in zt.values())
        else f"**{p}**: at fixed τ the floor increases monotonically with ζ for τ in "
        f"{inc or 'none'}; relative change smallest→largest ζ: "
        + ", ".join(f"τ={t}: {r:+.1%}" for t, r in rel.items())
        + "."
      )
    for tau, e in a["easgd"].items():
      out.append(
        f"**{p}**, EASGD τ = {tau}: measured floor minimised at α = {e['argmin_alpha']:.4f} "
        f"({'an interior minimum' if e['interior_minimum'] else 'at the edge of the grid'}); "
        f"the eq. 17 floor is minimised at α = {e['bound_argmin_alpha']:.4f} on the grid "
        f"(closed form 2/(m+2) = {2 / (s['m'] + 2):.4f}); floors range "
        f"{min(e['floors']):.3e}..{max(e['floors']):.3e} (relative range "
        f"{max(e['floors']) / min(e['floors']) - 1:.1%}). The mean over all K steps, which "
        f"includes the transient, is minimised at α = {e['argmin_alpha_avg']:.4f} "
        f"({'interior' if e['interior_minimum_avg'] else 'edge of the grid'})."
      )
  return out


if __name__ == "__main__":
  main()
