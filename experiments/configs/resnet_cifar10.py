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
  return common.cifar_config(args, dataset="cifar10", total_steps=64_000)
