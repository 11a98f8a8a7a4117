"""Random batches of a dataset's shapes: what benchmarks time steps on, with nothing to read.

The cost of a step does not depend on the values it sees, so the benchmark scripts build the
model, task and optimizer of an experiment config (`ilbp.families.build_synthetic`) and feed it
these batches instead of the config's dataset: no download, no input pipeline. Batch `s` is a
pure function of (seed, s), as with the real pipelines.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator

import numpy as np

# Tags that separate the train and eval streams derived from one seed.
_TRAIN_TAG = 1
_EVAL_TAG = 2


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """Endless random train batches and one eval batch, of one dataset's shapes.

  Attributes:
    make_batch: `(rng, size) -> batch`: one random numpy batch of `size` examples.
    batch_size: train batch size.
    eval_batch_size: eval batch size.
    seed: fixes every batch (train batch `s` is a function of (seed, s)).
    num_classes: labels (image classification), else None.
    image_shape: (H, W, C) (image classification), else None.
    vocab_size: token ids (language modelling), else None.
  """

  make_batch: Callable[[np.random.Generator, int], dict]
  batch_size: int
  eval_batch_size: int
  seed: int
  num_classes: int | None = None
  image_shape: tuple[int, int, int] | None = None
  vocab_size: int | None = None
  validation_batches: None = None  # No validation split.

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    for step in itertools.count(start_step):
      yield self.make_batch(np.random.default_rng([_TRAIN_TAG, self.seed, step]), self.batch_size)

  def eval_batches(self) -> Iterator[dict]:
    batch = self.make_batch(np.random.default_rng([_EVAL_TAG, self.seed]), self.eval_batch_size)
    yield dict(batch, mask=np.ones(self.eval_batch_size, np.float32))


def images(
  num_classes: int,
  image_shape: tuple[int, int, int],
  *,
  batch_size: int,
  eval_batch_size: int,
  seed: int,
) -> SyntheticData:
  """{"image": standard normal float32 [b, H, W, C], "label": int32 [b]} batches."""

  def make_batch(rng: np.random.Generator, size: int) -> dict:
    return {
      "image": rng.standard_normal((size, *image_shape), np.float32),
      "label": rng.integers(0, num_classes, size, dtype=np.int32),
    }

  return SyntheticData(
    make_batch,
    batch_size,
    eval_batch_size,
    seed,
    num_classes=num_classes,
    image_shape=tuple(image_shape),
  )


def tokens(
  vocab_size: int, seq_len: int, *, batch_size: int, eval_batch_size: int, seed: int
) -> SyntheticData:
  """{"inputs", "targets": int32 [b, L] (targets = inputs shifted by one), "weights": ones}
  batches of uniformly random token ids."""

  def make_batch(rng: np.random.Generator, size: int) -> dict:
    ids = rng.integers(0, vocab_size, (size, seq_len + 1), dtype=np.int32)
    return {
      "inputs": ids[:, :-1],
      "targets": ids[:, 1:],
      "weights": np.ones((size, seq_len), np.float32),
    }

  return SyntheticData(make_batch, batch_size, eval_batch_size, seed, vocab_size=vocab_size)
