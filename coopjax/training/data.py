r"""Datasets, worker partitions and per-worker batch streams.

Cooperative SGD (Wang & Joshi, JMLR 2021, §3) runs m workers, worker i drawing
stochastic gradients from its own data :math:`\mathcal{D}_i`. This module builds
those pieces on the host with NumPy:

* :func:`load_dataset` returns a :class:`Dataset` (train/test arrays and the
  number of classes) for ``"digits"`` (scikit-learn's 1797 real 8×8 digits,
  shipped inside the wheel, the default), ``"synthetic"`` (a Gaussian mixture,
  :func:`gaussian_mixture`), and the TFDS datasets ``"mnist"``,
  ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"`` (:func:`load_tfds`, which
  reads prepared data and never downloads). :func:`least_squares` gives a
  regression problem with a known optimum for checking convergence theory.
* :func:`split_iid` and :func:`split_dirichlet` partition the training set into
  m disjoint shards covering it: uniformly at random (the IID setting of
  Theorem 1) or with Dirichlet label skew (the non-IID setting of Theorem 2).
* :class:`WorkerBatches` (built by :func:`make_worker_batches`) yields stacked
  batches ``{"image": [m, b, ...], "label": [m, b]}`` with one deterministic
  stream per worker and a saveable :class:`IteratorState` for exact resumption.

Images are ``float32`` in ``[0, 1]`` with shape ``[N, H, W, C]``; labels are
``int32``.

Example:

>>> ds = load_dataset("digits")
>>> ds.train_x.shape, ds.test_x.shape, ds.num_classes
((1438, 8, 8, 1), (359, 8, 8, 1), 10)
>>> shards = split_iid(len(ds.train_y), num_workers=4, seed=0)
>>> it = make_worker_batches(ds.train_x, ds.train_y, shards, batch_size=32, seed=0)
>>> batch = next(it)
>>> batch["image"].shape, batch["label"].shape
((4, 32, 8, 8, 1), (4, 32))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

from coopjax._validation import check_int
from coopjax._validation import check_positive

__all__ = [
  "Dataset",
  "LeastSquares",
  "IteratorState",
  "WorkerBatches",
  "TFDS_DATASETS",
  "load_dataset",
  "load_digits",
  "gaussian_mixture",
  "least_squares",
  "least_squares_loss",
  "load_tfds",
  "split_iid",
  "split_dirichlet",
  "label_histograms",
  "make_worker_batches",
]

#: TFDS names accepted by :func:`load_tfds` and :func:`load_dataset`.
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")


class Dataset(NamedTuple):
  """A classification dataset held in host memory.

  Attributes:
    train_x: training inputs, ``float32``, ``[N, ...]`` (images ``[N, H, W, C]`` in ``[0, 1]``).
    train_y: training labels, ``int32``, ``[N]``.
    test_x: held-out inputs, ``float32``, ``[N_test, ...]``.
    test_y: held-out labels, ``int32``, ``[N_test]``.
    num_classes: number of classes.

  Examples:
    >>> ds = gaussian_mixture(num_train=8, num_test=4, num_classes=2, dim=3)
    >>> ds.train_x.shape, ds.train_y.shape, ds.test_x.shape, ds.num_classes
    ((8, 3), (8,), (4, 3), 2)
  """

  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int


class LeastSquares(NamedTuple):
  r"""A least-squares problem :math:`F(w) = \frac{1}{2N}\lVert Xw - y\rVert^2` with known optimum.

  Attributes:
    x: design matrix ``[N, d]`` (``float32``).
    y: targets ``[N]`` (``float32``), ``y = X w_true + noise``.
    w_true: the planted weights ``[d]``.
    w_opt: the exact minimiser of F on ``(x, y)`` (float64 solve), ``[d]``.
    loss_opt: :math:`F_{\inf} = F(w_{opt})`.
    smoothness: :math:`L = \lambda_{\max}(X^\top X / N)`.
    strong_convexity: :math:`\mu = \lambda_{\min}(X^\top X / N)`.

  Examples:
    ``w_opt`` solves the normal equations, so the full gradient vanishes there
    and the full-batch loss is ``loss_opt``:

    >>> import numpy as np
    >>> p = least_squares(num_examples=64, dim=4, seed=0)
    >>> x, y = p.x.astype(np.float64), p.y.astype(np.float64)
    >>> bool(np.allclose(x.T @ (x @ p.w_opt - y) / 64, 0.0, atol=1e-10))
    True
    >>> round(0.5 * float(np.mean((x @ p.w_opt - y) ** 2)), 6) == round(p.loss_opt, 6)
    True
    >>> p.strong_convexity <= p.smoothness
    True
  """

  x: np.ndarray
  y: np.ndarray
  w_true: np.ndarray
  w_opt: np.ndarray
  loss_opt: float
  smoothness: float
  strong_convexity: float


class IteratorState(NamedTuple):
  """Position of a :class:`WorkerBatches` stream; save it to resume exactly.

  Attributes:
    epoch: completed global epochs (``steps_per_epoch`` batches each).
    position: batches already drawn in the current epoch, ``0 <= position < steps_per_epoch``.
    lags: per worker, the steps its stream was held (:meth:`WorkerBatches.set_live`);
      empty when none was.
    paused: the workers whose streams are held now; empty when none is.

  Examples:
    Two workers of five examples with batches of two: a global epoch is
    ``10 // (2 · 2) = 2`` steps.

    >>> import numpy as np
    >>> it = make_worker_batches(np.zeros((10, 1)), np.arange(10), split_iid(10, 2), 2)
    >>> _ = [next(it) for _ in range(3)]
    >>> it.state
    IteratorState(epoch=1, position=1, lags=(), paused=())
    >>> it.state._asdict()
    {'epoch': 1, 'position': 1, 'lags': (), 'paused': ()}
  """

  epoch: int
  position: int
  lags: tuple[int, ...] = ()
  paused: tuple[int, ...] = ()


# ---------------------------------------------------------------------------
# argument checks


def _check_fraction(name: str, value) -> float:
  value = check_positive(name, value)
  if value >= 1:
    raise ValueError(f"{name} must lie in (0, 1), got {value}.")
  return value


# ---------------------------------------------------------------------------
# datasets


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's handwritten digits (1797 real 8×8 images, 10 classes), no download.

  The split is a seeded random permutation: the first ``round(N·test_fraction)``
  permuted examples form the test set (359 of 1797 at the default 0.2).

  Args:
    test_fraction: share of examples held out, in (0, 1).
    seed: seed of the split permutation.

  Returns:
    A :class:`Dataset` with images ``[N, 8, 8, 1]`` scaled from 0..16 to ``[0, 1]``.

  Examples:
    >>> ds = load_digits(test_fraction=0.25)
    >>> len(ds.train_y), len(ds.test_y)  # round(1797 / 4) = 449 held out
    (1348, 449)
    >>> ds.train_x.dtype, float(ds.train_x.min()), float(ds.train_x.max())
    (dtype('float32'), 0.0, 1.0)
  """
  from sklearn import datasets as sk_datasets

  test_fraction = _check_fraction("test_fraction", test_fraction)
  seed = check_int("seed", seed, 0)
  raw = sk_datasets.load_digits()
  images = (raw.images / 16.0).astype(np.float32)[..., None]
  labels = raw.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(labels))
  n_test = int(round(len(labels) * test_fraction))
  test, train = perm[:n_test], perm[n_test:]
  return Dataset(images[train], labels[train], images[test], labels[test], 10)


