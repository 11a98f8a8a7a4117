"""Orbax checkpoints of the train state, and the run-compatibility check on resume.

Resume order (`train_and_evaluate`): the newest checkpoint in `workdir/checkpoints/` that reads
back whole, else a fresh initialisation. A damaged step folder (a file truncated by a full disk
or a copy cut short) is named in a warning and left in place until the run saves that step
again. The data position is not saved: batches are a pure function of (seed, step), so
restoring the step restores the input stream too.

Stages that live on different processes (the spmd executor across hosts) are written without
gathering: their leaves are `ilbp.state.HostLeaf`s, each written by the one process that holds
it, in the format of any other array leaf (so every executor reads the checkpoint, on any
number of processes), and restored by each process straight onto its stages' devices.
Orbax's own array handler cannot do this: it refuses an array held whole by one process of a
multi-process job, and one with no shards on a process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from etils import epath

from ilbp import files, rundir
from ilbp.state import HostLeaf, Shards

# Config fields that fix what a checkpoint means: resuming with another value would train a
# different experiment (or fail to restore), so it needs an explicit override.
COMPATIBILITY_FIELDS = ("family", "model", "num_stages", "strategy", "combine", "dataset.name")


@dataclasses.dataclass
class _HostLeafRestore(ocp.type_handlers.RestoreArgs):
  """Restore arguments of a `HostLeaf` target (orbax picks the handler by `restore_type`)."""

  leaf: HostLeaf | None = None


class _HostLeafHandler(ocp.type_handlers.NumpyHandler):
  """Writes a `HostLeaf` from the process that holds it; reads one onto its sharding.

  On disk a HostLeaf is what orbax's numpy handler writes (same files, same metadata), so a
  checkpoint reads back under any executor, with or without a target. Reads go one leaf at a
  time, each placed on its devices before the next is read. Orbax looks handlers up by that
  shared type name, so this handler also reads numpy leaves restored without a target.
  """

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)  # The values are the caller's own copies.

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args))]

  async def _write(self, values, infos, args):
    writes = []
    for leaf, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      if leaf.value is None and not leaf.pieces:
        continue
      ocdbt = info.is_ocdbt_checkpoint
      local = leaf.shape if not leaf.pieces else (leaf.chunk_rows, *leaf.shape[1:])
      spec = ocp.type_handlers.get_json_tspec_write(
        info,
        use_ocdbt=ocdbt,
        global_shape=leaf.shape,
        local_shape=local,  # Chunks: a piece's rows, so no two processes write one chunk.
        dtype=leaf.dtype,
        process_index=jax.process_index() if ocdbt else None,
        arg=arg,
      )
      if leaf.pieces:
        writes.append(self._write_pieces(leaf.pieces, spec, info.ts_context))
      else:
        writes.append(self._open_and_write(leaf.value, spec, info.ts_context))
    await asyncio.gather(*writes)

  async def _write_pieces(self, pieces, spec, context):
    array = await ts.open(ts.Spec(spec), create=True, open=True, context=context)
    for first, rows in pieces:  # One after another: one open array, no two writes at once.
      await array[first : first + rows.shape[0]].write(rows)

  async def deserialize(self, infos, args=None):
    args = args or [ocp.type_handlers.RestoreArgs()] * len(infos)
    out = []
    for info, arg in zip(infos, args):
      leaf = getattr(arg, "leaf", None)
      if leaf is None:  # No target (this handler also reads what the numpy handler wrote).
        out.extend(await super().deserialize([info], [arg]))
        continue
      if leaf.pieces:
        out.append(await self._read_pieces(info, leaf))
        continue
      held = [d for d in leaf.sharding.device_set if d.process_index == jax.process_index()]
      if not held:
        out.append(
          jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, [], dtype=leaf.dtype)
        )
        continue
      read = ocp.type_handlers.RestoreArgs(dtype=leaf.dtype)
      (value,) = await super().deserialize([info], [read])
      out.append(jax.device_put(value, leaf.sharding))
    return out

  async def _read_pieces(self, info, leaf: HostLeaf) -> Shards:
    """A leaf split by rows: each piece this process holds read from its rows alone."""
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint)
    array = await ts.open(ts.Spec(spec), open=True, context=info.ts_context)
    pieces = []
    for first, end, rows, sharding in leaf.pieces:
      shape = leaf.shape if first is None else (rows, *leaf.shape[1:])
      if not any(d.process_index == jax.process_index() for d in sharding.device_set):
        pieces.append(
          jax.make_array_from_single_device_arrays(shape, sharding, [], dtype=leaf.dtype)
        )
        continue
      value = await (array if first is None else array[first:end]).read()
      value = np.asarray(value, leaf.dtype)
      if first is not None:
        value = np.pad(value, [(0, rows - value.shape[0])] + [(0, 0)] * (value.ndim - 1))
      pieces.append(jax.device_put(value, sharding))
    return Shards(pieces)


def _register() -> None:
  """Registers the HostLeaf handler. It shares the numpy handler's type name on purpose (the
  same files), which orbax notes in a warning on every import: muted for this one call."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(HostLeaf, _HostLeafHandler(), override=True)
  finally:
    logging.set_verbosity(verbosity)


