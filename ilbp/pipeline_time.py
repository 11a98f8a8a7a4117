"""Modelled pipeline time: how long a run's steps would take on a K-device pipeline.

A run measures the op costs of its model once, at start (`measure`: every stage's forward,
head, backward halves and update, each program timed alone, and the boundary transfer; the
dataflow executor's `measure`), and keeps them in its workdir:

  pipeline_costs.json   {"key": what the costs depend on, "costs": the `MeasuredCosts`,
                         "segments": [{"step": s, "seconds_per_step": t, ...}, ...]}

A later session (a resume) reuses the costs when the key still matches (model, dataset,
batch, K, the modelled M, the devices they were timed on) and measures again when it does not.
The schedule, strategy and continuous flag are not in the key: they change no op cost, only the
prediction, which `schedule.predict_step` recomputes from the costs every session.

`pipeline/seconds` at step s (metrics.jsonl, next to `step`) is the modelled pipeline time of
steps 1..s: a sum over segments, each a run of steps predicted at one `seconds_per_step` (one
segment unless a resume changed the prediction), so a resume continues the series from the
value at the restored step, exactly.

A dataflow run under the zb schedule runs the split its costs predict fastest
(`DataflowExecutor.use_costs`, from `Clock.costs`): the same split `predict_step` chooses when
the modelled pipeline is the run's own (its M, zb, continuous or not), which a test holds.

Where the costs are timed: a dataflow run's own executor (at the modelled M); otherwise a
dataflow executor built for the measurement on the run's devices (spmd: the same K·D devices;
fused: one device per stage when there are K local devices, else every stage on the first
device, with no shared-core slowdown and a same-device copy for the link: the model is then of
K devices like this one). Its state is a fresh initialisation (op costs do not depend on the
values), freed when the measurement ends.

Off with `config.pipeline_time.measure=False`; a single stage (K = 1) has no pipeline and a
multi-process job cannot run the one-host dataflow executor: neither measures nor writes the
metric.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from ilbp import files
from ilbp.execution import schedule as schedule_lib

COSTS_FILE = "pipeline_costs.json"
METRIC = "pipeline/seconds"
_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.pipeline_time`, resolved: the pipeline the run's time is modelled on.

  Attributes:
    microbatches: M of the modelled pipeline.
    schedule: its pipeline schedule, one of `schedule.SCHEDULES`.
    continuous: continuous (True) or flushed steps.
    repeats: timed calls per op.
  """

  microbatches: int
  schedule: str
  continuous: bool
  repeats: int


def settings(config: ml_collections.ConfigDict) -> Settings | None:
  """The modelled pipeline of `config`, or None when nothing is measured (no
  `config.pipeline_time`, `measure=False`, or K = 1).

  Raises:
    ValueError: a bad `config.pipeline_time` field, naming it and the fix.
  """
  pt = config.get("pipeline_time")
  if pt is None or not pt.get("measure", True) or int(config.num_stages) < 2:
    return None
  m = pt.get("microbatches")
  m = config.execution.microbatches if m is None else m
  if not isinstance(m, int) or isinstance(m, bool) or m < 1:
    raise ValueError(f"config.pipeline_time.microbatches must be an integer >= 1, got {m!r}.")
  if config.batch_size % m:
    raise ValueError(
      f"config.pipeline_time.microbatches={m} does not divide config.batch_size="
      f"{config.batch_size}: the modelled pipeline cuts each batch into M microbatches. Pick an "
      "M that divides the batch, or set config.pipeline_time.measure=False."
    )
  name = pt.get("schedule")
  name = config.execution.get("schedule", "1f1b") if name is None else name
  if name not in schedule_lib.SCHEDULES:
    raise ValueError(
      f"Unknown config.pipeline_time.schedule={name!r}; valid: "
      f"{', '.join(schedule_lib.SCHEDULES)} (None: config.execution.schedule)."
    )
  repeats = pt.get("repeats", 3)
  if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
    raise ValueError(f"config.pipeline_time.repeats must be an integer >= 1, got {repeats!r}.")
  return Settings(m, name, bool(config.execution.get("continuous", True)), repeats)


def cache_key(config: ml_collections.ConfigDict, where: str) -> dict:
  """What measured op costs depend on: model, data, batch, K, the modelled M and the devices
  (`where`, from `layout`). Compared as JSON, as the cache file holds it."""
  s = settings(config)
  key = {
    "family": config.family,
    "model": config.get("model", ml_collections.ConfigDict()).to_dict(),
    "dataset": config.get("dataset", ml_collections.ConfigDict()).to_dict(),
    "batch_size": config.batch_size,
    "num_stages": config.num_stages,
    "microbatches": s.microbatches if s else None,
    "residuals": config.execution.get("residuals", "all"),
    "devices": where,
  }
  return json.loads(json.dumps(key, default=str))