def gaussian_mixture(
  num_train: int = 4096,
  num_test: int = 1024,
  num_classes: int = 10,
  dim: int = 32,
  separation: float = 3.0,
  noise: float = 1.0,
  seed: int = 0,
) -> Dataset:
  r"""Synthetic classification: one isotropic Gaussian per class.

  .. math::

     y \sim \mathrm{Uniform}\{0, \dots, K-1\}, \qquad
     x \mid y \sim \mathcal{N}(\mu_y, \sigma^2 I_d), \qquad
     \mu_k = s \cdot u_k / \lVert u_k \rVert,\ u_k \sim \mathcal{N}(0, I_d),

  with s = ``separation`` and σ = ``noise``; train and test come from the same
  distribution (the means are drawn once).

  Args:
    num_train: training examples.
    num_test: test examples.
    num_classes: K.
    dim: d, feature dimension.
    separation: norm of every class mean.
    noise: per-coordinate standard deviation σ.
    seed: seed of everything drawn.

  Returns:
    A :class:`Dataset` with features ``[N, dim]`` (``float32``).

  Examples:
    >>> ds = gaussian_mixture(num_train=100, num_test=20, num_classes=3, dim=5)
    >>> ds.train_x.shape, ds.train_x.dtype, ds.test_y.shape, sorted(set(ds.train_y.tolist()))
    ((100, 5), dtype('float32'), (20,), [0, 1, 2])
  """
  num_train = check_int("num_train", num_train, 1)
  num_test = check_int("num_test", num_test, 1)
  num_classes = check_int("num_classes", num_classes, 2)
  dim = check_int("dim", dim, 1)
  separation = check_positive("separation", separation)
  noise = check_positive("noise", noise)
  rng = np.random.default_rng(check_int("seed", seed, 0))
  means = rng.standard_normal((num_classes, dim))
  means *= separation / np.linalg.norm(means, axis=1, keepdims=True)

  def draw(n):
    y = rng.integers(0, num_classes, size=n)
    x = means[y] + noise * rng.standard_normal((n, dim))
    return x.astype(np.float32), y.astype(np.int32)

  train_x, train_y = draw(num_train)
  test_x, test_y = draw(num_test)
  return Dataset(train_x, train_y, test_x, test_y, num_classes)


