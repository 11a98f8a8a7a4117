"""Stage 1's token table split by rows over the K stages (vocabulary-parallel), for spmd.

Why: the packed state pads every stage's flat buffers to the widest stage (`flat.py`). A
Transformer's token table (vocab x d_model, with its optimizer moments and gradient sums) sits
in stage 1 alone, so every other stage carried its size in zeros: 262.7 MB per device at
vocab 32k, d_model 512 with AdamW. Split, each stage holds ceil(V/K) rows of it, and stage
1's row of the packed state holds none (a zero-size stand-in keeps its tree's structure).

How the program runs it (`program.py`):

- **Lookup**: at the start of each tick every stage looks up the tokens of the microbatch
  stage 1 works on this tick in its own rows (zeros for the tokens outside them); one psum over
  'stage' gives every stage the tokens' rows, and stage 1's forward takes them as its input
  (the model's stage 1 accepts looked-up rows; `StagedModel.info["embedding"]` names its
  table).
- **Gradient**: stage 1's weight-gradient op also returns the cotangent with respect to those
  rows; one psum gives it to every stage, which adds it into its rows' gradient sums (a
  scatter-add by token, dropped outside its rows).
- **Update**: on stage 1's update tick every stage updates its rows with stage 1's optimizer.
  An elementwise optimizer (SGD, Adam, decoupled decay by rank) updates a part of a tree as it
  updates the whole, so the rows go through the optimizer in a tree of stage 1's structure
  whose other leaves are zero-size. Norms are the whole table's: one psum of squared norms
  gives the clip its norm (`state.make_optimizer`'s `module_norms`), and stage 1's
  `grad_norm` / `param_norm` metrics count the table (`Stage.update`'s `elsewhere`).
- **Checkpoints**: the table stays one leaf of stage 1, as every executor writes it; each
  process writes the rows its devices hold and reads only those (`HostLeaf.parts`).

The same values as a whole table, up to the order of float sums (the scatter-add, the norms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ilbp.state import Shards, StageState

PyTree = Any
TABLE, MOMENT, PARAM, OTHER = "table", "moment", "param", "other"


def _zero_size(shape: tuple[int, ...]) -> tuple[int, ...]:
  """A stand-in's shape: no elements, the same rank (decay masks go by rank)."""
  return (0, *shape[1:]) if shape else ()


