r"""Error bounds and design rules of Cooperative SGD, A(τ, W, v), in plain NumPy.

Everything here evaluates formulas of Wang & Joshi, "Cooperative SGD: A Unified
Framework for the Design and Analysis of Local-Update SGD Algorithms", JMLR 22(213),
2021 (equation numbers are the JMLR ones). With ``m`` workers, ``v`` auxiliary
variables, a mix with ``W`` every ``τ`` steps and learning rate ``η``, the averaged
model moves with the effective learning rate (eq. 13)

.. math::

   \eta_{\text{eff}} = \frac{m}{m + v}\,\eta ,

and, for L-smooth objectives with gradient noise ``E‖g − ∇F‖² ≤ σ²`` (IID data,
β = 0), Theorem 1 gives, when the learning-rate condition (eq. 16)

.. math::

   \eta_{\text{eff}} L + 5\,\eta_{\text{eff}}^2 L^2
   \Big[\frac{(1 + v/m)\,\tau}{1 - \zeta}\Big]^2 \le 1

holds, the bound (eq. 17)

.. math::

   \mathbb E\Big[\frac1K \sum_{k=1}^K \|\nabla F(u_k)\|^2\Big] \le
   \underbrace{\frac{2[F(u_1) - F_{\inf}]}{\eta_{\text{eff}} K}}_{\text{optimisation}}
   + \underbrace{\frac{\eta_{\text{eff}} L \sigma^2}{m}}_{\text{sync-SGD noise}}
   + \underbrace{\eta_{\text{eff}}^2 L^2 \sigma^2
     \Big(\frac{1 + \zeta^2}{1 - \zeta^2}\tau - 1\Big)\Big(1 + \frac vm\Big)^2}_{\text{network}} .

The first two terms are fully synchronous SGD's error; the last one is the price of
infrequent (τ > 1) or sparse (ζ > 0) communication.

All functions take and return Python floats (or NamedTuples of floats); they run on
the host and raise :class:`ValueError` for arguments outside the theory's domain.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import numpy as np
from scipy import optimize

from coopjax import topology
from coopjax._validation import check_int

__all__ = [
  "zeta",
  "spectral_gap",
  "zeta_ring",
  "effective_lr",
  "network_error_factor",
  "ErrorBound",
  "lr_condition",
  "max_lr",
  "error_bound",
  "periodic_averaging_bound",
  "dpsgd_bound",
  "lemma2_bound",
  "noniid_coefficient",
  "noniid_error_bound",
  "easgd_zeta",
  "easgd_best_alpha",
  "elastic_zeta",
  "elastic_best_alpha",
  "best_alpha_numerical",
  "largest_tau",
  "CommunicationCost",
  "communication_per_iteration",
]


# ---------------------------------------------------------------------------
# Argument checks.


def _real(name: str, value, *, low: float | None = None, low_open: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}.")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}.")
  if low is not None:
    if low_open and value <= low:
      raise ValueError(f"{name} must be > {low}, got {value}.")
    if not low_open and value < low:
      raise ValueError(f"{name} must be >= {low}, got {value}.")
  return value


def _zeta(value) -> float:
  z = _real("zeta", value, low=0.0)
  if z >= 1.0:
    raise ValueError(
      f"zeta={z} >= 1: the mixing matrix never reaches consensus and the bound is infinite; "
      "use a connected topology (0 <= zeta < 1)."
    )
  return z


def _alpha(alpha, m: int) -> float:
  alpha = _real("alpha", alpha)
  upper = 2.0 / (m + 1)
  if not 0.0 < alpha < upper:
    raise ValueError(
      f"alpha={alpha} is outside (0, 2/(m+1)) = (0, {upper:.6g}) for m={m}: there "
      "zeta >= 1 and the models never reach consensus "
      f"(the error-floor-minimising EASGD value is 2/(m+2) = {2.0 / (m + 2):.6g})."
    )
  return alpha


# ---------------------------------------------------------------------------
# Spectral quantities.


def zeta(W: np.ndarray) -> float:
  r"""ζ = max{|λ₂(W)|, |λ_{m+v}(W)|}, the second-largest eigenvalue modulus of W (§4).

  Thin wrapper of :func:`coopjax.topology.zeta`.

  >>> round(zeta(topology.complete(4)), 12)
  0.0
  """
  return topology.zeta(W)


def spectral_gap(W: np.ndarray) -> float:
  r"""Spectral gap ``1 − ζ(W)``; it enters eq. 16 as ``τ/(1 − ζ)``.

  .. math::

     \delta(W) = 1 - \zeta(W) .

  Examples:
    The ring of four has eigenvalues 1, 1/3, 1/3, −1/3, so ζ = 1/3:

    >>> round(spectral_gap(topology.ring(4)), 4)
    0.6667
  """
  return 1.0 - zeta(W)


def zeta_ring(m: int) -> float:
  r"""Closed-form ζ of :func:`coopjax.topology.ring` (weights 1/3 on self and both neighbours).

  The ring matrix is circulant, so its eigenvalues are

  .. math::

     \lambda_k = \frac{1 + 2\cos(2\pi k/m)}{3}, \qquad k = 0, \dots, m-1,

  and ζ = max over ``k ≠ 0`` of ``|λ_k|``. For ``m = 2`` the two neighbours coincide
  (``W = [[1/3, 2/3], [2/3, 1/3]]``, ζ = 1/3); ``m = 1`` gives 0.

  >>> round(zeta_ring(3), 12)
  0.0
  """
  m = check_int("m", m, 1)
  if m == 1:
    return 0.0
  if m == 2:
    return 1.0 / 3.0
  k = np.arange(1, m)
  return float(np.max(np.abs((1.0 + 2.0 * np.cos(2.0 * np.pi * k / m)) / 3.0)))


def effective_lr(lr: float, m: int, v: int = 0) -> float:
  r"""Effective learning rate of the averaged model, ``η_eff = m/(m+v)·η`` (eq. 13).

  >>> effective_lr(0.1, 8, 1)  # EASGD with 8 workers
  0.08888888888888889
  """
  lr = _real("lr", lr, low=0.0, low_open=True)
  m = check_int("m", m, 1)
  v = check_int("v", v, 0)
  return m / (m + v) * lr


def network_error_factor(tau: int, zeta: float) -> float:
  r"""The factor ``(1 + ζ²)/(1 − ζ²)·τ − 1`` of the network-error term of eq. 17.

  It is ``τ − 1`` for full averaging (ζ = 0, Corollary 2) and ``2ζ²/(1 − ζ²)`` for
  τ = 1 (D-PSGD, Corollary 3).

  .. math::

     \frac{1 + \zeta^2}{1 - \zeta^2}\,\tau - 1 .

  Examples:
    >>> network_error_factor(4, 0.0)  # tau - 1
    3.0
    >>> round(network_error_factor(1, 0.5), 4)  # 2 (1/4) / (3/4)
    0.6667
  """
  tau = check_int("tau", tau, 1)
  z = _zeta(zeta)
  return (1.0 + z * z) / (1.0 - z * z) * tau - 1.0


# ---------------------------------------------------------------------------
# Error bounds.


class ErrorBound(NamedTuple):
  """Terms of an error bound on ``E[(1/K) Σ_k ‖∇F(u_k)‖²]`` and its learning-rate condition.

  Attributes:
    optimization: ``2[F(u_1) − F_inf]/(η_eff K)``, vanishes as K → ∞.
    sync_noise: ``η_eff L σ²/m``, fully synchronous SGD's noise floor.
    network: the network error (communication every τ steps through W).
    total: the sum of the three terms.
    floor: ``sync_noise + network``, the bound's limit as K → ∞ (the error floor).
    lr_eff: the effective learning rate ``η_eff``.
    condition_value: the left-hand side of the learning-rate condition (≤ 1 required).
    condition_holds: whether ``condition_value ≤ 1``; if False the bound is not proven.
    max_lr: the largest learning rate η (not η_eff) for which the condition holds.

  Examples:
    Fully synchronous SGD (τ = 1, ζ = 0) has no network term, so the floor is
    ``η L σ²/m = 0.01/4``:

    >>> b = error_bound(0.01, 1.0, 1.0, 4, 0, 1, 0.0, 100, 1.0)
    >>> b.network, b.floor, b.condition_holds
    (0.0, 0.0025, True)
  """

  optimization: float
  sync_noise: float
  network: float
  total: float
  floor: float
  lr_eff: float
  condition_value: float
  condition_holds: bool
  max_lr: float


def _largest_root(a: float, b: float) -> float:
  """Positive root x of ``a·x + b·x² = 1`` (a > 0, b ≥ 0)."""
  if b == 0.0:
    return 1.0 / a
  return (-a + math.sqrt(a * a + 4.0 * b)) / (2.0 * b)


def _theorem1_b(m: int, v: int, tau: int, z: float) -> float:
  return 5.0 * ((1.0 + v / m) * tau / (1.0 - z)) ** 2


def lr_condition(lr: float, L: float, m: int, v: int, tau: int, zeta: float) -> float:
  r"""Left-hand side of the learning-rate condition of Theorem 1 (eq. 16).

  .. math::

     \eta_{\text{eff}} L + 5\,\eta_{\text{eff}}^2 L^2
     \Big[\frac{(1 + v/m)\,\tau}{1 - \zeta}\Big]^2 ,

  which must be ``≤ 1`` for eq. 17 to hold.

  Examples:
    ``0.1 + 5 · 0.1² · (2/0.5)² = 0.9``:

    >>> round(lr_condition(0.1, 1.0, 4, 0, 2, 0.5), 4)
    0.9
  """
  L = _real("L", L, low=0.0, low_open=True)
  x = effective_lr(lr, m, v) * L
  return x + _theorem1_b(m, v, check_int("tau", tau, 1), _zeta(zeta)) * x * x


def max_lr(L: float, m: int, v: int, tau: int, zeta: float) -> float:
  r"""Largest learning rate η satisfying eq. 16 (with equality).

  With ``x = η_eff L`` and ``b = 5[(1 + v/m)τ/(1 − ζ)]²``, eq. 16 reads
  ``x + b x² ≤ 1``, whose positive root is

  .. math::

     x^\star = \frac{-1 + \sqrt{1 + 4b}}{2b}, \qquad
     \eta_{\max} = \frac{m + v}{m}\,\frac{x^\star}{L} .

  >>> round(max_lr(1.0, 4, 0, 1, 0.0), 6)  # x + 5x² = 1
  0.358258
  """
  L = _real("L", L, low=0.0, low_open=True)
  m = check_int("m", m, 1)
  v = check_int("v", v, 0)
  x = _largest_root(1.0, _theorem1_b(m, v, check_int("tau", tau, 1), _zeta(zeta)))
  return (m + v) / m * x / L


def _bound(
  *,
  lr: float,
  L: float,
  sigma2: float,
  m: int,
  v: int,
  K: int | float,
  f_gap: float,
  network_coeff: float,
  cond_a: float,
  cond_b: float,
  strict: bool,
  label: str,
) -> ErrorBound:
  lr_eff = effective_lr(lr, m, v)
  x = lr_eff * L
  cond = cond_a * x + cond_b * x * x
  lr_max = (m + v) / m * _largest_root(cond_a, cond_b) / L
  holds = bool(cond <= 1.0 + 1e-12)
  if strict and not holds:
    raise ValueError(
      f"the learning-rate condition of {label} fails: its left-hand side is {cond:.6g} > 1 "
      f"at lr={lr:.6g}; the largest admissible lr is {lr_max:.6g}. Lower lr (or tau, or "
      "use a better-connected W), or pass strict=False to evaluate the bound anyway."
    )
  opt = 2.0 * f_gap / (lr_eff * K) if math.isfinite(K) else 0.0
  sync = lr_eff * L * sigma2 / m
  net = lr_eff**2 * L**2 * sigma2 * network_coeff
  return ErrorBound(
    optimization=opt,
    sync_noise=sync,
    network=net,
    total=opt + sync + net,
    floor=sync + net,
    lr_eff=lr_eff,
    condition_value=cond,
    condition_holds=holds,
    max_lr=lr_max,
  )


def _common(lr, L, sigma2, m, v, K, f_gap):
  lr = _real("lr", lr, low=0.0, low_open=True)
  L = _real("L", L, low=0.0, low_open=True)
  sigma2 = _real("sigma2", sigma2, low=0.0)
  m = check_int("m", m, 1)
  v = check_int("v", v, 0)
  if isinstance(K, float) and math.isinf(K) and K > 0:
    pass
  else:
    K = check_int("K", K, 1)
  f_gap = _real("f_gap", f_gap, low=0.0)
  return lr, L, sigma2, m, v, K, f_gap


def error_bound(
  lr: float,
  L: float,
  sigma2: float,
  m: int,
  v: int,
  tau: int,
  zeta: float,
  K: int | float,
  f_gap: float,
  *,
  strict: bool = False,
) -> ErrorBound:
  r"""Theorem 1's bound (eq. 17) on the averaged gradient norm of A(τ, W, v), and eq. 16.

  .. math::

     \frac{2[F(u_1) - F_{\inf}]}{\eta_{\text{eff}} K} + \frac{\eta_{\text{eff}} L \sigma^2}{m}
     + \eta_{\text{eff}}^2 L^2 \sigma^2 \Big(\frac{1 + \zeta^2}{1 - \zeta^2}\tau - 1\Big)
       \Big(1 + \frac vm\Big)^2

  valid when ``η_eff L + 5 η_eff² L² [(1 + v/m) τ/(1 − ζ)]² ≤ 1`` (eq. 16), for IID data,
  β = 0, K a multiple of τ and all models started at ``u_1``.

  Args:
    lr: learning rate η of every worker (not η_eff).
    L: smoothness constant of F.
    sigma2: gradient-noise variance bound σ² (``E‖g − ∇F‖² ≤ σ²``, per worker and step).
    m: number of workers.
    v: number of auxiliary variables (1 for EASGD).
    tau: communication period τ.
    zeta: ζ(W) in [0, 1), see :func:`zeta`.
    K: number of iterations; ``float('inf')`` drops the optimisation term.
    f_gap: ``F(u_1) − F_inf``.
    strict: raise ValueError when eq. 16 fails instead of flagging it.

  Returns:
    An :class:`ErrorBound`; ``condition_holds`` says whether eq. 16 holds (when False the
    numbers are the formula's value, not a proven bound).

  >>> b = error_bound(0.01, 1.0, 1.0, 4, 0, 1, 0.0, 100, 1.0)
  >>> round(b.total, 6), b.network  # sync SGD: no network error
  (2.0025, 0.0)
  """
  lr, L, sigma2, m, v, K, f_gap = _common(lr, L, sigma2, m, v, K, f_gap)
  coeff = network_error_factor(tau, zeta) * (1.0 + v / m) ** 2
  return _bound(
    lr=lr,
    L=L,
    sigma2=sigma2,
    m=m,
    v=v,
    K=K,
    f_gap=f_gap,
    network_coeff=coeff,
    cond_a=1.0,
    cond_b=_theorem1_b(m, v, int(tau), float(zeta)),
    strict=strict,
    label="Theorem 1 (eq. 16)",
  )


def periodic_averaging_bound(
  lr: float,
  L: float,
  sigma2: float,
  m: int,
  tau: int,
  K: int | float,
  f_gap: float,
  *,
  strict: bool = False,
) -> ErrorBound:
  r"""Corollary 2 (eq. 24): periodic averaging A(τ, J, 0) (local SGD).

  .. math::

     \frac{2[F(x_1) - F_{\inf}]}{\eta K} + \frac{\eta L \sigma^2}{m}
     + \eta^2 L^2 \sigma^2 (\tau - 1)
     \quad\text{if}\quad \eta L + \eta^2 L^2 \tau(\tau - 1) \le 1 .

  The terms equal :func:`error_bound` at ζ = 0, v = 0; only the (weaker) learning-rate
  condition differs. Arguments as in :func:`error_bound`.

  Examples:
    With η = 0.01, L = σ² = 1 and τ = 5 the network term is ``η² L² σ² (τ − 1)``:

    >>> b = periodic_averaging_bound(0.01, 1.0, 1.0, 4, 5, 100, 1.0)
    >>> round(b.network, 6), round(b.sync_noise, 6), round(b.total, 6)
    (0.0004, 0.0025, 2.0029)
  """
  lr, L, sigma2, m, _, K, f_gap = _common(lr, L, sigma2, m, 0, K, f_gap)
  tau = check_int("tau", tau, 1)
  return _bound(
    lr=lr,
    L=L,
    sigma2=sigma2,
    m=m,
    v=0,
    K=K,
    f_gap=f_gap,
    network_coeff=float(tau - 1),
    cond_a=1.0,
    cond_b=float(tau * (tau - 1)),
    strict=strict,
    label="Corollary 2 (eq. 24)",
  )


def dpsgd_bound(
  lr: float,
  L: float,
  sigma2: float,
  m: int,
  zeta: float,
  K: int | float,
  f_gap: float,
  *,
  strict: bool = False,
) -> ErrorBound:
  r"""Corollary 3 (eq. 27): decentralised parallel SGD A(1, W, 0).

  .. math::

     \frac{2[F(x_1) - F_{\inf}]}{\eta K} + \frac{\eta L \sigma^2}{m}
     + \eta^2 L^2 \sigma^2 \frac{2\zeta^2}{1 - \zeta^2}
     \quad\text{if}\quad
     \eta L + \eta^2 L^2 \frac{2\zeta}{1 - \zeta}\Big(\frac{\zeta}{1 + \zeta}
     + \frac{1}{1 - \zeta}\Big) \le 1 .

  The terms equal :func:`error_bound` at τ = 1, v = 0; only the learning-rate condition
  differs. Arguments as in :func:`error_bound`.

  Examples:
    At ζ = 1/2 the network term is ``η² L² σ² · 2ζ²/(1 − ζ²) = 10⁻⁴ · 2/3``:

    >>> b = dpsgd_bound(0.01, 1.0, 1.0, 4, 0.5, 100, 1.0)
    >>> round(b.network, 8), b.condition_holds
    (6.667e-05, True)
  """
  lr, L, sigma2, m, _, K, f_gap = _common(lr, L, sigma2, m, 0, K, f_gap)
  z = _zeta(zeta)
  return _bound(
    lr=lr,
    L=L,
    sigma2=sigma2,
    m=m,
    v=0,
    K=K,
    f_gap=f_gap,
    network_coeff=2.0 * z * z / (1.0 - z * z),
    cond_a=1.0,
    cond_b=2.0 * z / (1.0 - z) * (z / (1.0 + z) + 1.0 / (1.0 - z)),
    strict=strict,
    label="Corollary 3 (eq. 27)",
  )


def lemma2_bound(
  lr: float,
  L: float,
  sigma2: float,
  m: int,
  v: int,
  K: int,
  f_gap: float,
  mean_discrepancy: float,
  *,
  strict: bool = False,
) -> ErrorBound:
  r"""Lemma 2: the bound with the measured consensus distance in place of its estimate.

  .. math::

     \frac{2[F(u_1) - F_{\inf}]}{\eta_{\text{eff}} K} + \frac{\eta_{\text{eff}} L\sigma^2}{m}
     + \frac{L^2}{m}\,\frac1K\sum_{k=1}^K \mathbb E\|X_k(I - J)\|_F^2 ,

  valid when ``η_eff L ≤ 1`` (β = 0). ``mean_discrepancy`` is
  ``(1/K) Σ_k ‖X_k(I − J)‖²_F`` over all ``m + v`` columns, e.g. measured in a run with
  :func:`coopjax.workers.consensus_distance`. The ``network`` field holds the last term.

  Examples:
    A measured mean discrepancy of 0.2 over 4 workers with L = 1 adds
    ``L² · 0.2/4 = 0.05``:

    >>> b = lemma2_bound(0.01, 1.0, 1.0, 4, 0, 100, 1.0, 0.2)
    >>> round(b.network, 6), round(b.total, 6)
    (0.05, 2.0525)
  """
  lr, L, sigma2, m, v, K, f_gap = _common(lr, L, sigma2, m, v, K, f_gap)
  D = _real("mean_discrepancy", mean_discrepancy, low=0.0)
  net = L * L * D / m
  out = _bound(
    lr=lr,
    L=L,
    sigma2=sigma2,
    m=m,
    v=v,
    K=K,
    f_gap=f_gap,
    network_coeff=0.0,
    cond_a=1.0,
    cond_b=0.0,
    strict=strict,
    label="Lemma 2 (eta_eff L <= 1)",
  )
  return out._replace(network=net, total=out.total + net, floor=out.floor + net)


def noniid_coefficient(lr: float, L: float, tau: int, zeta: float) -> float:
  r"""The coefficient C of κ² in Theorem 2 (non-IID data).

  .. math::

     C = \frac{6\eta^2 L^2 \tau^2}{1 - \zeta}
         \Big(\frac{2\zeta^2}{1 + \zeta} + \frac{2\zeta}{1 - \zeta}
         + \frac{\tau - 1}{\tau}\Big);

  it vanishes for fully synchronous SGD (τ = 1, ζ = 0) and grows as τ².

  >>> round(noniid_coefficient(0.1, 1.0, 2, 0.0), 12)  # 6·0.01·4·(1/2)
  0.12
  """
  lr = _real("lr", lr, low=0.0, low_open=True)
  L = _real("L", L, low=0.0, low_open=True)
  tau = check_int("tau", tau, 1)
  z = _zeta(zeta)
  inner = 2 * z * z / (1 + z) + 2 * z / (1 - z) + (tau - 1) / tau
  return 6.0 * lr * lr * L * L * tau * tau / (1.0 - z) * inner


def noniid_error_bound(
  lr: float,
  L: float,
  sigma2: float,
  kappa2: float,
  m: int,
  v: int,
  tau: int,
  zeta: float,
  K: int | float,
  f_gap: float,
  *,
  strict: bool = False,
) -> ErrorBound:
  r"""Theorem 2's bound for non-IID data, ``(1/m) Σ_i ‖∇F_i − ∇F‖² ≤ κ²``.

  .. math::

     2 \times \text{(eq. 17)} + C \kappa^2,
     \qquad \text{valid if } \eta_{\text{eff}} L \le 1 \text{ and } C \le \tfrac12,

  with C from :func:`noniid_coefficient`. The fields: ``optimization`` and
  ``sync_noise`` are twice eq. 17's, ``network`` is ``2 × (eq. 17's network term) + Cκ²``,
  i.e. all that a run exceeds fully synchronous SGD by (for which C = 0);
  ``condition_value`` is ``max(η_eff L, 2C)`` (≤ 1 needed) and ``max_lr`` the largest lr
  meeting both conditions. Other arguments as in :func:`error_bound`.

  >>> b = noniid_error_bound(0.1, 1.0, 1.0, 2.0, 4, 0, 2, 0.0, math.inf, 1.0)
  >>> round(b.network, 12)  # 2·0.01·(2 − 1) + 0.12·2
  0.26
  """
  lr, L, sigma2, m, v, K, f_gap = _common(lr, L, sigma2, m, v, K, f_gap)
  kappa2 = _real("kappa2", kappa2, low=0.0)
  tau = check_int("tau", tau, 1)
  iid = error_bound(lr, L, sigma2, m, v, tau, zeta, K, f_gap)
  C = noniid_coefficient(lr, L, tau, zeta)
  cond = max(iid.lr_eff * L, 2.0 * C)
  # C is quadratic in lr: C(lr) = c·lr², so 2C ≤ 1 ⇔ lr ≤ 1/√(2c).
  c = C / (lr * lr)
  lr_max = min((m + v) / m / L, 1.0 / math.sqrt(2.0 * c) if c > 0 else math.inf)
  holds = bool(cond <= 1.0 + 1e-12)
  if strict and not holds:
    raise ValueError(
      f"Theorem 2's conditions fail: max(eta_eff L, 2C) = {cond:.6g} > 1 at lr={lr:.6g}; the "
      f"largest admissible lr is {lr_max:.6g}. Lower lr or tau, or pass strict=False."
    )
  opt, sync = 2.0 * iid.optimization, 2.0 * iid.sync_noise
  net = 2.0 * iid.network + C * kappa2
  return ErrorBound(
    optimization=opt,
    sync_noise=sync,
    network=net,
    total=opt + sync + net,
    floor=sync + net,
    lr_eff=iid.lr_eff,
    condition_value=cond,
    condition_holds=holds,
    max_lr=lr_max,
  )


# ---------------------------------------------------------------------------
# Elastic averaging.


def easgd_zeta(m: int, alpha: float) -> float:
  r"""ζ of the EASGD matrix W_α (eq. 22), closed form.

  .. math::

     \zeta(W_\alpha) = \max\{|1 - \alpha|, |1 - (m+1)\alpha|\},
     \qquad 0 < \alpha < \frac{2}{m+1} .

  Raises ValueError for α outside ``(0, 2/(m+1))``.

  Examples:
    >>> easgd_zeta(4, 0.25)  # max{3/4, |1 - 5/4|}
    0.75
    >>> round(easgd_zeta(4, 1 / 3), 4)  # the two branches cross: m/(m+2)
    0.6667
  """
  m = check_int("m", m, 1)
  a = _alpha(alpha, m)
  return max(abs(1.0 - a), abs(1.0 - (m + 1) * a))


def easgd_best_alpha(m: int) -> float:
  r"""EASGD's α = 2/(m+2) minimising ζ(W_α) (Lemma 1), where ζ = m/(m+2).

  This is the paper's analytic minimiser of ζ(W_α) (the two branches of eq. 22 cross
  there), i.e. of the bound's network factor; :func:`best_alpha_numerical` minimises the
  bound numerically instead. It is not a measured optimum: on the noisy quadratic and
  least-squares problems of ``experiments/theory_check.py`` the measured error floor is
  lowest at much smaller α (``experiments/results/theory/easgd_alpha.csv``).

  .. math::

     \alpha^\star = \frac{2}{m + 2}, \qquad \zeta(W_{\alpha^\star}) = \frac{m}{m + 2} .

  Examples:
    >>> round(easgd_best_alpha(4), 4), round(easgd_zeta(4, easgd_best_alpha(4)), 4)
    (0.3333, 0.6667)
  """
  m = check_int("m", m, 1)
  return 2.0 / (m + 2)


def elastic_zeta(zeta_W: float, m: int, alpha: float) -> float:
  r"""ζ of the generalised elastic matrix W′ = [[(1−α)W, α1], [α1ᵀ, 1−mα]] (Theorem 4).

  .. math::

     \zeta(W') = \max\{(1 - \alpha)\,\zeta(W),\; |1 - (m+1)\alpha|\} .

  ``zeta_W = 1`` (W = I) gives EASGD's eq. 22 for α ≤ 1 (always the case here).

  Examples:
    A ring of four (ζ = 1/3) with an anchor at α = 0.2: ``max{0.8/3, 0}``, the
    same as the eigenvalues of :func:`coopjax.topology.elastic` give:

    >>> round(elastic_zeta(1 / 3, 4, 0.2), 4)
    0.2667
    >>> round(zeta(topology.elastic(topology.ring(4), 0.2)), 4)
    0.2667
  """
  zw = _real("zeta_W", zeta_W, low=0.0)
  if zw > 1.0:
    raise ValueError(f"zeta_W must be in [0, 1], got {zw}.")
  m = check_int("m", m, 1)
  a = _alpha(alpha, m)
  return max((1.0 - a) * zw, abs(1.0 - (m + 1) * a))


def elastic_best_alpha(zeta_W: float, m: int) -> float:
  r"""Closed-form best α of W′ (Theorem 4): ``α* = (1 + ζ)/(m + 1 + ζ)``, ζ(W′) = mζ/(m+1+ζ).

  At α* the two branches of :func:`elastic_zeta` are equal. ``zeta_W = 1`` recovers
  Lemma 1's ``2/(m+2)``.

  .. math::

     \alpha^\star = \frac{1 + \zeta}{m + 1 + \zeta}, \qquad
     \zeta(W') = \frac{m\,\zeta}{m + 1 + \zeta} .

  Examples:
    >>> round(elastic_best_alpha(1 / 3, 4), 4)  # (4/3) / (16/3)
    0.25
    >>> round(elastic_best_alpha(1.0, 4), 4)  # EASGD: 2/(m+2)
    0.3333
  """
  zw = _real("zeta_W", zeta_W, low=0.0)
  if zw > 1.0:
    raise ValueError(f"zeta_W must be in [0, 1], got {zw}.")
  m = check_int("m", m, 1)
  return (1.0 + zw) / (m + 1.0 + zw)


def best_alpha_numerical(
  m: int,
  tau: int = 1,
  *,
  W: np.ndarray | None = None,
  lr: float = 0.01,
  L: float = 1.0,
  sigma2: float = 1.0,
  grid: int = 401,
) -> tuple[float, float]:
  r"""Numerical minimiser over α of the error floor of A(τ, W′, 1) (eq. 17 as K → ∞).

  Unlike :func:`easgd_best_alpha` / :func:`elastic_best_alpha` (closed forms of Lemma 1 and
  Theorem 4), this builds the matrix with :func:`coopjax.topology.elastic` (``W = None``
  means EASGD's ``W = I``), computes ζ from its eigenvalues and minimises

  .. math::

     \frac{\eta_{\text{eff}} L \sigma^2}{m} + \eta_{\text{eff}}^2 L^2 \sigma^2
     \Big(\frac{1 + \zeta(\alpha)^2}{1 - \zeta(\alpha)^2}\tau - 1\Big)\Big(1 + \frac1m\Big)^2

  over ``α ∈ (0, 2/(m+1))``: first on a grid of ``grid`` points, then with
  :func:`scipy.optimize.minimize_scalar` (bounded) around the best grid point. Since the
  floor is increasing in ζ, the result agrees with the closed form; it is a check that
  needs no algebra and works for other objectives built on ζ.

  Returns:
    ``(alpha, floor)``: the minimiser and the floor there.

  Examples:
    The numerical minimiser agrees with the closed forms ``2/(m+2)`` (EASGD) and
    ``(1 + ζ)/(m + 1 + ζ)`` (a ring of four, ζ = 1/3):

    >>> alpha, _ = best_alpha_numerical(4)
    >>> round(alpha, 4), round(easgd_best_alpha(4), 4)
    (0.3333, 0.3333)
    >>> alpha, _ = best_alpha_numerical(4, W=topology.ring(4))
    >>> round(alpha, 4), round(elastic_best_alpha(1 / 3, 4), 4)
    (0.25, 0.25)
  """
  m = check_int("m", m, 1)
  tau = check_int("tau", tau, 1)
  grid = check_int("grid", grid, 3)
  Wm = np.eye(m) if W is None else topology.validate(W, size=m, allow_disconnected=True)
  upper = 2.0 / (m + 1)

  def floor(alpha: float) -> float:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      z = topology.zeta(topology.elastic(Wm, float(alpha)))
    if z >= 1.0:
      return math.inf
    return error_bound(lr, L, sigma2, m, 1, tau, z, math.inf, 0.0).floor

  alphas = np.linspace(0.0, upper, grid + 2)[1:-1]
  values = np.array([floor(a) for a in alphas])
  i = int(np.argmin(values))
  lo = alphas[max(i - 1, 0)] if i > 0 else alphas[0] * 1e-3
  hi = alphas[min(i + 1, grid - 1)] if i < grid - 1 else upper * (1 - 1e-9)
  res = optimize.minimize_scalar(floor, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
  if res.fun <= values[i]:
    return float(res.x), float(res.fun)
  return float(alphas[i]), float(values[i])


# ---------------------------------------------------------------------------
# Design rules.


def largest_tau(
  fraction: float,
  zeta: float,
  lr: float,
  L: float,
  m: int,
  v: int = 0,
  *,
  respect_lr_condition: bool = False,
  tau_max: int = 10**9,
) -> int:
  r"""Largest τ whose network error is at most ``fraction`` × synchronous SGD's noise term.

  Compares the last two terms of eq. 17 (σ² cancels; the optimisation term
  ``2[F(u_1) − F_inf]/(η_eff K)`` plays no part):

  .. math::

     \eta_{\text{eff}}^2 L^2 \sigma^2 \Big(\frac{1+\zeta^2}{1-\zeta^2}\tau - 1\Big)
     \Big(1 + \frac vm\Big)^2 \le \text{fraction}\cdot\frac{\eta_{\text{eff}} L \sigma^2}{m}
     \iff
     \tau \le \frac{1 - \zeta^2}{1 + \zeta^2}
     \Big(1 + \frac{\text{fraction}}{\eta_{\text{eff}} L\, m (1 + v/m)^2}\Big) .

  Args:
    fraction: allowed ratio network / sync-noise (> 0).
    zeta: ζ(W) in [0, 1).
    lr: learning rate η.
    L: smoothness constant.
    m: number of workers.
    v: number of auxiliary variables.
    respect_lr_condition: also require eq. 16 to hold at that τ.
    tau_max: cap on the answer (ζ = 0 with a huge fraction allows very large τ).

  Returns:
    The largest integer τ ≥ 1 satisfying the inequality (and eq. 16 when asked), or 0 when
    even τ = 1 does not (possible when ζ > 0: D-PSGD has a network error at τ = 1).

  Examples:
    Full averaging (ζ = 0) with ``η L m = 0.4`` and a network error allowed up to
    the sync-noise term: ``τ ≤ 1 + 1/0.4 = 3.5``:

    >>> largest_tau(1.0, 0.0, 0.1, 1.0, 4)
    3
  """
  f = _real("fraction", fraction, low=0.0, low_open=True)
  z = _zeta(zeta)
  m = check_int("m", m, 1)
  v = check_int("v", v, 0)
  L = _real("L", L, low=0.0, low_open=True)
  x = effective_lr(lr, m, v) * L
  bound = (1.0 - z * z) / (1.0 + z * z) * (1.0 + f / (x * m * (1.0 + v / m) ** 2))
  tau = min(int(math.floor(bound * (1 + 1e-12))), check_int("tau_max", tau_max, 1))

  def ok(t: int) -> bool:  # exact check against the definition, guards float rounding
    net = x * x * network_error_factor(t, z) * (1.0 + v / m) ** 2
    return net <= f * x / m * (1 + 1e-12)

  while tau >= 1 and not ok(tau):
    tau -= 1
  if respect_lr_condition:
    while tau >= 1 and lr_condition(lr, L, m, v, tau, z) > 1.0:
      tau -= 1
  return max(tau, 0)


class CommunicationCost(NamedTuple):
  """Communication of A(τ, W, v), from Table 3 of the paper.

  Attributes:
    scheme: ``"none"``, ``"decentralized"``, ``"allreduce"`` or ``"parameter_server"``
      (``"elastic"`` for a decentralised worker graph plus a parameter-server anchor).
    params_per_mix: parameters sent and received by the busiest node per mixing step.
    params_per_iteration: ``params_per_mix / τ``.
    bytes_per_iteration: ``params_per_iteration × dtype_bytes`` (None without a dtype size).
    handshakes_per_mix: connections the busiest node opens per mixing step.

  Examples:
    All-reduce of ``d = 1000`` float32 parameters every 4 steps: ``2d/τ`` per step.

    >>> c = communication_per_iteration(4, topology.complete(8), 0, 1000, dtype_bytes=4)
    >>> c.scheme, c.params_per_iteration, c.bytes_per_iteration, c.handshakes_per_mix
    ('allreduce', 500.0, 2000.0, 8)
  """

  scheme: str
  params_per_mix: float
  params_per_iteration: float
  bytes_per_iteration: float | None
  handshakes_per_mix: int


def _degrees(W: np.ndarray, atol: float = 1e-12) -> np.ndarray:
  off = np.abs(W) > atol
  np.fill_diagonal(off, False)
  off = off | off.T
  return off.sum(axis=0)


def _max_degree(W: np.ndarray) -> int:
  return int(_degrees(W).max())


def communication_per_iteration(
  tau: int,
  W: np.ndarray,
  v: int,
  d: int,
  *,
  scheme: str = "auto",
  dtype_bytes: int | None = None,
) -> CommunicationCost:
  r"""Communication volume per iteration of A(τ, W, v) (Table 3, divided by τ).

  Per mixing step the busiest node sends and receives (Table 3):

  * decentralised mixing: ``2d·Δ`` parameters, Δ the graph's maximum degree, Δ handshakes;
  * all-reduce (W = J, v = 0): ``2d`` parameters, m handshakes;
  * parameter server: ``2dm`` parameters at the server, m handshakes (one per worker).

  ``scheme="auto"`` picks all-reduce for ``W = J`` with ``v = 0``, the identity costs
  nothing, other ``v = 0`` graphs are decentralised; with ``v > 0`` the auxiliary rows
  act as parameter servers (the elastic anchor exchanges ``d`` with each of its workers
  both ways) and the busiest node is the largest of the servers and the workers'
  decentralised exchanges (``scheme="elastic"``). Mixing happens once every τ steps, so
  the per-iteration cost is the per-mix cost over τ.

  Args:
    tau: communication period.
    W: the (m+v)×(m+v) mixing matrix.
    v: number of auxiliary variables (the last v rows of W).
    d: number of model parameters.
    scheme: ``"auto"``, ``"decentralized"``, ``"allreduce"`` or ``"parameter_server"``.
    dtype_bytes: bytes per parameter (4 for float32) to also report bytes.

  Returns:
    A :class:`CommunicationCost`.

  >>> c = communication_per_iteration(4, topology.ring(8), 0, 1000)
  >>> c.scheme, c.params_per_mix, c.params_per_iteration
  ('decentralized', 4000.0, 1000.0)
  """
  tau = check_int("tau", tau, 1)
  v = check_int("v", v, 0)
  d = check_int("d", d, 1)
  W = np.asarray(W, dtype=np.float64)
  if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] <= v:
    raise ValueError(f"W must be a square (m+v)x(m+v) matrix with m >= 1, got {W.shape}, v={v}.")
  m = W.shape[0] - v
  schemes = ("auto", "decentralized", "allreduce", "parameter_server")
  if scheme not in schemes:
    raise ValueError(f"scheme must be one of {schemes}, got {scheme!r}.")
  if scheme == "auto":
    if v == 0 and np.allclose(W, np.eye(m + v), atol=1e-12):
      scheme = "none"
    elif v == 0 and topology.is_complete(W):
      scheme = "allreduce"
    elif v == 0:
      scheme = "decentralized"
    else:
      scheme = "elastic"
  if scheme == "none":
    per_mix, hs = 0.0, 0
  elif scheme == "allreduce":
    per_mix, hs = 2.0 * d, m
  elif scheme == "parameter_server":
    per_mix, hs = 2.0 * d * m, m
  elif scheme == "decentralized":
    deg = _max_degree(W)
    per_mix, hs = 2.0 * d * deg, deg
  else:  # elastic: servers = auxiliary rows, plus decentralised worker exchanges
    busiest = _max_degree(W)  # the anchor links to its workers, workers to neighbours
    per_mix, hs = 2.0 * d * busiest, busiest
  per_it = per_mix / tau
  return CommunicationCost(
    scheme=scheme,
    params_per_mix=float(per_mix),
    params_per_iteration=float(per_it),
    bytes_per_iteration=None if dtype_bytes is None else float(per_it * dtype_bytes),
    handshakes_per_mix=int(hs),
  )
