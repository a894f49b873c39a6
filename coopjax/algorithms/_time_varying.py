r"""Time-varying mixing: a schedule of matrices, and MATCHA's random matchings.

Cooperative SGD with a mixing matrix that changes from one mix to the next,

.. math::

   X_{k+1} = (X_k - \eta G_k)\, S_k, \qquad
   S_k = \begin{cases} W_{r} & k \bmod \tau = 0,\ r = k/\tau - 1 \\
                       I & \text{otherwise,} \end{cases}

with steps counted from 1, so the r-th mix (r = 0, 1, …) follows step
``(r + 1)τ``. :func:`time_varying` cycles through a fixed schedule (e.g. the
one-peer exponential graph, :func:`coopjax.topology.one_peer_exponential`);
:func:`matcha` draws ``W_k = I − α Σ_j B_j(k) L_j`` at random every step
(Wang et al., 2019).

Both are optax transformations with the same calling convention as
:func:`coopjax.cooperative`; their states are :class:`TimeVaryingState`
``(count, local_state)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
import scipy.optimize

import coopjax.algorithms._compressed as _compressed
from coopjax import mixing
from coopjax import topology
from coopjax._validation import check_int
from coopjax.algorithms._cooperative import CooperativeState
from coopjax.algorithms._cooperative import scheduled_mixing
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._skeleton import check_tau
from coopjax.cost import pattern
from coopjax.workers import Layout

PyTree = Any

__all__ = [
  "TimeVaryingState",
  "time_varying",
  "MatchaDesign",
  "matcha_design",
  "matcha_flags",
  "matcha",
]


TimeVaryingState = CooperativeState
"""State of :func:`time_varying`: ``(count, local_state)``, as :class:`CooperativeState`."""


def _schedule_matrices(schedule, period) -> list:
  if callable(schedule):
    if period is None:
      raise ValueError(
        "a schedule given as a function of the mix index r needs period=P: it is evaluated "
        "for r in range(P) at construction and cycled."
      )
    period = check_int("period", period, 1)
    return [schedule(r) for r in range(period)]
  if period is not None:
    raise ValueError(
      "period is only used with a schedule given as a function; a sequence of matrices "
      "is cycled with period len(schedule)."
    )
  if isinstance(schedule, np.ndarray | jax.Array) and np.ndim(schedule) == 2:
    raise TypeError(
      "schedule must be a sequence of matrices (or a function of r); for one fixed matrix "
      "use coopjax.cooperative."
    )
  try:
    mats = list(schedule)
  except TypeError as e:
    raise TypeError(
      f"schedule must be a sequence of matrices or a function r -> matrix, got "
      f"{type(schedule).__name__}."
    ) from e
  if not mats:
    raise ValueError("schedule is empty; give at least one mixing matrix.")
  return mats


@_compressed.uncompressed
def time_varying(
  local: optax.GradientTransformation,
  *,
  tau: int,
  schedule: Sequence[Any] | Callable[[int], Any],
  num_aux: int = 0,
  period: int | None = None,
  mixers: Sequence[mixing.Mixer] | None = None,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  symmetric: bool = False,
  allow_negative: bool = False,
  warmup_steps: int = 0,
) -> CooperativeTransformation:
  r"""Cooperative SGD with a cycled schedule of mixing matrices.

  .. math::

     X_{k+1} = (X_k + U_k)\, S_k, \qquad
     S_k = W_{(k/\tau - 1) \bmod P} \text{ if } k \bmod \tau = 0, \text{ else } I,

  with ``U_k`` the local optimizer's updates (``−ηG_k`` for SGD), steps k
  counted from 1 and ``P`` the schedule's period: the r-th mix (r = 0, 1, …,
  after step ``(r + 1)τ``) uses ``W_{r mod P}``. ``order="mix_then_step"``
  gives ``X_{k+1} = X_k S_k + U_k``.

  The P matrices are fixed at construction and the mix selects one with
  ``lax.switch`` on ``r mod P`` inside a ``lax.cond`` taken on mixing steps
  only, so one trace serves every step. The schedule is either a sequence of
  matrices (cycled) or a function ``r -> W_r`` evaluated for
  ``r in range(period)`` at construction.

  Each matrix is validated with :func:`coopjax.topology.validate`
  (column-stochastic; ``symmetric=False`` by default since e.g. the one-peer
  exponential graph is directed; a single matrix may be disconnected), and the
  product of one period must reach consensus (ζ < 1).

  Args:
    local: optax optimizer applied to each worker separately (vmapped).
    tau: communication period τ ≥ 1.
    schedule: sequence of ``(m + v) × (m + v)`` matrices, or a function of the
      mix index r returning one (then ``period`` is required). ``W[j, i]`` is
      node j's weight in node i's new model.
    num_aux: v, the number of auxiliary variables (last rows).
    period: the number of matrices P when ``schedule`` is a function.
    mixers: optional mixers ``X -> X``, one per matrix, replacing the dense
      einsum (e.g. collective-permutes on a sharded worker axis); they must
      apply the same matrices.
    order: ``"step_then_mix"`` (default) or ``"mix_then_step"``.
    local_state_policy: ``"keep"``, ``"mix"`` or ``"reset"``, as in
      :func:`coopjax.cooperative`.
    mix_mask: optional pytree prefix of X of booleans selecting mixed leaves.
    symmetric: require each matrix symmetric.
    allow_negative: accept negative weights.

  Returns:
    An optax ``GradientTransformationExtraArgs`` with state
    :class:`TimeVaryingState`.

  Examples:
    One-peer exponential graph on 4 workers, mixing every step:

    >>> import jax.numpy as jnp, optax, coopjax
    >>> from coopjax import topology
    >>> m = 4
    >>> tx = coopjax.time_varying(optax.sgd(0.1), tau=1,
    ...                           schedule=lambda r: topology.one_peer_exponential(m, r),
    ...                           period=topology.one_peer_exponential_period(m))
    >>> X = {"w": jnp.arange(4.0)[:, None]}
    >>> state = tx.init(X)
    >>> zero = {"w": jnp.zeros((4, 1))}
    >>> for _ in range(2):
    ...   updates, state = tx.update(zero, state, X)
    ...   X = optax.apply_updates(X, updates)
    >>> X["w"].ravel().tolist()   # two consecutive matrices multiply to J for m = 4
    [1.5, 1.5, 1.5, 1.5]

  References:
    Wang & Joshi, Cooperative SGD, JMLR 22(213), 2021, eq. 10 (with W_k varying);
    Ying et al., "Exponential graph is provably efficient for decentralized deep
    training", NeurIPS 2021.
  """
  tau = check_tau(tau)
  v = check_int("num_aux", num_aux, 0)
  mats = _schedule_matrices(schedule, period)
  Ws = []
  for r, W in enumerate(mats):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Ws.append(
          topology.validate(
            W, symmetric=symmetric, allow_negative=allow_negative, allow_disconnected=True
          )
        )
    except ValueError as e:
      raise ValueError(f"schedule matrix r={r}: {e}") from e
  n = Ws[0].shape[0]
  if any(W.shape != (n, n) for W in Ws):
    raise ValueError(
      f"schedule matrices differ in shape: {[W.shape for W in Ws]}; all must be {n}x{n}."
    )
  m = n - v
  if m < 1:
    raise ValueError(f"the matrices are {n}x{n} but num_aux={v}: no rows are left for workers.")
  product = np.linalg.multi_dot([*Ws, np.eye(n)]) if len(Ws) > 1 else Ws[0]
  if n > 1 and topology.zeta(product) >= 1.0 - 1e-9:
    raise ValueError(
      "the product of one period of the schedule has zeta >= 1: the workers never reach "
      "consensus; make the union of the schedule's graphs connected."
    )
  P = len(Ws)
  mixes = [mixing.Mix(W, m, mask=mixing.check_mask(mix_mask)) for W in Ws]
  if mixers is None:
    mixers = mixes
  else:
    mixers = list(mixers)
    if len(mixers) != P or not all(callable(f) for f in mixers):
      raise ValueError(f"mixers must be {P} callables X -> X, one per matrix of the schedule.")

  def schedule(k):
    index = (k // tau - 1) % P

    def mix(X):
      if P == 1:
        return mixers[0](X)
      # Fresh closures: JAX caches a branch's trace by its callable, and a mix traces
      # differently under a shard or live context.
      return jax.lax.switch(index, [lambda X, f=f: f(X) for f in mixers], X)

    return k % tau == 0, mix

  costs = [mix.cost for mix in mixes]

  def comm(k, _state=None):
    return costs[(k // tau - 1) % P] if k % tau == 0 else pattern.NO_COMM

  return scheduled_mixing(
    "time_varying",
    local,
    Layout(m, v),
    schedule,
    comm,
    costs[0],
    state_cls=TimeVaryingState,
    period=tau,
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
    graph=sum(np.abs(W[:m, :m]) for W in Ws),
  )


# ----------------------------------------------------------------------------------------------
# MATCHA


class MatchaDesign(NamedTuple):
  """MATCHA's construction-time design (all NumPy, float64).

  Attributes:
    matchings: the base graph's matchings, lists of edges ``(i, j)``.
    laplacians: ``[M, m, m]``, the matchings' Laplacians ``L_j``.
    probabilities: ``[M]``, activation probabilities ``p_j``.
    alpha: the mixing weight α.
    lambda2: ``λ₂(Σ_j p_j L_j)``, the algebraic connectivity of the expected graph.
    rho: ``‖E[W_kᵀ W_k] − J‖₂`` at α, the expected contraction factor.
  """

  matchings: list
  laplacians: np.ndarray
  probabilities: np.ndarray
  alpha: float
  lambda2: float
  rho: float


def _complement_basis(m: int) -> np.ndarray:
  """An orthonormal basis Q (m × (m−1)) of the subspace orthogonal to the ones vector."""
  return scipy.linalg.null_space(np.ones((1, m)))


def _lambda2(L: np.ndarray, Q: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
  """λ₂ of a Laplacian as ``min eig(QᵀLQ)``, with eigenvalues and vectors in 1⊥."""
  lam, U = scipy.linalg.eigh(Q.T @ L @ Q)
  return float(lam[0]), lam, Q @ U


def _probabilities(Ls: np.ndarray, budget: float, tol: float = 1e-6, max_iter: int = 500):
  r"""Maximise ``λ₂(Σ p_j L_j)`` s.t. ``Σ p_j ≤ C_b M``, ``0 ≤ p_j ≤ 1`` (Kelley's cutting planes).

  λ₂ restricted to 1⊥ is ``min_{‖u‖=1, u⊥1} Σ_j p_j uᵀL_j u``, a minimum of
  linear functions of p, hence concave. Each iteration solves the linear
  program ``max t s.t. t ≤ Σ_j p_j u_sᵀ L_j u_s`` over the cuts ``u_s`` found
  so far (an upper bound on the optimum) with HiGHS (``scipy.optimize.linprog``),
  evaluates λ₂ at its p (a lower bound) and adds the eigenvectors of λ₂ as new
  cuts, until the bounds agree within ``tol``.
  """
  M, m, _ = Ls.shape
  if budget >= 1.0:
    return np.ones(M)
  Q = _complement_basis(m)
  best_p = np.full(M, budget)
  best, lam, U = _lambda2(np.tensordot(best_p, Ls, 1), Q)
  cuts = []

  def add_cuts(lam, U):
    for s in np.nonzero(lam <= lam[0] + 1e-9 * max(1.0, abs(lam[0])))[0]:
      u = U[:, s]
      cuts.append([u @ L @ u for L in Ls])

  add_cuts(lam, U)
  for e in np.eye(M):  # corners bound t from the start
    _, lam_e, U_e = _lambda2(np.tensordot(e, Ls, 1), Q)
    add_cuts(lam_e, U_e)
  c = np.zeros(M + 1)
  c[-1] = -1.0
  bounds = [(0.0, 1.0)] * M + [(None, None)]
  for _ in range(max_iter):
    A = np.array(cuts)
    A_ub = np.vstack([np.hstack([-A, np.ones((len(A), 1))]), np.r_[np.ones(M), 0.0][None]])
    b_ub = np.r_[np.zeros(len(A)), budget * M]
    res = scipy.optimize.linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if res.status != 0:
      raise RuntimeError(f"MATCHA's probability LP failed: {res.message}")
    p, upper = np.clip(res.x[:M], 0.0, 1.0), res.x[-1]
    value, lam, U = _lambda2(np.tensordot(p, Ls, 1), Q)
    if value > best:
      best, best_p = value, p
    if upper - best <= tol * max(1.0, abs(upper)):
      break
    add_cuts(lam, U)
  return best_p


def _expected_gram(Ls: np.ndarray, p: np.ndarray, alpha: float) -> np.ndarray:
  r"""``E[W_kᵀW_k]`` for ``W_k = I − α Σ_j B_j L_j`` with independent ``B_j ~ Bernoulli(p_j)``.

  .. math::

     E[W^\top W] = I - 2\alpha \bar L + \alpha^2\bigl(\bar L^2 + 2 \textstyle\sum_j p_j(1-p_j) L_j\bigr),
     \qquad \bar L = \sum_j p_j L_j,

  using ``L_j² = 2 L_j`` for a matching.
  """
  m = Ls.shape[1]
  Lbar = np.tensordot(p, Ls, 1)
  Lvar = np.tensordot(p * (1.0 - p), Ls, 1)
  return np.eye(m) - 2 * alpha * Lbar + alpha**2 * (Lbar @ Lbar + 2 * Lvar)


def _rho(Ls, p, alpha) -> float:
  m = Ls.shape[1]
  return float(np.linalg.norm(_expected_gram(Ls, p, alpha) - np.full((m, m), 1.0 / m), 2))


def _alpha(Ls: np.ndarray, p: np.ndarray) -> float:
  r"""α minimising ``‖E[W_kᵀW_k] − J‖₂``, a convex function of α.

  On 1⊥ the matrix is ``E[W_kᵀW_k]`` itself (PSD, a matrix-convex quadratic in
  α), so its largest eigenvalue is convex; it is ≥ 1 = its value at 0 once
  ``α ≥ 2/λ_max(L̄)``, so the minimiser lies in ``[0, 2/λ_max(L̄)]``.
  """
  lam_max = float(np.linalg.eigvalsh(np.tensordot(p, Ls, 1))[-1])
  res = scipy.optimize.minimize_scalar(
    lambda a: _rho(Ls, p, a),
    bounds=(0.0, 2.0 / lam_max),
    method="bounded",
    options={"xatol": 1e-12},
  )
  return float(res.x)


def matcha_design(graph, budget: float) -> MatchaDesign:
  r"""MATCHA's matchings, activation probabilities and mixing weight (Wang et al., 2019).

  1. Split the base graph into matchings ``M_1..M_M`` by edge colouring
     (:func:`coopjax.topology.matching_decomposition`: Δ matchings, the
     minimum, for bipartite graphs and whenever its search finds a
     Δ-colouring; otherwise Δ + 1) with Laplacians ``L_j``.
  2. Choose activation probabilities

     .. math::

        p = \arg\max_p \lambda_2\Bigl(\sum_j p_j L_j\Bigr)
        \quad\text{s.t.}\quad \sum_j p_j \le C_b M,\ 0 \le p_j \le 1

     (concave; solved by Kelley's cutting planes with scipy's HiGHS LP solver
     to a relative gap of 1e-6; ``C_b ≥ 1`` gives ``p = 1``).
  3. Choose one α for all matchings minimising
     ``ρ = ‖E[W_kᵀW_k] − J‖₂`` for ``W_k = I − α Σ_j B_j L_j`` (bounded Brent
     search; with all ``p_j = 1`` this is ``2/(λ₂ + λ_max)`` of the base
     Laplacian).

  Args:
    graph: square matrix whose off-diagonal non-zeros are the undirected edges
      of the base graph (an adjacency matrix or a mixing matrix W).
    budget: communication budget ``C_b ∈ (0, 1]``, the expected fraction of
      matchings active per step.

  Returns:
    A :class:`MatchaDesign`.

  References:
    J. Wang, A. K. Sahu, Z. Yang, G. Joshi, S. Kar, "MATCHA: Speeding up
    decentralized SGD via matching decomposition sampling", 2019 (arXiv 1905.09435).
  """
  budget = float(budget)
  if not (0.0 < budget <= 1.0) or not np.isfinite(budget):
    raise ValueError(
      f"budget C_b must be in (0, 1] (the expected fraction of matchings active), got {budget}."
    )
  matchings = topology.matching_decomposition(graph)
  m = np.asarray(graph).shape[0]
  if not matchings:
    raise ValueError("the base graph has no edges; MATCHA needs a connected graph.")
  Ls = np.stack([topology.matching_laplacian(M, m) for M in matchings])
  Q = _complement_basis(m)
  if _lambda2(Ls.sum(0), Q)[0] <= 1e-9:
    raise ValueError("the base graph is not connected; connect it so the workers can agree.")
  p = _probabilities(Ls, budget)
  alpha = _alpha(Ls, p)
  return MatchaDesign(
    matchings=matchings,
    laplacians=Ls,
    probabilities=p,
    alpha=alpha,
    lambda2=_lambda2(np.tensordot(p, Ls, 1), Q)[0],
    rho=_rho(Ls, p, alpha),
  )


def matcha_flags(key: jax.Array, k, probabilities) -> jax.Array:
  r"""The matchings active at step k: ``B_j(k) ~ Bernoulli(p_j)`` from ``fold_in(key, k)``.

  Every worker draws the same flags from the same key, so no communication
  is needed to agree on them.
  """
  p = jnp.asarray(probabilities, jnp.float32)
  return jax.random.bernoulli(jax.random.fold_in(key, k), p)


@_compressed.uncompressed
def matcha(
  local: optax.GradientTransformation,
  *,
  graph,
  budget: float,
  num_workers: int,
  key: jax.Array,
  alpha: float | None = None,
  probabilities: Sequence[float] | None = None,
  order: str = "step_then_mix",
  local_state_policy: str = "keep",
  mix_mask: PyTree | None = None,
  warmup_steps: int = 0,
) -> CooperativeTransformation:
  r"""MATCHA: decentralized SGD over randomly activated matchings (Wang et al., 2019).

  After every local step,

  .. math::

     X_{k+1} = W_k (X_k + U_k), \qquad
     W_k = I - \alpha \sum_j B_j(k) L_j, \qquad B_j(k) \sim \text{Bernoulli}(p_j),

  i.e. ``x_i ← x_i − α Σ_{j active, (i,l) ∈ M_j} (x_i − x_l)``, with the
  matchings, ``p`` and α from :func:`matcha_design` (or given). The flags are
  drawn from ``jax.random.fold_in(key, k)`` (:func:`matcha_flags`), identical on
  every worker. Each matching's term ``α (X − P_j X)`` (``P_j`` swapping the
  matched pairs, :func:`coopjax.mixing.permute`) sits in its own ``lax.cond``
  on ``B_j(k)``: an inactive matching costs no communication, and a step with
  no active matching does not mix. With ``budget = 1`` every matching is
  always active and this is D-PSGD with ``W = I − αL``,
  ``α = 2/(λ₂ + λ_max)`` of the base Laplacian L.

  Args:
    local: optax optimizer applied to each worker separately (vmapped).
    graph: base graph, a square matrix whose off-diagonal non-zeros are its
      undirected edges (adjacency or mixing matrix), ``m × m``.
    budget: communication budget ``C_b ∈ (0, 1]``.
    num_workers: m (checked against ``graph``).
    key: a JAX PRNG key for the activation flags.
    alpha: override the designed α.
    probabilities: override the designed ``p`` (one per matching, in
      :func:`coopjax.topology.matching_decomposition` order).
    order: ``"step_then_mix"`` (default, as MATCHA's code) or ``"mix_then_step"``.
    local_state_policy: ``"keep"``, ``"mix"`` or ``"reset"``.
    mix_mask: optional pytree prefix of X of booleans selecting mixed leaves.

  Returns:
    An optax ``GradientTransformationExtraArgs`` with state
    :class:`TimeVaryingState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, coopjax
    >>> from coopjax import topology
    >>> tx = coopjax.matcha(optax.sgd(0.1), graph=topology.ring(4), budget=1.0,
    ...                     num_workers=4, key=jax.random.key(0))  # budget 1: every matching always active
    >>> X = {"w": jnp.array([0.0, 0.0, 0.0, 4.0])}
    >>> updates, state = tx.update({"w": jnp.zeros(4)}, tx.init(X), X)
    >>> [round(x, 4) for x in optax.apply_updates(X, updates)["w"].tolist()]  # (I − L/3) x
    [1.3333, 0.0, 1.3333, 1.3333]

  References:
    J. Wang, A. K. Sahu, Z. Yang, G. Joshi, S. Kar, "MATCHA: Speeding up
    decentralized SGD via matching decomposition sampling", 2019 (arXiv 1905.09435).
  """
  m = check_int("num_workers", num_workers, 1)
  if np.shape(graph) != (m, m):
    raise ValueError(f"graph must be {m}x{m} for num_workers={m}, got shape {np.shape(graph)}.")
  design = matcha_design(graph, budget)
  p = design.probabilities
  if probabilities is not None:
    p = np.asarray(probabilities, np.float64)
    if p.shape != design.probabilities.shape or np.any((p < 0) | (p > 1)):
      raise ValueError(
        f"probabilities must be {len(design.matchings)} values in [0, 1] (one per matching), "
        f"got {probabilities!r}."
      )
  if alpha is not None:
    a = float(alpha)
  elif probabilities is not None:
    a = _alpha(design.laplacians, p)
  else:
    a = design.alpha
  perms = [topology.matching_permutation(M, m) for M in design.matchings]
  if not isinstance(key, jax.Array):
    raise TypeError(
      f"key must be a JAX PRNG key (e.g. jax.random.key(0)), got {type(key).__name__}."
    )

  swaps = [mixing.Mix.permutation(perm).restrict(mixing.check_mask(mix_mask)) for perm in perms]

  def schedule(k):
    flags = matcha_flags(key, k, p)

    def mix(X):
      out = X
      for j, swap in enumerate(swaps):

        def term(acc, swap=swap):
          diff = jax.tree.map(jnp.subtract, X, swap(X))
          return jax.tree.map(lambda o, d: o - jnp.asarray(a, d.dtype) * d, acc, diff)

        out = jax.lax.cond(flags[j], term, lambda acc: acc, out)
      return out

    return jnp.any(flags), mix  # no active matching: no mix

  def comm(k, _state=None):
    # Each active matching is one exchange with one peer (Wang et al., 2019).
    active = int(np.sum(np.asarray(matcha_flags(key, k, p))))
    return (
      pattern.MixCost("neighbor_exchange", float(active), active) if active else pattern.NO_COMM
    )

  return scheduled_mixing(
    "matcha",
    local,
    Layout(m, 0),
    schedule,
    comm,
    pattern.MixCost("neighbor_exchange", float(len(swaps)), len(swaps)),
    state_cls=TimeVaryingState,
    order=order,
    local_state_policy=local_state_policy,
    mix_mask=mix_mask,
    warmup_steps=warmup_steps,
    graph=graph,
  )
