"""ResNet on CIFAR-10, the paper's main image benchmark.

Command (Cloud TPU VM v3-8 / one GPU host):
  python -m experiments.resnet \
    --config experiments/configs/resnet_cifar10.py:strategy=pairwise,stages=4 --workdir DIR

Model: the authors' wide 4-group ResNet-34-style net (resnet34_cifar), cut into `stages` parts
by measured FLOPs, with the authors' conv auxiliary heads. 64k steps of SGD + momentum at batch
128 (~164 epochs), cosine schedule.
Expected wall time and accuracy: not yet measured (no accelerator so far); compare against the
paper's CIFAR-10 table for the same strategy.
`runlocal=1` shrinks model and run to something that finishes on a laptop CPU.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, **common.COMMON_ARGS, model="resnet34_cifar", head="conv")
  return resnet_config(args, dataset="cifar10", total_steps=64_000)


def resnet_config(args, *, dataset: str, total_steps: int):
  """Shared by the CIFAR-10 and CIFAR-100 configs: only the dataset differs."""
  c = common.base_config(args)
  c.family = "resnet"
  c.batch_size = 128
  c.eval_batch_size = 500
  c.total_steps = total_steps
  c.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 500
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000

  c.model = common.ml_collections.ConfigDict()
  c.model.name = args.model  # resnet20/32/44/56/110 (He et al.), resnet34_cifar (authors').
  c.model.split = "balanced"  # "balanced" (by XLA FLOPs) or blocks per stage, e.g. "4,4,4,4".
  c.model.head = args.head  # Aux head: "conv" (authors': 2 convs + pool + dense) or "pool".
  c.model.dtype = "float32"  # Computation dtype: "float32" or "bfloat16" (params stay f32).

  c.dataset = common.ml_collections.ConfigDict()
  c.dataset.name = dataset  # TFDS name.
  c.dataset.augment = True  # 4-pixel pad + random crop + horizontal flip.
  c.dataset.data_dir = common.ml_collections.config_dict.placeholder(str)  # TFDS data dir.

  if args.runlocal:
    c.model.name = "resnet_tiny"
    c.batch_size = 32
    c.eval_batch_size = 64
    c.total_steps = 20
    c.optimizer.warmup_steps = 0
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.max_eval_batches = 2
  return c
