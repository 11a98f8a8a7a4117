"""Tests for ilbp.data.images: TFDS pipelines under `tfds.testing.mock_data`, digits for real."""

import itertools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ilbp.data import images

NUM_MOCK_EXAMPLES = 10  # Every mocked split yields these same 10 examples.
TFDS_CASES = [
  ("cifar10", {}, 10, (32, 32, 3)),
  ("imagenet2012", {"image_size": 32}, 1000, (32, 32, 3)),
]


@pytest.fixture
def mock_tfds():
  # Function-scoped so that tests without it (the missing-ImageNet one) see the real tfds.
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    yield


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def rows(image_batches):
  """Every image in a list of [b, ...] arrays, as a sorted list of bytes (a multiset)."""
  return sorted(row.tobytes() for batch in image_batches for row in batch)


@pytest.mark.usefixtures("mock_tfds")
@pytest.mark.parametrize(("name", "kwargs", "num_classes", "shape"), TFDS_CASES)
def test_tfds_shapes_dtypes_and_counts(name, kwargs, num_classes, shape):
  data = images.get_data(name, batch_size=4, seed=0, **kwargs)
  assert data.num_train_examples == data.num_eval_examples == NUM_MOCK_EXAMPLES
  assert data.num_classes == num_classes
  assert data.image_shape == shape
  assert images.dataset_shape(name, kwargs.get("image_size")) == (num_classes, shape)
  for batch in take(data.train_batches(0), 3):
    assert batch.keys() == {"image", "label"}
    assert batch["image"].shape == (4, *shape) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert np.all(np.isfinite(batch["image"]))
    assert np.all((batch["label"] >= 0) & (batch["label"] < num_classes))


@pytest.mark.usefixtures("mock_tfds")
@pytest.mark.parametrize(("name", "kwargs", "num_classes", "shape"), TFDS_CASES)
def test_tfds_eval_pass_counts_each_example_once(name, kwargs, num_classes, shape):
  data = images.get_data(name, batch_size=4, eval_batch_size=3, seed=0, **kwargs)
  batches = list(data.eval_batches())
  assert len(batches) == 4  # ceil(10 / 3): the last batch holds 1 real example, 2 padding.
  for batch in batches:
    assert batch["image"].shape == (3, *shape) and batch["mask"].dtype == np.float32
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1] * 10 + [0] * 2)
  assert mask.sum() == data.num_eval_examples
  real = [b["image"][b["mask"] == 1] for b in batches]
  assert len(set(rows(real))) == data.num_eval_examples  # Distinct examples, none repeated.
  assert not batches[-1]["image"][1:].any()
  # A second pass is the same pass.
  assert_batches_equal(batches, list(data.eval_batches()))


@pytest.mark.usefixtures("mock_tfds")
@pytest.mark.parametrize(("name", "kwargs", "num_classes", "shape"), TFDS_CASES)
def test_tfds_train_epochs_are_permutations(name, kwargs, num_classes, shape):
  # Without augmentation a train image is its eval image, and mock_data serves the same 10
  # examples for every split: each epoch (2 batches of 5) must be exactly those 10.
  data = images.get_data(name, batch_size=5, seed=0, augment=False, **kwargs)
  eval_rows = rows([b["image"] for b in data.eval_batches()])
  epochs = take(data.train_batches(0), 6)
  orders = []
  for first, second in zip(epochs[::2], epochs[1::2]):
    assert rows([first["image"], second["image"]]) == eval_rows
    orders.append(np.concatenate([first["label"], second["label"]]).tolist())
  assert len({tuple(o) for o in orders}) > 1  # Epochs are reshuffled.


@pytest.mark.usefixtures("mock_tfds")
@pytest.mark.parametrize(("name", "kwargs", "num_classes", "shape"), TFDS_CASES)
def test_tfds_resume_matches_uninterrupted(name, kwargs, num_classes, shape):
  data = images.get_data(name, batch_size=4, seed=7, **kwargs)
  uninterrupted = take(data.train_batches(0), 8)
  assert_batches_equal(take(data.train_batches(0), 8), uninterrupted)
  # Step 3 starts mid-epoch (example 12 = epoch 1, offset 2); step 5 at an epoch boundary.
  assert_batches_equal(take(data.train_batches(3), 5), uninterrupted[3:])
  assert_batches_equal(take(data.train_batches(5), 3), uninterrupted[5:])
  # A fresh pipeline (as after a restart) agrees too.
  fresh = images.get_data(name, batch_size=4, seed=7, **kwargs)
  assert_batches_equal(take(fresh.train_batches(3), 5), uninterrupted[3:])


