"""The overlapped period driver gives exactly the iterates of step-by-step execution."""

import threading

import jax
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import mixing
from coopjax import topology
from coopjax.parallel import overlap
from coopjax.parallel import sharding

LR = 0.05


def build(name, m, tau):
  if name == "nonblocking_easgd":
    return (
      coopjax.nonblocking_easgd(optax.sgd(LR, momentum=0.5), tau=tau, alpha=0.1, num_workers=m),
      1,
      None,
    )
  if name == "overlap_local_sgd":
    return coopjax.overlap_local_sgd(optax.sgd(LR), tau=tau, alpha=0.5, num_workers=m), 1, None
  W = topology.ring(m)
  return coopjax.delayed(optax.sgd(LR), tau=tau, W=W), 0, mixing.Mix(W, m, overlappable=True)


def stepwise(tx, v, mesh, A, b, m):
  X = coopjax.replicate(ref.init_params(), m, v)
  if mesh is None:
    state = tx.init(X)
  else:
    X = coopjax.shard(X, mesh, v)
    state = sharding.init(tx, X, mesh, v)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  losses = []
  for k in range(A.shape[0]):
    batch = (A[k], b[k]) if mesh is None else coopjax.shard_batch((A[k], b[k]), mesh)
    X, state, met = step(X, state, batch)
    jax.block_until_ready(X)
    losses.append(np.asarray(met["worker_loss"]))
  return X, state, np.stack(losses)


def overlapped(tx, v, mesh, A, b, m, tau, reduce):
  X = coopjax.replicate(ref.init_params(), m, v)
  if mesh is None:
    state = tx.init(X)
  else:
    X = coopjax.shard(X, mesh, v)
    state = sharding.init(tx, X, mesh, v)
  period = overlap.make_overlapped_period(ref.loss_fn, tx, mesh, tau=tau, reduce=reduce)
  losses = []
  for p in range(A.shape[0] // tau):
    sl = slice(p * tau, (p + 1) * tau)
    if mesh is None:
      batches = (A[sl], b[sl])
    else:
      put = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "workers"))
      batches = jax.device_put((A[sl], b[sl]), put)
    X, state, met = period(X, state, batches)
    losses.append(np.asarray(met["worker_loss"]))
  return X, state, np.concatenate(losses)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["nonblocking_easgd", "overlap_local_sgd", "delayed"])
@pytest.mark.parametrize("sharded", [True, False])
def test_overlapped_period_equals_stepwise_exactly(name, sharded):
  m, tau, periods = 8, 3, 3
  mesh = coopjax.worker_mesh(4) if sharded else None
  tx, v, reduce = build(name, m, tau)
  A, b = ref.make_batches(tau * periods, m, seed=5)
  X1, s1, l1 = stepwise(tx, v, mesh, A, b, m)
  X2, s2, l2 = overlapped(tx, v, mesh, A, b, m, tau, reduce)
  assert_trees_equal(X1, X2)
  assert_trees_equal(s1, s2)
  np.testing.assert_array_equal(l1, l2)
  # Not a trivial run: the workers moved apart and were mixed.
  workers = ref.flat(X1 if mesh is None else coopjax.unshard(X1, mesh, v))[:m]
  assert np.abs(workers - ref.flat(coopjax.replicate(ref.init_params(), 1))).max() > 1e-2


def test_overlapped_nonblocking_easgd_workers_are_blocking_easgds():
  m, tau, alpha, periods = 8, 4, 0.1, 3
  mesh = coopjax.worker_mesh(8)
  A, b = ref.make_batches(tau * periods, m, seed=9)
  tx = coopjax.nonblocking_easgd(optax.sgd(LR), tau=tau, alpha=alpha, num_workers=m)
  X, state, losses = overlapped(tx, 1, mesh, A, b, m, tau, None)
  Xb, _, lb = stepwise(
    coopjax.easgd(optax.sgd(LR), tau=tau, alpha=alpha, num_workers=m), 1, mesh, A, b, m
  )
  state = state._replace(pending=coopjax.unshard(state.pending, mesh))
  settled = coopjax.settle_easgd(coopjax.unshard(X, mesh, 1), state, alpha)
  np.testing.assert_allclose(ref.flat(settled), ref.flat(coopjax.unshard(Xb, mesh, 1)), atol=1e-6)
  np.testing.assert_allclose(losses, lb, rtol=1e-6, atol=1e-7)


