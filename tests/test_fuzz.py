"""Property-based fuzzing of the public API with bad inputs (hypothesis).

Every generated input is invalid by construction. The property: the call
raises ``ValueError`` or ``TypeError`` with a non-empty message, early (at
construction or trace time), never another exception type (an XLA or NumPy
internal error, an ``IndexError``, a hang) and never a silent success.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import coopjax
from coopjax import topology

SGD = optax.sgd(0.1)
FUZZ = settings(
  max_examples=40,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
  derandomize=True,
)


def expect_clear_error(fn, *args, **kwargs):
  """Calls ``fn``; passes only on ValueError/TypeError with a message."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
      assert str(e).strip(), f"{type(e).__name__} without a message from {fn.__name__}"
      return e
  pytest.fail(f"{getattr(fn, '__name__', fn)}{args!r} {kwargs!r} accepted a bad input")


# ---------------------------------------------------------------------------
# strategies of bad values


def bad_count(minimum: int = 1):
  """Not an integer >= minimum."""
  return st.one_of(
    st.integers(max_value=minimum - 1),
    st.floats(allow_nan=True, allow_infinity=True).filter(
      lambda x: not (math.isfinite(x) and x == int(x) and x >= minimum)
    ),
    st.floats(min_value=minimum, max_value=64).map(lambda x: x + 0.5),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.lists(st.integers(1, 4), min_size=1, max_size=2),
    st.just(np.array([3])),
    st.just(1 + 2j),
  )


def bad_alpha(m: int):
  """Outside the elastic-averaging range 0 < α < 2/(m+1), or not a real number."""
  return st.one_of(
    st.floats(max_value=0.0),
    st.floats(min_value=2.0 / (m + 1), allow_infinity=True),
    st.just(float("nan")),
    st.none(),
    st.text(max_size=3),
    st.just(1j),
  )


def _sym_stochastic(n, rng):
  """A valid symmetric doubly stochastic matrix (Metropolis–Hastings of a random graph)."""
  adj = np.triu(rng.random((n, n)) < 0.6, 1)
  adj = adj | adj.T
  for i in range(n - 1):
    adj[i, i + 1] = adj[i + 1, i] = True
  return topology.metropolis_hastings(adj.astype(float))


MATRIX_KINDS = (
  "nonsquare",
  "nan",
  "inf",
  "negative",
  "rowsum",
  "asym",
  "rank1d",
  "rank3d",
  "string",
  "none",
  "empty",
  "ragged",
  "complex",
  "disconnected",
  "object",
)


@st.composite
def bad_matrix(draw, kinds=MATRIX_KINDS):
  """Something that is not a valid (m+v)x(m+v) mixing matrix."""
  n = draw(st.integers(2, 6))
  rng = np.random.default_rng(draw(st.integers(0, 2**16)))
  kind = draw(st.sampled_from(kinds))
  W = _sym_stochastic(n, rng)
  if kind == "nonsquare":
    return rng.random((n, n + draw(st.integers(1, 3))))
  if kind in ("nan", "inf"):
    i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
    W[i, j] = W[j, i] = np.nan if kind == "nan" else np.inf
    return W
  if kind == "negative":
    eps = draw(st.floats(0.01, 0.5))
    W = W + eps * np.eye(n)
    W[0, 1] -= eps  # rows and columns still sum to one
    W[1, 0] -= eps
    W[0, 0] -= eps
    W[1, 1] -= eps
    W[0, 1] = W[1, 0] = -abs(eps) - 0.01
    W[0, 0] = W[1, 1] = 1.0 - W[0].sum() + W[0, 0]
    return W
  if kind == "rowsum":
    return W * draw(st.floats(1.05, 3.0) | st.floats(0.1, 0.95))
  if kind == "asym":
    n = max(n, 3)
    P = np.roll(np.eye(n), 1, axis=0)  # a cyclic shift: not symmetric for n >= 3
    return 0.5 * np.eye(n) + 0.5 * P  # doubly stochastic, not symmetric
  if kind == "rank1d":
    return np.full(n, 1.0 / n)
  if kind == "rank3d":
    return np.broadcast_to(W, (2, n, n)).copy()
  if kind == "string":
    return draw(st.sampled_from(["ring", "complete", ""]))
  if kind == "none":
    return None
  if kind == "empty":
    return np.zeros((0, 0))
  if kind == "ragged":
    return [[1.0], [0.5, 0.5]]
  if kind == "complex":
    return W.astype(complex) + 1e-3j
  if kind == "disconnected":
    k = draw(st.integers(1, n - 1))
    out = np.zeros((n + 1, n + 1))
    out[:k, :k] = 1.0 / k
    out[k:, k:] = 1.0 / (n + 1 - k)
    return out
  return np.array([["a"] * n] * n, dtype=object)


