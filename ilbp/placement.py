"""Device meshes and shardings: where arrays live. Never decides gradients.

Data parallelism runs through `jax.jit` shardings over a "data" mesh axis: the batch is split
along its leading dimension, the train state is replicated, and XLA inserts the gradient
all-reduce. The same code runs on one CPU, several forced CPU devices, a GPU host or a TPU
slice. The fused executor uses one such mesh over all its devices; a pipelined executor gives
each stage its own ("data",) mesh over D devices (`stage_meshes`).
"""

from __future__ import annotations

import os
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


# The older way to force CPU devices, still honoured by XLA: a user's count there is kept.
_XLA_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# The environment variable behind `jax.config.jax_num_cpu_devices` (read when jax is imported).
CPU_DEVICES_ENV = "JAX_NUM_CPU_DEVICES"


def force_cpu_devices(count: int) -> None:
  """Gives the CPU platform `count` devices unless the user named a count already.

  A count named in the environment (JAX_NUM_CPU_DEVICES, or XLA_FLAGS'
  --xla_force_host_platform_device_count) wins. JAX fixes the count when its backends start
  (the first array or device query, not the import), so a script calls this before either;
  afterwards `jax.config.update` raises. Only the CPU platform reads it.
  """
  if _XLA_DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
    return
  if jax.config.jax_num_cpu_devices == -1:  # -1: JAX's default, no count named.
    jax.config.update("jax_num_cpu_devices", count)


def check_stage_devices(num_stages: int, data_parallel: int, num_devices: int) -> None:
  """Raises a clear error when K stages of D devices each do not fit on the devices there are."""
  need = num_stages * data_parallel
  if need > num_devices:
    raise ValueError(
      f"{num_stages} stages x {data_parallel} data-parallel device(s) per stage need {need} "
      f"devices, but only {num_devices} are visible. Use fewer stages or "
      "config.execution.data_parallel, run on more devices (on CPU: "
      f"{CPU_DEVICES_ENV}={need}), or "
      "config.execution.kind='fused'."
    )


def stage_grid(
  num_stages: int, data_parallel: int, devices: Sequence[jax.Device] | None = None
) -> np.ndarray:
  """The [K, D] array of devices of a pipeline: row k holds stage k's devices k·D .. k·D + D - 1.

  `jax.devices()` lists devices host by host, so a stage's D devices share a host where they
  can (a TPU VM's chips, a GPU node's cards), and its data-parallel all-reduce stays local.
  """
  devices = jax.devices() if devices is None else list(devices)
  check_stage_devices(num_stages, data_parallel, len(devices))
  return np.asarray(devices[: num_stages * data_parallel]).reshape(num_stages, data_parallel)


def feeds_inputs(grid: np.ndarray, process: int | None = None) -> bool:
  """Whether the process (default: this one) holds a device of the first stage (row 0 of the
  [K, D] grid): the only stage that reads the inputs; every stage's head reads the targets."""
  process = jax.process_index() if process is None else process
  return any(device.process_index == process for device in grid[0])


def input_shard(grid: np.ndarray, process: int | None = None) -> tuple[int, int]:
  """Which part of every batch this process loads, for a [K, D] grid fed replicated over
  stages and split over the D data columns.

  A process feeds the columns its devices sit in, from every stage row it holds: the examples
  of columns lo .. hi - 1 of each microbatch. Processes whose devices cover the same columns
  load the same examples (the input pipelines are deterministic given seed and shard).

  Args:
    grid: the devices, [K, D] (`stage_grid`).
    process: the process to answer for (default: this one).

  Returns:
    `(index, count)`: the process loads shard `index` of `count` equal shards of each batch
    (`(0, 1)`: the whole batch, e.g. when every stage's D devices sit on one host).

  Raises:
    ValueError: the processes' columns do not form equal, aligned blocks (no process can then
      load a contiguous share), naming what to change.
  """
  process = jax.process_index() if process is None else process
  K, D = grid.shape
  columns = {}
  for k in range(K):
    for d in range(D):
      columns.setdefault(grid[k, d].process_index, set()).add(d)
  widths = {len(c) for c in columns.values()}
  aligned = all(
    c == set(range(min(c), min(c) + len(c))) and min(c) % len(c) == 0 for c in columns.values()
  )
  if len(widths) != 1 or not aligned:
    raise ValueError(
      f"The ({K} stages x {D} data) device grid gives the processes data columns "
      f"{ {p: sorted(c) for p, c in sorted(columns.items())} }: each process must cover an "
      "equal, aligned block of columns to load a contiguous share of each batch. Choose "
      "config.execution.data_parallel so that a stage's devices are whole hosts or a whole "
      "host's devices split evenly among stages."
    )
  mine = columns.get(process)
  if mine is None:
    return 0, 1  # Not in the grid: any share will do (it feeds no device).
  width = widths.pop()
  return min(mine) // width, D // width


def stage_meshes(
  num_stages: int, data_parallel: int, devices: Sequence[jax.Device] | None = None
) -> list[Mesh]:
  """K disjoint ("data",) meshes of D devices each: stage k gets devices k·D .. k·D + D - 1."""
  return [data_mesh(row) for row in stage_grid(num_stages, data_parallel, devices)]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the "data" axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
  """[M, B/M, ...] microbatches: each one split over the "data" axis (not the M axis)."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def put_process_local(tree, sharding: NamedSharding):
  """This process's numpy arrays -> global arrays with `sharding` (each process gives the part
  its devices hold)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's numpy batch into global arrays sharded over the "data" axis."""
  return put_process_local(batch, batch_sharding(mesh))


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
