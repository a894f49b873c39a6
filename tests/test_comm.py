"""comm_report: the collectives of compiled sharded steps, read from the HLO."""

import doctest

import jax
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology
from coopjax.cost import report as comm
from coopjax.parallel import sharding

D = 8
ROW_BYTES = 4 * (ref.D + 1)  # one worker's model: w (D floats) and c, float32


@pytest.fixture(scope="module")
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:D]), (coopjax.WORKER_AXIS,))


def report(tx, mesh, m, v=0, **kwargs):
  X = coopjax.shard(coopjax.replicate(ref.init_params(), m, v), mesh, v)
  state = sharding.init(tx, X, mesh, v)
  A, b = ref.make_batches(1, m)
  # The mixing's collectives alone: the reducing metrics (on by default) are tested below.
  kwargs = dict(with_loss=False, with_consensus=False, with_grad_norm=False) | kwargs
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh, **kwargs)
  return coopjax.comm_report(step, X, state, coopjax.shard_batch((A[0], b[0]), mesh))


@pytest.mark.parametrize("m", [8, 32])
def test_ring_is_collective_permutes_of_boundary_rows(mesh, m):
  rep = report(coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(m)), mesh, m)
  assert rep and set(rep.kinds()) == {"collective-permute"}
  assert all(c.in_branch for c in rep)
  # One row to each neighbouring device: with b = m/D rows per device that is 2 rows,
  # i.e. 2x the per-device block when b = 1.
  assert rep.total_bytes == 2 * ROW_BYTES
  if m == D:
    assert rep.total_bytes == 2 * (m // D) * ROW_BYTES


@pytest.mark.parametrize("order", ["step_then_mix", "mix_then_step"])
def test_full_averaging_is_one_all_reduce_in_branch(mesh, order):
  m = 16
  rep = report(coopjax.local_sgd(optax.sgd(0.1), tau=4, num_workers=m, order=order), mesh, m)
  assert set(rep.kinds()) == {"all-reduce"}
  assert rep.total_bytes == ROW_BYTES  # the local sums of one model, reduced once
  assert all(c.in_branch for c in rep) and not rep.every_step()


@pytest.mark.parametrize(
  "name, order",
  [(n, "step_then_mix") for n in ["ring", "torus", "exponential", "hypercube", "pasgd"]]
  + [(n, o) for n in ["easgd", "time_varying"] for o in ["step_then_mix", "mix_then_step"]],
)
def test_no_collective_off_step_and_no_all_gather(mesh, name, order):
  m = 16
  v = 0
  if name == "easgd":
    tx, v = coopjax.easgd(optax.sgd(0.1), tau=2, alpha=0.05, num_workers=m, order=order), 1
  elif name == "pasgd":
    tx = coopjax.local_sgd(optax.sgd(0.1), tau=3, num_workers=m, order=order)
  elif name == "time_varying":
    Ws = [topology.ring(m), topology.hypercube(m)]
    tx = coopjax.time_varying(optax.sgd(0.1), tau=1, schedule=Ws, order=order)
  else:
    W = {
      "ring": topology.ring(m),
      "torus": topology.torus(4, 4),
      "exponential": topology.exponential(m),
      "hypercube": topology.hypercube(m),
    }[name]
    tx = coopjax.cooperative(optax.sgd(0.1), tau=2, W=W, order=order)
  rep = report(tx, mesh, m, v)
  assert rep, "a mixing algorithm must communicate"
  assert not rep.every_step(), str(rep)
  assert "all-gather" not in rep.kinds()
  if name == "easgd":
    assert set(rep.kinds()) == {"all-reduce"}
    assert rep.total_bytes == v * ROW_BYTES  # the workers' sum into the anchor
  elif name != "pasgd":
    assert set(rep.kinds()) == {"collective-permute"}


def test_orders_use_the_same_collectives(mesh):
  m = 16
  for make in (
    lambda o: coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(m), order=o),
    lambda o: coopjax.cooperative(optax.sgd(0.1), tau=2, W=topology.exponential(m), order=o),
  ):
    a = report(make("step_then_mix"), mesh, m)
    b = report(make("mix_then_step"), mesh, m)
    assert sorted((c.kind, c.bytes) for c in a) == sorted((c.kind, c.bytes) for c in b)


