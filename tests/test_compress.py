"""Compressors against their written-out NumPy definitions, with the library's own draws injected.

Every random choice (random-k's indices, QSGD's uniforms) is regenerated here from the same key
with ``jax.random`` and passed to an independent NumPy implementation of the formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coopjax import compress
from coopjax import mixing
from coopjax import topology

KEY = jax.random.key(7)
WIRE = {np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.float32)}


_JITTED = {}


def roundtrip(q, x, key=KEY):
  """decode(encode(x)), jitted once per compressor (shapes retrace)."""
  if q not in _JITTED:
    _JITTED[q] = jax.jit(lambda x, key: q.decode(q.encode(x, key), x, key))
  return _JITTED[q](x, key)


def encode(q, x, key=KEY):
  return jax.jit(q.encode)(x, key)


def eager_roundtrip(q, x, key=KEY):
  return q.decode(q.encode(x, key), x, key)


def sample(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# --- NumPy definitions ---------------------------------------------------------------------------


def np_top_k(x, k):
  flat = x.reshape(-1)
  keep = np.argsort(-np.abs(flat), kind="stable")[:k]  # stable: ties to the lower index
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(x.shape)


def np_random_k_indices(key, d, k):
  """The k largest 30-bit keys ⌊b/4⌋ of the key's random bits b, ties to the lower index."""
  keys = np.asarray(jax.random.bits(key, (d,), jnp.uint32)).astype(np.int64) >> 2
  return np.argsort(-keys, kind="stable")[:k]


def np_random_k(x, idx, unbiased):
  flat = x.reshape(-1)
  out = np.zeros_like(flat)
  c = flat.size / idx.size if unbiased else 1.0
  out[idx] = flat[idx] * c
  return out.reshape(x.shape)


def np_qsgd(x, u, bits, unbiased, norm):
  """QSGD in float32 with the sent norm injected (its summation order is XLA's)."""
  flat = x.reshape(-1).astype(np.float32)
  d, s = flat.size, 2**bits - 1
  np.testing.assert_allclose(norm, np.sqrt(np.sum(flat.astype(np.float64) ** 2)), rtol=1e-6)
  if norm == 0:
    return np.zeros_like(x)
  r = np.abs(flat) * (np.float32(s) / np.float32(norm))
  xi = np.minimum(np.floor(r) + (u < r - np.floor(r)), s)
  c = 1.0 if unbiased else 1.0 / (1.0 + min(d / s**2, np.sqrt(d) / s))
  return (c * np.float64(norm) * np.sign(flat) * xi / s).reshape(x.shape)


def np_scaled_sign(x):
  flat = x.reshape(-1).astype(np.float64)
  return (np.abs(flat).sum() / flat.size * np.where(flat < 0, -1.0, 1.0)).reshape(x.shape)


def np_absmax(x, levels):
  """Absmax quantization in float32: σ = max|x|·fl(1/levels), q = round_half_even(x·fl(1/σ))."""
  rows = np.asarray(x, np.float32).reshape(-1, x.shape[-1] if x.ndim else 1)
  scale = np.abs(rows).max(axis=1) * np.float32(1 / levels)
  q = np.zeros_like(rows)
  nz = scale > 0
  q[nz] = np.clip(np.round(rows[nz] * (np.float32(1) / scale[nz])[:, None]), -levels, levels)
  return scale, q.astype(np.int32), (q * scale[:, None]).reshape(np.shape(x))


# --- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("n", [1, 101])
def test_pack_bits_is_numpy_packbits_little_endian(width, n):
  codes = np.random.default_rng(width * 1000 + n).integers(0, 2**width, size=n)
  bits = ((codes[:, None] >> np.arange(width)[None, :]) & 1).reshape(-1).astype(np.uint8)
  expected = np.packbits(bits, bitorder="little")
  pack = jax.jit(compress.pack_bits, static_argnums=1)
  unpack = jax.jit(compress.unpack_bits, static_argnums=(1, 2))
  packed = pack(jnp.asarray(codes), width)
  assert packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(packed), expected)
  np.testing.assert_array_equal(np.asarray(unpack(packed, width, n)), codes)


def test_pack_bits_rejects_a_bad_width():
  with pytest.raises(ValueError, match="width"):
    compress.pack_bits(jnp.zeros(3, jnp.int32), 0)


