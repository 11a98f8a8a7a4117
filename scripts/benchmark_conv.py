"""Per-layer cost of a ResNet's convolution gradients: XLA's weight gradient against ours.

Usage (from the repository root):

  .venv/bin/python -m scripts.benchmark_conv                          # resnet34_cifar, batch 32
  .venv/bin/python -m scripts.benchmark_conv --resnet=resnet50 --image_size=224 --batch=8

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
import statistics
import time
from collections.abc import Callable

import jax
import jax.extend
import jax.numpy as jnp
from absl import app, flags
from jax import lax

from ilbp.models import conv as conv_lib
from ilbp.models import resnet

_RESNET = flags.DEFINE_string("resnet", "resnet34_cifar", "ResNet name (resnet.NAMES).")
_HEAD = flags.DEFINE_enum("head", "conv", list(resnet.HEADS), "Auxiliary head.")
_STAGES = flags.DEFINE_integer("stages", 4, "Number of stages K (decides where heads sit).")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Input height and width.")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed calls per op (median).")


def conv_layers(model, size: int, batch: int) -> collections.Counter:
  """(input shape, kernel shape, strides, padding) -> number of such convolutions."""
  params, state = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
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
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main(argv: list[str]) -> None:
  del argv
  size, batch = _IMAGE_SIZE.value, _BATCH.value
  model = resnet.make_model(
    _RESNET.value,
    num_classes=10,
    num_stages=_STAGES.value,
    head=_HEAD.value,
    input_shape=(size, size, 3),
    conv="xla",
  )
  layers = conv_layers(model, size, batch)
  dn = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  print(
    f"jax {jax.__version__} | backend {jax.default_backend()} | {resnet.describe_split(model)} | "
    f"batch {batch}, {size}x{size} inputs | {len(layers)} distinct convolutions, median of "
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
