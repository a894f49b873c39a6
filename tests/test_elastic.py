"""Elastic averaging, elastic hierarchical averaging and the torus, written out entry by entry."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import checkpoint
from coopjax import data
from coopjax import elastic
from coopjax import topology

LR = 0.05


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
  X, _ = ref.run(coopjax.elastic_averaging(optax.sgd(LR), W=W, alpha=alpha, tau=tau), A, b, m, 1)
  xs, z = [ref.x_init() for _ in range(m)], ref.x_init()
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
  X, _ = ref.run(
    coopjax.elastic_hierarchical(optax.sgd(LR), tau=tau, groups=groups, alpha=alpha), A, b, m, 2
  )
  xs, zs = [ref.x_init() for _ in range(m)], [ref.x_init(), ref.x_init()]
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
  X, state = ref.run(tx, A, b, m, 1)
  xs, z = np.tile(ref.x_init(), (m, 1)), ref.x_init()
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


# -- elastic restart: a checkpoint of m workers resumed with m′ ------------------------------

ELASTIC_LR, BETA, TAU, ALPHA8 = 0.05, 0.9, 2, 0.1
N, DIM, BATCH = 96, 3, 4


def _easgd_for(m):
  """EASGD with momentum for m workers; α at the same place in the stability range as 0.1 for 8."""
  alpha = elastic.scale_alpha(ALPHA8, 8, m)
  return coopjax.easgd(optax.sgd(ELASTIC_LR, momentum=BETA), tau=TAU, alpha=alpha, num_workers=m)


def _shards(m):
  return data.split_iid(N, m, seed=0)


def _np_easgd_w(m, alpha=None):
  """W_α for m workers and the anchor, written out, by default with α = 0.1 · 9 / (m + 1)."""
  alpha = ALPHA8 * 9 / (m + 1) if alpha is None else alpha
  W = np.zeros((m + 1, m + 1))
  W[:m, :m] = (1 - alpha) * np.eye(m)
  W[:m, m] = W[m, :m] = alpha
  W[m, m] = 1 - m * alpha
  return W


def _np_run(X, buf, batches, k0, steps, alpha=None):
  """EASGD with momentum in float64 from the state after step k0 (rows: workers, then z)."""
  X, buf = np.array(X, np.float64), np.array(buf, np.float64)
  m = buf.shape[0]
  for k in range(k0 + 1, k0 + steps + 1):
    batch = next(batches)
    xb, yb = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    G = np.stack([xb[i].T @ (xb[i] @ X[i] - yb[i]) / BATCH for i in range(m)])
    buf = G + BETA * buf
    X[:m] -= ELASTIC_LR * buf
    if k % TAU == 0:
      X = _np_easgd_w(m, alpha).T @ X
  return X, buf


def _trace(state):
  return np.asarray(coopjax.algorithms.find_state(state).local_state[0].trace)


@pytest.mark.parametrize(
  "m, m_new, keep", [(8, 6, [0, 1, 2, 4, 5, 7]), (6, 8, None)], ids=["8to6", "6to8"]
)
def test_elastic_restart_from_a_checkpoint(tmp_path, m, m_new, keep):
  p = data.least_squares(num_examples=N, dim=DIM, seed=0)
  k1, k2 = 5, 5  # saved after step 5 (between mixes: the rows differ), then 5 more steps
  tx = _easgd_for(m)
  X = coopjax.replicate(np.zeros(DIM, np.float32), tx)
  state = tx.init(X)
  batches = data.make_worker_batches(p.x, p.y, _shards(m), BATCH, keys=("x", "y"))
  step = coopjax.make_step(data.least_squares_loss, tx)
  for _ in range(k1):
    X, state, _ = step(X, state, next(batches))
  with checkpoint.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(k1, {"X": X, "opt_state": state}, meta={"data": batches.state, "m": m}, force=True)
  saved_X, saved_buf = np.asarray(X, np.float64), _trace(state).astype(np.float64)

  # The restart: the state of m workers restored, then mapped to m′.
  with checkpoint.CheckpointManager(tmp_path / "ckpt") as mgr:
    meta = mgr.meta()
    old_tx = _easgd_for(meta["m"])
    X0 = coopjax.replicate(np.zeros(DIM, np.float32), old_tx)
    target = checkpoint.abstract_target({"X": X0, "opt_state": old_tx.init(X0)})
    restored = mgr.restore(target=target)
  old_batches = data.make_worker_batches(
    p.x, p.y, _shards(m), BATCH, keys=("x", "y"), state=data.IteratorState(**meta["data"])
  )
  new_tx = _easgd_for(m_new)
  X_new, state_new = elastic.resize(restored["X"], restored["opt_state"], old_tx, new_tx, keep=keep)
  new_batches = old_batches.resplit(_shards(m_new))

  # Rows: the kept workers as saved, new workers at the mean of the kept ones, the anchor kept.
  kept = list(range(min(m, m_new))) if keep is None else keep
  mean = saved_X[kept].mean(0)
  expect_X = np.vstack([saved_X[kept], np.tile(mean, (m_new - len(kept), 1)), saved_X[m:]])
  expect_buf = np.vstack([saved_buf[kept], np.zeros((m_new - len(kept), DIM))])
  assert np.asarray(X_new).shape == (m_new + 1, DIM)
  np.testing.assert_allclose(np.asarray(X_new), expect_X, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_trace(state_new), expect_buf, rtol=1e-6, atol=1e-7)
  if m_new > m:
    assert np.all(np.abs(np.asarray(X_new)[m:m_new]) > 0)  # never zeros
  assert int(coopjax.step_count(state_new)) == k1
  # Data: re-split over m′ workers, every example once, the stream at step k1.
  shards = _shards(m_new)
  assert new_batches.num_workers == m_new and new_batches.step == k1
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(N))
  assert new_batches.shard_sizes == tuple(len(s) for s in shards)

  # W and α for m′: the continued run equals NumPy with W_α′ written out for m′ workers.
  ref_batches, stale_batches = old_batches.resplit(shards), old_batches.resplit(shards)
  step = coopjax.make_step(data.least_squares_loss, new_tx)
  for _ in range(k2):
    X_new, state_new, _ = step(X_new, state_new, next(new_batches))
  X_ref, buf_ref = _np_run(expect_X, expect_buf, ref_batches, k1, k2)
  np.testing.assert_allclose(np.asarray(X_new), X_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_trace(state_new), buf_ref, rtol=1e-4, atol=1e-6)
  # ... and not the run that kept the old α.
  X_stale, _ = _np_run(expect_X, expect_buf, stale_batches, k1, k2, alpha=ALPHA8 * 9 / (m + 1))
  assert np.max(np.abs(X_stale - X_ref)) > 1e-4


def test_resize_new_workers_get_fresh_buffers_and_the_kept_step_counter():
  """Adam: a new worker's moments start at zero, its step count is a kept worker's."""
  make_tx = lambda m: coopjax.local_sgd(optax.adam(0.1), tau=2, num_workers=m)  # noqa: E731
  X = coopjax.replicate(jnp.zeros(2), 3)
  state = make_tx(3).init(X)
  step = coopjax.make_step(lambda w, b: jnp.sum((w - b) ** 2), make_tx(3))
  for k in range(3):
    X, state, _ = step(X, state, jnp.arange(6.0).reshape(3, 2) + k)
  X4, state4 = elastic.resize(X, state, make_tx(3), make_tx(4), keep=[0, 2])
  adam = coopjax.algorithms.find_state(state4).local_state[0]
  old = coopjax.algorithms.find_state(state).local_state[0]
  np.testing.assert_array_equal(np.asarray(adam.count), [3, 3, 3, 3])
  np.testing.assert_array_equal(np.asarray(adam.mu)[:2], np.asarray(old.mu)[[0, 2]])
  np.testing.assert_array_equal(np.asarray(adam.mu)[2:], np.zeros((2, 2)))
  np.testing.assert_array_equal(np.asarray(adam.nu)[2:], np.zeros((2, 2)))
  np.testing.assert_allclose(np.asarray(X4)[2:], np.tile(np.asarray(X)[[0, 2]].mean(0), (2, 1)))


def test_resize_under_a_live_mask_seeds_new_workers_from_the_live_ones():
  """Worker 1 is masked with a NaN row: 3 → 5 starts the new workers at the NumPy mean of 0, 2.

  The kept workers keep their flags; the new ones are live (down_since 0); the
  grown run's next step stays finite on every live row.
  """
  make_tx = lambda m: coopjax.with_live_mask(  # noqa: E731
    coopjax.local_sgd(optax.sgd(0.1, momentum=0.9), tau=1, num_workers=m)
  )
  rows = np.array([[1.0, -2.0], [np.nan, np.nan], [3.0, 5.0]], np.float32)
  X = {"w": jnp.asarray(rows)}
  state = coopjax.set_live(make_tx(3), make_tx(3).init(X), [True, False, True])
  X5, state5 = elastic.resize(X, state, make_tx(3), make_tx(5))
  w = np.asarray(X5["w"])
  np.testing.assert_array_equal(w[[0, 2]], rows[[0, 2]])
  np.testing.assert_allclose(w[3:], np.tile(rows[[0, 2]].mean(0), (2, 1)), rtol=1e-6)
  assert np.asarray(state5.live).tolist() == [True, False, True, True, True]
  assert np.asarray(state5.down_since).tolist()[3:] == [0, 0]
  step = coopjax.make_step(lambda p, b: jnp.sum((p["w"] - b) ** 2), make_tx(5))
  X6, _, metrics = step(X5, state5, jnp.ones((5, 2)))
  live = np.asarray(state5.live)
  assert np.isfinite(np.asarray(X6["w"])[live]).all() and np.isfinite(float(metrics["loss"]))
  masked_first = coopjax.set_live(make_tx(3), make_tx(3).init(X), [False, True, True])
  with pytest.raises(ValueError, match="every kept worker \\[0\\] is masked"):
    elastic.resize(X, masked_first, make_tx(3), make_tx(4), keep=[0])


def test_resize_refuses_what_it_cannot_map():
  tx3 = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=3)
  X = coopjax.replicate(jnp.zeros(2), 3)
  with pytest.raises(ValueError, match="auxiliary rows"):
    elastic.resize(X, tx3.init(X), tx3, _easgd_for(4))
  with pytest.raises(ValueError, match="structure"):
    elastic.resize(X, tx3.init(X), tx3, coopjax.local_sgd(optax.adam(0.1), tau=2, num_workers=2))
  with pytest.raises(ValueError, match="two calls"):
    elastic.resize(X, tx3.init(X), tx3, tx3, keep=[0, 1])
  with pytest.raises(ValueError, match=r"in \[0, 3\)"):
    elastic.row_map(3, 2, keep=[0, 3])
  with pytest.raises(ValueError, match="at most 2"):
    elastic.row_map(3, 2, keep=[0, 1, 2])
  with pytest.raises(TypeError, match="coopjax transformation"):
    elastic.resize(X, tx3.init(X), optax.sgd(0.1), tx3)
  with pytest.raises(ValueError, match="stability range"):
    elastic.scale_alpha(0.25, 8, 6)


@pytest.mark.parametrize("m,m_new,keep", [(8, 6, [0, 1, 2, 4, 5, 7]), (6, 8, None)])
def test_resize_choco_rederives_s_for_the_new_ring(m, m_new, keep):
  """CHOCO's s = W·x̂ is rebuilt for ring(m′): the next step keeps the worker mean (NumPy)."""

  def make_tx(n):
    q = coopjax.compress.top_k(k=2)
    return coopjax.choco(optax.sgd(LR), tau=1, W=topology.ring(n), compressor=q, gamma=0.4)

  A, b = ref.make_batches(6, m, seed=3)
  X, state = ref.run(make_tx(m), A, b, m, 0)
  X2, state2 = elastic.resize(X, state, make_tx(m), make_tx(m_new), keep=keep)
  hat, s = ref.flat(state2.hat), ref.flat(state2.s)
  np.testing.assert_allclose(s, np.asarray(topology.ring(m_new)).T @ hat, rtol=1e-6, atol=1e-6)
  # One more step: with doubly stochastic W and s = W·x̂ the consensus step keeps the mean,
  # so the mean moves by −η·mean_i g_i exactly as the gradient step does.
  A2, b2 = ref.make_batches(1, m_new, seed=4)
  x = ref.flat(X2)
  g = np.stack([ref.np_grad(x[i], A2[0, i], b2[0, i]) for i in range(m_new)])
  step = coopjax.make_step(ref.loss_fn, make_tx(m_new))
  X3, _, _ = step(X2, state2, (jnp.asarray(A2[0]), jnp.asarray(b2[0])))
  np.testing.assert_allclose(ref.flat(X3).mean(0), x.mean(0) - LR * g.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["easgd", "overlap"])
