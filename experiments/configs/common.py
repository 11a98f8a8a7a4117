"""Fields every experiment config has, and the `get_config(arg)` variant parser.

`--config experiments/configs/resnet_cifar10.py:strategy=pairwise,stages=4` passes the text
after the colon to `get_config`; `parse_arg` turns it into typed values with defaults and
rejects unknown keys (big_vision's `configs/common.py` idea). Any field can then be
overridden with `--config.FIELD=VALUE`.
"""

from __future__ import annotations

import math

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
  c.optimizer.schedule = "cosine"  # "constant", "cosine", "linear", "step" or "piecewise".
  c.optimizer.warmup_steps = 0  # Linear warm-up from 0.
  c.optimizer.momentum = 0.9  # SGD momentum.
  c.optimizer.nesterov = False  # Nesterov momentum for SGD.
  c.optimizer.weight_decay = 5e-4  # On kernels only (ndim > 1); L2 for SGD, decoupled for AdamW.
  c.optimizer.b1 = 0.9  # Adam first moment.
  c.optimizer.b2 = 0.999  # Adam second moment.
  c.optimizer.eps = 1e-8  # Adam epsilon.
  c.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)  # Per stage/head.
  c.optimizer.decay_boundaries = (0.5, 0.75)  # "step" schedule: fractions of total_steps.
  c.optimizer.decay_factor = 0.1  # "step"/"piecewise" schedules: multiplier at each boundary.
  c.optimizer.decay_steps = ()  # "piecewise" schedule: the steps where the rate drops.

  c.execution = ml_collections.ConfigDict()
  # "fused" (one program, data parallel over every device), "dataflow" (stage k on its own
  # devices, one program per stage and operation), "spmd" (one program over a
  # ('stage', 'data') mesh: a scan over the schedule's ticks).
  c.execution.kind = "fused"
  # M: the batch is split into M microbatches (gradients accumulate; BatchNorm statistics
  # per microbatch). Pipelines overlap stages across microbatches.
  c.execution.microbatches = 1
  # Pipelines: a stage applies its update as soon as its own gradients are complete and starts
  # the next step (exact, no staleness); False flushes every stage at every step.
  c.execution.continuous = True
  # Pipelines: "1f1b" (one forward, one backward), "gpipe" (all forwards, then all backwards)
  # or "zb" (ZB-H1: weight-gradient VJPs deferred into the bubble).
  c.execution.schedule = "1f1b"
  # D: devices per stage for pipelines (K·D in all; None = 1); fused: None = every device.
  c.execution.data_parallel = ml_collections.config_dict.placeholder(int)
  # spmd: optimizer steps per program call, without a flush between them where the strategy
  # allows; eval/checkpoint steps inside a call's span fall back to one-step calls.
  c.execution.steps_per_call = 1
  # "engine" (per-stage VJPs) or "spec" (jax.grad of the stop_gradient composition; fused only).
  c.execution.gradients = "engine"
  # spmd: split the Transformer's token table by rows over the stages (each holds 1/K of it
  # and its optimizer moments) instead of padding every stage's state to stage 1's size.
  c.execution.vocab_parallel = True
  # spmd: a backward that waits for a cotangent from above re-runs its forward (True: holds
  # only the stage input per in-flight microbatch) or reads the residuals the forward stored.
  c.execution.remat = False
  # What each stage's forward keeps for its backward, in every executor: "all" (every residual
  # jax.vjp keeps) or "matmuls" (the outputs of matrix products and convolutions; norms,
  # activations and dropout masks are recomputed from them in the backward: ~4x fewer bytes
  # per in-flight microbatch on resnet20, some recompute time; docs/pipeline.md).
  c.execution.residuals = "all"

  # The modelled pipeline time (`ilbp.pipeline_time`): per-stage op costs measured once at the
  # start (cached in the workdir: a resume reuses them) and pipeline/seconds, the modelled time
  # of the steps so far on K devices, logged next to each step. K = 1 measures nothing. Off
  # under runlocal (tests and smoke runs): measuring compiles ~6 more programs per stage, about
  # 10 s on a 2-core CPU (`scripts.reproduce` turns it on for its smoke runs).
  c.pipeline_time = ml_collections.ConfigDict()
  c.pipeline_time.measure = not args.get("runlocal", False)  # False: no pipeline/seconds.
  # M of the modelled pipeline; None = execution.microbatches.
  c.pipeline_time.microbatches = ml_collections.config_dict.placeholder(int)
  # Its schedule ("gpipe", "1f1b", "zb"); None = execution.schedule.
  c.pipeline_time.schedule = ml_collections.config_dict.placeholder(str)
  c.pipeline_time.repeats = 3  # Timed calls per op (their median).
  return c


def epochs_to_steps(epochs: float, examples: int, batch_size: int) -> int:
  """Optimizer steps until `epochs` passes over `examples` at `batch_size` have started.

  The train stream runs across epoch boundaries (a batch may hold the end of one epoch and the
  start of the next), so this is the first step that starts at or after that many epochs.
  """
  return math.ceil(epochs * examples / batch_size)