# ---------------------------------------------------------------------------
# topologies


_COUNT_TOPOLOGIES = [topology.complete, topology.ring, topology.exponential, topology.independent]


@FUZZ
@given(fn=st.sampled_from(_COUNT_TOPOLOGIES), m=bad_count(1))
def test_topology_sizes(fn, m):
  expect_clear_error(fn, m)


@FUZZ
@given(
  case=st.one_of(
    st.tuples(st.just("hypercube"), bad_count(1) | st.sampled_from([3, 5, 6, 7, 12])),
    st.tuples(st.just("torus"), st.tuples(bad_count(1), st.integers(1, 4))),
    st.tuples(
      st.just("erdos_renyi"),
      st.tuples(st.integers(2, 6), bad_count(1) | st.floats(1.01, 5) | st.floats(-5, -0.01)),
    ),
    st.tuples(
      st.just("easgd"), st.integers(1, 8).flatmap(lambda m: st.tuples(st.just(m), bad_alpha(m)))
    ),
    st.tuples(st.just("easgd_m"), bad_count(1)),
    st.tuples(
      st.just("circulant"),
      st.tuples(
        st.integers(2, 6),
        st.sampled_from([{}, {7: "x"}, {0.5: 1.0}, {True: 1.0}, {1: float("nan")}, "ring", None]),
      ),
    ),
    st.tuples(st.just("from_adjacency"), bad_matrix()),
    st.tuples(st.just("metropolis_hastings"), bad_matrix()),
    st.tuples(
      st.just("elastic"),  # the anchor connects the workers: a disconnected W is fine there
      st.tuples(bad_matrix([k for k in MATRIX_KINDS if k != "disconnected"]), st.just(0.1)),
    ),
    st.tuples(
      st.just("elastic_hierarchical"),
      st.sampled_from([[], [[0, 1], [1, 2]], [[0], []], [[0, 2]], "ab", None, [[0.5, 1]]]),
    ),
  )
)
def test_topology_arguments(case):
  name, arg = case
  if name == "hypercube":
    expect_clear_error(topology.hypercube, arg)
  elif name == "torus":
    expect_clear_error(topology.torus, *arg)
  elif name == "erdos_renyi":
    expect_clear_error(topology.erdos_renyi, *arg)
  elif name == "easgd":
    expect_clear_error(topology.easgd, *arg)
  elif name == "easgd_m":
    expect_clear_error(topology.easgd, arg, 0.1)
  elif name == "circulant":
    expect_clear_error(topology.circulant, *arg)
  elif name == "elastic":
    expect_clear_error(topology.elastic, *arg)
  elif name == "elastic_hierarchical":
    expect_clear_error(topology.elastic_hierarchical, arg, 0.1)
  else:
    adj = arg
    if isinstance(adj, np.ndarray) and adj.ndim == 2 and adj.shape[0] == adj.shape[1]:
      if np.isfinite(adj).all() if adj.dtype != object else False:
        # A square finite matrix may be a legitimate weighted adjacency: make it bad.
        adj = adj.copy()
        adj[0, -1] = -1.0
    expect_clear_error(getattr(topology, name), adj)


# ---------------------------------------------------------------------------
# algorithm constructors


@FUZZ
@given(W=bad_matrix(), tau=st.integers(1, 4))
def test_cooperative_bad_W(W, tau):
  expect_clear_error(coopjax.cooperative, SGD, tau, W)


@FUZZ
@given(
  which=st.sampled_from(["tau", "num_aux", "order", "local", "policy", "mask"]),
  bad=st.one_of(bad_count(1), st.text(max_size=5), st.just(object())),
)
def test_cooperative_bad_arguments(which, bad):
  W = topology.ring(4)
  args = {"local": SGD, "tau": 2, "W": W}
  kwargs = {}
  if which == "tau":
    args["tau"] = bad
  elif which == "num_aux":
    if isinstance(bad, int) and not isinstance(bad, bool) and 0 <= bad < 4:
      bad = 4 + abs(bad)  # leaves no worker rows
    kwargs["num_aux"] = bad
  elif which == "order":
    kwargs["order"] = bad if bad not in ("step_then_mix", "mix_then_step") else "both"
  elif which == "local":
    args["local"] = bad
  elif which == "policy":
    kwargs["local_state_policy"] = bad if bad not in ("keep", "mix", "reset") else "zero"
  else:
    kwargs["mix_mask"] = bad if bad is not None and not isinstance(bad, bool) else "x"
  expect_clear_error(coopjax.cooperative, args["local"], args["tau"], args["W"], **kwargs)


