"""Tests of coopjax.theory against eigenvalue computations and hand-evaluated formulas."""

import math
import warnings

import numpy as np
import pytest

from coopjax import theory
from coopjax import topology

MS = [4, 8, 16]


def _eig_zeta(W):
  lam = np.sort(np.linalg.eigvalsh(W))[::-1]
  return max(abs(lam[1]), abs(lam[-1]))


def _quiet(fn, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fn(*args)


@pytest.mark.parametrize("m", [2, 3, 5, 8, 16])
def test_zeta_complete_identity(m):
  assert theory.zeta(topology.complete(m)) == pytest.approx(0.0, abs=1e-12)
  assert theory.zeta(np.eye(m)) == pytest.approx(1.0, abs=1e-12)
  assert theory.spectral_gap(topology.complete(m)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 9, 16, 31])
def test_zeta_ring_closed_form(m):
  W = topology.ring(m)
  assert theory.zeta_ring(m) == pytest.approx(_eig_zeta(W), abs=1e-12)
  assert theory.zeta(W) == pytest.approx(_eig_zeta(W), abs=1e-12)


def test_zeta_ring_values():
  # m = 4: eigenvalues 1, 1/3, -1/3, 1/3 -> 1/3; m = 6: (1 + 2cos(π/3))/3 = 2/3.
  assert theory.zeta_ring(4) == pytest.approx(1 / 3)
  assert theory.zeta_ring(6) == pytest.approx(2 / 3)


@pytest.mark.parametrize("m,v", [(1, 0), (8, 0), (8, 1), (4, 3)])
def test_effective_lr(m, v):
  lr = 0.37
  eff = theory.effective_lr(lr, m, v)
  assert eff == pytest.approx(lr * m / (m + v))
  # eq. 13 identity: η = η_eff (1 + v/m).
  assert eff * (1 + v / m) == pytest.approx(lr)


def test_network_error_factor_special_cases():
  for tau in [1, 2, 7]:
    assert theory.network_error_factor(tau, 0.0) == pytest.approx(tau - 1)
  for z in [0.1, 0.5, 0.9]:
    assert theory.network_error_factor(1, z) == pytest.approx(2 * z * z / (1 - z * z))


@pytest.mark.parametrize(
  "lr,L,sigma2,m,v,tau,z,K,gap",
  [
    (0.01, 2.0, 3.0, 8, 0, 4, 0.0, 1000, 5.0),
    (0.002, 1.5, 0.5, 16, 1, 2, 0.8, 640, 2.0),
    (0.05, 1.0, 1.0, 4, 0, 1, 0.5, 10, 1.0),
  ],
)
def test_error_bound_terms_by_hand(lr, L, sigma2, m, v, tau, z, K, gap):
  b = theory.error_bound(lr, L, sigma2, m, v, tau, z, K, gap)
  eff = lr * m / (m + v)
  opt = 2 * gap / (eff * K)
  sync = eff * L * sigma2 / m
  net = eff**2 * L**2 * sigma2 * ((1 + z**2) / (1 - z**2) * tau - 1) * (1 + v / m) ** 2
  cond = eff * L + 5 * eff**2 * L**2 * ((1 + v / m) * tau / (1 - z)) ** 2
  assert b.optimization == pytest.approx(opt)
  assert b.sync_noise == pytest.approx(sync)
  assert b.network == pytest.approx(net)
  assert b.total == pytest.approx(opt + sync + net)
  assert b.floor == pytest.approx(sync + net)
  assert b.condition_value == pytest.approx(cond)
  assert b.condition_holds == (cond <= 1)
  # The paper's remark: network = η² L² σ² (...) with η = η_eff (1 + v/m).
  assert b.network == pytest.approx(lr**2 * L**2 * sigma2 * ((1 + z**2) / (1 - z**2) * tau - 1))


def test_error_bound_infinite_K_is_floor():
  b = theory.error_bound(0.01, 1.0, 1.0, 8, 0, 4, 0.3, math.inf, 10.0)
  assert b.optimization == 0.0
  assert b.total == pytest.approx(b.floor)


