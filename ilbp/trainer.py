"""`train_and_evaluate(config, workdir)`: one trainer for every model family and strategy.

The loop is deliberately plain: build data, model and task from the config; restore or
initialise the state; run the jitted step; log, evaluate and checkpoint at the configured
intervals. Outputs in `workdir`:

  config.json        the config that wrote this workdir (checked on resume)
  metrics.jsonl      one JSON object per line, with "step": train/..., eval/head{k}/... (the
                     dataset's test split) and, when the data holds a validation split out of
                     train, val/head{k}/...
  events.out.*       TensorBoard (clu metric writers)
  checkpoints/       orbax checkpoints of the TrainState
  run.lock           held by the live run (`ilbp.workdir_lock`): a second run on it refuses

Resume order: the newest checkpoint in workdir/checkpoints, else a fresh initialisation. Every
executor reads and writes the same TrainState, so a run may resume under another executor or
microbatch count. Batches are a pure function of (seed, step) and dropout keys are folded from
the step, so a resumed run reproduces the uninterrupted one exactly.

The trainer does not know the model family (`ilbp.families` builds model, data and task) nor
how a step runs or where arrays live (`ilbp.execution`: it talks to the `Executor` protocol).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from ilbp import checkpoint as ckpt
from ilbp import families, files, state, workdir_lock
from ilbp.execution import factory
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
  return ExecutionConfig.from_config(config)


_SYNC_EVERY_S = 60.0  # Bucket metrics.jsonl: one upload a minute at most between checkpoints.


class _JsonlWriter(metric_writers.LoggingWriter):
  """Scalars to `metrics.jsonl` for scripts, one JSON object per step: writes for the same
  step (train metrics, clu's steps_per_sec, eval) are merged until `flush`. The rest of the
  MetricWriter interface only logs."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path
    self.last: dict[str, float] = {}
    self._row: dict = {}
    # In a bucket (no append) the file's text is kept here and uploaded whole by `sync`: at
    # checkpoints, at the end, and at most once a minute in between.
    self._remote = files.is_url(path)
    self._text = files.read_text(path) if self._remote and files.exists(path) else ""
    self._synced_text, self._synced_at = self._text, time.monotonic()

  def write_scalars(self, step: int, scalars) -> None:
    if self._row and self._row["step"] != int(step):
      self.flush()
    scalars = {k: float(v) for k, v in scalars.items()}
    self.last.update(scalars)
    self._row = {"step": int(step), **self._row, **scalars}

  def flush(self) -> None:
    if self._row:
      line = json.dumps(self._row) + "\n"
      self._row = {}
      if not self._remote:
        with open(self.path, "a") as f:
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


def _writer(workdir: str) -> tuple[metric_writers.MetricWriter, _JsonlWriter | None]:
  """TensorBoard for people and metrics.jsonl for scripts (process 0); logging elsewhere."""
  primary = jax.process_index() == 0
  default = metric_writers.create_default_writer(workdir, just_logging=not primary)
  if not primary:
    return default, None
  jsonl = _JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
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
      path or a bucket URL such as gs://bucket/run (`ilbp.files`).

  Returns:
    The last evaluation's metrics (eval/head{k}/..., and val/head{k}/... with a validation
    split), plus "step".

  Raises:
    ValueError: bad config, a bucket workdir the family cannot use as it is, or a workdir
      written by an incompatible config.
    NonFiniteLossError: a NaN/inf training loss (the message names the step).
    workdir_lock.WorkdirInUseError: another live run is writing `workdir` (the message names
      its pid and host); nothing there was touched.
  """
  execution = validate(config)
  families.check_workdir(config, workdir)
  files.makedirs(workdir)
  # One live run per workdir: a second one stops here, before it reads or writes anything else.
  # Process 0 holds the lock for every process of a multi-host run.
  primary = jax.process_index() == 0
  with workdir_lock.hold(workdir) if primary else contextlib.nullcontext():
    return _train_and_evaluate(config, execution, workdir)


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
  """Yields (step, metrics, state after the call that ran it) for steps start+1..total_steps,
  `executor.steps_per_call` steps per call where `call_size` allows."""
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
    for metrics in per_step:
      step += 1
      yield step, metrics, st


def _train_and_evaluate(
  config: ml_collections.ConfigDict, execution: ExecutionConfig, workdir: str
) -> dict:
  """`train_and_evaluate` once the config is valid and the workdir lock is held."""
  strategy = parse_strategy(config.strategy, config.combine)
  config_dict = config.to_dict()
  ckpt.check_compatible(workdir, config_dict, allow_change=config.get("allow_config_change", False))
  tx, schedule = make_optimizer(config)
  built = families.build(config, workdir, factory.input_shard(execution))
  model, data, task = built.model, built.data, built.task
  executor = factory.make(execution, model, task, strategy, tx, schedule, built.input_spec)
  # Written only once the config has proved buildable, so a typo never replaces the record.
  if jax.process_index() == 0:
    text = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
    files.write_text(os.path.join(workdir, "config.json"), text)
  _console(
    f"model: {config.family} {config.model.get('name', '')} K={model.num_stages} "
    f"strategy={strategy.name} combine={strategy.combine} info={model.info}\n"
    f"execution: {executor.description}"
  )

  rng = jax.random.PRNGKey(config.seed)
  checkpointer = ckpt.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=config.max_checkpoints_to_keep,
    async_save=config.async_checkpoints,
  )
  latest = checkpointer.latest_step()
  if latest is not None:
    # Restore straight onto the executor's abstract state (its shardings, whichever executor
    # wrote the checkpoint): no throw-away initialisation in memory.
    st = executor.pack_state(checkpointer.restore(latest, executor.state_target(rng)))
    _console(f"Resumed from {workdir}/checkpoints at step {latest}.")
  else:
    st = executor.init_state(rng)

  writer, jsonl = _writer(workdir)
  progress = periodic_actions.ReportProgress(
    num_train_steps=config.total_steps,
    writer=writer,
    every_steps=config.log_every_steps,
    every_secs=None,
  )
  start = int(jax.device_get(st.step))
  progress(start)
  batches = data.train_batches(start)
  pending: list[tuple[int, dict]] = []
  last_eval: dict = {}
  t0 = time.time()
  try:
    for step, metrics, live in _run_steps(executor, st, batches, start, config):
      st = live
      pending.append((step, metrics))
      is_last = step == config.total_steps
      do_eval = step % config.eval_every_steps == 0 or is_last
      do_ckpt = step % config.checkpoint_every_steps == 0 or is_last
      do_log = step % config.log_every_steps == 0 or do_eval or do_ckpt
      if do_log:
        pending = jax.device_get(pending)  # Waits for the step: the rate below is honest.
        _check_finite(pending)
      # steps/s and ETA (clu ReportProgress) every log_every_steps, to every sink.
      reported = progress(step)
      if do_log:
        scalars = _mean_metrics(pending)
        writer.write_scalars(step, scalars)
        rate = jsonl.last.get("steps_per_sec") if jsonl and reported else None
        _console(
          f"[train] step {step}/{config.total_steps}: loss "
          + " ".join(
            f"h{k}={scalars[f'train/head{k}/loss']:.4f}" for k in range(1, model.num_stages + 1)
          )
          + (
            f" | {rate:.2f} steps/s, {rate * config.batch_size:.0f} examples/s, "
            f"ETA {(config.total_steps - step) / max(rate, 1e-9):.0f}s"
            if rate
            else ""
          )
        )
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
      if do_ckpt:
        if jsonl:  # A resume recomputes only the steps after this checkpoint: upload the rest.
          jsonl.sync()
        checkpointer.save(step, executor.unpack_state(st))
  finally:
    checkpointer.close()
    writer.flush()
    writer.close()
  if not last_eval:  # Resumed a run that had already finished: report its final evaluation.
    last_eval = evaluate_all(
      executor, st, data, task, model.num_stages, config.get("max_eval_batches")
    )
  _console(f"Done: {config.total_steps} steps in {time.time() - t0:.1f}s this session.")
  return {"step": int(jax.device_get(st.step)), **last_eval}
