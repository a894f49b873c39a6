"""Time-varying mixing, the one-peer exponential graph and MATCHA against NumPy references."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology

tv = importlib.import_module("coopjax.algorithms._time_varying")

LR, BETA = 0.05, 0.9


def momentum_reference(matrix_at, A, b, n, m, lr=LR, beta=BETA, order="step_then_mix"):
  """Heavy-ball SGD per worker (buf ← βbuf + g, x ← x − η buf) and X ← S_kᵀ X, S_k = matrix_at(k)."""
  X = np.tile(ref.x_init(), (n, 1))
  buf = np.zeros_like(X)
  for k in range(1, A.shape[0] + 1):
    G = np.zeros_like(X)
    for i in range(m):
      G[i] = ref.np_grad(X[i], A[k - 1, i], b[k - 1, i])
    buf[:m] = beta * buf[:m] + G[:m]
    S = matrix_at(k)
    S = np.eye(n) if S is None else S
    X = S.T @ (X - lr * buf) if order == "step_then_mix" else S.T @ X - lr * buf
  return X


# ---------------------------------------------------------------------------------------------
# one-peer exponential graph


@pytest.mark.parametrize("m", [3, 4, 5, 8])
def test_one_peer_exponential_is_the_rule_written_out(m):
  period = int(np.ceil(np.log2(m)))
  assert topology.one_peer_exponential_period(m) == period
  for r in range(2 * period + 1):
    s = 2 ** (r % period)
    W = np.zeros((m, m))
    for i in range(m):  # x_i ← ½(x_i + x_{(i−s) mod m}); W[j, i] = weight of j in i
      W[i, i] += 0.5
      W[(i - s) % m, i] += 0.5
    got = topology.one_peer_exponential(m, r)
    np.testing.assert_array_equal(got, W)
    topology.validate(got, symmetric=False, allow_disconnected=True)
  # Worker i receives from i − 1 at the first mix (not from i + 1).
  X = np.arange(m, dtype=np.float64)
  np.testing.assert_array_equal(topology.one_peer_exponential(m, 0).T @ X, (X + np.roll(X, 1)) / 2)


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_one_peer_exponential_consecutive_products_are_exactly_J(m):
  t = int(np.log2(m))
  J = np.full((m, m), 1.0 / m)
  for start in range(2 * t + 1):
    P = np.eye(m)
    for r in range(start, start + t):
      P = P @ topology.one_peer_exponential(m, r)
    np.testing.assert_array_equal(P, J)
    if t > 1:  # one matrix fewer is not yet consensus
      short = np.eye(m)
      for r in range(start, start + t - 1):
        short = short @ topology.one_peer_exponential(m, r)
      assert np.abs(short - J).max() >= 1.0 / m  # some pairs have not met yet


@pytest.mark.parametrize("order", ["step_then_mix", "mix_then_step"])
def test_time_varying_one_peer_matches_numpy_with_momentum(order):
  m, tau = 8, 2
  P = topology.one_peer_exponential_period(m)
  steps = 3 * P * tau + 1  # three passes over the schedule
  A, b = ref.make_batches(steps, m, seed=31)
  schedule = [topology.one_peer_exponential(m, r) for r in range(P)]
  tx = coopjax.time_varying(optax.sgd(LR, momentum=BETA), tau=tau, schedule=schedule, order=order)
  X, state = ref.run(tx, A, b, m)

  def matrix_at(k):  # r-th mix after step (r + 1)τ; the first mix uses s = 1
    return topology.one_peer_exponential(m, k // tau - 1) if k % tau == 0 else None

  expect = momentum_reference(matrix_at, A, b, m, m, order=order)
  np.testing.assert_allclose(ref.flat(X), expect, rtol=1e-4, atol=1e-5)
  assert int(coopjax.step_count(state)) == steps


def test_time_varying_function_schedule_with_auxiliary_and_lr_schedule():
  """A schedule given as a function of r; one auxiliary row; an lr schedule in the local optimizer."""
  m, v, tau, P = 4, 1, 3, 2
  n = m + v
  steps = 3 * P * tau
  mats = [topology.easgd(m, 0.1), topology.elastic(topology.ring(m), 0.15)]
  lrs = optax.exponential_decay(0.08, transition_steps=4, decay_rate=0.5)
  tx = coopjax.time_varying(
    optax.sgd(lrs), tau=tau, schedule=lambda r: mats[r], num_aux=v, period=P, allow_negative=True
  )
  A, b = ref.make_batches(steps, m, seed=32)
  X, _ = ref.run(tx, A, b, m, v)

  Xr = np.tile(ref.x_init(), (n, 1))
  for k in range(1, steps + 1):
    G = np.zeros_like(Xr)
    for i in range(m):
      G[i] = ref.np_grad(Xr[i], A[k - 1, i], b[k - 1, i])
    eta = 0.08 * 0.5 ** ((k - 1) / 4)  # optax sees k − 1 updates before step k
    Xr = Xr - eta * G
    if k % tau == 0:
      Xr = mats[(k // tau - 1) % P].T @ Xr
  np.testing.assert_allclose(ref.flat(X), Xr, rtol=1e-4, atol=1e-5)


def test_time_varying_single_trace_and_state_layout():
  m, tau = 4, 1
  tx = coopjax.time_varying(
    optax.sgd(LR, momentum=BETA),
    tau=tau,
    schedule=[topology.one_peer_exponential(m, r) for r in range(2)],
  )
  X = coopjax.replicate(ref.init_params(), m)
  state = tx.init(X)
  assert isinstance(state, coopjax.TimeVaryingState)
  assert state._fields == ("count", "local_state")
  A, b = ref.make_batches(5, m, seed=1)
  X, _ = ref.run_from(tx, X, A, b, single_trace=True)
  chex.assert_shape(X["w"], (m, ref.D))
  chex.assert_tree_all_finite(X)


def test_time_varying_rejects_bad_schedules():
  m = 4
  with pytest.raises(ValueError, match="period"):
    coopjax.time_varying(
      optax.sgd(LR), tau=1, schedule=lambda r: topology.one_peer_exponential(m, r)
    )
  with pytest.raises(TypeError, match="sequence of matrices"):
    coopjax.time_varying(optax.sgd(LR), tau=1, schedule=topology.ring(m))
  with pytest.raises(ValueError, match="r=1"):
    coopjax.time_varying(optax.sgd(LR), tau=1, schedule=[topology.ring(m), np.ones((m, m))])
  with pytest.raises(ValueError, match="zeta"):  # s = 2 alone pairs 0-2 and 1-3: never consensus
    coopjax.time_varying(optax.sgd(LR), tau=1, schedule=[topology.one_peer_exponential(m, 1)])


# ---------------------------------------------------------------------------------------------
# matching decomposition and MATCHA


def edges_of(graph):
  n = graph.shape[0]
  return sorted((i, j) for i in range(n) for j in range(i + 1, n) if graph[i, j] != 0)


@pytest.mark.parametrize("seed", range(6))
def test_matching_decomposition_is_a_proper_edge_colouring(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(4, 16))
  adj = np.triu(rng.uniform(size=(n, n)) < rng.uniform(0.2, 0.8), 1)
  adj = adj | adj.T
  matchings = topology.matching_decomposition(adj)
  assert sorted(e for M in matchings for e in M) == edges_of(adj)
  for M in matchings:
    nodes = [x for e in M for x in e]
    assert len(nodes) == len(set(nodes)), M
  assert len(matchings) <= adj.sum(1).max() + 1  # Vizing / Misra–Gries bound


# The base graphs of MATCHA's authors (JYWa/MATCHA, util.select_graph), as the lists of
# matchings they ship: graph 0 is the 8-node graph of the paper's Fig. 1(a), graph 5 the 8-ring.
AUTHORS_GRAPHS = {
  0: [[(1, 5), (6, 7), (0, 4), (2, 3)], [(1, 7), (3, 6)], [(1, 0), (3, 7), (5, 6)],
      [(1, 2), (7, 0)], [(3, 1)]],
  1: [[(4, 8), (6, 11), (7, 13), (0, 12), (5, 14), (10, 15), (2, 3), (1, 9)],
      [(11, 13), (14, 2), (5, 6), (15, 3), (10, 9)], [(11, 8), (2, 5), (13, 4), (14, 3), (0, 10)],
      [(11, 5), (15, 14), (13, 8)], [(2, 11)]],
  4: [[(2, 7), (3, 15), (13, 14), (8, 9), (1, 5), (0, 10), (6, 12), (4, 11)],
      [(12, 11), (5, 6), (14, 1), (9, 10), (15, 2), (8, 13)],
      [(12, 5), (11, 6), (1, 8), (9, 3), (2, 10)], [(12, 14), (11, 9), (5, 15), (0, 6), (1, 7)],
      [(12, 8), (5, 2), (11, 14), (1, 6)], [(12, 15), (13, 11), (10, 5), (3, 14)], [(12, 9)],
      [(0, 12)]],
  5: [[(0, 1), (2, 3), (4, 5), (6, 7)], [(0, 7), (2, 1), (4, 3), (6, 5)]],
}  # fmt: skip


def graph_of(matchings):
  n = 1 + max(max(e) for M in matchings for e in M)
  A = np.zeros((n, n))
  for M in matchings:
    for i, j in M:
      A[i, j] = A[j, i] = 1.0
  return A


def check_matchings(matchings, adj):
  assert sorted(e for M in matchings for e in M) == edges_of(adj)
  for M in matchings:
    nodes = [x for e in M for x in e]
    assert len(nodes) == len(set(nodes)), M


@pytest.mark.parametrize("graph_id", sorted(AUTHORS_GRAPHS))
def test_matching_count_on_the_authors_graphs(graph_id):
  """Never more matchings than the authors use; graph 0 takes 5 and the 8-ring 2 (= Δ)."""
  theirs = AUTHORS_GRAPHS[graph_id]
  adj = graph_of(theirs)
  ours = topology.matching_decomposition(adj)
  check_matchings(ours, adj)
  assert len(ours) <= len(theirs)
  assert len(ours) == adj.sum(1).max()  # Δ matchings: the minimum possible
  assert len(ours) == {0: 5, 1: 5, 4: 8, 5: 2}[graph_id]


def test_matching_count_on_rings_and_tori():
  for m in (4, 8, 16):  # even rings are bipartite: König gives Δ = 2
    assert len(topology.matching_decomposition(topology.ring(m))) == 2
  for m in (5, 7):  # odd rings: each matching covers at most (m − 1)/2 of the m edges
    assert len(topology.matching_decomposition(topology.ring(m))) == 3
  assert len(topology.matching_decomposition(topology.torus(4, 4))) == 4
  # 3×3 torus: 4-regular on 9 nodes, 18 edges, at most 4 per matching: 5 needed.
  assert len(topology.matching_decomposition(topology.torus(3, 3))) == 5


@pytest.mark.parametrize("seed", range(4))
def test_matching_decomposition_of_bipartite_graphs_uses_max_degree(seed):
  rng = np.random.default_rng(100 + seed)
  a, b = 5, 7
  bip = rng.uniform(size=(a, b)) < 0.6
  adj = np.zeros((a + b, a + b), bool)
  adj[:a, a:] = bip
  adj = adj | adj.T
  matchings = topology.matching_decomposition(adj)
  check_matchings(matchings, adj)
  assert len(matchings) == adj.sum(1).max()


def test_matching_decomposition_of_random_8_node_graphs_uses_max_degree():
  """Δ is a lower bound, so a count equal to Δ is optimal; Misra–Gries alone gives Δ + 1 often."""
  plain = 0
  for seed in range(20):
    rng = np.random.default_rng(seed)
    adj = np.triu(rng.uniform(size=(8, 8)) < 0.5, 1)
    adj = adj | adj.T
    ours = topology.matching_decomposition(adj)
    check_matchings(ours, adj)
    assert len(ours) == adj.sum(1).max()
    plain += len(topology.matching_decomposition(adj, max_search_nodes=0)) > adj.sum(1).max()
  assert plain > 0  # the search is what brings those graphs down to Δ


def laplacian(edges, m):
  L = np.zeros((m, m))
  for i, j in edges:
    L[[i, j], [i, j]] += 1
    L[i, j] -= 1
    L[j, i] -= 1
  return L


def lambda2(L):
  return np.sort(np.linalg.eigvalsh(L))[1]


def test_matcha_matches_numpy_with_redrawn_flags():
  m, budget, steps = 8, 0.4, 12
  graph = topology.erdos_renyi(m, 0.5, seed=3)
  key = jax.random.key(7)
  design = coopjax.matcha_design(graph, budget)
  tx = coopjax.matcha(
    optax.sgd(LR, momentum=BETA), graph=graph, budget=budget, num_workers=m, key=key
  )
  A, b = ref.make_batches(steps, m, seed=33)
  X, _ = ref.run(tx, A, b, m)

  Ls = [laplacian(M, m) for M in design.matchings]
  p = np.asarray(design.probabilities, np.float32)
  flags = {
    k: np.asarray(jax.random.bernoulli(jax.random.fold_in(key, k), jnp.asarray(p)))
    for k in range(1, steps + 1)
  }
  counts = [int(f.sum()) for f in flags.values()]
  assert min(counts) < len(Ls) and max(counts) > 0  # a real mixture of active and idle matchings

  def matrix_at(k):
    return np.eye(m) - design.alpha * sum(B * L for B, L in zip(flags[k], Ls, strict=True))

  expect = momentum_reference(matrix_at, A, b, m, m)
  np.testing.assert_allclose(ref.flat(X), expect, rtol=1e-4, atol=1e-5)


def test_matcha_with_full_budget_is_dpsgd_with_best_laplacian_weight():
  m, steps = 6, 9
  graph = topology.ring(m)
  L = laplacian(edges_of(graph), m)
  lam = np.sort(np.linalg.eigvalsh(L))
  alpha = 2.0 / (lam[1] + lam[-1])
  design = coopjax.matcha_design(graph, 1.0)
  np.testing.assert_array_equal(design.probabilities, np.ones(len(design.matchings)))
  np.testing.assert_allclose(design.alpha, alpha, rtol=1e-7)
  A, b = ref.make_batches(steps, m, seed=34)
  local = optax.sgd(LR, momentum=BETA)
  X, _ = ref.run(
    coopjax.matcha(local, graph=graph, budget=1.0, num_workers=m, key=jax.random.key(0)), A, b, m
  )
  Xd, _ = ref.run(coopjax.dpsgd(local, W=np.eye(m) - alpha * L), A, b, m)
  np.testing.assert_allclose(ref.flat(X), ref.flat(Xd), rtol=1e-5, atol=1e-6)
  expect = momentum_reference(lambda k: np.eye(m) - alpha * L, A, b, m, m)
  np.testing.assert_allclose(ref.flat(X), expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "graph,budget",
  [(topology.erdos_renyi(10, 0.5, seed=1), 0.3), (topology.torus(3, 4), 0.5)],
)
def test_matcha_probabilities_respect_budget_and_beat_uniform(graph, budget):
  design = coopjax.matcha_design(graph, budget)
  p = design.probabilities
  M = len(design.matchings)
  assert np.all(p >= -1e-12) and np.all(p <= 1 + 1e-12)
  assert p.sum() <= budget * M + 1e-7
  Ls = np.stack([laplacian(Mj, graph.shape[0]) for Mj in design.matchings])
  best = lambda2(np.tensordot(p, Ls, 1))
  np.testing.assert_allclose(design.lambda2, best, rtol=1e-9, atol=1e-12)
  assert best >= lambda2(budget * Ls.sum(0)) - 1e-9
  # No random feasible allocation does better (λ₂ is concave; the solver's gap is 1e-6).
  rng = np.random.default_rng(0)
  for _ in range(300):
    q = rng.uniform(size=M)
    q *= min(1.0, budget * M / q.sum())
    assert lambda2(np.tensordot(q, Ls, 1)) <= best + 1e-5
  # α minimises ρ = ‖E[WᵀW] − J‖, the expectation enumerated over all flag patterns.
  rho = lambda a: np.linalg.norm(expected_gram_by_enumeration(Ls, p, a) - 1.0 / Ls.shape[1], 2)
  assert rho(design.alpha) <= min(rho(design.alpha * 0.9), rho(design.alpha * 1.1)) + 1e-12
  np.testing.assert_allclose(design.rho, rho(design.alpha), rtol=1e-8)


def expected_gram_by_enumeration(Ls, p, alpha):
  """E[WᵀW] by summing over all 2^M flag patterns with their probabilities."""
  M, m, _ = Ls.shape
  out = np.zeros((m, m))
  for bits in range(2**M):
    B = np.array([(bits >> j) & 1 for j in range(M)], dtype=np.float64)
    prob = np.prod(np.where(B == 1, p, 1 - p))
    W = np.eye(m) - alpha * np.tensordot(B, Ls, 1)
    out += prob * W.T @ W
  return out


def test_matcha_rejects_bad_arguments():
  m = 4
  with pytest.raises(ValueError, match="budget"):
    coopjax.matcha(
      optax.sgd(LR), graph=topology.ring(m), budget=0.0, num_workers=m, key=jax.random.key(0)
    )
  with pytest.raises(ValueError, match="4x4"):
    coopjax.matcha(
      optax.sgd(LR), graph=topology.ring(5), budget=0.5, num_workers=m, key=jax.random.key(0)
    )
  with pytest.raises(TypeError, match="key"):
    coopjax.matcha(optax.sgd(LR), graph=topology.ring(m), budget=0.5, num_workers=m, key=0)
  with pytest.raises(ValueError, match="not connected"):
    coopjax.matcha_design(np.kron(np.eye(2), np.ones((2, 2))), 0.5)


def test_doctests():
  import doctest

  result = doctest.testmod(tv, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result
