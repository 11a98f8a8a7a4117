"""Stage state in arrays of one shape on every device: stacked common leaves, padded flat rest.

One SPMD program holds every stage's state in arrays of the same shape on every device (a
leading axis K sharded over 'stage'). A layout splits each stage's tree in two:

- **Stacked leaves**: a leaf that every stage has, at the same path with the same shape and
  dtype (a Transformer's blocks `layer_0` .. `layer_{n-1}`, n the fewest any stage holds, their
  optimizer moments, the step counts), is kept whole, the K stages' copies stacked on the
  leading axis. No padding and no reshaping.
- **Flat buffers**: the other leaves (a ResNet's stages of different widths; the Transformer's
  embedding, heads, unembedding and any blocks beyond the fewest), per dtype raveled and
  concatenated, padded with zeros to the longest stage's length. The padding is the stages'
  imbalance in these leaves (for the Transformer: stage 1's embedding, plus those extra blocks),
  reported by `padding_bytes`.

A branch of the program that runs stage k unpacks with static slices. Flat gradients are added,
and statistics written, as one whole-buffer operation per call (the leaves concatenated, padded,
then one add or one concatenate with the rest), not leaf by leaf: XLA:CPU does not update a
buffer in place inside the program's switch, so each leaf's own dynamic-update-slice copied the
whole buffer (90 leaves into a 243,466-float buffer inside a switch in a scan: 19.8 ms leaf by
leaf, 0.25 ms whole).

The buffers of one stage are a dict: `{"flat": {dtype: [width]}, "stacked": (leaf, ...)}`.
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
  offset: int  # Flat: where the leaf starts in its dtype's buffer; stacked: its index.
  shape: tuple[int, ...]
  stacked: bool = False

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))


class FlatLayout:
  """Where each leaf of each stage's tree lives: a stacked leaf, or a slice of a flat buffer.

  Args:
    trees: one (abstract or concrete) pytree per stage; top-level dict keys (e.g. "stage",
      "head") can be read and written on their own.
    stack: keep the leaves common to every stage (same path, shape and dtype) as stacked
      leaves; False puts every leaf in the flat buffers.
  """

  def __init__(self, trees: Sequence[PyTree], stack: bool = True):
    flat = [jax.tree_util.tree_flatten_with_path(tree) for tree in trees]
    key = lambda path, leaf: (jax.tree_util.keystr(path), tuple(leaf.shape), np.dtype(leaf.dtype))
    keys = [[key(p, leaf) for p, leaf in paths] for paths, _ in flat]
    common = set(keys[0]).intersection(*keys[1:]) if stack and keys else set()
    # Stacked leaves are numbered in stage 1's leaf order.
    order = [k for k in keys[0] if k in common] if keys else []
    self.stacked = [jax.ShapeDtypeStruct(shape, dt) for _, shape, dt in order]
    index = {k: i for i, k in enumerate(order)}
    self.treedefs, self.leaves, self.tops = [], [], []
    sizes: list[dict[str, int]] = []
    for (paths, treedef), stage_keys in zip(flat, keys):
      used: dict[str, int] = {}
      leaves, tops = [], {}
      for i, ((path, leaf), k) in enumerate(zip(paths, stage_keys)):
        dt = np.dtype(leaf.dtype).name
        if k in common:
          leaves.append(_Leaf(dt, index[k], tuple(leaf.shape), stacked=True))
        else:
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
    """Bytes of zeros stage k's flat buffers carry to match the widest stage."""
    return sum(
      (w - self.sizes[k].get(dt, 0)) * np.dtype(dt).itemsize for dt, w in self.width.items()
    )

  def stacked_bytes(self) -> int:
    """Bytes of one stage's stacked leaves."""
    return sum(int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize for s in self.stacked)

  def bytes(self) -> int:
    """Bytes of one stage's buffers (flat, padded, and stacked)."""
    flat = sum(w * np.dtype(dt).itemsize for dt, w in self.width.items())
    return flat + self.stacked_bytes()

  def zeros(self) -> dict:
    """Zero buffers of one stage."""
    return {
      "flat": {dt: jnp.zeros((w,), dt) for dt, w in self.width.items()},
      "stacked": tuple(jnp.zeros(s.shape, s.dtype) for s in self.stacked),
    }

  def abstract(self, leading: tuple[int, ...] = ()) -> dict:
    """The buffers' shapes and dtypes, with `leading` axes in front."""
    return {
      "flat": {dt: jax.ShapeDtypeStruct((*leading, w), dt) for dt, w in self.width.items()},
      "stacked": tuple(jax.ShapeDtypeStruct((*leading, *s.shape), s.dtype) for s in self.stacked),
    }

  def pack(self, k: int, tree: PyTree) -> dict:
    """Stage k's tree -> its buffers."""
    parts: dict[str, list] = {dt: [] for dt in self.width}
    stacked = [None] * len(self.stacked)
    for spec, leaf in zip(self.leaves[k], jax.tree.leaves(tree)):
      if spec.stacked:
        stacked[spec.offset] = jnp.asarray(leaf, spec.dtype)
      else:
        parts[spec.dtype].append(jnp.ravel(leaf).astype(spec.dtype))
    out = {}
    for dt, w in self.width.items():
      used = self.sizes[k].get(dt, 0)
      out[dt] = jnp.concatenate([*parts[dt], jnp.zeros((w - used,), dt)])
    return {"flat": out, "stacked": tuple(stacked)}

  def _range(self, k: int, top) -> tuple[int, int]:
    return (0, len(self.leaves[k])) if top is None else self.tops[k].get(top, (0, 0))

  def _read(self, bufs: dict, s: _Leaf) -> jax.Array:
    if s.stacked:
      return bufs["stacked"][s.offset]
    return bufs["flat"][s.dtype][s.offset : s.offset + s.size].reshape(s.shape)

  def unpack(self, k: int, bufs: dict, top: str | None = None) -> PyTree:
    """Stage k's tree (or its `top`-level subtree) from the buffers, by static slices."""
    lo, hi = self._range(k, top)
    leaves = [self._read(bufs, s) for s in self.leaves[k][lo:hi]]
    if top is None:
      return jax.tree.unflatten(self.treedefs[k], leaves)
    full = [None] * len(self.leaves[k])
    full[lo:hi] = leaves
    return jax.tree.unflatten(self.treedefs[k], full)[top]

  def _scatter(self, k, bufs, top, tree, add: bool) -> dict:
    lo, hi = self._range(k, top)
    values = jax.tree.leaves(tree)
    if len(values) != hi - lo:
      raise ValueError(f"Stage {k}'s {top!r} subtree has {hi - lo} leaves, got {len(values)}.")
    pieces: dict[str, list] = {}
    stacked = list(bufs["stacked"])
    for s, v in zip(self.leaves[k][lo:hi], values):
      if s.stacked:
        v = jnp.asarray(v, s.dtype)
        stacked[s.offset] = stacked[s.offset] + v if add else v
      else:
        pieces.setdefault(s.dtype, []).append(jnp.ravel(v).astype(s.dtype))
    flat = dict(bufs["flat"])
    for dt, (start, end) in self._spans(k, lo, hi).items():
      buf = flat[dt]
      if add:
        pad = lambda n, dt=dt: [jnp.zeros((n,), dt)] if n else []
        flat[dt] = buf + jnp.concatenate([*pad(start), *pieces[dt], *pad(buf.shape[-1] - end)])
      else:
        flat[dt] = jnp.concatenate([buf[:start], *pieces[dt], buf[end:]])
    return {"flat": flat, "stacked": tuple(stacked)}

  def _spans(self, k: int, lo: int, hi: int) -> dict[str, tuple[int, int]]:
    """Per dtype, the [start, end) that the flat leaves among lo .. hi - 1 of stage k fill
    (contiguous: offsets are handed out in leaf order within each dtype)."""
    spans: dict[str, tuple[int, int]] = {}
    for s in self.leaves[k][lo:hi]:
      if s.stacked:
        continue
      start, end = spans.get(s.dtype, (s.offset, s.offset))
      assert end == s.offset, (k, s)
      spans[s.dtype] = (start, s.offset + s.size)
    return spans

  def add(self, k: int, bufs: dict, top: str | None, tree: PyTree) -> dict:
    """Adds `tree` (stage k's `top` subtree, or all of it) into its leaves and slices."""
    return self._scatter(k, bufs, top, tree, add=True)

  def write(self, k: int, bufs: dict, top: str | None, tree: PyTree) -> dict:
    """Overwrites stage k's `top` subtree (or all of it) with `tree`."""
    return self._scatter(k, bufs, top, tree, add=False)