# --- sparsifiers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape,spec",
  [
    ((1000,), {"fraction": 0.01}),
    ((7, 13), {"k": 5}),
    ((7, 13), {"fraction": 0.3}),
    ((), {"k": 5}),
  ],
)
def test_top_k_is_the_numpy_definition(shape, spec):
  x = sample(shape, seed=1)
  d = int(np.prod(shape))
  k = min(spec["k"], d) if "k" in spec else max(1, int(np.floor(d * spec["fraction"] + 1e-9)))
  np.testing.assert_array_equal(np.asarray(roundtrip(compress.top_k(**spec), x)), np_top_k(x, k))


def test_top_k_ties_go_to_the_lower_index():
  x = np.array([1.0, -3.0, 3.0, 2.0, -3.0, 3.0, 0.0, 3.0], np.float32)
  got = np.asarray(roundtrip(compress.top_k(k=3), x))
  np.testing.assert_array_equal(got, [0.0, -3.0, 3.0, 0.0, -3.0, 0.0, 0.0, 0.0])
  x = np.random.default_rng(0).integers(-2, 3, size=500).astype(np.float32)  # many ties
  for k in (1, 17, 100, 499):
    np.testing.assert_array_equal(np.asarray(roundtrip(compress.top_k(k=k), x)), np_top_k(x, k))


@pytest.mark.parametrize("spec", [{"fraction": 0.1}, {"k": 12_000}, {"fraction": 1.0}])
def test_top_k_of_a_large_leaf_is_the_numpy_definition(spec):
  # From 5 % of a leaf of >= 32768 entries the set comes from a bisection on |x|'s bits,
  # sent in index order; it must be the same set, ties to the lower index.
  rng = np.random.default_rng(7)
  x = rng.standard_normal(40_000).astype(np.float32)
  k = spec.get("k") or compress.num_kept(x.size, fraction=spec["fraction"])
  t = np.sort(np.abs(x))[::-1][k - 1]  # plant a tie at the k-th magnitude
  x[rng.integers(0, x.size, 3000)] = t
  x[rng.integers(0, x.size, 100)] = -t
  x[:50] = 0.0
  assert compress._bisects(x.size, k)
  q = compress.top_k(**spec)
  np.testing.assert_array_equal(np.asarray(roundtrip(q, x)), np_top_k(x, k))
  if k < x.size:  # the tie is cut inside its run: the test bites
    kept_ties = np.count_nonzero(np.abs(np_top_k(x, k)) == t)
    assert 0 < kept_ties < np.count_nonzero(np.abs(x) == t)
  # vmapped over workers (as the mixes call it): each row its own set.
  rows = jnp.stack([jnp.asarray(x), -jnp.asarray(x[::-1])])
  got = jax.vmap(lambda r: q.decode(q.encode(r, KEY), r, KEY))(rows)
  np.testing.assert_array_equal(np.asarray(got[1]), np_top_k(-x[::-1], k))


def test_top_k_large_leaf_with_a_k_that_the_threshold_cuts_exactly():
  x = np.tile(np.arange(8, dtype=np.float32), 5000)  # 40000 entries, 5000 of each magnitude
  q = compress.top_k(k=10_000)  # exactly the 7s and the 6s
  np.testing.assert_array_equal(np.asarray(roundtrip(q, x)), np.where(x >= 6, x, 0))


def test_num_kept():
  assert compress.num_kept(10_000, fraction=0.01) == 100
  assert compress.num_kept(100, fraction=0.29) == 29
  assert compress.num_kept(3, fraction=0.01) == 1
  assert compress.num_kept(3, k=10) == 3


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("spec", [{"k": 9}, {"fraction": 0.05}])
def test_random_k_is_the_numpy_definition_with_the_keys_indices(unbiased, spec):
  x = sample((20, 30), seed=2)
  d = x.size
  k = spec.get("k") or compress.num_kept(d, fraction=spec["fraction"])
  idx = np_random_k_indices(KEY, d, k)
  q = compress.random_k(**spec, unbiased=unbiased)
  np.testing.assert_allclose(
    np.asarray(roundtrip(q, x)), np_random_k(x, idx, unbiased), rtol=1e-6, atol=0
  )


