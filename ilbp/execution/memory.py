"""What each device holds: planned from shapes, and measured from the live arrays.

An executor's `memory(batch_size)` gives one `DeviceMemory` per group of devices that hold the
same thing (a stage's D devices; fused: every device): the training state's bytes (parameters,
statistics, optimizer state and the gradient sums of one step), the part of those bytes that is
padding, and the activations the schedule keeps in flight. The trainer prints them at start;
`scripts/benchmark_pipeline.py` reports them; `live_bytes` reads what is really there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

MB = 1e6


def tree_bytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
  return sum(
    int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
  )


def stage_state_bytes(abstract_stage) -> int:
  """A StageState's bytes plus one step's gradient sums (the size of its parameters)."""
  return tree_bytes(abstract_stage) + tree_bytes(abstract_stage.params)


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
  """What each of `devices` holds.

  Attributes:
    label: which stages ("stage 2"; fused: "stages 1-4").
    devices: the devices holding it (one copy each).
    state_bytes: training state plus one step's gradient sums, padding included.
    padding_bytes: the part of `state_bytes` that is zeros (spmd's flat buffers).
    inflight_bytes: activations held between ops: residuals (or stored inputs and cotangents)
      of the microbatches in flight at the schedule's peak.
  """

  label: str
  devices: tuple
  state_bytes: int
  padding_bytes: int
  inflight_bytes: int

  @property
  def total_bytes(self) -> int:
    return self.state_bytes + self.inflight_bytes

  def line(self) -> str:
    names = [f"{d.platform}:{d.id}" for d in self.devices]
    names = ",".join(names) if len(names) <= 4 else f"{names[0]}..{names[-1]}, {len(names)}"
    return (
      f"{self.label} ({names}): state {self.state_bytes / MB:.1f} MB (padding "
      f"{self.padding_bytes / MB:.1f}), in flight {self.inflight_bytes / MB:.1f} MB per device"
    )


def describe(rows: Sequence[DeviceMemory]) -> str:
  """The console lines: one per group of devices."""
  return "memory: " + "; ".join(row.line() for row in rows)


def as_dict(rows: Sequence[DeviceMemory]) -> dict:
  """JSON-ready: per group, bytes per device (for benchmark rows and logs)."""
  return {
    "held_bytes_per_stage": [row.total_bytes for row in rows],
    "state_bytes_per_stage": [row.state_bytes for row in rows],
    "padding_bytes_per_stage": [row.padding_bytes for row in rows],
    "inflight_bytes_per_stage": [row.inflight_bytes for row in rows],
  }


def live_bytes() -> dict:
  """Bytes of every live array's shards, per device (what is really there now). A buffer is
  counted once: `jax.live_arrays()` lists a sharded array and also the per-device arrays its
  shards are made of."""
  held: dict = {}
  seen: set = set()
  for array in jax.live_arrays():
    if array.is_deleted():
      continue
    for shard in array.addressable_shards:
      buffer = (shard.device, shard.data.unsafe_buffer_pointer())
      if buffer not in seen:
        seen.add(buffer)
        held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held
