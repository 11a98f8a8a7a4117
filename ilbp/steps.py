"""The fused train and eval steps: the whole staged network as one program.

`make_train_step` builds `train_step(state, batch) -> (state, metrics)`: the batch is split into
M microbatches; a `lax.scan` over them computes each microbatch's gradients from one forward
pass (`StagedModel.gradients`), threads the model state (BatchNorm running averages move once
per microbatch forward, in microbatch order) and accumulates; every stage then applies its own
optimizer update to the mean. This is the exactness reference for the pipelined executors,
which run the same per-stage primitives on the same microbatches, and it lets one device train
a batch too large to fit at once.

The helpers below (`split_microbatches`, `microbatch_rng`, `eval_stage`) are shared with the
pipelined executors, so a microbatch means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilbp.staged import StagedModel
from ilbp.state import TrainState, update_stage
from ilbp.strategy import Strategy

PyTree = Any


def split_microbatches(batch: PyTree, microbatches: int) -> PyTree:
  """[B, ...] leaves -> [M, B/M, ...]: microbatch m is rows m·B/M .. (m+1)·B/M - 1."""

  def split(x):
    if x.shape[0] % microbatches:
      raise ValueError(
        f"A batch of {x.shape[0]} does not split into {microbatches} microbatches; "
        "use a batch size divisible by config.execution.microbatches."
      )
    return x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])

  return jax.tree.map(split, batch)


def microbatch_rng(base: jax.Array, step: Any, microbatch: Any) -> jax.Array:
  """The dropout key of one microbatch of one step: every executor derives it this way."""
  return jax.random.fold_in(jax.random.fold_in(base, step), microbatch)


def mean_metrics(stacked: dict) -> dict:
  """Per-microbatch metrics stacked on a leading axis -> their mean."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)


def make_train_step(
  model: StagedModel,
  task: Any,
  strategy: Strategy,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule | None = None,
  *,
  microbatches: int = 1,
  gradients: str = "engine",
  microbatch_sharding: jax.sharding.Sharding | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  Args:
    model: the staged model.
    task: a task from `ilbp.tasks` (inputs, targets, loss).
    strategy: the interlocking strategy.
    optimizer: the optax optimizer the state was created with (one per stage).
    schedule: learning-rate schedule, reported as a metric when given.
    microbatches: M; the batch's leading dimension must be divisible by it.
    gradients: "engine", "spec" or "backprop" (`StagedModel.gradients`).
    microbatch_sharding: where the [M, B/M, ...] microbatches live, e.g. split over the data
      axis along B/M (`placement.microbatch_sharding`); without it, cutting a batch-sharded
      array into microbatches would move the sharding to the M axis and every device would
      compute every microbatch.

  Returns:
    The step function. Metrics: `head{k}/loss` and the task's per-head metrics (means over
    microbatches; head K is the network's output), per-stage and per-head gradient and
    parameter norms, and the learning rate.
  """
  K = model.num_stages

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    params = state.params

    def micro(carry, xs):
      model_state, acc = carry
      m, mb = xs
      grads, model_state, metrics = model.gradients(
        params,
        model_state,
        task.inputs(mb),
        task.targets(mb),
        loss_fn=task.loss,
        strategy=strategy,
        method=gradients,
        rng=microbatch_rng(state.rng, state.step, m),
      )
      acc = grads if acc is None else jax.tree.map(jnp.add, acc, grads)
      # Statistics keep their stored dtype (a float64 forward would promote float32 ones).
      model_state = jax.tree.map(lambda new, old: new.astype(old.dtype), model_state, carry[0])
      return (model_state, acc), metrics

    if microbatches == 1:
      (model_state, grads), metrics = micro((state.model_state, None), (0, batch))
    else:
      zeros = jax.tree.map(jnp.zeros_like, params)
      split = split_microbatches(batch, microbatches)
      if microbatch_sharding is not None:
        split = jax.lax.with_sharding_constraint(split, microbatch_sharding)
      xs = (np.arange(microbatches), split)
      # A rolled loop everywhere. XLA's own conv gradients run ~15x slower inside a loop on
      # XLA:CPU (resnet20, batch 64, M = 8: 3229 vs 210 ms per step unrolled); the ResNets'
      # CPU conv VJP (ilbp.models.conv, conv="auto") does not: 185 ms rolled and unrolled, and
      # the rolled step compiles in 3.9 s instead of 8.4.
      (model_state, total), stacked = jax.lax.scan(micro, (state.model_state, zeros), xs)
      grads = jax.tree.map(lambda g: g / microbatches, total)
      metrics = mean_metrics(stacked)

    stages = []
    for k, stage in enumerate(state.stages):
      stage, norms = update_stage(
        optimizer, stage.replace(model_state=model_state[k]), grads[k], k, K
      )
      stages.append(stage)
      metrics.update(norms)
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return state.replace(step=state.step + 1, stages=tuple(stages)), metrics

  return train_step


def eval_stage(model: StagedModel, task: Any, k: int, params, state, a, targets):
  """Stage k's inference forward and its loss's evaluation sums.

  Returns:
    `(a_k, sums)`: the stage output and `task.eval_sums` of head k+1 (of the network's output
    for the last stage), including the example/token `count`.
  """
  a, _ = model.stage_apply(k, params, state, a, train=False)
  logits = a
  if k < model.num_stages - 1:
    logits, _ = model.head_apply(k, params, state, a, train=False)
  return a, task.eval_sums(logits, targets)


def named_sums(per_head: list[dict]) -> dict:
  """Per-head eval sums -> `head{k}/{name}` plus one `count`."""
  out = {}
  for k, sums in enumerate(per_head):
    sums = dict(sums)
    out["count"] = sums.pop("count")
    out.update({f"head{k + 1}/{name}": v for name, v in sums.items()})
  return out


def make_eval_step(model: StagedModel, task: Any) -> Callable[[TrainState, dict], dict]:
  """Builds `eval_step(state, batch) -> sums` for every head from one forward pass.

  Returns:
    A function returning `head{k}/loss` and `head{k}/accuracy` sums for k = 1..K, and `count`
    (the number of real examples or tokens). Divide after summing over batches
    (`task.finalize`).
  """

  def eval_step(state: TrainState, batch: dict) -> dict:
    a, targets, per_head = task.inputs(batch), task.targets(batch), []
    for k, stage in enumerate(state.stages):
      a, sums = eval_stage(model, task, k, stage.params, stage.model_state, a, targets)
      per_head.append(sums)
    return named_sums(per_head)

  return eval_step