@pytest.mark.parametrize("unbiased", [False, True])
def test_random_k_of_a_large_leaf_is_the_numpy_definition(unbiased):
  x = sample((200, 200), seed=4)  # 40000 entries: the indices come from the bisection
  k = compress.num_kept(x.size, fraction=0.1)
  assert compress._bisects(x.size, k)
  idx = np_random_k_indices(KEY, x.size, k)
  q = compress.random_k(fraction=0.1, unbiased=unbiased)
  np.testing.assert_allclose(
    np.asarray(roundtrip(q, x)), np_random_k(x, idx, unbiased), rtol=1e-6, atol=0
  )


def test_random_k_receiver_regenerates_the_senders_indices():
  q = compress.random_k(fraction=0.1)
  x = sample((500,), seed=3)
  key = compress.message_key(jax.random.key(1), step=4, sender=3)
  sender_view = roundtrip(q, x, key)
  values = np.asarray(encode(q, x, key)["values"])
  # The receiver holds only the values (a fresh copy), the shape and the key.
  like = jax.ShapeDtypeStruct((500,), jnp.float32)
  received = jax.jit(lambda p, k: q.decode(p, like, k))({"values": jnp.asarray(values.copy())}, key)
  np.testing.assert_array_equal(np.asarray(received), np.asarray(sender_view))
  assert int(np.count_nonzero(np.asarray(received))) == 50
  # Another sender's key picks other coordinates.
  other = compress.message_key(jax.random.key(1), step=4, sender=2)
  assert not np.array_equal(np.asarray(roundtrip(q, x, other)), np.asarray(sender_view))


def test_random_k_unbiased_in_expectation_over_keys():
  q = compress.random_k(k=3, unbiased=True)
  x = jnp.asarray(sample((10,), seed=4))
  keys = jax.random.split(jax.random.key(2), 4000)
  draws = np.asarray(jax.vmap(lambda k: roundtrip(q, x, k))(keys), np.float64)
  se = draws.std(axis=0) / np.sqrt(len(keys))
  assert np.all(np.abs(draws.mean(axis=0) - np.asarray(x)) <= 5 * se)


# --- quantizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "bits,unbiased,shape",
  [
    (1, True, (300,)),
    (2, False, (300,)),
    (4, True, (6, 11)),
    (4, False, (6, 11)),
    (8, True, (300,)),
  ],
)
def test_qsgd_is_the_numpy_definition_with_the_keys_uniforms(bits, unbiased, shape):
  x = sample(shape, seed=bits)
  u = np.asarray(jax.random.uniform(KEY, (x.size,), jnp.float32))
  q = compress.qsgd(bits, unbiased=unbiased)
  norm = np.asarray(encode(q, x)["norm"])
  expected = np_qsgd(x, u, bits, unbiased, norm)
  np.testing.assert_allclose(np.asarray(roundtrip(q, x)), expected, rtol=1e-6, atol=0)


def test_qsgd_unbiased_in_expectation_over_keys():
  """Mean over N = 4000 keys within 5 standard errors of x in every coordinate."""
  q = compress.qsgd(2)
  x = jnp.asarray(sample((16,), seed=5))
  keys = jax.random.split(jax.random.key(3), 4000)
  draws = np.asarray(jax.vmap(lambda k: roundtrip(q, x, k))(keys), np.float64)
  se = draws.std(axis=0) / np.sqrt(len(keys))
  assert np.all(se > 0)
  assert np.all(np.abs(draws.mean(axis=0) - np.asarray(x)) <= 5 * se)


@pytest.mark.parametrize("d", [100, 1000])  # √d < s: c = 1/(1 + d/s²); √d > s: 1/(1 + √d/s)
def test_biased_qsgd_is_c_times_the_unbiased_draw(d):
  s = 15
  c = 1 / (1 + d / s**2) if d == 100 else 1 / (1 + np.sqrt(d) / s)
  x = sample((d,), seed=6)
  unbiased = np.asarray(roundtrip(compress.qsgd(4), x), np.float64)
  biased = np.asarray(roundtrip(compress.qsgd(4, unbiased=False), x), np.float64)
  np.testing.assert_allclose(biased, c * unbiased, rtol=1e-6, atol=1e-8)


