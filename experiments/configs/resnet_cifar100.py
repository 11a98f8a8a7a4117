"""ResNet on CIFAR-100.

Command:
  python -m experiments.resnet \
    --config experiments/configs/resnet_cifar100.py:strategy=pairwise,stages=4 --workdir DIR

Same model and schedule as resnet_cifar10.py (authors' resnet34_cifar, 64k steps, batch 128).
Expected wall time and accuracy: not yet measured.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, **common.COMMON_ARGS, model="resnet34_cifar", head="conv")
  return common.cifar_config(args, dataset="cifar100", total_steps=64_000)
