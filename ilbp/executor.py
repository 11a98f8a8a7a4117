"""What the trainer talks to: how a step is executed, and where the state lives.

An executor owns placement: it initialises (or gives the restore target of) the train state on
its devices, puts a numpy batch where its programs want it, and runs the train and eval
steps. Every executor reads and writes the same `TrainState` pytree, so a checkpoint written
under one resumes under another (or under another microbatch count).

  fused      one jitted program for the whole network, data parallel over every device
             (`ilbp.steps`): the exactness reference.
  dataflow   one program per stage and operation, stage k's state on stage k's devices,
             asynchronous dispatch in schedule order (`ilbp.pipeline.dataflow`). One host.
  spmd       one program over a ('stage', 'data') mesh: a scan over the schedule's ticks,
             stages packed on a 'stage' axis, `steps_per_call` steps per call
             (`ilbp.pipeline.spmd`).

`config.execution` (see experiments/configs/common.py) chooses and configures the executor;
`validate` checks it before anything is built or compiled.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import ml_collections
import optax

from ilbp import placement, state, steps
from ilbp.staged import GRADIENT_METHODS, StagedModel
from ilbp.strategy import Strategy

KINDS = ("fused", "dataflow", "spmd")


class Executor(Protocol):
  """The seam between the training loop and how a step runs.

  The live state is whatever `init_state` returns (a TrainState, or the SPMD executor's packed
  form); `unpack_state` / `pack_state` convert it to and from the one `TrainState` layout
  that checkpoints hold, so a run may resume under another executor.
  """

  steps_per_call: int  # Optimizer steps one `train_steps` call runs (1: `train_step` only).

  def init_state(self, rng: jax.Array) -> Any:
    """A fresh live state on this executor's devices."""

  def state_target(self, rng: jax.Array) -> state.TrainState:
    """The abstract TrainState (shapes, dtypes, shardings) to restore a checkpoint onto."""

  def pack_state(self, st: state.TrainState) -> Any:
    """A TrainState (e.g. restored onto `state_target`) -> the live state."""

  def unpack_state(self, st: Any) -> state.TrainState:
    """The live state -> a TrainState (what a checkpoint saves)."""

  def put_batch(self, batch: dict) -> Any:
    """This process's numpy training batch -> what `train_step` takes, on the devices."""

  def train_step(self, st: Any, batch: Any) -> tuple[Any, dict]:
    """One optimizer step; may return before the devices finish (asynchronous dispatch)."""

  def eval_step(self, st: Any, batch: dict) -> dict:
    """Evaluation sums of every head (`steps.make_eval_step`) of this process's numpy batch."""


class TrainStateIsLive:
  """For executors whose live state is the TrainState itself: one step per call."""

  steps_per_call = 1

  def pack_state(self, st: state.TrainState) -> state.TrainState:
    return st

  def unpack_state(self, st: state.TrainState) -> state.TrainState:
    return st


