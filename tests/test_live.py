"""Live masks: masked workers frozen, the live rows mixed with the live weights.

The reference is a NumPy re-derivation: the same algorithm run on the
(m − 1)-worker problem from the masking step on, with Metropolis–Hastings
weights built edge by edge on the induced subgraph (the mean over the live
workers for W = J, EASGD's anchor with |L| workers, DiLoCo's outer step on the
live mean), the masked row frozen.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import coopjax
from coopjax import compress
from coopjax import mixing
from coopjax import topology
from coopjax.parallel import context

M, D = 8, 3
ETA = 0.1
ALPHA = 0.1
STEPS, MASK_AT, DEAD = 8, 4, 3
CENTRES = np.random.default_rng(0).normal(size=(M, D))
START = np.random.default_rng(1).normal(size=(M, D))


def loss_fn(params, c):
  return 0.5 * jnp.sum((params["w"] - c) ** 2)


def induced_mh(graph: np.ndarray, live: np.ndarray) -> np.ndarray:
  """MH weights on the live subgraph, edge by edge; masked rows and columns e_i."""
  n = graph.shape[0]
  adj = [[j for j in range(n) if j != i and live[i] and live[j] and graph[i, j]] for i in range(n)]
  W = np.eye(n)
  for i in range(n):
    for j in adj[i]:
      W[i, j] = 1.0 / (1 + max(len(adj[i]), len(adj[j])))
    W[i, i] = 1.0 - sum(W[i, j] for j in adj[i])
  return W


def support(W):
  A = np.abs(np.asarray(W)) > 1e-12
  return (A | A.T) & ~np.eye(A.shape[0], dtype=bool)


def reference(name, order, steps, mask_at):
  """NumPy: rows after ``steps`` steps, worker DEAD masked from step ``mask_at`` on."""
  X = START.copy()
  z = START.mean(0) if name == "easgd" else None
  x_start, trace = START.mean(0), np.zeros(D)
  X[:] = START
  if name == "easgd":
    z = START[0].copy()
  tau = {"local_sgd": 2, "easgd": 2, "diloco": 2}.get(name, 1)
  for k in range(1, steps + 1):
    live = np.ones(M, bool)
    if k >= mask_at:
      live[DEAD] = False
    L = np.flatnonzero(live)
    U = np.where(live[:, None], -ETA * (X - CENTRES), 0.0)
    mixes = k % tau == 0
    base = X + U if order == "step_then_mix" else X
    if not mixes:
      X = X + U
      continue
    if name == "local_sgd":
      new = base.copy()
      new[L] = base[L].mean(0)
    elif name == "easgd":
      new = base.copy()
      new[L] = (1 - ALPHA) * base[L] + ALPHA * z
      z = (1 - len(L) * ALPHA) * z + ALPHA * base[L].sum(0)
    elif name == "diloco":
      delta = x_start - base[L].mean(0)
      trace = 0.9 * trace + delta
      x_start = x_start - 0.7 * trace
      new = base.copy()
      new[L] = x_start
    else:
      if name == "dpsgd_ring":
        W = topology.ring(M)
      elif name == "dpsgd_torus":
        W = topology.torus(2, 4)
      else:  # one-peer exponential, W_r with r = k - 1 (tau = 1)
        r = (k - 1) % topology.one_peer_exponential_period(M)
        W = topology.one_peer_exponential(M, r)
      if not live.all():
        W = induced_mh(support(W), live)
      new = W.T @ base
    X = new if order == "step_then_mix" else new + U
  return X, z


def make_tx(name, order):
  sgd = optax.sgd(ETA)
  if name == "local_sgd":
    return coopjax.local_sgd(sgd, tau=2, num_workers=M, order=order)
  if name == "easgd":
    return coopjax.easgd(sgd, tau=2, alpha=ALPHA, num_workers=M, order=order)
  if name == "diloco":
    outer = optax.sgd(0.7, momentum=0.9)
    return coopjax.diloco(sgd, outer=outer, tau=2, num_workers=M)
  if name == "dpsgd_ring":
    return coopjax.dpsgd(sgd, W=topology.ring(M), order=order)
  if name == "dpsgd_torus":
    return coopjax.dpsgd(sgd, W=topology.torus(2, 4), order=order)
  P = topology.one_peer_exponential_period(M)
  return coopjax.time_varying(
    sgd, tau=1, schedule=lambda r: topology.one_peer_exponential(M, r), period=P, order=order
  )


def run(tx, sharded, mask_at=None, steps=STEPS):
  """Rows of X after each step (host arrays), masking DEAD at ``mask_at``."""
  X = {"w": jnp.asarray(START, jnp.float32)}
  if tx.layout.num_aux:
    X = {"w": jnp.concatenate([X["w"], X["w"][:1]])}
  batch = jnp.asarray(CENTRES, jnp.float32)
  kwargs = dict(with_consensus=False, with_grad_norm=False, with_loss=False)
  if sharded:
    mesh = coopjax.worker_mesh(8)  # one worker per device
    X = coopjax.shard(X, mesh, tx)
    state = coopjax.sharding.init(tx, X, mesh)
    step = coopjax.make_step(loss_fn, tx, mesh=mesh, **kwargs)
    host = lambda X: np.asarray(coopjax.unshard(X, mesh, tx)["w"])  # noqa: E731
  else:
    state = tx.init(X)
    step = coopjax.make_step(loss_fn, tx, **kwargs)
    host = lambda X: np.asarray(X["w"])  # noqa: E731
  rows = []
  for k in range(1, steps + 1):
    if mask_at == k:
      live = np.ones(M, bool)
      live[DEAD] = False
      state = coopjax.set_live(tx, state, live)
    X, state, _ = step(X, state, batch)
    rows.append(host(X))
  return rows


ALGORITHMS = ["local_sgd", "easgd", "dpsgd_ring", "dpsgd_torus", "diloco", "one_peer_exp"]
CASES = [
  (name, order)
  for name in ALGORITHMS
  for order in ("step_then_mix", "mix_then_step")
  if not (name == "diloco" and order == "mix_then_step")
]


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
@pytest.mark.parametrize("name,order", CASES)
def test_masked_rows_match_induced_problem(name, order, sharded):
  tx = make_tx(name, order)
  today = run(tx, sharded, steps=MASK_AT - 1)
  masked = run(coopjax.with_live_mask(tx), sharded, mask_at=MASK_AT)
  # All live (steps before the mask): bit for bit today's iterates.
  for k in range(MASK_AT - 1):
    np.testing.assert_array_equal(masked[k], today[k])
  X_ref, z_ref = reference(name, order, STEPS, MASK_AT)
  got = masked[-1]
  np.testing.assert_allclose(got[:M], X_ref, rtol=1e-5, atol=1e-5)
  # The masked worker is frozen at its row before the masking step.
  np.testing.assert_array_equal(got[DEAD], masked[MASK_AT - 2][DEAD])
  if name == "easgd":
    np.testing.assert_allclose(got[M], z_ref, rtol=1e-5, atol=1e-5)


def test_unwrapped_program_has_no_live_branch():
  """Without a live mask no live branch is traced in; with one, the mix gains its cond."""
  tx = coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(M))
  X = coopjax.replicate({"w": jnp.zeros(D)}, tx)
  step = coopjax.make_step(loss_fn, tx)
  text = step.lower(X, tx.init(X), jnp.zeros((M, D))).as_text()
  wrapped = coopjax.with_live_mask(tx)
  wtext = coopjax.make_step(loss_fn, wrapped).lower(X, wrapped.init(X), jnp.zeros((M, D)))
  assert text.count("stablehlo.case") < wtext.as_text().count("stablehlo.case")


@pytest.mark.parametrize("W", [topology.ring(8), topology.torus(2, 4), topology.exponential(8)])
def test_live_weights_against_edge_by_edge_mh(W):
  rng = np.random.default_rng(2)
  for _ in range(4):
    live = rng.random(8) > 0.3
    live[0] = True
    got = np.asarray(mixing.live_weights(W, 8, jnp.asarray(live)))
    np.testing.assert_allclose(got, induced_mh(support(W), live), atol=1e-6)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-6)


@pytest.mark.parametrize(
  "W, m",
  [(topology.complete(6), 6), (topology.easgd(6, 0.2), 6), (0.5 * np.eye(6) + 0.5 / 6, 6)],
)
def test_live_weights_freeze_masked_workers(W, m):
  # Closed form: the live workers' block re-weighted as documented, a masked worker's row and
  # column e_i, so that X·W_L applied by hand leaves a masked worker's row unchanged.
  live = np.array([True, False, True, True, False, True])
  got = np.asarray(mixing.live_weights(W, m, jnp.asarray(live)))
  n = np.shape(W)[0]
  want = np.eye(n)
  L = np.flatnonzero(live)
  if n == m:
    a = W[0, 0] - W[0, 1]
    want[np.ix_(L, L)] = a * np.eye(len(L)) + (1 - a) / len(L)
  else:
    want[L, L] = 0.8
    want[L, m] = want[m, L] = 0.2
    want[m, m] = 1 - 0.2 * len(L)
  np.testing.assert_allclose(got, want, atol=1e-7)
  x = np.random.default_rng(0).normal(size=(n, 3))
  np.testing.assert_array_equal((got.T @ x)[:m][~live], x[:m][~live])


def test_easgd_and_mean_into_aux_rules():
  live = jnp.array([True, False, True, True])
  W = np.asarray(mixing.live_weights(topology.easgd(4, 0.2), 4, live))
  assert W[3 + 1, 3 + 1] == pytest.approx(1 - 3 * 0.2)  # z keeps (1 − |L|α)
  assert W[1, 4] == 0.0 and W[0, 4] == pytest.approx(0.2)
  mean = np.asarray(mixing.live_weights(mixing.Mix.mean_into_aux(4).matrix, 4, live))
  np.testing.assert_allclose(mean[:4, 4], [1 / 3, 0, 1 / 3, 1 / 3], atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Quarantine


def regression_loss(params, batch):
  x, y = batch[..., :-1], batch[..., -1]
  return jnp.mean((x @ params["w"] - y) ** 2)


def placed(tx, X, loss, sharded: bool, **opts):
  """``(X, state, step, host)`` on 4 devices when ``sharded``, else plain; ``host(X)`` is [m + v]."""
  if sharded:
    mesh = coopjax.worker_mesh(4)
    X = coopjax.shard(X, mesh, tx)
    step = coopjax.make_step(loss, tx, mesh=mesh, **opts)
    return X, coopjax.sharding.init(tx, X, mesh), step, lambda X: coopjax.unshard(X, mesh, tx)
  return X, tx.init(X), coopjax.make_step(loss, tx, **opts), lambda X: X


def assert_consensus_distance(metrics, rows):
  """``metrics["consensus_distance"]`` is ‖X(I − J)‖² of ``rows`` (NumPy)."""
  np.testing.assert_allclose(
    float(metrics["consensus_distance"]),
    np.sum((rows - rows.mean(0)) ** 2),
    rtol=1e-4,
    atol=1e-10,
  )


def regression_batches(steps, nan_at, nan_worker, seed=0):
  rng = np.random.default_rng(seed)
  w_true = np.array([1.0, -2.0, 0.5])
  for k in range(1, steps + 1):
    x = rng.normal(size=(M, 16, 3))
    y = x @ w_true + 0.01 * rng.normal(size=(M, 16))
    b = np.concatenate([x, y[..., None]], axis=-1).astype(np.float32)
    if k == nan_at:
      b[nan_worker, 0, 0] = np.nan
    yield jnp.asarray(b)


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_quarantine_nan_worker(sharded):
  base = coopjax.dpsgd(optax.sgd(0.05, momentum=0.5), W=topology.ring(M))
  tx = coopjax.with_live_mask(base)
  X = coopjax.replicate({"w": jnp.zeros(3)}, tx)
  opts = dict(on_nonfinite="quarantine", readmit_after=10, with_consensus=False, log_every=1)
  X, state, step, host = placed(tx, X, regression_loss, sharded, **opts)
  rows = lambda X: np.asarray(host(X)["w"])  # noqa: E731
  events, losses = [], []
  for k, batch in enumerate(regression_batches(20, nan_at=4, nan_worker=5), start=1):
    before = rows(X)
    X, state, metrics = step(X, state, batch)
    events += coopjax.live.check_quarantine(metrics, graph=tx.graph)
    losses.append(float(metrics["loss"]))
    live = np.asarray(metrics["live"])
    if 4 <= k < 14:
      assert not live[5]
      np.testing.assert_array_equal(rows(X)[5], before[5])  # frozen, finite
    if bool(np.asarray(metrics["rejoined"])[5]):
      assert k == 14
      others = np.delete(rows(X), 5, axis=0)
      np.testing.assert_allclose(rows(X)[5], others.mean(0), rtol=1e-6, atol=1e-6)
      trace = coopjax.live.find_live_state(state).inner.local_state[0].trace["w"]
      np.testing.assert_array_equal(np.asarray(trace)[5], 0.0)  # momentum reset
  assert events == [(5, 4)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.1 * losses[3]  # the others kept learning
  assert all(np.asarray(metrics["live"]))
  assert np.all(np.isfinite(rows(X)))


def stats_loss(variables, batch):
  """Regression with a per-worker statistic (the batch mean of x) as aux, like BatchNorm's."""
  x = batch[..., :-1]
  return regression_loss(variables["params"], batch), {"mean": jnp.mean(x, axis=0)}


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_merge_aux_leaves_masked_rows_frozen(sharded):
  """merge_aux writes the live workers' statistics only: a quarantined row keeps its own."""
  tx = coopjax.with_live_mask(
    coopjax.local_sgd(
      optax.sgd(0.05), tau=2, num_workers=M, mix_mask={"params": True, "batch_stats": False}
    )
  )
  X = coopjax.replicate({"params": {"w": jnp.zeros(3)}, "batch_stats": {"mean": jnp.zeros(3)}}, tx)
  opts = dict(
    has_aux=True,
    merge_aux=coopjax.models.merge_batch_stats,
    on_nonfinite="quarantine",
    readmit_after=4,
    log_every=1,
  )
  X, state, step, host = placed(tx, X, stats_loss, sharded, **opts)
  stats = lambda X: np.asarray(host(X)["batch_stats"]["mean"])  # noqa: E731
  for k, batch in enumerate(regression_batches(10, nan_at=3, nan_worker=5), start=1):
    before = stats(X)
    X, state, metrics = step(X, state, batch)
    live = np.asarray(metrics["live"])
    expected = np.asarray(batch[..., :-1]).mean(axis=1)  # NumPy: each worker's batch mean
    if 3 <= k < 8:  # masked at step 3, re-admitted at step 8 (k ≥ 3 + 4, k mod τ = 0)
      assert not live[5]
      np.testing.assert_array_equal(stats(X)[5], before[5])  # frozen and finite
      expected[5] = before[5]
    if k == 8:
      assert live[5]
      expected[5] = np.delete(expected, 5, axis=0).mean(0)  # rejoined at the others' mean
    np.testing.assert_allclose(stats(X), expected, rtol=1e-6, atol=1e-6)
  assert coopjax.live.find_live_state(state).live.all()


