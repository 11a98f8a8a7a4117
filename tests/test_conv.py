"""Tests for ilbp.models.conv: the explicit weight gradient equals XLA's, and the switch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ilbp import tasks
from ilbp.models import conv, resnet
from ilbp.strategy import strategy

_NHWC = ("NHWC", "HWIO", "NHWC")


def _grads(fn, x, w, dy):
  y, vjp = jax.vjp(fn, x, w)
  return (y, *vjp(dy))


_CASES = [
  (kernel, strides, padding)
  for kernel in (1, 3, 7)
  for strides in (1, 2)
  for padding in ("SAME", "VALID", ((0, 1), (2, 1)))
]


def test_explicit_equals_xla():
  # Every case in one jitted program: one compile for all 18, not one each.
  inputs = []
  for i, (kernel, _, _) in enumerate(_CASES):
    k1, k2 = jax.random.split(jax.random.key(i))
    # Odd sizes: a stride-2 window that does not tile the input exactly is covered too.
    inputs.append(
      (jax.random.normal(k1, (2, 11, 9, 3)), jax.random.normal(k2, (kernel, kernel, 3, 5)))
    )
  ours = conv.conv_general_dilated("explicit")

  @jax.jit
  def both(inputs):
    out = []
    for (_, strides, padding), (x, w) in zip(_CASES, inputs):
      s = (strides, strides)
      ref = lambda x, w, s=s, padding=padding: lax.conv_general_dilated(
        x, w, s, padding, dimension_numbers=_NHWC
      )
      fn = lambda x, w, s=s, padding=padding: ours(x, w, s, padding, dimension_numbers=_NHWC)
      dy = jnp.cos(jnp.arange(np.prod(jax.eval_shape(ref, x, w).shape), dtype=jnp.float32))
      dy = dy.reshape(jax.eval_shape(ref, x, w).shape)
      out.append((_grads(fn, x, w, dy), _grads(ref, x, w, dy)))
    return out

  for case, (got, want) in zip(_CASES, both(inputs)):
    for name, a, b in zip(("output", "input gradient", "weight gradient"), got, want):
      assert a.shape == b.shape, (case, name)
      np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()), err_msg=f"{case}: {name}"
      )


def _uses_explicit(impl: str, kernel: int) -> bool:
  """Whether the conv's gradient goes through the custom VJP (read from the jaxpr)."""
  fn = conv.conv_general_dilated(impl)
  x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((kernel, kernel, 2, 3))
  jaxpr = jax.make_jaxpr(
    lambda x, w: fn(
      x,
      w,
      (1, 1),
      "SAME",
      dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)),
    )
  )(x, w)
  return "custom_vjp_call" in str(jaxpr)


def test_choice():
  assert _uses_explicit("explicit", 3) and _uses_explicit("explicit", 1)
  assert not _uses_explicit("xla", 1) and not _uses_explicit("xla", 3)
  on_cpu = jax.default_backend() == "cpu"
  # auto: the explicit weight gradient only for 1x1 kernels, and only on CPU.
  assert _uses_explicit("auto", 1) == on_cpu
  assert not _uses_explicit("auto", 3)


def test_unsupported_calls_fall_back_to_xla():
  # Kernel dilation is outside the explicit formulation: XLA's convolution runs, same numbers.
  x, w = jnp.arange(2 * 9 * 9 * 2.0).reshape(2, 9, 9, 2) / 100, jnp.ones((3, 3, 2, 4))
  dn = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  got = conv.conv_general_dilated("explicit")(
    x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn
  )
  want = lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn)
  np.testing.assert_array_equal(got, want)


def test_flax_conv_same_parameters_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  layers = {
    impl: nn.Conv(4, (3, 3), strides=(2, 2), conv_general_dilated=conv.conv_general_dilated(impl))
    for impl in ("xla", "explicit")
  }
  params = layers["xla"].init(jax.random.key(1), x)
  assert jax.tree.structure(layers["explicit"].init(jax.random.key(1), x)) == jax.tree.structure(
    params
  )
  grads = {
    impl: jax.grad(lambda p, layer=layer: jnp.sum(layer.apply(p, x) ** 2))(params)
    for impl, layer in layers.items()
  }
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), *grads.values())


def test_bad_impl_is_named():
  with pytest.raises(ValueError, match=r"conv='fast'.*auto, xla, explicit"):
    conv.conv_general_dilated("fast")
  with pytest.raises(ValueError, match="auto, xla, explicit"):
    resnet.make_model("resnet_tiny", num_classes=3, num_stages=2, split=(3, 2), conv="cudnn")


def test_resnet_gradients_do_not_depend_on_the_implementation():
  # Every conv of a ResNet (stem, 3x3 and strided 1x1 projections, conv heads) through the
  # interlocking engine: the explicit weight gradients give the same gradients and statistics.
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = {"label": jnp.array([0, 1, 2, 1])}
  out = {}
  for impl in ("xla", "explicit"):
    model = resnet.make_model(
      "resnet_tiny", num_classes=3, num_stages=2, split=(3, 2), head="conv", conv=impl
    )
    params, state = model.init(jax.random.key(1), x)
    out[impl] = jax.jit(
      lambda p, s, x, model=model: model.gradients(
        p, s, x, labels, loss_fn=tasks.Classification().loss, strategy=strategy("pairwise")
      )[:2]
    )(params, state, x)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out["xla"], out["explicit"]
  )