def least_squares(
  num_examples: int = 1024, dim: int = 16, noise: float = 0.1, seed: int = 0
) -> LeastSquares:
  r"""Linear regression with a known optimum, for checking convergence bounds.

  .. math::

     F(w) = \frac{1}{2N}\lVert X w - y\rVert^2, \qquad
     y = X w_\star + \varepsilon,\ \varepsilon \sim \mathcal{N}(0, \text{noise}^2 I),

  with rows of X standard normal. F is L-smooth and μ-strongly convex with
  L, μ the extreme eigenvalues of :math:`X^\top X / N`; the minimiser solves the
  normal equations :math:`X^\top X w = X^\top y`.

  Args:
    num_examples: N (must be >= dim so that the optimum is unique).
    dim: d.
    noise: standard deviation of ε (> 0, so that F_inf > 0 and gradients are noisy).
    seed: seed of X, w_true and ε.

  Returns:
    A :class:`LeastSquares`. Use :func:`least_squares_loss` as the loss with
    ``make_worker_batches(p.x, p.y, shards, b, keys=("x", "y"))``.

  Examples:
    >>> p = least_squares(num_examples=64, dim=4, noise=0.1, seed=0)
    >>> p.x.shape, p.y.shape, p.w_opt.shape
    ((64, 4), (64,), (4,))
    >>> round(p.loss_opt, 4)  # about noise² / 2 (1 − d/N)
    0.0048
    >>> it = make_worker_batches(p.x, p.y, split_iid(64, 4), 8, keys=("x", "y"))
    >>> next(it)["x"].shape
    (4, 8, 4)
  """
  dim = check_int("dim", dim, 1)
  num_examples = check_int("num_examples", num_examples, dim)
  noise = check_positive("noise", noise)
  rng = np.random.default_rng(check_int("seed", seed, 0))
  x = rng.standard_normal((num_examples, dim)).astype(np.float32)
  w_true = rng.standard_normal(dim).astype(np.float32)
  y = (x @ w_true + noise * rng.standard_normal(num_examples)).astype(np.float32)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  hessian = x64.T @ x64 / num_examples
  w_opt = np.linalg.solve(hessian, x64.T @ y64 / num_examples)
  loss_opt = 0.5 * float(np.mean((x64 @ w_opt - y64) ** 2))
  eig = np.linalg.eigvalsh(hessian)
  return LeastSquares(x, y, w_true, w_opt, loss_opt, float(eig[-1]), float(eig[0]))


def least_squares_loss(w, batch: dict) -> Any:
  r"""One worker's minibatch loss :math:`\frac{1}{2b}\lVert X_B w - y_B\rVert^2`.

  Args:
    w: weights ``[d]`` (a JAX or NumPy array).
    batch: ``{"x": [b, d], "y": [b]}``.

  Returns:
    The scalar loss (a JAX array).

  Examples:
    Residuals ``(0 − 1, 0 − 3)`` give ``(1 + 9)/4``:

    >>> import numpy as np
    >>> batch = {"x": np.eye(2, dtype=np.float32), "y": np.array([1.0, 3.0], np.float32)}
    >>> float(least_squares_loss(np.zeros(2, np.float32), batch))
    2.5
  """
  import jax.numpy as jnp

  residual = jnp.asarray(batch["x"]) @ w - jnp.asarray(batch["y"])
  return 0.5 * jnp.mean(residual**2)


