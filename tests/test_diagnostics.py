"""Divergence detection: flags against NumPy, the culprit worker and step, stop and skip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import diagnostics
from coopjax import topology

M = 4


def _batches(steps, m=M, bad=None, value=np.nan):
  """``ref.make_batches`` with ``value`` written into worker ``bad[1]``'s batch at step ``bad[0]``."""
  A, b = ref.make_batches(steps, m, seed=5)
  if bad is not None:
    k, i = bad
    A[k - 1, i, 0, 0] = value  # steps count from 1
  return A, b


def _poisoned(W, j):
  """Rows of ``x W`` (x_i <- sum_l W[l, i] x_l) that are non-finite when x_j is NaN.

  IEEE arithmetic: the dense mix multiplies NaN by W's zeros too, and 0 * NaN is NaN.
  """
  x = np.zeros(W.shape[0])
  x[j] = np.nan
  return ~np.isfinite(np.einsum("li,l->i", W, x))


def _run(step, tx, A, b, num_aux=0, policy="stop"):
  X = coopjax.replicate(ref.init_params(), A.shape[1], num_aux)
  state = tx.init(X)
  history = []
  for k in range(A.shape[0]):
    X, state, metrics = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
    history.append((X, state, metrics))
    diagnostics.check_finite(metrics, policy=policy)
  return X, state, history


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("bad_worker", [0, 2])
def test_nan_in_one_workers_batch_names_that_worker_and_step(bad_worker, value):
  tx = coopjax.local_sgd(optax.sgd(0.05), tau=2, num_workers=M)
  step = coopjax.make_step(ref.loss_fn, tx, check_finite=True)
  A, b = _batches(6, bad=(3, bad_worker), value=value)
  with pytest.raises(diagnostics.DivergenceError) as info:
    _run(step, tx, A, b)
  err = info.value
  assert isinstance(err, FloatingPointError)
  # Independent reference: the batches that hold a non-finite value, by step and worker.
  bad_steps, bad_workers = np.nonzero(~np.isfinite(A).all(axis=(2, 3)))
  assert err.step == bad_steps[0] + 1 == 3
  assert err.workers == sorted(bad_workers[bad_steps == bad_steps[0]].tolist()) == [bad_worker]
  # Step 3 is a local step (tau = 2): only that worker's row went bad.
  assert err.rows == [bad_worker]
  assert f"step 3 on worker(s) [{bad_worker}]" in str(err)


def test_flags_follow_the_mixing_matrix_after_a_mixing_step():
  W = topology.ring(M)
  tx = coopjax.dpsgd(optax.sgd(0.05), W=W)  # mixes every step
  step = coopjax.make_step(ref.loss_fn, tx, check_finite=True)
  A, b = _batches(2, bad=(1, 1))
  X = coopjax.replicate(ref.init_params(), M)
  _, _, metrics = step(X, tx.init(X), (jnp.asarray(A[0]), jnp.asarray(b[0])))
  assert np.asarray(metrics["nonfinite_workers"]).tolist() == [i == 1 for i in range(M)]
  np.testing.assert_array_equal(np.asarray(metrics["nonfinite_rows"]), _poisoned(W, 1))


def test_easgd_anchor_row_is_reported_after_the_pull():
  alpha = 0.2
  tx = coopjax.easgd(optax.sgd(0.05), tau=1, alpha=alpha, num_workers=M)
  step = coopjax.make_step(ref.loss_fn, tx, check_finite=True)
  A, b = _batches(1, bad=(1, 3))
  X = coopjax.replicate(ref.init_params(), M, 1)
  _, _, metrics = step(X, tx.init(X), (jnp.asarray(A[0]), jnp.asarray(b[0])))
  W = topology.easgd(M, alpha)
  expected = _poisoned(W, 3)
  np.testing.assert_array_equal(np.asarray(metrics["nonfinite_rows"]), expected)
  rows = str(np.flatnonzero(expected).tolist()).replace("[", r"\[").replace("]", r"\]")
  with pytest.raises(diagnostics.DivergenceError, match=rf"worker\(s\) \[3\].*rows {rows}"):
    diagnostics.check_finite(metrics)


