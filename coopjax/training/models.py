r"""Flax models for the Cooperative SGD experiments, and their losses.

Models (flax linen, used through the pure ``model.apply``):

* :class:`MLP` — dense ReLU layers on flattened inputs.
* :class:`CNN` — two 3×3 convolutions with max pooling, then two dense layers.
* :class:`ResNet20` — the CIFAR ResNet-20 of He et al. (2016, §4.2): a 3×3
  stem, 3 stages × 3 basic blocks with 16/32/64 channels, parameter-free
  shortcuts (option A: stride-2 subsampling and zero-padded channels), global
  average pooling; 0.27M parameters for 10 classes.
* :class:`VGG16` — VGG-16 for 32×32 inputs as in the CIFAR-10 experiments of
  Wang & Joshi (JMLR 2021, Appendix A): 13 3×3 convolutions
  (64,64,M,128,128,M,256×3,M,512×3,M,512×3,M), then one linear classifier.

Every model takes ``model.apply(variables, x, train=False)`` with ``x`` of
shape ``[batch, H, W, C]`` (``[batch, d]`` also works for :class:`MLP`) and
returns logits ``[batch, num_classes]``.

**Batch normalisation.** :class:`ResNet20` and :class:`VGG16` use BatchNorm by
default (``norm="batch"``; ``"group"`` and ``"none"`` give BatchNorm-free
variants). Their variables are ``{"params": ..., "batch_stats": ...}``; the
running statistics are a separate collection, never differentiated. coopjax's
policy is that a worker's "params" pytree is the whole variables dict, so the
statistics travel with the worker in ``X``:

* the loss is built by :func:`make_bn_loss_fn` and returns
  ``(loss, new_batch_stats)``; its gradient with respect to ``batch_stats`` is
  exactly zero, so an SGD step leaves them unchanged (keep weight decay and
  other parameter-only transforms off them with :func:`params_mask`, e.g.
  ``optax.masked(optax.add_decayed_weights(wd), params_mask(variables))``);
* by default batch statistics are **local per-worker state**: build the
  algorithm with ``mix_mask=params_mask(variables)`` (so mixing steps leave the
  statistics alone) and, after each step, write every worker's fresh
  statistics into its row of ``X`` with :func:`merge_batch_stats`;
* to **average** the statistics with the parameters instead, leave
  ``mix_mask`` unset and skip :func:`merge_batch_stats` right after mixing
  steps: the rows then keep the mixed statistics (those of the previous
  step's forward pass, one step old), and local steps keep refreshing them.

Evaluation uses the running statistics (``train=False``). Models without
BatchNorm use :func:`make_loss_fn`, whose ``loss_fn(params, batch) -> scalar``
is the core's contract for one worker::

  model = MLP(features=(64,), num_classes=10)
  params = model.init(jax.random.key(0), x[:1])          # {"params": ...}
  loss_fn = make_loss_fn(model)
  step = coopjax.make_step(loss_fn, tx)

  bn_model = ResNet20()
  variables = bn_model.init(jax.random.key(0), x[:1])    # params + batch_stats
  loss_fn = make_bn_loss_fn(bn_model)
  tx = coopjax.local_sgd(optax.sgd(0.1), tau=tau, num_workers=m, mix_mask=params_mask(variables))
  step = coopjax.make_step(loss_fn, tx, has_aux=True)
  X, opt_state, metrics = step(X, opt_state, batch)
  X = merge_batch_stats(X, metrics["aux"])               # local statistics

NNX users get the same pure form from ``nnx.split``: stack the state with
``coopjax.replicate`` and call ``nnx.merge(graphdef, state)(x)`` inside the
loss (see :mod:`coopjax.workers`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

__all__ = [
  "MLP",
  "CNN",
  "ResNet20",
  "VGG16",
  "VGG16_CONFIG",
  "has_batch_stats",
  "num_params",
  "params_mask",
  "merge_batch_stats",
  "cross_entropy",
  "accuracy",
  "make_loss_fn",
  "make_bn_loss_fn",
  "evaluate",
]

_NORMS = ("batch", "group", "none")
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: VGG-16 convolution widths, ``"M"`` marks a 2×2 max pool.
VGG16_CONFIG = (
  64,
  64,
  "M",
  128,
  128,
  "M",
  256,
  256,
  256,
  "M",
  512,
  512,
  512,
  "M",
  512,
  512,
  512,
  "M",
)


def _check_norm(norm: str) -> None:
  if norm not in _NORMS:
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}.")


def _norm_layer(norm: str, train: bool, num_groups: int, name: str | None = None):
  if norm == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
  if norm == "group":
    return nn.GroupNorm(num_groups=num_groups, name=name)
  return lambda x: x


class MLP(nn.Module):
  r"""Multilayer perceptron on flattened inputs.

  .. math::

     h_0 = \mathrm{flatten}(x),\quad h_{l} = \mathrm{relu}(W_l h_{l-1} + b_l),\quad
     \text{logits} = W_{L+1} h_L + b_{L+1},

  with :math:`\sum_l (d_{l-1} + 1) d_l` parameters.

  Attributes:
    features: hidden widths (empty: multinomial logistic regression).
    num_classes: output width.
    norm: ``"none"`` (default), or ``"batch"`` / ``"group"`` to normalise every
      hidden layer before its ReLU (``"batch"`` keeps ``batch_stats``).
    num_groups: groups of ``norm="group"``.

  Examples:
    One hidden layer of 3 on 4 inputs, 2 classes: ``(4 + 1)·3 + (3 + 1)·2 = 23``
    parameters; inputs are flattened, so ``[5, 2, 2]`` works too.

    >>> import jax, jax.numpy as jnp
    >>> model = MLP(features=(3,), num_classes=2)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> num_params(params), model.apply(params, jnp.zeros((5, 2, 2))).shape
    (23, (5, 2))
  """

  features: Sequence[int] = (256,)
  num_classes: int = 10
  norm: str = "none"
  num_groups: int = 2

  @property
  def has_batch_stats(self) -> bool:
    return self.norm == "batch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_norm(self.norm)
    x = x.reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.Dense(width)(x)
      x = nn.relu(_norm_layer(self.norm, train, self.num_groups)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Small CNN: [3×3 conv, ReLU, 2×2 max pool] × len(features), dense ReLU, linear.

  Attributes:
    features: channels of the convolutions.
    hidden: width of the dense layer.
    num_classes: output width.

  Examples:
    One 3×3 convolution to 4 channels (``9·4 + 4 = 40``), pooling 8×8 to 4×4,
    a dense layer ``64 → 8`` (520) and ``8 → 3`` (27): 587 parameters.
    ``jax.eval_shape`` counts them without computing anything:

    >>> import jax, jax.numpy as jnp
    >>> model = CNN(features=(4,), hidden=8, num_classes=3)
    >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    >>> num_params(shapes)
    587
  """

  features: Sequence[int] = (32, 64)
  hidden: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    for width in self.features:
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
  """Two 3×3 conv-norm layers with a parameter-free (option A) shortcut."""

  channels: int
  stride: int
  norm: str
  num_groups: int

  @nn.compact
  def __call__(self, x, train: bool):
    bias = self.norm == "none"
    y = nn.Conv(
      self.channels,
      (3, 3),
      (self.stride, self.stride),
      padding=1,
      use_bias=bias,
      kernel_init=_conv_init,
    )(x)
    y = nn.relu(_norm_layer(self.norm, train, self.num_groups)(y))
    y = nn.Conv(self.channels, (3, 3), padding=1, use_bias=bias, kernel_init=_conv_init)(y)
    y = _norm_layer(self.norm, train, self.num_groups)(y)
    shortcut = x
    if self.stride != 1:
      shortcut = shortcut[:, :: self.stride, :: self.stride, :]
    extra = self.channels - x.shape[-1]
    if extra:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(y + shortcut)


