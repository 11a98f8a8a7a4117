"""ResNets on CIFAR-10/100, ImageNet and the offline digits set, any interlocking strategy.

  python -m experiments.resnet \
    --config experiments/configs/resnet_cifar10.py:strategy=pairwise,stages=4 --workdir DIR
"""

from absl import app

from experiments import launch

if __name__ == "__main__":
  app.run(launch.main_for("resnet"), flags_parser=launch.parse_flags)