def test_reduction_runs_on_another_thread():
  m, tau = 4, 2
  tx = coopjax.nonblocking_easgd(optax.sgd(LR), tau=tau, alpha=0.1, num_workers=m)
  seen = []

  def reduce(pending):
    seen.append(threading.current_thread() is threading.main_thread())
    return overlap.default_reduce(coopjax.NonBlockingEASGDState, m)(pending)

  X = coopjax.replicate(ref.init_params(), m, 1)
  period = overlap.make_overlapped_period(ref.loss_fn, tx, tau=tau, reduce=reduce)
  A, b = ref.make_batches(tau, m)
  period(X, tx.init(X), (A, b))
  # Traced once for the closing step's state shapes (main thread), once as R (worker thread).
  assert False in seen


def test_bad_inputs():
  m, tau = 4, 2
  X = coopjax.replicate(ref.init_params(), m)
  A, b = ref.make_batches(2 * tau, m)
  tx = coopjax.local_sgd(optax.sgd(LR), tau=tau, num_workers=m)
  with pytest.raises(ValueError, match="exactly one state"):
    overlap.make_overlapped_period(ref.loss_fn, tx, tau=tau)(X, tx.init(X), (A[:tau], b[:tau]))
  tx = coopjax.nonblocking_easgd(optax.sgd(LR), tau=tau, alpha=0.1, num_workers=m)
  X = coopjax.replicate(ref.init_params(), m, 1)
  period = overlap.make_overlapped_period(ref.loss_fn, tx, tau=tau)
  with pytest.raises(ValueError, match="leading period axis"):
    period(X, tx.init(X), (A, b))
  step = coopjax.make_step(ref.loss_fn, tx)
  X1, s1, _ = step(X, tx.init(X), (A[0], b[0]))
  with pytest.raises(ValueError, match="multiple of tau"):
    period(X1, s1, (A[:tau], b[:tau]))
  with pytest.raises(ValueError, match="no default reduction"):
    overlap.default_reduce(coopjax.DelayedState, m)
  with pytest.raises(ValueError, match="tau must be"):
    overlap.make_overlapped_period(ref.loss_fn, tx, tau=0)


def streaming(m, compressor=None, delay=2):
  return coopjax.streaming_diloco(
    optax.sgd(LR, momentum=0.5),
    outer=optax.sgd(0.7, momentum=0.9, nesterov=True),
    H=8,  # P = 2 fragments (w and c): h = 4, torchft schedule: snapshots at 2, 6, …
    fragments=2,
    delay=delay,  # applies at 4, 8, …: the program's step 2 from count 2
    alpha=0.5,
    compressor=compressor,
    block_size=4,
    num_workers=m,
  )


def streaming_runs(tx, mesh, A, b, m, h, reduce=None):
  """make_step for the first h − delay steps, then (a) make_step, (b) overlapped periods of h."""
  X = coopjax.replicate(ref.init_params(), m)
  state = tx.init(X) if mesh is None else sharding.init(tx, X := coopjax.shard(X, mesh), mesh)
  put = (lambda t: t) if mesh is None else (lambda t: coopjax.shard_batch(t, mesh))
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  lead = h - tx.consume_at
  for k in range(lead):
    X, state, _ = step(X, state, put((A[k], b[k])))
  X1, s1 = X, state
  for k in range(lead, A.shape[0]):
    X1, s1, _ = step(X1, s1, put((A[k], b[k])))
  period = overlap.make_overlapped_period(ref.loss_fn, tx, mesh, tau=h, reduce=reduce)
  X2, s2 = X, state
  for start in range(lead, A.shape[0], h):
    sl = slice(start, start + h)
    batches = (A[sl], b[sl])
    if mesh is not None:
      put2 = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "workers"))
      batches = jax.device_put(batches, put2)
    X2, s2, met = period(X2, s2, batches)
    assert met["worker_loss"].shape == (h, m)
  return (X1, s1), (X2, s2)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("sharded", [True, False])
