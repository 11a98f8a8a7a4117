"""What a run keeps in its workdir besides checkpoints, on a local disk or in a bucket.

  metrics.jsonl         `MetricsFile`: one JSON object per logged step, one monotonic series
                        (a resume drops the rows past the step it restored)
  config.json           the config of the latest session (`record_config`)
  config_history.jsonl  one line per resumed session that changed the config: the fields, their
                        old and new values and the checkpoint step the session resumed from

Paths go through `etils.epath` (local, gs://, s3://, az://). Object stores have no append: in
a bucket, a file that grows is rewritten whole.

`prepared(workdir)` creates the workdir, and removes what it created when the run is refused
(`RunRefused`: the config or the workdir cannot start a run), so that a refused run leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

from absl import logging
from etils import epath

from ilbp import files

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = "run.lock"  # Held by `ilbp.workdir_lock`.

_SYNC_EVERY_S = 60.0  # Bucket metrics.jsonl: one upload a minute at most between checkpoints.


class RunRefused(ValueError):
  """The config or the workdir cannot start a run: the message names the problem and the fix.

  Raised before the first training step; a workdir the run created is removed again.
  """


@contextlib.contextmanager
def prepared(workdir: str) -> Iterator[epath.Path]:
  """Creates `workdir` for the `with` block; a `RunRefused` inside removes what it created.

  Removed on refusal: the workdir when it did not exist before, else the run.lock it did not
  hold before. (A run that opened that lock file in the moment between our release and the
  removal would hold a lock nobody else sees: three runs started on one new workdir within
  milliseconds, which a refusal is not worth guarding against.)

  Raises:
    RunRefused: `workdir` is a file.
  """
  path = epath.Path(workdir)
  existed = path.exists()
  if existed and not path.is_dir():
    raise RunRefused(
      f"--workdir={workdir} is a file, not a directory: pass a new or existing run directory."
    )
  had_lock = (path / LOCK_FILE).exists()
  path.mkdir(parents=True, exist_ok=True)
  try:
    yield path
  except RunRefused:
    if not existed:
      path.rmtree(missing_ok=True)
    elif not had_lock:
      (path / LOCK_FILE).unlink(missing_ok=True)
    raise


def _rows_up_to(text: str, step: int) -> tuple[str, int]:
  """The lines of a metrics.jsonl text with step <= `step`, and how many lines were dropped
  (later rows, and a last line cut short by a kill)."""
  kept, dropped = [], 0
  for line in text.splitlines():
    try:
      keep = int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
      keep = False
    if keep:
      kept.append(line + "\n")
    else:
      dropped += 1
  return "".join(kept), dropped


class MetricsFile:
  """Scalars to `metrics.jsonl` for scripts, one JSON object per step: writes for the same
  step (train metrics, clu's steps_per_sec, eval) are merged until `flush`. It has clu's
  MetricWriter methods (it sits in a `MultiWriter` beside TensorBoard); texts, images and the
  rest are TensorBoard's alone. Not a clu subclass: importing clu's writers loads TensorFlow,
  which the library modules keep out.

  Args:
    path: the metrics.jsonl file.
    resume_step: the step the run restored (0 for a fresh start). Rows past it were written by
      a session that died before its next checkpoint; this session writes those steps again,
      so they are dropped and the file stays one series in step order.
  """

  def __init__(self, path: epath.Path, resume_step: int):
    self.path = path
    self.last: dict[str, float] = {}
    self._row: dict = {}
    # In a bucket (no append) the file's text is kept here and uploaded whole by `sync`: at
    # checkpoints, at the end, and at most once a minute in between.
    self._remote = files.is_url(path)
    text = path.read_text() if path.exists() else ""
    self._text, dropped = _rows_up_to(text, resume_step)
    if dropped:
      logging.info("%s: dropped %d rows past step %d.", path, dropped, resume_step)
      files.write_text(path, self._text)
    self._synced_text, self._synced_at = self._text, time.monotonic()

  def write_scalars(self, step: int, scalars) -> None:
    if self._row and self._row["step"] != int(step):
      self.flush()
    scalars = {k: float(v) for k, v in scalars.items()}
    self.last.update(scalars)
    self._row = {"step": int(step), **self._row, **scalars}

  def flush(self) -> None:
    if not self._row:
      return
    line = json.dumps(self._row) + "\n"
    self._row = {}
    if not self._remote:
      with self.path.open("a") as f:
        f.write(line)
      return
    self._text += line
    if time.monotonic() - self._synced_at >= _SYNC_EVERY_S:
      self.sync()

  def sync(self) -> None:
    """Uploads the text to a bucket path if it changed (a local file is always up to date)."""
    if self._remote and self._text != self._synced_text:
      files.write_text(self.path, self._text)
      self._synced_text, self._synced_at = self._text, time.monotonic()

  def close(self) -> None:
    self.flush()
    self.sync()

  def _not_scalars(self, *args, **kwargs) -> None:
    """metrics.jsonl holds scalars only."""

  write_texts = write_images = write_videos = write_audios = _not_scalars
  write_histograms = write_hparams = write_summaries = _not_scalars


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def previous_config(workdir: epath.Path) -> dict | None:
  """The config.json a previous session wrote, or None in a new workdir."""
  path = workdir / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def record_config(workdir: epath.Path, config: dict, step: int) -> dict[str, tuple]:
  """Writes config.json; when a previous session's config differs, first appends the changed
  fields to config_history.jsonl, so that a run resumed under another executor, microbatch
  count or length keeps the record of what trained which steps.

  Args:
    workdir: the run directory.
    config: this session's config, as a plain dict.
    step: the checkpoint step this session resumed from (0 for a fresh start): the changes
      apply to the steps after it.

  Returns:
    {dotted field: (old value, new value)} for every changed field ({} when none).
  """
  # Compared as JSON, as config.json holds them (tuples read back as lists).
  new = json.loads(json.dumps(config, default=str))
  old = previous_config(workdir)
  changes = {}
  if old is not None:
    before, after = _flat(old), _flat(new)
    changes = {
      k: (before.get(k), after.get(k))
      for k in sorted(set(before) | set(after))
      if before.get(k) != after.get(k)
    }
  if changes:
    history = workdir / HISTORY_FILE
    entry = {
      "resumed_at_step": step,
      "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "changed": {k: {"from": a, "to": b} for k, (a, b) in changes.items()},
    }
    text = history.read_text() if history.exists() else ""
    files.write_text(history, text + json.dumps(entry) + "\n")
  files.write_text(workdir / CONFIG_FILE, json.dumps(new, indent=2, sort_keys=True))
  return changes