@pytest.mark.usefixtures("mock_tfds")
@pytest.mark.parametrize(("name", "kwargs", "num_classes", "shape"), TFDS_CASES)
def test_tfds_seed_and_augmentation_change_batches(name, kwargs, num_classes, shape):
  a = take(images.get_data(name, batch_size=4, seed=0, **kwargs).train_batches(0), 3)
  b = take(images.get_data(name, batch_size=4, seed=1, **kwargs).train_batches(0), 3)
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
  # Same seed, no augmentation: same order (shuffling ignores `augment`), different pixels.
  plain = images.get_data(name, batch_size=4, seed=0, augment=False, **kwargs)
  c = take(plain.train_batches(0), 3)
  for x, y in zip(a, c):
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


@pytest.mark.usefixtures("mock_tfds")
def test_tfds_validation_split_is_held_out_of_train(monkeypatch):
  read = []
  real_even_splits = tfds.even_splits

  def even_splits(split, **kwargs):
    read.append(split)
    return real_even_splits(split, **kwargs)

  monkeypatch.setattr(images.tfds, "even_splits", even_splits)
  data = images.get_data(
    "cifar10", batch_size=4, eval_batch_size=3, seed=0, validation_fraction=0.1
  )
  # Train reads the first 90% of TFDS's train split, validation the last 10%, eval the test split.
  assert sorted(read) == ["test", "train[90%:]", "train[:90%]"]
  assert data.num_validation_examples == NUM_MOCK_EXAMPLES  # mock_data: 10 per split.
  batches = list(data.validation_batches())
  assert len(batches) == 4 and batches[0]["image"].shape == (3, 32, 32, 3)
  assert sum(b["mask"].sum() for b in batches) == data.num_validation_examples
  assert images.get_data("cifar10", batch_size=4, seed=0).validation_batches is None


def test_bad_validation_fractions_raise():
  for fraction in (-0.1, 1.0, 0.125):
    with pytest.raises(ValueError, match="whole percent"):
      images.get_data("cifar10", batch_size=4, seed=0, validation_fraction=fraction)
  with pytest.raises(ValueError, match="fixed train/test split"):
    images.get_data("digits", batch_size=4, seed=0, validation_fraction=0.1)


def test_imagenet_missing_data_says_where_the_tars_go(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    images.get_data("imagenet2012", batch_size=4, seed=0, data_dir=str(tmp_path))
  message = str(error.value)
  assert f"{tmp_path / 'downloads' / 'manual'}/" in message
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert f"tfds.builder('imagenet2012', data_dir='{tmp_path}').download_and_prepare()" in message


def test_digits_split_shapes_and_ranges():
  data = images.get_data("digits", batch_size=32, eval_batch_size=100, seed=0)
  assert (data.num_train_examples, data.num_eval_examples) == (1442, 355)
  assert data.num_classes == 10 and data.image_shape == (8, 8, 1)
  batch = next(data.train_batches(0))
  assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  evals = list(data.eval_batches())
  assert [len(b["mask"]) for b in evals] == [100] * 4
  assert sum(b["mask"].sum() for b in evals) == 355
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in evals])
  assert np.all(np.bincount(labels, minlength=10) >= 34)  # Stratified: ~1/5 of every class.
  # Each epoch (1442 = 103 batches of 14) is a new order of the same train images.
  stream = take(images.get_data("digits", batch_size=14, seed=0).train_batches(0), 206)
  first, second = (np.concatenate([b["image"] for b in e]) for e in (stream[:103], stream[103:]))
  assert rows([first]) == rows([second]) and not np.array_equal(first, second)
  # Normalised with train statistics: pixel 0 -> -m / s, pixel 1 -> (1 - m) / s.
  raw_train = images._digits_split()[0]
  assert abs(first.mean()) < 1e-4 and abs(first.std() - 1) < 1e-4
  assert np.isclose(first.min(), -raw_train.mean() / raw_train.std(), atol=1e-5)
  assert np.isclose(first.max(), (1 - raw_train.mean()) / raw_train.std(), atol=1e-5)


def test_digits_determinism_and_resume():
  data = images.get_data("digits", batch_size=64, seed=3)
  uninterrupted = take(data.train_batches(0), 40)  # 40 * 64 > 1442: crosses epoch boundaries.
  assert_batches_equal(take(data.train_batches(22), 18), uninterrupted[22:])
  again = images.get_data("digits", batch_size=64, seed=3)
  assert_batches_equal(take(again.train_batches(0), 40), uninterrupted)
  other = images.get_data("digits", batch_size=64, seed=4)
  assert not np.array_equal(next(other.train_batches(0))["label"], uninterrupted[0]["label"])
  # The train/test split does not depend on the seed.
  assert_batches_equal(list(other.eval_batches()), list(data.eval_batches()))