def test_qsgd_of_zero_is_zero_and_levels_stay_in_range():
  q = compress.qsgd(3)
  assert np.all(np.asarray(roundtrip(q, np.zeros(50, np.float32))) == 0)
  # A one-hot vector: |x_j| = ‖x‖, r = s exactly; never s + 1.
  e = np.zeros(9, np.float32)
  e[4] = -2.5
  np.testing.assert_array_equal(np.asarray(roundtrip(q, e)), e)


@pytest.mark.parametrize("shape", [(257,), (4, 9), ()])
def test_scaled_sign_is_the_numpy_definition(shape):
  x = sample(shape, seed=7)
  if x.ndim:
    x.reshape(-1)[:3] = [0.0, -0.0, 0.0]  # sgn(0) = sgn(-0) = +1
  got = np.asarray(roundtrip(compress.scaled_sign(), x))
  np.testing.assert_allclose(got, np_scaled_sign(x), rtol=1e-6)


@pytest.mark.parametrize("name,levels", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 7), (40,), ()])
def test_absmax_quantizers_are_the_numpy_definition(name, levels, shape):
  q = getattr(compress, name)()
  x = sample(shape, seed=8) * 3
  if len(shape) >= 2:
    x[0] = 0.0  # a zero row
  scale, codes, expected = np_absmax(x, levels)
  payload = encode(q, x)
  np.testing.assert_array_equal(np.asarray(payload["scales"]), scale)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(q.decode)(payload, x, KEY)), expected.astype(np.float32)
  )
  if name == "int8":
    sent = np.asarray(jax.lax.bitcast_convert_type(payload["q"], jnp.int8)).reshape(codes.shape)
  else:
    nibbles = np.asarray(compress.unpack_bits(payload["q"], 4, codes.size)).astype(np.int32)
    sent = np.where(nibbles >= 8, nibbles - 16, nibbles).reshape(codes.shape)
  np.testing.assert_array_equal(sent, codes)


@pytest.mark.parametrize("name,levels", [("int8", 127), ("int4", 7)])
def test_absmax_rounds_half_to_even_and_clips(name, levels):
  q = getattr(compress, name)()
  # Row max = levels: scale 1, so x/scale = x exactly; halves round to even.
  halves = np.array([levels, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5], np.float32)
  np.testing.assert_array_equal(np.asarray(roundtrip(q, halves)), [levels, 0, 2, 2, -0, -2, -2, 4])
  # One large value and a zero row: the rest of its row is at most levels·scale.
  x = np.array([[-1e30, 1.0, -5.0], [0.0, 0.0, 0.0]], np.float32)
  got = np.asarray(roundtrip(q, x))
  assert got[0, 0] == np.float32(-1e30) / levels * levels
  assert np.all(got[1] == 0) and np.all(np.isfinite(got))
  assert np.asarray(encode(q, x)["scales"])[1] == 0


# --- wire format, bytes, jit, integration --------------------------------------------------------

COMPRESSORS = [
  compress.identity(),
  compress.top_k(fraction=0.05),
  compress.top_k(k=3),
  compress.random_k(fraction=0.1, unbiased=True),
  compress.qsgd(4),
  compress.qsgd(3, unbiased=False),
  compress.scaled_sign(),
  compress.int8(),
  compress.int4(),
]
NAMES = [q.name for q in COMPRESSORS]


@pytest.mark.parametrize("q", COMPRESSORS, ids=NAMES)
def test_payload_dtypes_and_bytes(q):
  tree = {
    "a": sample((17, 9), seed=9),
    "b": sample((5,), seed=10),
    "c": np.float32(2.0),
    "empty": np.zeros((3, 0), np.float32),
  }
  payloads = jax.jit(lambda t: compress.encode_tree(q, t, KEY))(tree)
  leaves = jax.tree.leaves(payloads)
  assert {np.dtype(a.dtype) for a in leaves} <= WIRE
  assert compress.payload_bytes(q, tree) == sum(np.asarray(a).nbytes for a in leaves)
  decoded = jax.jit(lambda p, t: compress.decode_tree(q, p, t, KEY))(payloads, tree)
  for got, x in zip(jax.tree.leaves(decoded), jax.tree.leaves(tree), strict=True):
    assert got.shape == np.shape(x) and got.dtype == np.asarray(x).dtype


