"""`train_and_evaluate(config, workdir)`: one trainer for every model family and strategy.

The loop is deliberately plain: build data, model and task from the config; restore or
initialise the state; run the jitted step; log, evaluate and checkpoint at the configured
intervals. Outputs in `workdir`:

  config.json        the config that wrote this workdir (checked on resume)
  config_history.jsonl  what each resumed session changed in the config, and from which step
  metrics.jsonl      one JSON object per line, with "step": train/..., eval/head{k}/... (the
                     dataset's test split) and, when the data holds a validation split out of
                     train, val/head{k}/...; one series in step order, also across resumes
  events.out.*       TensorBoard (clu metric writers)
  pipeline_costs.json  the op costs measured at the first start (reused on resume) behind
                     metrics.jsonl's pipeline/seconds, the modelled time of the steps so far on
                     a K-device pipeline (`ilbp.pipeline_time`; config.pipeline_time)
  checkpoints/       orbax checkpoints of the TrainState
  run.lock           held by the live run (`ilbp.workdir_lock`): a second run on it refuses

Resume order: the newest intact checkpoint in workdir/checkpoints (a damaged one is named and
skipped), else a fresh initialisation. Every executor reads and writes the same TrainState, so
a run may resume under another executor or microbatch count (recorded in
config_history.jsonl). Batches are a pure function of (seed, step) and dropout keys are folded
from the step, so a resumed run reproduces the uninterrupted one exactly. Ctrl-C or SIGTERM
(pre-emption) stops after the current step with a checkpoint of it (`ilbp.stop`).

The trainer does not know the model family (`ilbp.families` builds model, data and task) nor
how a step runs or where arrays live (`ilbp.execution`: it talks to the `Executor` protocol).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from ilbp import checkpoint as ckpt
from ilbp import families, pipeline_time, rundir, state, stop, workdir_lock
from ilbp.execution import factory, memory
from ilbp.execution.base import ExecutionConfig
from ilbp.strategy import strategy as parse_strategy


class NonFiniteLossError(FloatingPointError):
  """A training loss became NaN or infinite; the message names the step and the head."""


def validate(config: ml_collections.ConfigDict) -> ExecutionConfig:
  """Checks the config before any data is read or anything is compiled.

  Returns:
    The checked `config.execution`.

  Raises:
    ValueError: naming the bad field, its value and what is valid.
  """
  families.validate(config)
  parse_strategy(config.strategy, config.combine)
  for field in ("num_stages", "batch_size", "total_steps", "eval_every_steps"):
    if int(config[field]) < 1:
      raise ValueError(f"config.{field} must be >= 1, got {config[field]}.")
  for field in ("checkpoint_every_steps", "log_every_steps"):
    if int(config[field]) < 1:
      raise ValueError(f"config.{field} must be >= 1, got {config[field]}.")
  if config.optimizer.warmup_steps < 0:
    raise ValueError(
      f"config.optimizer.warmup_steps must be >= 0, got {config.optimizer.warmup_steps}."
    )
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}.")
  pipeline_time.settings(config)
  return ExecutionConfig.from_config(config)


def _writer(workdir: epath.Path, resume_step: int):
  """TensorBoard for people and metrics.jsonl for scripts (process 0); logging elsewhere.

  Returns:
    (the writer for every sink, the `rundir.MetricsFile` or None off process 0).
  """
  primary = jax.process_index() == 0
  default = metric_writers.create_default_writer(str(workdir), just_logging=not primary)
  if not primary:
    return default, None
  jsonl = rundir.MetricsFile(workdir / rundir.METRICS_FILE, resume_step)
  return metric_writers.MultiWriter([default, jsonl]), jsonl


def _console(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# Metric prefixes: the validation split held out of train (when the data has one), then the
# dataset's test split, named "eval" as it has always been so that every reader keeps working.
_EVAL_PREFIXES = ("val", "eval")


def _eval_lines(step: int, scalars: dict, num_stages: int) -> str:
  lines = []
  for prefix in _EVAL_PREFIXES:
    accs = [scalars.get(f"{prefix}/head{k}/accuracy") for k in range(1, num_stages + 1)]
    ppls = [scalars.get(f"{prefix}/head{k}/perplexity") for k in range(1, num_stages + 1)]
    if ppls[0] is not None:
      per_head = " ".join(f"h{k + 1}={p:.2f}" for k, p in enumerate(ppls))
      lines.append(f"[{prefix}] step {step}: perplexity {per_head}")
    elif accs[0] is not None:
      per_head = " ".join(f"h{k + 1}={a:.4f}" for k, a in enumerate(accs))
      lines.append(f"[{prefix}] step {step}: accuracy {per_head}")
  return "\n".join(lines)


def evaluate_all(executor, st, data, task, num_stages: int, max_batches=None) -> dict:
  """Evaluates the validation split (val/..., when `data` holds one out) and the eval split."""
  out = {}
  validation = getattr(data, "validation_batches", None)  # Only image data has one so far.
  if validation is not None:
    out.update(evaluate(executor, st, validation, task, num_stages, max_batches, prefix="val"))
  out.update(evaluate(executor, st, data.eval_batches, task, num_stages, max_batches))
  return out


def evaluate(
  executor, st, batches, task, num_stages: int, max_batches=None, prefix: str = "eval"
) -> dict:
  """One pass over `batches()`; returns {prefix}/head{k}/{loss,accuracy[,perplexity]}."""
  totals: dict[str, float] = {}
  for i, batch in enumerate(batches()):
    if max_batches is not None and i >= max_batches:
      break
    sums = jax.device_get(executor.eval_step(st, batch))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  out = {}
  for k in range(1, num_stages + 1):
    head = {"count": totals.get("count", 0.0)}
    head.update(
      {name.split("/")[1]: v for name, v in totals.items() if name.startswith(f"head{k}/")}
    )
    out.update({f"{prefix}/head{k}/{name}": v for name, v in task.finalize(head).items()})
  out[f"{prefix}/count"] = totals.get("count", 0.0)
  return out


def _check_finite(pending: list[tuple[int, dict]]) -> None:
  for step, metrics in pending:
    for name, value in metrics.items():
      if name.endswith("/loss") and not math.isfinite(float(value)):
        raise NonFiniteLossError(
          f"Training loss {name} is {float(value)} at step {step}. The run stopped there; "
          "checkpoints already written are intact. Lower the learning rate, add warm-up or "
          "gradient clipping (--config.optimizer.grad_clip_norm), then resume or restart."
        )


def _mean_metrics(pending: list[tuple[int, dict]]) -> dict:
  keys = pending[-1][1].keys()
  return {f"train/{k}": float(np.mean([float(m[k]) for _, m in pending])) for k in keys}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates one run; resumes from `workdir` when it holds a checkpoint.

  Args:
    config: an experiment config (see experiments/configs/).
    workdir: where config.json, metrics.jsonl, TensorBoard events and checkpoints go: a local
      path or a bucket URL such as gs://bucket/run (`ilbp.rundir`).

  Returns:
    The last evaluation's metrics (eval/head{k}/..., and val/head{k}/... with a validation
    split), plus "step".

  Raises:
    rundir.RunRefused: (a ValueError) a bad config, a workdir that is a file, a bucket workdir
      the family cannot use as it is, a workdir written by an incompatible config, or one whose
      checkpoints are all damaged. Raised before the first step; a workdir this call created
      is removed again.
    NonFiniteLossError: a NaN/inf training loss (the message names the step).
    stop.RunStopped: SIGINT or SIGTERM stopped the run, after checkpointing the step it reached.
    workdir_lock.WorkdirInUseError: another live run is writing `workdir` (the message names
      its pid and host); nothing there was touched.
  """
  with _refusals():
    execution = validate(config)
    families.check_workdir(config, workdir)
  primary = jax.process_index() == 0
  # One live run per workdir: a second one stops at the lock, before it reads or writes
  # anything else. Process 0 holds the lock for every process of a multi-host run.
  lock = workdir_lock.hold(workdir) if primary else contextlib.nullcontext()
  with rundir.prepared(workdir), lock:
    with _refusals():
      run = _setup(config, execution, workdir)
    return _train(config, workdir, run)