def test_strict_raises_with_value_and_max_lr():
  lr, L, m, v, tau, z = 0.5, 1.0, 8, 0, 8, 0.9
  b = theory.error_bound(lr, L, 1.0, m, v, tau, z, 100, 1.0)
  assert not b.condition_holds
  with pytest.raises(ValueError) as e:
    theory.error_bound(lr, L, 1.0, m, v, tau, z, 100, 1.0, strict=True)
  msg = str(e.value)
  assert f"{b.condition_value:.6g}" in msg
  assert f"{theory.max_lr(L, m, v, tau, z):.6g}" in msg


@pytest.mark.parametrize(
  "m,v,tau,z,L", [(8, 0, 1, 0.0, 1.0), (16, 1, 4, 0.9, 3.0), (4, 0, 32, 0.5, 0.2)]
)
def test_max_lr_satisfies_eq16_with_equality(m, v, tau, z, L):
  lr = theory.max_lr(L, m, v, tau, z)
  eff = lr * m / (m + v)
  lhs = eff * L + 5 * eff**2 * L**2 * ((1 + v / m) * tau / (1 - z)) ** 2
  assert lhs == pytest.approx(1.0, rel=1e-10)
  assert theory.error_bound(lr, L, 1, m, v, tau, z, 10 * tau, 1).condition_holds
  assert not theory.error_bound(lr * 1.001, L, 1, m, v, tau, z, 10 * tau, 1).condition_holds


def test_periodic_bound_matches_corollary2():
  lr, L, s2, m, tau, K, gap = 0.01, 2.0, 1.5, 8, 6, 600, 3.0
  b = theory.periodic_averaging_bound(lr, L, s2, m, tau, K, gap)
  assert b.total == pytest.approx(
    2 * gap / (lr * K) + lr * L * s2 / m + lr**2 * L**2 * s2 * (tau - 1)
  )
  assert b.condition_value == pytest.approx(lr * L + lr**2 * L**2 * tau * (tau - 1))
  general = theory.error_bound(lr, L, s2, m, 0, tau, 0.0, K, gap)
  assert b.total == pytest.approx(general.total)
  # Corollary 2's condition is weaker than eq. 16 at ζ = 0.
  assert b.max_lr > general.max_lr


def test_dpsgd_bound_matches_corollary3():
  lr, L, s2, m, z, K, gap = 0.02, 1.0, 2.0, 16, 0.7, 500, 1.0
  b = theory.dpsgd_bound(lr, L, s2, m, z, K, gap)
  assert b.network == pytest.approx(lr**2 * L**2 * s2 * 2 * z * z / (1 - z * z))
  cond = lr * L + lr**2 * L**2 * (2 * z / (1 - z)) * (z / (1 + z) + 1 / (1 - z))
  assert b.condition_value == pytest.approx(cond)
  assert b.total == pytest.approx(theory.error_bound(lr, L, s2, m, 0, 1, z, K, gap).total)
  x = b.max_lr * L
  assert x + x * x * (2 * z / (1 - z)) * (z / (1 + z) + 1 / (1 - z)) == pytest.approx(1.0)


def test_lemma2_bound():
  lr, L, s2, m, v, K, gap, D = 0.01, 2.0, 1.0, 8, 1, 100, 1.0, 0.3
  b = theory.lemma2_bound(lr, L, s2, m, v, K, gap, D)
  eff = lr * m / (m + v)
  assert b.total == pytest.approx(2 * gap / (eff * K) + eff * L * s2 / m + L * L * D / m)
  assert b.condition_value == pytest.approx(eff * L)


@pytest.mark.parametrize("m", MS)
def test_easgd_zeta_and_best_alpha_vs_eigenvalues(m):
  alphas = np.linspace(0, 2 / (m + 1), 203)[1:-1]
  eig = np.array([_eig_zeta(_quiet(topology.easgd, m, a)) for a in alphas])
  closed = np.array([theory.easgd_zeta(m, a) for a in alphas])
  np.testing.assert_allclose(closed, eig, atol=1e-10)
  # Brute-force minimiser of ζ over a fine grid vs Lemma 1.
  fine = np.linspace(0, 2 / (m + 1), 20003)[1:-1]
  zs = [_eig_zeta(_quiet(topology.easgd, m, a)) for a in fine[::50]]
  coarse_best = fine[::50][int(np.argmin(zs))]
  assert theory.easgd_best_alpha(m) == pytest.approx(2 / (m + 2))
  assert abs(coarse_best - theory.easgd_best_alpha(m)) <= 50 * (fine[1] - fine[0])
  a_star = theory.easgd_best_alpha(m)
  assert _eig_zeta(_quiet(topology.easgd, m, a_star)) == pytest.approx(m / (m + 2))
  a_num, _ = theory.best_alpha_numerical(m, tau=2)
  assert a_num == pytest.approx(a_star, abs=1e-6)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("graph", ["ring", "complete", "exponential"])