def layout(config: ml_collections.ConfigDict) -> tuple[list, int, bool]:
  """The devices the costs are timed on: (K·D devices, D, whether they are K distinct groups).

  Pipelines (dataflow, spmd): their own K·D devices. Fused: one device per stage when this
  process has K, else the first device K times (stages share it: no slowdown, no link)."""
  K = config.num_stages
  local = jax.local_devices()
  if config.execution.kind != "fused":
    d = config.execution.get("data_parallel") or 1
    return local[: K * d], d, True
  if len(local) >= K:
    return local[:K], 1, True
  return [local[0]] * K, 1, False


def describe_layout(config: ml_collections.ConfigDict) -> str:
  """`layout` in words, for the cache key: the same devices give the same string."""
  devices, d, distinct = layout(config)
  first = devices[0]
  where = f"{config.execution.kind}: {config.num_stages} x {d} {first.platform} {first.device_kind}"
  return where + ("" if distinct else " (stages share one device)")


# --- The cache file --------------------------------------------------------------------------


def costs_to_json(costs: schedule_lib.MeasuredCosts) -> dict:
  """MeasuredCosts -> a JSON-ready dict (an infinite bandwidth as None)."""
  bandwidth = None if math.isinf(costs.link.bandwidth) else costs.link.bandwidth
  return {
    "stages": [dataclasses.asdict(c) for c in costs.stages],
    "link": {"latency": costs.link.latency, "bandwidth": bandwidth},
    "boundary_bytes": list(costs.boundary_bytes),
    "residual_bytes": list(costs.residual_bytes),
    "slowdown": list(costs.slowdown) if isinstance(costs.slowdown, tuple) else costs.slowdown,
    "rows": costs.rows,
    "source": costs.source,
  }


def costs_from_json(d: dict) -> schedule_lib.MeasuredCosts:
  """`costs_to_json`'s inverse."""
  bandwidth = d["link"]["bandwidth"]
  return schedule_lib.MeasuredCosts(
    stages=tuple(schedule_lib.StageCost(**c) for c in d["stages"]),
    link=schedule_lib.Link(d["link"]["latency"], math.inf if bandwidth is None else bandwidth),
    boundary_bytes=tuple(d["boundary_bytes"]),
    residual_bytes=tuple(d["residual_bytes"]),
    # A list: one factor per count of busy stages; a number: one for any overlap (older files).
    slowdown=tuple(d["slowdown"]) if isinstance(d["slowdown"], list) else d["slowdown"],
    rows=d["rows"],
    source=d["source"],
  )


def read(workdir) -> dict | None:
  """The workdir's pipeline_costs.json, or None when there is none or it does not parse (a
  file cut short is measured again)."""
  path = epath.Path(workdir) / COSTS_FILE
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError:
    logging.warning("%s does not parse: measuring the op costs again.", path)
    return None
  ok = isinstance(data, dict) and data.get("version") == _VERSION and "costs" in data
  return data if ok else None


def write(workdir, data: dict) -> None:
  files.write_text(epath.Path(workdir) / COSTS_FILE, json.dumps(data, indent=1) + "\n")


def cached_costs(workdir, key: dict) -> schedule_lib.MeasuredCosts | None:
  """The cached costs when the cache's key is `key`, else None."""
  data = read(workdir)
  if data is None or data.get("key") != key:
    return None
  return costs_from_json(data["costs"])


# --- The modelled clock ----------------------------------------------------------------------


def seconds_at(segments: list[dict], step: int) -> float:
  """Modelled seconds of steps 1..`step`: segment i covers the steps after its "step" up to
  the next segment's, each at its "seconds_per_step"."""
  total = 0.0
  for i, seg in enumerate(segments):
    if step <= seg["step"]:
      break
    end = segments[i + 1]["step"] if i + 1 < len(segments) else step
    total += seg["seconds_per_step"] * (min(step, end) - seg["step"])
  return total