CIFAR_TRAIN_EXAMPLES = 50_000  # The TFDS train split of CIFAR-10 and of CIFAR-100.
CIFAR_RECIPES = ("authors", "cosine")
# The authors' recipe (see resnet_cifar10.py): 10% of train held out, 200 epochs of the other
# 45,000 images, the learning rate x0.1 at epochs 91, 136 and 182.
AUTHORS_VALIDATION_FRACTION = 0.1
AUTHORS_EPOCHS = 200
AUTHORS_DECAY_EPOCHS = (91, 136, 182)


def cifar_config(args, *, dataset: str):
  """Shared by the CIFAR-10 and CIFAR-100 configs: only the dataset differs.

  `args.recipe` picks the training recipe: "authors" (the authors' CIFAR recipe;
  resnet_cifar10.py gives the source and where their released script differs) or "cosine" (this
  repo's earlier one: 64k steps, warm-up + cosine, weight decay 5e-4, all of train used,
  FLOP-balanced stages).
  """
  if args.recipe not in CIFAR_RECIPES:
    raise ValueError(f"Unknown recipe {args.recipe!r}; valid: {', '.join(CIFAR_RECIPES)}.")
  c = base_config(args)
  c.family = "resnet"
  c.batch_size = 128
  c.eval_batch_size = 512  # Divides over 8, 16, 32... devices (eval pads the last batch).
  c.learning_rate = 0.1
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.log_every_steps = 100

  c.model = ml_collections.ConfigDict()
  c.model.name = args.model  # resnet20/32/44/56/110 (He et al.), resnet34_cifar (authors').
  # "balanced" (by XLA FLOPs), "balanced_heads" (FLOPs of each stage and its aux head: the
  # pipeline's throughput split for conv heads; moves the heads), "groups" (one group of blocks
  # per stage; K = groups) or blocks per stage, e.g. "4,4,4,4".
  c.model.split = "balanced"
  c.model.head = args.head  # Aux head: "conv" (authors': 2 convs + pool + dense) or "pool".
  c.model.dtype = "float32"  # Computation dtype: "float32" or "bfloat16" (params stay f32).
  c.model.conv = "auto"  # Conv gradients: auto, xla, explicit or canonical (ilbp.models.conv).

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = dataset  # TFDS name.
  c.dataset.augment = True  # 4-pixel pad + random crop + horizontal flip.
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir (or gs://).
  # Share of the TFDS train split held out (its last part, train[90%:] for 0.1) and evaluated
  # as val/...; the test split is always evaluated as eval/....
  c.dataset.validation_fraction = 0.0

  if args.recipe == "authors":
    c.dataset.validation_fraction = AUTHORS_VALIDATION_FRACTION
    examples = round(CIFAR_TRAIN_EXAMPLES * (1 - AUTHORS_VALIDATION_FRACTION))  # 45,000.
    steps = lambda epochs: epochs_to_steps(epochs, examples, c.batch_size)
    c.total_steps = steps(AUTHORS_EPOCHS)  # 70,313.
    c.optimizer.schedule = "piecewise"
    c.optimizer.decay_steps = tuple(steps(e) for e in AUTHORS_DECAY_EPOCHS)  # 31,993/47,813/63,985
    c.optimizer.decay_factor = 0.1
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 2e-4
    c.eval_every_steps = c.checkpoint_every_steps = steps(5)  # 1,758: every 5 epochs.
    # One group of blocks per stage, as the authors cut their 4-group net; other stage counts
    # cannot be cut at groups and fall back to the FLOP-balanced split.
    c.model.split = "groups" if args.stages == 4 else "balanced"
  else:
    c.total_steps = 64_000
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 5e-4
    c.eval_every_steps = c.checkpoint_every_steps = 2000

  if args.runlocal:
    c.model.name = "resnet_tiny"  # 4 groups too, so the authors' "groups" split still applies.
    c.batch_size = 32
    c.eval_batch_size = 64
    c.total_steps = 20
    c.optimizer.warmup_steps = 0
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.max_eval_batches = 2
  return c


def transformer_model(c, args, *, num_layers, d_model, num_heads, d_ff, dtype, dropout=0.1):
  """Fills c.model; shared by the lm1b and stdlib configs."""
  c.model = ml_collections.ConfigDict()
  c.model.num_layers = num_layers  # Decoder blocks, split evenly over the stages.
  c.model.layers_per_stage = ml_collections.config_dict.placeholder(tuple)  # None = even.
  c.model.d_model = d_model  # Residual stream width.
  c.model.num_heads = num_heads  # Attention heads.
  c.model.d_ff = d_ff  # MLP hidden width.
  c.model.dropout_rate = dropout  # Attention, residual and embedding dropout.
  c.model.positions = args.positions  # "learned" or "rotary".
  c.model.head = args.head  # Aux head: "linear" (LN + projection) or "block" (+1 block first).
  c.model.dtype = dtype  # Computation dtype; params and losses stay float32.
