"""Config -> model, data and task: the one place that knows the model families.

The trainer and the executors never branch on the family: `build` returns a `Built` with the
staged model, the data (train_batches(start_step), eval_batches()), the task and the abstract
network input every executor initialises from. `build_synthetic` builds the same model with
random batches of the data's shapes (the benchmarks). A new family is one entry in `_BUILDERS`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ilbp import files, tasks
from ilbp.data import synthetic as synthetic_data
from ilbp.models import conv
from ilbp.staged import StagedModel

# float64 only with jax_enable_x64 (scripts/check_spmd.py computes its ResNet in it).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class Built:
  """What a config builds.

  Attributes:
    model: the staged model.
    data: has `train_batches(start_step)` and `eval_batches()` (numpy batches of this process),
      and may have `validation_batches()` (a split held out of train; None when there is none);
      from `build_synthetic`, random batches of the same shapes (`ilbp.data.synthetic`).
    task: from `ilbp.tasks` (inputs, targets, loss, eval sums).
    input_spec: shape (batch 1) and dtype of the network input: parameter shapes do not depend
      on the batch, so every executor initialises from it without starting an input pipeline.
  """

  model: StagedModel
  data: Any
  task: Any
  input_spec: jax.ShapeDtypeStruct


def dtype(name: str):
  """The compute dtype named in a config."""
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; valid: {', '.join(DTYPES)}.")
  if name == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("dtype 'float64' needs jax.config.update('jax_enable_x64', True) first.")
  return DTYPES[name]


def parse_split(split) -> str | tuple[int, ...]:
  """A named split (`resnet.SPLITS`), or blocks per stage from "3,3,3" (a string, so
  --config.model.split= works)."""
  from ilbp.models import resnet

  if not isinstance(split, str):
    return tuple(int(x) for x in split)
  if split.strip() in resnet.SPLITS:
    return split.strip()
  try:
    return tuple(int(x) for x in split.split(","))
  except ValueError as e:
    raise ValueError(
      f"config.model.split={split!r}: use 'balanced', 'balanced_heads', 'groups' or blocks per "
      "stage such as '3,3,3'."
    ) from e


def validate(config: ml_collections.ConfigDict) -> None:
  """Family-specific config checks that need no data and no compilation."""
  if config.family not in _BUILDERS:
    raise ValueError(f"Unknown family {config.family!r}; valid: {', '.join(_BUILDERS)}.")
  dtype(config.model.dtype)
  if config.family == "resnet":
    parse_split(config.model.split)
    conv.check_impl(config.model.get("conv", "auto"), what="config.model.conv")


def _resnet(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  shard,
  synthetic: bool,
  labels_only: bool = False,
) -> Built:
  from ilbp.data import images
  from ilbp.models import resnet

  m, d = config.model, config.dataset
  if synthetic:
    num_classes, shape = images.dataset_shape(d.name, d.get("image_size"))
    data = synthetic_data.images(
      num_classes,
      shape,
      batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      seed=config.seed,
    )
  else:
    data = images.get_data(
      d.name,
      batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      seed=config.seed,
      image_size=d.get("image_size"),
      data_dir=d.get("data_dir"),
      augment=d.augment,
      validation_fraction=d.get("validation_fraction", 0.0),
      shard=shard,
      labels_only=labels_only,
    )
  model = resnet.make_model(
    m.name,
    num_classes=data.num_classes,
    num_stages=config.num_stages,
    split=parse_split(m.split),
    head=m.head,
    input_shape=tuple(data.image_shape),
    dtype=dtype(m.dtype),
    conv=m.get("conv", "auto"),
  )
  task = tasks.Classification(label_smoothing=config.get("label_smoothing", 0.0))
  return Built(model, data, task, jax.ShapeDtypeStruct((1, *data.image_shape), jnp.float32))


def _transformer(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  shard,
  synthetic: bool,
  labels_only: bool = False,
) -> Built:
  del labels_only  # A language model's targets are its next tokens: the inputs are read anyway.
  from ilbp.data import text, tokenizers
  from ilbp.models import transformer

  m, d = config.model, config.dataset
  if synthetic:
    # A SentencePiece model may come out smaller than asked for; the benchmarks time the size
    # the config asks for.
    vocab = tokenizers.ByteTokenizer.vocab_size if d.tokenizer == "bytes" else d.vocab_size
    data = synthetic_data.tokens(
      vocab,
      d.seq_len,
      batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      seed=config.seed,
    )
  else:
    data = text.get_data(
      d.name,
      batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      seq_len=d.seq_len,
      seed=config.seed,
      tokenizer=d.tokenizer,
      vocab_size=d.vocab_size,
      cache_dir=d.get("cache_dir") or os.path.join(workdir, "data_cache"),
      max_eval_sequences=d.get("max_eval_sequences"),
      data_dir=d.get("data_dir"),
      **({"max_files": d.get("max_files")} if d.name == "stdlib" else {}),
      shard=shard,
    )
  layers = m.get("layers_per_stage")
  model = transformer.make_model(
    vocab_size=data.vocab_size,
    num_layers=m.num_layers,
    num_stages=config.num_stages,
    d_model=m.d_model,
    num_heads=m.num_heads,
    d_ff=m.d_ff,
    max_len=d.seq_len,
    dropout_rate=m.dropout_rate,
    positions=m.positions,
    head=m.head,
    layers_per_stage=tuple(layers) if layers else None,
    dtype=dtype(m.dtype),
  )
  spec = jax.ShapeDtypeStruct((1, d.seq_len), jnp.int32)
  return Built(model, data, tasks.LanguageModeling(), spec)


# Model and data modules are imported inside the builders, so a ResNet run never imports the
# text pipeline and vice versa.
_BUILDERS = {"resnet": _resnet, "transformer": _transformer}
FAMILIES = tuple(_BUILDERS)


def describe(config: ml_collections.ConfigDict, built: Built) -> str:
  """A one-line description of a built model and its input, for benchmark and log headers."""
  model, shape = built.model, built.input_spec.shape[1:]
  if config.family == "resnet":
    from ilbp.models import resnet

    return f"{resnet.describe_split(model)}, {'x'.join(map(str, shape))} inputs"
  m, info = config.model, model.info
  params = sum(info["stage_params"]) + (model.num_stages - 1) * info["head_params"]
  return (
    f"transformer LM: {m.num_layers} layers ({'+'.join(map(str, info['layers_per_stage']))}), "
    f"d={m.d_model}, heads={m.num_heads}, d_ff={m.d_ff}, vocab={built.data.vocab_size}, "
    f"seq {shape[0]}, dropout {m.dropout_rate}, {m.head} aux heads, "
    f"{params / 1e6:.2f}M params incl. heads"
  )


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a bucket workdir (gs://...) where the family would keep a local cache in it: the
  text pipeline writes its tokenizer and token arrays with local file functions."""
  if config.family != "transformer" or not files.is_url(workdir):
    return
  cache = config.dataset.get("cache_dir")
  if not cache or files.is_url(cache):
    raise ValueError(
      f"--workdir={workdir!r} is in a bucket, and the text pipeline's cache (the tokenizer and "
      f"token arrays, by default <workdir>/data_cache) must be a local or mounted path, got "
      f"config.dataset.cache_dir={cache!r}. Pass --config.dataset.cache_dir=DIR on a disk that "
      "outlives the VM (a persistent disk or a mounted bucket): a resumed run must find the "
      "same tokenizer there. Nothing was written."
    )


def build(
  config: ml_collections.ConfigDict,
  workdir: str,
  shard: tuple[int, int] | None = None,
  labels_only: bool = False,
) -> Built:
  """Data, staged model, task and input spec for the config's family.

  Args:
    config: an experiment config (experiments/configs/).
    workdir: the run directory (caches that belong to the run, e.g. a tokenizer, go there).
    shard: `(index, count)` of the input share this process loads (default: by process;
      `ilbp.execution.factory.input_shard` gives the executor's).
    labels_only: this process feeds no input (`ilbp.execution.factory.labels_only`): image
      pipelines decode no image. Text pipelines ignore it (targets are the next tokens).
  """
  validate(config)
  return _BUILDERS[config.family](config, workdir, shard, synthetic=False, labels_only=labels_only)


def build_synthetic(config: ml_collections.ConfigDict) -> Built:
  """`build` with random batches of the config's shapes in place of its dataset.

  The model, task and input spec are exactly `build`'s; `data` (`ilbp.data.synthetic`) reads
  and downloads nothing: for benchmarks, which time steps rather than learn.
  """
  validate(config)
  return _BUILDERS[config.family](config, None, None, synthetic=True)