def test_elastic_zeta_and_best_alpha_vs_eigenvalues(m, graph):
  W = getattr(topology, graph)(m)
  zw = _eig_zeta(W)
  alphas = np.linspace(0, 2 / (m + 1), 103)[1:-1]
  eig = np.array([_eig_zeta(_quiet(topology.elastic, W, a)) for a in alphas])
  closed = np.array([theory.elastic_zeta(zw, m, a) for a in alphas])
  np.testing.assert_allclose(closed, eig, atol=1e-10)
  a_star = theory.elastic_best_alpha(zw, m)
  assert _eig_zeta(_quiet(topology.elastic, W, a_star)) == pytest.approx(
    m * zw / (m + 1 + zw), abs=1e-10
  )
  # No grid α beats the closed-form optimum.
  assert eig.min() >= m * zw / (m + 1 + zw) - 1e-10
  a_num, _ = theory.best_alpha_numerical(m, tau=1, W=W)
  assert a_num == pytest.approx(a_star, abs=1e-6)


def test_elastic_with_identity_is_easgd():
  for m in MS:
    for a in [0.05, 1 / (m + 1), 1.9 / (m + 1)]:
      assert theory.elastic_zeta(1.0, m, a) == pytest.approx(theory.easgd_zeta(m, a))
    assert theory.elastic_best_alpha(1.0, m) == pytest.approx(theory.easgd_best_alpha(m))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bad", [0.0, -0.1, "upper", "above"])
def test_alpha_outside_interval_raises(m, bad):
  alpha = {"upper": 2 / (m + 1), "above": 3 / (m + 1)}.get(bad, bad)
  with pytest.raises(ValueError, match="outside"):
    theory.easgd_zeta(m, alpha)
  with pytest.raises(ValueError, match="outside"):
    theory.elastic_zeta(0.5, m, alpha)


def test_zeta_one_raises():
  with pytest.raises(ValueError, match="zeta"):
    theory.error_bound(0.01, 1, 1, 8, 0, 1, 1.0, 10, 1)


@pytest.mark.parametrize(
  "fraction,z,lr,L,m,v",
  [
    (1.0, 0.0, 0.01, 1.0, 8, 0),
    (0.5, 0.6, 0.002, 2.0, 16, 0),
    (2.0, 0.9, 0.001, 1.0, 16, 1),
    (0.1, 0.3, 0.05, 1.0, 4, 0),
  ],
)
def test_largest_tau_definition(fraction, z, lr, L, m, v):
  tau = theory.largest_tau(fraction, z, lr, L, m, v)

  def ok(t):
    b = theory.error_bound(lr, L, 1.0, m, v, t, z, math.inf, 0.0)
    return b.network <= fraction * b.sync_noise

  if tau >= 1:
    assert ok(tau)
  assert not ok(tau + 1)


def test_largest_tau_zero_when_dpsgd_already_too_noisy():
  # With ζ = 0.99, τ = 1 already has network error ≫ sync noise.
  assert theory.largest_tau(0.01, 0.99, 0.1, 1.0, 16) == 0


def test_largest_tau_respects_lr_condition():
  args = (10.0, 0.5, 0.01, 1.0, 8, 0)
  t_free = theory.largest_tau(*args)
  t_cond = theory.largest_tau(*args, respect_lr_condition=True)
  assert t_cond <= t_free
  assert theory.lr_condition(0.01, 1.0, 8, 0, t_cond, 0.5) <= 1
  assert theory.lr_condition(0.01, 1.0, 8, 0, t_cond + 1, 0.5) > 1


