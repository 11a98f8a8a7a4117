"""Padded flat buffers: K stages' differently shaped pytrees in arrays of one shape.

One SPMD program holds every stage's state in arrays of the same shape on every device (a
leading axis K sharded over 'stage'); stages with different parameters (a ResNet's) therefore
keep theirs flat: per dtype, every leaf of stage k's tree raveled and concatenated, padded with
zeros to the longest stage's length. A branch of the program that runs stage k unpacks with
static slices. Gradients are added, and statistics written, as one whole-buffer operation per
call (the leaves concatenated, padded, then one add or one concatenate with the rest), not leaf
by leaf: XLA:CPU does not update a buffer in place inside the program's switch, so each leaf's
own dynamic-update-slice copied the whole buffer (90 leaves into a 243,466-float buffer inside
a switch in a scan: 19.8 ms leaf by leaf, 0.25 ms whole). Stages whose trees are all alike need
no padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class _Leaf:
  dtype: str
  offset: int
  shape: tuple[int, ...]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


class FlatLayout:
  """Where each leaf of each stage's tree lives in the per-dtype flat buffers.

  Args:
    trees: one (abstract or concrete) pytree per stage; top-level dict keys (e.g. "stage",
      "head") can be read and written on their own.
  """

  def __init__(self, trees: Sequence[PyTree]):
    self.treedefs, self.leaves, self.tops = [], [], []
    sizes: list[dict[str, int]] = []
    for tree in trees:
      paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
      used: dict[str, int] = {}
      leaves, tops = [], {}
      for i, (path, leaf) in enumerate(paths):
        dt = np.dtype(leaf.dtype).name
        leaves.append(_Leaf(dt, used.get(dt, 0), tuple(leaf.shape)))
        used[dt] = used.get(dt, 0) + leaves[-1].size
        top = getattr(path[0], "key", None) if path else None
        lo, _ = tops.get(top, (i, i))
        tops[top] = (lo, i + 1)
      self.treedefs.append(treedef)
      self.leaves.append(leaves)
      self.tops.append(tops)
      sizes.append(used)
    self.sizes = sizes
    self.width = {
      dt: max(s.get(dt, 0) for s in sizes) for dt in sorted({d for s in sizes for d in s})
    }

  @property
  def num_stages(self) -> int:
    return len(self.treedefs)

  def padding_bytes(self, k: int) -> int:
    """Bytes of zeros stage k's buffers carry to match the widest stage."""
    return sum(
      (w - self.sizes[k].get(dt, 0)) * np.dtype(dt).itemsize for dt, w in self.width.items()
    )

  def bytes(self) -> int:
    """Bytes of one stage's (padded) buffers."""
    return sum(w * np.dtype(dt).itemsize for dt, w in self.width.items())

  def zeros(self) -> dict[str, jax.Array]:
    """Zero buffers, one per dtype."""
    return {dt: jnp.zeros((w,), dt) for dt, w in self.width.items()}

  def abstract(self, leading: tuple[int, ...] = ()) -> dict[str, jax.ShapeDtypeStruct]:
    """The buffers' shapes and dtypes, with `leading` axes in front."""
    return {dt: jax.ShapeDtypeStruct((*leading, w), dt) for dt, w in self.width.items()}

  def pack(self, k: int, tree: PyTree) -> dict[str, jax.Array]:
    """Stage k's tree -> its padded buffers."""
    parts: dict[str, list] = {dt: [] for dt in self.width}
    for spec, leaf in zip(self.leaves[k], jax.tree.leaves(tree)):
      parts[spec.dtype].append(jnp.ravel(leaf).astype(spec.dtype))
    out = {}
    for dt, w in self.width.items():
      used = self.sizes[k].get(dt, 0)
      out[dt] = jnp.concatenate([*parts[dt], jnp.zeros((w - used,), dt)])
    return out

  def _range(self, k: int, top) -> tuple[int, int]:
    return (0, len(self.leaves[k])) if top is None else self.tops[k].get(top, (0, 0))

  def unpack(self, k: int, bufs: dict[str, jax.Array], top: str | None = None) -> PyTree:
    """Stage k's tree (or its `top`-level subtree) from the buffers, by static slices."""
    lo, hi = self._range(k, top)
    leaves = [
      bufs[s.dtype][s.offset : s.offset + s.size].reshape(s.shape) for s in self.leaves[k][lo:hi]
    ]
    if top is None:
      return jax.tree.unflatten(self.treedefs[k], leaves)
    full = [None] * len(self.leaves[k])
    full[lo:hi] = leaves
    return jax.tree.unflatten(self.treedefs[k], full)[top]

  def _scatter(self, k, bufs, top, tree, add: bool) -> dict[str, jax.Array]:
    lo, hi = self._range(k, top)
    values = jax.tree.leaves(tree)
    if len(values) != hi - lo:
      raise ValueError(f"Stage {k}'s {top!r} subtree has {hi - lo} leaves, got {len(values)}.")
    pieces: dict[str, list] = {}
    for s, v in zip(self.leaves[k][lo:hi], values):
      pieces.setdefault(s.dtype, []).append(jnp.ravel(v).astype(s.dtype))
    bufs = dict(bufs)
    for dt, (start, end) in self._spans(k, lo, hi).items():
      buf = bufs[dt]
      if add:
        pad = lambda n, dt=dt: [jnp.zeros((n,), dt)] if n else []
        bufs[dt] = buf + jnp.concatenate([*pad(start), *pieces[dt], *pad(buf.shape[-1] - end)])
      else:
        bufs[dt] = jnp.concatenate([buf[:start], *pieces[dt], buf[end:]])
    return bufs

  def _spans(self, k: int, lo: int, hi: int) -> dict[str, tuple[int, int]]:
    """Per dtype, the [start, end) that leaves lo .. hi - 1 of stage k fill (contiguous: offsets
    are handed out in leaf order within each dtype)."""
    spans: dict[str, tuple[int, int]] = {}
    for s in self.leaves[k][lo:hi]:
      start, end = spans.get(s.dtype, (s.offset, s.offset))
      assert end == s.offset, (k, s)
      spans[s.dtype] = (start, s.offset + s.size)
    return spans

  def add(self, k: int, bufs: dict, top: str | None, tree: PyTree) -> dict[str, jax.Array]:
    """Adds `tree` (stage k's `top` subtree, or all of it) into its slices."""
    return self._scatter(k, bufs, top, tree, add=True)

  def write(self, k: int, bufs: dict, top: str | None, tree: PyTree) -> dict[str, jax.Array]:
    """Overwrites the slices of stage k's `top` subtree (or all of it) with `tree`."""
    return self._scatter(k, bufs, top, tree, add=False)