_register()


def _restore_args(target: Any) -> Any:
  """Per leaf of a restore target (arrays or abstract arrays with shardings, HostLeafs)."""

  def args(leaf):
    if isinstance(leaf, HostLeaf):
      return _HostLeafRestore(restore_type=HostLeaf, dtype=leaf.dtype, leaf=leaf)
    return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)

  return jax.tree.map(args, target)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one TrainState pytree.

  Args:
    directory: where step folders are written (created if missing).
    max_to_keep: newest checkpoints kept; older ones are deleted after a successful save.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
    )
    where = directory if files.is_url(directory) else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(where, options=options)
    self._damaged: set[int] = set()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_dir(self, step: int) -> epath.Path:
    """The folder of checkpoint `step`."""
    return epath.Path(self._manager.directory) / str(step)

  def save(self, step: int, state: Any) -> None:
    """Saves `state` at `step` (asynchronously when enabled); a second save of a step is a no-op,
    except over a damaged checkpoint (`restore_latest`), which is replaced."""
    if step in self._damaged:
      logging.warning("Replacing the damaged checkpoint %s.", self.step_dir(step))
      self._manager.delete(step)
      self._damaged.discard(step)
    elif step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.PyTreeSave(state), force=True)

  def restore_latest(self, target: Any) -> tuple[int | None, Any]:
    """Restores the newest checkpoint that reads back whole onto `target` (as `restore`).

    A checkpoint that fails to read, also without a target, is damaged: it is named in a
    warning, left in place, and the next older one is tried. A checkpoint that reads without a
    target but not onto it does not fit this run (another model): that error is raised.

    Returns:
      (step, state), or (None, None) when the directory holds no checkpoint.

    Raises:
      rundir.RunRefused: there are checkpoints but none reads back whole.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for step in steps:
      try:
        return step, self.restore(step, target)
      except Exception as error:  # Orbax and TensorStore raise many kinds for a bad file.
        if not self._damaged_at(step):
          raise
        logging.warning(
          "Checkpoint %s is damaged and cannot be restored (%s: %s); leaving it in place and "
          "trying the one before.",
          self.step_dir(step),
          type(error).__name__,
          str(error).splitlines()[0] if str(error) else "",
        )
        self._damaged.add(step)
    if steps:
      raise rundir.RunRefused(
        f"No intact checkpoint in {self._manager.directory}: steps "
        f"{', '.join(map(str, steps))} are all damaged. Move them aside to start again from "
        "scratch in this workdir, or pass another --workdir."
      )
    return None, None

  def _damaged_at(self, step: int) -> bool:
    """Whether checkpoint `step` fails to read back as saved, with no target to fit."""
    try:
      self._manager.restore(step, args=ocp.args.PyTreeRestore())
    except Exception:
      return True
    return False

  def restore(self, step: int, target: Any = None) -> Any:
    """Restores onto `target`'s structure, shapes, dtypes and shardings (abstract arrays with
    shardings, or `HostLeaf`s, so no memory is spent on a throw-away initialisation). Without
    a target the saved tree comes back as nested dicts of arrays (for inspection and tests)."""
    if target is None:
      return self._manager.restore(step, args=ocp.args.PyTreeRestore())
    abstract = jax.tree.map(
      lambda x: x if isinstance(x, HostLeaf) else ocp.utils.to_shape_dtype_struct(x), target
    )
    return self._manager.restore(
      step, args=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract))
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _get(config: dict, dotted: str):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def check_compatible(workdir: str, config: dict, *, allow_change: bool) -> None:
  """Refuses to resume a workdir written by an incompatible config.

  Args:
    workdir: the run directory; its `config.json` is the config that wrote the checkpoints.
    config: the new config, as a plain dict.
    allow_change: when True, differences are allowed (the user asked to override).

  Raises:
    ValueError: naming every differing field, the old and new values, and the two fixes.
  """
  old = rundir.previous_config(epath.Path(workdir))
  if allow_change or old is None:
    return
  diffs = [
    f"{field}: {_get(old, field)!r} -> {_get(config, field)!r}"
    for field in COMPATIBILITY_FIELDS
    if _get(old, field) != _get(config, field)
  ]
  if diffs:
    raise ValueError(
      f"Workdir {workdir} holds a run with a different configuration ({'; '.join(diffs)}). "
      "Use a new --workdir, or pass --config.allow_config_change=True to resume anyway "
      "(only safe when the parameter shapes still match). Nothing was overwritten."
    )
