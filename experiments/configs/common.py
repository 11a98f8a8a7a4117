"""Fields every experiment config has, and the `get_config(arg)` variant parser.

`--config experiments/configs/resnet_cifar10.py:strategy=pairwise,stages=4` passes the text
after the colon to `get_config`; `parse_arg` turns it into typed values with defaults and
rejects unknown keys (big_vision's `configs/common.py` idea). Any field can then be
overridden with `--config.FIELD=VALUE`.
"""

from __future__ import annotations

import ml_collections

# Keys every config's argument string accepts; a config may add its own.
COMMON_ARGS = {"strategy": "pairwise", "stages": 4, "combine": "furthest", "runlocal": False}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "key=value,key=value" into a ConfigDict typed like `defaults`.

  Args:
    arg: the text after ':' in --config, or None.
    **defaults: every accepted key with its default (its type converts the value).

  Raises:
    ValueError: an unknown key, or a value that does not convert, naming the valid keys.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; valid: {', '.join(sorted(defaults))}.")
    kind = type(defaults[key])
    if kind is bool:
      value = value.strip().lower() in ("", "1", "true", "yes")
    try:
      out[key] = kind(value)
    except ValueError as e:
      raise ValueError(f"Config argument {key}={value!r} is not a {kind.__name__}.") from e
  return out


def base_config(args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields the trainer reads, with defaults; experiment configs fill in the rest."""
  c = ml_collections.ConfigDict()
  c.family = ""  # "resnet" or "transformer": which model and data builders to use.
  c.strategy = args.strategy  # "local", "pairwise", "<n>wise" or "global".
  c.combine = args.combine  # "furthest" (authors') or "sum": how losses reaching a stage combine.
  c.num_stages = args.stages  # K: depthwise stages, one per accelerator in a pipeline.
  c.seed = 0  # Initialisation, data order, augmentation and dropout all derive from it.
  c.batch_size = 128  # Global train batch (split over data-parallel devices and processes).
  c.eval_batch_size = 256  # Global eval batch; the last batch is padded and masked.
  c.total_steps = 1000  # Optimizer steps in the whole run.
  c.learning_rate = 0.1  # Peak learning rate (after warm-up).
  c.label_smoothing = 0.0  # Classification only.
  c.log_every_steps = 50  # Train metrics to metrics.jsonl / TensorBoard / console.
  c.eval_every_steps = 500  # Full pass over the eval split, every head.
  c.max_eval_batches = ml_collections.config_dict.placeholder(int)  # None = whole eval split.
  c.checkpoint_every_steps = 500  # Orbax checkpoint interval (and always at the end).
  c.max_checkpoints_to_keep = 3  # Older checkpoints are deleted after a successful save.
  c.async_checkpoints = True  # Save in the background while training continues.
  c.allow_config_change = False  # Resume a workdir written by a different model/strategy.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # "sgd" (momentum) or "adamw".
  c.optimizer.schedule = "cosine"  # "constant", "cosine", "linear" or "step".
  c.optimizer.warmup_steps = 0  # Linear warm-up from 0.
  c.optimizer.momentum = 0.9  # SGD momentum.
  c.optimizer.nesterov = False  # Nesterov momentum for SGD.
  c.optimizer.weight_decay = 5e-4  # On kernels only (ndim > 1); L2 for SGD, decoupled for AdamW.
  c.optimizer.b1 = 0.9  # Adam first moment.
  c.optimizer.b2 = 0.999  # Adam second moment.
  c.optimizer.eps = 1e-8  # Adam epsilon.
  c.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)  # Per stage/head.
  c.optimizer.decay_boundaries = (0.5, 0.75)  # "step" schedule: fractions of total_steps.
  c.optimizer.decay_factor = 0.1  # "step" schedule: multiplier at each boundary.
  return c