class VocabSplit:
  """Where stage 1's table and its optimizer moments are, and how they split over K stages.

  Args:
    abstract: stage 1's StageState as shapes and dtypes.
    path: the table's keys in stage 1's params (`StagedModel.info["embedding"]`).
    num_stages: K.

  Raises:
    ValueError: the optimizer state holds an array of the table's shape that is not one of its
      per-parameter moments (an optimizer this split cannot update in parts).
  """

  def __init__(self, abstract: StageState, path: Sequence[str], num_stages: int):
    self.K = num_stages
    keystr = "".join(f"[{k!r}]" for k in path)
    params, self.params_def = jax.tree_util.tree_flatten_with_path(abstract.params)
    names = [jax.tree_util.keystr(p) for p, _ in params]
    if keystr not in names:
      raise ValueError(f"Stage 1's params have no {keystr} (the model's info['embedding']).")
    self.index = names.index(keystr)
    table = params[self.index][1]
    self.vocab, self.width = table.shape
    self.dtype = np.dtype(table.dtype)
    self.rows = math.ceil(self.vocab / num_stages)
    self.param_shapes = [tuple(x.shape) for _, x in params]
    opt, self.opt_def = jax.tree_util.tree_flatten_with_path(abstract.opt_state)
    self.opt_kinds = []
    for path_, leaf in opt:
      name, shape = jax.tree_util.keystr(path_), tuple(leaf.shape)
      mirrors = [
        i for i, n in enumerate(names) if name.endswith(n) and shape == self.param_shapes[i]
      ]
      if mirrors == [self.index]:
        self.opt_kinds.append(TABLE)
      elif mirrors:
        self.opt_kinds.append(PARAM)
      elif shape == tuple(table.shape):
        raise ValueError(
          f"The optimizer state leaf {name} has the token table's shape {shape} but is not one "
          "of its per-parameter moments, so the table cannot be updated in parts; set "
          "config.execution.vocab_parallel=False."
        )
      else:
        self.opt_kinds.append(OTHER)
    self.opt_shapes = [tuple(x.shape) for _, x in opt]
    self.opt_dtypes = [np.dtype(x.dtype) for _, x in opt]

  # --- Stage 1 without its table --------------------------------------------------------------

  def slim(self, stage: StageState) -> StageState:
    """Stage 1's StageState with zero-size stand-ins for the table and its moments (abstract
    or concrete; a `Shards` leaf of another kind gives its stage-1 piece)."""
    abstract = isinstance(jax.tree.leaves(stage.params)[0], jax.ShapeDtypeStruct)
    stand_in = lambda x: (
      jax.ShapeDtypeStruct(_zero_size(x.shape), x.dtype)
      if abstract
      else jnp.zeros(_zero_size(x.shape), x.dtype)
    )
    first = lambda x: x.pieces[0] if isinstance(x, Shards) else x
    params = jax.tree.leaves(stage.params, is_leaf=lambda x: isinstance(x, Shards))
    params[self.index] = stand_in(jax.ShapeDtypeStruct((self.vocab, self.width), self.dtype))
    opt = jax.tree.leaves(stage.opt_state, is_leaf=lambda x: isinstance(x, Shards))
    opt = [
      stand_in(jax.ShapeDtypeStruct(self.opt_shapes[i], self.opt_dtypes[i]))
      if kind == TABLE
      else first(x)
      for i, (kind, x) in enumerate(zip(self.opt_kinds, opt))
    ]
    return stage.replace(
      params=jax.tree.unflatten(self.params_def, [first(x) for x in params]),
      opt_state=jax.tree.unflatten(self.opt_def, opt),
    )

  # --- The rows of each stage -----------------------------------------------------------------

  def bounds(self, k: int) -> tuple[int, int]:
    """The table rows stage k holds, [lo, hi) (the last stage's piece is padded to `rows`)."""
    return min(k * self.rows, self.vocab), min((k + 1) * self.rows, self.vocab)

  def abstract_piece(self) -> dict:
    """One stage's piece as shapes and dtypes: {"table", "moments", "other"}."""
    piece = jax.ShapeDtypeStruct((self.rows, self.width), self.dtype)
    others = [
      jax.ShapeDtypeStruct(s, d)
      for kind, s, d in zip(self.opt_kinds, self.opt_shapes, self.opt_dtypes)
      if kind == OTHER
    ]
    moments = [piece for kind in self.opt_kinds if kind == TABLE]
    return {"table": piece, "moments": tuple(moments), "other": tuple(others)}

  def piece_bytes(self) -> int:
    """Bytes one stage holds for its piece: the rows, their moments and gradient sums, and
    its copy of the optimizer's other leaves."""
    rows = self.rows * self.width * self.dtype.itemsize
    other = sum(x.size * x.dtype.itemsize for x in self.abstract_piece()["other"])
    return rows * (2 + len(self.abstract_piece()["moments"])) + other

  def padding_bytes(self, k: int) -> int:
    """Bytes of zero rows in stage k's piece (the last pieces, when K does not divide V)."""
    lo, hi = self.bounds(k)
    rows = (self.rows - (hi - lo)) * self.width * self.dtype.itemsize
    return rows * (2 + len(self.abstract_piece()["moments"]))

  def input_spec(self, tokens: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """Stage 1's input when it takes the tokens' rows."""
    return jax.ShapeDtypeStruct((*tokens.shape, self.width), jnp.float32)

  def piece(self, stage: StageState, k: int) -> dict:
    """Stage k's piece of stage 1's (whole) StageState: its rows of the table and of each
    moment, zero-padded to `rows`, and a copy of the optimizer's other leaves (step counts)."""
    lo, hi = self.bounds(k)
    cut = lambda x: jnp.pad(x[lo:hi], ((0, self.rows - (hi - lo)), (0, 0)))
    table = jax.tree.leaves(stage.params)[self.index]
    opt = jax.tree.leaves(stage.opt_state)
    return {
      "table": cut(table),
      "moments": tuple(cut(x) for kind, x in zip(self.opt_kinds, opt) if kind == TABLE),
      "other": tuple(x for kind, x in zip(self.opt_kinds, opt) if kind == OTHER),
    }

  def join(self, slim: StageState, table, moments: Sequence) -> StageState:
    """Stage 1's whole StageState from its slim one and the whole table and moments."""
    params = jax.tree.leaves(slim.params)
    params[self.index] = table
    opt, moments = jax.tree.leaves(slim.opt_state), list(moments)
    opt = [moments.pop(0) if kind == TABLE else x for kind, x in zip(self.opt_kinds, opt)]
    return slim.replace(
      params=jax.tree.unflatten(self.params_def, params),
      opt_state=jax.tree.unflatten(self.opt_def, opt),
    )

  # --- The update of one piece ------------------------------------------------------------------

  def trees(self, piece: dict, grads: jax.Array) -> tuple[PyTree, PyTree, PyTree]:
    """(gradient, params, optimizer state) of stage 1's structure holding one piece: the
    piece's rows where the table is, zero-size leaves elsewhere (an optimizer's input)."""

    def tree(rows):
      leaves = [jnp.zeros(_zero_size(s), self.dtype) for s in self.param_shapes]
      leaves[self.index] = rows
      return jax.tree.unflatten(self.params_def, leaves)

    moments, others = list(piece["moments"]), list(piece["other"])
    opt = []
    for kind, shape, dtype in zip(self.opt_kinds, self.opt_shapes, self.opt_dtypes):
      if kind == TABLE:
        opt.append(moments.pop(0))
      elif kind == OTHER:
        opt.append(others.pop(0))
      else:
        opt.append(jnp.zeros(_zero_size(shape), dtype))
    return tree(grads), tree(piece["table"]), jax.tree.unflatten(self.opt_def, opt)

  def from_trees(self, params: PyTree, opt_state: PyTree) -> dict:
    """`trees`' params and optimizer state, updated -> the piece."""
    opt = jax.tree.leaves(opt_state)
    return {
      "table": jax.tree.leaves(params)[self.index],
      "moments": tuple(x for kind, x in zip(self.opt_kinds, opt) if kind == TABLE),
      "other": tuple(x for kind, x in zip(self.opt_kinds, opt) if kind == OTHER),
    }

  # --- Inside the program (manual over 'stage') -------------------------------------------------

  def _local(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(row index in this stage's piece, whether the token is in it), per token."""
    index = tokens - lax.axis_index("stage") * self.rows
    inside = (index >= 0) & (index < self.rows)
    return jnp.where(inside, index, 0), inside

  def lookup(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Every token's row of the whole table, on every stage: [..., d] (one psum)."""
    index, inside = self._local(tokens)
    rows = jnp.where(inside[..., None], jnp.take(table, index, axis=0), 0)
    return lax.psum(rows, "stage")

  def add_grads(self, sums: jax.Array, tokens: jax.Array, cot: jax.Array) -> jax.Array:
    """Adds the rows' cotangent `cot` [..., d] (the same on every stage) into this stage's
    gradient sums, by token."""
    index, inside = self._local(tokens)
    index = jnp.where(inside, index, self.rows).reshape(-1)  # Out of range: dropped.
    return sums.at[index].add(cot.reshape(-1, self.width).astype(sums.dtype), mode="drop")
