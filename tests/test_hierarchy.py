"""Hierarchical local SGD and the group-mean primitive against NumPy references."""

import importlib

import chex
import jax
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import mixing

hier = importlib.import_module("coopjax.algorithms._hierarchical")

LR, BETA = 0.05, 0.9


def group_matrix(groups, m):
  """Block averaging matrix: G[j, i] = 1/|g| when i and j share group g."""
  G = np.zeros((m, m))
  for g in groups:
    for i in g:
      for j in g:
        G[j, i] = 1.0 / len(g)
  return G


def reference(groups, tau1, tau2, A, b, lr=LR, beta=BETA, mix_buffers=False, order="step_then_mix"):
  m = sum(len(g) for g in groups)
  X = np.tile(ref.flat(coopjax.replicate(ref.init_params(), 1))[0], (m, 1))
  buf = np.zeros_like(X)
  G, J = group_matrix(groups, m), np.full((m, m), 1.0 / m)
  for k in range(1, A.shape[0] + 1):
    g = np.stack([ref.np_grad(X[i], A[k - 1, i], b[k - 1, i]) for i in range(m)])
    buf = beta * buf + g
    S = J if k % tau2 == 0 else G if k % tau1 == 0 else np.eye(m)
    X = S.T @ (X - lr * buf) if order == "step_then_mix" else S.T @ X - lr * buf
    if mix_buffers:
      buf = S.T @ buf
  return X


@pytest.mark.parametrize("order", ["step_then_mix", "mix_then_step"])
@pytest.mark.parametrize("groups", [[[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 2, 4], [5]]])
def test_matches_numpy_with_momentum(groups, order):
  m, tau1, tau2 = 6, 2, 6
  steps = 3 * tau2 + 1
  A, b = ref.make_batches(steps, m, seed=41)
  tx = coopjax.hierarchical(
    optax.sgd(LR, momentum=BETA), tau1=tau1, tau2=tau2, groups=groups, order=order
  )
  X, state = ref.run(tx, A, b, m)
  np.testing.assert_allclose(
    ref.flat(X), reference(groups, tau1, tau2, A, b, order=order), rtol=1e-4, atol=1e-5
  )
  assert int(coopjax.step_count(state)) == steps


def test_mix_policy_averages_momentum_buffers_with_the_same_groups():
  m, tau1, tau2, groups = 4, 1, 3, [[0, 1], [2, 3]]
  steps = 3 * tau2
  A, b = ref.make_batches(steps, m, seed=42)
  tx = coopjax.hierarchical(
    optax.sgd(LR, momentum=BETA), tau1=tau1, tau2=tau2, groups=groups, local_state_policy="mix"
  )
  X, _ = ref.run(tx, A, b, m)
  expect = reference(groups, tau1, tau2, A, b, mix_buffers=True)
  np.testing.assert_allclose(ref.flat(X), expect, rtol=1e-4, atol=1e-5)
  assert not np.allclose(expect, reference(groups, tau1, tau2, A, b), atol=1e-4)


def test_one_group_is_local_sgd_with_tau1():
  m, tau1, tau2 = 4, 2, 6
  A, b = ref.make_batches(3 * tau2, m, seed=43)
  local = optax.sgd(LR, momentum=BETA)
  X, _ = ref.run(
    coopjax.hierarchical(local, tau1=tau1, tau2=tau2, groups=[list(range(m))]), A, b, m
  )
  Xl, _ = ref.run(coopjax.local_sgd(local, tau=tau1, num_workers=m), A, b, m)
  np.testing.assert_allclose(ref.flat(X), ref.flat(Xl), rtol=1e-5, atol=1e-6)


def test_singleton_groups_are_local_sgd_with_tau2():
  m, tau1, tau2 = 4, 2, 6
  A, b = ref.make_batches(3 * tau2 + 2, m, seed=44)
  local = optax.sgd(LR, momentum=BETA)
  X, _ = ref.run(
    coopjax.hierarchical(local, tau1=tau1, tau2=tau2, groups=[[i] for i in range(m)]), A, b, m
  )
  Xl, _ = ref.run(coopjax.local_sgd(local, tau=tau2, num_workers=m), A, b, m)
  np.testing.assert_allclose(ref.flat(X), ref.flat(Xl), rtol=1e-5, atol=1e-6)
  # and it is not local SGD with tau1
  Xs, _ = ref.run(coopjax.local_sgd(local, tau=tau1, num_workers=m), A, b, m)
  assert not np.allclose(ref.flat(X), ref.flat(Xs), atol=1e-4)


def test_group_mean_primitive_against_numpy():
  rng = np.random.default_rng(0)
  groups = [[4, 0], [1, 2, 5], [3]]
  X = {"a": rng.normal(size=(6, 2, 3)).astype(np.float32), "b": rng.normal(size=6)}
  X["b"] = X["b"].astype(np.float32)
  got = jax.jit(lambda t: mixing.group_mean(t, groups))(X)
  G = group_matrix(groups, 6)
  np.testing.assert_allclose(got["a"], np.einsum("ji,jkl->ikl", G, X["a"]), rtol=1e-6)
  np.testing.assert_allclose(got["b"], G.T @ X["b"], rtol=1e-6)
  with pytest.raises(ValueError, match="partition"):
    mixing.group_mean(X, [[0, 1], [1, 2, 3, 4, 5]])


def test_single_trace_and_state_layout():
  m = 4
  tx = coopjax.hierarchical(optax.sgd(LR, momentum=BETA), tau1=1, tau2=2, groups=[[0, 1], [2, 3]])
  X = coopjax.replicate(ref.init_params(), m)
  state = tx.init(X)
  assert isinstance(state, coopjax.HierarchicalState)
  assert state._fields == ("count", "local_state")
  A, b = ref.make_batches(4, m)
  X, _ = ref.run_from(tx, X, A, b, single_trace=True)
  chex.assert_tree_all_finite(X)


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="divide"):
    coopjax.hierarchical(optax.sgd(LR), tau1=2, tau2=5, groups=[[0, 1], [2, 3]])
  with pytest.raises(ValueError, match="partition"):
    coopjax.hierarchical(optax.sgd(LR), tau1=1, tau2=2, groups=[[0, 1], [3]])
  with pytest.raises(ValueError, match="partition"):
    coopjax.hierarchical(optax.sgd(LR), tau1=1, tau2=2, groups=[[0, 1], []])
  tx = coopjax.hierarchical(optax.sgd(LR), tau1=1, tau2=2, groups=[[0, 1], [2, 3]])
  with pytest.raises(ValueError, match="leading axis 5"):
    tx.init(coopjax.replicate(ref.init_params(), 5))


def test_doctests():
  import doctest

  result = doctest.testmod(hier, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result