def measure_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Measures the op costs behind pipeline/seconds into `workdir`/pipeline_costs.json without
  training (reused when the file there still matches the config): what `scripts.reproduce`
  runs once per experiment, to plan equal-time budgets and to hand every run the same costs.

  Returns:
    The cache file's content ("key", "costs", ...) and "measured": whether it measured now.

  Raises:
    rundir.RunRefused: a bad config, or one that measures nothing (config.pipeline_time.measure
      is False, K = 1, or a multi-process job).
  """
  with _refusals():
    execution = validate(config)
    families.check_workdir(config, workdir)
    if pipeline_time.settings(config) is None or jax.process_count() > 1:
      raise ValueError(
        "Nothing to measure: config.pipeline_time.measure is False, config.num_stages is 1 or "
        "this is a multi-process job. Set --config.pipeline_time.measure=True on one process "
        "with K >= 2."
      )
  with rundir.prepared(workdir), workdir_lock.hold(workdir):
    with _refusals():
      run = _setup(config, execution, workdir)
    st = run.executor.init_state(jax.random.PRNGKey(config.seed))
    batches = run.data.train_batches(0)
    measure = lambda: pipeline_time.measure(config, run, next(batches), st)
    _, measured, data = pipeline_time.load_or_measure(config, workdir, measure)
    pipeline_time.write(workdir, data)
  return {**data, "measured": measured}


@contextlib.contextmanager
def _refusals():
  """A ValueError while the config is checked and the run built means it cannot start."""
  try:
    yield
  except rundir.RunRefused:
    raise
  except ValueError as e:
    raise rundir.RunRefused(str(e)) from e


def make_optimizer(config: ml_collections.ConfigDict):
  """config's (optimizer, learning-rate schedule), the warm-up clamped to the run (short smoke
  runs exceed it): what the train state's optimizer states are built with."""
  fields = config.optimizer.to_dict()
  if fields["warmup_steps"] > config.total_steps:
    logging.warning(
      "config.optimizer.warmup_steps=%d is longer than the run (config.total_steps=%d): "
      "warming up over all %d steps instead.",
      fields["warmup_steps"],
      config.total_steps,
      config.total_steps,
    )
    fields["warmup_steps"] = config.total_steps
  return state.make_optimizer(
    learning_rate=config.learning_rate, total_steps=config.total_steps, **fields
  )


