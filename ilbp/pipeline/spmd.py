"""The SPMD executor: one jitted program over a ('stage', 'data') mesh of K x D devices.

Inside one `jax.jit`, a `shard_map` that is manual over 'stage' runs a `lax.scan` over the
ticks of a static table (`ilbp.pipeline.ticks`, laid out from `schedule.py`'s ops,
dependencies and policy). At each tick every stage `lax.switch`es on its table entry to one
branch per kind of op group — F(k, m) with H(k, m) and the B ops that need only its own loss;
or one other B op; U joining the group of its last dependency — and then every boundary's
message moves one hop with its own `ppermute` (activations up, cotangents down, each the size
of that boundary's activation, after an `optimization_barrier`). The branches call the same
per-stage ops as the dataflow executor (`stage_ops`), so the routing rule lives once.

The 'data' axis is left to XLA's partitioner (shard_map's `axis_names={'stage'}`): each of a
stage's D devices holds 1/D of every microbatch, and the partitioner inserts the all-reduces
over 'data' — the gradient psum, and also BatchNorm's batch statistics and a token-weighted
loss's denominator, which a per-device manual split would get wrong (they must be those of
the whole microbatch, as in the fused executor).

State: stage k's parameters, statistics and optimizer state live in arrays with a leading K
axis sharded over 'stage', so row k sits only on stage k's D devices (`PackedState`). Leaves
every stage has alike (the Transformer's blocks, as many as the smallest stage holds, and their
optimizer moments) are stacked whole, without padding; the rest (a ResNet's stages, the
Transformer's embedding, heads, unembedding and extra blocks) in per-dtype flat buffers padded
to the widest stage (`flat.FlatLayout`). The trainer and checkpoints see the same `TrainState`
as every executor: `pack_state` / `unpack_state` convert, each stage on its own devices.
In-flight microbatches keep their stage *input* (in slots sized by the in-flight count); a B op that
waits for a cotangent from above recomputes the forward under `jax.vjp` (its BatchNorm
statistics are discarded: running averages move only on the forward). `steps_per_call`
optimizer steps run in one call, each stage applying its own update inside the scan; the
pipeline is empty at the start and end of each call. Evaluation is one program too
(`spmd_program.make_eval`: stage k's inference forward and head at tick k).

Several processes (a TPU slice, a GPU cluster): stages may sit on different hosts. Each process
feeds the data columns of the grid its devices hold (`placement.input_shard`; the input
pipelines load that shard), every array is made by a jitted program onto its sharding, the step
and dropout key live on every device, and for checkpoints `unpack_state` gathers each stage
onto every device of the mesh (orbax writes only arrays that span processes).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ilbp import interlock, placement, steps
from ilbp.pipeline import schedule as schedule_lib
from ilbp.pipeline import stage_ops, ticks
from ilbp.pipeline.flat import FlatLayout
from ilbp.staged import StagedModel
from ilbp.state import StageState, TrainState
from ilbp.strategy import Strategy

PyTree = Any
STAGE_AXIS = "stage"
_PARTS = ("params", "model_state", "opt_state")


def _compiler_options(platform: str) -> dict[str, Any] | None:
  """XLA options for the programs that hold the per-tick collectives.

  XLA:CPU's default instruction scheduler orders a program for concurrent execution; with it,
  calls of these programs were bimodal on a 2-core box (the same compiled resnet20 K = 2,
  M = 8 local program took ~170 or ~560 ms per step from call to call, the slow calls burning
  twice the CPU time). With the memory-optimized scheduler every call was fast, and global's
  faster too (WORKSPACE, SPMD section). Single-device programs (fused, dataflow) keep the
  default, which ran resnet20's 15-25 % faster. (`xla_cpu_scheduler_type` is the option XLA
  honours per program; the older boolean flag acts only process-wide, through XLA_FLAGS.)
  """
  if platform == "cpu":
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  return None


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


class SpmdExecutor:
  """One program over a ('stage', 'data') mesh (see module doc).

  Args:
    model, task, strategy, optimizer, schedule, input_spec: as for the dataflow executor.
    microbatches: M per optimizer step.
    continuous: no global flush between the steps of a call (global flushes regardless).
    data_parallel: D devices per stage.
    steps_per_call: optimizer steps one `train_steps` call runs in one scan.
    devices: the devices to use (default all); stage k gets devices k·D .. k·D + D - 1.

  Attributes:
    input_shard: `(index, count)`, the share of each batch this process feeds
      (`placement.input_shard`; the trainer builds the input pipeline with the same).
  """

  def __init__(
    self,
    model: StagedModel,
    task: Any,
    strategy: Strategy,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule | None,
    input_spec: jax.ShapeDtypeStruct,
    *,
    microbatches: int = 1,
    continuous: bool = True,
    data_parallel: int = 1,
    steps_per_call: int = 1,
    devices=None,
  ):
    self.model, self.task, self.optimizer, self._lr = model, task, optimizer, schedule
    self.K, self.M, self.D = model.num_stages, microbatches, data_parallel
    self.steps_per_call = steps_per_call
    grid = placement.stage_grid(self.K, self.D, devices)
    self.input_shard = placement.input_shard(grid)
    self.mesh = Mesh(grid, (STAGE_AXIS, placement.DATA_AXIS))
    self.meshes = [placement.data_mesh(row) for row in grid]
    self._everywhere = NamedSharding(self.mesh, P())  # The step and dropout key.
    self._compiler_options = _compiler_options(grid.flat[0].platform)
    self._multihost = jax.process_count() > 1
    self.replicated = [placement.replicated(m) for m in self.meshes]
    self.schedule = schedule_lib.build(strategy, self.K, microbatches, continuous)
    self.specs = model.input_specs(input_spec)
    abstract = stage_ops.abstract_stages(model, optimizer, self.specs)
    self.layouts = {p: FlatLayout([getattr(s, p) for s in abstract]) for p in _PARTS}
    self._abstract = abstract
    self._users = interlock.loss_users(strategy, self.K)
    inner = self.specs[1:]  # a_1 .. a_{K-1}: what crosses a boundary (and is stored).
    if len({s.dtype for s in inner}) > 1:
      raise ValueError(f"Stage outputs of different dtypes ({inner}); spmd needs one dtype.")
    self._act_dtype = inner[0].dtype if inner else jnp.float32
    self._sizes = [int(np.prod(s.shape[1:])) for s in self.specs]
    self._features = max(self._sizes[1:], default=1)
    self._programs: dict = {}
    self._eval_programs: dict = {}
    self.description = (
      f"spmd: one program over a ('stage', 'data') mesh of {self.K} x {self.D} devices, "
      f"{microbatches} microbatch(es), {steps_per_call} step(s) per call, "
      f"{'continuous' if continuous else 'flushed every step'}"
    )

  # --- State ------------------------------------------------------------------------------

  def init_state(self, rng: jax.Array) -> PackedState:
    """A fresh state: stage k is created on stage k's devices, then packed there."""
    return self.pack_state(
      stage_ops.init_on_stages(
        self.model, self.optimizer, self.specs, self.replicated, rng, self._everywhere
      )
    )

  def state_target(self, rng: jax.Array) -> TrainState:
    """The abstract TrainState a checkpoint restores onto: stage k on its devices (on several
    processes: on every device, as `unpack_state` gives it for saving)."""
    shardings = [self._everywhere] * self.K if self._multihost else self.replicated
    return stage_ops.target_on_stages(
      self.model, self.optimizer, self.specs, shardings, rng, self._everywhere
    )

  def _pack_stage(self, k: int, stage: StageState) -> dict:
    """Stage k's StageState -> its buffers, per part (`flat.FlatLayout.pack`)."""
    return {p: self.layouts[p].pack(k, getattr(stage, p)) for p in _PARTS}

  def _unpack_stage(self, k: int, bufs: dict) -> StageState:
    """Stage k's buffers, per part -> its StageState."""
    return StageState(**{p: self.layouts[p].unpack(k, bufs[p]) for p in _PARTS})

  @functools.cached_property
  def _global_fns(self):
    """(gather, pack) over the whole mesh, for several processes: orbax writes only arrays
    that span processes, and a stage whose devices sit on one host is host-local there."""

    def gather(bufs):
      row = lambda k: jax.tree.map(lambda b: b[k], bufs)
      return tuple(self._unpack_stage(k, row(k)) for k in range(self.K))

    def pack(stages):
      rows = [self._pack_stage(k, stage) for k, stage in enumerate(stages)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)

    row = NamedSharding(self.mesh, P(STAGE_AXIS))
    return jax.jit(gather, out_shardings=self._everywhere), jax.jit(pack, out_shardings=row)

  @functools.cached_property
  def _pack_fns(self):
    pack = lambda k: lambda stage: self._pack_stage(k, stage)
    return [jax.jit(pack(k), out_shardings=self.replicated[k]) for k in range(self.K)]

  @functools.cached_property
  def _unpack_fns(self):
    unpack = lambda k: lambda bufs: self._unpack_stage(k, bufs)
    return [jax.jit(unpack(k), out_shardings=self.replicated[k]) for k in range(self.K)]

  def pack_state(self, st: TrainState) -> PackedState:
    """TrainState (any placement) -> PackedState; stage k is packed on its own devices."""
    put = lambda x: jax.device_put(x, self._everywhere)  # A no-op for this executor's states.
    leaf = jax.tree.leaves(st.stages[0])[0]
    if self._multihost and leaf.sharding.device_set == set(self.mesh.devices.flat):
      # Restored on several processes (`state_target`): packed by one program over the mesh.
      return PackedState(step=put(st.step), rng=put(st.rng), **self._global_fns[1](st.stages))
    rows = [
      self._pack_fns[k](jax.device_put(st.stages[k], self.replicated[k])) for k in range(self.K)
    ]
    sharding = NamedSharding(self.mesh, P(STAGE_AXIS))

    def stack(*per_stage):  # One leaf of every stage's buffers -> [K, ...] over 'stage'.
      shards = [s.data[None] for x in per_stage for s in x.addressable_shards]
      shape = (self.K, *per_stage[0].shape)
      return jax.make_array_from_single_device_arrays(
        shape, sharding, shards, dtype=per_stage[0].dtype
      )

    return PackedState(step=put(st.step), rng=put(st.rng), **jax.tree.map(stack, *rows))

  def unpack_state(self, ps: PackedState) -> TrainState:
    """PackedState -> the TrainState every executor and checkpoint uses (stage k on stage k's
    devices; nothing crosses between stages). On several processes every stage's state is
    gathered onto every device of the mesh instead (for orbax, which writes only arrays that
    span processes): a save then holds the whole train state on each device for a moment."""
    if self._multihost:
      stages = self._global_fns[0]({p: getattr(ps, p) for p in _PARTS})
      return TrainState(step=ps.step, rng=ps.rng, stages=stages)
    stages = []
    for k in range(self.K):
      own = set(self.meshes[k].devices.flat)

      def row(arr, k=k, own=own):  # Stage k's row of a [K, ...] array, on its devices.
        shards = [s.data[0] for s in arr.addressable_shards if s.device in own]
        # dtype given: on a process that holds none of stage k's devices, shards is empty.
        return jax.make_array_from_single_device_arrays(
          arr.shape[1:], self.replicated[k], shards, dtype=arr.dtype
        )

      stages.append(self._unpack_fns[k]({p: jax.tree.map(row, getattr(ps, p)) for p in _PARTS}))
    # Step and key stay on every device of the mesh (each process can read them).
    return TrainState(step=ps.step, rng=ps.rng, stages=tuple(stages))

  def padding(self, batch_size: int, steps_per_call: int | None = None) -> dict:
    """What padding costs, in bytes per device: per stage, the flat state buffers' zeros
    (params, statistics, optimizer state, gradient sums; the stacked leaves, counted apart,
    have none) and the stored-input and cotangent slots' zeros; per boundary, the message
    (padded to nothing: each boundary has its own size)."""
    table = ticks.build(self.schedule, steps_per_call or self.steps_per_call)
    item = np.dtype(self._act_dtype).itemsize
    rows = batch_size // (self.M * self.D)
    layouts = [*self.layouts.values(), self.layouts["params"]]  # + gradient sums
    slots = table.x_slots + table.cot_slots + 2  # + one spare each
    return {
      "state_bytes_per_stage": sum(lay.bytes() for lay in layouts),
      "stacked_bytes_per_stage": sum(lay.stacked_bytes() for lay in layouts),
      "state_padding_bytes_per_stage": [
        sum(lay.padding_bytes(k) for lay in layouts) for k in range(self.K)
      ],
      "slots": {"inputs": table.x_slots, "cotangents": table.cot_slots},
      "slot_bytes_per_stage": slots * rows * self._features * item,
      "slot_padding_bytes_per_stage": [
        slots * rows * (self._features - (self._sizes[k] if k else self._features)) * item
        for k in range(self.K)
      ],
      "message_bytes_per_boundary": [rows * self._sizes[b + 1] * item for b in range(self.K - 1)],
      "message_padding_bytes_per_boundary": [0] * (self.K - 1),
      "ticks_per_call": table.num_ticks,
    }

  # --- Batches ----------------------------------------------------------------------------

  def put_batch(self, batch: dict) -> tuple:
    """One step's numpy batch -> (inputs, targets) as [1, M, B/M, ...], split over 'data'."""
    return self.put_batches([batch])

  def put_batches(self, batches: list[dict]) -> tuple:
    """S steps' numpy batches -> (inputs, targets) as [S, M, B/M, ...] on the mesh, each
    microbatch split over 'data' (replicated over 'stage')."""
    cut = lambda b, f: steps.split_microbatches(f(b), self.M)
    stack = lambda f: jax.tree.map(lambda *xs: np.stack(xs), *[cut(b, f) for b in batches])
    sharding = NamedSharding(self.mesh, P(None, None, placement.DATA_AXIS))
    place = lambda f: placement.put_process_local(stack(f), sharding)
    return place(self.task.inputs), place(self.task.targets)

  # --- Steps ------------------------------------------------------------------------------

  def train_step(self, st: PackedState, batch: tuple) -> tuple[PackedState, dict]:
    """One optimizer step (a one-step call); metrics are scalars."""
    return self.train_steps(st, batch)

  def train_steps(self, st: PackedState, batch: tuple) -> tuple[PackedState, dict]:
    """As many optimizer steps as `batch` holds (`put_batches`), in one call.

    Returns:
      (new state, metrics): each metric has a leading axis of one value per step, except for
      a one-step call, whose metrics are scalars.
    """
    inputs, targets = batch
    return self._program(inputs, targets)(st, inputs, targets)

  def eval_step(self, st: PackedState, batch: dict) -> dict:
    """Every head's evaluation sums of this process's share of an eval batch, from one
    program over the mesh (`spmd_program.make_eval`: stage k on its own devices)."""
    inputs = placement.shard_batch(self.task.inputs(batch), self.mesh)
    targets = placement.shard_batch(self.task.targets(batch), self.mesh)
    rows = jax.tree.leaves(inputs)[0].shape[0]
    if rows not in self._eval_programs:
      from ilbp.pipeline import spmd_program

      fn, names = spmd_program.make_eval(self, inputs, targets)
      # Out replicated: every process reads every stage's sums.
      program = jax.jit(fn, out_shardings=self._everywhere, compiler_options=self._compiler_options)
      self._eval_programs[rows] = (program, names)
    fn, names = self._eval_programs[rows]
    out = fn(st.params, st.model_state, inputs, targets)
    return steps.named_sums([{n: out[k, i] for i, n in enumerate(names)} for k in range(self.K)])

  def lower(self, st: PackedState, batch: tuple):
    """The jitted program for `batch`'s step count, lowered (for HLO and memory analysis)."""
    inputs, targets = batch
    return self._program(inputs, targets).lower(st, inputs, targets)

  # --- The program ------------------------------------------------------------------------

  def _program(self, inputs, targets):
    """The jitted program for calls of as many steps as `inputs` holds (built once)."""
    num = jax.tree.leaves(inputs)[0].shape[0]
    if num not in self._programs:
      self._programs[num] = self._build(num, inputs, targets)
    return self._programs[num]

  def _build(self, num_steps: int, inputs, targets):
    """The jitted program for calls of `num_steps` optimizer steps."""
    from ilbp.pipeline import spmd_program  # The tick body lives apart (module size).

    table = ticks.build(self.schedule, num_steps)
    fn = spmd_program.make(self, table, num_steps, inputs, targets)
    row = NamedSharding(self.mesh, P(STAGE_AXIS))
    everywhere = NamedSharding(self.mesh, P())
    state_sharding = PackedState(
      step=everywhere,
      rng=everywhere,
      **{p: jax.tree.map(lambda _: row, self.layouts[p].abstract()) for p in _PARTS},
    )
    data = NamedSharding(self.mesh, P(None, None, placement.DATA_AXIS))
    return jax.jit(
      fn,
      in_shardings=(state_sharding, data, data),
      out_shardings=(state_sharding, everywhere),
      donate_argnums=0,
      compiler_options=self._compiler_options,
    )
