"""The schedule's ops for one stage, as plain functions: what both pipelined executors run.

The dataflow executor jits each of them on its own (one program per stage and op); the SPMD
executor calls them inside the branches of its one program. Both therefore compute exactly the
same thing, from the same per-stage primitives as the fused engine (`interlock.stage_forward`,
`loss_step`, `stage_backward`, `state.update_stage`). Also here: a stage-by-stage TrainState
created on (or restored onto) each stage's own devices, and evaluation stage by stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilbp import interlock, steps
from ilbp.staged import StagedModel
from ilbp.state import StageState, TrainState, init_keys, init_stage_state, update_stage

PyTree = Any


def forward(params, stage_state, rng, step, m, x, *, model: StagedModel, k: int):
  """F: stage k's forward of microbatch m under `jax.vjp` -> (a_k, vjp, new stage state)."""
  key = steps.microbatch_rng(rng, step, m)
  f = lambda p, x: model.stage_apply(
    k, {"stage": p}, {"stage": stage_state}, x, train=True, rng=key
  )
  return interlock.stage_forward(f, params, x, has_aux=True)


def loss(params, head_state, rng, step, m, a, targets, grads, *, model: StagedModel, task, k: int,
         needs_input: bool):  # fmt: skip
  """H: loss k of microbatch m -> (cotangent or None, head grad sums, head state, metrics).

  `needs_input`: whether a stage uses the loss (`interlock.loss_users`), so its cotangent with
  respect to a_k is computed. `grads`: the head's gradient sums so far.
  """
  key = steps.microbatch_rng(rng, step, m)
  is_head = k < model.num_stages - 1
  head = lambda p, a: model.head_apply(k, {"head": p}, {"head": head_state}, a, train=True, rng=key)
  value, metrics, head_grads, cot, new_head_state = interlock.loss_step(
    head if is_head else None,
    task.loss,
    params,
    a,
    targets,
    needs_input=needs_input,
    has_aux=is_head,
    loss_has_aux=True,
  )
  if is_head:
    grads = jax.tree.map(jnp.add, grads, head_grads)
  else:
    new_head_state = head_state
  return cot, grads, new_head_state, {"loss": value, **metrics}


def backward(vjp, cotangents: dict, grads, *, op: interlock.BackwardOp):
  """B: one backward-plan op -> (stage grad sums, {loss j: cotangent for the stage below})."""
  d_params, passed = interlock.stage_backward(vjp, op, cotangents)
  if d_params is not None:
    grads = jax.tree.map(jnp.add, grads, d_params)
  return grads, passed


def update(
  optimizer: optax.GradientTransformation,
  lr: optax.Schedule | None,
  k: int,
  num_stages: int,
  microbatches: int,
  stage: StageState,
  sums: PyTree,
  head_metrics: dict,
  step,
) -> tuple[StageState, dict]:
  """U: stage k's optimizer update with the mean of its gradient sums over M microbatches.

  Args:
    head_metrics: the stage's loss metrics, already averaged over the microbatches.
    step: the step being completed (its learning rate is reported by stage 0).

  Returns:
    (new stage state, the stage's metrics: head{k+1}/..., gradient and parameter norms, and
    `learning_rate` on stage 0 when `lr` is given).
  """
  grads = jax.tree.map(lambda g: g / microbatches, sums)
  stage, norms = update_stage(optimizer, stage, grads, k, num_stages)
  metrics = {f"head{k + 1}/{name}": v for name, v in head_metrics.items()}
  metrics.update(norms)
  if k == 0 and lr is not None:
    metrics["learning_rate"] = lr(step)
  return stage, metrics


# --- State on each stage's devices -------------------------------------------------------------


def stage_init(model: StagedModel, optimizer, k: int, spec) -> Callable:
  """init_rng -> stage k's StageState (jit it with stage k's shardings)."""
  return lambda init_rng: init_stage_state(model, optimizer, k, init_rng, spec)


def init_on_stages(
  model, optimizer, specs, shardings: Sequence, rng: jax.Array, scalars=None
) -> TrainState:
  """A fresh TrainState whose stage k is created on `shardings[k]` (never anywhere else); the
  step and dropout key on `scalars` (default `shardings[0]`). Every array is made by a jitted
  program onto its sharding, so stages may sit on other processes' devices."""
  scalars = shardings[0] if scalars is None else scalars
  key = np.asarray(rng)  # The same host value on every process.
  stages = []
  for k in range(model.num_stages):
    init = lambda r, k=k: stage_init(model, optimizer, k, specs[k])(init_keys(r)[0])
    stages.append(jax.jit(init, out_shardings=shardings[k])(key))
  step, dropout_rng = jax.jit(
    lambda r: (jnp.zeros((), jnp.int32), init_keys(r)[1]), out_shardings=(scalars, scalars)
  )(key)
  return TrainState(step=step, rng=dropout_rng, stages=tuple(stages))


def target_on_stages(
  model, optimizer, specs, shardings: Sequence, rng: jax.Array, scalars=None
) -> TrainState:
  """The abstract TrainState of `init_on_stages` (a checkpoint restore target)."""
  scalars = shardings[0] if scalars is None else scalars
  init_rng, dropout_rng = jax.eval_shape(init_keys, rng)
  spec = lambda sharding: lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  stages = tuple(
    jax.tree.map(
      spec(shardings[k]), jax.eval_shape(stage_init(model, optimizer, k, specs[k]), init_rng)
    )
    for k in range(model.num_stages)
  )
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=scalars)
  return TrainState(step=scalar, rng=spec(scalars)(dropout_rng), stages=stages)


def abstract_stages(model, optimizer, specs) -> list[StageState]:
  """Every stage's StageState as shapes and dtypes only."""
  rng = jax.random.PRNGKey(0)
  init_rng = jax.eval_shape(init_keys, rng)[0]
  return [
    jax.eval_shape(stage_init(model, optimizer, k, specs[k]), init_rng)
    for k in range(model.num_stages)
  ]


# --- Evaluation, stage by stage -----------------------------------------------------------------


def _evaluate(params, model_state, a, targets, *, model, task, k):
  return steps.eval_stage(model, task, k, params, model_state, a, targets)


_evaluate_jit = jax.jit(_evaluate, static_argnames=("model", "task", "k"))


def evaluate_on_stages(model, task, st: TrainState, batch: dict, shardings: Sequence) -> dict:
  """Every head's evaluation sums, stage k on `shardings[k]` (its batch-split sharding)."""
  a = jax.device_put(task.inputs(batch), shardings[0])
  targets = task.targets(batch)
  per_head = []
  for k, stage in enumerate(st.stages):
    if k:
      a = jax.device_put(a, shardings[k])
    t = jax.device_put(targets, shardings[k])
    a, sums = _evaluate_jit(stage.params, stage.model_state, a, t, model=model, task=task, k=k)
    per_head.append(sums)
  return steps.named_sums(per_head)
