"""ResNets for CIFAR and ImageNet, cut depthwise into stages for interlocking backpropagation.

A ResNet here is a flat list of residual blocks. `make_model` cuts that list into K contiguous
stages: the stem joins the first stage, global average pooling and the dense classifier join
the last, so stage K's output is the task logits. Every stage but the last gets an auxiliary
head, either the authors' small conv head or a plain pool + dense head. Where a balanced cut
falls is decided by `ilbp.models.split` from the FLOPs XLA counts for each block.

Families (`NAMES` lists every supported name):

  resnet20/32/44/56/110  He et al. (2016) CIFAR nets: 3×3 stem with 16 channels, three groups of
                         n = (depth − 2) / 6 basic blocks at 16/32/64 channels.
  resnet34_cifar         the wide 4-group net the paper's authors trained on CIFAR: 3×3 stem with
                         64 channels, no max-pool, basic blocks 3/4/6/3 at 64/128/256/512.
  resnet50/101/152       ImageNet bottleneck nets (7×7 stride-2 stem + 3×3 stride-2 max-pool),
                         stride on the 3×3 conv as in torchvision ("ResNet v1.5").
  resnet_tiny            test-only: 5 basic blocks of ≤ 16 channels, cuttable into 1..5 stages.

Every block uses a projection shortcut (1×1 conv + BatchNorm, He et al.'s option B) where its
output shape differs from its input, so ResNet-50 matches torchvision's 25,557,032 parameters.
For the CIFAR nets this is not the zero-padding option A of the original paper: resnet20 has
272,474 parameters here (option A would give 269,722).

Convolutions and dense layers compute in `dtype` (bf16 on accelerators) and keep float32
parameters; every set of logits is returned as float32 so losses are computed in full precision.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ilbp.models import conv as conv_lib
from ilbp.models import split as split_lib
from ilbp.staged import StagedModel

# torchvision's BatchNorm defaults (PyTorch momentum 0.1 is flax momentum 0.9).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# He et al.'s initialisation (torchvision's kaiming_normal_, mode="fan_out"): keeps activation
# variance roughly constant through deep ReLU stacks.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

HEADS = ("conv", "pool")
SPLITS = ("balanced", "balanced_heads", "groups")


@dataclasses.dataclass(frozen=True)
class Arch:
  """One ResNet architecture.

  Attributes:
    block: "basic" (two 3×3 convs) or "bottleneck" (1×1, 3×3, 1×1 with 4× expansion).
    group_sizes: residual blocks in each group; a group's first block downsamples by 2,
      except in the first group.
    widths: channels of each group (bottleneck blocks output 4× this).
    stem: "cifar" (3×3 stride-1 conv) or "imagenet" (7×7 stride-2 conv + 3×3 stride-2 max-pool).
    stem_width: channels of the stem convolution.
  """

  block: str
  group_sizes: tuple[int, ...]
  widths: tuple[int, ...]
  stem: str
  stem_width: int


def _cifar(depth: int) -> Arch:
  n = (depth - 2) // 6
  return Arch("basic", (n, n, n), (16, 32, 64), "cifar", 16)


ARCHS: dict[str, Arch] = {
  **{f"resnet{d}": _cifar(d) for d in (20, 32, 44, 56, 110)},
  "resnet34_cifar": Arch("basic", (3, 4, 6, 3), (64, 128, 256, 512), "cifar", 64),
  "resnet50": Arch("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), "imagenet", 64),
  "resnet101": Arch("bottleneck", (3, 4, 23, 3), (64, 128, 256, 512), "imagenet", 64),
  "resnet152": Arch("bottleneck", (3, 8, 36, 3), (64, 128, 256, 512), "imagenet", 64),
  # Test-only: 5 blocks (two in the first group) so that tests can cut it into 1..5 stages.
  "resnet_tiny": Arch("basic", (2, 1, 1, 1), (4, 8, 8, 16), "cifar", 4),
}
NAMES = tuple(ARCHS)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One residual block of the flat block list.

  Attributes:
    index: position in the whole network's block list (names its parameters "block<index>",
      so a block keeps its name whichever stage it lands in).
    kind: "basic" or "bottleneck".
    features: width of the block's convolutions (bottleneck output is 4× this).
    strides: stride of the block's first 3×3 conv and of its projection shortcut.
  """

  index: int
  kind: str
  features: int
  strides: int


def block_specs(arch: Arch) -> tuple[BlockSpec, ...]:
  """The flat list of residual blocks of an architecture.

  Args:
    arch: the architecture.

  Returns:
    One `BlockSpec` per residual block, input to output.
  """
  specs = []
  for group, (size, width) in enumerate(zip(arch.group_sizes, arch.widths)):
    for i in range(size):
      strides = 2 if group > 0 and i == 0 else 1
      specs.append(BlockSpec(len(specs), arch.block, width, strides))
  return tuple(specs)