@pytest.mark.parametrize("q", COMPRESSORS[1:], ids=NAMES[1:])
def test_zero_stays_zero(q):
  zero = np.asarray(roundtrip(q, np.zeros((64, 3), np.float32)))
  assert np.all(zero == 0)


@pytest.mark.parametrize(
  "q", [COMPRESSORS[1], COMPRESSORS[3], COMPRESSORS[8]], ids=lambda q: q.name
)
def test_jit_equals_eager(q):
  x = sample((64, 3), seed=11)
  eager = eager_roundtrip(q, x)
  jitted = jax.jit(lambda x, k: eager_roundtrip(q, x, k))(x, KEY)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))


def test_payload_bytes_figures():
  assert compress.payload_bytes(compress.top_k(fraction=0.01), jnp.zeros(10_000)) == 800
  assert compress.payload_bytes(compress.random_k(fraction=0.01), jnp.zeros(10_000)) == 400
  assert compress.payload_bytes(compress.int4(), jnp.zeros((10, 1001))) == 40 + 5005
  assert compress.payload_bytes(compress.qsgd(4), jnp.zeros(1001)) == 4 + 626
  assert compress.payload_bytes(compress.scaled_sign(), jnp.zeros(17)) == 4 + 3


@pytest.mark.parametrize("q", [compress.top_k(k=4), compress.random_k(k=4)], ids=["top", "rand"])
def test_sparsifiers_send_other_floats_in_their_own_precision(q):
  x = jnp.asarray(sample((50,), seed=12), jnp.bfloat16)
  payload = encode(q, x)
  assert payload["values"].dtype == jnp.uint8 and payload["values"].shape == (4, 2)
  got = roundtrip(q, x)
  assert got.dtype == jnp.bfloat16
  assert compress.payload_bytes(q, x) == (4 * 2 + 4 * 4 if "top" in q.name else 4 * 2)
  ref = np_top_k(np.asarray(x, np.float32), 4) if "top" in q.name else None
  if ref is not None:
    np.testing.assert_array_equal(np.asarray(got, np.float32), ref)


def test_exchange_through_a_mix_decodes_every_senders_message():
  m = 4
  W = topology.ring(m)
  mix = mixing.Mix(W, num_workers=m)
  X = {"w": jnp.asarray(sample((m, 40), seed=13))}
  q = compress.random_k(fraction=0.25)
  key = jax.random.key(5)
  own, mixed = jax.jit(lambda X: mix.exchange(X, q, key, step=2))(X)
  sent = np.stack(
    [
      np.asarray(roundtrip(q, X["w"][i], jax.random.fold_in(compress.message_key(key, 2, i), 0)))
      for i in range(m)
    ]
  )
  np.testing.assert_array_equal(np.asarray(own["w"]), sent)
  np.testing.assert_allclose(np.asarray(mixed["w"]), W.T @ sent, rtol=1e-6, atol=1e-7)


def test_constructors_reject_bad_arguments():
  with pytest.raises(ValueError, match="exactly one"):
    compress.top_k()
  with pytest.raises(ValueError, match="exactly one"):
    compress.random_k(k=3, fraction=0.1)
  with pytest.raises(ValueError, match="fraction"):
    compress.top_k(fraction=1.5)
  with pytest.raises(ValueError, match="k must"):
    compress.top_k(k=0)
  with pytest.raises(ValueError, match="fraction"):  # a string, not a number
    compress.top_k(fraction="0.1")
  with pytest.raises(ValueError, match="bits"):
    compress.qsgd(0)
  with pytest.raises(TypeError, match="floating"):
    compress.int8().encode(jnp.arange(3), KEY)


# --- tune_gamma ----------------------------------------------------------------------------------


def np_choco_gossip(W, x0, gamma, rounds, Q, order):
  """CHOCO-Gossip in NumPy, row by row: x_i += γ Σ_j W_ji (x̂_j − x̂_i)."""
  m = W.shape[0]
  x, x_hat = x0.astype(np.float64).copy(), np.zeros_like(x0, np.float64)
  for _ in range(rounds):
    if order == "overlap":
      x = x + gamma * np.stack(
        [sum(W[j, i] * (x_hat[j] - x_hat[i]) for j in range(m)) for i in range(m)]
      )
      x_hat = x_hat + np.stack([Q(x[i] - x_hat[i]) for i in range(m)])
    else:
      x_hat = x_hat + np.stack([Q(x[i] - x_hat[i]) for i in range(m)])
      x = x + gamma * np.stack(
        [sum(W[j, i] * (x_hat[j] - x_hat[i]) for j in range(m)) for i in range(m)]
      )
  dev = lambda z: np.sum((z - z.mean(axis=0)) ** 2)
  return dev(x) / dev(x0)


