"""Stored VJP residuals for the SPMD program: a B op reads what its forward kept (no remat).

A stage's forward under `jax.vjp` (`Stage.forward`) returns its VJP as a pytree: the residual
arrays are its leaves, the linearized program is static. Between the forward's tick and the
ticks of its later B ops, the residuals of an in-flight microbatch wait in a slot of the
program's carry (`ticks.TickTable.res_slots` of them, from the table's interval colouring):

- The layout of stage k's residuals is fixed once, by tracing its forward on shapes
  (`jax.eval_shape`): the VJP's tree structure, and per leaf where it comes from. A leaf that
  *is* one of the stage's parameters or its input (jax keeps primal inputs as residuals by
  reference) is not stored: the B op takes the stage's parameters (unchanged between a
  microbatch's F and its B ops: U follows every B op of its step) and its stored input.
- The other leaves go into per-dtype buffers, one row per slot: a leaf whose leading axis is
  the microbatch's rows into a [slots + 1, rows, width] buffer (the rows stay an axis, so the
  'data' partitioner splits them like the stage's activations), any other leaf into a
  [slots + 1, width] one. Width is the widest stage's; the last row is the spare slot, which
  a table whose storing F groups always store in a slot does without (`TickTable.res_spare`).

The B op rebuilds the VJP from the stored leaves with the traced tree structure and calls it
as the forward's own VJP would be called, so stored and recomputed residuals train alike
(with dropout: the forward's masks are residuals too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class StageResiduals:
  """Where stage k's VJP leaves live.

  Attributes:
    treedef: the VJP's tree structure (static: its linearized program).
    sources: per VJP leaf, ("param", i) or ("input", i) for a leaf that is the stage's i-th
      parameter or input leaf, else ("stored", j).
    stored: per stored leaf j, (buffer, offset, shape, dtype).
    out_dtype: the dtype of the stage output (its cotangents' dtype).
  """

  treedef: Any
  sources: tuple
  stored: tuple
  out_dtype: Any


def _buffer(leaf, rows: int) -> str:
  per_row = leaf.ndim >= 1 and leaf.shape[0] == rows
  return f"{np.dtype(leaf.dtype).name}{'/rows' if per_row else ''}"


def sources(leaves, params, x) -> list:
  """Per VJP leaf: ("param", i) / ("input", i) where it *is* that leaf, else None."""
  ids = {id(p): ("param", i) for i, p in enumerate(jax.tree.leaves(params))}
  ids.update({id(v): ("input", i) for i, v in enumerate(jax.tree.leaves(x))})
  return [ids.get(id(leaf)) for leaf in leaves]


class Residuals:
  """The stored-residual layout of every stage that needs one (module doc).

  Args:
    traced: {k: (output dtype, VJP leaves as shapes, VJP tree structure, `sources` of the
      leaves)} for each stage whose B ops read stored residuals: its forward traced on shapes
      (`program.stored_residuals` traces it, so that the stage layer is called from the
      program alone).
    rows: examples per microbatch (global, inside the program).
  """

  def __init__(self, traced: dict, rows: int):
    self.rows = rows
    self.layouts: dict[int, StageResiduals] = {}
    widths: dict[str, int] = {}
    for k, (out_dtype, leaves, treedef, found) in traced.items():
      layout = _layout(out_dtype, leaves, treedef, found, rows)
      self.layouts[k] = layout
      used: dict[str, int] = {}
      for buf, offset, shape, _ in layout.stored:
        used[buf] = offset + _width(buf, shape, rows)
      for buf, n in used.items():
        widths[buf] = max(widths.get(buf, 0), n)
    self.widths = widths

  def zeros(self, slots: int, spare: bool = True) -> dict[str, jax.Array]:
    """The empty buffers: `slots` slots, and the spare one where some F group writes nothing
    (`TickTable.res_spare`)."""
    n = slots + int(spare)
    shape = lambda buf, w: (n, self.rows, w) if buf.endswith("/rows") else (n, w)
    return {buf: jnp.zeros(shape(buf, w), buf.split("/")[0]) for buf, w in self.widths.items()}

  def slot_bytes(self, k: int | None = None) -> int:
    """Bytes of one slot over every buffer (k: of what stage k stores in it)."""
    if k is not None:
      stored = self.layouts[k].stored if k in self.layouts else ()
      return sum(math.prod(shape) * np.dtype(dtype).itemsize for _, _, shape, dtype in stored)
    return sum(
      w * (self.rows if buf.endswith("/rows") else 1) * np.dtype(buf.split("/")[0]).itemsize
      for buf, w in self.widths.items()
    )

  def store(self, k: int, bufs: dict, slot, vjp, params, x) -> dict:
    """Writes stage k's stored leaves of `vjp` (its forward's, on `params` and `x`) to `slot`."""
    layout = self.layouts[k]
    leaves = jax.tree.leaves(vjp)
    found = sources(leaves, params, x)
    expected = [None if s[0] == "stored" else s for s in layout.sources]
    shapes = [(leaf.shape, leaf.dtype) for leaf in leaves]
    traced = [(s[2], s[3]) for s in layout.stored]
    mine = [shape for shape, src in zip(shapes, found, strict=True) if src is None]
    if found != expected or mine != traced:
      raise ValueError(
        f"Stage {k + 1}'s forward kept other VJP residuals inside the program than when traced "
        "on shapes; the stored-residual layout does not fit. Set config.execution.remat=True "
        "(the B op re-runs the forward) and report the model."
      )
    bufs = dict(bufs)
    stored = [leaf for leaf, src in zip(leaves, found, strict=True) if src is None]
    for leaf, (buf, offset, _, _) in zip(stored, layout.stored, strict=True):
      # Each leaf into its columns of the slot's row: no concatenated copy of the residuals.
      if buf.endswith("/rows"):
        value, start = leaf.reshape(1, self.rows, -1), (slot, slot * 0, slot * 0 + offset)
      else:
        value, start = leaf.reshape(1, -1), (slot, slot * 0 + offset)
      bufs[buf] = lax.dynamic_update_slice(bufs[buf], value.astype(bufs[buf].dtype), start)
    return bufs

  def load(self, k: int, bufs: dict, slot, params, x):
    """Stage k's VJP of the microbatch in `slot`, with its parameters and input `x`."""
    layout = self.layouts[k]
    stored = []
    for buf, offset, shape, _ in layout.stored:
      n, b = _width(buf, shape, self.rows), bufs[buf]
      if buf.endswith("/rows"):
        start, size = (slot, slot * 0, slot * 0 + offset), (1, self.rows, n)
      else:
        start, size = (slot, slot * 0 + offset), (1, n)
      stored.append(lax.dynamic_slice(b, start, size).reshape(shape))
    p, xs = jax.tree.leaves(params), jax.tree.leaves(x)
    leaves = [{"param": p, "input": xs, "stored": stored}[kind][i] for kind, i in layout.sources]
    return jax.tree.unflatten(layout.treedef, leaves)


def _width(buf: str, shape, rows: int) -> int:
  size = math.prod(shape)
  return size // rows if buf.endswith("/rows") else size


def _layout(out_dtype, leaves, treedef, found, rows: int) -> StageResiduals:
  """Where each VJP leaf of a stage traced on shapes lives."""
  sources, stored, offsets, j = [], [], {}, 0
  for leaf, src in zip(leaves, found, strict=True):
    if src is not None:
      sources.append(src)
      continue
    buf = _buffer(leaf, rows)
    offset = offsets.get(buf, 0)
    offsets[buf] = offset + _width(buf, leaf.shape, rows)
    stored.append((buf, offset, tuple(leaf.shape), leaf.dtype))
    sources.append(("stored", j))
    j += 1
  return StageResiduals(treedef, tuple(sources), tuple(stored), out_dtype)
