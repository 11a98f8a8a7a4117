"""The per-stage layer: what every executor runs for one stage, bound once in a `Stage`.

A schedule's ops for stage k, as methods of one frozen object that holds everything they need
(the model and task, k, the stage's backward plan, its optimizer and learning-rate schedule,
M):

  F  `Stage.forward`   the stage forward of one microbatch under `jax.vjp`
  H  `Stage.loss`      the stage's loss (aux head, or the task loss on the last stage): head
                       gradient accumulated, the cotangent w.r.t. the stage output if used
  B  `Stage.backward`  one op of the stage's backward plan (`interlock.StagePlan`)
  U  `Stage.update`    the optimizer update with the mean of the step's gradient sums
     `Stage.evaluate`  the inference forward and the head's evaluation sums

The fused executor calls them inside its one program, the dataflow executor jits each on its
own (one program per stage and op), the SPMD executor calls them inside the branches of its
scan: all three compute exactly the same thing, and the routing rule stays in
`ilbp.interlock`. A `Stage` is hashable by value, so it is a static argument of `jax.jit`.

Also here: what a microbatch means everywhere (`split_microbatches`, `microbatch_rng`,
`mean_metrics`, `named_sums`) and a TrainState made (or restored) stage by stage, each stage
on its own devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilbp import interlock
from ilbp.execution.memory import tree_bytes
from ilbp.models.conv import CHECKPOINT_NAME
from ilbp.staged import StagedModel
from ilbp.state import StageState, TrainState, init_keys, init_stage_state
from ilbp.strategy import Strategy

PyTree = Any

# What a stage's forward keeps for its backward (`Stage.residuals`):
#   "all"      every residual `jax.vjp` keeps (activations, normalised values, masks, ...);
#   "matmuls"  only the outputs of matrix products and convolutions (and the stage's input and
#              parameters): the backward recomputes the elementwise ops between them (norms,
#              activations, dropout masks from the same key): the same values to float
#              rounding, ~4x fewer bytes held per in-flight microbatch on resnet20, some
#              recompute time (docs/pipeline.md).
RESIDUALS = ("all", "matmuls")
_MATMULS = jax.checkpoint_policies.save_from_both_policies(
  jax.checkpoint_policies.dots_saveable,
  jax.checkpoint_policies.save_only_these_names(CHECKPOINT_NAME),
)


def sum_squares(tree: PyTree) -> jax.Array:
  """The squared global norm of a tree, summed leaf by leaf as `optax.global_norm` sums it."""
  return sum((jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


# --- Microbatches: one meaning for every executor ---------------------------------------------


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


def named_sums(per_head: list[dict]) -> dict:
  """Per-head eval sums -> `head{k}/{name}` plus one `count`."""
  out = {}
  for k, sums in enumerate(per_head):
    sums = dict(sums)
    out["count"] = sums.pop("count")
    out.update({f"head{k + 1}/{name}": v for name, v in sums.items()})
  return out


@dataclasses.dataclass(frozen=True)
class Where:
  """Which microbatch of which step an op works on: (dropout base key, step, microbatch)."""

  rng: jax.Array
  step: Any
  microbatch: Any

  def key(self) -> jax.Array:
    return microbatch_rng(self.rng, self.step, self.microbatch)


jax.tree_util.register_dataclass(Where, data_fields=["rng", "step", "microbatch"], meta_fields=[])


# --- One stage's ops ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
  """Stage k's ops, bound once (see the module doc).

  Attributes:
    model: the staged model.
    task: from `ilbp.tasks` (inputs, targets, loss, eval sums).
    k: the stage (0-based).
    plan: the stage's backward plan and whether its own loss needs its input cotangent.
    optimizer: the per-stage optax transformation.
    lr: the learning-rate schedule, reported by stage 0's update (or None).
    microbatches: M, the microbatches one update averages over.
    residuals: what the forward keeps for the backward, one of `RESIDUALS`.
  """

  model: StagedModel
  task: Any
  k: int
  plan: interlock.StagePlan
  optimizer: optax.GradientTransformation | None = None
  lr: optax.Schedule | None = None
  microbatches: int = 1
  residuals: str = "all"

  @property
  def num_stages(self) -> int:
    return self.model.num_stages

  @property
  def has_head(self) -> bool:
    """Every stage but the last has an auxiliary head; the last ends in the task loss."""
    return self.k < self.num_stages - 1

  def forward(self, params, state, where: Where, x):
    """F: the stage forward of one microbatch under `jax.vjp`.

    Args:
      params, state: the stage's {"stage"} parameters and statistics.
      where: the microbatch (its dropout key).
      x: the stage input a_{k-1}.

    Returns:
      `(a_k, vjp, new stage statistics)`; the VJP holds the residuals (`self.residuals`).
    """
    key = where.key()
    f = lambda p, x: self.model.stage_apply(
      self.k, {"stage": p}, {"stage": state}, x, train=True, rng=key
    )
    if self.residuals == "matmuls":
      f = jax.checkpoint(f, policy=_MATMULS)
    return interlock.stage_forward(f, params, x, has_aux=True)

  def loss(self, params, state, where: Where, a, targets, grads):
    """H: the stage's loss on its output `a`.

    Args:
      params, state: the head's parameters and statistics (ignored by the last stage).
      where: the microbatch.
      a: the stage output a_k.
      targets: the microbatch's targets.
      grads: the head's gradient sums so far (the new term is added).

    Returns:
      `(cotangent w.r.t. a_k or None, head gradient sums, new head statistics, metrics)` with
      metrics `{"loss": ..., **the task's per-example metrics}`.
    """
    key = where.key()
    head = lambda p, a: self.model.head_apply(
      self.k, {"head": p}, {"head": state}, a, train=True, rng=key
    )
    value, metrics, head_grads, cot, new_state = interlock.loss_step(
      head if self.has_head else None,
      self.task.loss,
      params,
      a,
      targets,
      needs_input=self.plan.needs_input,
      has_aux=self.has_head,
      loss_has_aux=True,
    )
    if self.has_head:
      grads = jax.tree.map(jnp.add, grads, head_grads)
    else:
      new_state = state
    return cot, grads, new_state, {"loss": value, **metrics}

  def backward(self, vjp, arrived: dict, grads, op: interlock.BackwardOp, keep_input=False):
    """B: one op of the stage's plan.

    Args:
      vjp: the microbatch's VJP from `forward`.
      arrived: {loss j: cotangent w.r.t. a_k}; holds every loss of `op.losses`.
      grads: the stage's {"stage"} gradient sums so far.
      op: one of `self.plan.ops`.
      keep_input: also return the cotangent w.r.t. the stage input (`interlock.stage_backward`).

    Returns:
      `(stage gradient sums, {loss j: cotangent w.r.t. a_{k-1}} for the stage below)`, and
      with `keep_input` the input's cotangent third.
    """
    d_params, passed, d_input = interlock.stage_backward(vjp, op, arrived, keep_input=True)
    if d_params is not None:
      # The barrier keeps XLA:CPU from fusing the weight-gradient dots into the update of the
      # sums (in the SPMD program's flat buffers that made one op 16.6 ms instead of 2.1).
      grads = jax.tree.map(jnp.add, grads, jax.lax.optimization_barrier(d_params))
    return (grads, passed, d_input) if keep_input else (grads, passed)

  def update(self, stage: StageState, sums: PyTree, head_metrics: dict, step, elsewhere=None):
    """U: the optimizer update with the mean of the gradient sums over M microbatches.

    Args:
      stage: the stage's state (its statistics already those after the step's forwards).
      sums: {"stage", "head"} gradient sums over the step's microbatches.
      head_metrics: the stage's loss metrics, already averaged over the microbatches.
      step: the step being completed (stage 0 reports its learning rate).
      elsewhere: {"grad", "param"}: squared norms of the part of this stage's "stage"
        parameters held on other devices (its mean gradient; its parameters after their own
        update this step), or None. The clip and the norms reported are then the whole's
        (`ilbp.execution.spmd.vocab`: a token table split over the stages).

    Returns:
      `(new stage state, metrics)`: head{k+1}/..., gradient and parameter norms, and
      `learning_rate` on stage 0 when `lr` is given.
    """
    grads = jax.tree.map(lambda g: g / self.microbatches, sums)
    norm, extra = lambda part, tree: optax.global_norm(tree), {}
    if elsewhere is not None:
      norm = lambda part, tree: jnp.sqrt(sum_squares(tree) + elsewhere[part])
      extra = {"module_norms": {"stage": norm("grad", grads["stage"])}}
    optimizer = optax.with_extra_args_support(self.optimizer)
    updates, opt_state = optimizer.update(grads, stage.opt_state, stage.params, **extra)
    params = optax.apply_updates(stage.params, updates)
    metrics = {f"head{self.k + 1}/{name}": v for name, v in head_metrics.items()}
    for prefix, part, tree in (("grad_norm", "grad", grads), ("param_norm", "param", params)):
      metrics[f"{prefix}/stage{self.k + 1}"] = norm(part, tree["stage"])
      if self.has_head:
        metrics[f"{prefix}/head{self.k + 1}"] = optax.global_norm(tree["head"])
    stage = stage.replace(params=params, opt_state=opt_state)
    if self.k == 0 and self.lr is not None:
      metrics["learning_rate"] = self.lr(step)
    return stage, metrics

  def evaluate(self, params, state, a, targets):
    """The inference forward and the loss's evaluation sums.

    Args:
      params, state: the stage's {"stage", "head"} parameters and statistics.

    Returns:
      `(a_k, sums)`: the stage output and `task.eval_sums` of head k+1 (the network's output
      on the last stage), with the example/token `count`.
    """
    a, _ = self.model.stage_apply(self.k, params, state, a, train=False)
    logits = a
    if self.has_head:
      logits, _ = self.model.head_apply(self.k, params, state, a, train=False)
    return a, self.task.eval_sums(logits, targets)

  def residual_bytes(self, abstract: StageState, input_spec, rows: int) -> int:
    """Bytes F keeps for B: the VJP residuals of one microbatch of `rows` examples.

    Args:
      abstract: the stage's StageState as shapes (`abstract_stages`).
      input_spec: the stage input's abstract shape (any leading batch size).
      rows: examples per microbatch on one device.
    """
    x = jax.ShapeDtypeStruct((rows, *input_spec.shape[1:]), input_spec.dtype)
    forward = lambda p, s, x: self.forward(p, s, Where(jax.random.PRNGKey(0), 0, 0), x)[1]
    return tree_bytes(
      jax.eval_shape(forward, abstract.params["stage"], abstract.model_state["stage"], x)
    )

  def init(self, input_spec) -> Callable:
    """init_rng -> the stage's fresh StageState (jit it with the stage's shardings)."""
    return lambda init_rng: init_stage_state(
      self.model, self.optimizer, self.k, init_rng, input_spec
    )


def make_stages(
  model: StagedModel,
  task: Any,
  strategy: Strategy,
  optimizer: optax.GradientTransformation | None = None,
  lr: optax.Schedule | None = None,
  microbatches: int = 1,
  residuals: str = "all",
) -> tuple[Stage, ...]:
  """Every stage's `Stage`, their plans from `interlock.stage_plans`."""
  if residuals not in RESIDUALS:
    raise ValueError(f"Unknown residuals={residuals!r}; valid: {', '.join(RESIDUALS)}.")
  plans = interlock.stage_plans(strategy, model.num_stages)
  return tuple(
    Stage(model, task, k, plans[k], optimizer, lr, microbatches, residuals)
    for k in range(model.num_stages)
  )