def test_communication_table3():
  d, m = 1000, 8
  ar = theory.communication_per_iteration(4, topology.complete(m), 0, d, dtype_bytes=4)
  assert ar.scheme == "allreduce"
  assert ar.params_per_mix == 2 * d and ar.params_per_iteration == 2 * d / 4
  assert ar.bytes_per_iteration == 4 * 2 * d / 4
  ps = theory.communication_per_iteration(2, topology.complete(m), 0, d, scheme="parameter_server")
  assert ps.params_per_iteration == 2 * d * m / 2
  ring = theory.communication_per_iteration(1, topology.ring(m), 0, d)
  assert ring.scheme == "decentralized" and ring.params_per_mix == 2 * d * 2
  torus = theory.communication_per_iteration(3, topology.torus(4, 4), 0, d)
  assert torus.params_per_iteration == pytest.approx(2 * d * 4 / 3)
  ez = theory.communication_per_iteration(5, _quiet(topology.easgd, m, 0.1), 1, d)
  assert ez.params_per_mix == 2 * d * m  # the anchor talks to all m workers
  assert theory.communication_per_iteration(1, np.eye(m), 0, d).params_per_iteration == 0


# ---------------------------------------------------------------------------------------------
# Theorem 2 (non-IID)


def test_noniid_coefficient_hand_evaluated():
  lr, L, tau, z = 0.02, 2.0, 3, 0.5
  inner = 2 * 0.25 / 1.5 + 2 * 0.5 / 0.5 + 2 / 3
  expected = 6 * lr**2 * L**2 * 9 / 0.5 * inner
  assert theory.noniid_coefficient(lr, L, tau, z) == pytest.approx(expected, rel=1e-12)
  assert theory.noniid_coefficient(lr, L, 1, 0.0) == 0.0  # sync SGD: no κ² term
  # Full averaging: C = 6η²L²τ(τ − 1), quadratic in τ.
  assert theory.noniid_coefficient(lr, L, 5, 0.0) == pytest.approx(6 * lr**2 * L**2 * 20)


def test_noniid_bound_is_twice_eq17_plus_c_kappa2():
  lr, L, s2, k2, m, tau, z, K, gap = 0.01, 1.0, 1.0, 3.0, 8, 4, 0.3, 1000, 2.0
  iid = theory.error_bound(lr, L, s2, m, 0, tau, z, K, gap)
  b = theory.noniid_error_bound(lr, L, s2, k2, m, 0, tau, z, K, gap)
  C = theory.noniid_coefficient(lr, L, tau, z)
  assert b.total == pytest.approx(2 * iid.total + C * k2, rel=1e-12)
  assert b.network == pytest.approx(2 * iid.network + C * k2, rel=1e-12)
  assert b.condition_value == pytest.approx(max(lr * L, 2 * C))
  assert b.condition_holds
  # max_lr: the larger of the two conditions binds; at max_lr the binding one equals 1.
  at = theory.noniid_error_bound(b.max_lr, L, s2, k2, m, 0, tau, z, K, gap)
  assert at.condition_value == pytest.approx(1.0, rel=1e-9)
  with pytest.raises(ValueError, match="Theorem 2"):
    theory.noniid_error_bound(10 * b.max_lr, L, s2, k2, m, 0, tau, z, K, gap, strict=True)


def test_theory_check_control_fails_on_a_tiny_run(tmp_path):
  """The experiment's no-mixing control fails the check; the real runs of the tiny grid pass."""
  import json
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [
    sys.executable,
    os.path.join(root, "experiments", "theory_check.py"),
    *("--m", "4", "--d", "4", "--K", "64", "--seeds", "3", "--taus", "1", "2"),
    *("--problems", "least_squares_noniid", "--no-easgd", "--out", str(tmp_path)),
  ]
  env = {**os.environ, "PYTHONPATH": root}
  subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
  cells = json.loads((tmp_path / "results.json").read_text())["cells"]
  ctrl = {(r["control"], r["tau"]): r for r in cells if r["control"]}
  assert ctrl[("no_mixing", 1)]["verdict"] == "FAIL"
  assert ctrl[("no_mixing", 1)]["excess"] > 10 * ctrl[("no_mixing", 1)]["excess_se"]
  real = [r for r in cells if not r["control"] and r["lr_kind"] == "fixed"]
  assert all(r["verdict"] != "FAIL" for r in real)
  assert (tmp_path / "summary.md").exists()