def _tfds_missing_message(tfds, name: str, data_dir: str | None, error: Exception) -> str:
  try:
    version_dir = os.fspath(tfds.builder(name, data_dir=data_dir).data_dir)
  except Exception:  # only used to word the message
    version_dir = None
  shown = (
    data_dir if data_dir is not None else os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  )
  flag = f"--data_dir {shown}" if data_dir is not None else "--data_dir DIR"
  how = (
    f"On a machine with network access and TensorFlow, run\n"
    f"  tfds build {name} {flag} --file_format=array_record\n"
    f"then pass data_dir= (or set TFDS_DATA_DIR) to the folder holding '{name}/'. "
    f"For offline tests use tensorflow_datasets.testing.mock_data."
  )
  if version_dir is not None and not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
    return f"TFDS dataset {name!r} not found at {version_dir!r} (coopjax never downloads). {how}"
  return (
    f"TFDS dataset {name!r} under data_dir={shown!r} could not be opened for random access "
    f"({type(error).__name__}: {error}). It must be prepared in array_record format. {how}"
  )


def _read_source(source, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
  n = len(source) if limit is None else min(limit, len(source))
  if n == 0:
    raise ValueError("the TFDS split is empty.")
  first = source[0]
  images = np.empty((n, *np.shape(first["image"])), dtype=np.uint8)
  labels = np.empty((n,), dtype=np.int32)
  # Items are indexed one at a time: the sources' batched __getitems__ is not reliable.
  for i in range(n):
    item = first if i == 0 else source[i]
    images[i] = item["image"]
    labels[i] = item["label"]
  return images, labels


def load_tfds(
  name: str,
  data_dir: str | os.PathLike | None = None,
  *,
  train_split: str = "train",
  test_split: str = "test",
  max_train: int | None = None,
  max_test: int | None = None,
) -> Dataset:
  """Loads a prepared TFDS image dataset into memory via ``tfds.data_source`` (no TensorFlow).

  Data are never downloaded (``download=False``, ``try_gcs=False``): an offline
  download attempt would hang for minutes. When the data are absent this fails
  at once with a :class:`FileNotFoundError` saying how to prepare them.

  Args:
    name: one of :data:`TFDS_DATASETS`.
    data_dir: the TFDS data folder (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    train_split: TFDS split used for training (e.g. ``"train[:90%]"``).
    test_split: TFDS split held out for evaluation.
    max_train: keep only the first examples of the training split (``None``: all).
    max_test: keep only the first examples of the test split (``None``: all).

  Returns:
    A :class:`Dataset` with images ``[N, H, W, C]`` scaled to ``[0, 1]`` (mnist and
    fashion_mnist 28×28×1, cifar10/100 32×32×3; cifar100 uses its 100 fine labels).

  Raises:
    ValueError: for an unknown name.
    FileNotFoundError: when the data are not prepared under ``data_dir``.

  Examples:
    With prepared data, ``load_tfds("mnist", data_dir, max_train=1000)`` gives
    images ``[1000, 28, 28, 1]``. Where they are missing it fails at once,
    without a download, and says how to prepare them:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as empty:
    ...   load_tfds("mnist", empty)
    Traceback (most recent call last):
    ...
    FileNotFoundError: TFDS dataset 'mnist' not found at ... (coopjax never downloads). ...
  """
  if name not in TFDS_DATASETS:
    raise ValueError(f"name must be one of {TFDS_DATASETS}, got {name!r}.")
  for label, limit in (("max_train", max_train), ("max_test", max_test)):
    if limit is not None:
      check_int(label, limit, 1)
  import tensorflow_datasets as tfds

  data_dir = None if data_dir is None else os.fspath(data_dir)
  out = []
  for split, limit in ((train_split, max_train), (test_split, max_test)):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
    except (AssertionError, KeyError, NotImplementedError, FileNotFoundError, OSError) as error:
      raise FileNotFoundError(_tfds_missing_message(tfds, name, data_dir, error)) from error
    images, labels = _read_source(source, limit)
    out.append((images.astype(np.float32) / 255.0, labels))
  num_classes = 100 if name == "cifar100" else 10
  (train_x, train_y), (test_x, test_y) = out
  return Dataset(train_x, train_y, test_x, test_y, num_classes)


def load_dataset(
  name: str = "digits", data_dir: str | os.PathLike | None = None, **kwargs
) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: ``"digits"`` (:func:`load_digits`), ``"synthetic"`` (:func:`gaussian_mixture`),
      or a TFDS name in :data:`TFDS_DATASETS` (:func:`load_tfds`).
    data_dir: TFDS data folder (TFDS names only).
    **kwargs: forwarded to the loader.

  Returns:
    A :class:`Dataset`.

  Examples:
    >>> ds = load_dataset("synthetic", num_train=8, num_test=4, num_classes=2, dim=3)
    >>> ds.train_x.shape, ds.num_classes
    ((8, 3), 2)
    >>> load_dataset("imagenet")
    Traceback (most recent call last):
    ...
    ValueError: unknown dataset 'imagenet'; expected one of ('digits', 'synthetic', ...).
  """
  if name == "digits":
    return load_digits(**kwargs)
  if name == "synthetic":
    return gaussian_mixture(**kwargs)
  if name in TFDS_DATASETS:
    return load_tfds(name, data_dir, **kwargs)
  raise ValueError(
    f"unknown dataset {name!r}; expected one of {('digits', 'synthetic', *TFDS_DATASETS)}."
  )


# ---------------------------------------------------------------------------
# partitions


def split_iid(num_examples: int, num_workers: int, seed: int = 0) -> list[np.ndarray]:
  """IID partition: a seeded permutation cut into m nearly equal shards.

  Shard sizes differ by at most one (``np.array_split``); every index in
  ``range(num_examples)`` appears in exactly one shard; each shard is sorted.

  Args:
    num_examples: N.
    num_workers: m (``1 <= m <= N``).
    seed: seed of the permutation.

  Returns:
    A list of m ``int64`` index arrays.

  Examples:
    >>> [s.tolist() for s in split_iid(10, 3, seed=0)]
    [[2, 4, 6, 7], [3, 5, 9], [0, 1, 8]]
  """
  num_examples = check_int("num_examples", num_examples, 1)
  num_workers = check_int("num_workers", num_workers, 1)
  if num_workers > num_examples:
    raise ValueError(f"num_workers={num_workers} exceeds num_examples={num_examples}.")
  perm = np.random.default_rng(check_int("seed", seed, 0)).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(perm, num_workers)]


def split_dirichlet(
  labels: Sequence[int] | np.ndarray,
  num_workers: int,
  concentration: float,
  seed: int = 0,
  *,
  min_size: int = 1,
  max_tries: int = 1000,
) -> list[np.ndarray]:
  r"""Non-IID label-skew partition (Hsu, Qi & Brown 2019).

  For every class c independently, worker shares are drawn as

  .. math::

     p_c \sim \mathrm{Dirichlet}(\alpha \mathbf{1}_m),

  and the :math:`n_c` examples of class c (in a seeded random order) are cut
  into m consecutive pieces of sizes :math:`\lfloor n_c \sum_{j \le i} p_{c,j}\rfloor -
  \lfloor n_c \sum_{j < i} p_{c,j}\rfloor`. Small α (e.g. 0.05) gives each
  worker few dominant classes; large α approaches the IID split. If any worker
  ends with fewer than ``min_size`` examples, all shares are redrawn (the
  usual convention; at most ``max_tries`` draws, continuing the same seeded
  generator, so the result stays deterministic in ``seed``).

  Args:
    labels: integer labels ``[N]``.
    num_workers: m.
    concentration: α > 0.
    seed: seed of the draws.
    min_size: least number of examples per worker (0 allows empty shards).
    max_tries: redraw limit before raising :class:`ValueError`.

  Returns:
    A list of m sorted ``int64`` index arrays, disjoint and covering ``range(N)``.

  Examples:
    Twelve examples, four of each of three classes, over two workers. A small α
    concentrates each class on few workers; the shards still cover every index
    once:

    >>> import numpy as np
    >>> labels = np.repeat(np.arange(3), 4)
    >>> shards = split_dirichlet(labels, num_workers=2, concentration=0.1, seed=0)
    >>> label_histograms(labels, shards, 3)
    array([[0, 0, 3],
           [4, 4, 1]])
    >>> sorted(np.concatenate(shards).tolist()) == list(range(12))
    True
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      "labels must be a non-empty 1-D integer array, "
      f"got shape {labels.shape}, dtype {labels.dtype}."
    )
  num_workers = check_int("num_workers", num_workers, 1)
  concentration = check_positive("concentration", concentration)
  min_size = check_int("min_size", min_size, 0)
  max_tries = check_int("max_tries", max_tries, 1)
  if min_size * num_workers > labels.size:
    raise ValueError(
      f"min_size={min_size} × num_workers={num_workers} exceeds the {labels.size} examples."
    )
  rng = np.random.default_rng(check_int("seed", seed, 0))
  classes = np.unique(labels)
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      shares = rng.dirichlet(np.full(num_workers, concentration))
      cuts = np.floor(np.cumsum(shares)[:-1] * idx.size).astype(int)
      for worker, piece in enumerate(np.split(idx, cuts)):
        parts[worker].append(piece)
    shards = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    if min(s.size for s in shards) >= min_size:
      return shards
  raise ValueError(
    f"no Dirichlet(α={concentration}) draw gave every worker >= {min_size} examples in "
    f"{max_tries} tries; lower min_size or num_workers, or raise concentration."
  )


