"""ResNet on CIFAR-10, the paper's main image benchmark, with the authors' recipe by default.

Command (Cloud TPU VM v3-8 / one GPU host):
  python -m experiments.resnet \
    --config experiments/configs/resnet_cifar10.py:strategy=pairwise,stages=4 --workdir DIR

Recipe "authors" (default): the authors' CIFAR recipe (source: their released code,
github.com/oscarkey/interlocking-backprop, examples/train_resnet.py): their wide ResNet
(resnet34_cifar: widths 64/128/256/512, basic blocks 3/4/6/3) with conv128-bn-conv64-bn-pool-fc
auxiliary heads (head="conv"), cut into 4 stages at the group boundaries (split="groups"; other
`stages` fall back to the FLOP-balanced split); SGD lr 0.1, momentum 0.9, weight decay 2e-4,
batch 128; 10% of the training set held out for validation; 200 epochs with the learning rate
x0.1 at epochs 91, 136 and 182. In steps of the 45,000-image train split at batch 128
(`common.epochs_to_steps`: the first step starting at or after the epoch): 70,313 steps,
decays at steps 31,993 / 47,813 / 63,985. Validation (val/...) and test (eval/...) accuracy of
every head every 5 epochs (1,758 steps).
Where this differs from the released script itself (commit 1a63aeb): its loop runs 100 epochs
and never calls its MultiStepLR's step, and it puts one block per GPU "for the demo"; it holds
out a random 10% (torch random_split, seed 0) where this holds out the last 10% of TFDS's order
(train[90%:]); PyTorch's weight decay covers every parameter, ilbp's only kernels (ndim > 1).

Recipe "cosine" (`:recipe=cosine`): this repo's earlier recipe, kept for comparison: all 50,000
training images, 64k steps (~164 epochs) with 500 warm-up steps and cosine decay, weight decay
5e-4, FLOP-balanced stages, no validation split.

Expected wall time and accuracy: not yet measured (no accelerator so far); compare against the
paper's CIFAR-10 table for the same strategy.
`runlocal=1` shrinks model and run to something that finishes on a laptop CPU.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(
    arg, **common.COMMON_ARGS, model="resnet34_cifar", head="conv", recipe="authors"
  )
  return common.cifar_config(args, dataset="cifar10")