def test_digits_process_shares(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  shares = []
  for process in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda process=process: process)
    data = images.get_data("digits", batch_size=64, eval_batch_size=100, seed=0)
    assert data.num_train_examples == 1442 and data.num_eval_examples == 355
    train = take(data.train_batches(0), 22)  # 22 * 32 = 704 of this process's 721.
    assert train[0]["image"].shape == (32, 8, 8, 1)
    evals = list(data.eval_batches())
    assert [len(b["mask"]) for b in evals] == [50] * 4  # 178 and 177 examples, both 4 batches.
    shares.append((rows([b["image"] for b in train]), sum(b["mask"].sum() for b in evals)))
  assert not set(shares[0][0]) & set(shares[1][0])  # Disjoint train shares.
  assert shares[0][1] + shares[1][1] == 355
  # An explicit input shard (an spmd grid's data columns) is that process's share, whatever the
  # process index: here process 1 of 2 loads shard 0 of 2, as process 0 does.
  data = images.get_data("digits", batch_size=64, eval_batch_size=100, seed=0, shard=(0, 2))
  assert rows([b["image"] for b in take(data.train_batches(0), 22)]) == shares[0][0]


def _same_labels_blank_images(full, labels_only, shape):
  for a, b in zip(full, labels_only, strict=True):
    assert b.keys() == a.keys()
    np.testing.assert_array_equal(b["label"], a["label"])
    if "mask" in a:
      np.testing.assert_array_equal(b["mask"], a["mask"])
    assert b["image"].shape == a["image"].shape == (len(a["label"]), *shape)
    assert b["image"].dtype == np.float32 and not b["image"].any()
    assert b["image"].base is not None  # A broadcast view of one zero: no memory per batch.


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_labels_only_gives_the_same_labels_and_decodes_no_image(name, monkeypatch):
  # A process holding no first stage feeds labels only: the same labels, the same masks, and
  # zeros (never read) where the images were; a TFDS pipeline never decodes an image.
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    full = images.get_data(name, batch_size=4, eval_batch_size=3, seed=0)
    train, evals = take(full.train_batches(2), 3), list(full.eval_batches())
    decoded = []
    real_decode = images.tf.io.decode_png
    decode = lambda *a, **k: decoded.append(1) or real_decode(*a, **k)
    monkeypatch.setattr(images.tf.io, "decode_png", decode)
    blank = images.get_data(name, batch_size=4, eval_batch_size=3, seed=0, labels_only=True)
    _same_labels_blank_images(train, take(blank.train_batches(2), 3), full.image_shape)
    _same_labels_blank_images(evals, list(blank.eval_batches()), full.image_shape)
    assert not decoded


def test_feeds_inputs_only_where_a_first_stage_device_is():
  from ilbp import placement

  hosts = [0] * 4 + [1] * 4
  grid = placement.stage_grid(2, 4, [_Device(h) for h in hosts])
  assert placement.feeds_inputs(grid, 0) and not placement.feeds_inputs(grid, 1)
  # A first stage spread over both hosts: both feed inputs.
  grid = placement.stage_grid(2, 4, [_Device(h) for h in (0, 0, 1, 1, 0, 0, 1, 1)])
  assert placement.feeds_inputs(grid, 0) and placement.feeds_inputs(grid, 1)


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


def test_bad_arguments_raise(monkeypatch):
  with pytest.raises(ValueError, match="cifar10, cifar100, imagenet2012, digits"):
    images.get_data("mnist", batch_size=4, seed=0)
  with pytest.raises(ValueError, match="seed"):
    images.get_data("digits", batch_size=4, seed=-1)
  with pytest.raises(ValueError, match="image_size"):
    images.get_data("cifar10", batch_size=4, seed=0, image_size=64)
  with pytest.raises(ValueError, match="start_step"):
    next(images.get_data("digits", batch_size=4, seed=0).train_batches(-1))
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(
    ValueError, match=r"batch_size=4 must be a positive multiple .*input shares \(3"
  ):
    images.get_data("digits", batch_size=4, seed=0)
  with pytest.raises(ValueError, match="eval_batch_size=10"):
    images.get_data("digits", batch_size=6, eval_batch_size=10, seed=0)
