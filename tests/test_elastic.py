"""Elastic averaging, elastic hierarchical averaging and the torus, written out entry by entry."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology

LR = 0.05


def run(tx, A, b, m, v):
  X = coopjax.replicate(ref.init_params(), m, v)
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx)
  for k in range(A.shape[0]):
    X, state, _ = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
  return X, state


def x_init():
  return ref.flat(coopjax.replicate(ref.init_params(), 1))[0]


def test_torus_entries_written_out():
  """3×4 torus: node (r, c) = 4r + c has neighbours (r±1, c), (r, c±1) mod the sides, 1/5 each."""
  rows, cols = 3, 4
  W = topology.torus(rows, cols)
  expected = np.zeros((12, 12))
  for r in range(rows):
    for c in range(cols):
      i = 4 * r + c
      for j in (
        4 * ((r + 1) % 3) + c,
        4 * ((r - 1) % 3) + c,
        4 * r + (c + 1) % 4,
        4 * r + (c - 1) % 4,
      ):
        expected[i, j] = 0.2
      expected[i, i] = 0.2
  np.testing.assert_allclose(W, expected, atol=1e-15)
  # A few entries by hand: node 0 = (0, 0) talks to 1, 3, 4 and 8.
  assert [j for j in range(12) if W[0, j] > 0] == [0, 1, 3, 4, 8]
  assert [j for j in range(12) if W[5, j] > 0] == [1, 4, 5, 6, 9]


def test_torus_with_a_side_of_two_written_out():
  """2×3 torus: (r ± 1) mod 2 is the same node, so each node has 3 neighbours (MH: 1/4 each)."""
  W = topology.torus(2, 3)
  # node 0 = (0, 0): vertical neighbour 3, horizontal 1 and 2.
  np.testing.assert_allclose(W[0], [0.25, 0.25, 0.25, 0.25, 0, 0], atol=1e-15)
  np.testing.assert_allclose(W[4], [0, 0.25, 0, 0.25, 0.25, 0.25], atol=1e-15)


def test_elastic_averaging_update_written_out():
  """W′ = [[(1−α)W, α1], [α1ᵀ, 1−mα]] after the local step, each row by hand.

  x_i ← (1−α) Σ_j W_ij x_j + α z,   z ← α Σ_i x_i + (1 − mα) z   (x after the local step).
  """
  m, tau, alpha, steps = 5, 2, 0.12, 7
  W = topology.ring(m)  # W_ij = 1/3 for j ∈ {i − 1, i, i + 1} mod 5
  A, b = ref.make_batches(steps, m, seed=71)
  X, _ = run(coopjax.elastic_averaging(optax.sgd(LR), W=W, alpha=alpha, tau=tau), A, b, m, 1)
  xs, z = [x_init() for _ in range(m)], x_init()
  for k in range(1, steps + 1):
    xs = [xs[i] - LR * ref.np_grad(xs[i], A[k - 1, i], b[k - 1, i]) for i in range(m)]
    if k % tau == 0:
      new = [
        (1 - alpha) * (xs[(i - 1) % m] + xs[i] + xs[(i + 1) % m]) / 3 + alpha * z for i in range(m)
      ]
      z = alpha * sum(xs) + (1 - m * alpha) * z
      xs = new
  np.testing.assert_allclose(ref.flat(X), np.stack(xs + [z]), rtol=1e-5, atol=1e-5)


def test_elastic_hierarchical_update_written_out():
  """Groups {0, 1} and {2, 3, 4} with auxiliaries z_0, z_1 and W_aux = J (2×2):

  x_i ← (1−α) x_i + α z_{g(i)},
  z_g ← ½(z_0 + z_1) + α Σ_{i∈g} (x_i − z_g)   (x after the local step).
  """
  groups, alpha, tau, steps = [[0, 1], [2, 3, 4]], 0.2, 2, 6
  m = 5
  A, b = ref.make_batches(steps, m, seed=72)
  X, _ = run(
    coopjax.elastic_hierarchical(optax.sgd(LR), tau=tau, groups=groups, alpha=alpha), A, b, m, 2
  )
  xs, zs = [x_init() for _ in range(m)], [x_init(), x_init()]
  group_of = {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}
  for k in range(1, steps + 1):
    xs = [xs[i] - LR * ref.np_grad(xs[i], A[k - 1, i], b[k - 1, i]) for i in range(m)]
    if k % tau == 0:
      new_x = [(1 - alpha) * xs[i] + alpha * zs[group_of[i]] for i in range(m)]
      mean_z = 0.5 * (zs[0] + zs[1])
      zs = [mean_z + alpha * sum(xs[i] - zs[g] for i in groups[g]) for g in range(2)]
      xs = new_x
  np.testing.assert_allclose(ref.flat(X), np.stack(xs + zs), rtol=1e-5, atol=1e-5)


def test_mix_policy_with_auxiliary_rows_scales_worker_momentum():
  """local_state_policy="mix" on EASGD: the anchor has no buffer and enters as zero, so each
  worker's momentum becomes (1−α)·buf_i at every mix (W_α's worker block is (1−α)I).
  """
  m, tau, alpha, beta, steps = 4, 2, 0.15, 0.9, 6
  A, b = ref.make_batches(steps, m, seed=73)
  tx = coopjax.easgd(
    optax.sgd(LR, momentum=beta), tau=tau, alpha=alpha, num_workers=m, local_state_policy="mix"
  )
  X, state = run(tx, A, b, m, 1)
  xs, z = np.tile(x_init(), (m, 1)), x_init()
  buf = np.zeros_like(xs)
  for k in range(1, steps + 1):
    G = np.stack([ref.np_grad(xs[i], A[k - 1, i], b[k - 1, i]) for i in range(m)])
    buf = beta * buf + G
    xs = xs - LR * buf
    if k % tau == 0:
      z_new = alpha * xs.sum(0) + (1 - m * alpha) * z
      xs = (1 - alpha) * xs + alpha * z
      z = z_new
      buf = (1 - alpha) * buf
  np.testing.assert_allclose(ref.flat(X), np.vstack([xs, z]), rtol=1e-5, atol=1e-5)
  trace = coopjax.algorithms.find_state(state.local_state, optax.TraceState).trace
  np.testing.assert_allclose(ref.flat(trace), buf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_elastic_averaging_anchor_row_written_out(alpha):
  """W′ entries: worker block (1−α)W, anchor column α, anchor corner 1 − mα."""
  m = 4
  W = topology.ring(m)
  Wp = topology.elastic(W, alpha)
  for i in range(m):
    for j in range(m):
      assert Wp[i, j] == pytest.approx((1 - alpha) * W[i, j])
    assert Wp[i, m] == pytest.approx(alpha) and Wp[m, i] == pytest.approx(alpha)
  assert Wp[m, m] == pytest.approx(1 - m * alpha)
