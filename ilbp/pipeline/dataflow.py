"""The dataflow executor: one program per stage and operation, stage k on its own devices.

Stage k's whole state (parameters, head, BatchNorm statistics, optimizer state) is committed
to stage k's devices: a ("data",) mesh of D devices per stage, K·D devices in all
(`placement.stage_meshes`). Per stage there is one jitted program per operation kind of the
schedule (`ilbp.pipeline.schedule`):

  F  stage forward of one microbatch under `jax.vjp`; returns the activation and the VJP
     (the stored residuals, a pytree that stays on the stage's devices until its last B op)
  H  the stage's loss (aux head, or the task loss on the last stage): head gradient
     accumulated, the loss's cotangent with respect to the stage output where a stage uses it
  B  one `interlock.backward_plan` op: one VJP call, weight gradient accumulated, input
     cotangents handed to the stage below
  U  the stage's optimizer update with the microbatch mean (and zeroed accumulators)

These call the same per-stage primitives as the fused engine (`interlock.stage_forward`,
`loss_step`, `stage_backward`), so the routing rule lives in one place. Activations and
cotangents move between stages with `jax.device_put`; one Python thread dispatches every op
asynchronously in the schedule's order and never waits for a device, so stages overlap across
microbatches and — with `continuous` — across optimizer steps: a stage applies its update when
its own gradients are complete and starts the next step's forwards while the stages that
still owe it nothing finish. Exact, not stale: a stage's forward for step s+1 always follows its
own update for step s. With `continuous=False` every step ends with a global flush.

One host only (a single thread drives every device); multi-host runs use the fused executor.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilbp import interlock, placement, steps
from ilbp.executor import TrainStateIsLive
from ilbp.pipeline import schedule as schedule_lib
from ilbp.pipeline import stage_ops
from ilbp.staged import StagedModel
from ilbp.state import StageState, TrainState
from ilbp.strategy import Strategy

PyTree = Any


@dataclasses.dataclass
class _Carry:
  """What stage k threads through one step on its devices, besides its StageState."""

  model_state: PyTree  # {"stage", "head"}: BatchNorm statistics move once per microbatch F/H.
  grads: PyTree  # {"stage", "head"}: gradient sums over the step's microbatches.
  metrics: list  # the stage's loss and its metrics, one dict per microbatch.


@dataclasses.dataclass(frozen=True)
class PlacedBatch:
  """A training batch cut into M microbatches: inputs on stage 0, targets on every stage."""

  inputs: list  # M arrays on stage 0's devices.
  targets: list  # K lists of M target dicts, list k on stage k's devices.


# --- The per-stage programs -------------------------------------------------------------------
# Module-level and jitted with the model, task, stage and op as static arguments, so executors
# of the same model share their compiled programs (a strategy sweep compiles F, U and eval once).
# Inputs are committed to stage k's devices, so every program runs there.


_forward = jax.jit(stage_ops.forward, static_argnames=("model", "k"))
"""F: stage k's forward of microbatch m under `jax.vjp` -> (a_k, vjp, new stage state)."""

_loss = jax.jit(stage_ops.loss, static_argnames=("model", "task", "k", "needs_input"))
"""H: loss k of microbatch m -> (cotangent or None, head grad sums, head state, metrics)."""

_backward = jax.jit(stage_ops.backward, static_argnames=("op",))
"""B: one backward-plan op -> (stage grad sums, {loss j: cotangent for the stage below})."""


@functools.partial(
  jax.jit, static_argnames=("optimizer", "lr", "k", "num_stages", "m"), donate_argnums=0
)
def _update(stage, model_state, sums, per_microbatch, step, *, optimizer, lr, k, num_stages, m):
  """U: stage k's optimizer update with the mean over its m microbatches -> (new stage state,
  zero gradient sums for the next step, the stage's metrics)."""
  mean = steps.mean_metrics(jax.tree.map(lambda *xs: jnp.stack(xs), *per_microbatch))
  stage, metrics = stage_ops.update(
    optimizer, lr, k, num_stages, m, stage.replace(model_state=model_state), sums, mean, step
  )
  return stage, jax.tree.map(jnp.zeros_like, sums), metrics