@pytest.mark.parametrize("name", ["local_sgd", "easgd"])
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_metrics_of_a_manually_masked_step_are_over_the_live_workers(sharded, name):
  """set_live without quarantine: loss, consensus and gradient norm leave the masked row out.

  EASGD's anchor row counts in the consensus distance (‖X(I − J)‖² over the
  live workers and z); unsharded, the mask covers the first m rows only.
  """
  if name == "easgd":
    inner = coopjax.easgd(optax.sgd(0.05), tau=2, alpha=ALPHA, num_workers=M)
  else:
    inner = coopjax.local_sgd(optax.sgd(0.05), tau=2, num_workers=M)
  tx = coopjax.with_live_mask(inner)
  v = tx.layout.num_aux
  start = np.concatenate([START, START.mean(0, keepdims=True)])[: M + v]
  start = {"w": jnp.asarray(start, jnp.float32).at[DEAD].set(jnp.nan)}  # the masked worker broke
  live = np.arange(M) != DEAD
  X, state, step, host = placed(tx, start, regression_loss, sharded, log_every=1)
  state = coopjax.set_live(tx, state, live)
  rows = lambda X: np.asarray(host(X)["w"], np.float64)  # noqa: E731
  for batch in regression_batches(3, nan_at=0, nan_worker=0):
    before = rows(X)
    X, state, metrics = step(X, state, batch)
    b = np.asarray(batch, np.float64)
    x, y = b[live, :, :-1], b[live, :, -1]
    residual = np.einsum("wnd,wd->wn", x, before[:M][live]) - y
    losses = np.mean(residual**2, axis=1)
    grads = 2 * np.einsum("wn,wnd->wd", residual, x) / x.shape[1]
    after = rows(X)[np.concatenate([live, np.ones(v, bool)])]  # the live workers, then z
    np.testing.assert_allclose(float(metrics["loss"]), losses.mean(), rtol=1e-5)
    np.testing.assert_allclose(
      float(metrics["avg_grad_norm"]), np.linalg.norm(grads.mean(0)), rtol=1e-5
    )
    assert_consensus_distance(metrics, after)


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_consensus_distance_under_quarantine_counts_the_anchor(sharded):
  """EASGD quarantining a worker: ‖X(I − J)‖² over the live workers and the anchor row."""
  tx = coopjax.with_live_mask(coopjax.easgd(optax.sgd(0.05), tau=2, alpha=ALPHA, num_workers=M))
  start = {"w": jnp.asarray(np.vstack([START, START.mean(0)]), jnp.float32)}  # anchor last
  opts = dict(on_nonfinite="quarantine", log_every=1)
  X, state, step, host = placed(tx, start, regression_loss, sharded, **opts)
  rows = lambda X: np.asarray(host(X)["w"], np.float64)  # noqa: E731
  for k, batch in enumerate(regression_batches(4, nan_at=2, nan_worker=DEAD), start=1):
    X, state, metrics = step(X, state, batch)
    keep = np.append(np.asarray(metrics["live"]), True)  # the live workers and the anchor
    assert keep[DEAD] == (k < 2)
    kept = rows(X)[keep]
    assert_consensus_distance(metrics, kept)


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_choco_under_a_mask_keeps_the_live_mean_and_rejoins_with_the_full_sums(sharded):
  """With η = 0 only consensus moves X: it must keep the mean of the workers that mix.

  CHOCO's running sums s = W·x̂ hold the full W's history; under a mask the live
  weights W_L apply, and after a rejoin s must again be W·x̂ (NumPy), or the mean
  drifts at every consensus step.
  """
  tx = coopjax.with_live_mask(
    coopjax.choco(
      optax.sgd(0.0), tau=1, W=topology.ring(M), compressor=compress.top_k(k=1), gamma=0.4
    )
  )
  X = {"w": jnp.asarray(START, jnp.float32)}
  live = np.arange(M) != DEAD
  X, state, step, host = placed(tx, X, regression_loss, sharded)
  rows = lambda X: np.asarray(host(X)["w"], np.float64)  # noqa: E731
  batches = regression_batches(24, nan_at=0, nan_worker=0)
  for _ in range(4):
    X, state, _ = step(X, state, next(batches))
  state = coopjax.set_live(tx, state, live)
  live_mean = rows(X)[live].mean(0)
  for _ in range(10):
    X, state, _ = step(X, state, next(batches))
  np.testing.assert_allclose(rows(X)[live].mean(0), live_mean, atol=1e-5)
  X, state = coopjax.rejoin(X, state, tx, ~live)
  inner = coopjax.live.find_live_state(state).inner
  hat, sums = np.asarray(inner.hat["w"], np.float64), np.asarray(inner.s["w"], np.float64)
  np.testing.assert_allclose(sums, np.asarray(topology.ring(M)).T @ hat, atol=1e-5)
  mean = rows(X).mean(0)
  for _ in range(10):
    X, state, _ = step(X, state, next(batches))
  np.testing.assert_allclose(rows(X).mean(0), mean, atol=1e-5)


