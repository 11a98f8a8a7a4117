"""The SPMD executor's state: every stage's StageState packed on a 'stage' axis, and back.

Stage k's parameters, statistics and optimizer state live in arrays with a leading K axis
sharded over 'stage', so row k sits only on stage k's D devices (`PackedState`). Leaves every
stage has alike are stacked whole; the rest sit in per-dtype flat buffers padded to the widest
stage (`flat.FlatLayout`). `Packing` converts between that and the `TrainState` every executor
and checkpoint uses, each stage on its own devices: nothing of stage k is ever built on a
device that does not hold stage k. A checkpoint gets host copies (`host_state`), each stage's
written by the process that holds it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ilbp.execution.spmd.flat import FlatLayout
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
  """

  step: jax.Array
  rng: jax.Array
  params: dict
  model_state: dict
  opt_state: dict


class Packing:
  """StageStates <-> PackedState on a ('stage', 'data') mesh.

  Args:
    abstract: every stage's StageState as shapes and dtypes (`stage.abstract_stages`).
    mesh: the ('stage', 'data') mesh.
    meshes: stage k's ('data',) mesh (row k of `mesh`).
  """

  def __init__(self, abstract: Sequence[StageState], mesh: Mesh, meshes: Sequence[Mesh]):
    self.K = len(abstract)
    self.abstract = tuple(abstract)
    self.mesh = mesh
    self.layouts = {p: FlatLayout([getattr(s, p) for s in abstract]) for p in PARTS}
    self.replicated = [NamedSharding(m, P()) for m in meshes]
    self.own = [set(m.devices.flat) for m in meshes]
    self.everywhere = NamedSharding(mesh, P())  # The step and dropout key.
    self.rows = NamedSharding(mesh, P(STAGE_AXIS))

  def sharding(self) -> PackedState:
    """The PackedState of shardings (a program's in and out shardings)."""
    parts = {p: jax.tree.map(lambda _: self.rows, self.layouts[p].abstract()) for p in PARTS}
    return PackedState(step=self.everywhere, rng=self.everywhere, **parts)

  def pack_stage(self, k: int, stage: StageState) -> dict:
    """Stage k's StageState -> its buffers, per part (`flat.FlatLayout.pack`)."""
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
    """TrainState (any placement) -> PackedState; stage k is packed on its own devices."""
    put = lambda x: jax.device_put(x, self.everywhere)  # A no-op for this executor's states.
    rows = [self.pack_row(k, stage) for k, stage in enumerate(st.stages)]
    return self.stack_rows(put(st.step), put(st.rng), rows)

  def pack_row(self, k: int, stage: StageState) -> dict:
    """Stage k's StageState (any placement) -> its buffers on its own devices."""
    return self._pack_fns[k](jax.device_put(stage, self.replicated[k]))

  def stack_rows(self, step: jax.Array, rng: jax.Array, rows: Sequence[dict]) -> PackedState:
    """Every stage's buffers (`pack_row`) -> the PackedState, each row left where it is."""

    def stack(*per_stage):  # One leaf of every stage's buffers -> [K, ...] over 'stage'.
      shards = [s.data[None] for x in per_stage for s in x.addressable_shards]
      shape = (self.K, *per_stage[0].shape)
      return jax.make_array_from_single_device_arrays(
        shape, self.rows, shards, dtype=per_stage[0].dtype
      )

    return PackedState(step=step, rng=rng, **jax.tree.map(stack, *rows))

  def unpack(self, ps: PackedState) -> TrainState:
    """PackedState -> the TrainState every executor uses, stage k on stage k's devices
    (nothing crosses between stages; a process gets no shards of stages it does not hold)."""
    stages = []
    for k in range(self.K):

      def row(arr, k=k):  # Stage k's row of a [K, ...] array, on its devices.
        shards = [s.data[0] for s in arr.addressable_shards if s.device in self.own[k]]
        # dtype given: on a process that holds none of stage k's devices, shards is empty.
        return jax.make_array_from_single_device_arrays(
          arr.shape[1:], self.replicated[k], shards, dtype=arr.dtype
        )

      stages.append(self._unpack_fns[k]({p: jax.tree.map(row, getattr(ps, p)) for p in PARTS}))
    # Step and key stay on every device of the mesh (each process can read them).
    return TrainState(step=ps.step, rng=ps.rng, stages=tuple(stages))

  def host_state(self, ps: PackedState) -> TrainState:
    """PackedState -> the TrainState a checkpoint writes, as `HostLeaf`s: stage k's leaves
    hold host copies on the process of stage k's first device (one copy of each of its
    buffers, the leaves views into it) and None elsewhere; the step and key are written by
    process 0. Nothing is built on any device, so a save costs each process a host copy of
    its own stages, as saving any other executor's state does."""
    me = jax.process_index()
    host = lambda x: HostLeaf(x.shape, x.dtype, x)
    absent = lambda a: HostLeaf(tuple(a.shape), np.dtype(a.dtype))
    stages = []
    for k in range(self.K):
      writer = self.mesh.devices[k][0]
      if writer.process_index != me:
        stages.append(jax.tree.map(absent, self.abstract[k]))
        continue

      def row(arr, writer=writer):  # A host copy of row k, from the writer device's shard.
        (shard,) = [s for s in arr.addressable_shards if s.device == writer]
        return np.array(shard.data)[0]

      bufs = {p: jax.tree.map(row, getattr(ps, p)) for p in PARTS}
      stages.append(jax.tree.map(host, self.unpack_stage(k, bufs)))
    scalar = lambda x: host(np.array(x.addressable_shards[0].data)) if me == 0 else absent(x)
    return TrainState(step=scalar(ps.step), rng=scalar(ps.rng), stages=tuple(stages))