# --- State on each stage's devices -------------------------------------------------------------


def init_on_stages(
  stages: Sequence[Stage], specs, shardings: Sequence, rng: jax.Array, scalars=None
) -> TrainState:
  """A fresh TrainState whose stage k is created on `shardings[k]` (never anywhere else); the
  step and dropout key on `scalars` (default `shardings[0]`). Every array is made by a jitted
  program onto its sharding, so stages may sit on other processes' devices."""
  scalars = shardings[0] if scalars is None else scalars
  states = [init_stage_on(s, specs[k], shardings[k], rng) for k, s in enumerate(stages)]
  step, dropout_rng = init_scalars_on(scalars, rng)
  return TrainState(step=step, rng=dropout_rng, stages=tuple(states))


def init_stage_on(stage: Stage, spec, sharding, rng: jax.Array, then=None) -> StageState:
  """Stage `stage.k`'s fresh StageState, created by a jitted program onto `sharding` (so it
  may sit on another process's devices); the same values as `init_on_stages` gives it.
  `then`, given, is applied to it inside the program (what is not kept is never made)."""
  key = np.asarray(rng)  # The same host value on every process.
  init = stage.init(spec)
  then = then or (lambda st: st)
  return jax.jit(lambda r: then(init(init_keys(r)[0])), out_shardings=sharding)(key)