def test_quarantine_needs_live_mask():
  tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=M)
  with pytest.raises(ValueError, match="with_live_mask"):
    coopjax.make_step(regression_loss, tx, on_nonfinite="quarantine")
  with pytest.raises(ValueError, match="readmit_after needs"):
    coopjax.make_step(regression_loss, tx, readmit_after=3)


def test_rejoin_easgd_takes_anchor_and_diloco_outer_model():
  tx = coopjax.with_live_mask(coopjax.easgd(optax.sgd(0.1), tau=1, alpha=0.1, num_workers=4))
  X = {"w": jnp.array([1.0, jnp.nan, 3.0, 4.0, 7.0])}
  state = coopjax.set_live(tx, tx.init(X), [True, False, True, True])
  X2, state2 = coopjax.rejoin(X, state, tx, jnp.array([False, True, False, False]))
  assert X2["w"].tolist() == [1.0, 7.0, 3.0, 4.0, 7.0]
  assert state2.live.tolist() == [True] * 4
  tx = coopjax.with_live_mask(
    coopjax.diloco(optax.sgd(0.1), outer=optax.sgd(1.0), tau=1, num_workers=3)
  )
  X = coopjax.replicate({"w": jnp.full((), 2.0)}, tx)
  state = coopjax.set_live(tx, tx.init(X), [True, False, True])
  X = {"w": jnp.array([5.0, jnp.nan, 6.0])}
  X2, _ = coopjax.rejoin(X, state, tx, jnp.array([False, True, False]))
  assert X2["w"].tolist() == [5.0, 2.0, 6.0]  # the outer model x_start


