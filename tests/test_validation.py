"""Bad input is refused early with an error that names the problem."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import compress
from coopjax import mixing
from coopjax import topology

SGD = optax.sgd(0.1)


@pytest.mark.parametrize(
  "W, match",
  [
    (np.ones((2, 3)) / 3, "square"),
    (np.full((3, 3), np.nan), "NaN or infinite"),
    (np.array([[1.5, -0.5], [-0.5, 1.5]]), "negative entry"),
    (np.array([[0.6, 0.5], [0.4, 0.5]]), "not symmetric"),
    (np.array([[0.5, 0.3], [0.3, 0.5]]), "sums to"),
    (np.kron(np.eye(2), np.full((2, 2), 0.5)), "zeta"),
    ("ring", "numeric matrix"),
  ],
)
def test_bad_mixing_matrix(W, match):
  with pytest.raises((ValueError, TypeError), match=match):
    coopjax.cooperative(SGD, tau=1, W=W)


def test_identity_warns_but_is_allowed():
  with pytest.warns(UserWarning, match="never communicate"):
    coopjax.cooperative(SGD, tau=2, W=topology.independent(3))


def test_wrong_size_for_workers_and_aux():
  tx = coopjax.cooperative(SGD, tau=1, W=topology.ring(4), num_aux=1)  # 3 workers + 1 aux
  with pytest.raises(ValueError, match="leading axis 4 .* W is 4x4|leading axis 5"):
    tx.init(coopjax.replicate(ref.init_params(), 4, 1))
  with pytest.raises(ValueError, match="num_aux"):
    coopjax.cooperative(SGD, tau=1, W=topology.complete(2), num_aux=2)


@pytest.mark.parametrize(
  "tau, exc",
  [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("4", TypeError), (True, TypeError)],
)
def test_bad_tau(tau, exc):
  with pytest.raises(exc, match="tau"):
    coopjax.local_sgd(SGD, tau=tau, num_workers=4)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 2 / 9, 0.5, float("nan")])
def test_bad_easgd_alpha(alpha):
  with pytest.raises(ValueError, match="alpha"):
    coopjax.easgd(SGD, tau=1, alpha=alpha, num_workers=8)


def test_easgd_alpha_above_one_over_m_warns():
  with pytest.warns(UserWarning, match="1 - m\\*alpha"):
    coopjax.easgd(
      SGD, tau=1, alpha=0.2, num_workers=8
    )  # the best alpha 2/(m+2) has a negative anchor weight
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    coopjax.easgd(SGD, tau=1, alpha=0.1, num_workers=8)


def test_local_must_be_an_optax_transformation():
  with pytest.raises(TypeError, match="GradientTransformation"):
    coopjax.sync_sgd(lambda g: g, num_workers=4)


def test_bad_replicate_arguments():
  with pytest.raises(ValueError, match="num_workers"):
    coopjax.replicate(ref.init_params(), 0)
  with pytest.raises(TypeError, match="num_workers"):
    coopjax.replicate(ref.init_params(), 2.0)
  with pytest.raises(ValueError, match="num_aux"):
    coopjax.replicate(ref.init_params(), 2, -1)
  with pytest.raises(TypeError, match="floating point"):
    coopjax.replicate({"w": jnp.arange(3)}, 2)
  with pytest.raises(ValueError, match="no array leaves"):
    coopjax.replicate({}, 2)


def _setup(m=4, v=0):
  tx = (
    coopjax.local_sgd(SGD, tau=2, num_workers=m)
    if v == 0
    else coopjax.easgd(SGD, tau=2, alpha=0.1, num_workers=m)
  )
  X = coopjax.replicate(ref.init_params(), m, v)
  return tx, X, tx.init(X)


def test_batch_leading_axis_must_be_m():
  tx, X, state = _setup(4)
  A, b = ref.make_batches(1, 3)
  step = coopjax.make_step(ref.loss_fn, tx, num_workers=4)
  with pytest.raises(ValueError, match="batch has leading axis 3 but num_workers=4"):
    step(X, state, (jnp.asarray(A[0]), jnp.asarray(b[0])))
  step = coopjax.make_step(ref.loss_fn, tx)
  with pytest.raises(
    ValueError, match=r"batch has leading axis 3 but tx has 4 workers \(tx.layout\)"
  ):
    step(X, state, (jnp.asarray(A[0]), jnp.asarray(b[0])))
  A, b = ref.make_batches(1, 4)
  with pytest.raises(ValueError, match="same leading worker axis"):
    step(X, state, (jnp.asarray(A[0]), jnp.asarray(b[0, :3])))


def test_X_without_the_worker_axis():
  tx, X, state = _setup(4, v=1)
  with pytest.raises(ValueError, match="leading axis 4 but W .*is 5x5"):
    tx.init(coopjax.replicate(ref.init_params(), 4))
  bad = dict(X, c=X["c"][:3])
  step = coopjax.make_step(ref.loss_fn, tx)
  A, b = ref.make_batches(1, 4)
  with pytest.raises(ValueError, match="different leading-axis sizes"):
    step(bad, state, (jnp.asarray(A[0]), jnp.asarray(b[0])))
  with pytest.raises(ValueError, match="need the stacked models"):
    tx.update(X, state)


def test_topology_constructor_errors():
  with pytest.raises(ValueError, match="power of two"):
    topology.hypercube(6)
  with pytest.raises(ValueError, match="disconnected"):
    topology.erdos_renyi(12, 0.01, seed=0)
  with pytest.raises(ValueError, match="not connected"):
    topology.from_adjacency(np.zeros((3, 3)))
  with pytest.raises(ValueError, match="symmetric"):
    topology.from_adjacency(np.triu(np.ones((3, 3)), 1))
  with pytest.raises(ValueError, match="3x3"):
    topology.validate(topology.ring(3), size=4)


def test_make_step_argument_errors():
  tx, _, _ = _setup()
  with pytest.raises(TypeError, match="loss_fn"):
    coopjax.make_step("loss", tx)
  with pytest.raises(TypeError, match="GradientTransformation"):
    coopjax.make_step(ref.loss_fn, object())
  with pytest.raises(ValueError, match="num_workers"):
    coopjax.make_step(ref.loss_fn, tx, num_workers=0)


def _mix_inputs():
  X = {"a": jnp.ones((8, 3)), "b": jnp.ones((8,))}
  ring = mixing.Mix(topology.ring(8), 8, mask={"a": True})  # not a prefix of X: "b" missing
  key = jax.random.key(0)
  return [
    (lambda: ring(X), ValueError, "Mix mask must have the structure of one model"),
    (lambda: ring.restrict({"a": True, "c": False})(X), ValueError, "pytree prefix"),
    (lambda: ring.exchange(X, compress.int4(), key, 0), ValueError, "pytree prefix"),
    (lambda: ring.wire_fraction(compress.int4(), {"a": X["a"][0]}), None, None),
    (lambda: ring.compressed_cost(compress.int4(), X), ValueError, "pytree prefix"),
    (lambda: mixing.Mix(topology.ring(8), 8).exchange(X, "int4", key, 0), TypeError, "Compressor"),
    (lambda: mixing.Mix(topology.ring(8), 9), ValueError, "num_workers=9 must count"),
    (lambda: mixing.Mix(np.full((4, 4), np.nan), 4), ValueError, "finite matrix"),
    (lambda: mixing.Mix(topology.ring(4), 4, mask={"a": 1}), TypeError, "Mix mask leaves"),
    (lambda: mixing.Mix.average(0), ValueError, "at least 1"),
    (lambda: mixing.Mix.mean_into_aux(0), ValueError, "at least 1"),
    (lambda: mixing.live_weights(topology.ring(8), 8, jnp.ones(6, bool)), ValueError, r"\(8,\)"),
    (lambda: mixing.check_live(topology.ring(8), [True] * 6), ValueError, "one flag per worker"),
  ]


@pytest.mark.parametrize("case", range(13))
def test_mix_bad_input_names_the_problem(case):
  fn, error, match = _mix_inputs()[case]
  if error is None:  # a mask that is a prefix of the model: the int4 payload of "a" alone
    assert fn() == pytest.approx((4 + 2) / 12)  # one float32 scale + 3 nibbles in 2 bytes
    return
  with pytest.raises(error, match=match):
    fn()