def _conv(features: int, kernel: int, strides: int, dtype: Any, name: str, impl: str) -> nn.Conv:
  # Symmetric padding as in PyTorch: "SAME" would pad (0, 1) at stride 2 and shift the grid.
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(strides, strides),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,  # every conv is followed by BatchNorm, whose bias makes a conv bias redundant
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=_CONV_INIT,
    conv_general_dilated=conv_lib.conv_general_dilated(impl),
    name=name,
  )


def _bn(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=_BN_MOMENTUM,
    epsilon=_BN_EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


class ResidualBlock(nn.Module):
  """A basic or bottleneck residual block (post-activation, He et al. 2016)."""

  spec: BlockSpec
  dtype: Any = jnp.float32
  conv: str = "auto"  # convolution implementation (ilbp.models.conv.IMPLS)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    f, s, dt, c = self.spec.features, self.spec.strides, self.dtype, self.conv
    if self.spec.kind == "basic":
      y = nn.relu(_bn(train, dt, "bn1")(_conv(f, 3, s, dt, "conv1", c)(x)))
      y = _bn(train, dt, "bn2")(_conv(f, 3, 1, dt, "conv2", c)(y))
      out_features = f
    else:
      y = nn.relu(_bn(train, dt, "bn1")(_conv(f, 1, 1, dt, "conv1", c)(x)))
      y = nn.relu(_bn(train, dt, "bn2")(_conv(f, 3, s, dt, "conv2", c)(y)))
      out_features = 4 * f
      y = _bn(train, dt, "bn3")(_conv(out_features, 1, 1, dt, "conv3", c)(y))
    residual = x
    if s != 1 or x.shape[-1] != out_features:
      residual = _bn(train, dt, "proj_bn")(_conv(out_features, 1, s, dt, "proj_conv", c)(x))
    return nn.relu(y + residual)


class Stem(nn.Module):
  """The layers before the first residual block."""

  kind: str
  features: int
  dtype: Any = jnp.float32
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x, self.dtype)
    size, strides = (3, 1) if self.kind == "cifar" else (7, 2)
    x = _conv(self.features, size, strides, self.dtype, "conv", self.conv)(x)
    x = nn.relu(_bn(train, self.dtype, "bn")(x))
    if self.kind == "cifar":
      return x
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Classifier(nn.Module):
  """Global average pool + dense layer; float32 logits."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    # Pool in float32: a bf16 mean over many positions loses precision for nothing.
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="dense")(x)
    return x.astype(jnp.float32)


class ResNetStage(nn.Module):
  """A contiguous run of residual blocks, with the stem if first and the classifier if last.

  Attributes:
    blocks: the stage's residual blocks.
    stem: the stem's kind ("cifar" or "imagenet") if this is the first stage, else None.
    stem_width: channels of the stem convolution (first stage only).
    num_classes: number of classes if this is the last stage (its output is then the logits),
      else None (its output is the last block's activations, in `dtype`).
    dtype: computation dtype.
    conv: convolution implementation (`ilbp.models.conv.IMPLS`).
  """

  blocks: tuple[BlockSpec, ...]
  stem: str | None = None
  stem_width: int = 0
  num_classes: int | None = None
  dtype: Any = jnp.float32
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = jnp.asarray(x, self.dtype)
    if self.stem is not None:
      x = Stem(self.stem, self.stem_width, self.dtype, self.conv, name="stem")(x, train)
    for spec in self.blocks:
      x = ResidualBlock(spec, self.dtype, self.conv, name=f"block{spec.index}")(x, train)
    if self.num_classes is not None:
      x = Classifier(self.num_classes, self.dtype, name="classifier")(x)
    return x


class ConvHead(nn.Module):
  """The authors' auxiliary head: two 3×3 convs (128, 64) with BN + ReLU, then pool + dense."""

  num_classes: int
  dtype: Any = jnp.float32
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dt, c = self.dtype, self.conv
    x = nn.relu(_bn(train, dt, "bn1")(_conv(128, 3, 1, dt, "conv1", c)(x)))
    x = nn.relu(_bn(train, dt, "bn2")(_conv(64, 3, 1, dt, "conv2", c)(x)))
    return Classifier(self.num_classes, self.dtype, name="classifier")(x)


class PoolHead(nn.Module):
  """The lightest auxiliary head: global average pool + dense."""

  num_classes: int
  dtype: Any = jnp.float32
  conv: str = "auto"  # unused (no convolution); keeps the head constructors uniform

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return Classifier(self.num_classes, self.dtype, name="classifier")(x, train)


_HEAD_MODULES = {"conv": ConvHead, "pool": PoolHead}


@functools.cache
def _block_costs(
  name: str, input_shape: tuple[int, ...]
) -> tuple[float, tuple[float, ...], tuple[tuple[int, ...], ...]]:
  """(stem, per-block) FLOPs of a batch-1 inference pass from XLA, and each block's output
  shape. Every block is counted as index 0, so that blocks of one group after the first are
  equal modules and `split.chain_flops` compiles them once."""
  arch = ARCHS[name]
  chain = [Stem(arch.stem, arch.stem_width)]
  chain += [ResidualBlock(dataclasses.replace(spec, index=0)) for spec in block_specs(arch)]
  flops, shapes = split_lib.chain_flops(chain, (1, *input_shape))
  return flops[0], flops[1:], shapes[1:]


@functools.cache
def _measured_costs(
  name: str, input_shape: tuple[int, ...], num_classes: int
) -> tuple[float, tuple[float, ...], float]:
  """(stem, per-block, classifier) FLOPs of a batch-1 inference pass, from XLA.

  Measured in float32: FLOPs are a property of the architecture, and float32 keeps the count free
  of the converts a bf16 program adds on backends without native bf16.
  """
  stem_flops, block_flops, shapes = _block_costs(name, input_shape)
  classifier_flops, _ = split_lib.module_flops(Classifier(num_classes), shapes[-1])
  return stem_flops, block_flops, classifier_flops


@functools.cache
def _head_costs(
  name: str, input_shape: tuple[int, ...], num_classes: int, head: str
) -> tuple[float, ...]:
  """FLOPs of one batch-1 inference call of the auxiliary head on each block's output: entry i
  is what a stage ending after block i pays for its head (the last entry is never used, since
  the last stage has none). One compile per distinct output shape."""
  shapes = _block_costs(name, input_shape)[2]
  head_module = _HEAD_MODULES[head](num_classes)
  per_shape = {s: split_lib.module_flops(head_module, s)[0] for s in set(shapes)}
  return tuple(per_shape[s] for s in shapes)


def _check_args(name, num_classes, num_stages, split, head, input_shape) -> tuple[int, ...] | None:
  """Validates every argument of `make_model`; returns blocks per stage, or None if balanced."""
  if name not in ARCHS:
    raise ValueError(f"Unknown ResNet {name!r}; valid names: {', '.join(NAMES)}.")
  if head not in HEADS:
    raise ValueError(f"Unknown head {head!r}; valid heads: {', '.join(HEADS)}.")
  if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
  if len(tuple(input_shape)) != 3:
    raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}.")
  n = len(block_specs(ARCHS[name]))
  if (
    not isinstance(num_stages, numbers.Integral)
    or isinstance(num_stages, bool)
    or not 1 <= num_stages <= n
  ):
    raise ValueError(
      f"num_stages must be an integer from 1 to {n} ({name} has {n} residual blocks), "
      f"got {num_stages!r}."
    )
  if isinstance(split, str):
    if split not in SPLITS:
      raise ValueError(
        f"Unknown split {split!r}; pass {' or '.join(map(repr, SPLITS))} or a sequence of "
        f"blocks per stage."
      )
    if split in ("balanced", "balanced_heads"):
      return None
    groups = ARCHS[name].group_sizes  # "groups": one group of blocks per stage (the authors').
    if num_stages != len(groups):
      raise ValueError(
        f"split='groups' puts one group of blocks in each stage and {name} has {len(groups)} "
        f"groups ({'+'.join(map(str, groups))} blocks), so it needs num_stages={len(groups)}, "
        f"got {num_stages}; use split='balanced' or blocks per stage for other stage counts."
      )
    return tuple(groups)
  sizes = tuple(split)
  if any(not isinstance(b, numbers.Integral) or isinstance(b, bool) or b < 1 for b in sizes):
    raise ValueError(f"split must give every stage at least one block (an integer), got {split!r}.")
  if len(sizes) != num_stages:
    raise ValueError(f"split {split!r} has {len(sizes)} stages, but num_stages is {num_stages}.")
  if sum(sizes) != n:
    raise ValueError(f"split {split!r} covers {sum(sizes)} blocks, but {name} has {n} blocks.")
  return tuple(int(b) for b in sizes)