@FUZZ
@given(
  case=st.one_of(
    st.tuples(st.just("sync_sgd"), bad_count(1)),
    st.tuples(st.just("local_sgd_tau"), bad_count(1)),
    st.tuples(st.just("local_sgd_m"), bad_count(1)),
    st.tuples(
      st.just("easgd_alpha"),
      st.integers(1, 8).flatmap(lambda m: st.tuples(st.just(m), bad_alpha(m))),
    ),
    st.tuples(st.just("easgd_m"), bad_count(1)),
    st.tuples(st.just("easgd_tau"), bad_count(1)),
    st.tuples(st.just("dpsgd"), bad_matrix()),
    st.tuples(st.just("local"), st.sampled_from([None, 0.1, "sgd", optax.sgd, object()])),
  )
)
def test_algorithm_factories(case):
  name, bad = case
  if name == "sync_sgd":
    expect_clear_error(coopjax.sync_sgd, SGD, bad)
  elif name == "local_sgd_tau":
    expect_clear_error(coopjax.local_sgd, SGD, bad, 4)
  elif name == "local_sgd_m":
    expect_clear_error(coopjax.local_sgd, SGD, 2, bad)
  elif name == "easgd_alpha":
    m, alpha = bad
    expect_clear_error(coopjax.easgd, SGD, 2, alpha, m)
  elif name == "easgd_m":
    expect_clear_error(coopjax.easgd, SGD, 2, 0.1, bad)
  elif name == "easgd_tau":
    expect_clear_error(coopjax.easgd, SGD, bad, 0.1, 4)
  elif name == "dpsgd":
    expect_clear_error(coopjax.dpsgd, SGD, bad)
  else:
    expect_clear_error(coopjax.local_sgd, bad, 2, 4)


# ---------------------------------------------------------------------------
# replicate and the step


@FUZZ
@given(
  case=st.one_of(
    st.tuples(st.just("m"), bad_count(1)),
    st.tuples(st.just("v"), bad_count(0)),
    st.tuples(
      st.just("params"),
      st.sampled_from(
        [
          None,
          {},
          [],
          3,
          "w",
          {"w": "abc"},
          {"w": np.arange(3)},
          {"w": np.array([True, False])},
          {"w": [1.0, 2.0]},
          {"w": object()},
        ]
      ),
    ),
  )
)
def test_replicate(case):
  which, bad = case
  if which == "m":
    expect_clear_error(coopjax.replicate, ref.init_params(), bad)
  elif which == "v":
    expect_clear_error(coopjax.replicate, ref.init_params(), 2, bad)
  else:
    expect_clear_error(coopjax.replicate, bad, 2)


@FUZZ
@given(
  which=st.sampled_from(["loss_fn", "tx", "num_workers"]),
  bad=st.one_of(bad_count(1), st.just(object()), st.text(max_size=3)),
)
def test_make_step_arguments(which, bad):
  tx = coopjax.local_sgd(SGD, tau=2, num_workers=3)
  kwargs = {"loss_fn": ref.loss_fn, "tx": tx}
  if which == "num_workers":
    if bad is None:
      bad = 0
    kwargs["num_workers"] = bad
  else:
    kwargs[which] = bad
  expect_clear_error(lambda: coopjax.make_step(**kwargs))


@st.composite
def mismatched_step(draw):
  """``(tx, X, opt_state, batch, num_workers)`` where at least one thing does not fit."""
  m = draw(st.integers(1, 5))
  v = draw(st.sampled_from([0, 1]))
  local = optax.sgd(0.1, momentum=0.9)
  tx = (
    coopjax.easgd(local, tau=2, alpha=1.0 / (m + 2), num_workers=m)
    if v
    else coopjax.local_sgd(local, tau=2, num_workers=m)
  )
  X = coopjax.replicate(ref.init_params(), m, v)
  opt_state = tx.init(X)
  A, b = ref.make_batches(1, m, batch=3)
  A, b = A[0], b[0]
  kind = draw(
    st.sampled_from(
      [
        "x_rows",
        "batch_rows",
        "ragged_batch",
        "scalar_leaf",
        "features",
        "num_workers",
        "int_params",
        "string_batch",
        "complex_batch",
        "empty_batch",
        "state_of_other_tx",
        "params_tree_vs_state",
      ]
    )
  )
  num_workers = None
  delta = draw(st.integers(1, 3))
  if kind == "x_rows":
    X = coopjax.replicate(ref.init_params(), m + delta, v)
  elif kind == "batch_rows":
    A, b = ref.make_batches(1, m + v + delta, batch=3)
    A, b = A[0], b[0]
  elif kind == "ragged_batch":
    b = b[: max(m - 1, 0)] if m > 1 else np.concatenate([b, b])
  elif kind == "scalar_leaf":
    b = np.float32(1.0)
  elif kind == "features":
    A = np.concatenate([A, A[..., :delta]], axis=-1)
  elif kind == "num_workers":
    num_workers = m + delta
  elif kind == "int_params":
    X = {k: jnp.asarray(x).astype(jnp.int32) for k, x in X.items()}
  elif kind == "string_batch":
    A = np.full(A.shape, "x")
  elif kind == "complex_batch":
    A = A.astype(np.complex64)
  elif kind == "empty_batch":
    A, b = np.zeros((0,) + A.shape[1:], np.float32), np.zeros((0, 3), np.float32)
  elif kind == "state_of_other_tx":
    other = coopjax.local_sgd(optax.adam(0.1), tau=2, num_workers=m + v + delta)
    opt_state = other.init(coopjax.replicate(ref.init_params(), m + v + delta))
  else:  # X has a leaf the optimizer state was not built for
    X = dict(X, extra=X["c"])
  return kind, tx, X, opt_state, (A, b), num_workers