def label_histograms(
  labels: Sequence[int] | np.ndarray, shards: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
  """Per-worker class counts, ``[m, num_classes]`` (row i: worker i's label histogram).

  Examples:
    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 2, 2, 2])
    >>> label_histograms(labels, [np.array([0, 1, 2]), np.array([3, 4, 5])], num_classes=3)
    array([[2, 1, 0],
           [0, 0, 3]])
  """
  labels = np.asarray(labels)
  return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])


# ---------------------------------------------------------------------------
# per-worker batch streams


def _check_shards(shards: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
  if len(shards) == 0:
    raise ValueError("shards must hold at least one worker's indices.")
  out = []
  for i, s in enumerate(shards):
    s = np.asarray(s)
    if s.ndim != 1 or s.size == 0 or not np.issubdtype(s.dtype, np.integer):
      raise ValueError(
        f"shard {i} must be a non-empty 1-D integer index array, got shape {s.shape}, "
        f"dtype {s.dtype}; use split_dirichlet(..., min_size=1) to avoid empty shards."
      )
    if s.min() < 0 or s.max() >= n:
      raise ValueError(f"shard {i} has indices outside [0, {n}).")
    out.append(s.astype(np.int64))
  return out


class WorkerBatches:
  r"""Infinite iterator of stacked per-worker batches with a resumable position.

  Worker i owns the indices ``shards[i]`` (size :math:`n_i`). Its example stream
  is the concatenation of permutations of its shard, the e-th permutation
  drawn from ``np.random.default_rng((seed, i, e))``, so each worker reshuffles
  its own shard every local epoch and streams differ across workers. Batch t
  (counted from 0) of worker i is entries :math:`[tb, (t+1)b)` of that stream;
  batches run on across local epochs, so no example is dropped and a shard
  smaller than b still works. Every worker draws one batch per step: with
  unequal shards, workers pass through their shards at different rates.

  A global epoch is ``steps_per_epoch`` steps (default
  :math:`\lfloor N_{\text{total}} / (m b)\rfloor`, at least 1: m workers together
  see about one pass over the training set). :attr:`state` is an
  :class:`IteratorState`; :meth:`restore` (or the ``state`` argument) resumes
  the exact stream.

  A worker taken out of training (quarantined, masked) can have its stream
  held (:meth:`set_live`): while held it is served its next batch again
  without advancing (the step ignores a masked worker's batch), and when live
  again it resumes where it was; worker i then draws the batch of its own
  step ``t − lag_i``.

  Each ``next`` returns ``{keys[0]: [m, b, *x.shape[1:]], keys[1]: [m, b]}``
  as NumPy arrays (the worker axis first, ready for ``jax.device_put`` with a
  worker-sharded ``NamedSharding``).

  Examples:
    Labels equal to the indices show which examples each worker draws: worker
    0 owns ``[2, 3, 4, 6, 7]``, worker 1 ``[0, 1, 5, 8, 9]``.

    >>> import numpy as np
    >>> x, y = np.arange(10, dtype=np.float32)[:, None], np.arange(10)
    >>> shards = split_iid(10, 2, seed=0)
    >>> [s.tolist() for s in shards]
    [[2, 3, 4, 6, 7], [0, 1, 5, 8, 9]]
    >>> it = WorkerBatches(x, y, shards, batch_size=2, seed=0)
    >>> it.num_workers, it.shard_sizes, it.steps_per_epoch
    (2, (5, 5), 2)
    >>> next(it)["label"]
    array([[4, 7],
           [1, 9]])

    Resuming from a saved :attr:`state` gives the same next batch:

    >>> saved = it.state
    >>> expected = next(it)["label"]
    >>> resumed = WorkerBatches(x, y, shards, batch_size=2, seed=0, state=saved)
    >>> bool((next(resumed)["label"] == expected).all())
    True
  """

  def __init__(
    self,
    x: np.ndarray,
    y: np.ndarray,
    shards: Sequence[np.ndarray],
    batch_size: int,
    seed: int = 0,
    *,
    steps_per_epoch: int | None = None,
    keys: tuple[str, str] = ("image", "label"),
    state: IteratorState | None = None,
  ):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[:1] != y.shape[:1]:
      raise ValueError(f"x and y disagree on the number of examples: {x.shape} vs {y.shape}.")
    self._x, self._y = x, y
    self._shards = _check_shards(shards, len(y))
    self.batch_size = check_int("batch_size", batch_size, 1)
    self.seed = check_int("seed", seed, 0)
    if len(keys) != 2 or keys[0] == keys[1]:
      raise ValueError(f"keys must be two distinct names, got {keys!r}.")
    self.keys = tuple(keys)
    total = sum(s.size for s in self._shards)
    if steps_per_epoch is None:
      steps_per_epoch = max(1, total // (self.num_workers * self.batch_size))
    self.steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, 1)
    self._perms: list[dict[int, np.ndarray]] = [{} for _ in self._shards]
    self._step = 0
    self._lags = np.zeros(self.num_workers, np.int64)
    self._live = np.ones(self.num_workers, bool)
    if state is not None:
      self.restore(state)

  @property
  def num_workers(self) -> int:
    """m, the number of workers (leading axis of every batch)."""
    return len(self._shards)

  @property
  def shard_sizes(self) -> tuple[int, ...]:
    """:math:`n_i` for each worker."""
    return tuple(int(s.size) for s in self._shards)

  @property
  def state(self) -> IteratorState:
    """Where the next batch comes from; pass it to :meth:`restore` to resume."""
    held = bool(self._lags.any()) or not bool(self._live.all())
    return IteratorState(
      *divmod(self._step, self.steps_per_epoch),
      lags=tuple(int(v) for v in self._lags) if held else (),
      paused=tuple(int(i) for i in np.flatnonzero(~self._live)),
    )

  def restore(self, state: IteratorState | Sequence[int] | dict) -> None:
    """Moves the stream to ``state`` (an :class:`IteratorState`, a pair, or a dict)."""
    if isinstance(state, dict):
      state = IteratorState(**state)
    state = IteratorState(*state)
    epoch, position = int(state.epoch), int(state.position)
    if epoch < 0 or not 0 <= position < self.steps_per_epoch:
      raise ValueError(
        f"state must have epoch >= 0 and 0 <= position < {self.steps_per_epoch}, got {state!r}."
      )
    m = self.num_workers
    lags = np.asarray(state.lags if len(state.lags) else np.zeros(m), np.int64)
    paused = [int(i) for i in state.paused]
    step = epoch * self.steps_per_epoch + position
    if lags.shape != (m,) or (lags < 0).any() or (lags > step).any():
      raise ValueError(f"state.lags must be {m} integers in [0, step], got {state.lags!r}.")
    if any(not 0 <= i < m for i in paused):
      raise ValueError(f"state.paused must name workers in 0..{m - 1}, got {state.paused!r}.")
    self._step, self._lags = step, lags
    self._live = np.ones(m, bool)
    self._live[paused] = False
    self._perms = [{} for _ in self._shards]

  def set_live(self, live) -> None:
    """Holds the streams of the workers ``live`` marks False; the others run on.

    ``live`` is one boolean per worker (e.g. the step's ``metrics["live"]``
    under quarantine). A held worker is served the same batch again at every
    step until it is live again, then continues from that batch: its data
    stream resumes where it was.

    Examples:
      >>> import numpy as np
      >>> it = WorkerBatches(np.zeros((8, 1)), np.arange(8), split_iid(8, 2, seed=0), 1)
      >>> first = next(it)["label"][:, 0].tolist()
      >>> it.set_live([True, False])
      >>> held = [next(it)["label"][1, 0] for _ in range(3)]
      >>> len(set(held)), it.state.lags
      (1, (0, 3))
    """
    live = np.asarray(live, bool).reshape(-1)
    if live.shape != (self.num_workers,):
      raise ValueError(f"live must hold one boolean per worker ({self.num_workers}), got {live}.")
    self._live = live.copy()

  @property
  def step(self) -> int:
    """Batches drawn so far: the next batch is the one of global step ``step`` (from 0)."""
    return self._step

  def resplit(
    self, shards: Sequence[np.ndarray], *, steps_per_epoch: int | None = None
  ) -> WorkerBatches:
    r"""The same data over new worker shards, continuing at the same global step.

    For a run whose number of workers changes (an elastic restart, a dead
    process): the examples are re-assigned by ``shards`` (m′ index arrays, e.g.
    ``split_iid(N, m′, seed)``) and the new stream's next batch is that of
    global step :attr:`step`, worker j drawing from its new shard exactly as a
    stream built on ``shards`` would at that step. Batch size, seed and keys
    are kept; ``steps_per_epoch`` is recomputed for m′ unless given.

    Args:
      shards: the new per-worker index arrays.
      steps_per_epoch: the new global epoch length (default
        :math:`\lfloor N_{\text{total}} / (m' b)\rfloor`).

    Returns:
      A new :class:`WorkerBatches`; this one is left as it is.

    Examples:
      >>> import numpy as np
      >>> x, y = np.arange(12, dtype=np.float32)[:, None], np.arange(12)
      >>> it = WorkerBatches(x, y, split_iid(12, 3, seed=0), batch_size=2)
      >>> _ = [next(it) for _ in range(2)]
      >>> it2 = it.resplit(split_iid(12, 2, seed=0))
      >>> it2.num_workers, it2.step
      (2, 2)
      >>> fresh = WorkerBatches(x, y, split_iid(12, 2, seed=0), batch_size=2)
      >>> _ = [next(fresh) for _ in range(2)]
      >>> bool((next(it2)["label"] == next(fresh)["label"]).all())
      True
    """
    out = WorkerBatches(
      self._x,
      self._y,
      shards,
      self.batch_size,
      self.seed,
      steps_per_epoch=steps_per_epoch,
      keys=self.keys,
    )
    out._step = self._step
    return out

  def _permutation(self, worker: int, epoch: int) -> np.ndarray:
    cache = self._perms[worker]
    if epoch not in cache:
      rng = np.random.default_rng((self.seed, worker, epoch))
      cache[epoch] = self._shards[worker][rng.permutation(self._shards[worker].size)]
      for old in [e for e in cache if e < epoch]:
        del cache[old]
    return cache[epoch]

  def worker_indices(self, worker: int, step: int) -> np.ndarray:
    """Example indices of worker ``worker``'s batch at global step ``step`` (from 0)."""
    n = self._shards[worker].size
    positions = step * self.batch_size + np.arange(self.batch_size)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(self.batch_size, dtype=np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(worker, int(e))[offsets[sel]]
    return out

  def __iter__(self) -> WorkerBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    idx = np.stack(
      [self.worker_indices(i, self._step - int(self._lags[i])) for i in range(self.num_workers)]
    )
    self._step += 1
    self._lags += ~self._live  # a held worker's next batch is this one again
    return {self.keys[0]: self._x[idx], self.keys[1]: self._y[idx]}


def make_worker_batches(
  x: np.ndarray,
  y: np.ndarray,
  shards: Sequence[np.ndarray],
  batch_size: int,
  seed: int = 0,
  *,
  steps_per_epoch: int | None = None,
  keys: tuple[str, str] = ("image", "label"),
  state: IteratorState | None = None,
) -> WorkerBatches:
  """Builds a :class:`WorkerBatches` stream (see there for the sampling convention).

  Args:
    x: inputs ``[N, ...]``.
    y: labels or targets ``[N]``.
    shards: m index arrays, e.g. from :func:`split_iid` or :func:`split_dirichlet`.
    batch_size: b, examples per worker per step.
    seed: base seed; worker i's e-th local epoch is shuffled with ``(seed, i, e)``.
    steps_per_epoch: length of a global epoch in steps (default ``N_total // (m b)``).
    keys: names of the two batch entries.
    state: an :class:`IteratorState` to resume from.

  Returns:
    The iterator, yielding ``{keys[0]: [m, b, ...], keys[1]: [m, b]}``.

  Examples:
    >>> import numpy as np
    >>> x, y = np.zeros((12, 3), np.float32), np.arange(12)
    >>> it = make_worker_batches(x, y, split_iid(12, 3), batch_size=2, keys=("x", "y"))
    >>> batch = next(it)
    >>> batch["x"].shape, batch["y"].shape
    ((3, 2, 3), (3, 2))
  """
  return WorkerBatches(
    x, y, shards, batch_size, seed, steps_per_epoch=steps_per_epoch, keys=keys, state=state
  )
