"""Joining the processes of a multi-host job before JAX computes anything.

A Cloud TPU pod slice or a GPU cluster runs the same binary once per host; JAX must join them
(`jax.distributed.initialize`) before the first computation, after which `jax.devices()` lists
every host's devices and each process feeds its own share of the batch.

`--distributed` (experiments/launch.py) chooses:
  auto  (default) join when the environment describes a job of several processes:
        JAX_COORDINATOR_ADDRESS set (with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or the flags);
        Slurm (SLURM_NTASKS > 1) or Open MPI (OMPI_COMM_WORLD_SIZE > 1), which JAX reads
        itself; a TPU host list with several hosts (TPU_WORKER_HOSTNAMES or
        TPU_PROCESS_ADDRESSES). On a Cloud TPU VM (libtpu installed) it always asks JAX,
        which reads the slice's workers from the VM's metadata, and stays single-process when
        JAX finds no cluster. Otherwise: one process, nothing called.
  on    always call `jax.distributed.initialize` (errors are JAX's, e.g. no coordinator).
  off   never: one process.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

from absl import logging

MODES = ("auto", "on", "off")


def _count(value: str | None) -> int:
  """An integer environment value (0 when unset or not an integer)."""
  try:
    return int(value) if value else 0
  except ValueError:
    return 0


def _hosts(value: str | None) -> int:
  """How many hosts a comma-separated host list names (0 when unset)."""
  return len([h for h in (value or "").split(",") if h.strip()])


def plan(
  mode: str,
  environ: Mapping[str, str],
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  tpu_vm: bool = False,
) -> tuple[dict | None, str]:
  """Whether to join a multi-process job, and with which arguments.

  Args:
    mode: "auto", "on" or "off" (see the module docstring).
    environ: the environment (os.environ).
    coordinator_address, num_processes, process_id: explicit values (flags); unset ones are
      read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    tpu_vm: whether this host is a Cloud TPU VM (libtpu installed).

  Returns:
    (kwargs for `jax.distributed.initialize`, or None to stay one process; why, for the log).

  Raises:
    ValueError: an unknown mode, or a coordinator without the process count and index.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}; valid: {', '.join(MODES)}.")
  if mode == "off":
    return None, "one process (--distributed=off)"
  address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and environ.get("JAX_NUM_PROCESSES"):
    num_processes = _count(environ["JAX_NUM_PROCESSES"])
  if process_id is None and environ.get("JAX_PROCESS_ID"):
    process_id = _count(environ["JAX_PROCESS_ID"])
  if address:
    if num_processes is None or process_id is None:
      raise ValueError(
        f"A coordinator address ({address}) is set but not the process count and this "
        "process's index: pass --num_processes and --process_id (or set JAX_NUM_PROCESSES "
        "and JAX_PROCESS_ID) on every process, the same count everywhere and a different "
        "index 0..count-1 on each."
      )
    kwargs = dict(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    return kwargs, f"process {process_id} of {num_processes}, coordinator {address}"
  if mode == "on":
    return {}, "--distributed=on: JAX detects the cluster"
  launched = {
    "Slurm": _count(environ.get("SLURM_NTASKS")),
    "Open MPI": _count(environ.get("OMPI_COMM_WORLD_SIZE")),
    "TPU host list": max(
      _hosts(environ.get("TPU_WORKER_HOSTNAMES")), _hosts(environ.get("TPU_PROCESS_ADDRESSES"))
    ),
  }
  for what, n in launched.items():
    if n > 1:
      return {}, f"{what} names {n} processes: JAX detects the cluster"
  if tpu_vm:
    return {}, "Cloud TPU VM: JAX reads the slice's workers from the VM metadata"
  return None, "one process (no multi-process environment found)"


def initialize(
  mode: str = "auto",
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> str:
  """Joins the job's processes when `plan` says so; returns what it did, for the log.

  Must run before anything touches a JAX device. In "auto" mode on a Cloud TPU VM that JAX
  finds no cluster on (a lone VM outside a slice), it stays one process.
  """
  import jax  # Imported here: nothing above needs a backend.

  tpu_vm = importlib.util.find_spec("libtpu") is not None
  kwargs, why = plan(
    mode,
    os.environ,
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    tpu_vm=tpu_vm,
  )
  if kwargs is None:
    return why
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    if mode == "auto" and not kwargs and tpu_vm and "TPU host list" not in why:
      logging.warning("jax.distributed.initialize found no cluster (%s); one process.", e)
      return f"one process (Cloud TPU VM outside a slice: {e})"
    raise
  return f"joined: {why}; process {jax.process_index()} of {jax.process_count()}"