@jax.jit
def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _timed(fn: Callable, repeats: int) -> float:
  """Median milliseconds of `fn()` run to completion, after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


class DataflowExecutor(TrainStateIsLive):
  """Stages on their own devices, asynchronous dispatch in schedule order (see module doc).

  Args:
    model: the staged model.
    task: from `ilbp.tasks`.
    strategy: the interlocking strategy.
    optimizer: the per-stage optax transformation.
    schedule: learning-rate schedule (reported as `learning_rate`), or None.
    input_spec: the network input's abstract shape (batch 1 is fine).
    microbatches: M per optimizer step.
    continuous: no global flush between steps (exact; see module doc).
    data_parallel: D devices per stage.
    devices: the devices to use (default all); stage k gets devices k·D .. k·D + D - 1.
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
    continuous: bool = True,
    data_parallel: int = 1,
    devices=None,
  ):
    self.model, self.task, self.optimizer = model, task, optimizer
    self.K, self.M, self.continuous = model.num_stages, microbatches, continuous
    self.meshes = placement.stage_meshes(self.K, data_parallel, devices)
    self.replicated = [placement.replicated(m) for m in self.meshes]
    self.split = [placement.batch_sharding(m) for m in self.meshes]
    self.schedule = schedule_lib.build(strategy, self.K, microbatches, continuous)
    self.order = self.schedule.dispatch_order()
    self.specs = model.input_specs(input_spec)
    self._users = interlock.loss_users(strategy, self.K)
    self._lr = schedule
    self._host_step: int | None = None
    self._known: tuple | None = None  # (step array, rng array) of the state we returned last.
    self._rngs: list = []
    self._zeros: list = [None] * self.K  # Each stage's zero gradient sums for its next step.
    self.description = (
      f"dataflow: {self.K} stages x {data_parallel} device(s), {microbatches} microbatch(es), "
      f"{'continuous' if continuous else 'flushed every step'}; per-stage in-flight "
      f"microbatches <= {list(self.schedule.caps)}"
    )

  # --- State ------------------------------------------------------------------------------

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh TrainState: stage k is created on stage k's devices (never anywhere else)."""
    return stage_ops.init_on_stages(self.model, self.optimizer, self.specs, self.replicated, rng)

  def state_target(self, rng: jax.Array) -> TrainState:
    """The abstract TrainState with this executor's shardings (checkpoint restore target)."""
    return stage_ops.target_on_stages(self.model, self.optimizer, self.specs, self.replicated, rng)

  def _sync(self, st: TrainState) -> None:
    """Reads the step and spreads the dropout key when `st` is not the state we returned last
    (a fresh or restored one): once per run, so the step loop never waits for a device."""
    if self._known is not None and self._known[0] is st.step and self._known[1] is st.rng:
      return
    self._host_step = int(jax.device_get(st.step))
    self._rngs = [jax.device_put(st.rng, self.replicated[k]) for k in range(self.K)]

  # --- Batches ----------------------------------------------------------------------------

  def put_batch(self, batch: dict) -> PlacedBatch:
    """Cuts the batch into M microbatches (rows m·B/M ..) and places them: the network input
    on stage 0, the targets on every stage (stages 2..K never receive images or tokens)."""
    # The same cut as the fused step's (and the same error for a batch M does not divide).
    inputs = steps.split_microbatches(self.task.inputs(batch), self.M)
    targets = steps.split_microbatches(self.task.targets(batch), self.M)
    cut = lambda tree, m: jax.tree.map(lambda x: x[m], tree)
    return PlacedBatch(
      inputs=[jax.device_put(cut(inputs, m), self.split[0]) for m in range(self.M)],
      targets=[
        [jax.device_put(cut(targets, m), self.split[k]) for m in range(self.M)]
        for k in range(self.K)
      ],
    )

  # --- Steps ------------------------------------------------------------------------------

  def train_step(self, st: TrainState, batch: PlacedBatch) -> tuple[TrainState, dict]:
    """Dispatches one optimizer step in schedule order and returns without waiting (unless
    flushed): the new state and the metrics are futures on their stages' devices."""
    self._sync(st)
    step = np.int32(self._host_step)
    stages = list(st.stages)
    carry = [self._carry(k, stages[k]) for k in range(self.K)]
    acts, inbox, vjps, cots, metrics = {}, {}, {}, {}, {}
    remaining = {(k, m): len(self.schedule.plan[k]) for k in range(self.K) for m in range(self.M)}
    for op in self.order:
      k, m = op.stage, op.microbatch
      c = carry[k]
      if op.kind == "F":
        x = batch.inputs[m] if k == 0 else inbox.pop((k, m))
        params, state = stages[k].params["stage"], c.model_state["stage"]
        a, vjps[k, m], new = _forward(
          params, state, self._rngs[k], step, np.int32(m), x, model=self.model, k=k
        )
        c.model_state = {**c.model_state, "stage": new}
        acts[k, m] = a
        if k < self.K - 1:  # Sent at once, so the next stage can start while H runs here.
          inbox[k + 1, m] = jax.device_put(a, self.split[k + 1])
      elif op.kind == "H":
        a = acts.pop((k, m))
        cot, c.grads["head"], head_state, loss_metrics = _loss(
          stages[k].params["head"],
          c.model_state["head"],
          self._rngs[k],
          step,
          np.int32(m),
          a,
          batch.targets[k][m],
          c.grads["head"],
          model=self.model,
          task=self.task,
          k=k,
          needs_input=bool(self._users[k]),
        )
        c.model_state = {**c.model_state, "head": head_state}
        c.metrics.append(loss_metrics)
        if cot is not None:
          cots[k, m, k] = cot
      elif op.kind == "B":
        b = op.backward
        # Not popped: under combine="sum" a loss can feed an input-only op and the weight op.
        arrived = {j: cots[k, m, j] for j in b.losses}
        c.grads["stage"], passed = _backward(vjps[k, m], arrived, c.grads["stage"], op=b)
        for j, cot in passed.items():
          cots[k - 1, m, j] = jax.device_put(cot, self.split[k - 1])
        remaining[k, m] -= 1
        if not remaining[k, m]:  # The residuals and cotangents of a finished microbatch go.
          del vjps[k, m]
          for j in range(k, self.K):
            cots.pop((k, m, j), None)
      else:  # "U"
        stages[k], self._zeros[k], stage_metrics = _update(
          stages[k],
          c.model_state,
          c.grads,
          c.metrics,
          step,
          optimizer=self.optimizer,
          lr=self._lr,
          k=k,
          num_stages=self.K,
          m=self.M,
        )
        metrics.update(stage_metrics)
    new_step = jax.device_put(np.int32(self._host_step + 1), self.replicated[0])
    new_state = st.replace(step=new_step, stages=tuple(stages))
    self._host_step += 1
    self._known = (new_step, new_state.rng)
    if not self.continuous:
      jax.block_until_ready(new_state)
    return new_state, metrics

  def _carry(self, k: int, stage: StageState) -> _Carry:
    """Stage k's per-step carry: zero gradient sums (handed back by its last update, or made
    once on its devices)."""
    zeros = self._zeros[k]
    if zeros is None:
      zeros = _zeros_like(stage.params)
    self._zeros[k] = None  # Consumed: U hands back the next step's.
    return _Carry(model_state=stage.model_state, grads=dict(zeros), metrics=[])

  def measure_costs(
    self, st: TrainState, batch: PlacedBatch, repeats: int = 10
  ) -> tuple[list[schedule_lib.StageCost], float]:
    """Times every op kind of every stage alone, for the schedule's cost model.

    Each program runs on its stage's devices with nothing else in flight, `repeats` times
    after one warm-up call; the medians, in milliseconds: forward, head (or task loss, with the
    strategy's cotangent), input-gradient-only, weight-gradient-only and both-halves VJP calls,
    the update, and one activation transfer between stages.

    Returns:
      (K StageCost in ms, median ms of an activation transfer to the next stage).
    """
    self._sync(st)
    costs, transfers, x = [], [], batch.inputs[0]
    for k, stage in enumerate(st.stages):
      cost, a = self._measure_stage(k, stage, x, batch.targets[k][0], repeats)
      costs.append(cost)
      if k < self.K - 1:
        transfers.append(_timed(lambda a=a, k=k: jax.device_put(a, self.split[k + 1]), repeats))
        x = jax.device_put(a, self.split[k + 1])
    return costs, statistics.median(transfers) if transfers else 0.0

  def measure_slowdown(self, st: TrainState, batch: PlacedBatch, repeats: int = 10) -> float:
    """How much slower a stage's forward runs while every stage runs its own at the same time.

    Devices that share a host's cores (forced CPU devices) do not run concurrently at full
    speed; accelerators do (about 1.0). Measured as the wall time of `repeats` forwards
    dispatched on every stage at once over the slowest stage's time for its `repeats` alone.
    """
    self._sync(st)
    step, m0 = np.int32(self._host_step), np.int32(0)
    inputs, x = [], batch.inputs[0]
    for k, stage in enumerate(st.stages):
      inputs.append(x)
      a = _forward(
        stage.params["stage"], stage.model_state["stage"], self._rngs[k], step, m0, x,
        model=self.model, k=k,
      )[0]  # fmt: skip
      x = jax.device_put(a, self.split[min(k + 1, self.K - 1)])

    def run(stages):
      outs = []
      for _ in range(repeats):
        for k in stages:
          s = st.stages[k]
          outs.append(
            _forward(
              s.params["stage"], s.model_state["stage"], self._rngs[k], step, m0, inputs[k],
              model=self.model, k=k,
            )[0]
          )  # fmt: skip
      return outs

    alone = max(_timed(lambda k=k: run([k]), 3) for k in range(self.K))
    return _timed(lambda: run(range(self.K)), 3) / alone

  def _measure_stage(self, k, stage, x, targets, repeats):
    """Stage k's StageCost (ms) on microbatch input `x`, and its output."""
    step, m0, key = np.int32(self._host_step), np.int32(0), self._rngs[k]
    p, s = stage.params, stage.model_state
    fwd = lambda: _forward(p["stage"], s["stage"], key, step, m0, x, model=self.model, k=k)
    f = _timed(fwd, repeats)
    a, vjp, _ = fwd()
    zeros = _zeros_like(p)
    loss = lambda: _loss(
      p["head"], s["head"], key, step, m0, a, targets, zeros["head"], model=self.model,
      task=self.task, k=k, needs_input=bool(self._users[k]),
    )  # fmt: skip
    h = _timed(loss, repeats)
    metrics = loss()[3]
    cot = {k: jnp.ones_like(a)}
    vjp_call = lambda params, passes: _backward(
      vjp, cot, zeros["stage"], op=interlock.BackwardOp(k, (k,), params, passes)
    )
    w = _timed(lambda: vjp_call((k,), ()), repeats)
    b = _timed(lambda: vjp_call((), (k,)), repeats) if k else 0.0
    both = _timed(lambda: vjp_call((k,), (k,)), repeats) if k else None
    # The update donates its stage state: time it on fresh copies.
    copies = [jax.tree.map(jnp.copy, stage) for _ in range(repeats + 1)]
    upd = lambda: _update(
      copies.pop(), s, zeros, [metrics] * self.M, step, optimizer=self.optimizer, lr=self._lr,
      k=k, num_stages=self.K, m=self.M,
    )  # fmt: skip
    return schedule_lib.StageCost(f, h, b, w, _timed(upd, repeats), both), a

  def eval_step(self, st: TrainState, batch: dict) -> dict:
    """Every head's evaluation sums, each stage on its own devices (no microbatching)."""
    return stage_ops.evaluate_on_stages(self.model, self.task, st, batch, self.split)