def test_overflow_in_the_update_is_caught_with_finite_losses():
  tx = coopjax.local_sgd(optax.sgd(1e38), tau=2, num_workers=M)
  step = coopjax.make_step(ref.loss_fn, tx, check_finite=True)
  A, b = _batches(1)
  X = coopjax.replicate(ref.init_params(), M)
  _, _, metrics = step(X, tx.init(X), (jnp.asarray(A[0] * 1e3), jnp.asarray(b[0])))
  assert np.isfinite(np.asarray(metrics["worker_loss"])).all()
  with pytest.raises(diagnostics.DivergenceError, match="in the update") as info:
    diagnostics.check_finite(metrics, step=7)
  assert info.value.workers == [] and info.value.step == 7 and info.value.rows


@pytest.mark.parametrize("donate", [False, True])
def test_skip_policy_discards_the_bad_step_and_matches_a_run_without_that_batch(donate):
  tx = coopjax.local_sgd(optax.sgd(0.05, momentum=0.9), tau=2, num_workers=M)
  raw = coopjax.make_step(ref.loss_fn, tx, check_finite=True, jit=False)
  step = diagnostics.skip_nonfinite(raw, donate=donate)
  A, b = _batches(6, bad=(3, 1))
  _, _, history = _run(step, tx, A, b, policy="skip")
  skipped = [bool(h[2]["skipped"]) for h in history]
  assert skipped == [False, False, True, False, False, False]
  # Reference: the same run on the five good batches only.
  keep = [0, 1, 3, 4, 5]
  X_ref, state_ref, _ = _run(step, tx, A[keep], b[keep])
  X, state, _ = history[-1]
  for a, c in zip(jax.tree.leaves((X, state)), jax.tree.leaves((X_ref, state_ref)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  assert int(coopjax.step_count(state)) == 5
  assert diagnostics.check_finite(history[2][2], policy="skip") == [1]


def test_nonfinite_rows_matches_numpy():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(6, 3, 2)), "b": rng.normal(size=(6,)), "n": np.arange(6)}
  tree["a"][4, 2, 1] = np.inf
  tree["b"][1] = np.nan
  expected = ~np.isfinite(tree["a"]).reshape(6, -1).all(1) | ~np.isfinite(tree["b"])
  got = jax.jit(diagnostics.nonfinite_rows)(jax.tree.map(jnp.asarray, tree))
  np.testing.assert_array_equal(np.asarray(got), expected)
  assert np.asarray(diagnostics.nonfinite_rows(tree, 3)).tolist() == [False, True, False]


def test_bad_policy_and_missing_flags_are_clear_errors():
  with pytest.raises(ValueError, match="'stop'"):
    diagnostics.check_policy("ignore")
  with pytest.raises(KeyError, match="check_finite=True"):
    diagnostics.check_finite({"worker_loss": np.zeros(2)})
  ok = {"nonfinite_workers": np.zeros(3, bool), "nonfinite_rows": np.zeros(3, bool)}
  assert diagnostics.check_finite(ok, step=1) == []
  tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=M)
  guarded = diagnostics.skip_nonfinite(coopjax.make_step(ref.loss_fn, tx, jit=False))
  A, b = _batches(1)
  X = coopjax.replicate(ref.init_params(), M)
  with pytest.raises(ValueError, match="check_finite=True"):
    guarded(X, tx.init(X), (jnp.asarray(A[0]), jnp.asarray(b[0])))


def test_sharded_step_reports_the_worker_with_a_nan_batch():
  mesh = coopjax.worker_mesh(8)
  m, bad = 8, 5
  tx = coopjax.local_sgd(optax.sgd(0.05), tau=2, num_workers=m)
  X = coopjax.shard(coopjax.replicate(ref.init_params(), m), mesh)
  opt_state = coopjax.sharding.init(tx, X, mesh)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh, check_finite=True)
  A, b = _batches(1, m=m, bad=(1, bad))
  batch = coopjax.shard_batch((jnp.asarray(A[0]), jnp.asarray(b[0])), mesh)
  _, _, metrics = step(X, opt_state, batch)
  expected = ~np.isfinite(A[0]).all(axis=(1, 2))  # the reference: which batch holds a NaN
  np.testing.assert_array_equal(np.asarray(metrics["nonfinite_workers"]), expected)
  with pytest.raises(diagnostics.DivergenceError, match=rf"step 1 on worker\(s\) \[{bad}\]"):
    diagnostics.check_finite(metrics)
