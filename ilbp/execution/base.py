"""The seam between the trainer and the executors: the protocol and the execution config.

An executor owns placement: it initialises (or gives the restore target of) the train state on
its devices, puts a numpy batch where its programs want it, and runs the train and eval
steps. Every executor reads and writes the same `TrainState` pytree, so a checkpoint written
under one resumes under another (or under another microbatch count).

  fused      one jitted program for the whole network, data parallel over every device
             (`ilbp.execution.fused`): the exactness reference.
  dataflow   one program per stage and operation, stage k's state on stage k's devices,
             asynchronous dispatch in schedule order (`ilbp.execution.dataflow`). One host.
  spmd       one program over a ('stage', 'data') mesh: a scan over the schedule's ticks,
             stages packed on a 'stage' axis, `steps_per_call` steps per call
             (`ilbp.execution.spmd`).

`config.execution` (see experiments/configs/common.py) chooses and configures the executor;
`ExecutionConfig.from_config` checks it once, before anything is built or compiled, and every
executor is built from the typed value it returns (`ilbp.execution.factory.make`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import ml_collections

from ilbp import placement
from ilbp.execution.stage import RESIDUALS
from ilbp.state import TrainState

KINDS = ("fused", "dataflow", "spmd")
GRADIENTS = ("engine", "spec")
# The pipeline schedules; `ilbp.execution.schedule.SCHEDULES` (kept in step by a test: this
# module does not import the schedule).
SCHEDULES = ("gpipe", "1f1b", "zb")


class Executor(Protocol):
  """What the trainer calls, and all it calls.

  The live state is whatever `init_state` returns (a TrainState, or the SPMD executor's packed
  form); `unpack_state` / `pack_state` convert it to and from the one `TrainState` layout
  that checkpoints hold, so a run may resume under another executor.

  Optional: `use_costs(costs: schedule.MeasuredCosts) -> bool`, for an executor that chooses
  its schedule from the run's measured op costs (dataflow under zb: the split they predict
  fastest); True when the schedule changed.
  """

  description: str  # One line for the console: the executor and its layout.
  steps_per_call: int  # Optimizer steps one `train_steps` call runs (1: one per call).

  def init_state(self, rng: jax.Array) -> Any:
    """A fresh live state on this executor's devices."""

  def state_target(self, rng: jax.Array) -> TrainState:
    """The abstract TrainState (shapes, dtypes, shardings) to restore a checkpoint onto."""

  def pack_state(self, st: TrainState) -> Any:
    """A TrainState (e.g. restored onto `state_target`) -> the live state."""

  def unpack_state(self, st: Any) -> TrainState:
    """The live state -> a TrainState on this executor's devices."""

  def checkpoint_state(self, st: Any) -> TrainState:
    """The live state -> what a checkpoint writes: a TrainState of arrays, or of
    `ilbp.state.HostLeaf`s each written by one process (`ilbp.checkpoint`)."""

  def put_batch(self, batch: dict) -> Any:
    """This process's numpy training batch -> what `train_step` takes, on the devices."""

  def put_batches(self, batches: list[dict]) -> Any:
    """`steps_per_call` numpy training batches -> what `train_steps` takes."""

  def train_step(self, st: Any, batch: Any) -> tuple[Any, dict]:
    """One optimizer step; may return before the devices finish (asynchronous dispatch)."""

  def train_steps(self, st: Any, batches: Any) -> tuple[Any, dict]:
    """As many optimizer steps as `batches` holds; metrics with a leading step axis."""

  def eval_step(self, st: Any, batch: dict) -> dict:
    """Evaluation sums of every head (`Stage.evaluate`) of this process's numpy batch."""

  def memory(self, batch_size: int) -> list:
    """What each group of devices holds at `batch_size` (`ilbp.execution.memory`)."""


