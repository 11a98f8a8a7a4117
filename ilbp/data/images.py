"""Image classification input pipelines: CIFAR-10/100 and ImageNet (TFDS), digits (scikit-learn).

`get_data(name, batch_size=..., seed=...)` returns an `ImageData`: an endless, resumable train
stream and a padded, masked eval pass, as numpy batches for this process.

Determinism contract. Each process sees a stream of examples: epoch after epoch of its own share
of the train split, each epoch in an order that depends only on (seed, epoch); example number i of
the stream is augmented with stateless random ops keyed by (seed, global index of i). Batch `s` is
stream examples [s * b, (s + 1) * b), so the train batches are a pure function of (seed, step,
process count) and `train_batches(s)` yields exactly what `train_batches(0)` yields from batch s
on. Resuming costs O(1) epochs, not O(s): the skipped epochs are never built, and inside the
current epoch the skipped records are read but never decoded or augmented.

Shuffling (TFDS) is a buffer shuffle of the still-encoded records over a fixed read order
(`shuffle_files=False`): the whole split for CIFAR (~120 MB of PNGs), `_IMAGENET_SHUFFLE_BUFFER`
records for ImageNet, whose prepared files TFDS already wrote in a random order. Calling
`tf.random.set_seed` changes that order (consistently), because tf.data mixes the global seed
into shuffle seeds; ilbp never calls it.

Augmentation (`augment=True`, train split only):
  * CIFAR: zero-pad 4 pixels per side (black, before normalisation, as in He et al. 2016), random
    32x32 crop, random horizontal flip.
  * ImageNet: Inception-style random-resized crop (area 8%-100%, aspect 3/4-4/3, 10 attempts, then
    a centre crop) resized bicubically to `image_size`, random horizontal flip. Eval: centre crop
    of 0.875 of the shorter side, resized to `image_size` (224/256 at the default size).
  * digits: none. The 8x8 digits are already centred and size-normalised, and a 1-pixel shift is
    12.5% of the field, so `augment` has no effect.
Images are then scaled to [0, 1] and normalised with per-channel dataset mean/std.

Digits: the 1,797 images of `sklearn.datasets.load_digits` are split without any randomness:
within each class, every fifth image in file order (positions 4, 9, 14, ...) is held out. That
gives 1,442 train and 355 test images, stratified, identical for every seed and machine.

Validation (`validation_fraction` > 0, TFDS datasets): the last `validation_fraction` of the
TFDS train split in its canonical order (`train[90%:]` for 0.1) is held out, identically on every
machine and for every seed, and served like the eval split; training reads the rest
(`train[:90%]`). The test (eval) split is untouched.

Multi-process: each process reads `tfds.even_splits(split, count)[index]` of its input shard
(`shard=(index, count)`: by default its process index and count; processes that feed the same
devices of a pipeline share a shard and read the same examples); train
shares drop the remainder so every process has the same epoch length; eval shares may differ by
one example, so every process pads to the same number of eval batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ilbp.data import input_shard, per_shard, prepare

_INT64_MAX = np.iinfo(np.int64).max
# Tags that separate the random streams derived from one user seed.
_SHUFFLE_TAG = 1
_AUGMENT_TAG = 2
_IMAGENET_SHUFFLE_BUFFER = 10_000  # ~1.1 GB of encoded JPEGs per process.
_IMAGENET_EVAL_CROP = 0.875
_CIFAR_PAD = 4


@dataclasses.dataclass(frozen=True)
class ImageData:
  """An image classification dataset, as this process sees it.

  Attributes:
    train_batches: `start_step -> iterator`; an endless stream of per-process train batches
      {"image": float32 [b, H, W, C], "label": int32 [b]} (numpy), starting at batch `start_step`.
    eval_batches: `() -> iterator`; one pass over this process's share of the eval (test)
      split, {"image", "label", "mask"}, all batches full size; `mask` is float32, 1 for real
      examples and 0 for padding, so each example counts exactly once.
    num_train_examples: train examples in one epoch, summed over the input shards.
    num_eval_examples: eval examples, summed over the input shards (padding excluded).
    num_classes: number of labels.
    image_shape: (H, W, C) of every image.
    validation_batches: like `eval_batches`, over the validation split held out of train; None
      without one.
    num_validation_examples: validation examples, summed over the input shards (0 without one).
  """

  train_batches: Callable[[int], Iterator[dict]]
  eval_batches: Callable[[], Iterator[dict]]
  num_train_examples: int
  num_eval_examples: int
  num_classes: int
  image_shape: tuple[int, int, int]
  validation_batches: Callable[[], Iterator[dict]] | None = None
  num_validation_examples: int = 0


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  tfds_name: str
  eval_split: str
  mean: tuple[float, ...]  # Per channel, for images in [0, 1].
  std: tuple[float, ...]
  shuffle_buffer: int | None  # None: the whole per-process split.
  native_size: int | None  # None: images vary in size and are resized to `image_size`.
  default_size: int
  num_classes: int


_TFDS_SPECS = {
  "cifar10": _TfdsSpec(
    "cifar10", "test", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), None, 32, 32, 10
  ),
  "cifar100": _TfdsSpec(
    "cifar100", "test", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), None, 32, 32, 100
  ),
  "imagenet2012": _TfdsSpec(
    "imagenet2012",
    "validation",
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
    _IMAGENET_SHUFFLE_BUFFER,
    None,
    224,
    1000,
  ),
}
_VALID_NAMES = (*_TFDS_SPECS, "digits")
_DIGITS_SHAPE = (8, 8, 1)


def dataset_shape(name: str, image_size: int | None = None) -> tuple[int, tuple[int, int, int]]:
  """(number of classes, (H, W, C) of every image) of a dataset, without reading it.

  Args:
    name: "cifar10", "cifar100", "imagenet2012" or "digits".
    image_size: as in `get_data`.

  Raises:
    ValueError: unknown name or unsupported image size.
  """
  if name not in _VALID_NAMES:
    raise ValueError(f"Unknown image dataset {name!r}; valid names: {', '.join(_VALID_NAMES)}.")
  if name == "digits":
    if image_size not in (None, _DIGITS_SHAPE[0]):
      raise ValueError(f"digits images are 8x8; image_size={image_size} is not supported.")
    return 10, _DIGITS_SHAPE
  spec = _TFDS_SPECS[name]
  if spec.native_size is not None and image_size not in (None, spec.native_size):
    raise ValueError(
      f"{name} images are {spec.native_size}x{spec.native_size}; "
      f"image_size={image_size} is not supported."
    )
  size = image_size or spec.default_size
  return spec.num_classes, (size, size, 3)


def get_data(
  name: str,
  *,
  batch_size: int,
  seed: int,
  eval_batch_size: int | None = None,
  image_size: int | None = None,
  data_dir: str | None = None,
  augment: bool = True,
  validation_fraction: float = 0.0,
  shard: tuple[int, int] | None = None,
  labels_only: bool = False,
) -> ImageData:
  """Builds the input pipelines of one image classification dataset.

  Args:
    name: "cifar10", "cifar100", "imagenet2012" or "digits".
    batch_size: global train batch size; each process gets `batch_size // count` (`shard`).
    seed: non-negative; fixes the shuffle order and the augmentation of every train example.
    eval_batch_size: global eval batch size; defaults to `batch_size`.
    image_size: output side for ImageNet (default 224). CIFAR and digits keep their native size
      (32 and 8); any other value is an error.
    data_dir: TFDS data directory, local or gs:// (default: TFDS's own,
      `~/tensorflow_datasets`). Unused for digits.
    augment: apply the train augmentation described in the module docstring.
    validation_fraction: share of the TFDS train split held out for validation, in whole
      percent (0.1 holds out `train[90%:]`); 0 for none. Not for digits.
    shard: `(index, count)`: this process loads shard `index` of `count` equal shares of the
      data and of every batch (default: `(jax.process_index(), jax.process_count())`; an
      executor whose stages sit on different processes feeds several processes the same
      shard, `ilbp.execution.factory.input_shard`).
    labels_only: decode no image: batches carry the labels and, as "image", a zero array of
      the images' shape (a broadcast view, no memory). For a process whose devices hold no
      first stage (`ilbp.execution.factory.labels_only`): it feeds the labels its heads need
      and never reads an image.

  Returns:
    The `ImageData` of this process.

  Raises:
    ValueError: unknown name, bad batch sizes, negative seed, unsupported image size or
      validation fraction.
    prepare.DatasetUnavailableError: a TFDS dataset is not prepared under `data_dir` and cannot
      be downloaded here (no internet, or ImageNet's manual download); raised within seconds,
      and the message says how to prepare it and where to point `data_dir`.
  """
  dataset_shape(name, image_size)  # Checks the name and the size.
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}.")
  shard = input_shard(shard)
  per_batch = per_shard(batch_size, "batch_size", shard[1])
  per_eval_batch = per_shard(
    batch_size if eval_batch_size is None else eval_batch_size, "eval_batch_size", shard[1]
  )
  validation_percent = round(validation_fraction * 100)
  if (
    not 0 <= validation_percent < 100 or abs(validation_fraction * 100 - validation_percent) > 1e-6
  ):
    raise ValueError(
      f"validation_fraction must be a whole percent in [0, 0.99] (TFDS slices splits by "
      f"percent), got {validation_fraction}."
    )
  if name == "digits":
    if validation_percent:
      raise ValueError(
        "validation_fraction applies to the TFDS datasets; digits has a fixed train/test split."
      )
    data = _digits(per_batch, per_eval_batch, seed, shard, labels_only)
  else:
    data = _tfds_data(
      _TFDS_SPECS[name],
      per_batch,
      per_eval_batch,
      seed,
      image_size or _TFDS_SPECS[name].default_size,
      data_dir,
      augment,
      validation_percent,
      shard,
      labels_only,
    )
  return _blank_images(data) if labels_only else data


def _blank_images(data: ImageData) -> ImageData:
  """`data` with a zero "image" (a broadcast view) added to every batch, which carries labels
  only (`get_data`'s labels_only)."""
  blank = lambda n: np.broadcast_to(np.zeros((), np.float32), (n, *data.image_shape))
  add = lambda batches: ({**b, "image": blank(len(b["label"]))} for b in batches)
  wrap = lambda fn: None if fn is None else (lambda *args: add(fn(*args)))
  return dataclasses.replace(
    data,
    train_batches=wrap(data.train_batches),
    eval_batches=wrap(data.eval_batches),
    validation_batches=wrap(data.validation_batches),
  )


def _pad_batch(batch: dict, size: int) -> dict:
  """Pads a numpy eval batch to `size` rows with zeros and adds the `mask`."""
  real = len(batch["label"])
  padded = {k: np.zeros((size, *v.shape[1:]), v.dtype) for k, v in batch.items()}
  for k, v in batch.items():
    padded[k][:real] = v
  padded["mask"] = (np.arange(size) < real).astype(np.float32)
  return padded


def _padded_eval_pass(batches: Iterator[dict], size: int, num_batches: int) -> Iterator[dict]:
  """Yields exactly `num_batches` full-size batches: real ones, then all-padding ones.

  Every process must run the same number of eval steps (the jitted step is a collective), even
  when its share of the eval split is one example shorter.
  """
  template, count = None, 0
  for batch in batches:
    template = _pad_batch(batch, size)
    count += 1
    yield template
  if template is None:
    raise ValueError("The eval split of this process is empty.")
  for _ in range(count, num_batches):
    yield {k: np.zeros_like(v) for k, v in template.items()}


# ---------------------------------------------------------------------------------------------
# TFDS datasets (CIFAR, ImageNet).


def _tfds_data(
  spec: _TfdsSpec,
  per_batch: int,
  per_eval_batch: int,
  seed: int,
  image_size: int,
  data_dir: str | None,
  augment: bool,
  validation_percent: int,
  shard: tuple[int, int],
  labels_only: bool = False,
) -> ImageData:
  """`get_data` for the TFDS datasets (labels_only: no image is decoded or kept)."""
  # Prepared data is read as is; CIFAR downloads itself the first time when its source answers.
  # Offline, or for ImageNet's manual download, this fails within seconds saying what to do.
  builder = prepare.prepared_builder(spec.tfds_name, data_dir)

  options = tf.data.Options()
  options.deterministic = True  # Parallel maps and interleaves keep their input order.
  # Files are read in a fixed order (`shuffle_files=False` below); the per-epoch order comes
  # from a seeded shuffle buffer, whose seed can depend on the epoch inside one tf.data graph.
  read_config = tfds.ReadConfig(options=options)
  process, processes = shard  # This process loads share `process` of `processes`.

  def encoded(split) -> tf.data.Dataset:
    # SkipDecoding keeps images as encoded bytes, so records skipped on resume and records
    # waiting in the shuffle buffer are never decoded.
    return builder.as_dataset(
      split=split,
      shuffle_files=False,
      read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()},
    )

  keep = 100 - validation_percent  # TFDS slices by percent of the split, in canonical order.
  train_name = f"train[:{keep}%]" if validation_percent else "train"
  train_split = tfds.even_splits(train_name, n=processes, drop_remainder=True)[process]
  train_ds = encoded(train_split)
  # Cardinality, not `info.splits`: it is what this process will actually read (and under
  # `tfds.testing.mock_data` the two disagree).
  num_train = int(train_ds.cardinality())

  if spec.native_size is None:
    train_fn = functools.partial(_imagenet_train, size=image_size)
    eval_fn = functools.partial(_imagenet_eval, size=image_size)
  else:
    train_fn, eval_fn = _cifar_train, _cifar_eval
  if not augment:
    train_fn = lambda image, key: eval_fn(image)
  mean = tf.constant(spec.mean, tf.float32) * 255.0
  std = tf.constant(spec.std, tf.float32) * 255.0

  def finish(image, label) -> dict:
    # Static shapes for the batched numpy arrays; also fails loudly on an odd CIFAR image.
    image = tf.ensure_shape(image, (image_size, image_size, 3))
    image = (tf.cast(image, tf.float32) - mean) / std
    return {"image": image, "label": tf.cast(label, tf.int32)}

  def train_example(index, example) -> dict:
    if labels_only:
      return {"label": tf.cast(example["label"], tf.int32)}
    # One key per example from its position in the global stream (all processes interleaved),
    # so augmentation does not depend on where a run started.
    key = tf.random.experimental.stateless_fold_in(
      tf.constant([_AUGMENT_TAG, seed], tf.int64), index * processes + process
    )
    return finish(train_fn(example["image"], key), example["label"])

  def epoch(number) -> tf.data.Dataset:
    key = tf.random.experimental.stateless_fold_in(
      tf.constant([_SHUFFLE_TAG, seed], tf.int64), number
    )
    shuffle_seed = tf.random.stateless_uniform(
      [], seed=key, minval=None, maxval=None, dtype=tf.int64
    )
    buffer = spec.shuffle_buffer or num_train
    return train_ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

  def train_batches(start_step: int = 0) -> Iterator[dict]:
    if start_step < 0:
      raise ValueError(f"start_step must be non-negative, got {start_step}.")
    first = start_step * per_batch  # Position in this process's example stream.
    first_epoch, offset = divmod(first, num_train)
    ds = tf.data.Dataset.range(first_epoch, _INT64_MAX).flat_map(epoch)
    ds = ds.skip(offset).enumerate(start=first)
    ds = ds.map(train_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(options).as_numpy_iterator()

  def eval_pass(split: str) -> tuple[Callable[[], Iterator[dict]], int]:
    """One padded pass over this process's share of `split`, and the split's size."""
    shares = tfds.even_splits(split, n=processes, drop_remainder=False)
    counts = [int(encoded(s).cardinality()) for s in shares]
    share = encoded(shares[process])

    def batches() -> Iterator[dict]:
      if labels_only:
        example = lambda ex: {"label": tf.cast(ex["label"], tf.int32)}
      else:
        example = lambda ex: finish(eval_fn(ex["image"]), ex["label"])
      ds = share.map(example, num_parallel_calls=tf.data.AUTOTUNE)
      ds = ds.batch(per_eval_batch).prefetch(tf.data.AUTOTUNE).with_options(options)
      num_batches = math.ceil(max(counts) / per_eval_batch)
      return _padded_eval_pass(ds.as_numpy_iterator(), per_eval_batch, num_batches)

    return batches, sum(counts)

  eval_batches, num_eval = eval_pass(spec.eval_split)
  validation_batches, num_validation = (
    eval_pass(f"train[{keep}%:]") if validation_percent else (None, 0)
  )
  return ImageData(
    train_batches=train_batches,
    eval_batches=eval_batches,
    num_train_examples=num_train * processes,
    num_eval_examples=num_eval,
    num_classes=spec.num_classes,
    image_shape=(image_size, image_size, 3),
    validation_batches=validation_batches,
    num_validation_examples=num_validation,
  )


def _cifar_train(encoded: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """Decodes a CIFAR PNG; zero-pads, randomly crops back to 32x32 and flips."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  image = tf.io.decode_png(encoded, channels=3)
  size = tf.shape(image)
  pad = [[_CIFAR_PAD, _CIFAR_PAD], [_CIFAR_PAD, _CIFAR_PAD], [0, 0]]
  image = tf.image.stateless_random_crop(tf.pad(image, pad), size, seed=crop_key)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def _cifar_eval(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes a CIFAR PNG."""
  return tf.io.decode_png(encoded, channels=3)


def _imagenet_train(encoded: tf.Tensor, key: tf.Tensor, *, size: int) -> tf.Tensor:
  """Inception-style random-resized crop of a JPEG, then a random flip.

  Decodes only the sampled window (`decode_and_crop_jpeg`), as flax's ImageNet example does.
  """
  box_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shape = tf.io.extract_jpeg_shape(encoded)
  begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
    seed=box_key,
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  # After 10 failed attempts the sampler returns the whole image; Inception-style pipelines
  # fall back to the eval centre crop instead.
  failed = tf.reduce_all(tf.equal(box_size[:2], shape[:2]))
  window = tf.stack([begin[0], begin[1], box_size[0], box_size[1]])
  window = tf.where(failed, _center_window(shape), window)
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = _resize(image, size)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def _imagenet_eval(encoded: tf.Tensor, *, size: int) -> tf.Tensor:
  """Centre crop of 0.875 of the shorter side of a JPEG, resized to `size`."""
  window = _center_window(tf.io.extract_jpeg_shape(encoded))
  return _resize(tf.image.decode_and_crop_jpeg(encoded, window, channels=3), size)


def _center_window(shape: tf.Tensor) -> tf.Tensor:
  """[y, x, h, w] of the centred square with side 0.875 * the shorter side."""
  height, width = shape[0], shape[1]
  side = tf.cast(
    _IMAGENET_EVAL_CROP * tf.cast(tf.minimum(height, width), tf.float32) + 0.5, tf.int32
  )
  side = tf.maximum(side, 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  # Bicubic overshoots; clip back to the pixel range so normalisation sees what a PNG could hold.
  image = tf.image.resize(image, [size, size], method="bicubic")
  return tf.clip_by_value(image, 0.0, 255.0)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits.

_DIGITS_HOLDOUT_EVERY = 5  # Every fifth image of each class is held out for eval.


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Train/test images in [0, 1], (N, 8, 8, 1) float32, and int32 labels; RNG-free split."""
  # Imported here: scikit-learn is only needed for this dataset.
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # Pixels are 0..16.
  labels = digits.target.astype(np.int32)
  held_out = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    held_out[np.flatnonzero(labels == c)[_DIGITS_HOLDOUT_EVERY - 1 :: _DIGITS_HOLDOUT_EVERY]] = 1
  return images[~held_out], labels[~held_out], images[held_out], labels[held_out]


def _digits(
  per_batch: int, per_eval_batch: int, seed: int, shard: tuple[int, int], labels_only: bool
) -> ImageData:
  """`get_data` for scikit-learn's digits, in numpy (the whole dataset is under 1 MB)."""
  train_x, train_y, test_x, test_y = _digits_split()
  mean, std = train_x.mean(), train_x.std()  # One channel; statistics of the train split.
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  process, processes = shard  # This process loads share `process` of `processes`.
  # Same shares as tfds.even_splits: equal contiguous train shares, eval shares within one.
  num_train = len(train_y) // processes
  train_x = train_x[process * num_train : (process + 1) * num_train]
  train_y = train_y[process * num_train : (process + 1) * num_train]
  eval_shares = np.array_split(np.arange(len(test_y)), processes)

  @functools.lru_cache(maxsize=2)  # A batch spans at most a few epochs; keep the last two.
  def order(epoch: int) -> np.ndarray:
    return np.random.default_rng([_SHUFFLE_TAG, seed, epoch]).permutation(num_train)

  def train_batches(start_step: int = 0) -> Iterator[dict]:
    if start_step < 0:
      raise ValueError(f"start_step must be non-negative, got {start_step}.")
    for step in range(start_step, _INT64_MAX):
      epochs, offsets = np.divmod(np.arange(step * per_batch, (step + 1) * per_batch), num_train)
      index = np.array([order(int(e))[o] for e, o in zip(epochs, offsets)])
      yield (
        {"label": train_y[index]}
        if labels_only
        else {"image": train_x[index], "label": train_y[index]}
      )

  def eval_batches() -> Iterator[dict]:
    share = eval_shares[process]
    batches = (
      {"label": test_y[i]} if labels_only else {"image": test_x[i], "label": test_y[i]}
      for i in np.array_split(share, range(per_eval_batch, len(share), per_eval_batch))
    )
    num_batches = math.ceil(max(map(len, eval_shares)) / per_eval_batch)
    return _padded_eval_pass(batches, per_eval_batch, num_batches)

  return ImageData(
    train_batches=train_batches,
    eval_batches=eval_batches,
    num_train_examples=num_train * processes,
    num_eval_examples=len(test_y),
    num_classes=10,
    image_shape=_DIGITS_SHAPE,
  )
