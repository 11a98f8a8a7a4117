"""ResNet-50 on ImageNet (ILSVRC-2012), the paper's large-scale image benchmark.

Command (Cloud TPU VM v3-8 or larger; ImageNet prepared under data_dir, see README):
  python -m experiments.resnet \
    --config experiments/configs/resnet_imagenet.py:strategy=pairwise,stages=4 --workdir DIR \
    --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

90 epochs at global batch 1024 (≈ 112,590 steps), SGD + Nesterov momentum, lr 0.4 with 5 warm-up
epochs and cosine decay, weight decay 1e-4, label smoothing 0.1, bfloat16 compute.
Expected wall time and accuracy: not yet measured (no accelerator so far).
"""

from experiments.configs import common

EXAMPLES = 1_281_167


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, **common.COMMON_ARGS, model="resnet50", head="conv")
  c = common.base_config(args)
  c.family = "resnet"
  c.batch_size = 1024
  c.eval_batch_size = 1024  # Divides over 8, 16, 32... devices (eval pads the last batch).
  steps_per_epoch = EXAMPLES // c.batch_size
  c.total_steps = 90 * steps_per_epoch
  c.learning_rate = 0.4
  c.label_smoothing = 0.1
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  c.log_every_steps = 100
  c.eval_every_steps = 5 * steps_per_epoch
  c.checkpoint_every_steps = steps_per_epoch

  c.model = common.ml_collections.ConfigDict()
  c.model.name = args.model  # resnet50 / resnet101 / resnet152.
  # "balanced" (by XLA FLOPs), "balanced_heads" (stage + aux head FLOPs) or blocks per stage,
  # e.g. "3,4,6,3".
  c.model.split = "balanced"
  c.model.head = args.head  # Aux head: "conv" (authors') or "pool".
  c.model.dtype = "bfloat16"  # Computation dtype on TPU/GPU; params and losses stay f32.
  c.model.conv = "auto"  # Conv gradients: auto, xla, explicit or canonical (ilbp.models.conv).

  c.dataset = common.ml_collections.ConfigDict()
  c.dataset.name = "imagenet2012"  # TFDS name; needs the manual download (see README).
  c.dataset.image_size = 224  # Random-resized crop (train) / center crop (eval) side.
  c.dataset.augment = True
  c.dataset.data_dir = common.ml_collections.config_dict.placeholder(str)  # TFDS data dir.

  if args.runlocal:
    c.model.name = "resnet_tiny"
    c.model.dtype = "float32"
    c.dataset.image_size = 32
    c.batch_size = 16
    c.eval_batch_size = 16
    c.total_steps = 4
    c.optimizer.warmup_steps = 0
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.max_eval_batches = 1
  return c
