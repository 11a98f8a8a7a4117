"""ResNet on CIFAR-100.

Command:
  python -m experiments.resnet \
    --config experiments/configs/resnet_cifar100.py:strategy=pairwise,stages=4 --workdir DIR

Same model and recipes as resnet_cifar10.py: by default the authors' recipe (resnet34_cifar in
4 stages cut at its groups, conv heads, SGD lr 0.1 / momentum 0.9 / weight decay 2e-4, batch
128, 10% of train held out for validation, 200 epochs = 70,313 steps of the 45,000-image split,
lr x0.1 at epochs 91/136/182 = steps 31,993/47,813/63,985); `:recipe=cosine` for this repo's
earlier 64k-step cosine recipe.
Expected wall time and accuracy: not yet measured.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(
    arg, **common.COMMON_ARGS, model="resnet34_cifar", head="conv", recipe="authors"
  )
  return common.cifar_config(args, dataset="cifar100")
