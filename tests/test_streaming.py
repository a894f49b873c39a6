"""Streaming DiLoCo against a NumPy re-derivation, its degenerate cases, sharding, HLO, resume."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import compress
from coopjax.parallel import sharding
from coopjax.parallel.context import LiveContext
from coopjax.parallel.context import live_masked
from coopjax.training import checkpoint

LR, BETA = 0.05, 0.9
OUTER_LR, MU = 0.7, 0.9
# ref.flat's columns [w0, w1, w2, c]. A count of 2 puts the largest leaf (w) in fragment 0.
COUNT_FRAGMENTS = [[0, 1, 2], [3]]


def flat_model(tree):
  return np.concatenate([np.asarray(tree["w"], np.float64), [float(tree["c"])]])


def streaming_reference(m, H, frags, delay, alpha, schedule, A, b, outer="nesterov", lr=LR):
  """Inner momentum SGD per worker; sync n of fragment (n − 1 + o) mod P, snapshot and apply.

  The schedule is written out from the rule: h = H / P; snapshot at n·h − c, apply τ later;
  torchft c = τ, o = 0; maxtext c = 0, o = 1.
  """
  P = len(frags)
  h = H // P
  c, o = (delay, 0) if schedule == "torchft" else (0, 1)
  xs, x_start = np.tile(ref.x_init(), (m, 1)), ref.x_init()
  buf = np.zeros_like(xs)
  traces = [np.zeros(len(f)) for f in frags]
  pending, events = None, []
  for k in range(1, A.shape[0] + 1):
    for i in range(m):
      buf[i] = (BETA if outer == "nesterov" else 0.0) * buf[i] + ref.np_grad(
        xs[i], A[k - 1, i], b[k - 1, i]
      )
      xs[i] = xs[i] - lr * buf[i]
    for n in range(1, k + 2):
      p = (n - 1 + o) % P
      if n * h - c == k:  # snapshot: Δ_i = x_start[p] − x_i[p]
        pending = (n, p, x_start[frags[p]] - xs[:, frags[p]])
        events.append(("snapshot", k, p))
      if n * h - c + delay == k:  # apply
        assert pending[0] == n and pending[1] == p
        idx, dbar = frags[p], pending[2].mean(0)
        if outer == "nesterov":  # optax.sgd(lr, momentum=μ, nesterov=True): t ← Δ + μt
          traces[p] = dbar + MU * traces[p]
          x_start[idx] = x_start[idx] - OUTER_LR * (dbar + MU * traces[p])
        else:  # optax.sgd(1.0)
          x_start[idx] = x_start[idx] - dbar
        xs[:, idx] = (1 - alpha) * x_start[idx] + alpha * xs[:, idx]
        events.append(("apply", k, p))
  return xs, x_start, events


@pytest.mark.parametrize(
  "schedule,delay,alpha", [("torchft", 0, 0.0), ("torchft", 2, 0.5), ("maxtext", 1, 0.5)]
)
def test_matches_numpy_with_momentum_inner_and_nesterov_outer(schedule, delay, alpha):
  m, H, steps = 3, 6, 14
  A, b = ref.make_batches(steps, m, seed=51)
  outer = optax.sgd(OUTER_LR, momentum=MU, nesterov=True)
  tx = coopjax.streaming_diloco(
    optax.sgd(LR, momentum=BETA),
    outer=outer,
    H=H,
    fragments=2,
    delay=delay,
    alpha=alpha,
    schedule=schedule,
    num_workers=m,
  )
  X, state = ref.run(tx, A, b, m)
  xs, x_start, events = streaming_reference(m, H, COUNT_FRAGMENTS, delay, alpha, schedule, A, b)
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat_model(state.x_start), x_start, rtol=1e-5, atol=1e-6)
  # The reference's schedule equals the transformation's (comm) and the host plan (syncs).
  applies = [(k, p) for kind, k, p in events if kind == "apply"]
  plan = coopjax.algorithms.streaming_syncs(
    H=H, fragments=2, delay=delay, schedule=schedule, steps=steps
  )
  assert [(s.apply, s.fragment) for s in plan] == applies
  assert [s.snapshot for s in plan] == [k for kind, k, _ in events if kind == "snapshot"][
    : len(plan)
  ]
  comm = [k for k in range(1, steps + 1) if tx.comm(k, state).collective != "none"]
  assert comm == [k for k, _ in applies]
  assert len(state.outer_states) == 2


def test_schedules_written_out():
  # H = 8, P = 4, τ = 1: h = 2. torchft: snapshot 2n − 1, apply 2n, fragments 0, 1, 2, 3, 0 …
  plan = coopjax.algorithms.streaming_syncs(H=8, fragments=4, delay=1, steps=10)
  assert [tuple(s) for s in plan] == [(n, (n - 1) % 4, 2 * n - 1, 2 * n) for n in range(1, 6)]
  # maxtext: snapshot 2n, apply 2n + 1, fragments 1, 2, 3, 0 …
  plan = coopjax.algorithms.streaming_syncs(H=8, fragments=4, delay=1, schedule="maxtext", steps=10)
  assert [tuple(s) for s in plan] == [(n, n % 4, 2 * n, 2 * n + 1) for n in range(1, 5)]


def test_labelled_fragments_order_and_alpha_discards():
  m, H, delay, steps = 2, 4, 1, 9
  A, b = ref.make_batches(steps, m, seed=52)
  labels = {"w": "b", "c": "a"}  # sorted labels: fragment 0 = "a" = c, fragment 1 = w
  tx = coopjax.streaming_diloco(
    optax.sgd(LR, momentum=BETA),
    outer=optax.sgd(OUTER_LR, momentum=MU, nesterov=True),
    H=H,
    fragments=lambda model: labels,
    delay=delay,
    num_workers=m,
  )
  X, state = ref.run(tx, A, b, m)
  xs, x_start, _ = streaming_reference(m, H, [[3], [0, 1, 2]], delay, 0.0, "torchft", A, b)
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(flat_model(state.x_start), x_start, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["torchft", "maxtext"])
def test_one_fragment_no_delay_no_alpha_is_diloco_exactly(schedule):
  m, H, steps = 4, 3, 10
  A, b = ref.make_batches(steps, m, seed=53)
  local = optax.sgd(LR, momentum=BETA)
  outer = optax.sgd(OUTER_LR, momentum=MU, nesterov=True)
  Xd, sd = ref.run(coopjax.diloco(local, outer=outer, tau=H, num_workers=m), A, b, m)
  tx = coopjax.streaming_diloco(
    local, outer=outer, H=H, fragments=1, schedule=schedule, num_workers=m
  )
  Xs, ss = ref.run(tx, A, b, m)
  for a, c in zip(
    jax.tree.leaves((Xd, sd.x_start)), jax.tree.leaves((Xs, ss.x_start)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("schedule", ["torchft", "maxtext"])
def test_outer_sgd1_is_periodic_averaging_per_fragment_with_the_phase(schedule):
  m, H, steps = 3, 4, 11
  A, b = ref.make_batches(steps, m, seed=54)
  tx = coopjax.streaming_diloco(
    optax.sgd(LR), outer=optax.sgd(1.0), H=H, fragments=2, schedule=schedule, num_workers=m
  )
  X, _ = ref.run(tx, A, b, m)
  # Plain SGD; fragment p averaged at the steps k = n·h whose sync n has (n − 1 + o) mod P = p.
  o, h = (0 if schedule == "torchft" else 1), H // 2
  xs = np.tile(ref.x_init(), (m, 1))
  for k in range(1, steps + 1):
    for i in range(m):
      xs[i] -= LR * ref.np_grad(xs[i], A[k - 1, i], b[k - 1, i])
    if k % h == 0:
      idx = COUNT_FRAGMENTS[(k // h - 1 + o) % 2]
      xs[:, idx] = xs[:, idx].mean(0)
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-5, atol=1e-6)


def test_fragment_partition_and_errors():
  model = {"a": jnp.zeros(5), "b": jnp.zeros(4), "c": jnp.zeros(3), "d": jnp.zeros(2)}
  # Largest first, each to the lightest fragment: a→0 (5|0), b→1 (5|4), c→1 (5|7), d→0 (7|7).
  assert coopjax.algorithms.fragment_leaves(model, 2) == [[0, 3], [1, 2]]
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="not divisible"):
    coopjax.streaming_diloco(sgd, outer=sgd, H=6, fragments=4, num_workers=2)
  with pytest.raises(ValueError, match="delay=3 must be smaller than h"):
    coopjax.streaming_diloco(sgd, outer=sgd, H=6, fragments=2, delay=3, num_workers=2)
  with pytest.raises(ValueError, match="schedule must be one of"):
    coopjax.streaming_diloco(sgd, outer=sgd, H=6, fragments=2, schedule="x", num_workers=2)
  for alpha in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
      coopjax.streaming_diloco(sgd, outer=sgd, H=6, fragments=2, alpha=alpha, num_workers=2)
  with pytest.raises(ValueError, match="only 2 leaves"):
    tx = coopjax.streaming_diloco(sgd, outer=sgd, H=6, fragments=3, num_workers=2)
    tx.init(coopjax.replicate(ref.init_params(), 2))


@pytest.mark.parametrize(
  "compressor,block",
  [
    (compress.top_k(fraction=0.5), 8),  # k over the whole buffer, not per row
    (compress.qsgd(4, unbiased=False), 8),  # one norm per buffer
    (compress.scaled_sign(), 8),  # one scale per buffer
    (compress.int4(), 7),  # an odd row splits a byte between two rows
  ],
  ids=["top_k", "qsgd", "scaled_sign", "int4-odd"],
)
def test_compressors_that_are_not_row_wise_are_refused(compressor, block):
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="must quantize row by row"):
    coopjax.streaming_diloco(
      sgd, outer=sgd, H=4, fragments=2, num_workers=2, compressor=compressor, block_size=block
    )


def test_row_wise_compressors_are_accepted_and_quantize_each_row():
  """int8 on a two-row buffer: each row scaled by its own max|x|/127 (NumPy)."""
  sgd = optax.sgd(0.1)
  for q in (compress.int8(), compress.int4(), compress.identity()):
    coopjax.streaming_diloco(sgd, outer=sgd, H=4, fragments=2, num_workers=2, compressor=q)
  x = np.array([[1.0, -0.5, 0.25, 2.0], [300.0, 1.0, -127.0, 5.0]], np.float32)
  q, key = compress.int8(), jax.random.key(0)
  scale = np.abs(x).max(1, keepdims=True) * np.float32(1 / 127)
  expected = np.round(x * (np.float32(1) / scale)) * scale
  np.testing.assert_allclose(q.decode(q.encode(jnp.asarray(x), key), x, key), expected, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_mean_is_torchft_arithmetic_with_the_written_out_quantizer(bits):
  """Q(mean_i Q(x_i)), Q the per-row absmax quantizer written out in NumPy (float32)."""
  x = np.random.default_rng(0).normal(size=(4, 3, 8)).astype(np.float32)
  levels = 2 ** (bits - 1) - 1

  def Q(a):  # per row: σ = max|a|·fl(1/L), q = clip(round_half_even(a·fl(1/σ)), ±L), Q = σq
    scale = np.abs(a).max(-1, keepdims=True) * np.float32(1 / levels)
    q = np.clip(np.round(a * (np.float32(1) / scale)), -levels, levels)
    return q.astype(np.float32) * scale

  total = (Q(x[0]) + Q(x[2])) + (Q(x[1]) + Q(x[3]))  # pairwise, as the rows are added
  expected = Q(total / np.float32(4))
  q = compress.int4() if bits == 4 else compress.int8()
  got = jax.jit(lambda x: coopjax.mixing.quantized_mean(x, q, jax.random.key(0)))(x)
  # The same codes; a compiled scale may differ from NumPy's in the last bit (fused products).
  np.testing.assert_allclose(np.asarray(got), expected, rtol=3e-7, atol=0)
  assert np.abs(np.asarray(got) - x.mean(0)).max() > (1e-3 if bits == 4 else 1e-5)


# ---------------------------------------------------------------- sharded, HLO, resume


@pytest.fixture(scope="module")
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:8]), (coopjax.WORKER_AXIS,))


WIDE = 2048  # values per leaf: a fragment's buffer is 8 rows of 256 for the quantized path


def wide_loss(params, batch):
  A, b = batch
  w = jnp.concatenate([params["u"], params["v"]])[: A.shape[-1]]
  extra = 1e-3 * (jnp.sum(params["u"] ** 2) + jnp.sum(params["v"] * params["u"]))
  return 0.5 * jnp.mean((A @ w - b) ** 2) + extra


def wide_init():
  rng = np.random.default_rng(3)
  return {k: rng.normal(size=WIDE).astype(np.float32) * 0.1 for k in ("u", "v")}


def streaming(m, compressor=None, delay=1):
  return coopjax.streaming_diloco(
    optax.sgd(LR, momentum=BETA),
    outer=optax.sgd(OUTER_LR, momentum=MU, nesterov=True),
    H=4,
    fragments=2,
    delay=delay,
    alpha=0.5,
    compressor=compressor,
    num_workers=m,
  )


NO_METRICS = dict(with_loss=False, with_consensus=False, with_grad_norm=False)


def wide_batches(steps, m):
  A, b = ref.make_batches(steps, m, batch=4, seed=55)
  return A, b


@pytest.mark.parametrize("quantized, delay", [(False, 1), (True, 1), (False, 0)])
def test_sharded_equals_unsharded(mesh, quantized, delay):
  m = 16  # two workers per device
  tx = streaming(m, compress.int4() if quantized else None, delay=delay)
  steps = 7
  A, b = wide_batches(steps, m)
  X = coopjax.replicate(wide_init(), m)
  state = tx.init(X)
  step = coopjax.make_step(wide_loss, tx, **NO_METRICS)
  Xs = coopjax.shard(X, mesh, tx)
  ss = sharding.init(tx, Xs, mesh)
  sstep = coopjax.make_step(wide_loss, tx, mesh=mesh, **NO_METRICS)
  for k in range(steps):
    batch = (jnp.asarray(A[k]), jnp.asarray(b[k]))
    X, state, _ = step(X, state, batch)
    Xs, ss, _ = sstep(Xs, ss, coopjax.shard_batch(batch, mesh))
    jax.block_until_ready(Xs)
  got = coopjax.unshard(Xs, mesh, tx)
  # Quantized: float rounding upstream (the sharded gradients) may move a value across a
  # rounding boundary of the 4-bit grid; the collective itself is bit-exact (next test).
  atol = 5e-5 if quantized else 2e-7
  for a, c in zip(
    jax.tree.leaves((X, state.x_start)), jax.tree.leaves((got, ss.x_start)), strict=True
  ):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=2e-6, atol=atol)
  if delay:
    assert ss.pending.sharding.spec == jax.sharding.PartitionSpec(coopjax.WORKER_AXIS)
  else:  # snapshot and apply at one step: no buffer is carried between steps
    assert state.pending == () and ss.pending == ()


def test_sharded_quantized_mean_equals_the_reference_bit_for_bit(mesh):
  m, rows = 16, 5  # two workers per device; 5 rows padded to 8 chunks of one row
  x = jnp.asarray(np.random.default_rng(1).normal(size=(m, rows, 16)).astype(np.float32))
  key = jax.random.key(0)
  expected = jax.jit(lambda x: coopjax.mixing.quantized_mean(x, compress.int4(), key))(x)
  spec = jax.sharding.PartitionSpec(coopjax.WORKER_AXIS)
  ctx = sharding.context_for(mesh, m, 0)

  def body(local):
    with coopjax.mixing.sharded(ctx):
      return coopjax.mixing.quantized_mean(local, compress.int4(), key)

  f = jax.jit(
    jax.shard_map(
      body, mesh=mesh, in_specs=spec, out_specs=jax.sharding.PartitionSpec(), check_vma=False
    )
  )
  np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(expected))


def test_sharded_quantized_mean_over_live_workers_equals_the_reference(mesh):
  """Under a live mask: the mean over the live workers only, a NaN in a masked row ignored."""
  m, rows = 16, 5
  x = np.random.default_rng(2).normal(size=(m, rows, 16)).astype(np.float32)
  live = np.ones(m, bool)
  live[[3, 12]] = False
  x[3] = np.nan
  x, live = jnp.asarray(x), jnp.asarray(live)
  key = jax.random.key(0)
  live_ctx = LiveContext(live, None)

  def plain(x):
    with live_masked(live_ctx):
      return coopjax.mixing.quantized_mean(x, compress.int4(), key)

  expected = np.asarray(jax.jit(plain)(x))
  spec = jax.sharding.PartitionSpec(coopjax.WORKER_AXIS)
  ctx = sharding.context_for(mesh, m, 0)

  def body(local):
    with coopjax.mixing.sharded(ctx), live_masked(live_ctx):
      return coopjax.mixing.quantized_mean(local, compress.int4(), key)

  f = jax.jit(
    jax.shard_map(
      body, mesh=mesh, in_specs=spec, out_specs=jax.sharding.PartitionSpec(), check_vma=False
    )
  )
  np.testing.assert_array_equal(np.asarray(f(x)), expected)
  assert np.isfinite(expected).all()
  kept = np.asarray(x)[np.asarray(live)]
  np.testing.assert_allclose(expected, kept.mean(0), atol=0.5)  # 4-bit: close to the live mean
  assert np.abs(expected - np.nan_to_num(np.asarray(x)).mean(0)).max() > 1e-3


def test_quantized_collectives_are_u8_of_a_fragment_at_4_bits(mesh):
  m = 8  # one worker per device
  tx = streaming(m, compress.int4())
  Xs = coopjax.shard(coopjax.replicate(wide_init(), m), mesh)
  ss = sharding.init(tx, Xs, mesh)
  A, b = wide_batches(1, m)
  step = coopjax.make_step(wide_loss, tx, mesh=mesh, **NO_METRICS)
  comm = coopjax.comm_report(step, Xs, ss, coopjax.shard_batch((A[0], b[0]), mesh))
  assert sorted(comm.kinds()) == ["all-gather", "all-to-all"]
  assert all(c.dtypes == ("u8",) for c in comm)
  # Model 2·2048 float32 = 16384 bytes; a fragment is 1/P of it; 4 bits are 1/8 of 32;
  # plus one float32 scale per row of 256 values (8 rows).
  expected = 16384 // 2 * 4 // 32 + 8 * 4
  (a2a,) = [c for c in comm if c.kind == "all-to-all"]
  (gather,) = [c for c in comm if c.kind == "all-gather"]
  assert a2a.bytes == expected  # each worker's quantized fragment, sent once
  assert gather.result_bytes == expected and gather.bytes == expected // 8
  assert tx.bytes_per_sync(wide_init()) == expected
  assert tx.wire_dtype == "uint8"
  cost = tx.comm(2, ss)
  assert cost.collective == "all_reduce" and cost.overlappable
  assert cost.fraction == 0.5 and cost.fraction * cost.wire_fraction * 16384 == expected
  assert cost.bytes_sent(16384) == pytest.approx(2 * 7 / 8 * expected)  # a ring's 2(m − 1)/m


@pytest.mark.parametrize("compressor", [None, compress.int4()], ids=["float32", "int4"])
def test_cost_record_is_priced_by_the_mixed_leaves(compressor):
  """With a mix_mask, ``bytes_sent`` of the mixed leaves' bytes is the closed-form payload.

  The kept-local leaf (a BatchNorm-like statistic) is in no fragment; as for every
  other algorithm, a model's bytes are those of the leaves that mix.
  """
  m, block = 8, 16
  model = {"params": {"u": jnp.zeros((6, 8)), "v": jnp.zeros(20)}, "stats": jnp.zeros(100)}
  tx = coopjax.streaming_diloco(
    optax.sgd(0.1),
    outer=optax.sgd(0.7),
    H=4,
    fragments=2,
    num_workers=m,
    compressor=compressor,
    block_size=block,
    mix_mask={"params": True, "stats": False},
  )
  state = tx.init(coopjax.replicate(model, m))
  size = 48  # the largest fragment, "u" (48 values; 3 rows of 16)
  payload = 4 * size if compressor is None else size // 2 + 4 * (size // block)
  assert tx.bytes_per_sync(model) == payload
  mixed_bytes = 4 * (48 + 20)
  cost = tx.comm(2, state)
  assert cost.bytes_sent(mixed_bytes) == pytest.approx(2 * (m - 1) / m * payload)
  assert cost.fraction == pytest.approx(4 * size / mixed_bytes)


def test_period_program_issues_the_reduction_before_the_delayed_steps(mesh):
  m = 8  # torchft, H = 4, P = 2, τ = 1: h = 2, snapshots at 1, 3, 5 …
  tx = streaming(m)
  A, b = wide_batches(1 + 2 * 3, m)
  Xs = coopjax.shard(coopjax.replicate(wide_init(), m), mesh)
  ss = sharding.init(tx, Xs, mesh)
  step = coopjax.make_step(wide_loss, tx, mesh=mesh, **NO_METRICS)
  Xs, ss, _ = step(Xs, ss, coopjax.shard_batch((A[0], b[0]), mesh))  # up to the first snapshot
  period = coopjax.make_period_step(wide_loss, tx, mesh=mesh, **NO_METRICS)
  batches = (jnp.asarray(A[1:3]), jnp.asarray(b[1:3]))
  comm = coopjax.comm_report(period, Xs, ss, batches)
  early = comm.outside_loops().every_step()
  (reduction,) = early
  assert reduction.kind == "all-reduce" and reduction.bytes == WIDE * 4  # fragment: 1 leaf
  assert all(c.in_branch for c in comm if c.in_loop)
  # The period programs give make_step's iterates.
  Xp, sp = Xs, ss
  Xm, sm = Xs, ss
  for start in range(1, 7, 2):
    part = (jnp.asarray(A[start : start + 2]), jnp.asarray(b[start : start + 2]))
    Xp, sp, _ = period(Xp, sp, part)
    for k in range(start, start + 2):
      Xm, sm, _ = step(Xm, sm, coopjax.shard_batch((A[k], b[k]), mesh))
    jax.block_until_ready((Xp, Xm))
  for a, c in zip(
    jax.tree.leaves((Xp, sp.x_start)), jax.tree.leaves((Xm, sm.x_start)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_resume_mid_stream_is_bit_identical(tmp_path):
  m, steps, cut = 4, 9, 4  # τ = 1, h = 2: at step 4 the snapshot of step 3 is pending
  tx = streaming(m, compress.int4())  # the state holds Δ_i of the pending fragment
  A, b = wide_batches(steps, m)
  step = coopjax.make_step(wide_loss, tx, **NO_METRICS)
  X = coopjax.replicate(wide_init(), m)
  state = tx.init(X)
  batch = lambda k: (jnp.asarray(A[k]), jnp.asarray(b[k]))
  for k in range(cut):
    X, state, _ = step(X, state, batch(k))
  assert np.abs(np.asarray(state.pending)).max() > 0  # a fragment is in flight
  with checkpoint.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(cut, {"X": X, "opt_state": state}, force=True)
    mgr.wait_until_finished()
  for k in range(cut, steps):
    X, state, _ = step(X, state, batch(k))
  target = checkpoint.abstract_target({"X": X, "opt_state": state})
  with checkpoint.CheckpointManager(str(tmp_path)) as mgr:
    restored = mgr.restore(target=target)
  Xr, sr = restored["X"], restored["opt_state"]
  assert type(sr).__name__ == "StreamingDiLoCoState"
  for k in range(cut, steps):
    Xr, sr, _ = step(Xr, sr, batch(k))
  for a, c in zip(jax.tree.leaves((X, state)), jax.tree.leaves((Xr, sr)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_int4_outer_gradients_train_digits_within_one_percent():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
  import streaming as experiment

  cfg = dict(experiment.DEFAULTS, steps=100, hidden=(32,), lr=0.05)
  ds = coopjax.data.load_digits()
  floats = experiment.run_one("float", {"fragments": 2, "bits": 0}, cfg, ds)
  int4 = experiment.run_one("int4", {"fragments": 2, "bits": 4}, cfg, ds)
  assert floats["test_accuracy"] > 0.9
  assert abs(int4["test_accuracy"] - floats["test_accuracy"]) <= 0.01
  assert int4["bytes_sent"][-1] < 0.15 * floats["bytes_sent"][-1]


def test_mix_mask_keeps_leaves_out_of_every_fragment():
  """Leaves masked False (BatchNorm statistics) are in no fragment: they only take local steps."""
  m, H, delay, alpha, steps = 3, 6, 2, 0.5, 14
  A, b = ref.make_batches(steps, m, seed=53)

  def make(mask):
    return coopjax.streaming_diloco(
      optax.sgd(LR, momentum=BETA),
      outer=optax.sgd(OUTER_LR, momentum=MU, nesterov=True),
      H=H,
      fragments=1,
      delay=delay,
      alpha=alpha,
      num_workers=m,
      mix_mask=mask,
    )

  X, _ = ref.run(make({"w": True, "c": False}), A, b, m)
  xs, _, _ = streaming_reference(m, H, [[0, 1, 2]], delay, alpha, "torchft", A, b)
  np.testing.assert_allclose(ref.flat(X), xs, rtol=1e-5, atol=1e-6)
  # An all-True mask is no mask, bit for bit.
  X_all, _ = ref.run(make({"w": True, "c": True}), A, b, m)
  X_none, _ = ref.run(make(None), A, b, m)
  for a, c in zip(jax.tree.leaves(X_all), jax.tree.leaves(X_none), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match="selects no leaf"):
    coopjax.algorithms.fragment_leaves(ref.init_params(), 1, mix_mask={"w": False, "c": False})


@pytest.mark.parametrize("quantized", [False, True])
def test_growing_with_a_sync_in_flight_averages_the_kept_workers(quantized):
  # H = 4, P = 2, τ = 1 (torchft): fragment 1 ("b") is snapshotted at step 3, applied at 4.
  from coopjax import elastic

  make_tx = lambda m: coopjax.streaming_diloco(
    optax.sgd(0.1),
    outer=optax.sgd(0.7),
    H=4,
    fragments=2,
    delay=1,
    num_workers=m,
    compressor=compress.int4() if quantized else None,
    block_size=4,
  )
  loss = lambda p, t: jnp.sum((p["a"] - t) ** 2) + jnp.sum((p["b"] - 2 * t) ** 2)
  rng = np.random.default_rng(0)
  targets = [jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32)) for _ in range(4)]
  tx6, tx8 = make_tx(6), make_tx(8)
  X = coopjax.replicate({"a": jnp.ones(4), "b": jnp.ones(4)}, 6)
  state = tx6.init(X)
  step6 = coopjax.make_step(loss, tx6, log_every=1000)
  for k in range(3):
    X, state, _ = step6(X, state, targets[k][:6])
  pending6 = np.asarray(state.pending, np.float64)
  start = np.asarray(state.x_start["b"], np.float64)
  assert np.abs(pending6).min() > 0.01  # fragment "b" is in flight
  X8, state8 = elastic.resize(X, state, tx6, tx8)
  np.testing.assert_array_equal(np.asarray(state8.pending)[:6], pending6.astype(np.float32))
  np.testing.assert_allclose(
    np.asarray(state8.pending)[6:], np.tile(pending6.mean(0), (2, 1)), atol=1e-6
  )
  X8, state8, _ = coopjax.make_step(loss, tx8, log_every=1000)(X8, state8, targets[3])
  # outer SGD(0.7) on the mean over the six workers that took the snapshot
  delta = start - pending6.mean(0) if not quantized else pending6.mean(0)
  tol = 1e-5 if not quantized else 0.05 * np.abs(delta).max()  # int4: within a quantization step
  np.testing.assert_allclose(np.asarray(state8.x_start["b"]), start - 0.7 * delta, atol=tol)
  np.testing.assert_allclose(np.asarray(X8["b"]), np.tile(start - 0.7 * delta, (8, 1)), atol=tol)


@pytest.mark.parametrize("quantized", [False, True])
def test_rejoin_with_a_sync_in_flight_averages_the_live_snapshots(quantized):
  # MaxText schedule, H = 4, P = 2, τ = 1: fragment 0 ("a") is snapshotted at step 4 while
  # worker 1 is masked with a NaN model, and applied at step 5 after worker 1 rejoins.
  tx = coopjax.with_live_mask(
    coopjax.streaming_diloco(
      optax.sgd(0.1),
      outer=optax.sgd(0.7),
      H=4,
      fragments=2,
      delay=1,
      schedule="maxtext",
      num_workers=4,
      compressor=compress.int4() if quantized else None,
      block_size=4,
    )
  )
  loss = lambda p, t: jnp.sum((p["a"] - t) ** 2) + jnp.sum((p["b"] - 2 * t) ** 2)
  rng = np.random.default_rng(1)
  targets = [jnp.asarray(rng.normal(size=(4, 4)).astype(np.float32)) for _ in range(5)]
  step = coopjax.make_step(loss, tx, log_every=1000)
  X = coopjax.replicate({"a": jnp.ones(4), "b": jnp.ones(4)}, 4)
  state = coopjax.set_live(tx, tx.init(X), [True, False, True, True])
  X = jax.tree.map(lambda x: x.at[1].set(jnp.nan), X)
  for k in range(4):
    X, state, _ = step(X, state, targets[k])
  live = [0, 2, 3]
  pending = np.asarray(state.inner.pending, np.float64)
  start = np.asarray(state.inner.x_start["a"], np.float64)
  assert np.isnan(pending[1]).all() and np.isfinite(pending[live]).all()
  X, state = coopjax.rejoin(X, state, tx, np.array([False, True, False, False]))
  X, state, _ = step(X, state, targets[4])
  # outer SGD(0.7) on the mean over the three workers live at the snapshot
  delta = start - pending[live].mean(0) if not quantized else pending[live].mean(0)
  tol = 1e-5 if not quantized else 0.05 * np.abs(delta).max()  # int4: within a quantization step
  np.testing.assert_allclose(np.asarray(state.inner.x_start["a"]), start - 0.7 * delta, atol=tol)
  assert np.isfinite(np.asarray(X["a"])).all()


def test_a_count_above_the_synced_leaves_names_mix_mask():
  model = {"w": jnp.zeros(3), "c": jnp.zeros(()), "stats": jnp.zeros(2)}
  mask = {"w": True, "c": True, "stats": False}
  assert coopjax.algorithms.fragment_leaves(model, 2, mask) == [
    [2],
    [0],
  ]  # w | c (leaf order c, stats, w)
  with pytest.raises(ValueError, match=r"fragments=3 but mix_mask syncs only 2 of the model's 3"):
    coopjax.algorithms.fragment_leaves(model, 3, mask)