def call_size(done: int, config: ml_collections.ConfigDict, per_call: int) -> int:
  """Optimizer steps the next executor call runs after `done` steps: `per_call` when no
  evaluation, checkpoint or the run's end falls before the call's last step (the state is only
  seen between calls), else 1 (a one-step call, compiled once more)."""
  last = done + per_call
  if per_call == 1 or last > config.total_steps:
    return 1
  for step in range(done + 1, last):
    if step % config.eval_every_steps == 0 or step % config.checkpoint_every_steps == 0:
      return 1
  return per_call


def _run_steps(executor, st, batches, start: int, config: ml_collections.ConfigDict):
  """Yields (step, metrics, state after the call that ran it, whether the call ends there) for
  steps start+1..total_steps, `executor.steps_per_call` steps per call where `call_size`
  allows."""
  step = start
  while step < config.total_steps:
    n = call_size(step, config, executor.steps_per_call)
    if n == 1:
      st, metrics = executor.train_step(st, executor.put_batch(next(batches)))
      per_step = [metrics]
    else:
      st, stacked = executor.train_steps(
        st, executor.put_batches([next(batches) for _ in range(n)])
      )
      per_step = [jax.tree.map(lambda v, i=i: v[i], stacked) for i in range(n)]
    for i, metrics in enumerate(per_step):
      step += 1
      yield step, metrics, st, i == n - 1


class _Run(NamedTuple):
  """What `_setup` builds from the config."""

  strategy: Any
  model: Any
  data: Any
  task: Any
  executor: Any
  schedule: Any
  optimizer: Any
  input_spec: Any
  workdir: str


def _setup(config: ml_collections.ConfigDict, execution: ExecutionConfig, workdir: str) -> _Run:
  """Everything that can still refuse the config: strategy, optimizer, data, model, executor."""
  strategy = parse_strategy(config.strategy, config.combine)
  config_dict = config.to_dict()
  ckpt.check_compatible(workdir, config_dict, allow_change=config.get("allow_config_change", False))
  tx, schedule = make_optimizer(config)
  labels_only = factory.labels_only(execution)
  if labels_only:
    logging.info("This process holds no first stage: its input pipeline loads labels only.")
  built = families.build(config, workdir, factory.input_shard(execution), labels_only=labels_only)
  model, data, task = built.model, built.data, built.task
  executor = factory.make(execution, model, task, strategy, tx, schedule, built.input_spec)
  return _Run(strategy, model, data, task, executor, schedule, tx, built.input_spec, workdir)


