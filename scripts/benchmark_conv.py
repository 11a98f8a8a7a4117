"""Per-layer cost of a ResNet's convolution gradients: XLA's weight gradient against ours.

Usage (from the repository root):

  .venv/bin/python -m scripts.benchmark_conv                          # resnet34_cifar, batch 32
  .venv/bin/python -m scripts.benchmark_conv --config=experiments/configs/resnet_imagenet.py \
      --config.model.name=resnet50 --config.batch_size=8

The ResNet, its stages and heads, the input size and the batch come from --config (an
experiment config and `--config.FIELD=VALUE` overrides, as the experiment binaries take them;
default `experiments/configs/benchmark.py:model=resnet34_cifar,head=conv,stages=4,batch=32`).
Every distinct convolution of the model (read from the jaxpr of its training-mode forward, all
stages and heads) is timed on random inputs of its own shape, jitted, median over --repeats:

  fwd ms       the forward convolution (XLA's; both implementations share it).
  dx ms        the input gradient (XLA's transposed convolution; both share it).
  dW xla ms    the weight gradient as XLA computes it (`jax.vjp` of `lax.conv_general_dilated`).
  dW expl ms   the weight gradient as `ilbp.models.conv.weight_gradient` computes it: one
               matrix product per kernel tap, activations in their own layout.
  auto         which one `conv="auto"` uses for this shape on this backend.
  n            how many layers of the model have this shape.

The totals weight each shape by n: the time one training step spends in weight gradients under
each choice (counting only these ops, each timed alone). Run this on a new machine to check the
rule `ilbp.models.conv.use_explicit` encodes; where "explicit" wins for more shapes, train with
--config.model.conv=explicit.
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable

import jax
import jax.extend
import jax.numpy as jnp
from absl import app, flags
from jax import lax
from ml_collections import config_flags

from ilbp import families, timing
from ilbp.models import conv as conv_lib
from ilbp.models import resnet

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  "experiments/configs/benchmark.py:model=resnet34_cifar,head=conv,stages=4,batch=32",
  "A ResNet experiment config: model, stages, heads, input size, batch.",
  lock_config=True,
)
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed calls per op (median).")


def conv_layers(model, input_shape: tuple[int, ...], batch: int) -> collections.Counter:
  """(input shape, kernel shape, strides, padding) -> number of such convolutions."""
  params, state = model.init(jax.random.key(0), jnp.zeros((1, *input_shape)))
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: model.apply(params, state, x, train=True))(x)
  found = collections.Counter()

  def visit(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        p = eqn.params
        found[(lhs, rhs, tuple(p["window_strides"]), tuple(map(tuple, p["padding"])))] += 1
    for sub in jax.extend.core.subjaxprs(jp):
      visit(sub)

  visit(jaxpr.jaxpr)
  return found


def median_ms(fn: Callable, *args) -> float:
  """Median ms of jitted `fn(*args)` over --repeats calls (`ilbp.timing`)."""
  fn = jax.jit(fn)
  return timing.median_ms(lambda: fn(*args), _REPEATS.value)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; use --config.FIELD=VALUE.")
  config = copy.deepcopy(_CONFIG.value)
  if config.family != "resnet":
    raise app.UsageError(f"--config is a {config.family!r} config; this times ResNet convs.")
  config.model.conv = "xla"  # XLA's own convolutions, which the jaxpr below shows as such.
  built = families.build_synthetic(config)
  model, shape, batch = built.model, built.input_spec.shape[1:], config.batch_size
  size = "x".join(map(str, shape))
  layers = conv_layers(model, shape, batch)
  dn = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  print(
    f"jax {jax.__version__} | backend {jax.default_backend()} | {resnet.describe_split(model)} | "
    f"batch {batch}, {size} inputs | {len(layers)} distinct convolutions, median of "
    f"{_REPEATS.value}"
  )
  header = (
    f"{'input':>16} {'kernel':>14} {'s':>2} {'n':>3} {'fwd ms':>8} {'dx ms':>8} "
    f"{'dW xla ms':>10} {'dW expl ms':>11} {'auto':>9}"
  )
  print(header + "\n" + "-" * len(header))
  totals = collections.Counter()
  for (x_shape, w_shape, strides, pads), n in sorted(layers.items(), key=lambda kv: -kv[0][0][1]):
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(k1, x_shape), 0.1 * jax.random.normal(k2, w_shape)

    def forward(x, w, strides=strides, pads=pads):
      return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dn)

    dy = jax.random.normal(k3, jax.eval_shape(forward, x, w).shape)
    fwd = median_ms(forward, x, w)
    dx = median_ms(lambda x, w, dy: jax.vjp(lambda x: forward(x, w), x)[1](dy)[0], x, w, dy)
    dw_xla = median_ms(lambda x, w, dy: jax.vjp(lambda w: forward(x, w), w)[1](dy)[0], x, w, dy)

    def explicit(x, dy, kernel=w_shape[:2], strides=strides, pads=pads):
      return conv_lib.weight_gradient(x, dy, kernel, strides, pads)

    dw_ours = median_ms(explicit, x, dy)
    auto = jax.default_backend() == "cpu" and conv_lib.use_explicit(x_shape, w_shape, strides)
    totals["xla"] += n * dw_xla
    totals["explicit"] += n * dw_ours
    totals["auto"] += n * (dw_ours if auto else dw_xla)
    totals["fwd"] += n * fwd
    print(
      f"{'x'.join(map(str, x_shape)):>16} {'x'.join(map(str, w_shape)):>14} {strides[0]:>2} "
      f"{n:>3} {fwd:8.2f} {dx:8.2f} {dw_xla:10.2f} {dw_ours:11.2f} "
      f"{'explicit' if auto else 'xla':>9}"
    )
  print(
    f"\nper step, weight gradients of every layer: xla {totals['xla']:.1f} ms, explicit "
    f"{totals['explicit']:.1f} ms, auto {totals['auto']:.1f} ms (forward convolutions "
    f"{totals['fwd']:.1f} ms)"
  )


if __name__ == "__main__":
  app.run(main)
