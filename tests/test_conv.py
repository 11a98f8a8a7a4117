"""Tests for ilbp.models.conv: gradients equal XLA's, keep the fast form nested, the switch."""

import re

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


def test_custom_gradients_equal_xla():
  # Every case and both custom weight gradients in one jitted program: one compile, not 36.
  inputs = []
  for i, (kernel, _, _) in enumerate(_CASES):
    k1, k2 = jax.random.split(jax.random.key(i))
    # Odd sizes: a stride-2 window that does not tile the input exactly is covered too.
    inputs.append(
      (jax.random.normal(k1, (2, 11, 9, 3)), jax.random.normal(k2, (kernel, kernel, 3, 5)))
    )
  impls = ("explicit", "canonical")

  @jax.jit
  def run(inputs):
    out = []
    for (_, strides, padding), (x, w) in zip(_CASES, inputs):
      s = (strides, strides)
      ref = lambda x, w, s=s, padding=padding: lax.conv_general_dilated(
        x, w, s, padding, dimension_numbers=_NHWC
      )
      shape = jax.eval_shape(ref, x, w).shape
      dy = jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32)).reshape(shape)
      got = [
        _grads(
          lambda x, w, s=s, padding=padding, impl=impl: conv.conv_general_dilated(impl)(
            x, w, s, padding, dimension_numbers=_NHWC
          ),
          x,
          w,
          dy,
        )
        for impl in impls
      ]
      out.append((got, _grads(ref, x, w, dy)))
    return out

  for case, (got, want) in zip(_CASES, run(inputs)):
    for impl, ours in zip(impls, got):
      for name, a, b in zip(("output", "input gradient", "weight gradient"), ours, want):
        assert a.shape == b.shape, (impl, case, name)
        np.testing.assert_allclose(
          a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()), err_msg=f"{impl} {case}: {name}"
        )


def _switched_conv_labels(impl: str) -> list[str]:
  """The dimension labels of every convolution XLA compiles for a conv's gradients in a switch."""
  fn = conv.conv_general_dilated(impl)
  dn = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

  def loss(x, w):
    y = fn(x, w, (2, 2), "SAME", dimension_numbers=dn)
    return jnp.sum(jnp.tanh(fn(y, w[:, :, :1].repeat(4, 2), (1, 1), "SAME", dimension_numbers=dn)))

  grads = jax.grad(loss, argnums=(0, 1))
  x, w = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 4, 4))
  hlo = (
    jax.jit(lambda i, x, w: lax.switch(i, [lambda x, w: (x, w), grads], x, w))
    .lower(1, x, w)
    .compile()
    .as_text()
  )
  return re.findall(r"= \S+ convolution\(.*?dim_labels=(\S+?),", hlo)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's convolution forms")
def test_gradients_in_a_switch_keep_the_fast_form():
  # XLA:CPU runs a convolution fast only in the NHWC/HWIO form, and rewrites autodiff's gradient
  # convolutions into it only at a program's top level: inside a lax.switch (the SPMD executor's
  # stages) XLA's own gradients keep other forms. Ours are written in that form.
  fast = "b01f_01io->b01f"
  ours = _switched_conv_labels("auto")
  assert len(ours) == 6 and set(ours) == {fast}, ours
  assert set(_switched_conv_labels("xla")) != {fast}


def _uses_custom(impl: str, kernel: int) -> bool:
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
  for impl in ("explicit", "canonical"):
    assert _uses_custom(impl, 3) and _uses_custom(impl, 1)
  assert not _uses_custom("xla", 1) and not _uses_custom("xla", 3)
  # auto: the custom gradients on CPU only (XLA's convolution for cuDNN and the TPU compiler).
  on_cpu = jax.default_backend() == "cpu"
  assert _uses_custom("auto", 1) == on_cpu and _uses_custom("auto", 3) == on_cpu
  assert conv.use_explicit((2, 8, 8, 4), (1, 1, 4, 8), (2, 2))
  assert not conv.use_explicit((2, 8, 8, 4), (3, 3, 4, 8), (1, 1))


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
  with pytest.raises(ValueError, match=r"conv='fast'.*auto, xla, explicit, canonical"):
    conv.conv_general_dilated("fast")
  with pytest.raises(ValueError, match="auto, xla, explicit"):
    resnet.make_model("resnet_tiny", num_classes=3, num_stages=2, split=(3, 2), conv="cudnn")


def test_resnet_gradients_do_not_depend_on_the_implementation():
  # Every conv of a ResNet (stem, 3x3 and strided 1x1 projections, conv heads) through the
  # interlocking engine: the custom gradients give the same gradients and statistics.
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = {"label": jnp.array([0, 1, 2, 1])}
  out = {}
  for impl in ("xla", "explicit", "canonical"):
    model = resnet.make_model(
      "resnet_tiny", num_classes=3, num_stages=2, split=(3, 2), head="conv", conv=impl
    )
    params, state = model.init(jax.random.key(1), x)
    out[impl] = jax.jit(
      lambda p, s, x, model=model: model.gradients(
        p, s, x, labels, loss_fn=tasks.Classification().loss, strategy=strategy("pairwise")
      )[:2]
    )(params, state, x)
  for impl in ("explicit", "canonical"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out["xla"], out[impl]
    )
