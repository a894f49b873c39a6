"""Tests for coopjax.models: shapes, parameter counts, losses, BatchNorm handling."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coopjax
from coopjax.training import models


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _conv(cin, cout, bias=False):
  return 9 * cin * cout + (cout if bias else 0)


def _shapes(model, x, **kwargs):
  """Variable shapes without running the initialisers (no RNG compilation)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, **kwargs))


def _fake_init(model, x, seed=0, **kwargs):
  """He-scaled NumPy values in the shapes model.init would give.

  Random initialisers compile one threefry kernel per shape on CPU (seconds
  each); filling the shapes from NumPy keeps these tests fast.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
    elif name == "var":
      value = np.ones(leaf.shape)
    elif name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "mean":
      value = np.zeros(leaf.shape)
    else:
      value = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _shapes(model, x, **kwargs))


# ---------------------------------------------------------------------------
# shapes and parameter counts


@pytest.mark.parametrize("features", [(), (64,), (64, 32)])
def test_mlp_shapes_and_count(features):
  model = models.MLP(features=features, num_classes=10)
  x = jnp.ones((5, 8, 8, 1))
  variables = _fake_init(model, x)
  chex.assert_shape(model.apply(variables, x), (5, 10))
  widths = [64, *features, 10]
  expected = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))
  assert models.num_params(variables) == expected == _count(variables["params"])
  assert models.num_params(variables["params"]) == expected


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_cnn_shapes_and_count(shape):
  model = models.CNN(features=(8, 16), hidden=32, num_classes=7)
  x = jnp.ones((3, *shape))
  variables = _fake_init(model, x)
  chex.assert_shape(model.apply(variables, x), (3, 7))
  h, w = shape[0] // 4, shape[1] // 4
  expected = _conv(shape[2], 8, True) + _conv(8, 16, True) + (h * w * 16 + 1) * 32 + (32 + 1) * 7
  assert models.num_params(variables) == expected


def _resnet20_count(norm, num_classes=10, widths=(16, 32, 64), blocks=3):
  bias = norm == "none"
  norm_params = 0 if norm == "none" else 2  # scale and bias per channel
  total = _conv(3, widths[0], bias) + norm_params * widths[0]
  cin = widths[0]
  for c in widths:
    for _ in range(blocks):
      total += _conv(cin, c, bias) + _conv(c, c, bias) + 2 * norm_params * c
      cin = c
  return total + (widths[-1] + 1) * num_classes


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_resnet20_count(norm):
  model = models.ResNet20(norm=norm)
  variables = _shapes(model, jnp.ones((1, 32, 32, 3)))
  expected = _resnet20_count(norm)
  assert models.num_params(variables) == expected
  if norm == "batch":
    assert expected == 269_722  # He et al. (2016), Table 6: 0.27M
    # Running mean and variance per normalised channel: 19 norm layers.
    assert _count(variables["batch_stats"]) == 2 * (16 + 2 * 3 * (16 + 32 + 64))
  assert models.has_batch_stats(model) == (norm == "batch")


def test_resnet20_forward_backward_bn():
  model = models.ResNet20(num_classes=10)
  x = np.random.default_rng(1).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  y = np.array([0, 1, 2, 3], np.int32)
  variables = _fake_init(model, x[:1])
  loss_fn = models.make_bn_loss_fn(model, num_classes=10)

  @jax.jit
  def run(variables):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables, {"image": x, "label": y}
    )
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    eval_logits = model.apply(variables, x)
    return loss, new_stats, grads, logits, eval_logits

  loss, new_stats, grads, logits, eval_logits = run(variables)
  chex.assert_shape(eval_logits, (4, 10))
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads["params"]["Dense_0"]["kernel"]).sum()) > 0
  # No gradient reaches the running statistics; they are returned updated instead.
  for g in jax.tree.leaves(grads["batch_stats"]):
    assert float(jnp.abs(g).max()) == 0.0
  chex.assert_trees_all_equal_shapes(new_stats, variables["batch_stats"])
  # The stem's statistics follow momentum 0.9 on this batch's per-channel mean
  # (running mean starts at 0): NumPy 3×3 'SAME' convolution.
  kernel = np.asarray(variables["params"]["Conv_0"]["kernel"])
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  stem = sum(
    padded[:, i : i + 32, j : j + 32, :] @ kernel[i, j] for i in range(3) for j in range(3)
  )
  np.testing.assert_allclose(
    new_stats["BatchNorm_0"]["mean"], 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6
  )
  # Cross-entropy matches the logits of the training-mode forward pass.
  logp = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(loss, -logp[np.arange(4), y].mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="make_bn_loss_fn"):
    models.make_loss_fn(model)


def test_basic_block_shortcut_option_a():
  """Zero weights: conv → 0, BN(0) = 0, so the block returns relu(shortcut) = padded subsample."""
  block = models._BasicBlock(channels=8, stride=2, norm="batch", num_groups=2)
  x = np.random.default_rng(0).uniform(size=(2, 6, 6, 4)).astype(np.float32) + 0.1
  variables = _fake_init(block, x, train=False)
  zero = jax.tree.map(jnp.zeros_like, variables["params"])
  out, _ = block.apply(
    {"params": zero, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=True
  )
  expected = np.pad(np.asarray(x)[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2)))
  np.testing.assert_allclose(out, expected, atol=1e-6)


def _vgg16_count(num_classes=10):
  total, cin = 0, 3
  for item in models.VGG16_CONFIG:
    if item != "M":
      total += _conv(cin, item) + 2 * item
      cin = item
  return total + (512 + 1) * num_classes


def test_vgg16_count_and_forward_backward():
  assert [c for c in models.VGG16_CONFIG if c != "M"] == [64, 64, 128, 128] + [256] * 3 + [512] * 6
  model = models.VGG16(num_classes=10)
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  variables = _fake_init(model, x)
  assert models.num_params(variables) == _vgg16_count() == 14_724_042
  loss_fn = models.make_bn_loss_fn(model)
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    variables, {"image": x, "label": jnp.array([3, 7])}
  )
  assert np.isfinite(float(loss))
  chex.assert_tree_all_finite(grads)


# ---------------------------------------------------------------------------
# losses and metrics


def test_make_loss_fn_matches_numpy_and_stacks():
  model = models.MLP(features=(16,), num_classes=5)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 3)).astype(np.float32)
  y = rng.integers(0, 5, size=6).astype(np.int32)
  variables = model.init(jax.random.key(0), x)  # flax's own initialisers, once
  loss_fn = models.make_loss_fn(model, num_classes=5, weight_decay=0.01)
  # NumPy forward pass and loss.
  p = jax.tree.map(np.asarray, variables["params"])
  h = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
  z = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  z = z - z.max(1, keepdims=True)
  ce = -(z[np.arange(6), y] - np.log(np.exp(z).sum(1))).mean()
  l2 = sum((v.astype(np.float64) ** 2).sum() for v in jax.tree.leaves(p))
  want = ce + 0.005 * l2
  batch = {"image": x, "label": y}
  np.testing.assert_allclose(loss_fn(variables, batch), want, rtol=1e-5)
  np.testing.assert_allclose(loss_fn(variables["params"], batch), want, rtol=1e-5)
  # The core's contract: vmapped over stacked workers, one scalar each.
  X = coopjax.replicate(variables, 3)
  stacked = {"image": np.stack([x, x, 2 * x]), "label": np.stack([y, y, y])}
  losses = jax.jit(jax.vmap(loss_fn))(X, stacked)
  chex.assert_shape(losses, (3,))
  np.testing.assert_allclose(losses[:2], want, rtol=1e-5)
  assert abs(float(losses[2]) - want) > 1e-3
  with pytest.raises(ValueError, match="num_classes=4"):
    models.make_loss_fn(model, num_classes=4)(variables, batch)


def test_accuracy_and_evaluate():
  logits = jnp.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(models.accuracy(logits, jnp.array([1, 0, 0])), 2 / 3)
  model = models.CNN(features=(4,), hidden=8, num_classes=3)
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(7, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 3, size=7).astype(np.int32)
  variables = _fake_init(model, x)
  logits = np.asarray(model.apply(variables, x))
  z = logits - logits.max(1, keepdims=True)
  ce = -(z[np.arange(7), y] - np.log(np.exp(z).sum(1))).mean()
  acc = (logits.argmax(1) == y).mean()
  for bs in (3, 7, 100):  # padded remainder, exact, larger than the set
    out = models.evaluate(model, variables, x, y, batch_size=bs)
    np.testing.assert_allclose(out["loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(out["accuracy"], acc)
  with pytest.raises(ValueError, match="batch_size"):
    models.evaluate(model, variables, x, y, batch_size=0)


def test_evaluate_uses_running_statistics():
  model = models.ResNet20(widths=(4, 8), blocks_per_stage=1, num_classes=3)
  x = np.random.default_rng(0).uniform(size=(5, 8, 8, 3)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1], np.int32)
  variables = _fake_init(model, x)
  variables["batch_stats"] = jax.tree.map(lambda a: a + 0.5, variables["batch_stats"])
  both = jax.jit(
    lambda v: (model.apply(v, x), model.apply(v, x, train=True, mutable=["batch_stats"])[0])
  )
  logits, train_logits = (np.asarray(a) for a in both(variables))
  z = logits - logits.max(1, keepdims=True)
  ce = -(z[np.arange(5), y] - np.log(np.exp(z).sum(1))).mean()
  np.testing.assert_allclose(models.evaluate(model, variables, x, y, 2)["loss"], ce, rtol=1e-5)
  # Inference mode differs from training mode (batch statistics).
  assert np.abs(np.asarray(train_logits) - logits).max() > 1e-3


# ---------------------------------------------------------------------------
# BatchNorm state in the stacked layout


def test_params_mask_and_merge_batch_stats():
  model = models.ResNet20(widths=(4,), blocks_per_stage=1, num_classes=2)
  variables = _fake_init(model, jnp.ones((1, 8, 8, 3)))
  mask = models.params_mask(variables)
  assert all(jax.tree.leaves(mask["params"]))
  assert not any(jax.tree.leaves(mask["batch_stats"]))
  chex.assert_trees_all_equal_structs(mask, variables)
  X = coopjax.replicate(variables, 3, num_aux=1)
  new = jax.tree.map(lambda s: jnp.stack([s + 1, s + 2, s + 3]), variables["batch_stats"])
  merged = models.merge_batch_stats(X, new)
  for old, got in zip(
    jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(merged["batch_stats"]), strict=True
  ):
    np.testing.assert_allclose(got[:3], np.stack([old + 1, old + 2, old + 3]))
    np.testing.assert_allclose(got[3], old)  # auxiliary row untouched
  chex.assert_trees_all_equal(merged["params"], X["params"])
  with pytest.raises(ValueError, match="batch_stats"):
    models.merge_batch_stats({"params": X["params"]}, new)


def test_bn_model_in_cooperative_step_keeps_local_statistics():
  """Periodic averaging τ = 2 with a BN ResNet: params agree after a mix, statistics stay local."""
  m = 2
  model = models.ResNet20(widths=(4, 8), blocks_per_stage=1, num_classes=3)
  variables = _fake_init(model, jnp.ones((1, 8, 8, 3)))
  tx = coopjax.local_sgd(
    optax.sgd(0.1), tau=2, num_workers=m, mix_mask=models.params_mask(variables)
  )
  step = coopjax.make_step(models.make_bn_loss_fn(model), tx, has_aux=True)
  X = coopjax.replicate(variables, m)
  opt_state = tx.init(X)
  rng = np.random.default_rng(0)
  for k in (1, 2):
    batch = {
      "image": rng.uniform(size=(m, 4, 8, 8, 3)).astype(np.float32),
      "label": rng.integers(0, 3, size=(m, 4)).astype(np.int32),
    }
    X, opt_state, metrics = step(X, opt_state, batch)
    X = models.merge_batch_stats(X, metrics["aux"])
    jax.block_until_ready(X)
    for leaf in jax.tree.leaves(X["params"]):
      same = np.allclose(leaf[0], leaf[1], atol=1e-6)
      assert same == (k == 2)  # different data before the mix, equal after step τ = 2
  # Each worker's statistics are its own fresh ones, never averaged.
  for got, new in zip(
    jax.tree.leaves(X["batch_stats"]), jax.tree.leaves(metrics["aux"]), strict=True
  ):
    np.testing.assert_array_equal(got, new)
    assert not np.allclose(got[0], got[1])


def test_loss_and_evaluate_accept_plain_flax_modules():
  """A module whose __call__ has no ``train`` argument (logistic regression)."""
  model = nn.Dense(3)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((5, 4)).astype(np.float32)
  y = np.array([0, 2, 1, 1, 0], np.int32)
  variables = _fake_init(model, x)
  p = jax.tree.map(np.asarray, variables["params"])
  z = x @ p["kernel"] + p["bias"]
  z = z - z.max(1, keepdims=True)
  ce = -(z[np.arange(5), y] - np.log(np.exp(z).sum(1))).mean()
  np.testing.assert_allclose(
    models.make_loss_fn(model)(variables, {"image": x, "label": y}), ce, rtol=1e-5
  )
  np.testing.assert_allclose(models.evaluate(model, variables, x, y)["loss"], ce, rtol=1e-5)