def test_overlapped_streaming_diloco_equals_stepwise_exactly(quantized, sharded):
  m, h, periods = 8, 4, 3
  mesh = coopjax.worker_mesh(4) if sharded else None
  tx = streaming(m, coopjax.compress.int4() if quantized else None)
  A, b = ref.make_batches(2 + h * periods, m, seed=6)
  stepwise_run, overlapped_run = streaming_runs(tx, mesh, A, b, m, h)
  assert_trees_equal(stepwise_run, overlapped_run)
  # Not a trivial run: three syncs landed and moved the fragments' starts.
  x_start = ref.flat(jax.tree.map(lambda x: np.asarray(x)[None], stepwise_run[1].x_start))
  assert np.abs(x_start - ref.flat(coopjax.replicate(ref.init_params(), 1))).max() > 1e-2


def test_overlapped_streaming_diloco_consumes_the_separate_reduction():
  # A reduction that returns zeros changes the iterates: the applying step reads R's result
  # instead of reducing its own pending again.
  m, h = 4, 4
  tx = streaming(m)
  A, b = ref.make_batches(2 + h, m, seed=7)
  zeros = lambda pending: jax.numpy.zeros_like(tx.reduce_pending(pending))
  (X1, _), (X2, _) = streaming_runs(tx, None, A, b, m, h, reduce=zeros)
  (X3, _), (X4, _) = streaming_runs(tx, None, A, b, m, h)
  assert_trees_equal(X1, X3)
  assert_trees_equal(X3, X4)
  assert not np.array_equal(ref.flat(X2), ref.flat(X1))


def test_overlapped_streaming_diloco_bad_inputs():
  m, h = 4, 4
  X = coopjax.replicate(ref.init_params(), m)
  A, b = ref.make_batches(2 * h, m)
  tx = streaming(m)
  period = overlap.make_overlapped_period(ref.loss_fn, tx, tau=h)
  with pytest.raises(ValueError, match=r"right after a snapshot.*program steps \[4\]"):
    period(X, tx.init(X), (A[:h], b[:h]))  # from count 0 the sync applies at step 4, not 2
  # The fix is named with the schedule's numbers: torchft snapshots at n·h − τ = 2, 6, …;
  # MaxText's at n·h = 4, 8, … (h = 4, τ = 2, labelled fragments or a count alike).
  with pytest.raises(ValueError, match=r"tau = h = 4 .*snapshot is at step count 2, so take 2 "):
    period(X, tx.init(X), (A[:h], b[:h]))
  maxtext = coopjax.streaming_diloco(
    optax.sgd(LR),
    outer=optax.sgd(0.7),
    H=8,
    fragments={"w": "x", "c": "y"},
    delay=2,
    schedule="maxtext",
    num_workers=m,
  )
  state = maxtext.init(X)
  step = coopjax.make_step(ref.loss_fn, maxtext)
  X5, s5 = X, state
  for k in range(5):
    X5, s5, _ = step(X5, s5, (A[k], b[k]))
  late = overlap.make_overlapped_period(ref.loss_fn, maxtext, tau=h)
  with pytest.raises(ValueError, match=r"tau = h = 4 .*snapshot is at step count 8, so take 3 "):
    late(X5, s5, (A[:h], b[:h]))
  wrong_tau = overlap.make_overlapped_period(ref.loss_fn, maxtext, tau=2 * h)
  with pytest.raises(ValueError, match=r"tau = h = 4 .*step count 4, so take 4 .*tau=4\)"):
    wrong_tau(X, state, (A[: 2 * h], b[: 2 * h]))
  tx0 = streaming(m, delay=0)
  with pytest.raises(ValueError, match="delay=0"):
    overlap.make_overlapped_period(ref.loss_fn, tx0, tau=h)(X, tx0.init(X), (A[:h], b[:h]))
  with pytest.raises(ValueError, match="reduce=tx.reduce_pending"):
    overlap.default_reduce(coopjax.StreamingDiLoCoState, m)
  chained = optax.chain(tx)
  with pytest.raises(ValueError, match="not wrapped in optax.chain"):
    overlap.make_overlapped_period(ref.loss_fn, chained, tau=h)(X, chained.init(X), (A[:h], b[:h]))