def test_resize_nonblocking_completes_the_reduction_in_flight_over_the_kept_workers(name):
  # 3 workers grown to 4 right after a mix, unsettled: the next mix completes the reduction
  # issued at the last one over the 3 kept workers. Overlap's new row was the anchor z_1 and
  # pulled z_2 back toward it (1.76 for 1.3467 here).
  alpha, beta, eta = 0.2, 0.5, 0.1

  def make(m):
    if name == "easgd":
      return coopjax.nonblocking_easgd(optax.sgd(eta), tau=1, alpha=alpha, num_workers=m)
    return coopjax.overlap_local_sgd(
      optax.sgd(eta), tau=1, alpha=alpha, num_workers=m, anchor_momentum=beta
    )

  x0 = np.array([0.0, 1.0, 2.0, 3.0])  # x_1..x_3, then z_1
  g = np.array([1.0, -2.0, 3.0])
  tx = make(3)
  X = {"w": jnp.asarray(x0, jnp.float32)}
  state = tx.init(X)
  updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, X)
  X = optax.apply_updates(X, updates)
  X4, state4 = elastic.resize(X, state, tx, make(4))
  updates, state4 = make(4).update({"w": jnp.zeros(4)}, state4, X4)
  X4 = optax.apply_updates(X4, updates)

  # NumPy: step 1 on 3 workers, then the mix of step 2 over 4 rows, the new one at the mean.
  z1, x = x0[3], x0[:3] - eta * g
  if name == "easgd":
    s = x.copy()  # the pre-pull models: Σ_i s_i completes at the next mix
    x = (1 - alpha) * x + alpha * ((1 - 3 * alpha) * z1 + 3 * alpha * z1)  # z_1 pulled (Σ z_1)
    x = np.append(x, x.mean())
    z2 = (1 - 3 * alpha) * z1 + alpha * s.sum()  # the new row carries z_1: (1 − 4α) + α z_1
    x = (1 - alpha) * x + alpha * z2
  else:
    x = (1 - alpha) * x + alpha * z1
    s = x.copy()  # lead 0 at the first mix
    x = np.append(x, x.mean())
    z2 = s.mean()  # the mean over the kept workers
    x = (1 - alpha) * x + alpha * z2
  np.testing.assert_allclose(np.asarray(X4["w"]), np.append(x, z2), rtol=1e-6, atol=1e-6)
