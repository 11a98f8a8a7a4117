"""The SPMD executor's state: every stage's StageState packed on a 'stage' axis, and back.

Stage k's parameters, statistics and optimizer state live in arrays with a leading K axis
sharded over 'stage', so row k sits only on stage k's D devices (`PackedState`). Leaves every
stage has alike are stacked whole; the rest sit in per-dtype flat buffers padded to the widest
stage (`flat.FlatLayout`). `Packing` converts between that and the `TrainState` every executor
and checkpoint uses, each stage on its own devices: nothing of stage k is ever built on a
device that does not hold stage k. A checkpoint gets host copies (`host_state`), each stage's
written by the process that holds it. With a token table split over the stages
(`vocab.VocabSplit`), stage 1's row holds none of it and `PackedState.vocab` each stage's
rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ilbp.execution.spmd import vocab as vocab_lib
from ilbp.execution.spmd.flat import FlatLayout
from ilbp.execution.spmd.vocab import Shards, VocabSplit
from ilbp.state import HostLeaf, StageState, TrainState

STAGE_AXIS = "stage"
PARTS = ("params", "model_state", "opt_state")


@flax.struct.dataclass
class PackedState:
  """The SPMD executor's live state: `TrainState` with stages packed on a 'stage' axis.

  Attributes:
    step: optimizer updates so far (replicated).
    rng: the dropout base key (replicated).
    params, model_state, opt_state: `flat.FlatLayout` buffers with a leading K axis:
      {"flat": {dtype: [K, width]}, "stacked": ([K, ...], ...)}; row k lives on stage k's
      devices only.
    vocab: stage 1's token table split over the stages (`vocab.VocabSplit.abstract_piece`,
      each leaf with a leading K axis: row k is stage k's rows), or {} when it is not split.
  """

  step: jax.Array
  rng: jax.Array
  params: dict
  model_state: dict
  opt_state: dict
  vocab: dict


class Packing:
  """StageStates <-> PackedState on a ('stage', 'data') mesh.

  Args:
    abstract: every stage's StageState as shapes and dtypes (`stage.abstract_stages`).
    mesh: the ('stage', 'data') mesh.
    meshes: stage k's ('data',) mesh (row k of `mesh`).
    vocab: stage 1's token table split over the stages, or None.
  """

  def __init__(
    self,
    abstract: Sequence[StageState],
    mesh: Mesh,
    meshes: Sequence[Mesh],
    vocab: VocabSplit | None = None,
  ):
    self.K = len(abstract)
    self.abstract = tuple(abstract)
    self.mesh = mesh
    self.vocab = vocab
    # What the rows hold: stage 1 without its table when the table is split.
    self.held = (vocab.slim(abstract[0]), *abstract[1:]) if vocab else self.abstract
    self.layouts = {p: FlatLayout([getattr(s, p) for s in self.held]) for p in PARTS}
    self.replicated = [NamedSharding(m, P()) for m in meshes]
    self.own = [set(m.devices.flat) for m in meshes]
    self.everywhere = NamedSharding(mesh, P())  # The step and dropout key.
    self.rows = NamedSharding(mesh, P(STAGE_AXIS))

  def sharding(self) -> PackedState:
    """The PackedState of shardings (a program's in and out shardings)."""
    parts = {p: jax.tree.map(lambda _: self.rows, self.layouts[p].abstract()) for p in PARTS}
    vocab = jax.tree.map(lambda _: self.rows, self.vocab.abstract_piece()) if self.vocab else {}
    return PackedState(step=self.everywhere, rng=self.everywhere, vocab=vocab, **parts)

  def pack_stage(self, k: int, stage: StageState) -> dict:
    """Stage k's StageState -> its buffers, per part (`flat.FlatLayout.pack`); stage 1 whole
    or already slim (`vocab.VocabSplit.slim`) when its table is split."""
    if k == 0 and self.vocab:
      stage = self.vocab.slim(stage)
    return {p: self.layouts[p].pack(k, getattr(stage, p)) for p in PARTS}

  def unpack_stage(self, k: int, bufs: dict) -> StageState:
    """Stage k's buffers, per part -> its StageState."""
    return StageState(**{p: self.layouts[p].unpack(k, bufs[p]) for p in PARTS})

  @functools.cached_property
  def _pack_fns(self):
    pack = lambda k: lambda stage: self.pack_stage(k, stage)
    return [jax.jit(pack(k), out_shardings=self.replicated[k]) for k in range(self.K)]

  @functools.cached_property
  def _unpack_fns(self):
    unpack = lambda k: lambda bufs: self.unpack_stage(k, bufs)
    return [jax.jit(unpack(k), out_shardings=self.replicated[k]) for k in range(self.K)]

  def pack(self, st: TrainState) -> PackedState:
    """TrainState (any placement) -> PackedState; stage k is packed on its own devices.

    With a split table, stage 1's table, moments and optimizer counts are either `Shards`
    (a restore onto `state_target`: piece k already on stage k's devices, on any number of
    processes) or whole arrays, cut on their devices and moved to each stage's (one process).
    """
    put = lambda x: jax.device_put(x, self.everywhere)  # A no-op for this executor's states.
    rows = [self.pack_row(k, stage) for k, stage in enumerate(st.stages)]
    vocab = self.vocab_pieces(st.stages[0]) if self.vocab else None
    return self.stack_rows(put(st.step), put(st.rng), rows, vocab)

  def pack_row(self, k: int, stage: StageState) -> dict:
    """Stage k's StageState (any placement) -> its buffers on its own devices."""
    if k == 0 and self.vocab:
      stage = self.vocab.slim(stage)  # Shards give their stage-1 piece; the table goes.
    return self._pack_fns[k](jax.device_put(stage, self.replicated[k]))

  def vocab_pieces(self, stage: StageState) -> list[dict]:
    """Every stage's piece of stage 1's split table, each on its stage's devices."""
    leaves = jax.tree.leaves(stage, is_leaf=lambda x: isinstance(x, Shards))
    if any(isinstance(x, Shards) for x in leaves):  # Restored: each piece where it belongs.
      table = jax.tree.leaves(stage.params, is_leaf=lambda x: isinstance(x, Shards))
      opt = jax.tree.leaves(stage.opt_state, is_leaf=lambda x: isinstance(x, Shards))
      of_kind = lambda kind, k: tuple(
        x.pieces[k] for x, c in zip(opt, self.vocab.opt_kinds) if c == kind
      )
      return [
        {
          "table": table[self.vocab.index].pieces[k],
          "moments": of_kind(vocab_lib.TABLE, k),
          "other": of_kind(vocab_lib.OTHER, k),
        }
        for k in range(self.K)
      ]
    if jax.process_count() > 1:
      raise ValueError(
        "A whole stage-1 state cannot be split over the stages of several processes (its "
        "table would have to cross processes); restore onto SpmdExecutor.state_target or "
        "init with SpmdExecutor.init_state."
      )
    cut = [jax.jit(lambda s, k=k: self.vocab.piece(s, k)) for k in range(self.K)]
    here = jax.device_put(stage, self.replicated[0])
    return [jax.device_put(cut[k](here), self.replicated[k]) for k in range(self.K)]

  def stack_rows(
    self,
    step: jax.Array,
    rng: jax.Array,
    rows: Sequence[dict],
    vocab: Sequence[dict] | None = None,
  ) -> PackedState:
    """Every stage's buffers (`pack_row`), and pieces of a split table (`vocab_pieces`) ->
    the PackedState, each row left where it is."""

    def stack(*per_stage):  # One leaf of every stage's buffers -> [K, ...] over 'stage'.
      shards = [s.data[None] for x in per_stage for s in x.addressable_shards]
      shape = (self.K, *per_stage[0].shape)
      return jax.make_array_from_single_device_arrays(
        shape, self.rows, shards, dtype=per_stage[0].dtype
      )

    pieces = jax.tree.map(stack, *vocab) if vocab else {}
    return PackedState(step=step, rng=rng, vocab=pieces, **jax.tree.map(stack, *rows))

  def unpack(self, ps: PackedState) -> TrainState:
    """PackedState -> the TrainState every executor uses, stage k on stage k's devices
    (nothing crosses between stages; a process gets no shards of stages it does not hold).
    A split table is joined on stage 1's devices, through the host: one process only."""
    stages = []
    for k in range(self.K):

      def row(arr, k=k):  # Stage k's row of a [K, ...] array, on its devices.
        shards = [s.data[0] for s in arr.addressable_shards if s.device in self.own[k]]
        # dtype given: on a process that holds none of stage k's devices, shards is empty.
        return jax.make_array_from_single_device_arrays(
          arr.shape[1:], self.replicated[k], shards, dtype=arr.dtype
        )

      stages.append(self._unpack_fns[k]({p: jax.tree.map(row, getattr(ps, p)) for p in PARTS}))
    if self.vocab:
      if jax.process_count() > 1:
        raise ValueError(
          "unpack_state cannot join a token table split over several processes' devices; a "
          "checkpoint writes it without joining (SpmdExecutor.checkpoint_state)."
        )
      whole = lambda arr: jax.device_put(self._whole_rows(arr), self.replicated[0])
      vocab = ps.vocab
      stages[0] = self.vocab.join(
        stages[0], whole(vocab["table"]), [whole(m) for m in vocab["moments"]]
      )
    # Step and key stay on every device of the mesh (each process can read them).
    return TrainState(step=ps.step, rng=ps.rng, stages=tuple(stages))

  def _rows_of(self, arr: jax.Array) -> dict[int, np.ndarray]:
    """{stage k: a host copy of row k} for the rows held on this process (one shard each)."""
    out = {}
    for s in arr.addressable_shards:
      k = next(k for k in range(self.K) if s.device in self.own[k])
      if k not in out:
        out[k] = np.array(s.data)[0]
    return out

  def _whole_rows(self, arr: jax.Array) -> np.ndarray:
    """A split table's [K, rows, ...] array -> its first `vocab` rows, on the host."""
    rows = self._rows_of(arr)
    return np.concatenate([rows[k] for k in range(self.K)])[: self.vocab.vocab]

  def host_state(self, ps: PackedState) -> TrainState:
    """PackedState -> the TrainState a checkpoint writes, as `HostLeaf`s: stage k's leaves
    hold host copies on the process of stage k's first device (one copy of each of its
    buffers, the leaves views into it) and None elsewhere; the step and key are written by
    process 0; a split table's rows by the processes that hold them (`HostLeaf.pieces`).
    Nothing is built on any device, so a save costs each process a host copy of its own
    stages, as saving any other executor's state does."""
    me = jax.process_index()
    host = lambda x: HostLeaf(x.shape, x.dtype, x)
    absent = lambda a: HostLeaf(tuple(a.shape), np.dtype(a.dtype))
    stages = []
    for k in range(self.K):
      writer = self.mesh.devices[k][0]
      if writer.process_index != me:
        stages.append(jax.tree.map(absent, self.held[k]))
        continue

      def row(arr, writer=writer):  # A host copy of row k, from the writer device's shard.
        (shard,) = [s for s in arr.addressable_shards if s.device == writer]
        return np.array(shard.data)[0]

      bufs = {p: jax.tree.map(row, getattr(ps, p)) for p in PARTS}
      stages.append(jax.tree.map(host, self.unpack_stage(k, bufs)))
    if self.vocab:
      stages[0] = self._host_table(stages[0], ps.vocab)
    scalar = lambda x: host(np.array(x.addressable_shards[0].data)) if me == 0 else absent(x)
    return TrainState(step=scalar(ps.step), rng=scalar(ps.rng), stages=tuple(stages))

  def _host_table(self, slim: StageState, vocab: dict) -> StageState:
    """Stage 1's HostLeafs with its split table and moments as the pieces this process
    writes: stage k's rows from the process of stage k's first device."""
    v = self.vocab
    mine = [
      k for k in range(self.K) if self.mesh.devices[k][0].process_index == jax.process_index()
    ]

    def leaf(arr):
      rows = self._rows_of(arr)
      pieces = tuple(
        (v.bounds(k)[0], rows[k][: v.bounds(k)[1] - v.bounds(k)[0]])
        for k in mine
        if v.bounds(k)[1] > v.bounds(k)[0]
      )
      return HostLeaf((v.vocab, v.width), v.dtype, pieces=pieces, chunk_rows=v.rows)

    return v.join(slim, leaf(vocab["table"]), [leaf(m) for m in vocab["moments"]])

  def target(self, abstract: TrainState) -> TrainState:
    """HostLeaf restore targets for a TrainState of abstract arrays with shardings: a split
    table's leaves (and the optimizer counts each piece keeps a copy of) come back as
    `Shards`, piece k on stage k's devices (`HostLeaf.pieces`)."""
    target = HostLeaf.target(abstract)
    if not self.vocab:
      return target
    v = self.vocab
    split = lambda a: HostLeaf(
      tuple(a.shape),
      np.dtype(a.dtype),
      pieces=tuple((*v.bounds(k), v.rows, self.replicated[k]) for k in range(self.K)),
    )
    copies = lambda a: HostLeaf(
      tuple(a.shape),
      np.dtype(a.dtype),
      pieces=tuple((None, None, None, self.replicated[k]) for k in range(self.K)),
    )
    first = target.stages[0]
    params = jax.tree.leaves(first.params)
    params[v.index] = split(params[v.index])
    opt = jax.tree.leaves(first.opt_state)
    kinds = v.opt_kinds
    opt = [
      split(x) if c == vocab_lib.TABLE else copies(x) if c == vocab_lib.OTHER else x
      for x, c in zip(opt, kinds)
    ]
    first = first.replace(
      params=jax.tree.unflatten(v.params_def, params),
      opt_state=jax.tree.unflatten(v.opt_def, opt),
    )
    return target.replace(stages=(first, *target.stages[1:]))
