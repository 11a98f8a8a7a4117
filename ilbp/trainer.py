"""`train_and_evaluate(config, workdir)`: one trainer for every model family and strategy.

The loop is deliberately plain: build data, model and task from the config; restore or
initialise the state; run the jitted step; log, evaluate and checkpoint at the configured
intervals. Outputs in `workdir`:

  config.json        the config that wrote this workdir (checked on resume)
  metrics.jsonl      one JSON object per line, with "step": train/..., eval/head{k}/...
  events.out.*       TensorBoard (clu metric writers)
  checkpoints/       orbax checkpoints of the TrainState

Resume order: the newest checkpoint in workdir/checkpoints, else a fresh initialisation.
Batches are a pure function of (seed, step) and dropout keys are folded from the step, so a
resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers

from ilbp import checkpoint as ckpt
from ilbp import placement, tasks, train
from ilbp.staged import StagedModel
from ilbp.strategy import strategy as parse_strategy

FAMILIES = ("resnet", "transformer")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(FloatingPointError):
  """A training loss became NaN or infinite; the message names the step and the head."""


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; valid: {', '.join(DTYPES)}.")
  return DTYPES[name]


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the config before any data is read or anything is compiled.

  Raises:
    ValueError: naming the bad field, its value and what is valid.
  """
  if config.family not in FAMILIES:
    raise ValueError(f"Unknown family {config.family!r}; valid: {', '.join(FAMILIES)}.")
  parse_strategy(config.strategy, config.combine)
  for field in ("num_stages", "batch_size", "total_steps", "eval_every_steps"):
    if int(config[field]) < 1:
      raise ValueError(f"config.{field} must be >= 1, got {config[field]}.")
  for field in ("checkpoint_every_steps", "log_every_steps"):
    if int(config[field]) < 1:
      raise ValueError(f"config.{field} must be >= 1, got {config[field]}.")
  if not 0 <= config.optimizer.warmup_steps <= config.total_steps:
    raise ValueError(
      f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} must be in "
      f"[0, total_steps={config.total_steps}]."
    )
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}.")
  _dtype(config.model.dtype)
  if config.family == "resnet":
    _parse_split(config.model.split)


def _parse_split(split) -> str | tuple[int, ...]:
  """ "balanced", or blocks per stage as "3,3,3" (a string, so --config.model.split= works)."""
  if not isinstance(split, str):
    return tuple(int(x) for x in split)
  if split.strip() == "balanced":
    return "balanced"
  try:
    return tuple(int(x) for x in split.split(","))
  except ValueError as e:
    raise ValueError(
      f"config.model.split={split!r}: use 'balanced' or blocks per stage such as '3,3,3'."
    ) from e


def build(config: ml_collections.ConfigDict, workdir: str) -> tuple[StagedModel, Any, Any]:
  """Data, staged model and task for the config's family.

  Model and data modules are imported here so that a ResNet run never imports the text
  pipeline and vice versa.

  Returns:
    (model, data, task): data has train_batches(start_step) and eval_batches().
  """
  m, d = config.model, config.dataset
  if config.family == "resnet":
    from ilbp.data import images
    from ilbp.models import resnet

    data = images.get_data(
      d.name,
      batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      seed=config.seed,
      image_size=d.get("image_size"),
      data_dir=d.get("data_dir"),
      augment=d.augment,
    )
    split = _parse_split(m.split)
    model = resnet.make_model(
      m.name,
      num_classes=data.num_classes,
      num_stages=config.num_stages,
      split=split,
      head=m.head,
      input_shape=tuple(data.image_shape),
      dtype=_dtype(m.dtype),
    )
    task = tasks.Classification(label_smoothing=config.get("label_smoothing", 0.0))
  else:
    from ilbp.data import text
    from ilbp.models import transformer

    data = text.get_data(
      d.name,
      batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      seq_len=d.seq_len,
      seed=config.seed,
      tokenizer=d.tokenizer,
      vocab_size=d.vocab_size,
      cache_dir=d.get("cache_dir") or os.path.join(workdir, "data_cache"),
      max_eval_sequences=d.get("max_eval_sequences"),
      data_dir=d.get("data_dir"),
      **({"max_files": d.get("max_files")} if d.name == "stdlib" else {}),
    )
    layers = m.get("layers_per_stage")
    model = transformer.make_model(
      vocab_size=data.vocab_size,
      num_layers=m.num_layers,
      num_stages=config.num_stages,
      d_model=m.d_model,
      num_heads=m.num_heads,
      d_ff=m.d_ff,
      max_len=d.seq_len,
      dropout_rate=m.dropout_rate,
      positions=m.positions,
      head=m.head,
      layers_per_stage=tuple(layers) if layers else None,
      dtype=_dtype(m.dtype),
    )
    task = tasks.LanguageModeling()
  return model, data, task


