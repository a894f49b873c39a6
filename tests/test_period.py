"""make_period_step equals τ calls of make_step; the communication patterns of a mix."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology

LR = 0.05
TAU = 3
SCHEDULE = optax.exponential_decay(0.08, transition_steps=2, decay_rate=0.7)

ALGORITHMS = {
  "local_sgd": (
    lambda m: coopjax.local_sgd(optax.sgd(LR, momentum=0.9), tau=TAU, num_workers=m),
    0,
  ),
  "easgd": (lambda m: coopjax.easgd(optax.sgd(LR), tau=TAU, alpha=0.1, num_workers=m), 1),
  "dpsgd_ring": (lambda m: coopjax.dpsgd(optax.sgd(LR), W=topology.ring(m)), 0),
  "nonblocking_easgd": (
    lambda m: coopjax.nonblocking_easgd(optax.sgd(LR), tau=TAU, alpha=0.1, num_workers=m),
    1,
  ),
  "overlap_local_sgd": (
    lambda m: coopjax.overlap_local_sgd(
      optax.sgd(SCHEDULE, momentum=0.9),
      tau=TAU,
      alpha=0.4,
      num_workers=m,
      anchor_momentum=0.5,
      lr=SCHEDULE,
    ),
    1,
  ),
  "delayed": (lambda m: coopjax.delayed(optax.sgd(LR), tau=TAU, W=topology.ring(m)), 0),
  "slowmo": (
    lambda m: coopjax.slowmo(
      optax.adam(0.02), tau=TAU, num_workers=m, alpha=0.8, beta=0.5, lr=SCHEDULE
    ),
    0,
  ),
  "diloco": (
    lambda m: coopjax.diloco(
      optax.adam(0.02), outer=optax.sgd(0.7, momentum=0.9, nesterov=True), tau=TAU, num_workers=m
    ),
    0,
  ),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_period_step_equals_tau_steps(name):
  m, periods = 4, 2
  make, v = ALGORITHMS[name]
  tx = make(m)
  A, b = ref.make_batches(TAU * periods, m, seed=51)
  X0 = coopjax.replicate(ref.init_params(), m, v)
  step = coopjax.make_step(ref.loss_fn, tx)
  X, state, metrics = X0, tx.init(X0), []
  for k in range(TAU * periods):
    X, state, met = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
    metrics.append(met)
  period = coopjax.make_period_step(ref.loss_fn, tx, tau=TAU)
  Xp, sp = X0, tx.init(X0)
  for p in range(periods):
    sl = slice(p * TAU, (p + 1) * TAU)
    Xp, sp, mp = period(Xp, sp, (jnp.asarray(A[sl]), jnp.asarray(b[sl])))
    for key in ("loss", "worker_loss", "step", "consensus_distance"):
      expect = np.stack([np.asarray(met[key]) for met in metrics[sl]])
      np.testing.assert_allclose(mp[key], expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref.flat(Xp), ref.flat(X), rtol=1e-5, atol=1e-6)
  for a, c in zip(jax.tree.leaves(sp), jax.tree.leaves(state), strict=True):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  assert int(coopjax.step_count(sp)) == TAU * periods
  # Something happened: the models left x_0.
  assert np.abs(ref.flat(Xp) - ref.flat(X0)).max() > 1e-3


def test_period_step_checks_shapes():
  m = 4
  tx = coopjax.local_sgd(optax.sgd(LR), tau=TAU, num_workers=m)
  X = coopjax.replicate(ref.init_params(), m)
  period = coopjax.make_period_step(ref.loss_fn, tx, tau=TAU)
  A, b = ref.make_batches(TAU + 1, m)
  with pytest.raises(ValueError, match="tau=3"):
    period(X, tx.init(X), (jnp.asarray(A), jnp.asarray(b)))
  with pytest.raises(ValueError, match="leading period axis"):
    period(X, tx.init(X), (jnp.asarray(A[:TAU]), jnp.asarray(b[0, 0])))
  with pytest.raises(ValueError, match="tau"):
    coopjax.make_period_step(ref.loss_fn, tx, tau=0)


def test_comm_patterns():
  m = 8
  sgd = optax.sgd(0.1)
  ring_allreduce = (2 * (m - 1) / m, 2 * (m - 1))
  blocking = {
    "sync_sgd": coopjax.sync_sgd(sgd, num_workers=m),
    "local_sgd": coopjax.local_sgd(sgd, tau=4, num_workers=m),
    "slowmo": coopjax.slowmo(sgd, tau=4, num_workers=m, alpha=1.0, beta=0.5, lr=0.1),
    "diloco": coopjax.diloco(sgd, outer=optax.sgd(0.7), tau=4, num_workers=m),
    "easgd": coopjax.easgd(sgd, tau=4, alpha=0.1, num_workers=m),
  }
  for name, tx in blocking.items():
    pat = coopjax.comm_pattern(tx)
    assert pat.collective == "all_reduce" and not pat.overlappable, name
    assert (pat.volume, pat.rounds) == ring_allreduce, name
  assert coopjax.comm_pattern(blocking["sync_sgd"]).period == 1
  for tx in (
    coopjax.nonblocking_easgd(sgd, tau=4, alpha=0.1, num_workers=m),
    coopjax.overlap_local_sgd(sgd, tau=4, alpha=0.5, num_workers=m),
  ):
    assert coopjax.comm_pattern(tx) == coopjax.CommPattern("all_reduce", *ring_allreduce, True, 4)
  # Delayed mixing: the snapshot's mix overlaps; its kind follows W.
  assert coopjax.comm_pattern(coopjax.delayed(sgd, tau=2, W=topology.complete(m))).collective == (
    "all_reduce"
  )
  ring = coopjax.comm_pattern(coopjax.delayed(sgd, tau=2, W=topology.ring(m)))
  assert ring == coopjax.CommPattern("neighbor_exchange", 2.0, 2, True, 2)
  # Neighbour counts from the graph: ring 2, 2-D torus 4, hypercube log2 m.
  for W, degree in ((topology.ring(m), 2), (topology.torus(4, 4), 4), (topology.hypercube(m), 3)):
    pat = coopjax.comm_pattern(coopjax.dpsgd(sgd, W=W))
    assert (pat.collective, pat.volume, pat.rounds, pat.overlappable, pat.period) == (
      "neighbor_exchange",
      degree,
      degree,
      False,
      1,
    )
  # EASGD as a cooperative matrix: workers pull only from the replicated anchor.
  pat = coopjax.comm_pattern(
    coopjax.cooperative(sgd, tau=2, W=topology.easgd(m, 0.1), num_aux=1, allow_negative=True)
  )
  assert (pat.collective, pat.volume) == ("all_reduce", ring_allreduce[0])
  with pytest.raises(TypeError, match="coopjax factory"):
    coopjax.comm_pattern(sgd)


def test_comm_per_step_follows_the_schedule():
  """``tx.comm(k, state)``: the mixing steps of every schedule, nothing in between."""
  m, sgd = 8, optax.sgd(0.1)
  local = coopjax.local_sgd(sgd, tau=4, num_workers=m)
  assert [local.comm(k).collective for k in range(1, 9)] == ["none"] * 3 + ["all_reduce"] + [
    "none"
  ] * 3 + ["all_reduce"]
  hier = coopjax.hierarchical(sgd, tau1=2, tau2=4, groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
  kinds = [hier.comm(k) for k in range(1, 5)]
  assert kinds[0] == kinds[2] == coopjax.cost.NO_COMM
  assert kinds[3].collective == "all_reduce" and kinds[1].collective == "neighbor_exchange"
  assert kinds[1].volume == 3.0  # a group of 4 spread over devices: 3 peers
  warm = coopjax.local_sgd(sgd, tau=4, num_workers=m, warmup_steps=3)
  assert [warm.comm(k).collective for k in range(1, 8)] == ["all_reduce"] * 3 + ["none"] * 3 + [
    "all_reduce"
  ]
  with pytest.raises(ValueError, match="state after step k"):
    coopjax.adacomm(sgd, tau0=2, num_workers=m, loss_estimate="worker_losses").comm(2, None)


def test_doctest():
  import doctest

  from coopjax import period

  result = doctest.testmod(period, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


SHARDED = {
  "nonblocking_easgd": (
    lambda m: coopjax.nonblocking_easgd(optax.sgd(LR), tau=TAU, alpha=0.05, num_workers=m),
    1,
  ),
  "overlap_local_sgd": (
    lambda m: coopjax.overlap_local_sgd(
      optax.sgd(LR), tau=TAU, alpha=0.3, num_workers=m, anchor_momentum=0.5, lr=SCHEDULE
    ),
    1,
  ),
  "delayed": (lambda m: coopjax.delayed(optax.sgd(LR), tau=TAU, W=topology.ring(m)), 0),
  "slowmo": (
    lambda m: coopjax.slowmo(
      optax.sgd(LR, momentum=0.9),
      tau=TAU,
      num_workers=m,
      alpha=0.8,
      beta=0.5,
      lr=SCHEDULE,
      base_buffers="average",
    ),
    0,
  ),
  "diloco": (
    lambda m: coopjax.diloco(
      optax.adam(0.02), outer=optax.sgd(0.7, momentum=0.9), tau=TAU, num_workers=m
    ),
    0,
  ),
}


@pytest.mark.parametrize("name", sorted(SHARDED))
def test_sharded_period_step_equals_unsharded_steps(name):
  """Workers sharded over 8 devices (2 per device): the same iterates as vmapped make_step."""
  from coopjax.parallel import sharding

  make, v = SHARDED[name]
  m, periods = 2 * len(jax.devices()), 2
  tx = make(m)
  A, b = ref.make_batches(TAU * periods, m, seed=52)
  X0 = coopjax.replicate(ref.init_params(), m, v)
  step = coopjax.make_step(ref.loss_fn, tx)
  X, state = X0, tx.init(X0)
  for k in range(TAU * periods):
    X, state, _ = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
  mesh = sharding.worker_mesh()
  Xs = sharding.shard(X0, mesh, v)
  ss = sharding.init(tx, Xs, mesh, v)
  period = coopjax.make_period_step(ref.loss_fn, tx, mesh)
  for p in range(periods):
    sl = slice(p * TAU, (p + 1) * TAU)
    Xs, ss, _ = period(Xs, ss, (jnp.asarray(A[sl]), jnp.asarray(b[sl])))
    jax.block_until_ready(Xs)  # fake CPU devices: do not queue collectives unboundedly
  np.testing.assert_allclose(
    ref.flat(sharding.unshard(Xs, mesh, v)), ref.flat(X), rtol=1e-5, atol=1e-6
  )