def data_parallel(execution: ml_collections.ConfigDict, devices: int) -> int:
  """Devices per stage: config.execution.data_parallel, or its default (fused: all, else 1)."""
  d = execution.get("data_parallel")
  if d is None:
    return devices if execution.kind == "fused" else 1
  return int(d)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks config.execution against the config and the devices, before anything compiles.

  Raises:
    ValueError: naming the field, its value and the fix.
  """
  ex = config.execution
  num_devices = jax.device_count() if num_devices is None else num_devices
  if ex.kind not in KINDS:
    raise ValueError(
      f"Unknown config.execution.kind={ex.kind!r}; valid: {', '.join(KINDS)} "
      "(fused: one program, data parallel; dataflow: one program per stage)."
    )
  per_call = ex.get("steps_per_call", 1)
  if not isinstance(per_call, int) or isinstance(per_call, bool) or per_call < 1:
    raise ValueError(f"config.execution.steps_per_call must be an integer >= 1, got {per_call!r}.")
  if per_call > 1 and ex.kind != "spmd":
    raise ValueError(
      f"config.execution.steps_per_call={per_call} runs several optimizer steps in one program, "
      f"which only config.execution.kind='spmd' does (got {ex.kind!r}); set steps_per_call=1 "
      "or kind='spmd'."
    )
  if ex.gradients not in GRADIENT_METHODS[:2]:
    raise ValueError(f"Unknown config.execution.gradients={ex.gradients!r}; valid: engine, spec.")
  if ex.gradients == "spec" and ex.kind != "fused":
    raise ValueError(
      "config.execution.gradients='spec' (jax.grad of the stop_gradient composition) runs "
      "only with config.execution.kind='fused'; pipelines run the engine's per-stage VJPs."
    )
  m = ex.microbatches
  if not isinstance(m, int) or isinstance(m, bool) or m < 1:
    raise ValueError(f"config.execution.microbatches must be >= 1, got {m}.")
  d = data_parallel(ex, num_devices)
  if d < 1:
    raise ValueError(f"config.execution.data_parallel must be >= 1, got {d}.")
  if ex.kind == "fused" and d > num_devices:
    raise ValueError(
      f"config.execution.data_parallel={d} but only {num_devices} devices are visible; "
      "leave it unset to use them all."
    )
  if ex.kind == "dataflow" and jax.process_count() > 1:
    raise ValueError(
      "config.execution.kind='dataflow' drives every stage from one Python thread and runs "
      f"on one host, but this job has {jax.process_count()} processes; use 'fused' (data "
      "parallel over every process) on multi-host slices."
    )
  if ex.kind in ("dataflow", "spmd"):
    placement.check_stage_devices(config.num_stages, d, num_devices)
  for field in ("batch_size", "eval_batch_size"):
    size = int(config[field])
    # Each microbatch splits over the devices that hold a stage (the eval batch is not split
    # into microbatches, only over the devices).
    parts = d * (m if field == "batch_size" else 1)
    if size % parts:
      what = f"{m} microbatches x {d} devices" if field == "batch_size" else f"{d} devices"
      raise ValueError(
        f"config.{field}={size} does not split into {what}; use a multiple of {parts} "
        f"(e.g. {parts * max(1, size // parts)}), or change config.execution.microbatches / "
        "data_parallel."
      )


class FusedExecutor(TrainStateIsLive):
  """The whole network as one jitted program, data parallel over a ("data",) mesh.

  Args:
    model, task, strategy, optimizer, schedule: as for `steps.make_train_step`.
    input_spec: the network input's abstract shape (batch 1 is fine).
    microbatches: M (a scan over microbatches inside the step).
    gradients: "engine" or "spec".
    devices: the devices to use (default: all).
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
    gradients: str = "engine",
    devices=None,
  ):
    self.mesh = placement.data_mesh(devices)
    self._init = lambda rng: state.create_train_state(model, optimizer, rng, input_spec)
    train_step = steps.make_train_step(
      model,
      task,
      strategy,
      optimizer,
      schedule,
      microbatches=microbatches,
      gradients=gradients,
      microbatch_sharding=placement.microbatch_sharding(self.mesh),
    )
    self._train = placement.jit_train_step(train_step, self.mesh)
    self._eval = placement.jit_eval_step(steps.make_eval_step(model, task), self.mesh)
    self.description = (
      f"fused: one program, data parallel over {self.mesh.size} device(s), "
      f"{microbatches} microbatch(es), gradients={gradients}"
    )

  def init_state(self, rng: jax.Array) -> state.TrainState:
    return jax.jit(self._init, out_shardings=placement.replicated(self.mesh))(rng)

  def state_target(self, rng: jax.Array) -> state.TrainState:
    sharding = placement.replicated(self.mesh)
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(self._init, rng),
    )

  def put_batch(self, batch: dict) -> dict:
    return placement.shard_batch(batch, self.mesh)

  def train_step(self, st: state.TrainState, batch: dict) -> tuple[state.TrainState, dict]:
    return self._train(st, batch)

  def eval_step(self, st: state.TrainState, batch: dict) -> dict:
    return self._eval(st, self.put_batch(batch))


def input_shard(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """`(index, count)`: the share of every batch this process loads for config.execution.

  fused splits each batch over every process (`(process_index, process_count)`); dataflow runs
  on one process (the whole batch); spmd feeds the data columns of its (stage, data) grid that
  this process's devices sit in, so processes holding different stages of the same columns
  load the same examples (`placement.input_shard`).
  """
  ex = config.execution
  if ex.kind == "spmd":
    d = data_parallel(ex, jax.device_count())
    return placement.input_shard(placement.stage_grid(config.num_stages, d))
  return jax.process_index(), jax.process_count()


def make(
  config: ml_collections.ConfigDict,
  model: StagedModel,
  task: Any,
  strategy: Strategy,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule | None,
  input_spec: jax.ShapeDtypeStruct,
) -> Executor:
  """The executor config.execution asks for (validated first)."""
  validate(config)
  ex = config.execution
  d = data_parallel(ex, jax.device_count())
  args = (model, task, strategy, optimizer, schedule, input_spec)
  if ex.kind == "fused":
    devices = jax.devices()[:d]
    return FusedExecutor(
      *args, microbatches=ex.microbatches, gradients=ex.gradients, devices=devices
    )
  if ex.kind == "spmd":
    from ilbp.pipeline import spmd  # Only pipelined runs import the pipeline.

    return spmd.SpmdExecutor(
      *args,
      microbatches=ex.microbatches,
      continuous=ex.continuous,
      data_parallel=d,
      steps_per_call=ex.get("steps_per_call", 1),
      devices=jax.devices()[: config.num_stages * d],
    )
  from ilbp.pipeline import dataflow

  return dataflow.DataflowExecutor(
    *args, microbatches=ex.microbatches, continuous=ex.continuous, data_parallel=d
  )
