"""Device meshes and shardings: where arrays live. Never decides gradients.

Data parallelism runs through `jax.jit` shardings over a "data" mesh axis: the batch is split
along its leading dimension, the train state is replicated, and XLA inserts the gradient
all-reduce. The same code runs on one CPU, several forced CPU devices, a GPU host or a TPU
slice. The fused executor uses one such mesh over all its devices; a pipelined executor gives
each stage its own ("data",) mesh over D devices (`stage_meshes`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh ("data",) over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_stage_devices(num_stages: int, data_parallel: int, num_devices: int) -> None:
  """Raises a clear error when K stages of D devices each do not fit on the devices there are."""
  need = num_stages * data_parallel
  if need > num_devices:
    raise ValueError(
      f"{num_stages} stages x {data_parallel} data-parallel device(s) per stage need {need} "
      f"devices, but only {num_devices} are visible. Use fewer stages or "
      "config.execution.data_parallel, run on more devices (on CPU: "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={need}), or "
      "config.execution.kind='fused'."
    )


def stage_meshes(
  num_stages: int, data_parallel: int, devices: Sequence[jax.Device] | None = None
) -> list[Mesh]:
  """K disjoint ("data",) meshes of D devices each: stage k gets devices k·D .. k·D + D - 1."""
  devices = jax.devices() if devices is None else list(devices)
  check_stage_devices(num_stages, data_parallel, len(devices))
  return [
    data_mesh(devices[k * data_parallel : (k + 1) * data_parallel]) for k in range(num_stages)
  ]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the "data" axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
  """[M, B/M, ...] microbatches: each one split over the "data" axis (not the M axis)."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's numpy batch into global arrays sharded over the "data" axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree, mesh: Mesh):
  """Places a pytree (e.g. a fresh train state) replicated on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def jit_train_step(train_step: Callable, mesh: Mesh) -> Callable:
  """jit with explicit shardings: state replicated and donated, batch split over "data"."""
  return jax.jit(
    train_step,
    in_shardings=(replicated(mesh), batch_sharding(mesh)),
    out_shardings=(replicated(mesh), replicated(mesh)),
    donate_argnums=0,
  )


def jit_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  """jit for evaluation: state replicated (not donated), batch split, sums replicated."""
  return jax.jit(
    eval_step,
    in_shardings=(replicated(mesh), batch_sharding(mesh)),
    out_shardings=replicated(mesh),
  )
