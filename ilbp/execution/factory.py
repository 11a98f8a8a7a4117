"""The executor `config.execution` asks for, and the share of the data each process loads."""

from __future__ import annotations

from typing import Any

import jax
import optax

from ilbp import placement
from ilbp.execution.base import ExecutionConfig, Executor
from ilbp.execution.dataflow import DataflowExecutor
from ilbp.execution.fused import FusedExecutor
from ilbp.execution.spmd.executor import SpmdExecutor
from ilbp.staged import StagedModel
from ilbp.strategy import Strategy


def input_shard(execution: ExecutionConfig) -> tuple[int, int]:
  """`(index, count)`: the share of every batch this process loads.

  fused splits each batch over every process (`(process_index, process_count)`); dataflow runs
  on one process (the whole batch); spmd feeds the data columns of its (stage, data) grid that
  this process's devices sit in, so processes holding different stages of the same columns
  load the same examples (`placement.input_shard`).
  """
  if execution.kind == "spmd":
    grid = placement.stage_grid(execution.num_stages, execution.data_parallel)
    return placement.input_shard(grid)
  return jax.process_index(), jax.process_count()


def labels_only(execution: ExecutionConfig) -> bool:
  """Whether this process's input pipeline may load labels only: under spmd, a process whose
  devices hold no first stage never feeds an input (`placement.feeds_inputs`)."""
  if execution.kind == "spmd":
    grid = placement.stage_grid(execution.num_stages, execution.data_parallel)
    return not placement.feeds_inputs(grid)
  return False


def make(
  execution: ExecutionConfig,
  model: StagedModel,
  task: Any,
  strategy: Strategy,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule | None,
  input_spec: jax.ShapeDtypeStruct,
) -> Executor:
  """The executor of a checked `ExecutionConfig` (`ExecutionConfig.from_config`)."""
  args = (model, task, strategy, optimizer, schedule, input_spec)
  m, devices = execution.microbatches, execution.devices
  if execution.kind == "fused":
    return FusedExecutor(
      *args,
      microbatches=m,
      gradients=execution.gradients,
      devices=devices,
      residuals=execution.residuals,
    )
  if execution.kind == "spmd":
    return SpmdExecutor(
      *args,
      microbatches=m,
      continuous=execution.continuous,
      data_parallel=execution.data_parallel,
      steps_per_call=execution.steps_per_call,
      devices=devices,
      vocab_parallel=execution.vocab_parallel,
      pipeline=execution.schedule,
      remat=execution.remat,
      residuals=execution.residuals,
    )
  return DataflowExecutor(
    *args,
    microbatches=m,
    continuous=execution.continuous,
    pipeline=execution.schedule,
    data_parallel=execution.data_parallel,
    devices=devices,
    residuals=execution.residuals,
  )