def test_rejoin_takes_a_mask_and_refuses_indices():
  tx = coopjax.with_live_mask(coopjax.local_sgd(optax.sgd(0.1), tau=1, num_workers=4))
  X = {"w": jnp.array([1.0, 10.0, 3.0, 20.0])}
  state = coopjax.set_live(tx, tx.init(X), [True, False, True, False])
  for indices in ([3], [1, 3], [0, 1, 2, 3]):  # indices, not a mask: refused
    with pytest.raises(ValueError, match="bool mask"):
      coopjax.rejoin(X, state, tx, indices)
  X2, state2 = coopjax.rejoin(X, state, tx, np.array([False, False, False, True]))
  np.testing.assert_array_equal(X2["w"], [1.0, 10.0, 3.0, np.mean([1.0, 3.0])])  # 1 stays out
  assert state2.live.tolist() == [True, False, True, True]


# ---------------------------------------------------------------------------------------------
# Disconnected live subgraph


def test_disconnected_error_names_components():
  tx = coopjax.with_live_mask(coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(6)))
  state = tx.init(coopjax.replicate({"w": jnp.zeros(2)}, tx))
  with pytest.raises(ValueError, match=r"2 disconnected components \[\[0, 5\], \[2, 3\]\]"):
    coopjax.set_live(tx, state, [1, 0, 1, 1, 0, 1])
  metrics = {
    "quarantined": np.zeros(6, bool),
    "step": np.array(9),
    "live": np.array([1, 0, 1, 1, 0, 1], bool),
    "live_connected": np.array(False),
  }
  with pytest.raises(ValueError, match=r"\[\[0, 5\], \[2, 3\]\]"):
    coopjax.live.check_quarantine(metrics, graph=tx.graph)
  assert not bool(mixing.live_connected(topology.ring(6), jnp.array([1, 0, 1, 1, 0, 1], bool)))


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_disconnected_fallback_averages_live_workers(sharded):
  m = 8
  tx = coopjax.with_live_mask(
    coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(m)), disconnected="fallback"
  )
  start = np.arange(m, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
  X = {"w": jnp.asarray(start)}
  live = np.ones(m, bool)
  live[[1, 5]] = False  # ring split into {2, 3, 4} and {6, 7, 0}
  zero = jnp.zeros((m, 2))
  if sharded:
    mesh = coopjax.worker_mesh(4)
    X = coopjax.shard(X, mesh, tx)
    state = coopjax.set_live(tx, coopjax.sharding.init(tx, X, mesh), live)
    step = coopjax.make_step(lambda p, c: 0.0 * jnp.sum(p["w"] * c), tx, mesh=mesh)
    X, state, _ = step(X, state, zero)
    out = np.asarray(coopjax.unshard(X, mesh, tx)["w"])
  else:
    state = coopjax.set_live(tx, tx.init(X), live)
    updates, state = tx.update({"w": zero}, state, X)
    out = np.asarray(optax.apply_updates(X, updates)["w"])
  expected = start.copy()
  expected[live] = start[live].mean(0)
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_docs_example_runs(capsys):
  """The example of docs/failures.md runs and reports worker 5 at step 3."""
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "failures.md").read_text()
  code = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S).group(1)
  exec(compile(code, "failures.md", "exec"), {})
  lines = capsys.readouterr().out.splitlines()
  assert lines[2].startswith("3 [(5, 3)]") and lines[6].endswith("[1 1 1 1 1 1 1 1]")