@dataclasses.dataclass(frozen=True)
class Clock:
  """The run's modelled pipeline time (see the module docstring).

  Attributes:
    segments: as in pipeline_costs.json.
    prediction: this session's `schedule.predict_step` result, without the Schedule but with
      its `split` (zb: per stage, the first microbatch whose merged VJP calls are split).
    measured: whether this session measured (False: the cache was reused).
    costs: the op costs behind the prediction (a dataflow executor under zb runs the split
      they predict, `DataflowExecutor.use_costs`).
  """

  segments: tuple[dict, ...]
  prediction: dict
  measured: bool
  costs: schedule_lib.MeasuredCosts

  def seconds(self, step: int) -> float:
    return seconds_at(list(self.segments), step)

  @property
  def seconds_per_step(self) -> float:
    return self.segments[-1]["seconds_per_step"]


def load_or_measure(
  config: ml_collections.ConfigDict, workdir: str, measure_fn
) -> tuple[schedule_lib.MeasuredCosts, bool, dict]:
  """The workdir's cached op costs when their key matches `config`, else `measure_fn()`.

  Returns:
    (the costs, whether they were measured now, the cache file's content with them: write it
    with `write`).
  """
  key = cache_key(config, describe_layout(config))
  data = read(workdir) or {"version": _VERSION, "segments": []}
  costs = cached_costs(workdir, key)
  if costs is not None:
    return costs, False, data
  t0 = time.perf_counter()
  costs = measure_fn()
  data["measure_seconds"] = time.perf_counter() - t0
  data["key"], data["costs"] = key, costs_to_json(costs)
  return costs, True, data


def start(
  config: ml_collections.ConfigDict,
  workdir: str,
  step: int,
  measure_fn,
  strategy: Any,
) -> Clock | None:
  """Reads or measures the op costs (`load_or_measure`), predicts seconds per step, and records
  the segment that starts at `step` (the restored step; 0 for a fresh run) in the cache.

  Args:
    config: the run's config.
    workdir: the run directory.
    step: the step this session starts from.
    measure_fn: () -> MeasuredCosts, called only when the cache does not match.
    strategy: the run's Strategy.

  Returns:
    The Clock, or None when `settings(config)` is None or this is a multi-process job.
  """
  s = settings(config)
  if s is None:
    return None
  if jax.process_count() > 1:
    logging.warning(
      "pipeline/seconds is not written in a multi-process job: its op costs are measured with "
      "the one-host dataflow executor."
    )
    return None
  costs, measured, data = load_or_measure(config, workdir, measure_fn)
  pred = schedule_lib.predict_step(costs, strategy, s.microbatches, s.schedule, s.continuous)
  # Segments past the restored step were written by a session whose steps are redone now.
  segments = [seg for seg in data.get("segments", []) if seg["step"] < step]
  segment = {
    "step": step if segments else 0,  # No record of the steps before: this rate for them too.
    "seconds_per_step": pred["seconds_per_step"],
    "strategy": f"{strategy.name}/{strategy.combine}",
    "schedule": s.schedule,
    "microbatches": s.microbatches,
    "continuous": s.continuous,
  }
  if not segments or segments[-1]["seconds_per_step"] != segment["seconds_per_step"]:
    segments.append(segment)
  data["segments"] = segments
  write(workdir, data)
  prediction = {k: v for k, v in pred.items() if k != "schedule"}
  prediction["split"] = list(pred["schedule"].split)
  return Clock(tuple(segments), prediction, measured, costs)


def measure(
  config: ml_collections.ConfigDict,
  run: Any,
  batch: dict,
  state: Any,
) -> schedule_lib.MeasuredCosts:
  """Times the run's op costs (see the module docstring for where).

  Args:
    config: the run's config.
    run: what the trainer built: model, task, strategy, optimizer, schedule (the learning
      rate), input_spec, executor.
    batch: one numpy training batch.
    state: the run's live state (used when the run's own executor measures).

  Returns:
    MeasuredCosts in seconds.
  """
  from ilbp.execution.dataflow import DataflowExecutor

  s = settings(config)
  ex = run.executor
  if isinstance(ex, DataflowExecutor) and s.microbatches == ex.M:
    return ex.measure(state, ex.put_batch(batch), s.repeats)
  devices, d, distinct = layout(config)
  timer = DataflowExecutor(
    run.model,
    run.task,
    run.strategy,
    run.optimizer,
    run.schedule,
    run.input_spec,
    microbatches=s.microbatches,
    continuous=s.continuous,
    data_parallel=d,
    devices=devices,
    residuals=config.execution.get("residuals", "all"),
  )
  fresh = timer.init_state(jax.random.PRNGKey(0))
  costs = timer.measure(fresh, timer.put_batch(batch), s.repeats, slowdown=distinct)
  del fresh
  return costs
