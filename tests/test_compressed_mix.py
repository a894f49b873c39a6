"""Compressed mixes inside a sharded step: only payloads travel, and the result equals the dense
reference ``Mix.exchange`` (unsharded) for every lowering, compressor and mask.

The compressors are written here (small, with the wire formats the tests look for): top-k with
int32 indices, random-k whose receiver regenerates the indices from the sender's key, a 4-bit
quantizer packed two values per uint8 byte, and payloads in float8 / int4 (which a naive
collective would widen to f16 / s8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import coopjax
from coopjax import compress
from coopjax import mixing
from coopjax import topology
from coopjax.cost import netmodel
from coopjax.cost import pattern
from coopjax.cost import report as comm
from coopjax.parallel import collectives
from coopjax.parallel.context import ShardContext
from coopjax.parallel.context import sharded

D = 8
AXIS = coopjax.WORKER_AXIS


# ---------------------------------------------------------------- test compressors


def _size(like) -> int:
  return int(np.prod(like.shape, dtype=np.int64))


def top_k(fraction: float) -> compress.Compressor:
  """The k = max(1, ⌊d·fraction⌋) largest |x_j|: float32 values and int32 indices."""

  def encode(x, key):
    flat = x.reshape(-1)
    k = max(1, int(flat.size * fraction))
    _, idx = lax.top_k(jnp.abs(flat), k)
    return {"values": flat[idx], "indices": idx.astype(jnp.int32)}

  def decode(p, like, key):
    out = jnp.zeros(_size(like), like.dtype).at[p["indices"]].set(p["values"].astype(like.dtype))
    return out.reshape(like.shape)

  return compress.Compressor(f"top_k({fraction})", encode, decode)


def random_k(fraction: float) -> compress.Compressor:
  """k coordinates drawn from the message key; only the values travel."""

  def indices(size, key):  # k distinct coordinates from a start drawn from the key
    start = jax.random.bits(key, dtype=jnp.uint32) % jnp.uint32(size)
    return ((start + jnp.arange(max(1, int(size * fraction)), dtype=jnp.uint32)) % size).astype(
      jnp.int32
    )

  def encode(x, key):
    flat = x.reshape(-1)
    return flat[indices(flat.size, key)]

  def decode(values, like, key):
    idx = indices(_size(like), key)
    return jnp.zeros(_size(like), like.dtype).at[idx].set(values).reshape(like.shape)

  return compress.Compressor(f"random_k({fraction})", encode, decode)


def four_bit() -> compress.Compressor:
  """Absmax scale s = max|x|/7, q = round(x/s) + 8 in [1, 15], two values per uint8 byte."""

  def encode(x, key):
    flat = x.reshape(-1).astype(jnp.float32)
    scale = jnp.max(jnp.abs(flat)) / 7.0
    q = jnp.clip(jnp.round(flat / jnp.where(scale > 0, scale, 1.0)), -7, 7).astype(jnp.uint8) + 8
    if flat.size % 2:
      q = jnp.concatenate([q, jnp.zeros(1, jnp.uint8)])
    return {"scale": scale, "bits": q[0::2] | (q[1::2] << 4)}

  def decode(p, like, key):
    bits = p["bits"]
    q = jnp.stack([bits & 15, bits >> 4], axis=-1).reshape(-1)[: _size(like)]
    return ((q.astype(jnp.float32) - 8.0) * p["scale"]).astype(like.dtype).reshape(like.shape)

  return compress.Compressor("four_bit", encode, decode)


def cast(dtype) -> compress.Compressor:
  """The message cast to ``dtype`` (float8, int4 …): what a naive quantizer sends."""

  def encode(x, key):
    return x.astype(dtype)

  def decode(p, like, key):
    return p.astype(like.dtype)

  return compress.Compressor(f"cast({jnp.dtype(dtype).name})", encode, decode)


COMPRESSORS = {
  "identity": compress.identity(),
  "top_k": top_k(0.2),
  "random_k": random_k(0.3),
  "four_bit": four_bit(),
  "float8": cast(jnp.float8_e4m3fn),
  # The library's compressors (coopjax.compress).
  "qsgd": compress.qsgd(4),
  "int4": compress.int4(),
  "lib_random_k": compress.random_k(fraction=0.25, unbiased=True),
  "scaled_sign": compress.scaled_sign(),
}


# ---------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:D]), (AXIS,))


def _tree(m, v, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "a": jax.random.normal(k1, (m + v, 3, 5), jnp.float32),
    "b": jax.random.normal(k2, (m + v,), jnp.float32),
  }


def _sharded_exchange(mesh, mix, X, names, step=3):
  """(own, mixed) per compressor, computed inside one jitted shard_map; local blocks as
  ``[D, b + v, ...]`` per leaf."""
  m, v = mix.num_workers, mix.num_rows - mix.num_workers
  ctx = ShardContext(AXIS, D, m, v)
  key = jax.random.key(11)

  def body(x, k):
    with sharded(ctx):
      return [mix.exchange(x, COMPRESSORS[n], key, k) for n in names]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS)))
  out = f(coopjax.shard(X, mesh, num_aux=v), jnp.int32(step))
  blocks = jax.tree.map(lambda y: np.asarray(y).reshape((D, -1) + y.shape[1:]), out)
  dense = jax.jit(lambda X: [mix.exchange(X, COMPRESSORS[n], key, step) for n in names])(X)
  return blocks, dense


def _check(blocks, dense, m, v, W, exact_own=True, mixed_leaves=("a", "b")):
  b = m // D
  for (own_s, mixed_s), (own_d, mixed_d) in zip(blocks, dense, strict=True):
    for got, want, exact in ((own_s, own_d, exact_own), (mixed_s, mixed_d, False)):
      for name in want:
        g, w = got[name], np.asarray(want[name])
        workers = g[:, :b].reshape((m,) + w.shape[1:])
        if exact:
          np.testing.assert_array_equal(workers, w[:m])
        else:
          np.testing.assert_allclose(workers, w[:m], rtol=2e-6, atol=2e-6)
        for d in range(D):  # every device's copy of the auxiliary rows
          np.testing.assert_allclose(g[d, b:], w[m:], rtol=2e-6, atol=2e-6)
    # The dense reference itself: mixed = Wᵀ·own, in float64 with NumPy.
    for name in mixed_leaves:
      q = np.asarray(own_d[name], np.float64).reshape(m + v, -1)
      want = (np.asarray(W, np.float64).T @ q).reshape(np.shape(mixed_d[name]))
      np.testing.assert_allclose(np.asarray(mixed_d[name]), want, rtol=1e-5, atol=1e-5)


def _random_stochastic(n, seed, zero_frac=0.0):
  rng = np.random.default_rng(seed)
  A = rng.random((n, n)) * (rng.random((n, n)) >= zero_frac)
  A += np.eye(n)
  return A / A.sum(axis=0, keepdims=True)


def _ring_with_pull(m, alpha):
  """A ring whose workers also read a replicated auxiliary row (not fed by them)."""
  W = np.zeros((m + 1, m + 1))
  W[:m, :m] = (1 - alpha) * topology.ring(m)
  W[m, :m] = alpha
  W[m, m] = 1.0
  return W


def _diagonal_with_pull(m, alpha):
  W = np.zeros((m + 1, m + 1))
  W[:m, :m] = np.diag(np.linspace(0.5, 1.0, m)) * (1 - alpha)
  W[m, :m] = alpha
  W[m, m] = 1.0
  return W


ALL = ["identity", "top_k", "random_k", "four_bit"]
KEYED = ["top_k", "random_k"]  # a deterministic and a keyed compressor
CASES = {
  # name: (W, m, v, expected exchange kind, compressors)
  "ring8": (topology.ring(8), 8, 0, "permute", KEYED),
  "ring16": (topology.ring(16), 16, 0, "permute", ALL + ["float8", "qsgd", "int4"]),
  "torus": (topology.torus(4, 4), 16, 0, "permute", KEYED),
  "exponential": (topology.exponential(16), 16, 0, "permute", KEYED),
  "one_peer": (topology.one_peer_exponential(16, 2), 16, 0, "permute", KEYED),
  "complete": (topology.complete(16), 16, 0, "gather", ALL),
  "easgd": (topology.easgd(16, 0.05), 16, 1, "gather", ALL + ["lib_random_k", "scaled_sign"]),
  "random_dense": (_random_stochastic(16, 0), 16, 0, "gather", KEYED),
  "random_dense_aux": (_random_stochastic(17, 1, 0.5), 16, 1, "gather", KEYED),
  "ring_pull_aux": (_ring_with_pull(16, 0.1), 16, 1, "permute", KEYED),
  "diagonal_pull_aux": (_diagonal_with_pull(16, 0.2), 16, 1, "local", KEYED),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_dense_reference(mesh, case):
  W, m, v, kind, names = CASES[case]
  assert collectives.exchange_kind(W, ShardContext(AXIS, D, m, v)) == kind
  mix = mixing.Mix(W, m)
  X = _tree(m, v)
  blocks, dense = _sharded_exchange(mesh, mix, X, names)
  _check(blocks, dense, m, v, W)
  # Not vacuous: compression changed the messages, and the mix moved them.
  own_k, mixed_k = dense[names.index("top_k")]
  assert not np.allclose(own_k["a"], X["a"])
  assert not np.allclose(mixed_k["a"], own_k["a"])


def test_masked_leaves_are_neither_sent_nor_changed(mesh):
  m = 16
  mask = {"a": True, "b": False}
  mix = mixing.Mix(topology.ring(m), m, mask=mask)
  X = _tree(m, 0, seed=4)
  blocks, dense = _sharded_exchange(mesh, mix, X, ["random_k"], step=5)
  _check(blocks, dense, m, 0, topology.ring(m), mixed_leaves=("a",))
  ((own, mixed),) = blocks
  np.testing.assert_array_equal(own["b"].reshape(m), X["b"])
  np.testing.assert_array_equal(mixed["b"].reshape(m), X["b"])
  # Every sender drew its own coordinates (the keys differ), and the receivers placed the
  # neighbours' values where the senders took them (the check against the reference above).
  support = own["a"].reshape(m, -1) != 0
  assert len({row.tobytes() for row in support}) > 1


# ---------------------------------------------------------------- the wire format


def _compiled_collectives(mesh, mix, compressor, d):
  """The collectives of a jitted shard_map that mixes one [m + v, d] leaf."""
  m, v = mix.num_workers, mix.num_rows - mix.num_workers
  ctx = ShardContext(AXIS, D, m, v)

  def body(x):
    with sharded(ctx):
      if compressor is None:
        return mix({"w": x})["w"]
      return mix.exchange({"w": x}, compressor, jax.random.key(0), 1)[1]["w"]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  x = coopjax.shard(jnp.ones((m + v, d), jnp.float32), mesh, num_aux=v)
  return comm.comm_report(f, x)


@pytest.mark.parametrize("m", [8, 16])
def test_ring_top_k_one_percent_moves_two_percent(mesh, m):
  d = 10_000
  mix = mixing.Mix(topology.ring(m), m)
  like = {"w": jax.ShapeDtypeStruct((d,), jnp.float32)}
  dense = _compiled_collectives(mesh, mix, None, d)
  rep = _compiled_collectives(mesh, mix, top_k(0.01), d)
  payload = compress.payload_bytes(top_k(0.01), like)
  assert payload == 100 * (4 + 4)  # float32 values and int32 indices
  # One boundary row each way, values and indices packed as bytes into one buffer: two
  # collective-permutes of exactly one payload each.
  assert rep.kinds() == ["collective-permute"] * 2, str(rep)
  assert rep.bytes_by_dtype() == {"u8": 2 * payload}
  assert dense.total_bytes == 2 * 4 * d and dense.bytes_by_dtype() == {"f32": 2 * 4 * d}
  assert rep.total_bytes <= 0.02 * dense.total_bytes
  # The cost record prices the same bytes (one worker per device at m = 8).
  cost = mix.compressed_cost(top_k(0.01), like)
  assert cost.collective == "neighbor_exchange" and cost.wire_fraction == 0.02
  if m == D:
    assert cost.bytes_sent(4 * d) == rep.total_bytes


def test_ring_four_bit_moves_an_eighth_plus_scales(mesh):
  m, d = 16, 10_000
  mix = mixing.Mix(topology.ring(m), m)
  dense = _compiled_collectives(mesh, mix, None, d)
  rep = _compiled_collectives(mesh, mix, four_bit(), d)
  assert rep.kinds() == ["collective-permute"] * 2, str(rep)
  assert rep.bytes_by_dtype() == {"u8": 2 * (d // 2 + 4)}  # packed levels and the scale
  assert rep.total_bytes <= 0.125 * dense.total_bytes + 2 * 4


def test_library_compressors_on_the_wire(mesh):
  """coopjax.compress.top_k at 1 % and int4 (per-row scales) on a ring of 16 workers."""
  m, shape = 16, (100, 100)
  mix = mixing.Mix(topology.ring(m), m)
  ctx = ShardContext(AXIS, D, m, 0)
  x = jnp.ones((m,) + shape, jnp.float32)

  def collectives_of(q):
    def body(x):
      with sharded(ctx):
        return mix.exchange({"w": x}, q, jax.random.key(0), 1)[1]["w"]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    return comm.comm_report(f, x)

  dense_bytes = 2 * 4 * 100 * 100  # two boundary rows of 10⁴ float32
  like = jax.ShapeDtypeStruct(shape, jnp.float32)
  top = collectives_of(compress.top_k(fraction=0.01))
  assert top.kinds() == ["collective-permute"] * 2
  assert set(top.bytes_by_dtype()) <= {"u8", "s32"}, str(top)
  assert top.total_bytes == 2 * compress.payload_bytes(compress.top_k(fraction=0.01), like)
  assert top.total_bytes <= 0.02 * dense_bytes
  four = collectives_of(compress.int4())
  assert four.kinds() == ["collective-permute"] * 2 and set(four.bytes_by_dtype()) == {"u8"}
  assert four.total_bytes == 2 * compress.payload_bytes(compress.int4(), like)
  assert four.total_bytes <= 0.125 * dense_bytes + 2 * 4 * 100  # + one scale per row


def test_one_dtype_payload_travels_in_its_dtype(mesh):
  m, d = 16, 1_000
  rep = _compiled_collectives(mesh, mixing.Mix(topology.ring(m), m), random_k(0.1), d)
  assert rep.kinds() == ["collective-permute"] * 2 and rep.bytes_by_dtype() == {"f32": 2 * 400}


@pytest.mark.parametrize("case", ["complete", "easgd"])
def test_averaging_is_an_all_gather_of_payloads_never_an_all_reduce(mesh, case):
  m, d = 16, 1_000
  W, v = (topology.complete(m), 0) if case == "complete" else (topology.easgd(m, 0.05), 1)
  mix = mixing.Mix(W, m)
  rep = _compiled_collectives(mesh, mix, four_bit(), d)
  assert rep.kinds() == ["all-gather"], str(rep)
  b = m // D
  assert rep.bytes_by_dtype() == {"u8": b * (d // 2 + 4)}  # this device's b payloads
  cost = mix.compressed_cost(four_bit(), {"w": jnp.zeros(d)})
  assert cost.collective == "all_gather" and cost.volume == m - 1 and cost.rounds == m - 1
  assert cost.wire_fraction == (d // 2 + 4) / (4 * d)


@pytest.mark.parametrize(
  "dtype, per_row", [(jnp.float8_e4m3fn, 1000), (jnp.int4, 500), (jnp.float4_e2m1fn, 500)]
)
def test_low_precision_payloads_travel_as_bytes(mesh, dtype, per_row):
  """A collective on float8 would be f16 and one on int4 s8; the transport sends their bits."""
  m, d = 8, 1_000
  ring = _compiled_collectives(mesh, mixing.Mix(topology.ring(m), m), cast(dtype), d)
  assert ring.kinds() == ["collective-permute"] * 2
  assert ring.bytes_by_dtype() == {"u8": 2 * per_row}, str(ring)
  full = _compiled_collectives(mesh, mixing.Mix(topology.complete(m), m), cast(dtype), d)
  assert full.kinds() == ["all-gather"] and full.bytes_by_dtype() == {"u8": per_row}, str(full)


def test_odd_sub_byte_rows_round_trip(mesh):
  """An odd number of int4 values per row is padded to whole bytes and cut back exactly."""
  m = 16
  mix = mixing.Mix(topology.ring(m), m)
  ctx = ShardContext(AXIS, D, m, 0)
  q = cast(jnp.int4)

  def body(x):
    with sharded(ctx):
      return mix.exchange({"w": x}, q, jax.random.key(0), 0)

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  x = jnp.asarray(np.random.default_rng(0).integers(-7, 8, (m, 3, 5)), jnp.float32)
  own, mixed = f(x)
  np.testing.assert_array_equal(own["w"], x)
  ref = np.einsum("ji,j...->i...", topology.ring(m), np.asarray(x, np.float64))
  np.testing.assert_allclose(mixed["w"], ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- report and cost records


HLO = """
ENTRY %main (v: f32[100], i: s32[100], b: u8[5000], s: f32[]) -> u8[5000] {
  %v = f32[100]{0} parameter(0)
  %i = s32[100]{0} parameter(1)
  %b = u8[5000]{0} parameter(2)
  %s = f32[] parameter(3)
  %cp = (f32[100]{0}, s32[100]{0}) collective-permute(%v, %i), source_target_pairs={{0,1}}
  %ag = (u8[40000]{0}, f32[8]{0}) all-gather(%b, %s), dimensions={0}
  ROOT %r = u8[5000]{0} copy(%b)
}
"""


def test_parse_hlo_records_wire_dtypes_and_bytes():
  rep = comm.parse_hlo(HLO)
  cp, ag = rep
  assert cp.wire == (("f32", 400), ("s32", 400)) and cp.bytes == 800
  assert ag.wire == (("u8", 5000), ("f32", 4)) and ag.bytes == 5004
  assert ag.result_bytes == 40000 + 32
  assert rep.bytes_by_dtype() == {"f32": 404, "s32": 400, "u8": 5000}
  table = rep.table()
  assert "u8 5000 + f32 4" in table and "f32 400 + s32 400" in table
  assert table.splitlines()[-1].endswith("(f32 404, s32 400, u8 5000)")


def test_uncompressed_cost_records_unchanged():
  for W, m in ((topology.ring(8), 8), (topology.complete(8), 8), (topology.easgd(8, 0.1), 8)):
    cost = mixing.Mix(W, m).cost
    assert cost.wire_fraction == 1.0
    assert cost.bytes_sent(1000.0) == cost.volume * cost.fraction * 1000.0
    net = netmodel.NetworkModel(latency=1e-3, bandwidth=1e6)
    assert netmodel.mix_time(cost, 1e6, net) == cost.rounds * 1e-3 + cost.volume * cost.fraction


@pytest.mark.parametrize(
  "W, m, collective, volume",
  [
    (topology.ring(8), 8, "neighbor_exchange", 2.0),
    (topology.torus(4, 4), 16, "neighbor_exchange", 4.0),
    (topology.complete(8), 8, "all_gather", 7.0),
    (topology.easgd(8, 0.1), 8, "all_gather", 7.0),
    (topology.elastic(topology.ring(8), 0.1), 8, "all_gather", 7.0),
    (np.eye(8), 8, "none", 0.0),
  ],
)
def test_compressed_cost_and_its_price(W, m, collective, volume):
  d = 1000
  q = four_bit()
  like = {"w": jnp.zeros(d), "b": jnp.zeros(3)}
  payload = compress.payload_bytes(q, like)
  assert payload == d // 2 + 4 + 2 + 4  # bits and a scale per leaf
  dense_bytes = 4 * (d + 3)
  cost = mixing.Mix(W, m).compressed_cost(q, like)
  assert cost.collective == collective and cost.volume == volume
  assert cost.rounds == int(volume)
  if collective != "none":
    assert cost.wire_fraction == pytest.approx(payload / dense_bytes)
    assert cost.bytes_sent(dense_bytes) == pytest.approx(volume * payload)
  net = netmodel.NetworkModel(latency=1e-4, bandwidth=1e7)
  want = volume * (1e-4 + payload / 1e7)  # α-β: every payload one message
  assert netmodel.mix_time(cost, dense_bytes, net) == pytest.approx(want)


def test_compressed_cost_counts_only_the_mixed_leaves():
  like = {"w": jnp.zeros(1000), "b": jnp.zeros(10)}
  mix = mixing.Mix(topology.ring(8), 8, mask={"w": False, "b": True})
  q = top_k(0.1)
  assert mix.wire_fraction(q, like) == compress.payload_bytes(q, {"b": like["b"]}) / 40
  with pytest.raises(ValueError, match="wire_fraction"):
    pattern.compressed_cost(topology.ring(8), 8, -1.0)
