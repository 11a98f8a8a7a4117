"""Convolutions whose weight gradient XLA:CPU computes fast.

XLA's own convolution (`lax.conv_general_dilated`) is what cuDNN and the TPU compiler are built
for, and on XLA:CPU its forward pass and input gradient are fast for every shape measured. Its
weight gradient (the backward-filter convolution) is not always: XLA:CPU lowers it as a
convolution over batch-minor transposes of the activations, which for a 1×1 kernel costs 2.5-5×
a plain matrix product (`scripts/benchmark_conv.py` prints the comparison per layer; the numbers
below are from a 2-core AMD EPYC with AVX-512, jax 0.10.2, batch 32 unless noted, ms):

  1×1, 16×16, 256→64 (ResNet-50 bottleneck)   XLA 12.4   explicit 4.6
  1×1, 56×56, 64→256, batch 8                  XLA 66.2   explicit 13.0
  1×1 stride 2, 16×16, 128→256 (projection)    XLA  6.0   explicit 1.8
  3×3, 32×32, 64→64                            XLA 27.9   explicit 105.7
  3×3, 8×8, 256→256                            XLA 28.1   explicit 31.5
  7×7 stride 2, 224×224, 3→64, batch 8         XLA 31.2   explicit 80.0

`explicit` computes the weight gradient as matrix products over the activations in their own
layout: for each kernel tap (i, j), dW[i, j] = Σ_{b,h,w} x[b, s·h + i, s·w + j, :]ᵀ ·
dy[b, h, w, :], one `dot_general` contracting batch and space. The forward pass and the input
gradient stay XLA's own convolutions, so only the weight gradient changes, and it equals XLA's
to float rounding (tests/test_conv.py).

`conv_general_dilated(impl)` returns a drop-in for `lax.conv_general_dilated`, for
`flax.linen.Conv(conv_general_dilated=...)`; parameters and their layout do not change, so
checkpoints do not depend on the choice.

  impl="auto"      the explicit weight gradient on the CPU backend where it measured faster
                   (`use_explicit`: 1×1 kernels), XLA's convolution everywhere else, and always
                   on GPU and TPU (cuDNN, the TPU compiler). The default.
  impl="xla"       always XLA's convolution.
  impl="explicit"  the explicit weight gradient wherever it applies (2-D, NHWC/HWIO, no
                   dilation, one feature group); XLA's convolution elsewhere. For CPUs where
                   `scripts/benchmark_conv.py` finds it faster for more shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "explicit")

# flax.linen.Conv's dimension numbers for 2-D NHWC inputs and HWIO kernels.
_NHWC = lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def check_impl(impl: str, what: str = "conv") -> str:
  """Returns `impl` if it names a convolution implementation, else raises a clear error.

  Args:
    impl: the value to check.
    what: how the error names the setting (e.g. "config.model.conv").
  """
  if impl not in IMPLS:
    raise ValueError(
      f"{what}={impl!r} is not a convolution implementation; use one of {', '.join(IMPLS)} "
      "(auto: the explicit weight gradient on CPU where it measured faster, XLA's elsewhere)."
    )
  return impl


def use_explicit(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int]) -> bool:
  """Whether `impl="auto"` uses the explicit weight gradient on CPU for this convolution.

  Args:
    x_shape: input shape (N, H, W, C).
    w_shape: kernel shape (kh, kw, C, O).
    strides: (sh, sw).

  Returns:
    True for 1×1 kernels (any stride): there the explicit weight gradient is one matrix product
    and measured 2.5-5× faster than XLA:CPU's; for larger kernels XLA's measured faster (see
    the module docstring).
  """
  del x_shape, strides
  return tuple(w_shape[:2]) == (1, 1)


def _pads(padding, x_shape, w_shape, strides) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def weight_gradient(
  x: jax.Array,
  dy: jax.Array,
  kernel: tuple[int, int],
  strides: tuple[int, int],
  pads: tuple[tuple[int, int], ...],
) -> jax.Array:
  """dW of y = conv(x, W) given dy, as one matrix product per kernel tap.

  Args:
    x: input, (N, H, W, C).
    dy: cotangent of the output, (N, Ho, Wo, O).
    kernel: (kh, kw).
    strides: (sh, sw).
    pads: ((lo, hi), (lo, hi)) padding of H and W.

  Returns:
    dW, (kh, kw, C, O), accumulated in float32 and returned in x's dtype.
  """
  (kh, kw), (sh, sw) = kernel, strides
  n, ho, wo, _ = dy.shape
  c = x.shape[-1]
  if any(p != (0, 0) for p in pads):
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
  taps = []
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(
        x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
      )
      taps.append(lax.dot_general(window, dy, contract, preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, c, dy.shape[-1]).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


def _conv_fwd(x, w, strides, pads, precision):
  return _conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, dy):
  x, w = residuals
  # The input gradient stays XLA's own (transposed) convolution: fast on every backend.
  _, input_vjp = jax.vjp(
    lambda x: lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
    ),
    x,
  )
  (dx,) = input_vjp(dy)
  return dx, weight_gradient(x, dy, w.shape[:2], strides, pads).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _applies(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """Whether the explicit weight gradient covers this call (else XLA's convolution runs)."""
  if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1:
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  return dimension_numbers is not None and tuple(dimension_numbers) == tuple(_NHWC)


def conv_general_dilated(impl: str = "auto") -> Callable[..., jax.Array]:
  """A drop-in for `lax.conv_general_dilated` (the signature flax.linen.Conv calls).

  Args:
    impl: "auto", "xla" or "explicit" (see the module docstring).

  Returns:
    `conv(lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation, dimension_numbers,
    feature_group_count, precision)`.
  """
  check_impl(impl)

  def conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs,
  ) -> jax.Array:
    strides = tuple(int(s) for s in window_strides)
    explicit = (
      impl != "xla"
      and not kwargs
      and _applies(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
      and (
        impl == "explicit"
        or (jax.default_backend() == "cpu" and use_explicit(lhs.shape, rhs.shape, strides))
      )
    )
    if not explicit:
      return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
      )
    pads = _pads(padding, lhs.shape, rhs.shape, strides)
    return _conv(lhs, rhs, strides, pads, precision)

  return conv