def test_group_mean_and_permutation_rules():
  live = np.array([True, False, True, True, True, False])
  groups = mixing.Mix.groups([[0, 1, 2], [3, 4, 5]]).matrix
  W = np.asarray(mixing.live_weights(groups, 6, jnp.asarray(live)))
  expected = np.eye(6)
  expected[np.ix_([0, 2], [0, 2])] = 0.5  # the mean over the group's live members
  expected[np.ix_([3, 4], [3, 4])] = 0.5
  np.testing.assert_allclose(W, expected, atol=1e-7)
  swap = mixing.Mix.permutation([1, 0, 3, 2]).matrix
  P = np.asarray(mixing.live_weights(swap, 4, jnp.array([True, True, False, True])))
  # 0 and 1 swap; 3's partner is masked: 3 keeps its own row
  np.testing.assert_array_equal(P, [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_nonblocking_easgd_masked_from_the_start_matches_easgd():
  outs = []
  for make in (coopjax.nonblocking_easgd, coopjax.easgd):
    tx = coopjax.with_live_mask(make(optax.sgd(ETA), tau=1, alpha=ALPHA, num_workers=4))
    X = {"w": jnp.asarray(np.concatenate([START[:4], START[:1]]), jnp.float32)}
    state = coopjax.set_live(tx, tx.init(X), [True, False, True, True])
    g = {"w": jnp.asarray(CENTRES[:4], jnp.float32)}
    for _ in range(5):
      updates, state = tx.update(g, state, X)
      X = {"w": X["w"] + updates["w"]}
    outs.append(np.asarray(X["w"][:4]))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_quarantine_step_all_live_is_bit_identical(sharded):
  tx = make_tx("dpsgd_ring", "mix_then_step")
  X = {"w": jnp.asarray(START, jnp.float32)}
  batch = jnp.asarray(CENTRES, jnp.float32)
  outs = []
  for t, opts in ((tx, {}), (coopjax.with_live_mask(tx), {"on_nonfinite": "quarantine"})):
    if sharded:
      mesh = coopjax.worker_mesh(8)
      Y = coopjax.shard(X, mesh, t)
      state = coopjax.sharding.init(t, Y, mesh)
      step = coopjax.make_step(loss_fn, t, mesh=mesh, **opts)
    else:
      Y, state, step = X, t.init(X), coopjax.make_step(loss_fn, t, **opts)
    for _ in range(3):
      Y, state, metrics = step(Y, state, batch)
    outs.append(np.asarray(Y["w"]))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_compressed_exchange_under_a_live_mask_sharded_equals_plain():
  """Mix.exchange with a worker masked: the sharded result equals the dense reference."""
  mix = mixing.Mix(topology.ring(M), M)
  live = jnp.ones(M, bool).at[DEAD].set(False)
  rows = jnp.asarray(np.random.default_rng(3).normal(size=(M, 6)), jnp.float32)
  rows = rows.at[DEAD].set(jnp.nan)  # a masked worker's NaN never leaks
  key, comp = jax.random.key(0), compress.top_k(k=2)
  with context.live_masked(context.LiveContext(live)):
    own_ref, mixed_ref = mix.exchange({"w": rows}, comp, key, 3)
  ctx = context.ShardContext("workers", 4, M, 0)

  def per_device(x, lv):
    with context.sharded(ctx), context.live_masked(context.LiveContext(lv)):
      return mix.exchange({"w": x}, comp, key, 3)[1]["w"]

  f = jax.jit(
    jax.shard_map(
      per_device,
      mesh=coopjax.worker_mesh(4),
      in_specs=(P("workers"), P()),
      out_specs=P("workers"),
      check_vma=False,
    )
  )
  got = np.asarray(f(rows, live))
  np.testing.assert_allclose(got, np.asarray(mixed_ref["w"]), rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(np.delete(got, DEAD, axis=0)))


@pytest.mark.parametrize("name", ["easgd", "diloco"])
def test_rejoin_kept_local_leaves_take_the_live_mean(name):
  """BatchNorm-like statistics s (mix_mask False) never enter z or x_start's mixes.

  A re-admitted worker takes z (EASGD) or x_start (DiLoCo) on the mixed leaf w
  and the live workers' mean of s (NumPy), not the anchor's initial copy.
  """
  mask = {"w": True, "s": False}
  if name == "easgd":
    inner = coopjax.easgd(optax.sgd(0.1), tau=1, alpha=0.1, num_workers=4, mix_mask=mask)
  else:
    inner = coopjax.diloco(
      optax.sgd(0.1), outer=optax.sgd(1.0), tau=1, num_workers=4, mix_mask=mask
    )
  tx = coopjax.with_live_mask(inner)
  v = tx.layout.num_aux
  X = coopjax.replicate({"w": jnp.full((), 2.0), "s": jnp.zeros(2)}, tx)
  state = coopjax.set_live(tx, tx.init(X), [True, False, True, True])
  s = np.array([[1.0, 10.0], [np.nan, np.nan], [3.0, 30.0], [8.0, 20.0], [0.0, 0.0]])[: 4 + v]
  X = {"w": jnp.array([5.0, jnp.nan, 6.0, 7.0, 9.0])[: 4 + v], "s": jnp.asarray(s, jnp.float32)}
  X2, _ = coopjax.rejoin(X, state, tx, jnp.array([False, True, False, False]))
  w_target = 9.0 if name == "easgd" else 2.0  # z, or the outer model x_start
  assert np.asarray(X2["w"]).tolist() == [5.0, w_target, 6.0, 7.0, 9.0][: 4 + v]
  np.testing.assert_allclose(np.asarray(X2["s"])[1], s[[0, 2, 3]].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(X2["s"])[[0, 2, 3]], s[[0, 2, 3]])


@pytest.mark.parametrize("order, dense_mixes", [("paper", 2), ("overlap", 3)])
def test_cost_record_of_a_masked_compressed_mix_is_its_dense_traffic(order, dense_mixes):
  """While a worker is masked, CHOCO's exchange moves decoded rows and W_L·x̂ is mixed afresh.

  Closed form: a ring neighbour exchange sends 2 dense messages of d float32 per mix; CHOCO's
  masked mixing step makes ``dense_mixes`` such mixes; error-feedback averaging one all-reduce
  (2(m − 1)/m messages). All live, the payload's record; off-steps, nothing.
  """
  m, d = 8, 1000
  dense = 4 * d
  tx = coopjax.with_live_mask(
    coopjax.choco(
      optax.sgd(ETA),
      tau=2,
      W=topology.ring(m),
      compressor=compress.top_k(fraction=0.01),
      gamma=0.5,
      order=order,
    )
  )
  state = tx.init(coopjax.replicate({"w": jnp.zeros(d)}, tx))
  masked = coopjax.set_live(tx, state, np.arange(m) != 3)
  assert tx.comm(2, state).bytes_sent(dense) == 2 * (10 * 4 + 10 * 4)  # 10 values + 10 indices
  assert tx.comm(2, masked).bytes_sent(dense) == dense_mixes * 2 * dense
  assert tx.comm(2, masked).wire_fraction == 1.0
  assert tx.comm(3, masked).collective == "none"
  ef = coopjax.with_live_mask(
    coopjax.local_sgd(optax.sgd(ETA), tau=4, num_workers=m, compressor=compress.int4())
  )
  state = ef.init(coopjax.replicate({"w": jnp.zeros(d)}, ef))
  masked = coopjax.set_live(ef, state, np.arange(m) != 3)
  assert ef.comm(4, masked).collective == "all_reduce"
  assert ef.comm(4, masked).bytes_sent(dense) == pytest.approx(2 * (m - 1) / m * dense)
  assert ef.comm(4, state).bytes_sent(dense) < dense  # all live: (m − 1) int4 payloads


NB_M, NB_DEAD, NB_ALPHA, NB_BETA = 4, 1, 0.2, 0.5


def nb_reference(name, grads, live_at, rejoin_after):
  """NumPy: tau = 1, worker NB_DEAD masked (NaN) while ``live_at[k]`` says so, rejoined after step
  ``rejoin_after``: the rows and the anchor after every step."""
  m, d = NB_M, grads.shape[-1]
  x = np.arange(m + 1, dtype=float)[:, None] * np.ones(d)
  x, z = x[:m], x[m].copy()
  s = np.tile(z, (m, 1)) if name != "delayed" else x.copy()
  ring = np.asarray(topology.ring(m))
  out = []
  for k, g in enumerate(grads, start=1):
    L = live_at[k - 1]
    x = np.where(L[:, None], x - ETA * g, x)
    if name == "easgd":  # z_{p+1} = (1 − |L|α) z_p + α Σ_{i∈L} s_i, then the pull
      z = (1 - L.sum() * NB_ALPHA) * z + NB_ALPHA * s[L].sum(0)
      s = x.copy()
      x = np.where(L[:, None], (1 - NB_ALPHA) * x + NB_ALPHA * z, x)
    elif name == "overlap":  # z_q = mean_{i∈L} s_i; pull; s = pulled − β (z_{q−1} − z_q)
      new = s[L].mean(0)
      x = np.where(L[:, None], (1 - NB_ALPHA) * x + NB_ALPHA * new, x)
      s = x - NB_BETA * (z - new)
      z = new
    else:  # x_i ← x_i − s_i + Σ_j W_ji s_j (MH weights on the live ring), s ← x
      W = ring if L.all() else induced_mh(ring, L)
      mixed = W.T @ np.where(L[:, None], s, 0.0)
      x = np.where(L[:, None], x - s + mixed, x)
      s = x.copy()
    if k == rejoin_after:
      r = NB_DEAD
      x[r] = x[L].mean(0) if name == "delayed" else z
      s[r] = {"easgd": z, "overlap": s[L].mean(0), "delayed": x[r]}[name]
    out.append((x.copy(), z.copy()))
  return out


@pytest.mark.parametrize("name", ["easgd", "overlap", "delayed"])
def test_rejoin_nonblocking_rejoined_row_of_the_reduction_in_flight(name):
  # Worker 1 is masked (NaN) at steps 3-4, re-admitted after step 4: the reduction in flight was
  # snapshotted while it was masked, and its NaN row must not enter the next mix (it did: every
  # row turned NaN). Its row becomes what the masked rule would have used.
  m, d, steps, rejoin_after = NB_M, 3, 7, 4
  make = {
    "easgd": lambda: coopjax.nonblocking_easgd(
      optax.sgd(ETA), tau=1, alpha=NB_ALPHA, num_workers=m
    ),
    "overlap": lambda: coopjax.overlap_local_sgd(
      optax.sgd(ETA), tau=1, alpha=NB_ALPHA, num_workers=m, anchor_momentum=NB_BETA
    ),
    "delayed": lambda: coopjax.delayed(optax.sgd(ETA), tau=1, W=topology.ring(m)),
  }[name]
  tx = coopjax.with_live_mask(make())
  v = 0 if name == "delayed" else 1
  X = {"w": jnp.asarray(np.arange(m + v, dtype=np.float32)[:, None] * np.ones((1, d), np.float32))}
  state = tx.init(X)
  grads = np.random.default_rng(3).normal(size=(steps, m, d))
  live_at = np.ones((steps, m), bool)
  live_at[2:rejoin_after, NB_DEAD] = False
  ref = nb_reference(name, grads, live_at, rejoin_after)
  for k in range(1, steps + 1):
    if k == 3:
      state = coopjax.set_live(tx, state, live_at[k - 1])
      X = {"w": X["w"].at[NB_DEAD].set(jnp.nan)}
    g = grads[k - 1].copy()
    g[~live_at[k - 1]] = np.nan
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, X)
    X = optax.apply_updates(X, updates)
    if k == rejoin_after:
      X, state = coopjax.rejoin(X, state, tx, jnp.asarray(np.arange(m) == NB_DEAD))
    x_ref, z_ref = ref[k - 1]
    live = live_at[k - 1] | (k >= rejoin_after)
    np.testing.assert_allclose(np.asarray(X["w"][:m])[live], x_ref[live], rtol=1e-5, atol=1e-5)
    if v:
      np.testing.assert_allclose(np.asarray(X["w"][m]), z_ref, rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(X["w"])).all()