def test_dense_fallback_is_the_only_all_gather(mesh):
  m = 16
  adj = np.ones((m, m), bool)
  for i in range(0, m, 2):
    adj[i, i + 1] = adj[i + 1, i] = False
  W = topology.metropolis_hastings(adj)
  rep = report(coopjax.cooperative(optax.sgd(0.1), tau=2, W=W), mesh, m)
  assert "all-gather" in rep.kinds() and all(c.in_branch for c in rep)
  gathers = [c for c in rep if c.kind == "all-gather"]
  # Each device contributes its block of b rows; the result holds all m rows.
  assert sum(c.bytes for c in gathers) == (m // D) * ROW_BYTES
  assert sum(c.result_bytes for c in gathers) == m * ROW_BYTES


def test_metrics_that_reduce_run_every_step_with_log_every_1(mesh):
  m = 16
  tx = coopjax.local_sgd(optax.sgd(0.1), tau=4, num_workers=m)
  rep = report(tx, mesh, m, with_loss=True, with_consensus=True, log_every=1)
  assert rep.every_step() and set(rep.every_step().kinds()) == {"all-reduce"}


def test_by_default_with_a_mesh_no_metric_reduces_every_step(mesh):
  # The default log_every with a mesh (MESH_LOG_EVERY) puts the metrics' all-reduces
  # under a cond: the off-steps of local SGD carry no collective at all.
  m = 16
  tx = coopjax.local_sgd(optax.sgd(0.1), tau=4, num_workers=m)
  rep = report(tx, mesh, m, with_loss=True, with_consensus=True)
  assert not rep.every_step()
  assert len([c for c in rep if c.kind == "all-reduce"]) > 1  # the mix plus the metrics


def test_unsharded_step_has_no_collectives():
  m = 4
  tx = coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(m))
  X = coopjax.replicate(ref.init_params(), m)
  A, b = ref.make_batches(1, m)
  step = coopjax.make_step(ref.loss_fn, tx)
  assert len(coopjax.comm_report(step, X, tx.init(X), (A[0], b[0]))) == 0


SYNTHETIC = """
HloModule m

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

%branch_mix (t: (f32[2,3], bf16[5])) -> (f32[2,3], bf16[5]) {
  %t = (f32[2,3]{1,0}, bf16[5]{0}) parameter(0)
  %x = f32[2,3]{1,0} get-tuple-element(%t), index=0
  %y = bf16[5]{0} get-tuple-element(%t), index=1
  %ar = (f32[2,3]{1,0}, bf16[5]{0}) all-reduce(%x, %y), replica_groups={{0,1}}, to_apply=%sum
  %ag-start = (f32[2,3]{1,0}, f32[4,3]{1,0}) all-gather-start(%x), dimensions={0}
  %ag-done = f32[4,3]{1,0} all-gather-done(%ag-start)
  %inner = f32[2,3]{1,0} fusion(%x), kind=kLoop, calls=%fused
  ROOT %r = (f32[2,3]{1,0}, bf16[5]{0}) tuple(%inner, %y)
}

%fused (p: f32[2,3]) -> f32[2,3] {
  %p = f32[2,3]{1,0} parameter(0)
  ROOT %cp = f32[2,3]{1,0} collective-permute(%p), source_target_pairs={{0,1},{1,0}}
}

%branch_skip (s: (f32[2,3], bf16[5])) -> (f32[2,3], bf16[5]) {
  ROOT %s = (f32[2,3]{1,0}, bf16[5]{0}) parameter(0)
}

ENTRY %main (x: f32[2,3], y: bf16[5], k: s32[]) -> (f32[2,3], bf16[5]) {
  %x = f32[2,3]{1,0} parameter(0)
  %y = bf16[5]{0} parameter(1)
  %k = s32[] parameter(2)
  %every = f32[2,3]{1,0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%sum
  %t = (f32[2,3]{1,0}, bf16[5]{0}) tuple(%every, %y)
  ROOT %c = (f32[2,3]{1,0}, bf16[5]{0}) conditional(%k, %t, %t), branch_computations={%branch_skip, %branch_mix}
}
"""