def tuning_x0(seed, m, dim):
  key = jax.random.key(seed)
  return np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (m, dim), jnp.float32))


@pytest.mark.parametrize("order", ["paper", "overlap"])
def test_tune_gamma_simulates_choco_gossip(order):
  """A directed (non-symmetric) doubly stochastic W and top-k, against the NumPy re-derivation."""
  m, dim, rounds = 4, 40, 15
  W = 0.5 * np.eye(m) + 0.5 * np.roll(np.eye(m), 1, axis=1)
  grid = [0.05, 0.3, 1.0]
  tuned = compress.tune_gamma(
    W, compress.top_k(k=4), grid=grid, rounds=rounds, dim=dim, seed=3, order=order
  )
  x0 = tuning_x0(3, m, dim)
  expected = [np_choco_gossip(W, x0, g, rounds, lambda v: np_top_k(v, 4), order) for g in grid]
  np.testing.assert_allclose(tuned.errors, expected, rtol=1e-4)
  assert tuned.gamma == grid[int(np.argmin(expected))]


def test_tune_gamma_picks_one_for_identity_and_less_for_top_k_on_a_ring():
  W = topology.ring(8)
  exact = compress.tune_gamma(W, compress.identity(), rounds=200, dim=200)
  # Identity: x ← ((1 − γ)I + γWᵀ)x, so the error is ‖Pᵀ(x⁰ − x̄⁰)‖² / ‖x⁰ − x̄⁰‖².
  x0 = tuning_x0(0, 8, 200).astype(np.float64)
  for g, err in zip(exact.grid, exact.errors, strict=True):
    P = np.linalg.matrix_power((1 - g) * np.eye(8) + g * W.T, 200)
    dev = x0 - x0.mean(axis=0)
    closed = np.sum((P @ dev) ** 2) / np.sum(dev**2)
    assert err == pytest.approx(closed, rel=1e-3, abs=1e-10)
  assert exact.gamma == 1.0
  sparse = compress.tune_gamma(W, compress.top_k(fraction=0.01), rounds=300, dim=1000)
  assert sparse.gamma < 0.5
  assert sparse.errors[-1] > 10 * sparse.errors.min()  # γ = 1 is far worse with top-k 1 %
  assert sparse.errors[list(sparse.grid).index(sparse.gamma)] == sparse.errors.min()


def test_tune_gamma_rejects_bad_arguments():
  with pytest.raises(ValueError, match="square"):
    compress.tune_gamma(np.ones((2, 3)) / 3, compress.identity())
  with pytest.raises(ValueError, match="order"):
    compress.tune_gamma(topology.ring(4), compress.identity(), order="late")
  with pytest.raises(ValueError, match="grid"):
    compress.tune_gamma(topology.ring(4), compress.identity(), grid=[0.1, -1.0])


def test_tune_gamma_refuses_what_choco_refuses():
  """A W that does not keep the mean, γ > 1 and a non-compressor fail up front, as in choco."""
  q = compress.top_k(k=1)
  # Column sums 4: the "consensus error" of such a W measures nothing (it picked γ = 0.03 here).
  with pytest.raises(ValueError, match="sums to 4"):
    compress.tune_gamma(np.ones((4, 4)), q, rounds=5, dim=8)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    compress.tune_gamma(topology.ring(4), q, grid=[0.5, 2.0], rounds=5, dim=8)
  with pytest.raises(TypeError, match=r"call the factory, int4\(\)"):
    compress.tune_gamma(topology.ring(4), compress.int4, rounds=5, dim=8)
  with pytest.raises(TypeError, match="Compressor"):
    compress.tune_gamma(topology.ring(4), "top_k", rounds=5, dim=8)
  with pytest.raises(ValueError, match="floor"):
    compress.tune_gamma(topology.ring(4), q, floor=-1.0, rounds=5, dim=8)
