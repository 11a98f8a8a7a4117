"""Train state, optimizers and the jitted train / eval steps.

One `train_step(state, batch) -> (state, metrics)` computes the interlocking gradients of the
whole staged network from a single forward pass (`StagedModel.grads`) and applies one optax
update to every stage and head. The strategy, task and optimizer are fixed when the step is
built, so the jitted step is one program with no Python branching on data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ilbp.staged import StagedModel
from ilbp.strategy import Strategy

PyTree = Any
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step", "linear")


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: a plain pytree (checkpointed as is).

  Attributes:
    step: number of optimizer updates applied so far.
    params: {"stages": (θ_1..θ_K), "heads": (φ_1..φ_{K-1})}.
    model_state: non-parameter variables (BatchNorm statistics), laid out like params.
    opt_state: the optax state.
    rng: base key; step s uses fold_in(rng, s), so a resumed run draws the same dropout.
  """

  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  rng: jax.Array


def make_schedule(
  *,
  learning_rate: float,
  total_steps: int,
  schedule: str = "cosine",
  warmup_steps: int = 0,
  decay_boundaries: Sequence[float] = (0.5, 0.75),
  decay_factor: float = 0.1,
) -> optax.Schedule:
  """Learning-rate schedule with optional linear warm-up.

  Args:
    learning_rate: peak learning rate.
    total_steps: length of the run, in optimizer steps.
    schedule: "constant", "cosine" (to 0 at total_steps), "linear" (to 0), or "step"
      (multiply by `decay_factor` at each fraction of total_steps in `decay_boundaries`).
    warmup_steps: linear warm-up from 0 before the schedule starts.
    decay_boundaries: fractions of total_steps for the "step" schedule.
    decay_factor: multiplier at each boundary of the "step" schedule.

  Returns:
    An optax schedule (step -> learning rate).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}.")
  if warmup_steps < 0 or warmup_steps > total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}.")
  rest = max(total_steps - warmup_steps, 1)
  if schedule == "constant":
    main = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(learning_rate, rest)
  elif schedule == "linear":
    main = optax.linear_schedule(learning_rate, 0.0, rest)
  else:
    boundaries = {int(f * total_steps) - warmup_steps: decay_factor for f in decay_boundaries}
    main = optax.piecewise_constant_schedule(learning_rate, boundaries)
  if not warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(
  *,
  name: str = "sgd",
  learning_rate: float = 0.1,
  total_steps: int = 1,
  schedule: str = "cosine",
  warmup_steps: int = 0,
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  grad_clip_norm: float | None = None,
  decay_boundaries: Sequence[float] = (0.5, 0.75),
  decay_factor: float = 0.1,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer and its learning-rate schedule.

  Weight decay applies to weight matrices and convolution kernels (ndim > 1), not to biases
  or normalisation scales. Gradient clipping, when set, clips every stage's and every head's
  gradient separately: a stage never sees another device's gradients, so the model-parallel
  semantics hold.

  Args:
    name: "sgd" (heavy-ball momentum, decoupled L2 added to the gradient) or "adamw".
    learning_rate, total_steps, schedule, warmup_steps, decay_boundaries, decay_factor: see
      `make_schedule`.
    momentum, nesterov: SGD momentum.
    weight_decay: L2 coefficient (SGD) or decoupled decay (AdamW).
    b1, b2, eps: Adam moments.
    grad_clip_norm: per-stage / per-head global-norm clip, or None.

  Returns:
    (optimizer, schedule).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.")
  schedule_fn = make_schedule(
    learning_rate=learning_rate,
    total_steps=total_steps,
    schedule=schedule,
    warmup_steps=warmup_steps,
    decay_boundaries=decay_boundaries,
    decay_factor=decay_factor,
  )
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  parts = []
  if grad_clip_norm:
    parts.append(_clip_per_module(grad_clip_norm))
  if name == "sgd":
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, decay_mask))
    parts.append(optax.sgd(schedule_fn, momentum=momentum or None, nesterov=nesterov))
  else:
    parts.append(optax.adamw(schedule_fn, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule_fn


def _clip_per_module(max_norm: float) -> optax.GradientTransformation:
  """clip_by_global_norm applied to each stage and head subtree on its own."""
  clip = optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    del params
    clipped = {
      group: tuple(clip.update(u, optax.EmptyState())[0] for u in subtrees)
      for group, subtrees in updates.items()
    }
    return clipped, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create_train_state(
  model: StagedModel,
  optimizer: optax.GradientTransformation,
  rng: jax.Array,
  example_inputs: jax.Array,
) -> TrainState:
  """Initialises parameters, model state and optimizer state.

  Args:
    model: the staged model.
    optimizer: from `make_optimizer`.
    rng: PRNG key; split into an init key and the state's dropout key.
    example_inputs: a batch with the input shape (values are not used).

  Returns:
    A TrainState at step 0.
  """
  init_rng, dropout_rng = jax.random.split(rng)
  params, model_state = model.init(init_rng, example_inputs)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=optimizer.init(params),
    rng=dropout_rng,
  )


def _norms(tree: PyTree, prefix: str) -> dict:
  out = {}
  for group in ("stages", "heads"):
    for k, sub in enumerate(tree[group]):
      out[f"{prefix}/{group[:-1]}{k + 1}"] = optax.global_norm(sub)
  return out


def make_train_step(
  model: StagedModel,
  task: Any,
  strategy: Strategy,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  Args:
    model: the staged model.
    task: a task from `ilbp.tasks` (inputs, loss).
    strategy: the interlocking strategy.
    optimizer: the optax optimizer the state was created with.
    schedule: learning-rate schedule, reported as a metric when given.

  Returns:
    The step function. Metrics: `head{k}/loss`, `head{k}/accuracy` for every head (head K is
    the network's output), per-stage and per-head gradient and parameter norms, and the
    learning rate.
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    grads, model_state, metrics = model.grads(
      state.params,
      state.model_state,
      task.inputs(batch),
      batch,
      strategy=strategy,
      loss_fn=task.loss,
      rng=rng,
      loss_has_aux=True,
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(_norms(grads, "grad_norm"))
    metrics.update(_norms(params, "param_norm"))
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    new_state = state.replace(
      step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    return new_state, metrics

  return train_step


def make_eval_step(model: StagedModel, task: Any) -> Callable[[TrainState, dict], dict]:
  """Builds `eval_step(state, batch) -> sums` for every head from one forward pass.

  Returns:
    A function returning `head{k}/loss` and `head{k}/accuracy` sums for k = 1..K, and `count`
    (the number of real examples or tokens). Divide after summing over batches
    (`task.finalize`).
  """

  def eval_step(state: TrainState, batch: dict) -> dict:
    logits, _ = model.apply(state.params, state.model_state, task.inputs(batch), train=False)
    sums = {}
    for k, head_logits in enumerate(logits):
      head_sums = task.eval_sums(head_logits, batch)
      sums["count"] = head_sums.pop("count")
      sums.update({f"head{k + 1}/{name}": v for name, v in head_sums.items()})
    return sums

  return eval_step
