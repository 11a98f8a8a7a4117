"""Reading a run directory's `metrics.jsonl`: the rows, the final evaluation, the throughput.

Tables and plots are built from these files, never from TensorBoard event files. The trainer
appends one JSON object per step, and a resume drops the rows past the checkpoint it restored
(`ilbp.rundir.MetricsFile`), so the file is one series in step order. Readers still merge rows
by step, the last write winning, for files written before that.
"""

from __future__ import annotations

import json
import statistics

from etils import epath

METRICS_FILE = "metrics.jsonl"
# Evaluation prefixes the trainer writes: the test split ("eval") and, when the config holds a
# validation split out of train, "val".
SPLITS = ("eval", "val")


def read_metrics(workdir: str) -> list[dict]:
  """Rows of `workdir/metrics.jsonl` merged by step (later writes win), by ascending step.

  Returns:
    A list of dicts, each with "step"; [] when the file does not exist yet. A last line cut
    short by an interruption is ignored.
  """
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  merged: dict[int, dict] = {}
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line half-written when the run was killed.
    merged.setdefault(int(row["step"]), {}).update(row)
  return [merged[s] for s in sorted(merged)]


def metric_kind(row: dict) -> str:
  """ "perplexity" for a language model's eval row, else "accuracy" (classification)."""
  return "perplexity" if any(k.endswith("/perplexity") for k in row) else "accuracy"


def final_eval(rows: list[dict]) -> dict:
  """The last row holding an evaluation (eval/... keys, and val/... when present); {} if none."""
  for row in reversed(rows):
    if any(k.startswith("eval/") for k in row):
      return row
  return {}


def throughput(rows: list[dict]) -> float | None:
  """Median training steps/s over the logged intervals after the first (which includes
  compilation); None when nothing was logged."""
  rates = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
  rates = rates[1:] or rates
  return statistics.median(rates) if rates else None
