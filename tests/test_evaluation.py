"""coopjax.evaluation_model: eq. 13 for mixed leaves, the workers only for kept-local ones."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import coopjax
from coopjax.training import data as cdata
from coopjax.training import models
from coopjax.training import nnx_models

M = 4


def _random_X(rows, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "params": {"w": jnp.asarray(rng.normal(size=(rows, 3, 2)), jnp.float32)},
    "batch_stats": {"mean": jnp.asarray(rng.normal(size=(rows, 2)), jnp.float32)},
  }


def test_mixed_leaves_over_all_rows_kept_leaves_over_workers():
  mask = {"params": True, "batch_stats": False}
  tx = coopjax.easgd(optax.sgd(0.1), tau=2, alpha=0.1, num_workers=M, mix_mask=mask)
  X = _random_X(M + 1)
  u = coopjax.evaluation_model(X, tx)
  w, s = np.asarray(X["params"]["w"]), np.asarray(X["batch_stats"]["mean"])
  np.testing.assert_allclose(u["params"]["w"], w.mean(0), rtol=1e-6)  # eq. 13: all m + 1 rows
  np.testing.assert_allclose(u["batch_stats"]["mean"], s[:M].mean(0), rtol=1e-6)  # workers
  # the same from an explicit layout and mask (no transformation)
  v = coopjax.evaluation_model(X, coopjax.Layout(M, 1), mix_mask=mask)
  jax.tree.map(np.testing.assert_array_equal, u, v)
  # without a mask every leaf is mixed: the plain average of all rows
  plain = coopjax.evaluation_model(X, M, num_aux=1)
  np.testing.assert_allclose(plain["batch_stats"]["mean"], s.mean(0), rtol=1e-6)


def test_bad_mask_and_layout_name_the_fix():
  tx = coopjax.easgd(
    optax.sgd(0.1), tau=2, alpha=0.1, num_workers=M, mix_mask={"params": True, "batch_stats": False}
  )
  with pytest.raises(ValueError, match="drop the mix_mask"):
    coopjax.evaluation_model(_random_X(M + 1), tx, mix_mask={"params": True, "batch_stats": True})
  with pytest.raises(ValueError, match="rows"):
    coopjax.evaluation_model(_random_X(M), tx)
  with pytest.raises(ValueError, match="mix_mask"):
    coopjax.evaluation_model(_random_X(M + 1), coopjax.Layout(M, 1), mix_mask={"nope": False})


def test_non_blocking_is_settled_first():
  alpha, tau = 0.2, 2
  tx = coopjax.nonblocking_easgd(optax.sgd(0.1), tau=tau, alpha=alpha, num_workers=M)
  X = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(M + 1, 3)), jnp.float32)}
  state = tx.init(X)
  grads = {"w": jnp.ones((M + 1, 3))}
  for _ in range(tau):  # one mixing step: its anchor reduction is in flight
    updates, state = tx.update(grads, state, X)
    X = optax.apply_updates(X, updates)
  with pytest.raises(ValueError, match="opt_state"):
    coopjax.evaluation_model(X, tx)
  u = coopjax.evaluation_model(X, tx, state)
  settled = coopjax.settle_easgd(X, state, alpha)
  np.testing.assert_allclose(u["w"], np.asarray(settled["w"]).mean(0), rtol=1e-6)


def _train_easgd_bn(steps=40):
  ds = cdata.load_dataset("digits")
  model = models.MLP(features=(32,), num_classes=10, norm="batch")
  variables = model.init(jax.random.key(0), jnp.zeros((1, *ds.train_x.shape[1:])))
  mask = models.params_mask(variables)
  tx = coopjax.easgd(optax.sgd(0.1), tau=2, alpha=0.2, num_workers=M, mix_mask=mask)
  step = coopjax.make_step(
    models.make_bn_loss_fn(model), tx, has_aux=True, merge_aux=models.merge_batch_stats
  )
  X = coopjax.replicate(variables, M, 1)
  state = tx.init(X)
  batches = cdata.make_worker_batches(
    ds.train_x, ds.train_y, cdata.split_iid(len(ds.train_y), M, seed=0), 32, seed=0
  )
  for _ in range(steps):
    X, state, _ = step(X, state, next(batches))
  return ds, model, tx, X, state


def test_easgd_batchnorm_evaluates_like_the_workers():
  ds, model, tx, X, state = _train_easgd_bn()
  u = coopjax.evaluation_model(X, tx, state)
  # the anchor's statistics never moved from their initial values...
  np.testing.assert_array_equal(X["batch_stats"]["BatchNorm_0"]["var"][M], 1.0)
  # ...and never reach the evaluation: statistics = the workers' mean
  workers_mean = np.asarray(X["batch_stats"]["BatchNorm_0"]["var"][:M]).mean(0)
  np.testing.assert_allclose(u["batch_stats"]["BatchNorm_0"]["var"], workers_mean, rtol=1e-6)
  # poisoning the anchor's statistics changes nothing (coopjax.average would give NaN)
  poisoned = dict(X, batch_stats=jax.tree.map(lambda x: x.at[M].set(jnp.nan), X["batch_stats"]))
  assert np.isnan(np.asarray(coopjax.average(poisoned)["batch_stats"]["BatchNorm_0"]["var"])).all()
  v = coopjax.evaluation_model(poisoned, tx, state)
  jax.tree.map(np.testing.assert_array_equal, u, v)
  # against evaluating the workers: the evaluation model scores like them
  acc = models.evaluate(model, u, ds.test_x, ds.test_y)["accuracy"]
  worker_accs = [
    models.evaluate(model, coopjax.worker(X, i), ds.test_x, ds.test_y)["accuracy"] for i in range(M)
  ]
  assert acc >= min(worker_accs) - 0.02, (acc, worker_accs)
  assert acc > 0.8


def _nnx_net(rngs):
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(64, 16, rngs=rngs)
      self.bn = nnx.BatchNorm(16, rngs=rngs)
      self.out = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.bn(self.dense(x.reshape(x.shape[0], -1)))))

  return Net(rngs)


def test_nnx_recipe_updates_statistics_and_the_naive_state_warns():
  net = _nnx_net(nnx.Rngs(0))
  graphdef, variables = nnx_models.split(net)
  mask = models.params_mask(variables)
  tx = coopjax.easgd(optax.sgd(0.1), tau=2, alpha=0.2, num_workers=M, mix_mask=mask)
  step = coopjax.make_step(
    nnx_models.make_loss_fn(graphdef), tx, has_aux=True, merge_aux=models.merge_batch_stats
  )
  X = coopjax.replicate(variables, M, 1)
  state = tx.init(X)
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.normal(size=(M, 8, 64)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, 10, (M, 8)), jnp.int32),
  }
  X, state, _ = step(X, state, batch)
  # the statistics of worker i are those of its minibatch (momentum 0.99 from mean 0)
  h = np.einsum(
    "bd,df->bf",
    np.asarray(batch["image"][1]),
    np.asarray(variables["params"]["dense"]["kernel"][...]),
  )
  h = h + np.asarray(variables["params"]["dense"]["bias"][...])
  np.testing.assert_allclose(
    X["batch_stats"]["bn"]["mean"][...][1], 0.01 * h.mean(0), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_array_equal(X["batch_stats"]["bn"]["mean"][...][M], 0.0)  # anchor untouched
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    u = coopjax.evaluation_model(X, tx, state)  # the recipe: no warning
  np.testing.assert_allclose(
    u["batch_stats"]["bn"]["mean"][...],
    np.asarray(X["batch_stats"]["bn"]["mean"][...][:M]).mean(0),
    rtol=1e-6,
  )
  # the naive path: one nnx.split state
  _, naive = nnx.split(_nnx_net(nnx.Rngs(0)))
  with pytest.warns(UserWarning, match="nnx.BatchStat"):
    coopjax.evaluation_model(coopjax.replicate(naive, M), M)
