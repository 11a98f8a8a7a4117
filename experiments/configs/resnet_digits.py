"""The offline quickstart: a small CIFAR-style ResNet on scikit-learn's bundled digits.

1,797 real 8×8 handwritten digits (1,442 train / 355 test), no download. Command:
  python -m experiments.resnet \
    --config experiments/configs/resnet_digits.py:strategy=pairwise,stages=3 --workdir DIR

Model: resnet20 (He et al.: 3 groups of 3 basic blocks) cut into 3 stages, pool heads.
300 steps at batch 64 (~13 epochs), SGD + momentum, cosine schedule.
Hardware: 2-core CPU, ~20-45 s per strategy. Test accuracy at every head for local, pairwise and
global (seed 0, `scripts/compare_strategies.py`): the README's quickstart table, which also says
how much the early heads vary from one CPU to another.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  defaults = dict(common.COMMON_ARGS, stages=3)
  args = common.parse_arg(arg, **defaults, model="resnet20", head="pool")
  c = common.base_config(args)
  c.family = "resnet"
  c.batch_size = 64
  c.eval_batch_size = 128
  c.total_steps = 300
  c.learning_rate = 0.05
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 30
  c.log_every_steps = 50
  c.eval_every_steps = 150
  c.checkpoint_every_steps = 150

  c.model = common.ml_collections.ConfigDict()
  c.model.name = args.model  # Any CIFAR-family name works on 8×8 inputs.
  # "balanced" (by XLA FLOPs), "balanced_heads" (stage + aux head FLOPs) or blocks per stage,
  # e.g. "3,3,3".
  c.model.split = "balanced"
  c.model.head = args.head  # "pool" (cheap) or "conv" (authors' head).
  c.model.dtype = "float32"
  c.model.conv = "auto"  # Conv gradients: auto, xla, explicit or canonical (ilbp.models.conv).

  c.dataset = common.ml_collections.ConfigDict()
  c.dataset.name = "digits"  # scikit-learn's load_digits, split deterministically.
  c.dataset.augment = False  # Digits are not augmented (a 1-pixel shift is 12.5% of the image).

  if args.runlocal:
    c.model.name = "resnet_tiny"
    c.total_steps = 6
    c.optimizer.warmup_steps = 0
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 3
  return c
