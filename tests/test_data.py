"""Tests for coopjax.data: datasets, partitions, per-worker batch streams."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from coopjax.training import checkpoint
from coopjax.training import data


def _assert_partition(shards, n):
  """Disjoint and covering, checked by counting every index."""
  counts = np.zeros(n, dtype=int)
  for s in shards:
    np.add.at(counts, s, 1)
  np.testing.assert_array_equal(counts, np.ones(n, dtype=int))


# ---------------------------------------------------------------------------
# datasets


def test_digits_matches_sklearn_and_is_deterministic():
  ds = data.load_digits(test_fraction=0.2, seed=3)
  raw = sk_datasets.load_digits()
  n = len(raw.target)
  assert ds.num_classes == 10
  assert ds.train_x.shape[1:] == (8, 8, 1) and ds.train_x.dtype == np.float32
  assert ds.train_y.dtype == np.int32
  assert len(ds.test_y) == round(0.2 * n) and len(ds.train_y) + len(ds.test_y) == n
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
  # Every image is one of sklearn's, scaled by 1/16, with its own label.
  flat = np.round(raw.images.reshape(n, -1)).astype(np.int64)
  lookup = {}
  for img, lab in zip(flat, raw.target, strict=True):
    lookup.setdefault(img.tobytes(), set()).add(int(lab))
  got = np.round(ds.test_x.reshape(len(ds.test_y), -1) * 16).astype(np.int64)
  for img, lab in zip(got, ds.test_y, strict=True):
    assert int(lab) in lookup[img.tobytes()]
  # Class totals of train+test equal sklearn's.
  np.testing.assert_array_equal(
    np.bincount(np.concatenate([ds.train_y, ds.test_y]), minlength=10),
    np.bincount(raw.target, minlength=10),
  )
  again = data.load_digits(test_fraction=0.2, seed=3)
  np.testing.assert_array_equal(again.train_x, ds.train_x)
  other = data.load_digits(test_fraction=0.2, seed=4)
  assert not np.array_equal(other.train_y, ds.train_y)


def test_gaussian_mixture_class_means_and_determinism():
  ds = data.gaussian_mixture(
    num_train=6000, num_test=500, num_classes=3, dim=4, separation=5.0, noise=0.5, seed=1
  )
  assert ds.train_x.shape == (6000, 4) and ds.test_x.shape == (500, 4)
  # Empirical class means have norm ≈ separation; within-class std ≈ noise.
  for k in range(3):
    xk = ds.train_x[ds.train_y == k]
    assert abs(np.linalg.norm(xk.mean(0)) - 5.0) < 0.1
    np.testing.assert_allclose(xk.std(0), 0.5, atol=0.05)
  # Nearest-mean classification on the test set is almost perfect at this separation.
  means = np.stack([ds.train_x[ds.train_y == k].mean(0) for k in range(3)])
  pred = np.argmin(((ds.test_x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == ds.test_y).mean() > 0.95
  np.testing.assert_array_equal(
    data.gaussian_mixture(seed=7).train_x, data.gaussian_mixture(seed=7).train_x
  )


def test_least_squares_optimum():
  p = data.least_squares(num_examples=200, dim=5, noise=0.3, seed=2)
  x, y = p.x.astype(np.float64), p.y.astype(np.float64)
  w_ref, *_ = np.linalg.lstsq(x, y, rcond=None)
  np.testing.assert_allclose(p.w_opt, w_ref, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(p.loss_opt, 0.5 * np.mean((x @ w_ref - y) ** 2), rtol=1e-10)
  # L and μ bound the curvature: F(w) - F* = ½ (w-w*)ᵀ H (w-w*).
  s = np.linalg.svd(x, compute_uv=False)
  np.testing.assert_allclose(p.smoothness, s[0] ** 2 / 200, rtol=1e-8)
  np.testing.assert_allclose(p.strong_convexity, s[-1] ** 2 / 200, rtol=1e-8)
  batch = {"x": p.x, "y": p.y}
  np.testing.assert_allclose(
    float(data.least_squares_loss(p.w_opt.astype(np.float32), batch)), p.loss_opt, rtol=1e-4
  )
  w = p.w_true + 1.0
  assert float(data.least_squares_loss(w, batch)) > p.loss_opt


def test_load_dataset_dispatch_and_errors():
  assert data.load_dataset("synthetic", num_train=10, num_test=5, dim=3).train_x.shape == (10, 3)
  assert data.load_dataset().train_x.shape[1:] == (8, 8, 1)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_dataset("imagenet")
  with pytest.raises(ValueError, match="test_fraction"):
    data.load_digits(test_fraction=1.5)


# ---------------------------------------------------------------------------
# TFDS, offline


@pytest.mark.parametrize(
  "name, shape, num_classes",
  [
    ("mnist", (28, 28, 1), 10),
    ("fashion_mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
  ],
)
def test_tfds_mock_shapes(name, shape, num_classes, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_dataset(name, data_dir=str(tmp_path), max_test=4)
  assert ds.train_x.shape == (6, *shape) and ds.test_x.shape == (4, *shape)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
  assert ds.num_classes == num_classes
  assert ds.train_y.min() >= 0 and ds.train_y.max() < num_classes
  # Scaled uint8 pixels: x·255 is an integer.
  np.testing.assert_allclose(ds.train_x * 255, np.round(ds.train_x * 255), atol=1e-3)


def test_tfds_mock_feeds_worker_batches(tmp_path):
  with tfds.testing.mock_data(num_examples=16):
    ds = data.load_tfds("cifar10", data_dir=str(tmp_path))
  it = data.make_worker_batches(ds.train_x, ds.train_y, data.split_iid(16, 2, seed=0), 4)
  batch = next(it)
  assert batch["image"].shape == (2, 4, 32, 32, 3) and batch["label"].shape == (2, 4)


def test_tfds_absent_fails_fast_with_instructions(tmp_path):
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError, match=r"tfds build mnist .*--file_format=array_record"):
    data.load_tfds("mnist", data_dir=str(tmp_path / "nothing"))
  assert time.perf_counter() - start < 5.0
  # Nothing was downloaded or created.
  assert not (tmp_path / "nothing").exists()
  with pytest.raises(ValueError, match="must be one of"):
    data.load_tfds("imagenet2012")


# ---------------------------------------------------------------------------
# partitions


@pytest.mark.parametrize("n, m", [(10, 3), (1437, 8), (7, 7)])
def test_split_iid_partition(n, m):
  shards = data.split_iid(n, m, seed=0)
  assert len(shards) == m
  _assert_partition(shards, n)
  sizes = [len(s) for s in shards]
  assert max(sizes) - min(sizes) <= 1
  for a, b in zip(shards, data.split_iid(n, m, seed=0), strict=True):
    np.testing.assert_array_equal(a, b)
  if n > m:
    assert any(
      not np.array_equal(a, b) for a, b in zip(shards, data.split_iid(n, m, seed=1), strict=True)
    )
  with pytest.raises(ValueError, match="exceeds"):
    data.split_iid(3, 4)


def _max_class_share(labels, shards, num_classes):
  """Per-worker largest class fraction, computed without label_histograms."""
  out = []
  for s in shards:
    counts = np.zeros(num_classes)
    for lab in labels[s]:
      counts[lab] += 1
    out.append(counts.max() / counts.sum())
  return np.array(out)


def test_split_dirichlet_partition_and_skew():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, size=5000)
  m = 10
  skewed = data.split_dirichlet(labels, m, concentration=0.05, seed=0)
  mild = data.split_dirichlet(labels, m, concentration=1000.0, seed=0)
  iid = data.split_iid(len(labels), m, seed=0)
  for shards in (skewed, mild):
    _assert_partition(shards, len(labels))
    hist = data.label_histograms(labels, shards, 10)
    # Per-class totals preserved.
    np.testing.assert_array_equal(hist.sum(0), np.bincount(labels, minlength=10))
    np.testing.assert_array_equal(hist.sum(1), [len(s) for s in shards])
  share_skewed = _max_class_share(labels, skewed, 10)
  share_mild = _max_class_share(labels, mild, 10)
  share_iid = _max_class_share(labels, iid, 10)
  # α = 0.05: most workers dominated by one class; α large or IID: near 1/10.
  assert share_skewed.mean() > 0.5
  assert share_mild.max() < 0.2 and share_iid.max() < 0.2

  # Few classes cover 90% of a skewed worker's data; IID needs nearly all ten.
  def classes_for_90(shards):
    out = []
    for s in shards:
      frac = np.sort(np.bincount(labels[s], minlength=10))[::-1] / len(s)
      out.append(int(np.searchsorted(np.cumsum(frac), 0.9) + 1))
    return np.array(out)

  assert np.median(classes_for_90(skewed)) <= 3
  assert classes_for_90(iid).min() >= 9
  # Large α gives near-equal shard sizes; shares per class ≈ 1/m.
  hist_mild = data.label_histograms(labels, mild, 10) / np.bincount(labels, minlength=10)
  np.testing.assert_allclose(hist_mild, 1 / m, atol=0.03)
  # Deterministic in seed, different across seeds.
  for a, b in zip(skewed, data.split_dirichlet(labels, m, 0.05, seed=0), strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(skewed, data.split_dirichlet(labels, m, 0.05, seed=1), strict=True)
  )


def test_split_dirichlet_cut_convention():
  """One class, m workers: piece sizes are floor differences of n·cumsum(p)."""
  labels = np.zeros(101, dtype=np.int64)
  shards = data.split_dirichlet(labels, 4, concentration=0.7, seed=5, min_size=0)
  rng = np.random.default_rng(5)
  rng.permutation(101)
  p = rng.dirichlet(np.full(4, 0.7))
  edges = np.concatenate([[0], np.floor(np.cumsum(p)[:-1] * 101), [101]]).astype(int)
  np.testing.assert_array_equal([len(s) for s in shards], np.diff(edges))


def test_split_dirichlet_min_size_and_errors():
  labels = np.repeat(np.arange(10), 30)
  shards = data.split_dirichlet(labels, 5, concentration=0.1, seed=0, min_size=3)
  assert min(len(s) for s in shards) >= 3
  _assert_partition(shards, len(labels))
  with pytest.raises(ValueError, match="min_size"):
    data.split_dirichlet(labels, 20, 0.05, min_size=20)
  with pytest.raises(ValueError, match="tries"):
    data.split_dirichlet(labels, 20, 0.05, min_size=10, max_tries=5)
  with pytest.raises(ValueError, match="concentration"):
    data.split_dirichlet(labels, 4, 0.0)
  with pytest.raises(ValueError, match="integer"):
    data.split_dirichlet(np.array([0.5, 1.5]), 2, 1.0)


# ---------------------------------------------------------------------------
# per-worker batches


def _make(seed=0, **kw):
  x = np.arange(60, dtype=np.float32).reshape(30, 2) * 1.0
  y = np.arange(30, dtype=np.int32)
  shards = [np.arange(0, 12), np.arange(12, 20), np.arange(20, 30)]
  return data.make_worker_batches(x, y, shards, batch_size=4, seed=seed, **kw), x, y, shards


def test_batches_shapes_membership_and_epoch_coverage():
  it, x, y, shards = _make()
  assert it.steps_per_epoch == 30 // (3 * 4)
  seen = [[] for _ in shards]
  for _ in range(6):
    b = next(it)
    assert b["image"].shape == (3, 4, 2) and b["label"].shape == (3, 4)
    np.testing.assert_array_equal(b["image"][..., 0], 2.0 * b["label"])  # x matches y
    for i in range(3):
      assert set(b["label"][i]) <= set(shards[i])
      seen[i].extend(b["label"][i])
  # Each worker's stream goes through its whole shard once per local epoch:
  # worker 1 (8 examples) draws 24 = 3 full passes in 6 steps, each pass a permutation.
  s1 = np.array(seen[1]).reshape(3, 8)
  for row in s1:
    np.testing.assert_array_equal(np.sort(row), shards[1])
  assert not all(np.array_equal(s1[0], r) for r in s1[1:])  # reshuffled per local epoch
  s0 = np.array(seen[0]).reshape(2, 12)
  for row in s0:
    np.testing.assert_array_equal(np.sort(row), shards[0])


def test_batches_stream_is_seeded_per_worker_and_epoch():
  it, x, y, shards = _make(seed=11)
  b = next(it)
  # Reference: worker i's first local epoch is shards[i][default_rng((11, i, 0)).permutation].
  for i, s in enumerate(shards):
    perm = s[np.random.default_rng((11, i, 0)).permutation(len(s))]
    np.testing.assert_array_equal(b["label"][i], perm[:4])
  # Two workers with identical shards still get distinct streams.
  same = [np.arange(30), np.arange(30)]
  it2 = data.make_worker_batches(x, y, same, batch_size=8, seed=0)
  b2 = next(it2)
  assert not np.array_equal(b2["label"][0], b2["label"][1])
  # Same seed → same stream; another seed → another.
  it3, *_ = _make(seed=11)
  np.testing.assert_array_equal(next(it3)["label"], b["label"])
  it4, *_ = _make(seed=12)
  assert not np.array_equal(next(it4)["label"], b["label"])


def test_batches_resume_reproduces_stream():
  it, *_ = _make(seed=3)
  for _ in range(5):
    next(it)
  state = it.state
  assert state == data.IteratorState(epoch=5 // it.steps_per_epoch, position=5 % it.steps_per_epoch)
  expected = [next(it) for _ in range(4)]
  # Fresh iterator restored from the state, and a dict round trip.
  for restored_state in (state, state._asdict()):
    it2, *_ = _make(seed=3)
    it2.restore(restored_state)
    for want in expected:
      got = next(it2)
      np.testing.assert_array_equal(got["label"], want["label"])
      np.testing.assert_array_equal(got["image"], want["image"])
  it3, *_ = _make(seed=3, state=state)
  np.testing.assert_array_equal(next(it3)["label"], expected[0]["label"])
  with pytest.raises(ValueError, match="position"):
    it3.restore(data.IteratorState(0, it3.steps_per_epoch))


def test_batches_small_shard_wraps_and_validation():
  x = np.zeros((5, 1), np.float32)
  y = np.arange(5, dtype=np.int32)
  it = data.make_worker_batches(x, y, [np.array([0, 1]), np.array([2, 3, 4])], batch_size=5)
  b = next(it)
  # Shard {0, 1}, b = 5: stream positions 0..4 fall in local epochs 0, 0, 1, 1, 2.
  row = b["label"][0]
  np.testing.assert_array_equal(np.sort(row[:2]), [0, 1])
  np.testing.assert_array_equal(np.sort(row[2:4]), [0, 1])
  assert row[4] in (0, 1)
  with pytest.raises(ValueError, match="non-empty"):
    data.make_worker_batches(x, y, [np.array([], dtype=int)], batch_size=2)
  with pytest.raises(ValueError, match="outside"):
    data.make_worker_batches(x, y, [np.array([7])], batch_size=2)
  with pytest.raises(TypeError, match="batch_size"):
    data.make_worker_batches(x, y, [np.array([0])], batch_size=2.0)


def test_empty_tfds_version_folder_gives_the_preparation_message(tmp_path):
  (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    data.load_tfds("cifar10", data_dir=tmp_path)


def test_held_stream_resumes_where_it_was_and_survives_a_checkpoint():
  it, *_ = _make(seed=4)
  ref_it, *_ = _make(seed=4)
  m = it.num_workers
  expected = [next(ref_it)["label"] for _ in range(12)]  # the streams never held
  got = [next(it)["label"] for _ in range(3)]
  live = np.ones(m, bool)
  live[1] = False
  it.set_live(live)
  held = [next(it)["label"] for _ in range(4)]  # steps 3..6: worker 1 served batch 3 again
  for b in held:
    np.testing.assert_array_equal(b[1], expected[3][1])
  saved = it.state
  assert saved.lags[1] == 4 and saved.paused == (1,)
  resumed, *_ = _make(seed=4)
  resumed.restore(checkpoint.to_json({"data": saved})["data"])  # as stored in a checkpoint
  it.set_live(np.ones(m, bool))
  resumed.set_live(np.ones(m, bool))
  after = [next(it)["label"] for _ in range(5)]
  np.testing.assert_array_equal(
    np.stack(after), np.stack([next(resumed)["label"] for _ in range(5)])
  )
  for t, b in enumerate(after):  # worker 1 resumes at its batch 3; the others at step 7 + t
    np.testing.assert_array_equal(b[1], expected[3 + t][1])
    np.testing.assert_array_equal(np.delete(b, 1, 0), np.delete(expected[7 + t], 1, 0))
  np.testing.assert_array_equal(np.stack(got), np.stack(expected[:3]))
  with pytest.raises(ValueError, match="one boolean per worker"):
    it.set_live([True])
