"""The SPMD executor: one jitted program over a ('stage', 'data') mesh of K x D devices.

Inside one `jax.jit`, a `shard_map` that is manual over 'stage' runs a `lax.scan` over the
ticks of a static table (`ticks.py`, laid out from `ilbp.execution.schedule`'s ops,
dependencies and policy). At each tick every stage `lax.switch`es on its table entry to one
branch per kind of tick — a B group (one B op that waits for a cotangent from above) and/or an
F group of another microbatch (F(k, m) with H(k, m) and the B ops that need only its own
loss), so that in the steady state a stage runs a backward beside a forward every tick; U
after the groups of the tick of its last dependency — and then every boundary's
message moves one hop with its own `ppermute` (activations up, cotangents down, each the size
of that boundary's activation, after an `optimization_barrier`). The branches call the same
per-stage layer as the other executors (`ilbp.execution.stage`), so the routing rule lives
once.

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
as every executor: `pack_state` / `unpack_state` convert, each stage on its own devices
(`packing.py`).
The pipeline schedule is any of `schedule.SCHEDULES` (gpipe, 1f1b, zb), laid out on ticks.
In-flight microbatches keep their stage *input* and, by default, the VJP residuals of their
forward (`residuals.py`; slots sized by the in-flight count), so a B op that waits for a
cotangent from above runs the backward alone, as the dataflow executor does. With `remat` it
recomputes the forward under `jax.vjp` instead (holding the input only; its BatchNorm
statistics are discarded: running averages move only on the forward). `steps_per_call`
optimizer steps run in one call, each stage applying its own update inside the scan; the
pipeline is empty at the start and end of each call. Evaluation is one program too
(`program.make_eval`: stage k's inference forward and head at tick k).

Several processes (a TPU slice, a GPU cluster): stages may sit on different hosts. Each process
feeds the data columns of the grid its devices hold (`placement.input_shard`; the input
pipelines load that shard), every array is made by a jitted program onto its sharding, the step
and dropout key live on every device, and a checkpoint is written and read stage by stage:
the process that holds a stage writes host copies of its leaves (`checkpoint_state`), and a
restore reads each stage straight onto its devices (`state_target`), with nothing gathered.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ilbp import placement
from ilbp.execution import schedule as schedule_lib
from ilbp.execution.memory import DeviceMemory
from ilbp.execution.spmd import program, ticks
from ilbp.execution.spmd.packing import STAGE_AXIS, PackedState, Packing
from ilbp.execution.spmd.vocab import VocabSplit
from ilbp.execution.stage import (
  abstract_stages,
  init_scalars_on,
  init_stage_on,
  make_stages,
  split_microbatches,
  target_on_stages,
)
from ilbp.staged import StagedModel
from ilbp.state import TrainState
from ilbp.strategy import Strategy


def _compiler_options(platform: str) -> dict[str, Any] | None:
  """XLA options for the programs that hold the per-tick collectives.

  XLA:CPU's default instruction scheduler orders a program for concurrent execution; with it,
  calls of these programs were bimodal on a 2-core box (the same compiled resnet20 K = 2,
  M = 8 local program took ~170 or ~560 ms per step from call to call, the slow calls burning
  twice the CPU time). With the memory-optimized scheduler every call was fast, and global's
  faster too (WORKSPACE, SPMD section). Single-device programs (fused, dataflow) keep the
  default, which ran resnet20's 15-25 % faster. (`xla_cpu_scheduler_type` is the option XLA
  honours per program; the older boolean flag acts only process-wide, through XLA_FLAGS.)

  Copy insertion with region analysis: without it XLA:CPU gave the update's `lax.switch` (U
  on one tick, nothing on the others) an output buffer apart from its operands, so a call held
  a second copy of the stage's parameters and optimizer state. For issue 22's Transformer
  (d_model 1024, d_ff 8192, two stages) XLA's memory analysis per device: temporaries 433.5 MB
  without it, 175.3 MB with it, beside 258.2 MB of state (WORKSPACE, 2026-12-05).
  """
  if platform == "cpu":
    return {
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
      "xla_cpu_copy_insertion_use_region_analysis": True,
    }
  return None


class SpmdExecutor:
  """One program over a ('stage', 'data') mesh (see module doc).

  Args:
    model, task, strategy, optimizer, schedule, input_spec: as for the dataflow executor.
    microbatches: M per optimizer step.
    continuous: no global flush between the steps of a call (global flushes regardless).
    data_parallel: D devices per stage.
    steps_per_call: optimizer steps one `train_steps` call runs in one scan.
    devices: the devices to use (default all); stage k gets devices k·D .. k·D + D - 1.
    vocab_parallel: split stage 1's token table by rows over the K stages (`vocab.py`) when
      the model names one (`StagedModel.info["embedding"]`) and K > 1.
    pipeline: the pipeline schedule, one of `schedule.SCHEDULES`.
    remat: a B op that waits for a cotangent from above re-runs its forward (less memory:
      only the stage input is held) instead of reading the residuals the forward stored.
    residuals: what each stage's forward keeps for its backward, and so what a slot stores
      without remat (`stage.RESIDUALS`).

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
    vocab_parallel: bool = True,
    pipeline: str = "1f1b",
    remat: bool = False,
    residuals: str = "all",
  ):
    self.task = task
    self.K, self.M, self.D = model.num_stages, microbatches, data_parallel
    self.steps_per_call = steps_per_call
    grid = placement.stage_grid(self.K, self.D, devices)
    self.input_shard = placement.input_shard(grid)
    self.mesh = Mesh(grid, (STAGE_AXIS, placement.DATA_AXIS))
    self.meshes = [placement.data_mesh(row) for row in grid]
    self.replicated = [placement.replicated(m) for m in self.meshes]
    self._compiler_options = _compiler_options(grid.flat[0].platform)
    self.stages = make_stages(model, task, strategy, optimizer, schedule, microbatches, residuals)
    self.schedule = schedule_lib.build(
      strategy, self.K, microbatches, continuous, schedule=pipeline
    )
    self.remat = remat
    self.specs = model.input_specs(input_spec)
    abstract = abstract_stages(self.stages, self.specs)
    table = model.info.get("embedding")
    self.vocab = (
      VocabSplit(abstract[0], table, self.K) if vocab_parallel and table and self.K > 1 else None
    )
    self.packing = Packing(abstract, self.mesh, self.meshes, self.vocab)
    self.spec = program.ProgramSpec(
      stages=self.stages,
      schedule=self.schedule,
      layouts=self.packing.layouts,
      abstract=self.packing.held,
      specs=tuple(self.specs),
      mesh=self.mesh,
      vocab=self.vocab,
    )
    self._programs: dict = {}
    self._eval_programs: dict = {}
    self.description = (
      f"spmd: one program over a ('stage', 'data') mesh of {self.K} x {self.D} devices, "
      f"{microbatches} microbatch(es), {steps_per_call} step(s) per call, "
      f"{'continuous' if continuous else 'flushed every step'}, {pipeline}, "
      f"{'remat (B re-runs F)' if remat else 'residuals stored'}, residuals={residuals}"
      + (
        f", token table split over the stages ({self.vocab.rows} of {self.vocab.vocab} rows each)"
        if self.vocab
        else ""
      )
    )

  # --- State ------------------------------------------------------------------------------

  def init_state(self, rng: jax.Array) -> PackedState:
    """A fresh state: stage k is created on stage k's devices and packed there, one stage at
    a time (a device never holds its stage twice over, as packing a whole TrainState would).
    A split table: each stage's piece is made on its own devices (the slice of stage 1's
    initial state; XLA makes the whole table inside that program and keeps the rows)."""
    rows = []
    for k, stage in enumerate(self.stages):
      if k == 0 and self.vocab:
        slim = lambda st: self.packing.pack_stage(0, st)
        rows.append(init_stage_on(stage, self.specs[0], self.replicated[0], rng, slim))
      else:
        init = init_stage_on(stage, self.specs[k], self.replicated[k], rng)
        rows.append(self.packing.pack_row(k, init))
    pieces = None
    if self.vocab:
      piece = lambda k: lambda st: self.vocab.piece(st, k)
      at = lambda k: (self.stages[0], self.specs[0], self.replicated[k], rng, piece(k))
      pieces = [init_stage_on(*at(k)) for k in range(self.K)]
    step, dropout_rng = init_scalars_on(self.packing.everywhere, rng)
    return self.packing.stack_rows(step, dropout_rng, rows, pieces)

  def state_target(self, rng: jax.Array) -> TrainState:
    """The TrainState a checkpoint restores onto, as `HostLeaf` targets: stage k read by the
    processes that hold its devices, straight onto them (on any number of processes)."""
    everywhere = self.packing.everywhere
    abstract = target_on_stages(self.stages, self.specs, self.replicated, rng, everywhere)
    return self.packing.target(abstract)

  def pack_state(self, st: TrainState) -> PackedState:
    """TrainState (any placement) -> PackedState (`Packing.pack`)."""
    return self.packing.pack(st)

  def unpack_state(self, ps: PackedState) -> TrainState:
    """PackedState -> TrainState (`Packing.unpack`)."""
    return self.packing.unpack(ps)

  def checkpoint_state(self, ps: PackedState) -> TrainState:
    """PackedState -> what a checkpoint writes: host copies, stage by stage
    (`Packing.host_state`)."""
    return self.packing.host_state(ps)

  def padding(self, batch_size: int, steps_per_call: int | None = None) -> dict:
    """What padding costs, in bytes per device: per stage, the flat state buffers' zeros
    (params, statistics, optimizer state, gradient sums; the stacked leaves, counted apart,
    have none), a split table's zero rows, and the stored-input, cotangent and residual
    slots' zeros; per boundary, the message (padded to nothing: each boundary has its own
    size)."""
    table = self.table(steps_per_call or self.steps_per_call)
    spec, vocab = self.spec, self.vocab
    item = np.dtype(spec.act_dtype).itemsize
    rows = batch_size // (self.M * self.D)
    layouts = [*spec.layouts.values(), spec.layouts["params"]]  # + gradient sums
    slots = table.x_slots + table.cot_slots + 2  # + one spare each
    features, sizes = spec.features, spec.sizes
    res = program.stored_residuals(spec, table, rows)
    res_slots = table.res_slots + int(table.res_spare) if res.widths else 0
    out = program.output_spec(spec, rows)
    out_size, out_item = int(np.prod(out.shape[1:])), np.dtype(out.dtype).itemsize
    return {
      "state_bytes_per_stage": sum(lay.bytes() for lay in layouts)
      + (vocab.piece_bytes() if vocab else 0),
      "stacked_bytes_per_stage": sum(lay.stacked_bytes() for lay in layouts),
      "vocab_bytes_per_stage": vocab.piece_bytes() if vocab else 0,
      "state_padding_bytes_per_stage": [
        sum(lay.padding_bytes(k) for lay in layouts) + (vocab.padding_bytes(k) if vocab else 0)
        for k in range(self.K)
      ],
      "slots": {
        "inputs": table.x_slots,
        "cotangents": table.cot_slots,
        "residuals": table.res_slots,
      },
      "slot_bytes_per_stage": slots * rows * features * item,
      "slot_padding_bytes_per_stage": [
        slots * rows * (features - (sizes[k] if k else features)) * item for k in range(self.K)
      ],
      "message_bytes_per_boundary": [rows * sizes[b + 1] * item for b in range(self.K - 1)],
      "message_padding_bytes_per_boundary": [0] * (self.K - 1),
      # A split table: the tokens' rows looked up and their cotangent, every tick.
      "lookup_bytes": 2 * rows * int(np.prod(self.specs[0].shape[1:])) * vocab.width * 4
      if vocab
      else 0,
      # Without remat: the residual slots (and the spare, where a table needs it), padded to
      # the widest stage's.
      "residual_bytes_per_stage": res_slots * res.slot_bytes(),
      "residual_padding_bytes_per_stage": [
        res_slots * (res.slot_bytes() - res.slot_bytes(k)) for k in range(self.K)
      ],
      # gpipe: the last stage's own loss's cotangent w.r.t. its logits, held per microbatch.
      "output_cotangent_bytes": (table.cot_slots + 1) * rows * out_size * out_item
      if program.keeps_own(spec)[-1]
      else 0,
      "ticks_per_call": table.num_ticks,
    }

  def memory(self, batch_size: int) -> list[DeviceMemory]:
    """Per stage, what each of its devices holds (`padding`): its row of the packed state and
    gradient sums (flat buffers padded to the widest stage, plus the stacked leaves, plus its
    piece of a split table), and the stored-input, cotangent and residual slots (the
    residuals: without remat) plus one microbatch's residuals (the op running; under remat a
    B op's recompute) and a split table's looked-up rows."""
    pad = self.padding(batch_size)
    rows = batch_size // (self.M * self.D)
    abstract = self.spec.abstract
    specs = list(self.specs)
    if self.vocab:
      specs[0] = self.vocab.input_spec(specs[0])
    return [
      DeviceMemory(
        label=f"stage {k + 1}",
        devices=tuple(self.mesh.devices[k]),
        state_bytes=pad["state_bytes_per_stage"],
        padding_bytes=pad["state_padding_bytes_per_stage"][k],
        inflight_bytes=pad["slot_bytes_per_stage"]
        + pad["residual_bytes_per_stage"]
        + pad["output_cotangent_bytes"]
        + pad["lookup_bytes"]
        + stage.residual_bytes(abstract[k], specs[k], rows),
      )
      for k, stage in enumerate(self.stages)
    ]

  # --- Batches ----------------------------------------------------------------------------

  def put_batch(self, batch: dict) -> tuple:
    """One step's numpy batch -> (inputs, targets) as [1, M, B/M, ...], split over 'data'."""
    return self.put_batches([batch])

  def put_batches(self, batches: list[dict]) -> tuple:
    """S steps' numpy batches -> (inputs, targets) as [S, M, B/M, ...] on the mesh, each
    microbatch split over 'data' (replicated over 'stage')."""
    cut = lambda b, f: split_microbatches(f(b), self.M)
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
    program over the mesh (`program.make_eval`: stage k on its own devices)."""
    inputs = placement.shard_batch(self.task.inputs(batch), self.mesh)
    targets = placement.shard_batch(self.task.targets(batch), self.mesh)
    rows = jax.tree.leaves(inputs)[0].shape[0]
    if rows not in self._eval_programs:
      fn, names = program.make_eval(self.spec, inputs, targets)
      # Out replicated: every process reads every stage's sums.
      compiled = jax.jit(
        fn, out_shardings=self.packing.everywhere, compiler_options=self._compiler_options
      )
      self._eval_programs[rows] = (compiled, names)
    fn, names = self._eval_programs[rows]
    out = fn(st.params, st.model_state, st.vocab, inputs, targets)
    return program.sums_by_head(out, names, self.K)

  def lower(self, st: PackedState, batch: tuple):
    """The jitted program for `batch`'s step count, lowered (for HLO and memory analysis)."""
    inputs, targets = batch
    return self._program(inputs, targets).lower(st, inputs, targets)

  def use_costs(self, costs: schedule_lib.MeasuredCosts) -> bool:
    """Under `zb`, runs the split that measured op costs predict fastest for this model, as
    `DataflowExecutor.use_costs` does (`schedule.measured_schedule`); the programs are built
    again on the next call. gpipe and 1f1b have no split: nothing changes.

    Returns:
      Whether the split changed.

    Raises:
      ValueError: if `costs` is not for this executor's K stages.
    """
    s = self.schedule
    if s.name != "zb":
      return False
    if len(costs.stages) != self.K:
      raise ValueError(
        f"use_costs: the costs are for {len(costs.stages)} stages, this executor has {self.K}; "
        "measure them on an executor of the same model split."
      )
    new = schedule_lib.measured_schedule(costs, s.strategy, s.microbatches, s.name, s.continuous)
    if new.split == s.split:
      return False
    self.schedule = new
    self.spec = dataclasses.replace(self.spec, schedule=new)
    self._programs.clear()
    base = self.description.split("; zb split")[0]
    self.description = f"{base}; zb split from microbatch {list(new.split)} (measured costs)"
    return True

  def table(self, steps: int) -> ticks.TickTable:
    """The tick table of a call of `steps` optimizer steps."""
    return ticks.build(self.schedule, steps, remat=self.remat)

  def _program(self, inputs, targets):
    """The jitted program for calls of as many steps as `inputs` holds (built once)."""
    num = jax.tree.leaves(inputs)[0].shape[0]
    if num not in self._programs:
      table = self.table(num)
      fn = program.make(self.spec, table, num, inputs, targets)
      state = self.packing.sharding()
      data = NamedSharding(self.mesh, P(None, None, placement.DATA_AXIS))
      self._programs[num] = jax.jit(
        fn,
        in_shardings=(state, data, data),
        out_shardings=(state, self.packing.everywhere),
        donate_argnums=0,
        compiler_options=self._compiler_options,
      )
    return self._programs[num]