def make_model(
  name: str,
  *,
  num_classes: int,
  num_stages: int,
  split: str | Sequence[int] = "balanced",
  head: str = "conv",
  input_shape: Sequence[int] = (32, 32, 3),
  dtype: Any = jnp.float32,
  conv: str = "auto",
) -> StagedModel:
  """Builds a ResNet cut into `num_stages` stages, with an auxiliary head on all but the last.

  Args:
    name: architecture; one of `NAMES`.
    num_classes: number of output classes (task head and auxiliary heads).
    num_stages: number of stages K, from 1 to the number of residual blocks.
    split: "balanced" (contiguous stages minimising the costliest stage's FLOPs, counted by
      XLA on a batch-1 input of `input_shape`; compiles each distinct block once),
      "balanced_heads" (the same, each stage but the last also counting its auxiliary head on
      its output: conv heads on high-resolution outputs cost more than the blocks, so this
      cuts for a pipeline's throughput; it moves the heads, which changes the experiment), "groups"
      (one group of blocks per stage, as the authors cut their nets; K must equal the number
      of groups) or the number of blocks in each stage, e.g. (3, 3, 3) for resnet20 in 3 stages.
    head: auxiliary head: "conv" (the authors' two-conv head) or "pool" (pool + dense).
    input_shape: (height, width, channels) of one image; used only by the balanced split.
    dtype: computation dtype; parameters stay float32 and logits are returned as float32.
    conv: how convolutions compute their weight gradient (`ilbp.models.conv`): "auto" (the
      explicit formulation on CPU where it measured faster, XLA's own elsewhere), "xla" or
      "explicit". Parameters and results are the same either way.

  Returns:
    A `StagedModel` whose `info` holds "name", "num_blocks", "blocks_per_stage", "split"
    ("balanced", "balanced_heads", "groups" or "explicit"), "head", "block_flops" (per block,
    balanced splits only, else None), "stem_flops" and "classifier_flops" (balanced only),
    "stage_flops" (per stage, stem and classifier included, heads not; balanced only) and
    "head_flops" (per stage, its head's FLOPs, 0 for the last; balanced_heads only).

  Raises:
    ValueError: for an unknown name, head or split, or a split that does not fit the network;
      raised before anything is compiled.
  """
  explicit = _check_args(name, num_classes, num_stages, split, head, input_shape)
  conv_lib.check_impl(conv)
  arch = ARCHS[name]
  specs = block_specs(arch)
  info: dict[str, Any] = {
    "name": name,
    "num_blocks": len(specs),
    "split": split if isinstance(split, str) else "explicit",
    "head": head,
    "block_flops": None,
    "stem_flops": None,
    "classifier_flops": None,
    "stage_flops": None,
    "head_flops": None,
  }
  if explicit is not None:
    sizes = explicit
  else:
    shape = tuple(int(d) for d in input_shape)
    stem_flops, block_flops, classifier_flops = _measured_costs(name, shape, int(num_classes))
    costs = list(block_flops)
    costs[0] += stem_flops
    costs[-1] += classifier_flops
    ends = _head_costs(name, shape, int(num_classes), head) if split == "balanced_heads" else None
    sizes = split_lib.balanced_split(costs, num_stages, ends)
    bounds = [sum(sizes[:k]) for k in range(num_stages + 1)]
    if ends is not None:
      info["head_flops"] = (*(ends[b - 1] for b in bounds[1:-1]), 0.0)
    info.update(
      block_flops=list(block_flops),
      stem_flops=stem_flops,
      classifier_flops=classifier_flops,
      stage_flops=tuple(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)),
    )
  info["blocks_per_stage"] = sizes

  stages, first = [], 0
  for k, size in enumerate(sizes):
    is_first, is_last = k == 0, k == num_stages - 1
    stages.append(
      ResNetStage(
        blocks=specs[first : first + size],
        stem=arch.stem if is_first else None,
        stem_width=arch.stem_width if is_first else 0,
        num_classes=num_classes if is_last else None,
        dtype=dtype,
        conv=conv,
      )
    )
    first += size
  heads = [_HEAD_MODULES[head](num_classes, dtype, conv) for _ in range(num_stages - 1)]
  return StagedModel(stages, heads, info)


def describe_split(model: StagedModel) -> str:
  """A one-line summary of how a ResNet was cut, for logs.

  Args:
    model: a model built by `make_model`.

  Returns:
    e.g. "resnet20: 3 stages, blocks 3+3+3 of 9 (balanced), stage MFLOPs 28.5/24.4/22.4
    (max/mean 1.14), conv heads".
  """
  info = model.info
  sizes = info["blocks_per_stage"]
  text = (
    f"{info['name']}: {len(sizes)} stage{'s' if len(sizes) > 1 else ''}, blocks "
    f"{'+'.join(map(str, sizes))} of {info['num_blocks']} ({info['split']})"
  )
  flops = info.get("stage_flops")
  if flops:
    what = "stage"
    if info.get("head_flops"):
      flops = [f + h for f, h in zip(flops, info["head_flops"], strict=True)]
      what = "stage+head"
    mean = sum(flops) / len(flops)
    text += f", {what} MFLOPs {'/'.join(f'{f / 1e6:.3g}' for f in flops)}"
    text += f" (max/mean {max(flops) / mean:.2f})"
  return text + f", {info['head']} heads"