def _model_line(config: ml_collections.ConfigDict, run: _Run) -> str:
  """One readable line: model, how it is cut, strategy, data (the details: `model.info`, in
  the TensorBoard text and the log)."""
  info = run.model.info
  unit = "blocks" if "blocks_per_stage" in info else "layers"
  sizes = info.get(f"{unit}_per_stage")
  split = f", {info['split']} split" if "split" in info else ""
  cut = f" ({'+'.join(map(str, sizes))} {unit}{split})" if sizes else ""
  return (
    f"model: {config.model.get('name', config.family)}, {run.model.num_stages} stages{cut}; "
    f"strategy {run.strategy.name} (combine {run.strategy.combine}); data {config.dataset.name}"
  )


def _note_changes(config: ml_collections.ConfigDict, run: _Run, changes: dict, start: int) -> str:
  """Warns when a resume changed total_steps under a schedule that depends on it; returns the
  changes for the console ("" when none)."""
  if not changes or not start:
    return ""
  if "total_steps" in changes:
    before = ml_collections.ConfigDict(config.to_dict())
    before.total_steps = changes["total_steps"][0]
    _, old_schedule = make_optimizer(before)
    old, new = float(old_schedule(start)), float(run.schedule(start))
    if not math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-12):
      logging.warning(
        "config.total_steps changed from %s to %s on resuming at step %d: the learning-rate "
        "schedule is laid out over the new length, so the rate at step %d jumps from %.3g to "
        "%.3g and the steps after it differ from a run started with total_steps=%s.",
        *changes["total_steps"],
        start,
        start,
        old,
        new,
        changes["total_steps"][1],
      )
  shown = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
  return f" Config changed since the last session ({rundir.HISTORY_FILE}): {shown}."


def _log_train(
  writer, step: int, pending: list, config, num_stages: int, rate=None, clock=None
) -> None:
  """Writes the mean train metrics of `pending` at `step` (and the modelled pipeline time when
  `clock` is given) and prints the console line."""
  scalars = _mean_metrics(pending)
  if clock is not None:
    scalars[pipeline_time.METRIC] = clock.seconds(step)
  writer.write_scalars(step, scalars)
  _console(
    f"[train] step {step}/{config.total_steps}: loss "
    + " ".join(f"h{k}={scalars[f'train/head{k}/loss']:.4f}" for k in range(1, num_stages + 1))
    + (
      # clu's ReportProgress measures the rate but keeps its ETA to its own log note.
      f" | {rate:.2f} steps/s, {rate * config.batch_size:.0f} examples/s, "
      f"ETA {(config.total_steps - step) / max(rate, 1e-9):.0f}s"
      if rate
      else ""
    )
    + (f" | pipeline {scalars[pipeline_time.METRIC]:.2f} s modelled" if clock else "")
  )


def _train(config: ml_collections.ConfigDict, workdir: str, run: _Run) -> dict:
  """Restores or initialises the state, then trains, logs, evaluates and checkpoints."""
  model, executor = run.model, run.executor
  primary = jax.process_index() == 0
  held = memory.describe(executor.memory(config.batch_size))
  _console(f"{_model_line(config, run)}\nexecution: {executor.description}\n{held}")
  logging.info("%s", held)
  rng = jax.random.PRNGKey(config.seed)
  checkpointer = ckpt.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=config.max_checkpoints_to_keep,
    async_save=config.async_checkpoints,
  )
  writer = None
  try:
    # Restore straight onto the executor's abstract state (its shardings, whichever executor
    # wrote the checkpoint): no throw-away initialisation in memory.
    with _refusals():
      latest, restored = checkpointer.restore_latest(executor.state_target(rng))
    st = executor.init_state(rng) if latest is None else executor.pack_state(restored)
    start = int(jax.device_get(st.step))
    # Written once the config has proved buildable, so a typo never replaces the record.
    changes = rundir.record_config(epath.Path(workdir), config.to_dict(), start) if primary else {}
    changed = _note_changes(config, run, changes, start)
    if latest is not None:
      _console(f"Resumed from {workdir}/checkpoints at step {latest}.{changed}")
    writer, jsonl = _writer(epath.Path(workdir), start)
    writer.write_texts(start, {"model_info": json.dumps(model.info, default=str)})
    return _loop(config, run, st, start, checkpointer, writer, jsonl)
  finally:
    checkpointer.close()
    if writer is not None:
      writer.flush()
      writer.close()