def init_scalars_on(sharding, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A fresh TrainState's (step, dropout key) on `sharding`."""
  fn = lambda r: (jnp.zeros((), jnp.int32), init_keys(r)[1])
  return jax.jit(fn, out_shardings=(sharding, sharding))(np.asarray(rng))


def abstract_stages(stages: Sequence[Stage], specs) -> list[StageState]:
  """Every stage's StageState as shapes and dtypes only."""
  init_rng = jax.eval_shape(init_keys, jax.random.PRNGKey(0))[0]
  return [jax.eval_shape(stage.init(specs[k]), init_rng) for k, stage in enumerate(stages)]


def target_on_stages(
  stages: Sequence[Stage], specs, shardings: Sequence, rng: jax.Array, scalars=None
) -> TrainState:
  """The abstract TrainState of `init_on_stages` (a checkpoint restore target)."""
  scalars = shardings[0] if scalars is None else scalars
  dropout_rng = jax.eval_shape(init_keys, rng)[1]
  spec = lambda sharding: lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  per_stage = tuple(
    jax.tree.map(spec(shardings[k]), abstract)
    for k, abstract in enumerate(abstract_stages(stages, specs))
  )
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=scalars)
  return TrainState(step=scalar, rng=spec(scalars)(dropout_rng), stages=per_stage)