class TrainStateIsLive:
  """For executors whose live state is the TrainState itself: one step per call."""

  steps_per_call = 1

  def pack_state(self, st: TrainState) -> TrainState:
    return st

  def unpack_state(self, st: TrainState) -> TrainState:
    return st

  def checkpoint_state(self, st: TrainState) -> TrainState:
    return st

  def put_batches(self, batches: list[dict]) -> list:
    return [self.put_batch(b) for b in batches]

  def train_steps(self, st: TrainState, batches: list) -> tuple[TrainState, dict]:
    per_step = []
    for batch in batches:
      st, metrics = self.train_step(st, batch)
      per_step.append(metrics)
    return st, jax.tree.map(lambda *xs: jax.numpy.stack(xs), *per_step)


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """`config.execution`, checked against the config and the devices (`from_config`).

  Attributes:
    kind: "fused", "dataflow" or "spmd".
    num_stages: K.
    microbatches: M per optimizer step.
    data_parallel: D, devices per stage (fused: the devices of its one data-parallel mesh).
    continuous: pipelines: no global flush between steps.
    steps_per_call: spmd: optimizer steps per program call.
    gradients: "engine" or "spec" (fused only).
    schedule: pipelines: "gpipe", "1f1b" or "zb" (`ilbp.execution.schedule`); fused runs no
      pipeline and ignores it.
    vocab_parallel: spmd: split a model's token table by rows over the stages
      (`ilbp.execution.spmd.vocab`); the other executors hold it whole on stage 1.
    remat: spmd: a B op that waits for a cotangent from above re-runs its forward instead of
      reading the residuals the forward stored (less memory, one more forward per such op).
    residuals: what each stage's forward keeps for its backward, every executor alike: "all"
      (everything `jax.vjp` keeps) or "matmuls" (matrix-product and convolution outputs; the
      elementwise ops between them are recomputed in the backward); `stage.RESIDUALS`.
  """

  kind: str
  num_stages: int
  microbatches: int = 1
  data_parallel: int = 1
  continuous: bool = True
  steps_per_call: int = 1
  gradients: str = "engine"
  schedule: str = "1f1b"
  vocab_parallel: bool = True
  remat: bool = False
  residuals: str = "all"

  @property
  def devices(self) -> list:
    """The devices this execution uses: the first D (fused) or K·D (pipelines)."""
    count = self.data_parallel * (1 if self.kind == "fused" else self.num_stages)
    return jax.devices()[:count]

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, num_devices: int | None = None
  ) -> ExecutionConfig:
    """Checks config.execution against the config and the devices, before anything compiles.

    Args:
      config: the experiment config.
      num_devices: the devices to check against (default: every device of the job).

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
      raise ValueError(
        f"config.execution.steps_per_call must be an integer >= 1, got {per_call!r}."
      )
    if per_call > 1 and ex.kind != "spmd":
      raise ValueError(
        f"config.execution.steps_per_call={per_call} runs several optimizer steps in one "
        f"program, which only config.execution.kind='spmd' does (got {ex.kind!r}); set "
        "steps_per_call=1 or kind='spmd'."
      )
    if ex.gradients not in GRADIENTS:
      raise ValueError(f"Unknown config.execution.gradients={ex.gradients!r}; valid: engine, spec.")
    if ex.gradients == "spec" and ex.kind != "fused":
      raise ValueError(
        "config.execution.gradients='spec' (jax.grad of the stop_gradient composition) runs "
        "only with config.execution.kind='fused'; pipelines run the engine's per-stage VJPs."
      )
    schedule = ex.get("schedule", "1f1b")
    if schedule not in SCHEDULES:
      raise ValueError(
        f"Unknown config.execution.schedule={schedule!r}; valid: {', '.join(SCHEDULES)}."
      )
    remat = ex.get("remat", False)
    if not isinstance(remat, bool):
      raise ValueError(f"config.execution.remat must be True or False, got {remat!r}.")
    if remat and ex.kind != "spmd":
      raise ValueError(
        f"config.execution.remat=True is for kind='spmd' (got {ex.kind!r}): the dataflow "
        "executor keeps every in-flight microbatch's residuals, fused runs no pipeline; set "
        "remat=False."
      )
    residuals = ex.get("residuals", "all")
    if residuals not in RESIDUALS:
      raise ValueError(
        f"Unknown config.execution.residuals={residuals!r}; valid: {', '.join(RESIDUALS)} "
        "(matmuls: keep matrix-product and convolution outputs, recompute the elementwise ops "
        "between them; all: keep every residual jax.vjp keeps)."
      )
    m = ex.microbatches
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
      raise ValueError(f"config.execution.microbatches must be >= 1, got {m}.")
    d = ex.get("data_parallel")
    d = (num_devices if ex.kind == "fused" else 1) if d is None else int(d)
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
        "parallel over every process) or 'spmd' on multi-host slices."
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
    return cls(
      kind=ex.kind,
      num_stages=int(config.num_stages),
      microbatches=m,
      data_parallel=d,
      continuous=bool(ex.continuous),
      steps_per_call=per_call,
      gradients=ex.gradients,
      schedule=schedule,
      vocab_parallel=bool(ex.get("vocab_parallel", True)),
      remat=remat,
      residuals=residuals,
    )


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """`ExecutionConfig.from_config` for its checks alone (raises ValueError)."""
  ExecutionConfig.from_config(config, num_devices)