def _pipeline_clock(config, run: _Run, st, start: int, batches):
  """The run's modelled pipeline clock (`ilbp.pipeline_time`; None when off, K = 1 or nothing
  is left to train), its op costs measured on the first batch when the workdir's cache does not
  match; returns (clock, the batches with that one still first)."""
  if pipeline_time.settings(config) is None or start >= config.total_steps:
    return None, batches
  first = []

  def measure():
    first.append(next(batches))
    return pipeline_time.measure(config, run, first[0], st)

  clock = pipeline_time.start(config, run.workdir, start, measure, run.strategy)
  if clock is None:
    return None, batches
  s, p = pipeline_time.settings(config), clock.prediction
  split = f" (split from microbatch {p['split']})" if p["split"] else ""
  _console(
    f"pipeline time: modelled on {run.model.num_stages} devices, M={s.microbatches}, "
    f"{s.schedule}{split}: {1e3 * clock.seconds_per_step:.2f} ms/step, bubble "
    f"{p['bubble_fraction']:.2f}, in flight {p['inflight_max']} microbatches; op costs "
    + ("measured now" if clock.measured else f"from {pipeline_time.COSTS_FILE}")
  )
  # A dataflow executor under zb runs the split these costs predict fastest (any split trains
  # alike; only the time differs).
  before, use_costs = run.executor.description, getattr(run.executor, "use_costs", None)
  if use_costs is not None:
    use_costs(clock.costs)
    if run.executor.description != before:
      _console(f"execution: {run.executor.description}")
  return clock, itertools.chain(first, batches)


def _loop(config, run: _Run, st, start: int, checkpointer, writer, jsonl) -> dict:
  """Steps start+1..total_steps of `_train`; stops early, with a checkpoint, on a signal."""
  model, data, task, executor = run.model, run.data, run.task, run.executor
  progress = periodic_actions.ReportProgress(
    num_train_steps=config.total_steps,
    writer=writer,
    every_steps=config.log_every_steps,
    every_secs=None,
  )
  progress(start)
  batches = data.train_batches(start)
  clock, batches = _pipeline_clock(config, run, st, start, batches)
  pending: list[tuple[int, dict]] = []
  last_eval: dict = {}
  t0, calls = time.time(), 0
  with stop.StopSignals() as signals:
    for step, metrics, live, call_ends in _run_steps(executor, st, batches, start, config):
      st = live
      pending.append((step, metrics))
      is_last = step == config.total_steps
      do_eval = step % config.eval_every_steps == 0 or is_last
      do_ckpt = step % config.checkpoint_every_steps == 0 or is_last
      do_log = step % config.log_every_steps == 0 or do_eval or do_ckpt
      if do_log:
        pending = jax.device_get(pending)  # Waits for the step: the rate below is honest.
        _check_finite(pending)
      # steps/s (clu ReportProgress) every log_every_steps, to every sink.
      reported = progress(step)
      if do_log:
        rate = jsonl.last.get("steps_per_sec") if jsonl and reported else None
        _log_train(writer, step, pending, config, model.num_stages, rate, clock)
        pending = []
      if do_eval:
        with progress.timed("eval"):
          last_eval = evaluate_all(
            executor, st, data, task, model.num_stages, config.get("max_eval_batches")
          )
        writer.write_scalars(step, last_eval)
        _console(_eval_lines(step, last_eval, model.num_stages))
      if do_log or do_eval or do_ckpt:
        writer.flush()
      # Every process asks after every call (multi-host: the preemption sync point).
      stopping = call_ends and not is_last and signals.should_stop(calls)
      calls += call_ends
      if stopping and pending:  # Log the steps since the last line: none is lost.
        pending = jax.device_get(pending)
        _check_finite(pending)
        _log_train(writer, step, pending, config, model.num_stages, clock=clock)
        writer.flush()
      if do_ckpt or stopping:
        if jsonl:  # A resume recomputes only the steps after this checkpoint: upload the rest.
          jsonl.sync()
        checkpointer.save(step, executor.checkpoint_state(st))
      if stopping:
        checkpointer.wait()
        raise stop.RunStopped(step, signals.signum)
  if not last_eval:  # Resumed a run that had already finished: report its final evaluation.
    last_eval = evaluate_all(
      executor, st, data, task, model.num_stages, config.get("max_eval_batches")
    )
  _console(f"Done: {config.total_steps} steps in {time.time() - t0:.1f}s this session.")
  return {"step": int(jax.device_get(st.step)), **last_eval}
