"""Convolutions whose gradients XLA:CPU computes fast, also inside `lax.switch` and loops.

XLA's own convolution (`lax.conv_general_dilated`) is what cuDNN and the TPU compiler are built
for. On XLA:CPU two things about its gradients are slow, and this module mends both (on the CPU
backend only; GPU and TPU always run XLA's convolution):

1. **Convolutions in nested programs.** XLA:CPU runs a convolution fast (Eigen) only when its
   operands are in the NHWC / HWIO / NHWC form; autodiff's gradient convolutions are not
   (dimension labels such as `f01b_i01o->01bf` for the weight gradient, a reversed `01oi` kernel
   for the input gradient). XLA rewrites them into that form with transposes in the program's top
   level, but not inside `lax.switch` branches or loop bodies, where they fall back to a generic
   loop ~10× slower (one 3×3 conv forward + backward, 8×32×32×16: 2.0 ms at top level, 23 ms in a
   switch branch; the SPMD pipeline executor runs every stage inside a switch inside a scan).
   Here the VJP itself is written as convolutions in that form — the input gradient as a
   convolution of the stride-dilated cotangent with the flipped, in/out-swapped kernel, the
   weight gradient as a convolution with batch and features swapped by explicit transposes — so
   XLA:CPU runs them fast wherever they sit (2.4 ms at top level, 2.4 ms in a switch branch).

2. **1×1 weight gradients.** For a 1×1 kernel the weight gradient is one matrix product, and
   XLA:CPU's convolution over batch-minor transposes of the activations costs 2.5-5× that product
   (`scripts/benchmark_conv.py` prints the comparison per layer; 2-core AMD EPYC, AVX-512,
   jax 0.10.2, batch 32 unless noted, ms):

     1×1, 16×16, 256→64 (ResNet-50 bottleneck)   XLA 12.4   explicit 4.6
     1×1, 56×56, 64→256, batch 8                  XLA 66.2   explicit 13.0
     1×1 stride 2, 16×16, 128→256 (projection)    XLA  6.0   explicit 1.8
     3×3, 32×32, 64→64                            XLA 27.9   explicit 105.7
     3×3, 8×8, 256→256                            XLA 28.1   explicit 31.5
     7×7 stride 2, 224×224, 3→64, batch 8         XLA 31.2   explicit 80.0

   `explicit` computes the weight gradient as matrix products over the activations in their own
   layout: for each kernel tap (i, j), dW[i, j] = Σ_{b,h,w} x[b, s·h + i, s·w + j, :]ᵀ ·
   dy[b, h, w, :], one `dot_general` contracting batch and space.

Every variant equals XLA's gradients to float rounding (tests/test_conv.py).
`conv_general_dilated(impl)` returns a drop-in for `lax.conv_general_dilated`, for
`flax.linen.Conv(conv_general_dilated=...)`; parameters and their layout do not change, so
checkpoints do not depend on the choice.

  impl="auto"       on the CPU backend: the custom VJP for every convolution it covers, with the
                    explicit weight gradient where it measured faster (`use_explicit`: 1×1
                    kernels) and the NHWC-form convolution elsewhere; XLA's convolution on GPU
                    and TPU (cuDNN, the TPU compiler). The default.
  impl="xla"        always XLA's convolution (slow inside switches and loops on CPU).
  impl="explicit"   the explicit weight gradient wherever the custom VJP applies (2-D,
                    NHWC/HWIO, no dilation, one feature group), on any backend; for CPUs where
                    `scripts/benchmark_conv.py` finds it faster for more shapes.
  impl="canonical"  the NHWC-form weight-gradient convolution wherever the custom VJP applies,
                    1×1 kernels included, on any backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

IMPLS = ("auto", "xla", "explicit", "canonical")
# The name of the custom VJP's output, for `jax.checkpoint` policies: a custom VJP is not the
# `conv_general_dilated` primitive that `jax.checkpoint_policies.dots_saveable` recognises.
CHECKPOINT_NAME = "conv"

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
      "(auto: the CPU-friendly gradients on CPU, XLA's convolution on GPU and TPU)."
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
    and measured 2.5-5× faster than XLA:CPU's convolution; for larger kernels the convolution
    measured faster (see the module docstring).
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


def input_gradient(
  dy: jax.Array,
  w: jax.Array,
  input_hw: tuple[int, int],
  strides: tuple[int, int],
  pads: tuple[tuple[int, int], ...],
  precision: Any = None,
) -> jax.Array:
  """dx of y = conv(x, W) given dy, as one NHWC/HWIO convolution (fast in XLA:CPU anywhere).

  Args:
    dy: cotangent of the output, (N, Ho, Wo, O).
    w: kernel, (kh, kw, C, O).
    input_hw: (H, W) of x.
    strides: (sh, sw).
    pads: ((lo, hi), (lo, hi)) padding of H and W.
    precision: as for `lax.conv_general_dilated`.

  Returns:
    dx, (N, H, W, C): the stride-dilated dy convolved with the flipped kernel, in and out
    features swapped; the padding puts every input position where its taps land.
  """
  flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx_pads = []
  for size, k, s, (lo, _), out in zip(input_hw, w.shape[:2], strides, pads, dy.shape[1:3]):
    before = k - 1 - lo
    dx_pads.append((before, size + k - 1 - before - ((out - 1) * s + 1)))
  return lax.conv_general_dilated(
    dy, flipped, (1, 1), dx_pads, lhs_dilation=strides, dimension_numbers=_NHWC, precision=precision
  )


def weight_gradient_conv(
  x: jax.Array,
  dy: jax.Array,
  kernel: tuple[int, int],
  strides: tuple[int, int],
  pads: tuple[tuple[int, int], ...],
  precision: Any = None,
) -> jax.Array:
  """dW of y = conv(x, W) given dy, as one NHWC/HWIO convolution (fast in XLA:CPU anywhere).

  Args:
    x: input, (N, H, W, C).
    dy: cotangent of the output, (N, Ho, Wo, O).
    kernel: (kh, kw).
    strides: (sh, sw).
    pads: ((lo, hi), (lo, hi)) padding of H and W.
    precision: as for `lax.conv_general_dilated`.

  Returns:
    dW, (kh, kw, C, O): x's channels play the batch, its batch the input features, and dy is the
    kernel, dilated by the stride; rows a stride leaves over past the last window are cut.
  """
  dw = lax.conv_general_dilated(
    x.transpose(3, 1, 2, 0),  # (C, H, W, N)
    dy.transpose(1, 2, 0, 3),  # (Ho, Wo, N, O)
    (1, 1),
    pads,
    rhs_dilation=strides,
    dimension_numbers=_NHWC,
    precision=precision,
  )
  return dw[:, : kernel[0], : kernel[1]].transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, precision, products):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


def _conv_fwd(x, w, strides, pads, precision, products):
  return _conv(x, w, strides, pads, precision, products), (x, w)


def _conv_bwd(strides, pads, precision, products, residuals, dy):
  # The input as an array of its own: when a checkpoint policy recomputes it in the backward
  # (`stage.RESIDUALS`), XLA:CPU would fuse its producers (a norm, an activation) into the
  # convolution, and a fused convolution falls back to XLA's generic loop (the convolutions'
  # time doubled in a profile of the spmd step; docs/pipeline.md).
  x, w = lax.optimization_barrier(residuals)
  dx = input_gradient(dy, w, x.shape[1:3], strides, pads, precision)
  if products:
    dw = weight_gradient(x, dy, w.shape[:2], strides, pads)
  else:
    dw = weight_gradient_conv(x, dy, w.shape[:2], strides, pads, precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _applies(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """Whether the custom VJP covers this call (else XLA's convolution runs)."""
  if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1:
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  return dimension_numbers is not None and tuple(dimension_numbers) == tuple(_NHWC)


def conv_general_dilated(impl: str = "auto") -> Callable[..., jax.Array]:
  """A drop-in for `lax.conv_general_dilated` (the signature flax.linen.Conv calls).

  Args:
    impl: one of `IMPLS` (see the module docstring).

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
    custom = (
      impl != "xla"
      and not kwargs
      and _applies(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
      and (impl != "auto" or jax.default_backend() == "cpu")
    )
    if not custom:
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
    products = impl == "explicit" or (
      impl == "auto" and use_explicit(lhs.shape, rhs.shape, strides)
    )
    return checkpoint_name(_conv(lhs, rhs, strides, pads, precision, products), CHECKPOINT_NAME)

  return conv