class _Sinks:
  """metrics.jsonl for scripts, TensorBoard for people, a readable console line."""

  def __init__(self, workdir: str):
    self.primary = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.primary)

  def write(self, step: int, scalars: dict) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.primary:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def _console(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _eval_line(step: int, scalars: dict, num_stages: int) -> str:
  accs = [scalars.get(f"eval/head{k}/accuracy") for k in range(1, num_stages + 1)]
  ppls = [scalars.get(f"eval/head{k}/perplexity") for k in range(1, num_stages + 1)]
  if ppls[0] is not None:
    per_head = " ".join(f"h{k + 1}={p:.2f}" for k, p in enumerate(ppls))
    return f"[eval] step {step}: perplexity {per_head}"
  per_head = " ".join(f"h{k + 1}={a:.4f}" for k, a in enumerate(accs))
  return f"[eval] step {step}: accuracy {per_head}"


def evaluate(eval_step, state, data, task, mesh, num_stages: int, max_batches=None) -> dict:
  """One pass over the eval split; returns eval/head{k}/{loss,accuracy[,perplexity]}."""
  totals: dict[str, float] = {}
  for i, batch in enumerate(data.eval_batches()):
    if max_batches is not None and i >= max_batches:
      break
    sums = jax.device_get(eval_step(state, placement.shard_batch(batch, mesh)))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  out = {}
  for k in range(1, num_stages + 1):
    head = {"count": totals.get("count", 0.0)}
    head.update(
      {name.split("/")[1]: v for name, v in totals.items() if name.startswith(f"head{k}/")}
    )
    out.update({f"eval/head{k}/{name}": v for name, v in task.finalize(head).items()})
  out["eval/count"] = totals.get("count", 0.0)
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
    workdir: where config.json, metrics.jsonl, TensorBoard events and checkpoints go.

  Returns:
    The last evaluation's metrics (eval/head{k}/...), plus "step".

  Raises:
    ValueError: bad config, or a workdir written by an incompatible config.
    NonFiniteLossError: a NaN/inf training loss (the message names the step).
  """
  validate(config)
  strategy = parse_strategy(config.strategy, config.combine)
  os.makedirs(workdir, exist_ok=True)
  config_dict = config.to_dict()
  ckpt.check_compatible(workdir, config_dict, allow_change=config.get("allow_config_change", False))
  mesh = placement.data_mesh()
  placement.check_batch_size(config.batch_size, mesh)
  placement.check_batch_size(config.eval_batch_size, mesh)
  tx, schedule = train.make_optimizer(
    learning_rate=config.learning_rate, total_steps=config.total_steps, **config.optimizer
  )
  model, data, task = build(config, workdir)
  # Written only once the config has proved buildable, so a typo never replaces the record.
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True, default=str)
  _console(
    f"model: {config.family} {config.model.get('name', '')} K={model.num_stages} "
    f"strategy={strategy.name} combine={strategy.combine} info={model.info}"
  )

  # Parameter shapes do not depend on the batch: initialise on one example built from the
  # data's known shapes, rather than starting an input pipeline just to look at a batch.
  if config.family == "resnet":
    example_inputs = jnp.zeros((1, *data.image_shape), jnp.float32)
  else:
    example_inputs = jnp.zeros((1, config.dataset.seq_len), jnp.int32)
  init = lambda rng: train.create_train_state(model, tx, rng, example_inputs)
  rng = jax.random.PRNGKey(config.seed)
  checkpointer = ckpt.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=config.max_checkpoints_to_keep,
    async_save=config.async_checkpoints,
  )
  latest = checkpointer.latest_step()
  if latest is not None:
    # Restore straight onto the abstract state: no throw-away initialisation in memory.
    target = jax.eval_shape(init, rng)
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement.replicated(mesh)), target
    )
    state = checkpointer.restore(latest, target)
    _console(f"Resumed from {workdir}/checkpoints at step {latest}.")
  else:
    state = placement.replicate(jax.jit(init)(rng), mesh)

  train_step = placement.jit_train_step(
    train.make_train_step(model, task, strategy, tx, schedule), mesh
  )
  eval_step = placement.jit_eval_step(train.make_eval_step(model, task), mesh)
  sinks = _Sinks(workdir)
  start = int(state.step)
  batches = data.train_batches(start)
  pending: list[tuple[int, dict]] = []
  last_eval: dict = {}
  t0, t_last, steps_since = time.time(), time.time(), 0
  try:
    for step in range(start + 1, config.total_steps + 1):
      batch = placement.shard_batch(next(batches), mesh)
      state, metrics = train_step(state, batch)
      pending.append((step, metrics))
      steps_since += 1
      is_last = step == config.total_steps
      do_eval = step % config.eval_every_steps == 0 or is_last
      do_ckpt = step % config.checkpoint_every_steps == 0 or is_last
      if step % config.log_every_steps == 0 or do_eval or do_ckpt:
        pending = jax.device_get(pending)
        _check_finite(pending)
        elapsed = time.time() - t_last
        scalars = _mean_metrics(pending)
        scalars["train/steps_per_sec"] = steps_since / max(elapsed, 1e-9)
        scalars["train/examples_per_sec"] = scalars["train/steps_per_sec"] * config.batch_size
        sinks.write(step, scalars)
        eta = (config.total_steps - step) / max(scalars["train/steps_per_sec"], 1e-9)
        _console(
          f"[train] step {step}/{config.total_steps}: loss "
          + " ".join(
            f"h{k}={scalars[f'train/head{k}/loss']:.4f}" for k in range(1, model.num_stages + 1)
          )
          + f" | {scalars['train/steps_per_sec']:.2f} steps/s,"
          f" {scalars['train/examples_per_sec']:.0f} examples/s, ETA {eta:.0f}s"
        )
        pending, t_last, steps_since = [], time.time(), 0
      if do_eval:
        last_eval = evaluate(
          eval_step, state, data, task, mesh, model.num_stages, config.get("max_eval_batches")
        )
        sinks.write(step, last_eval)
        _console(_eval_line(step, last_eval, model.num_stages))
        t_last = time.time()
      if do_ckpt:
        checkpointer.save(step, state)
  finally:
    checkpointer.close()
    sinks.close()
  if not last_eval:  # Resumed a run that had already finished: report its final evaluation.
    last_eval = evaluate(
      eval_step, state, data, task, mesh, model.num_stages, config.get("max_eval_batches")
    )
  _console(f"Done: {config.total_steps} steps in {time.time() - t0:.1f}s this session.")
  return {"step": int(state.step), **last_eval}
