"""The dataflow executor: one program per stage and operation, stage k on its own devices.

Stage k's whole state (parameters, head, BatchNorm statistics, optimizer state) is committed
to stage k's devices: a ("data",) mesh of D devices per stage, K·D devices in all
(`placement.stage_meshes`). Per stage there is one jitted program per operation kind of the
schedule (`ilbp.execution.schedule`), each a method of the stage's `Stage`
(`ilbp.execution.stage`, the per-stage layer every executor runs):

  F  `Forward`   the stage forward of one microbatch under `jax.vjp`; returns the activation
                 and the VJP (the stored residuals, a pytree that stays on the stage's devices
                 until its last B op)
  H  `Loss`      the stage's loss (aux head, or the task loss on the last stage): head gradient
                 accumulated, the cotangent w.r.t. the stage output where a stage uses it
  B  `Backward`  one op of the stage's backward plan: one VJP call, weight gradient
                 accumulated, input cotangents handed to the stage below
  U  `Update`    the stage's optimizer update with the microbatch mean (and zeroed sums)

Activations and
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ilbp import placement
from ilbp.execution import schedule as schedule_lib
from ilbp.execution.base import TrainStateIsLive
from ilbp.execution.memory import DeviceMemory, stage_state_bytes, tree_bytes
from ilbp.execution.schedule import Backward, Forward, Loss, Update
from ilbp.execution.stage import (
  Stage,
  Where,
  abstract_stages,
  init_on_stages,
  make_stages,
  mean_metrics,
  named_sums,
  split_microbatches,
  target_on_stages,
)
from ilbp.interlock import BackwardOp
from ilbp.staged import StagedModel
from ilbp.state import StageState, TrainState
from ilbp.strategy import Strategy
from ilbp.timing import median_ms

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
# `Stage` methods jitted with the Stage (hashable by value) static, so executors of the same
# model, strategy and optimizer share their compiled programs. Inputs are committed to stage
# k's devices, so every program runs there.

_forward = jax.jit(Stage.forward, static_argnums=0)
_loss = jax.jit(Stage.loss, static_argnums=0)
_backward = jax.jit(Stage.backward, static_argnums=(0, 4))
_evaluate = jax.jit(Stage.evaluate, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _update(stage: Stage, state: StageState, model_state, sums, per_microbatch, step):
  """U, with the mean over the step's microbatches -> (new stage state, zero gradient sums for
  the next step, the stage's metrics)."""
  mean = mean_metrics(jax.tree.map(lambda *xs: jnp.stack(xs), *per_microbatch))
  new, metrics = stage.update(state.replace(model_state=model_state), sums, mean, step)
  return new, jax.tree.map(jnp.zeros_like, sums), metrics