class ResNet20(nn.Module):
  r"""CIFAR ResNet-20 (He et al. 2016, §4.2; depth 6n + 2 with n = 3).

  Stem 3×3 conv (16) → norm → ReLU; stages of ``blocks_per_stage`` basic blocks
  with ``widths`` channels, the first block of stages 2 and 3 at stride 2;
  global average pooling; linear classifier. Shortcuts are parameter-free
  (subsample, zero-pad channels), so with BatchNorm the parameter count is

  .. math::

     27\cdot16 + 2\cdot16 + \sum_{\text{blocks}} (9 c_{in} c + 9 c^2 + 4c) + 65 K
     = 269{,}722 \quad (K = 10).

  Attributes:
    num_classes: K.
    widths: channels per stage.
    blocks_per_stage: basic blocks per stage (3 for ResNet-20).
    norm: ``"batch"`` (default; adds the ``batch_stats`` collection), ``"group"``
      (GroupNorm, no state) or ``"none"`` (convolutions get biases).
    num_groups: groups for ``norm="group"``.

  Examples:
    The parameter count above, from the shapes alone (the count does not depend
    on the image size):

    >>> import jax, jax.numpy as jnp
    >>> shapes = jax.eval_shape(ResNet20().init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> num_params(shapes), sorted(shapes)
    (269722, ['batch_stats', 'params'])
  """

  num_classes: int = 10
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3
  norm: str = "batch"
  num_groups: int = 2

  @property
  def has_batch_stats(self) -> bool:
    return self.norm == "batch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_norm(self.norm)
    x = nn.Conv(
      self.widths[0], (3, 3), padding=1, use_bias=self.norm == "none", kernel_init=_conv_init
    )(x)
    x = nn.relu(_norm_layer(self.norm, train, self.num_groups)(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(width, stride, self.norm, self.num_groups)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class VGG16(nn.Module):
  r"""VGG-16 with normalisation for 32×32 inputs (the paper's CIFAR-10 model).

  Thirteen 3×3 conv → norm → ReLU layers (:data:`VGG16_CONFIG`), five 2×2 max
  pools (32×32 → 1×1), a spatial mean (the identity at 32×32; it keeps other
  sizes that survive five poolings valid), then one linear layer
  :math:`512 \to K`. About 14.7M parameters with BatchNorm and K = 10.

  Attributes:
    num_classes: K.
    norm: ``"batch"`` (default), ``"group"`` or ``"none"``.
    num_groups: groups for ``norm="group"``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> shapes = jax.eval_shape(VGG16().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    >>> num_params(shapes)
    14724042
  """

  num_classes: int = 10
  norm: str = "batch"
  num_groups: int = 32

  @property
  def has_batch_stats(self) -> bool:
    return self.norm == "batch"

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_norm(self.norm)
    for item in VGG16_CONFIG:
      if item == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.Conv(item, (3, 3), padding=1, use_bias=self.norm == "none", kernel_init=_conv_init)(
          x
        )
        x = nn.relu(_norm_layer(self.norm, train, self.num_groups)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


# ---------------------------------------------------------------------------
# variables helpers


def has_batch_stats(model: nn.Module) -> bool:
  """Whether ``model`` keeps a ``batch_stats`` collection (its ``has_batch_stats``, else False).

  Examples:
    >>> has_batch_stats(ResNet20()), has_batch_stats(ResNet20(norm="group")), has_batch_stats(MLP())
    (True, False, False)
  """
  return bool(getattr(model, "has_batch_stats", False))


def _as_variables(tree: PyTree) -> dict:
  """``{"params": p, ...}`` stays as is; a bare parameter dict is wrapped as ``{"params": p}``."""
  if isinstance(tree, dict) and "params" in tree:
    return tree
  return {"params": tree}


def num_params(tree: PyTree) -> int:
  """Number of trainable scalars: the ``params`` collection if present, else every leaf.

  Examples:
    >>> import numpy as np
    >>> num_params({"params": {"w": np.zeros((3, 2)), "b": np.zeros(2)}, "batch_stats": {}})
    8
    >>> num_params({"w": np.zeros((3, 2))})  # a bare parameter dict
    6
  """
  tree = _as_variables(tree)["params"]
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def params_mask(variables: PyTree) -> PyTree:
  """A pytree of bools like ``variables``: True on ``params`` leaves, False elsewhere.

  Use it with ``optax.masked`` to keep weight decay (or any parameter-only
  transformation) off ``batch_stats``.

  Examples:
    >>> params_mask({"params": {"w": 1.0}, "batch_stats": {"mean": 0.0}})
    {'params': {'w': True}, 'batch_stats': {'mean': False}}
  """
  if not (isinstance(variables, dict) and "params" in variables):
    raise ValueError("variables must be a flax variables dict with a 'params' collection.")
  return {
    name: jax.tree.map(lambda _, keep=(name == "params"): keep, col)
    for name, col in variables.items()
  }


def merge_batch_stats(X: PyTree, new_batch_stats: PyTree) -> PyTree:
  """Writes per-worker ``batch_stats`` (leading axis m) into the first m rows of ``X``.

  ``X`` stacks m + v variables dicts (leading axis m + v); auxiliary rows keep
  their statistics. This is the default *local* policy: call it after each
  step with ``metrics["aux"]`` from ``make_step(make_bn_loss_fn(...), tx, has_aux=True)``.

  Args:
    X: stacked ``{"params": ..., "batch_stats": ...}`` with leading axis m + v.
    new_batch_stats: ``batch_stats`` with leading axis m.

  Returns:
    ``X`` with rows ``0..m-1`` of ``batch_stats`` replaced.

  Examples:
    Two workers and an anchor (row 2), whose statistics stay:

    >>> import jax.numpy as jnp
    >>> X = {"params": jnp.zeros((3, 2)), "batch_stats": {"mean": jnp.zeros((3, 2))}}
    >>> X = merge_batch_stats(X, {"mean": jnp.ones((2, 2))})
    >>> X["batch_stats"]["mean"].tolist()
    [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
  """
  if not (isinstance(X, dict) and "batch_stats" in X):
    raise ValueError("X must be a stacked variables dict holding 'batch_stats'.")
  if jax.tree.structure(X["batch_stats"]) != jax.tree.structure(new_batch_stats):
    raise ValueError("new_batch_stats must have the structure of X['batch_stats'].")

  def put(old, new):
    m = new.shape[0]
    if m > old.shape[0] or old.shape[1:] != new.shape[1:]:
      raise ValueError(f"cannot write batch_stats of shape {new.shape} into rows of {old.shape}.")
    return old.at[:m].set(new.astype(old.dtype))

  return {**X, "batch_stats": jax.tree.map(put, X["batch_stats"], new_batch_stats)}


# ---------------------------------------------------------------------------
# losses and metrics


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Mean softmax cross-entropy :math:`-\frac1b\sum_n \log \mathrm{softmax}(z_n)_{y_n}`.

  Examples:
    Equal logits over four classes give ``log 4`` whatever the labels:

    >>> import jax.numpy as jnp
    >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
    1.3863
  """
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of rows whose arg-max logit equals the integer label.

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    >>> round(float(accuracy(logits, jnp.array([0, 0, 0]))), 4)  # rows 0 and 2
    0.6667
  """
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def _mode(model: nn.Module, train: bool) -> dict:
  """``{"train": train}`` when the module's ``__call__`` takes ``train``, else ``{}``."""
  try:
    takes_train = "train" in inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    takes_train = False
  return {"train": train} if takes_train else {}


def _l2(params: PyTree) -> jax.Array:
  return sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


def _check_logits(logits, num_classes: int | None) -> None:
  if num_classes is not None and logits.shape[-1] != num_classes:
    raise ValueError(f"model returns {logits.shape[-1]} logits but num_classes={num_classes}.")


def make_loss_fn(
  model: nn.Module,
  num_classes: int | None = None,
  *,
  weight_decay: float = 0.0,
  image_key: str = "image",
  label_key: str = "label",
) -> Callable[[PyTree, dict], jax.Array]:
  r"""``loss_fn(params, batch) -> scalar`` for one worker of a model without BatchNorm.

  .. math::

     \ell(\theta; B) = \frac1{|B|}\sum_{(x, y)\in B} -\log \mathrm{softmax}(f_\theta(x))_y
       + \frac{\lambda}{2}\lVert\theta\rVert^2 .

  Args:
    model: a flax linen module without ``batch_stats``; it is called with
      ``train=True`` when its ``__call__`` takes a ``train`` argument.
    num_classes: if given, checked against the logits' width at trace time.
    weight_decay: λ (L2 on every parameter).
    image_key: batch entry holding inputs.
    label_key: batch entry holding integer labels.

  Returns:
    ``loss_fn(params, batch)``; ``params`` is ``model.init(...)`` (a
    ``{"params": ...}`` dict) or its ``"params"`` entry.

  Raises:
    ValueError: for a BatchNorm model (use :func:`make_bn_loss_fn`).

  Examples:
    Logistic regression (no hidden layer) at zero weights predicts the uniform
    distribution, so the loss is ``log 3`` (and the L2 term is 0):

    >>> import jax, jax.numpy as jnp
    >>> model = MLP(features=(), num_classes=3)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> zeros = jax.tree.map(jnp.zeros_like, params)
    >>> loss_fn = make_loss_fn(model, num_classes=3, weight_decay=1e-2)
    >>> batch = {"image": jnp.ones((2, 4)), "label": jnp.array([0, 2])}
    >>> round(float(loss_fn(zeros, batch)), 4)
    1.0986
  """
  if has_batch_stats(model):
    raise ValueError(
      f"{type(model).__name__} keeps batch_stats; use make_bn_loss_fn (loss_fn(variables, "
      f"batch) -> (loss, new_batch_stats)) or build it with norm='group' or norm='none'."
    )

  def loss_fn(params, batch):
    variables = _as_variables(params)
    logits = model.apply(variables, batch[image_key], **_mode(model, True))
    _check_logits(logits, num_classes)
    loss = cross_entropy(logits, batch[label_key])
    if weight_decay:
      loss = loss + 0.5 * weight_decay * _l2(variables["params"])
    return loss

  return loss_fn


def make_bn_loss_fn(
  model: nn.Module,
  num_classes: int | None = None,
  *,
  weight_decay: float = 0.0,
  image_key: str = "image",
  label_key: str = "label",
) -> Callable[[PyTree, dict], tuple[jax.Array, PyTree]]:
  r"""``loss_fn(variables, batch) -> (loss, new_batch_stats)`` for a BatchNorm model.

  The forward pass runs in training mode (batch statistics of this minibatch)
  and returns the updated running statistics as the auxiliary output. The
  gradient with respect to ``variables["batch_stats"]`` is zero. Use with
  ``make_step(loss_fn, tx, has_aux=True)`` and :func:`merge_batch_stats`.
  The loss is the cross-entropy plus :math:`\frac{\lambda}{2}\lVert\theta\rVert^2`
  over the ``params`` collection only.

  Args:
    model: a flax linen module with a ``batch_stats`` collection.
    num_classes: if given, checked against the logits' width at trace time.
    weight_decay: λ.
    image_key: batch entry holding inputs.
    label_key: batch entry holding integer labels.

  Returns:
    ``loss_fn(variables, batch)``.

  Examples:
    A one-BatchNorm model: the new running mean is ``(1 − 0.99) ×`` the batch
    mean ``[1.5, 2.5, 3.5]``, and the gradient of the statistics is zero:

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> class Tiny(nn.Module):
    ...   has_batch_stats = True
    ...
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))
    >>> model = Tiny()
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    >>> loss_fn = make_bn_loss_fn(model, num_classes=2)
    >>> batch = {"image": jnp.arange(6.0).reshape(2, 3), "label": jnp.array([0, 1])}
    >>> (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables, batch)
    >>> [round(float(v), 4) for v in stats["BatchNorm_0"]["mean"]]
    [0.015, 0.025, 0.035]
    >>> [float(abs(g).max()) for g in jax.tree.leaves(grads["batch_stats"])]
    [0.0, 0.0]
  """

  def loss_fn(variables, batch):
    if not (isinstance(variables, dict) and "batch_stats" in variables):
      raise ValueError("variables must be {'params': ..., 'batch_stats': ...} from model.init.")
    logits, updates = model.apply(
      variables, batch[image_key], mutable=["batch_stats"], **_mode(model, True)
    )
    _check_logits(logits, num_classes)
    loss = cross_entropy(logits, batch[label_key])
    if weight_decay:
      loss = loss + 0.5 * weight_decay * _l2(variables["params"])
    return loss, updates["batch_stats"]

  return loss_fn


def evaluate(
  model: nn.Module, params: PyTree, x: np.ndarray, y: np.ndarray, batch_size: int = 500
) -> dict[str, float]:
  """Loss and accuracy of one model on a held-out set, in inference mode.

  The set is processed in batches of ``batch_size`` (the last one padded and
  masked, so one compilation serves all batches).

  Args:
    model: the flax module.
    params: one model's ``{"params": ...}`` or variables dict (with
      ``batch_stats`` for BatchNorm models), e.g. ``coopjax.average(X)``.
    x: inputs ``[N, ...]``.
    y: integer labels ``[N]``.
    batch_size: evaluation batch size.

  Returns:
    ``{"loss": mean cross-entropy, "accuracy": fraction correct}`` as floats.

  Examples:
    At zero weights every logit is equal: the loss is ``log 3`` and the arg-max
    is class 0, right for 2 of the 5 labels (the last batch of 2 is padded):

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> model = MLP(features=(), num_classes=3)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> zeros = jax.tree.map(jnp.zeros_like, params)
    >>> x, y = np.ones((5, 4), np.float32), np.array([0, 1, 2, 0, 1])
    >>> {k: round(v, 4) for k, v in evaluate(model, zeros, x, y, batch_size=2).items()}
    {'loss': 1.0986, 'accuracy': 0.4}
  """
  x, y = np.asarray(x), np.asarray(y)
  n = len(y)
  if n == 0 or x.shape[0] != n:
    raise ValueError(
      f"x and y must hold the same positive number of examples, got {x.shape}, {y.shape}."
    )
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  batch_size = min(batch_size, n)
  variables = _as_variables(params)
  total_loss, total_correct = 0.0, 0.0
  for start in range(0, n, batch_size):
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
    valid = len(yb)
    if valid < batch_size:
      pad = batch_size - valid
      xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
    mask = np.arange(batch_size) < valid
    loss_sum, correct = _eval_batch(model, variables, xb, yb, mask)
    total_loss += float(loss_sum)
    total_correct += float(correct)
  return {"loss": total_loss / n, "accuracy": total_correct / n}


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(model, variables, xb, yb, mask):
  logits = model.apply(variables, xb, **_mode(model, False))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
  correct = jnp.argmax(logits, axis=-1) == yb
  return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(jnp.where(mask, correct, False))
