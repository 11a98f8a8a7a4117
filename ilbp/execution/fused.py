"""The fused executor: the whole staged network as one jitted program, data parallel.

`make_train_step` builds `train_step(state, batch) -> (state, metrics)`: the batch is split into
M microbatches; a `lax.scan` over them runs every stage's ops of the per-stage layer
(`ilbp.execution.stage`: F for every stage, H for every loss, then each stage's B ops top-down
in plan order) on one microbatch, threads the model state (BatchNorm running averages move once
per microbatch forward, in microbatch order) and accumulates gradient sums; every stage then
applies its own U to the mean. The pipelined executors run the same `Stage` methods on the same
microbatches, so this one program is their exactness reference, and it lets one device train a
batch too large to fit at once. `gradients="spec"` takes each microbatch's gradients from
`jax.grad` of the stop_gradient composition instead (the literal formulation, slower).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilbp import placement, state
from ilbp.execution.base import TrainStateIsLive
from ilbp.execution.memory import DeviceMemory, stage_state_bytes
from ilbp.execution.stage import (
  Where,
  abstract_stages,
  make_stages,
  mean_metrics,
  named_sums,
  split_microbatches,
)
from ilbp.staged import StagedModel
from ilbp.state import TrainState
from ilbp.strategy import Strategy

PyTree = Any


def microbatch_grads(stages, params, model_state, where: Where, inputs, targets, zeros):
  """Every stage's gradient sums for one microbatch through the per-stage layer.

  Args:
    stages: the K `Stage`s.
    params, model_state: K-tuples of {"stage", "head"}.
    where: the microbatch.
    inputs, targets: the microbatch.
    zeros: K {"stage", "head"} gradient sums to add to.

  Returns:
    `(sums, new model state, per-stage loss metrics)`.
  """
  acts, vjps, new_state = inputs, [], []
  for k, s in enumerate(stages):
    acts, vjp, new = s.forward(params[k]["stage"], model_state[k]["stage"], where, acts)
    vjps.append((acts, vjp))
    new_state.append({"stage": new})
  arrived: list[dict] = [{} for _ in stages]
  sums, metrics = [dict(z) for z in zeros], []
  for k, s in enumerate(stages):
    a = vjps[k][0]
    cot, sums[k]["head"], head, m = s.loss(
      params[k]["head"], model_state[k]["head"], where, a, targets, sums[k]["head"]
    )
    new_state[k]["head"] = head
    metrics.append(m)
    if cot is not None:
      arrived[k][k] = cot
  for k in reversed(range(len(stages))):
    for op in stages[k].plan.ops:
      sums[k]["stage"], passed = stages[k].backward(vjps[k][1], arrived[k], sums[k]["stage"], op)
      if k:
        arrived[k - 1].update(passed)
  return sums, tuple(new_state), metrics


def _model_grads(
  method, model, task, strategy, params, model_state, where: Where, inputs, targets, zeros
):
  """As `microbatch_grads`, from `StagedModel.gradients(method=)`: "spec" (`jax.grad` of the
  stop_gradient composition) or "backprop" (plain backprop of the composed network, the
  benchmarks' baseline)."""
  grads, new_state, flat = model.gradients(
    params, model_state, inputs, targets, loss_fn=task.loss, strategy=strategy,
    method=method, rng=where.key(),
  )  # fmt: skip
  sums = jax.tree.map(jnp.add, list(zeros), list(grads))
  metrics = [{} for _ in params]
  for name, v in flat.items():
    head, metric = name.split("/", 1)
    metrics[int(head[len("head") :]) - 1][metric] = v
  return sums, new_state, metrics


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
  residuals: str = "all",
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  Args:
    model: the staged model.
    task: a task from `ilbp.tasks` (inputs, targets, loss).
    strategy: the interlocking strategy.
    optimizer: the optax optimizer the state was created with (one per stage).
    schedule: learning-rate schedule, reported as a metric when given.
    microbatches: M; the batch's leading dimension must be divisible by it.
    gradients: "engine" (the per-stage layer), or "spec" / "backprop" (`StagedModel.gradients`).
    residuals: what each stage's forward keeps for its backward (`stage.RESIDUALS`).
    microbatch_sharding: where the [M, B/M, ...] microbatches live, e.g. split over the data
      axis along B/M (`placement.microbatch_sharding`); without it, cutting a batch-sharded
      array into microbatches would move the sharding to the M axis and every device would
      compute every microbatch.

  Returns:
    The step function. Metrics: `head{k}/loss` and the task's per-head metrics (means over
    microbatches; head K is the network's output), per-stage and per-head gradient and
    parameter norms, and the learning rate.
  """
  if gradients not in ("engine", "spec", "backprop"):
    raise ValueError(f"Unknown gradients={gradients!r}; valid: engine, spec, backprop.")
  stages = make_stages(model, task, strategy, optimizer, schedule, microbatches, residuals)

  def train_step(st: TrainState, batch: dict) -> tuple[TrainState, dict]:
    params = st.params

    def micro(carry, xs):
      model_state, sums = carry
      m, mb = xs
      where = Where(st.rng, st.step, m)
      args = (params, model_state, where, task.inputs(mb), task.targets(mb), sums)
      if gradients == "engine":
        sums, new_state, metrics = microbatch_grads(stages, *args)
      else:
        sums, new_state, metrics = _model_grads(gradients, model, task, strategy, *args)
      # Statistics keep their stored dtype (a float64 forward would promote float32 ones).
      new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, model_state)
      return (new_state, tuple(sums)), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    if microbatches == 1:
      (model_state, sums), metrics = micro((st.model_state, zeros), (0, batch))
    else:
      split = split_microbatches(batch, microbatches)
      if microbatch_sharding is not None:
        split = jax.lax.with_sharding_constraint(split, microbatch_sharding)
      xs = (np.arange(microbatches), split)
      # A rolled loop everywhere. XLA's own conv gradients run ~15x slower inside a loop on
      # XLA:CPU (resnet20, batch 64, M = 8: 3229 vs 210 ms per step unrolled); the ResNets'
      # CPU conv VJP (ilbp.models.conv, conv="auto") does not: 185 ms rolled and unrolled, and
      # the rolled step compiles in 3.9 s instead of 8.4.
      (model_state, sums), stacked = jax.lax.scan(micro, (st.model_state, zeros), xs)
      metrics = mean_metrics(stacked)

    new_stages, out = [], {}
    for k, s in enumerate(stages):
      stage = st.stages[k].replace(model_state=model_state[k])
      stage, stage_metrics = s.update(stage, sums[k], metrics[k], st.step)
      new_stages.append(stage)
      out.update(stage_metrics)
    return st.replace(step=st.step + 1, stages=tuple(new_stages)), out

  return train_step


def evaluate(stages, st: TrainState, inputs, targets) -> dict:
  """Every head's evaluation sums from one inference forward (`Stage.evaluate` per stage)."""
  a, per_head = inputs, []
  for s, stage in zip(stages, st.stages):
    a, sums = s.evaluate(stage.params, stage.model_state, a, targets)
    per_head.append(sums)
  return named_sums(per_head)


def make_eval_step(model: StagedModel, task: Any) -> Callable[[TrainState, dict], dict]:
  """Builds `eval_step(state, batch) -> sums` for every head from one forward pass.

  Returns:
    A function returning `head{k}/loss` and `head{k}/accuracy` sums for k = 1..K, and `count`
    (the number of real examples or tokens). Divide after summing over batches
    (`task.finalize`).
  """
  # Evaluation needs no backward plan: any strategy gives the same forward.
  stages = make_stages(model, task, Strategy(1))
  return lambda st, batch: evaluate(stages, st, task.inputs(batch), task.targets(batch))


class FusedExecutor(TrainStateIsLive):
  """The whole network as one jitted program, data parallel over a ("data",) mesh.

  Args:
    model, task, strategy, optimizer, schedule: as for `make_train_step`.
    input_spec: the network input's abstract shape (batch 1 is fine).
    microbatches: M (a scan over microbatches inside the step).
    gradients: "engine" or "spec".
    devices: the devices to use (default: all).
    residuals: what each stage's forward keeps for its backward (`stage.RESIDUALS`).
  """

  def __init__(
    self,
    model: StagedModel,
    task: Any,
    strategy: Strategy,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule | None,
    input_spec: jax.ShapeDtypeStruct,
    *,
    microbatches: int = 1,
    gradients: str = "engine",
    devices=None,
    residuals: str = "all",
  ):
    self.mesh = placement.data_mesh(devices)
    self.microbatches = microbatches
    self.stages = make_stages(model, task, strategy, optimizer, schedule, microbatches, residuals)
    self.specs = model.input_specs(input_spec)
    self._init = lambda rng: state.create_train_state(model, optimizer, rng, input_spec)
    train_step = make_train_step(
      model,
      task,
      strategy,
      optimizer,
      schedule,
      microbatches=microbatches,
      gradients=gradients,
      microbatch_sharding=placement.microbatch_sharding(self.mesh),
      residuals=residuals,
    )
    self._train = placement.jit_train_step(train_step, self.mesh)
    self._eval = placement.jit_eval_step(make_eval_step(model, task), self.mesh)
    self.description = (
      f"fused: one program, data parallel over {self.mesh.size} device(s), "
      f"{microbatches} microbatch(es), gradients={gradients}, residuals={residuals}"
    )

  def memory(self, batch_size: int) -> list[DeviceMemory]:
    """What every device holds (one row: data parallelism replicates everything): the whole
    state and gradient sums, and one microbatch's residuals of every stage (the step runs the
    microbatches one after another)."""
    abstract = abstract_stages(self.stages, self.specs)
    rows = batch_size // (self.microbatches * self.mesh.size)
    K = len(self.stages)
    return [
      DeviceMemory(
        label=f"stages 1-{K}" if K > 1 else "stage 1",
        devices=tuple(self.mesh.devices.flat),
        state_bytes=sum(stage_state_bytes(a) for a in abstract),
        padding_bytes=0,
        inflight_bytes=sum(
          s.residual_bytes(a, spec, rows)
          for s, a, spec in zip(self.stages, abstract, self.specs, strict=True)
        ),
      )
    ]

  def init_state(self, rng: jax.Array) -> TrainState:
    return jax.jit(self._init, out_shardings=placement.replicated(self.mesh))(rng)

  def state_target(self, rng: jax.Array) -> TrainState:
    sharding = placement.replicated(self.mesh)
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      jax.eval_shape(self._init, rng),
    )

  def put_batch(self, batch: dict) -> dict:
    return placement.shard_batch(batch, self.mesh)

  def train_step(self, st: TrainState, batch: dict) -> tuple[TrainState, dict]:
    return self._train(st, batch)

  def eval_step(self, st: TrainState, batch: dict) -> dict:
    return self._eval(st, self.put_batch(batch))