@jax.jit
def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


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
    pipeline: the pipeline schedule, one of `schedule.SCHEDULES` (gpipe, 1f1b, zb;
      `config.execution.schedule`).
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
    pipeline: str = "1f1b",
    data_parallel: int = 1,
    devices=None,
    residuals: str = "all",
  ):
    self.task = task
    self.K, self.M, self.continuous = model.num_stages, microbatches, continuous
    self.stages = make_stages(model, task, strategy, optimizer, schedule, microbatches, residuals)
    self.meshes = placement.stage_meshes(self.K, data_parallel, devices)
    self.replicated = [placement.replicated(m) for m in self.meshes]
    self.split = [placement.batch_sharding(m) for m in self.meshes]
    self.specs = model.input_specs(input_spec)
    self._host_step: int | None = None
    self._known: tuple | None = None  # (step array, rng array) of the state we returned last.
    self._rngs: list = []
    self._zeros: list = [None] * self.K  # Each stage's zero gradient sums for its next step.
    self._run(schedule_lib.build(strategy, self.K, microbatches, continuous, schedule=pipeline))

  def _run(self, sched: schedule_lib.Schedule, costs: str = "relative") -> None:
    """Makes `sched` the schedule that `train_step` follows (its dispatch order) and says so
    in `description`; `costs` names where its op costs came from."""
    self.schedule, self.order = sched, sched.dispatch_order()
    D = self.meshes[0].size
    split = ""
    if sched.split:  # zb: per stage, the first microbatch whose merged VJP calls are split.
      what = "nothing split" if min(sched.split) >= self.M else "split from microbatch"
      split = f", {what} {list(sched.split)} ({costs} costs)"
    self.description = (
      f"dataflow: {self.K} stages x {D} device(s), {self.M} microbatch(es), "
      f"{'continuous' if self.continuous else 'flushed every step'}, {sched.name}{split}; "
      f"per-stage in-flight microbatches <= {list(sched.caps)}, "
      f"residuals={self.stages[0].residuals}"
    )

  def use_costs(self, costs: schedule_lib.MeasuredCosts) -> bool:
    """Under `zb`, runs the split that measured op costs predict fastest for this model.

    The schedule is rebuilt from `costs` exactly as `schedule.predict_step` builds the one it
    simulates (`schedule.measured_schedule`, split=None), so the executor runs the split, and
    the dispatch order, the cost model predicts for it. Every split trains alike (the same
    sums, from one VJP call or two: tests/test_pipeline.py holds it to the fused step); only
    the time differs. gpipe and 1f1b have no split: their schedule is left as it is. Call it
    between steps (before the first, typically).

    Args:
      costs: op costs of this model, ideally at this executor's microbatch size
        (`measure`, or a run's pipeline_costs.json).

    Returns:
      Whether the split or the dispatch order changed (a new split may compile VJP programs
      on its first step).

    Raises:
      ValueError: if `costs` is not for this executor's K stages.
    """
    if self.schedule.name != "zb":
      return False
    if len(costs.stages) != self.K:
      raise ValueError(
        f"use_costs: the costs are for {len(costs.stages)} stages, this executor has {self.K}; "
        "measure them on an executor of the same model split."
      )
    s, order = self.schedule, self.order
    self._run(
      schedule_lib.measured_schedule(costs, s.strategy, s.microbatches, s.name, s.continuous),
      "measured",
    )
    return (self.schedule.split, self.order) != (s.split, order)

  # --- State ------------------------------------------------------------------------------

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh TrainState: stage k is created on stage k's devices (never anywhere else)."""
    return init_on_stages(self.stages, self.specs, self.replicated, rng)

  def state_target(self, rng: jax.Array) -> TrainState:
    """The abstract TrainState with this executor's shardings (checkpoint restore target)."""
    return target_on_stages(self.stages, self.specs, self.replicated, rng)

  def _sync(self, st: TrainState) -> None:
    """Reads the step and spreads the dropout key when `st` is not the state we returned last
    (a fresh or restored one): once per run, so the step loop never waits for a device."""
    if self._known is not None and self._known[0] is st.step and self._known[1] is st.rng:
      return
    self._host_step = int(jax.device_get(st.step))
    self._rngs = [jax.device_put(st.rng, self.replicated[k]) for k in range(self.K)]

  def _where(self, k: int, m: int) -> Where:
    """Microbatch m of the current step, with stage k's copy of the dropout key."""
    return Where(self._rngs[k], np.int32(self._host_step), np.int32(m))

  def memory(self, batch_size: int) -> list[DeviceMemory]:
    """Per stage, what each of its devices holds: its own state and gradient sums, and the
    residuals of the microbatches the schedule keeps in flight there."""
    abstract = abstract_stages(self.stages, self.specs)
    rows = batch_size // (self.M * self.meshes[0].size)
    inflight = self.schedule.simulate(1).inflight_max
    return [
      DeviceMemory(
        label=f"stage {k + 1}",
        devices=tuple(self.meshes[k].devices.flat),
        state_bytes=stage_state_bytes(abstract[k]),
        padding_bytes=0,
        inflight_bytes=inflight[k] * stage.residual_bytes(abstract[k], self.specs[k], rows),
      )
      for k, stage in enumerate(self.stages)
    ]

  # --- Batches ----------------------------------------------------------------------------

  def put_batch(self, batch: dict) -> PlacedBatch:
    """Cuts the batch into M microbatches (rows m·B/M ..) and places them: the network input
    on stage 0, the targets on every stage (stages 2..K never receive images or tokens)."""
    # The same cut as the fused step's (and the same error for a batch M does not divide).
    inputs = split_microbatches(self.task.inputs(batch), self.M)
    targets = split_microbatches(self.task.targets(batch), self.M)
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
    states = list(st.stages)
    carry = [self._carry(k, states[k]) for k in range(self.K)]
    acts, inbox, vjps, cots, metrics = {}, {}, {}, {}, {}
    remaining = {
      (k, m): len(self.schedule.plan_for(k, m)) for k in range(self.K) for m in range(self.M)
    }
    for op in self.order:
      k, m = op.stage, op.microbatch
      stage, c = self.stages[k], carry[k]
      match op:
        case Forward():
          x = batch.inputs[m] if k == 0 else inbox.pop((k, m))
          params, state = states[k].params["stage"], c.model_state["stage"]
          a, vjps[k, m], new = _forward(stage, params, state, self._where(k, m), x)
          c.model_state = {**c.model_state, "stage": new}
          acts[k, m] = a
          if k < self.K - 1:  # Sent at once, so the next stage can start while H runs here.
            inbox[k + 1, m] = jax.device_put(a, self.split[k + 1])
        case Loss():
          params, state = states[k].params["head"], c.model_state["head"]
          cot, c.grads["head"], head_state, loss_metrics = _loss(
            stage, params, state, self._where(k, m), acts.pop((k, m)), batch.targets[k][m],
            c.grads["head"],
          )  # fmt: skip
          c.model_state = {**c.model_state, "head": head_state}
          c.metrics.append(loss_metrics)
          if cot is not None:
            cots[k, m, k] = cot
        case Backward(backward=b):
          # Not popped: under combine="sum" a loss can feed an input-only op and the weight op.
          arrived = {j: cots[k, m, j] for j in b.losses}
          c.grads["stage"], passed = _backward(stage, vjps[k, m], arrived, c.grads["stage"], b)
          for j, cot in passed.items():
            cots[k - 1, m, j] = jax.device_put(cot, self.split[k - 1])
          remaining[k, m] -= 1
          if not remaining[k, m]:  # The residuals and cotangents of a finished microbatch go.
            del vjps[k, m]
            for j in range(k, self.K):
              cots.pop((k, m, j), None)
        case Update():
          step = np.int32(self._host_step)
          states[k], self._zeros[k], stage_metrics = _update(
            stage, states[k], c.model_state, c.grads, c.metrics, step
          )
          metrics.update(stage_metrics)
    new_step = jax.device_put(np.int32(self._host_step + 1), self.replicated[0])
    new_state = st.replace(step=new_step, stages=tuple(states))
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

  def measure(
    self, st: TrainState, batch: PlacedBatch, repeats: int = 10, slowdown: bool = True
  ) -> schedule_lib.MeasuredCosts:
    """Times every op kind of every stage alone, for the cost model (`schedule.predict_step`).

    Each program runs on its stage's devices with nothing else in flight, `repeats` times
    after one warm-up call; the medians: forward, head (or task loss, with the strategy's
    cotangent), input-gradient-only, weight-gradient-only and both-halves VJP calls, the
    update. The boundary: a scalar's `device_put` to the next stage (the latency) and the
    activation's (latency + bytes / bandwidth). The shared-core slowdown: `measure_slowdown`,
    or 1 with `slowdown=False` (stages that share one device: timed together they would only
    queue). Costs hold for this executor's microbatch size.

    Returns:
      MeasuredCosts, in seconds.
    """
    self._sync(st)
    stages, sizes, puts, pings, x = [], [], [], [], batch.inputs[0]
    for k, state in enumerate(st.stages):
      cost, a = self._measure_stage(k, state, x, batch.targets[k][0], repeats)
      stages.append(_seconds(cost))
      if k < self.K - 1:
        put = lambda a=a, k=k: jax.device_put(a, self.split[k + 1])
        tiny = jax.device_put(np.zeros((), np.float32), self.replicated[k])
        ping = lambda tiny=tiny, k=k: jax.device_put(tiny, self.replicated[k + 1])
        sizes.append(tree_bytes(a))
        puts.append(median_ms(put, repeats) / 1e3)
        pings.append(median_ms(ping, repeats) / 1e3)
        x = put()
    latency = statistics.median(pings) if pings else 0.0
    rates = [n / (t - latency) for n, t in zip(sizes, puts) if t > latency]
    rows = jax.tree.leaves(batch.inputs[0])[0].shape[0] // self.meshes[0].size
    abstract = abstract_stages(self.stages, self.specs)
    residuals = tuple(
      stage.residual_bytes(abstract[k], self.specs[k], rows) for k, stage in enumerate(self.stages)
    )
    device = self.meshes[0].devices.flat[0]
    return schedule_lib.MeasuredCosts(
      stages=tuple(stages),
      link=schedule_lib.Link(latency, statistics.median(rates) if rates else float("inf")),
      boundary_bytes=tuple(sizes),
      residual_bytes=residuals,
      slowdown=self.measure_slowdown(st, batch, repeats) if slowdown else 1.0,
      rows=rows,
      source=f"{self.K} x {device.device_kind} ({device.platform}), {rows} rows per microbatch",
    )

  def measure_slowdown(
    self, st: TrainState, batch: PlacedBatch, repeats: int = 10
  ) -> tuple[float, ...]:
    """How much slower stages' forwards run while n of them run at once, for n = 2, ..., K.

    Devices that share a host's cores (forced CPU devices) do not run concurrently at full
    speed; accelerators do (about 1.0 for every n). For each n: the wall time of `repeats`
    forwards dispatched on each of the first n stages at once over the slowest of those
    stages' time for its `repeats` alone. One factor per count, because a partial overlap
    costs less than a full one where devices outnumber cores (2 busy stages of 4 on 2 cores
    run about as 2 of 2 do). K = 1: an empty tuple (nothing overlaps).
    """
    self._sync(st)
    inputs, x = [], batch.inputs[0]
    forward = lambda k, x: _forward(
      self.stages[k], st.stages[k].params["stage"], st.stages[k].model_state["stage"],
      self._where(k, 0), x,
    )[0]  # fmt: skip
    for k in range(self.K):
      inputs.append(x)
      x = jax.device_put(forward(k, x), self.split[min(k + 1, self.K - 1)])
    run = lambda stages: [forward(k, inputs[k]) for _ in range(repeats) for k in stages]
    alone = [median_ms(lambda k=k: run([k]), 3) for k in range(self.K)]
    return tuple(
      median_ms(lambda n=n: run(range(n)), 3) / max(alone[:n]) for n in range(2, self.K + 1)
    )

  def _measure_stage(self, k, state, x, targets, repeats):
    """Stage k's StageCost (ms) on microbatch input `x`, and its output."""
    stage, where = self.stages[k], self._where(k, 0)
    p, s = state.params, state.model_state
    fwd = lambda: _forward(stage, p["stage"], s["stage"], where, x)
    f = median_ms(fwd, repeats)
    a, vjp, _ = fwd()
    zeros = _zeros_like(p)
    loss = lambda: _loss(stage, p["head"], s["head"], where, a, targets, zeros["head"])
    h = median_ms(loss, repeats)
    metrics = loss()[3]
    cot = {k: jnp.ones_like(a)}
    vjp_call = lambda params, passes: _backward(
      stage, vjp, cot, zeros["stage"], BackwardOp(k, (k,), params, passes)
    )
    w = median_ms(lambda: vjp_call((k,), ()), repeats)
    b = median_ms(lambda: vjp_call((), (k,)), repeats) if k else 0.0
    both = median_ms(lambda: vjp_call((k,), (k,)), repeats) if k else None
    # The update donates its stage state: time it on fresh copies.
    copies = [jax.tree.map(jnp.copy, state) for _ in range(repeats + 1)]
    step = np.int32(self._host_step)
    upd = lambda: _update(stage, copies.pop(), s, zeros, [metrics] * self.M, step)
    return schedule_lib.StageCost(f, h, b, w, median_ms(upd, repeats), both), a

  def eval_step(self, st: TrainState, batch: dict) -> dict:
    """Every head's evaluation sums, each stage on its own devices (no microbatching)."""
    a = jax.device_put(self.task.inputs(batch), self.split[0])
    targets, per_head = self.task.targets(batch), []
    for k, state in enumerate(st.stages):
      a = jax.device_put(a, self.split[k])
      t = jax.device_put(targets, self.split[k])
      a, sums = _evaluate(self.stages[k], state.params, state.model_state, a, t)
      per_head.append(sums)
    return named_sums(per_head)


def _seconds(cost: schedule_lib.StageCost) -> schedule_lib.StageCost:
  """A StageCost in milliseconds -> in seconds."""
  scaled = {
    f.name: None if getattr(cost, f.name) is None else getattr(cost, f.name) / 1e3
    for f in dataclasses.fields(cost)
  }
  return schedule_lib.StageCost(**scaled)