def test_parse_hlo_synthetic():
  rep = comm.parse_hlo(SYNTHETIC)
  by_name = {c.name: c for c in rep}
  assert set(by_name) == {"ar", "ag-start", "cp", "every"}
  assert by_name["ar"].kind == "all-reduce" and by_name["ar"].bytes == 6 * 4 + 5 * 2
  assert by_name["ag-start"].kind == "all-gather" and by_name["ag-start"].bytes == 24
  assert by_name["cp"].in_branch and by_name["cp"].branch == 1  # through a fusion's calls=
  assert by_name["ar"].conditional == "c"
  assert not by_name["every"].in_branch and by_name["every"].bytes == 24
  assert [c.name for c in rep.every_step()] == ["every"]
  assert "NO" in rep.table() and "collective-permute" in str(rep)


def test_doctests():
  for mod in (comm, sharding):
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_every_algorithm_compiles_to_the_collectives_it_had():
  """Kinds, branches and bytes of the 16 algorithms' collectives, against the table that the
  implementation before the common mixing interface produced (``tests/comm_table.py``)."""
  import json
  import os

  import comm_table

  with open(os.path.join(os.path.dirname(__file__), "data", "comm_before.json")) as f:
    before = json.load(f)
  assert comm_table.table() == before


def test_bucketing_one_collective_per_neighbour_offset(mesh):
  """A 12-leaf model on a ring: the mix packs the leaves, 2 collective-permutes, not 24."""
  m = 8
  params = {
    f"layer{i}": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)}
    for i in range(6)
  }
  model_bytes = 6 * 4 * (3 * 2 + 2)
  tx = coopjax.dpsgd(optax.sgd(0.1), W=topology.ring(m))
  X = coopjax.shard(coopjax.replicate(params, m), mesh)
  state = sharding.init(tx, X, mesh)
  loss = lambda p, x: sum(
    jax.numpy.sum(l["kernel"]) * x + jax.numpy.sum(l["bias"]) for l in p.values()
  )
  step = coopjax.make_step(
    loss, tx, mesh=mesh, with_loss=False, with_consensus=False, with_grad_norm=False
  )
  rep = coopjax.comm_report(step, X, state, coopjax.shard_batch(np.ones(m, np.float32), mesh))
  permutes = [c for c in rep if c.kind == "collective-permute"]
  assert len(permutes) == 2 and all(c.in_branch for c in permutes)
  assert sum(c.bytes for c in permutes) == 2 * model_bytes
  # EASGD: the anchor's reduction of a 12-leaf model is one all-reduce.
  tx = coopjax.easgd(optax.sgd(0.1), tau=2, alpha=0.1, num_workers=m)
  X = coopjax.shard(coopjax.replicate(params, m, 1), mesh, 1)
  state = sharding.init(tx, X, mesh, 1)
  step = coopjax.make_step(
    loss, tx, mesh=mesh, with_loss=False, with_consensus=False, with_grad_norm=False
  )
  rep = coopjax.comm_report(step, X, state, coopjax.shard_batch(np.ones(m, np.float32), mesh))
  assert [c.kind for c in rep] == ["all-reduce"] and rep[0].bytes == model_bytes


def test_group_mean_sends_only_to_the_devices_that_read(mesh):
  """Pairs of workers on neighbouring devices: each collective-permute has D/2 pairs, not D."""
  import re

  from jax.sharding import PartitionSpec as P

  from coopjax import mixing
  from coopjax.parallel.context import ShardContext
  from coopjax.parallel.context import sharded

  m = D
  groups = [[i, i + 1] for i in range(0, m, 2)]
  ctx = ShardContext(coopjax.WORKER_AXIS, D, m, 0)

  def body(x):
    with sharded(ctx):
      return mixing.Mix.groups(groups)({"w": x})["w"]

  f = jax.jit(
    jax.shard_map(
      body, mesh=mesh, in_specs=P(coopjax.WORKER_AXIS), out_specs=P(coopjax.WORKER_AXIS)
    )
  )
  x = np.arange(m, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(f(x)), np.repeat(x.reshape(-1, 2).mean(1), 2))
  text = f.lower(x).compile().as_text()
  pairs = re.findall(r"source_target_pairs=\{((?:\{\d+,\d+\},?)+)\}", text)
  assert len(pairs) == 2
  assert all(p.count("{") == D // 2 for p in pairs), pairs
