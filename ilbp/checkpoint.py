"""Orbax checkpoints of the train state, and the run-compatibility check on resume.

Resume order (`train_and_evaluate`): the newest checkpoint in `workdir/checkpoints/`, else a
fresh initialisation. The data position is not saved: batches are a pure function of
(seed, step), so restoring the step restores the input stream too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ilbp import files

# Config fields that fix what a checkpoint means: resuming with another value would train a
# different experiment (or fail to restore), so it needs an explicit override.
COMPATIBILITY_FIELDS = ("family", "model", "num_stages", "strategy", "combine", "dataset.name")


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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Saves `state` at `step` (asynchronously when enabled); a second save of a step is a no-op."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, target: Any = None) -> Any:
    """Restores onto `target`'s structure, shapes, dtypes and shardings (use `jax.eval_shape`
    plus shardings, so no memory is spent on a throw-away initialisation). Without a target
    the saved tree comes back as nested dicts of arrays (for inspection and tests)."""
    if target is None:
      return self._manager.restore(step, args=ocp.args.StandardRestore())
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

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
  path = os.path.join(workdir, "config.json")
  if allow_change or not files.exists(path):
    return
  old = json.loads(files.read_text(path))
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