@FUZZ
@given(case=mismatched_step(), jit=st.booleans())
def test_step_with_mismatched_inputs(case, jit):
  kind, tx, X, opt_state, batch, num_workers = case
  step = coopjax.make_step(ref.loss_fn, tx, num_workers=num_workers, jit=jit)
  err = expect_clear_error(step, X, opt_state, batch)
  assert "XlaRuntimeError" not in type(err).__name__, kind


# ---------------------------------------------------------------------------
# the training CLI


def _train_module():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(root, "experiments", "train.py")
  assert os.path.exists(path), path
  sys.path.insert(0, os.path.join(root, "experiments"))
  try:
    import train
  finally:
    sys.path.pop(0)
  return train


FIELD_TYPES = {  # the default config's field -> a value of the wrong type
  "num_workers": ["abc", "1.5", "(1, 2)", "[3]"],
  "tau": ["x", "2.5", "None1", "{}"],
  "lr": ["fast", "(0.1,)", "[1]"],
  "hidden": ["wide", "{'a': 1}"],
  "progress": ["maybe", "2.5"],
  "network.latency": ["slow", "[1]"],
}


@FUZZ
@given(
  case=st.one_of(
    st.tuples(
      st.just("type"),
      st.sampled_from(sorted(FIELD_TYPES)).flatmap(
        lambda f: st.tuples(st.just(f), st.sampled_from(FIELD_TYPES[f]))
      ),
    ),
    st.tuples(
      st.just("unknown"),
      st.tuples(
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).map(lambda s: "zz" + s),
        st.text(min_size=0, max_size=4),
      ),
    ),
    st.tuples(
      st.just("nested"),
      st.tuples(st.sampled_from(["network.zz", "nope.latency", "tau.x"]), st.just("1")),
    ),
  )
)
def test_cli_rejects_bad_overrides(case):
  train = _train_module()
  kind, (field, value) = case
  argv = ["--config", "experiments/configs/default.py:runlocal", f"--config.{field}={value}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cwd = os.getcwd()
  os.chdir(root)
  try:
    err = expect_clear_error(train.parse_args, argv)
  finally:
    os.chdir(cwd)
  assert field.split(".")[0] in str(err) or "unknown" in str(err), (kind, str(err))


BAD_CONFIGS = [
  ["--config.num_workers=-3"],
  ["--config.num_workers=0"],
  ["--config.tau=0"],
  ["--config.algorithm=easgd", "--config.alpha=5.0"],
  ["--config.algorithm=easgd", "--config.alpha=-0.1"],
  ["--config.lr=-1.0"],
  ["--config.lr=0"],
  ["--config.batch_size=0"],
  ["--config.algorithm=nope"],
  ["--config.algorithm=dpsgd", "--config.topology=moebius"],
  ["--config.optimizer=sgdd"],
  ["--config.num_steps=-5"],
  ["--config.model=transformer"],
  ["--config.split=weird"],
  ["--config.checkpoint_keep=0"],
  ["--config.log_every=0"],
  ["--config.eval_every=-2"],
]


@settings(FUZZ, max_examples=len(BAD_CONFIGS))
@given(flags=st.sampled_from(BAD_CONFIGS))
def test_cli_rejects_bad_config_values(flags, tmp_path_factory):
  train = _train_module()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path_factory.mktemp("cli"))
  argv = ["--config", os.path.join(root, "experiments", "configs", "default.py:runlocal")]
  argv += ["--workdir", workdir, "--config.progress=False", *flags]
  err = expect_clear_error(lambda: train.train(*train.parse_args(argv)))
  field = flags[-1].split("=")[0][len("--config.") :]
  value = flags[-1].split("=")[1]
  assert field in str(err) or value in str(err), (flags, str(err))
