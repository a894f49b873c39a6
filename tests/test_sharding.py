"""The sharded worker axis against the NumPy references, on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from jax.sharding import PartitionSpec as P

import coopjax
from coopjax import mixing
from coopjax import topology
from coopjax.parallel import collectives
from coopjax.parallel import sharding

LR = 0.05
D = 8


@pytest.fixture(scope="module")
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:D]), (coopjax.WORKER_AXIS,))


def run_sharded(tx, mesh, m, v, steps, seed=0, **step_kwargs):
  A, b = ref.make_batches(steps, m, seed=seed)
  x0 = ref.init_params()
  X = coopjax.shard(coopjax.replicate(x0, m, v), mesh, v)
  state = sharding.init(tx, X, mesh, v)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh, **step_kwargs)
  metrics = []
  for k in range(steps):
    X, state, met = step(X, state, coopjax.shard_batch((A[k], b[k]), mesh))
    jax.block_until_ready(X)  # fake CPU devices deadlock on unblocked loops
    metrics.append(met)
  return X, state, metrics, (A, b, x0)


def reference_rows(W, tau, A, b, x0, v, order="step_then_mix"):
  x = ref.flat(coopjax.replicate(x0, 1))[0]
  X, _ = ref.cooperative_reference(x, W, tau, LR, A, b, num_aux=v, order=order)
  return X


def case(name, m, order="step_then_mix"):
  """(transformation, W, v, tau) for each algorithm of the framework."""
  kw = {"order": order}
  if name == "sync":
    return coopjax.sync_sgd(optax.sgd(LR), num_workers=m, **kw), topology.complete(m), 0, 1
  if name == "pasgd":
    return coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=m, **kw), topology.complete(m), 0, 2
  if name == "easgd":
    alpha = 0.9 / m
    return (
      coopjax.easgd(optax.sgd(LR), tau=2, alpha=alpha, num_workers=m, **kw),
      topology.easgd(m, alpha),
      1,
      2,
    )
  W = {
    "ring": topology.ring(m),
    "torus": topology.torus(4, m // 4),
    "exponential": topology.exponential(m),
  }[name]
  return coopjax.dpsgd(optax.sgd(LR), W=W, **kw), W, 0, 1


@pytest.mark.parametrize("m", [8, 16, 32])
@pytest.mark.parametrize("name", ["sync", "pasgd", "easgd", "ring", "torus", "exponential"])
def test_sharded_equals_reference(mesh, name, m):
  tx, W, v, tau = case(name, m)
  X, state, metrics, (A, b, x0) = run_sharded(tx, mesh, m, v, steps=5)
  expected = reference_rows(W, tau, A, b, x0, v)
  got = ref.flat(coopjax.unshard(X, mesh, v))
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
  assert int(coopjax.step_count(state)) == 5
  assert metrics[-1]["worker_loss"].shape == (m,)


@pytest.mark.parametrize("name", ["pasgd", "easgd", "ring"])
def test_mix_then_step_sharded(mesh, name):
  m = 16
  tx, W, v, tau = case(name, m, order="mix_then_step")
  X, _, _, (A, b, x0) = run_sharded(tx, mesh, m, v, steps=4, seed=2)
  expected = reference_rows(W, tau, A, b, x0, v, order="mix_then_step")
  np.testing.assert_allclose(ref.flat(coopjax.unshard(X, mesh, v)), expected, rtol=2e-5, atol=2e-6)


def test_explicit_mesh_from_make_mesh():
  mesh = jax.make_mesh((D,), (coopjax.WORKER_AXIS,))  # Explicit axis types in jax 0.10
  m = 16
  tx, W, v, tau = case("ring", m)
  X, _, _, (A, b, x0) = run_sharded(tx, mesh, m, v, steps=3)
  expected = reference_rows(W, tau, A, b, x0, v)
  np.testing.assert_allclose(ref.flat(coopjax.unshard(X, mesh, v)), expected, rtol=2e-5, atol=2e-6)


def test_momentum_state_sharded_and_metrics_match_unsharded(mesh):
  m = 16
  local = optax.sgd(LR, momentum=0.9)
  tx = coopjax.cooperative(local, tau=2, W=topology.ring(m), local_state_policy="mix")
  X, state, metrics, (A, b, x0) = run_sharded(
    tx, mesh, m, 0, steps=4, with_loss=True, with_consensus=True, with_grad_norm=True, log_every=1
  )
  # The unsharded dense-einsum path is the reference for the momentum variant.
  Xu = coopjax.replicate(x0, m)
  su = tx.init(Xu)
  step = coopjax.make_step(ref.loss_fn, tx)
  for k in range(4):
    Xu, su, mu = step(Xu, su, (jnp.asarray(A[k]), jnp.asarray(b[k])))
  np.testing.assert_allclose(ref.flat(X), ref.flat(Xu), rtol=2e-5, atol=2e-6)
  trace = jax.tree.leaves(coopjax.algorithms.find_state(state).local_state)
  trace_u = jax.tree.leaves(coopjax.algorithms.find_state(su).local_state)
  for a, c in zip(trace, trace_u, strict=True):
    assert a.sharding.spec == P(coopjax.WORKER_AXIS)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=2e-5, atol=2e-6)
  assert coopjax.algorithms.find_state(state).count.sharding.is_fully_replicated
  for key in ("loss", "consensus_distance", "avg_grad_norm"):
    np.testing.assert_allclose(float(metrics[-1][key]), float(mu[key]), rtol=1e-4, atol=1e-6)


def test_shard_layout_and_roundtrip(mesh):
  m, v = 16, 1
  rows = np.arange((m + v) * 2, dtype=np.float32).reshape(m + v, 2)
  Xs = coopjax.shard({"w": rows}, mesh, num_aux=v)
  b = m // D
  expected = np.concatenate(
    [np.concatenate([rows[d * b : (d + 1) * b], rows[m:]]) for d in range(D)]
  )
  np.testing.assert_array_equal(np.asarray(Xs["w"]), expected)
  assert Xs["w"].sharding.spec == P(coopjax.WORKER_AXIS)
  np.testing.assert_array_equal(np.asarray(coopjax.unshard(Xs, mesh, v)["w"]), rows)


def apply_sharded(mesh, fn, X, m, v=0):
  """Runs fn on the local block of every device under a ShardContext; returns global rows."""
  ctx = mixing.ShardContext(coopjax.WORKER_AXIS, D, m, v)

  def body(x):
    with mixing.sharded(ctx):
      return fn(x)

  out = jax.jit(
    jax.shard_map(
      body, mesh=mesh, in_specs=P(coopjax.WORKER_AXIS), out_specs=P(coopjax.WORKER_AXIS)
    )
  )(coopjax.shard(X, mesh, v))
  return coopjax.unshard(out, mesh, v)


def random_rows(n, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "a": rng.normal(size=(n, 3)).astype(np.float32),
    "b": rng.normal(size=(n,)).astype(np.float32),
  }


def dense_symmetric(m, seed=0):
  """A dense symmetric doubly stochastic matrix: complete graph minus a perfect matching."""
  adj = np.ones((m, m), bool)
  for i in range(0, m, 2):
    adj[i, i + 1] = adj[i + 1, i] = False
  return topology.metropolis_hastings(adj)


W_CASES = {
  "ring": lambda m: topology.ring(m),
  "hypercube": lambda m: topology.hypercube(m),
  "erdos_renyi": lambda m: topology.erdos_renyi(m, 0.4, seed=0),
  "dense": lambda m: dense_symmetric(m),
  "lazy_J": lambda m: 0.5 * np.eye(m) + 0.5 * topology.complete(m),
}


@pytest.mark.parametrize("m", [8, 16])
@pytest.mark.parametrize("name", sorted(W_CASES))
def test_lowered_mixer_equals_numpy(mesh, name, m):
  W = W_CASES[name](m)
  X = random_rows(m, seed=m)
  out = apply_sharded(mesh, mixing.dense_mixer(W), X, m)
  for key in X:
    expected = np.einsum("ji,j...->i...", W, X[key].astype(np.float64))
    np.testing.assert_allclose(np.asarray(out[key]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "W_fn",
  [
    lambda m: topology.easgd(m, 0.05),
    lambda m: topology.elastic(topology.ring(m), 0.05),
    lambda m: topology.elastic(topology.complete(m), 0.05),
    lambda m: topology.elastic_hierarchical([list(range(0, m, 2)), list(range(1, m, 2))], 0.1),
  ],
  ids=["easgd", "elastic_ring", "elastic_J", "hierarchical"],
)
def test_lowered_mixer_with_auxiliaries(mesh, W_fn):
  m = 16
  W = W_fn(m)
  v = W.shape[0] - m
  X = random_rows(m + v, seed=3)
  out = apply_sharded(mesh, mixing.dense_mixer(W), X, m, v)
  gathered = apply_sharded(mesh, lambda x: mixing.mix_dense(x, jnp.asarray(W)), X, m, v)
  for key in X:
    expected = np.einsum("ji,j...->i...", W, X[key].astype(np.float64))
    np.testing.assert_allclose(np.asarray(out[key]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gathered[key]), expected, rtol=1e-5, atol=1e-6)


def test_primitives_sharded(mesh):
  m = 16
  X = random_rows(m, seed=5)
  perm = np.random.default_rng(0).permutation(m)
  groups = [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15]]
  got = apply_sharded(mesh, lambda x: mixing.permute(x, perm), X, m)
  np.testing.assert_array_equal(np.asarray(got["a"]), X["a"][perm])
  got = apply_sharded(mesh, lambda x: mixing.group_mean(x, groups), X, m)
  for g in groups:
    np.testing.assert_allclose(
      np.asarray(got["a"])[g], np.tile(X["a"][g].mean(0), (len(g), 1)), rtol=1e-5, atol=1e-6
    )
  got = apply_sharded(
    mesh,
    lambda x: jax.tree.map(lambda s, y: jnp.broadcast_to(s, y.shape), mixing.worker_mean(x), x),
    X,
    m,
  )
  np.testing.assert_allclose(
    np.asarray(got["a"]), np.tile(X["a"].mean(0), (m, 1)), rtol=1e-5, atol=1e-6
  )
  got = apply_sharded(
    mesh,
    lambda x: jax.tree.map(lambda s, y: jnp.broadcast_to(s, y.shape), mixing.worker_sum(x), x),
    X,
    m,
  )
  np.testing.assert_allclose(np.asarray(got["b"]), np.full(m, X["b"].sum()), rtol=1e-5, atol=1e-5)


def test_plan_kinds():
  ctx = mixing.ShardContext(coopjax.WORKER_AXIS, D, 16, 0)
  ring = collectives.worker_plan(topology.ring(16), ctx)
  assert ring.kind == "permute" and ring.rows_sent == 2 and len(ring.offsets) == 2
  assert collectives.plan_kind(topology.complete(16), ctx) == "allreduce"
  assert collectives.plan_kind(dense_symmetric(16), ctx) == "gather"
  assert collectives.plan_kind(topology.easgd(16, 0.05), ctx._replace(num_aux=1)) == "diagonal"
  # Groups inside one device (b = 2) need no traffic at all.
  local = collectives.worker_plan(np.kron(np.eye(8), np.full((2, 2), 0.5)), ctx)
  assert local.kind == "permute" and local.rows_sent == 0


def test_errors(mesh):
  tx = coopjax.local_sgd(optax.sgd(LR), tau=2, num_workers=12)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  X = coopjax.replicate(ref.init_params(), 12)
  A, b = ref.make_batches(1, 12)
  with pytest.raises(ValueError, match="multiple of 8"):
    step(X, tx.init(X), (A[0], b[0]))
  with pytest.raises(ValueError, match="multiple"):
    coopjax.shard(X, mesh)
  other = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  with pytest.raises(ValueError, match="workers"):
    coopjax.make_step(ref.loss_fn, tx, mesh=other)


# AdaComm's fixed evaluation batch (the averaged model's loss is evaluated on it).
ADACOMM_EVAL = tuple(jnp.asarray(x[0, 0]) for x in ref.make_batches(1, 1, batch=6, seed=9))

OTHER_ALGORITHMS = {
  "hierarchical": lambda m: (
    coopjax.hierarchical(
      optax.sgd(LR), tau1=2, tau2=4, groups=[list(range(i, i + 4)) for i in range(0, m, 4)]
    ),
    0,
  ),
  "slowmo": lambda m: (
    coopjax.slowmo(optax.sgd(LR), tau=2, num_workers=m, alpha=1.0, beta=0.5, lr=LR),
    0,
  ),
  "nonblocking_easgd": lambda m: (
    coopjax.nonblocking_easgd(optax.sgd(LR), tau=2, alpha=0.05, num_workers=m),
    1,
  ),
  "matcha": lambda m: (
    coopjax.matcha(
      optax.sgd(LR), graph=topology.ring(m), budget=0.5, num_workers=m, key=jax.random.key(0)
    ),
    0,
  ),
  "one_peer_exponential": lambda m: (
    coopjax.time_varying(
      optax.sgd(LR), tau=1, schedule=[topology.one_peer_exponential(m, r) for r in range(4)]
    ),
    0,
  ),
  "adacomm": lambda m: (
    coopjax.adacomm(
      optax.sgd(LR), tau0=2, num_workers=m, loss_fn=ref.loss_fn, eval_batch=ADACOMM_EVAL
    ),
    0,
  ),
  "adacomm_worker_losses": lambda m: (
    coopjax.adacomm(optax.sgd(LR), tau0=2, num_workers=m, loss_estimate="worker_losses"),
    0,
  ),
  "elastic_averaging": lambda m: (
    coopjax.elastic_averaging(optax.sgd(LR), W=topology.ring(m), alpha=0.05, tau=2),
    1,
  ),
  "elastic_hierarchical": lambda m: (
    coopjax.elastic_hierarchical(
      optax.sgd(LR), tau=2, groups=[list(range(i, i + 4)) for i in range(0, m, 4)], alpha=0.1
    ),
    m // 4,
  ),
}


@pytest.mark.parametrize("name", sorted(OTHER_ALGORITHMS))
def test_other_algorithms_sharded_equal_unsharded(mesh, name):
  """Algorithms built on the mixing primitives run sharded unchanged (dense path as reference)."""
  m = 16
  tx, v = OTHER_ALGORITHMS[name](m)
  X, _, _, (A, b, x0) = run_sharded(tx, mesh, m, v, steps=5)
  Xu = coopjax.replicate(x0, m, v)
  su = tx.init(Xu)
  step = coopjax.make_step(ref.loss_fn, tx)
  for k in range(5):
    Xu, su, _ = step(Xu, su, (jnp.asarray(A[k]), jnp.asarray(b[k])))
  np.testing.assert_allclose(
    ref.flat(coopjax.unshard(X, mesh, v)), ref.flat(Xu), rtol=2e-5, atol=2e-6
  )
