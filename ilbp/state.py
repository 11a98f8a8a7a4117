"""The train state, laid out by stage, and the optimizers that update it.

`TrainState` holds the step, the dropout key and one `StageState` per stage: that stage's
parameters and head, its model state (BatchNorm statistics) and its own optax state. Stage k's
whole state can therefore live on stage k's devices, and every executor (fused, dataflow)
reads and writes the same pytree, so one checkpoint layout serves them all.

Every stage runs the same optax transformation on its own {"stage", "head"} tree; gradient
clipping clips a stage and its head separately, so no stage ever sees another's gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilbp.staged import StagedModel

PyTree = Any
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step", "linear", "piecewise")


@flax.struct.dataclass
class StageState:
  """One stage's share of the train state: everything that lives on its devices.

  Attributes:
    params: {"stage": θ_k, "head": φ_k} (the last stage's head is empty).
    model_state: {"stage": ..., "head": ...} non-parameter variables (BatchNorm statistics).
    opt_state: the optax state of `params`.
  """

  params: PyTree
  model_state: PyTree
  opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class HostLeaf:
  """One leaf of the train state as a checkpoint sees it on the host of one process.

  Stages on different processes are saved and restored without gathering (`ilbp.checkpoint`):
  saving, `value` is the host copy on the one process that writes the leaf and None on every
  other; restoring (a target), `value` is None and `sharding` says where the leaf goes.

  A leaf split by rows over processes (a token table split over the stages) has `pieces`:
  saving, `((first row, host rows), ...)`, the rows this process writes (in chunks of
  `chunk_rows` rows, the same on every process, so no chunk has two writers); restoring,
  `((first row, end row, rows, sharding), ...)`, and the leaf comes back as
  `Shards`: piece i is rows [first, end) zero-padded to `rows` rows
  on its sharding (first = end = None: the whole leaf).

  Attributes:
    shape, dtype: the leaf's.
    value: the host copy to write, or None.
    sharding: the restore target's placement (restoring only).
    pieces: see above; empty for a leaf written or read whole.
    chunk_rows: saving pieces, rows per chunk on disk.
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  value: np.ndarray | None = None
  sharding: jax.sharding.Sharding | None = None
  pieces: tuple = ()
  chunk_rows: int | None = None

  @classmethod
  def target(cls, tree: Any) -> Any:
    """Abstract arrays with shardings -> HostLeaf restore targets."""
    return jax.tree.map(lambda a: cls(tuple(a.shape), np.dtype(a.dtype), None, a.sharding), tree)


class Shards:
  """A leaf held in pieces, piece k on stage k's devices (`HostLeaf.pieces` restored).

  Not a pytree node: tree functions see one leaf.
  """

  def __init__(self, pieces: Sequence[jax.Array]):
    self.pieces = tuple(pieces)


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: a plain pytree (checkpointed as is).

  Attributes:
    step: number of optimizer updates applied so far.
    rng: base key; step s uses fold_in(rng, s), microbatch m fold_in(that, m), so a resumed
      run draws the same dropout whatever the executor.
    stages: one StageState per stage.
  """

  step: jax.Array
  rng: jax.Array
  stages: tuple[StageState, ...]

  @property
  def params(self) -> tuple:
    return tuple(s.params for s in self.stages)

  @property
  def model_state(self) -> tuple:
    return tuple(s.model_state for s in self.stages)


def make_schedule(
  *,
  learning_rate: float,
  total_steps: int,
  schedule: str = "cosine",
  warmup_steps: int = 0,
  decay_boundaries: Sequence[float] = (0.5, 0.75),
  decay_factor: float = 0.1,
  decay_steps: Sequence[int] = (),
) -> optax.Schedule:
  """Learning-rate schedule with optional linear warm-up.

  Args:
    learning_rate: peak learning rate.
    total_steps: length of the run, in optimizer steps.
    schedule: "constant", "cosine" (to 0 at total_steps), "linear" (to 0), "step"
      (multiply by `decay_factor` at each fraction of total_steps in `decay_boundaries`) or
      "piecewise" (multiply by `decay_factor` at each step in `decay_steps`).
    warmup_steps: linear warm-up from 0 before the schedule starts.
    decay_boundaries: fractions of total_steps for the "step" schedule.
    decay_factor: multiplier at each boundary of the "step" and "piecewise" schedules.
    decay_steps: "piecewise" boundaries, increasing and after the warm-up: the update made
      after b updates is the first at the lower rate. Boundaries past total_steps never come.

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
  elif schedule == "step":
    boundaries = {int(f * total_steps) - warmup_steps: decay_factor for f in decay_boundaries}
    main = optax.piecewise_constant_schedule(learning_rate, boundaries)
  else:
    steps = [int(b) for b in decay_steps]
    if not steps or steps != sorted(set(steps)) or steps[0] <= warmup_steps:
      raise ValueError(
        f"schedule='piecewise' needs decay_steps increasing and after the warm-up "
        f"(warmup_steps={warmup_steps}), got {tuple(decay_steps)}."
      )
    main = optax.piecewise_constant_schedule(
      learning_rate, {b - warmup_steps: decay_factor for b in steps}
    )
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
  decay_steps: Sequence[int] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer and its learning-rate schedule.

  The optimizer updates one stage's {"stage", "head"} tree (each stage has its own). Weight
  decay applies to weight matrices and convolution kernels (ndim > 1), not to biases or
  normalisation scales. Gradient clipping, when set, clips the stage's and the head's gradient
  separately: a stage never sees another device's gradients.

  Args:
    name: "sgd" (heavy-ball momentum, decoupled L2 added to the gradient) or "adamw".
    learning_rate, total_steps, schedule, warmup_steps, decay_boundaries, decay_factor,
      decay_steps: see `make_schedule`.
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
    decay_steps=decay_steps,
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


def _clip_per_module(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """clip_by_global_norm applied to each top-level subtree ("stage", "head") on its own.

  `update` takes one extra argument, `module_norms`: {subtree: its global norm} for a subtree
  part of which lives elsewhere (a token table split over devices,
  `ilbp.execution.spmd.vocab`), so every part is clipped by the whole's norm. Without it each
  subtree's norm is its own, as optax computes it. The state is optax's EmptyState, as
  checkpoints written before this hold.
  """

  def update(updates, state, params=None, *, module_norms=None, **extra):
    del params, extra

    def clip(name, tree):
      norm = optax.tree.norm(tree) if name not in (module_norms or {}) else module_norms[name]
      trigger = jnp.squeeze(norm < max_norm)  # optax.clip_by_global_norm's rule.
      scale = lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)
      return jax.tree.map(scale, tree)

    return {name: clip(name, tree) for name, tree in updates.items()}, state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def init_stage_state(
  model: StagedModel,
  optimizer: optax.GradientTransformation,
  k: int,
  rng: jax.Array,
  input_spec: jax.ShapeDtypeStruct,
) -> StageState:
  """Stage k's parameters, model state and optimizer state, from its input's abstract shape.

  Jitted with stage k's shardings (`ilbp.execution.dataflow`), it creates them on stage k's
  devices only; `create_train_state` calls it for every stage.

  Args:
    model: the staged model.
    optimizer: from `make_optimizer`.
    k: 0-based stage index.
    rng: the run's init key (`init_keys`).
    input_spec: shape and dtype of the stage's input (`StagedModel.input_specs`).
  """
  params, model_state = model.init_stage(k, rng, input_spec)
  return StageState(params=params, model_state=model_state, opt_state=optimizer.init(params))


def init_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(parameter init key, dropout base key) of a run's seed key."""
  init_rng, dropout_rng = jax.random.split(rng)
  return init_rng, dropout_rng


def create_train_state(
  model: StagedModel,
  optimizer: optax.GradientTransformation,
  rng: jax.Array,
  example_inputs: Any,
) -> TrainState:
  """Initialises every stage's parameters, model state and optimizer state.

  Args:
    model: the staged model.
    optimizer: from `make_optimizer`.
    rng: PRNG key; split into an init key and the state's dropout key (`init_keys`).
    example_inputs: an array (or ShapeDtypeStruct) with the input shape; values are unused.

  Returns:
    A TrainState at step 0.
  """
  init_rng, dropout_rng = init_keys(rng)
  specs = model.input_specs(example_inputs)
  stages = tuple(init_stage_state(model, optimizer, k, init_rng, s) for k, s in enumerate(specs))
  return TrainState(step=jnp.zeros((), jnp.int32), rng=dropout_rng, stages=stages)
