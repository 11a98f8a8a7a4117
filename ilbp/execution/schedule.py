"""A pipeline schedule for interlocking backprop: the ops, their order, a cost model, a Gantt.

K stages, one device each; M microbatches per optimizer step. Per stage k and microbatch m:

  F(k, m)      stage forward, residuals stored    after F(k-1, m) and F(k, m-1); microbatch 0
               of step s > 0 also after U(k, s-1) (continuous) or every U(·, s-1) (flushed)
  H(k, m)      loss k: aux head (k < K-1) or task   after F(k, m) and H(k, m-1)
               loss; its cotangent w.r.t. a_k if
               a stage uses it
  B(k, m, op)  one VJP call per plan op (input-     after F(k, m) and, per loss j in op.losses,
               only, weight-only, or both)          H(k, m) if j == k, else the stage-(k+1) op
                                                    of microbatch m that passes j on
  U(k)         stage k's optimizer update           after every H(k, ·) and B(k, ·) of the step

The plan is `backward_plan(strategy, K)`, except under `zb`, which splits every op that returns
both halves into an input-only op and a weight-only op of the same losses (same sums, two VJP
calls).

Order (what the executor follows): a list-scheduling simulation in which each stage runs one op
at a time and, when free, takes the ready op of highest priority: B ops (lowest step, microbatch,
plan position), then H, then U, then F — F only while fewer than W_k microbatches are in flight
at stage k (forward done, not all B ops done). Stages free at the same time choose in stage
order. The pipeline schedule (`SCHEDULES`) sets W_k and two rules:

  1f1b   W_k is the longest cotangent round trip ending at stage k, max over its ops of
         max(op.losses) - k + 1 (local 1; global K - k: 1F1B's warm-up), so residual memory
         stays bounded; a stage interleaves forwards and backwards.
  gpipe  all forwards, then all backwards: W_k = M, and every B(k, m) also waits for the
         stage's last forward F(k, M-1).
  zb     ZB-H1: W_k as 1f1b (the same peak in flight), merged ops split, and weight-only ops
         ranked after F: input-gradient ops stay on the critical path, weight-gradient ops
         fill the stage's idle time (the drain's bubble) before U.

Costs are per-op durations (`StageCost`, any one unit). `predict_step` is the cost model of
measured costs (`MeasuredCosts`, seconds): time per optimizer step and the schedule's memory.
`measured_schedule` is the Schedule it simulates, which the dataflow executor runs once given
the costs (`DataflowExecutor.use_costs`: under zb, the split they predict fastest).
`relative_costs` gives ratios of one named measurement, for when nothing of the model at hand is
measured; `closed_form` is docs/pipeline.md's closed-form table, for comparison with the
simulation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

from ilbp.interlock import BackwardOp, backward_plan
from ilbp.strategy import Strategy
from ilbp.strategy import strategy as parse_strategy

# Priority among ready ops; see the module docstring. "W": a weight-only op deferred by `zb`.
_RANK = {"B": 0, "H": 1, "U": 2, "F": 3, "W": 4}

# The pipeline schedules (`config.execution.schedule`); see the module docstring.
SCHEDULES = ("gpipe", "1f1b", "zb")


@dataclasses.dataclass(frozen=True)
class StageCost:
  """Per-microbatch op durations of one stage, in one unit (e.g. ms, or stage forwards).

  Attributes:
    forward: F, the stage forward (storing residuals).
    head: H, the head's forward + backward and the loss (the task loss on the last stage).
    backward_input: the input-gradient half of a VJP call (d a_k / d a_{k-1}).
    backward_weight: the weight-gradient half of a VJP call (d a_k / d θ_k).
    update: U, the optimizer update, once per step.
    backward_both: a VJP call that returns both halves; None = backward_input +
      backward_weight. One call shares the backward through the stage's non-linearities, so
      measured it is cheaper than the two halves apart.
  """

  forward: float
  head: float
  backward_input: float
  backward_weight: float
  update: float = 0.0
  backward_both: float | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      v = getattr(self, field.name)
      if field.name == "backward_both" and v is None:
        continue
      ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
      if not ok:
        raise ValueError(f"StageCost.{field.name} must be a finite number >= 0, got {v!r}.")


# The shared-core slowdown: one factor for any overlap, or one per count of busy stages (2, 3,
# ...): `stretch`.
Slowdown = float | tuple[float, ...]

# Op costs relative to the stage forward, from one measurement: `scripts.benchmark_pipeline`
# (2026-12-05, WORKSPACE.md "Pipeline schedules and the measured cost model"), resnet20 with pool
# heads, batch 64, M = 8 (8 examples per microbatch), K = 2, the second stage (which has an input
# gradient), each dataflow program timed alone, medians over 5 calibration rounds, on the
# project's 2-core AMD EPYC box (loaded by other jobs). The update is once per step. For when
# nothing of the model at hand is measured; a prediction worth reporting measures its own
# (`DataflowExecutor.measure`, `predict_step`).
RELATIVE = {
  "forward": 1.0,
  "head": 0.014,
  "backward_input": 1.38,
  "backward_weight": 2.19,
  "backward_both": 2.32,
  "update": 0.47,
}


def relative_costs(num_stages: int, head: float = RELATIVE["head"]) -> list[StageCost]:
  """`RELATIVE`'s ratios for K equal stages, in units of one stage forward.

  Args:
    num_stages: K.
    head: H's cost on the stages with an auxiliary head (k < K-1). The last stage's task loss
      on its own logits costs 0: it has no head network.

  Returns:
    K StageCost.
  """
  _check_int("num_stages", num_stages)
  r = RELATIVE
  return [
    StageCost(
      r["forward"],
      head if k < num_stages - 1 else 0.0,
      r["backward_input"],
      r["backward_weight"],
      r["update"],
      r["backward_both"],
    )
    for k in range(num_stages)
  ]


@dataclasses.dataclass(frozen=True)
class Op:
  """One schedulable unit of work; its type says which (`Forward`, `Loss`, `Backward`,
  `Update`), and executors dispatch on the type.

  Attributes:
    stage: k (0-based).
    microbatch: m (0-based); None for an update.
    step: the optimizer step (0-based).
  """

  kind: ClassVar[str] = ""  # One letter, for drawings and priorities: F, H, B or U.
  stage: int
  microbatch: int | None = None
  step: int = 0

  @property
  def label(self) -> str:
    """Short name for a Gantt bar: "F3", "H3", "B3" (microbatch 3) or "U"."""
    return "U" if self.microbatch is None else f"{self.kind}{self.microbatch}"


@dataclasses.dataclass(frozen=True)
class Forward(Op):
  """F(k, m): stage k's forward of microbatch m, its residuals stored (`Stage.forward`)."""

  kind: ClassVar[str] = "F"


@dataclasses.dataclass(frozen=True)
class Loss(Op):
  """H(k, m): loss k of microbatch m: the aux head, or the task loss (`Stage.loss`)."""

  kind: ClassVar[str] = "H"


@dataclasses.dataclass(frozen=True)
class Backward(Op):
  """B(k, m, op): one VJP call of stage k's backward plan (`Stage.backward`).

  Attributes:
    backward: the plan's op (which losses it consumes, trains with and passes on).
  """

  kind: ClassVar[str] = "B"
  backward: BackwardOp | None = None


@dataclasses.dataclass(frozen=True)
class Update(Op):
  """U(k): stage k's optimizer update, once per step (`Stage.update`)."""

  kind: ClassVar[str] = "U"


@dataclasses.dataclass(frozen=True)
class Slot:
  """An op's place in a simulated timeline: it runs on `op.stage` from `start` to `end`."""

  op: Op
  start: float
  end: float


@dataclasses.dataclass(frozen=True)
class Timeline:
  """A simulated run of consecutive optimizer steps.

  Attributes:
    slots: every op once, in the order the simulation started them (by start time; ties in
      stage order, dependencies first), so it is a valid dispatch order.
    num_stages: K.
    steps: number of optimizer steps simulated.
    inflight_max: per stage, the most microbatches whose residuals were held at once.
    description: strategy and sizes, the Gantt's default title.
  """

  slots: tuple[Slot, ...]
  num_stages: int
  steps: int
  inflight_max: tuple[int, ...]
  description: str = ""

  def step_end(self, step: int) -> float:
    """When the last op of `step` ends."""
    return max(s.end for s in self.slots if s.op.step == step)

  @property
  def makespan(self) -> float:
    """When the last op of the timeline ends."""
    return max((s.end for s in self.slots), default=0.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Ops, dependencies and costs of a pipelined interlocking step; built by `build`.

  Attributes:
    strategy: the training strategy.
    num_stages: K.
    microbatches: M per optimizer step.
    continuous: if True each stage starts the next step once its own update is done; if False
      every step ends in a global flush (no stage starts until all stages have updated).
    costs: K StageCost.
    comm: latency added to every dependency between two different stages.
    plan: `backward_plan(strategy, K)`, as tuples; `plan_for` gives a microbatch's.
    caps: W_k, the in-flight microbatch cap of each stage.
    name: the pipeline schedule, one of `SCHEDULES`.
    transfer: per boundary b (stages b, b+1), the time a message of data (an activation up, a
      cotangent down) takes on top of `comm`: its bytes over the link's bandwidth.
    split: `zb` only (else empty): per stage, the first microbatch whose merged ops are split.
  """

  strategy: Strategy
  num_stages: int
  microbatches: int
  continuous: bool
  costs: tuple[StageCost, ...]
  comm: float
  plan: tuple[tuple[BackwardOp, ...], ...]
  caps: tuple[int, ...]
  name: str = "1f1b"
  transfer: tuple[float, ...] = ()
  split: tuple[int, ...] = ()

  def plan_for(self, k: int, m: int) -> tuple[BackwardOp, ...]:
    """Stage k's VJP calls for microbatch m: `plan[k]`, or under `zb` from microbatch
    `split[k]` on, `split_plan`'s (merged ops as an input-only and a weight-only call)."""
    if self.split and m >= self.split[k]:
      return split_plan([self.plan[k]])[0]
    return self.plan[k]

  def ops(self, step: int = 0) -> list[Op]:
    """Every op of one optimizer step, stage by stage, microbatch by microbatch."""
    out = []
    for k in range(self.num_stages):
      for m in range(self.microbatches):
        out += [Forward(k, m, step), Loss(k, m, step)]
        out += [Backward(k, m, step, b) for b in self.plan_for(k, m)]
      out.append(Update(k, None, step))
    return out

  def dependencies(self, op: Op) -> list[Op]:
    """The ops that must finish before `op` may start (see the module docstring)."""
    k, m, s = op.stage, op.microbatch, op.step
    if isinstance(op, Forward):
      deps = [Forward(k - 1, m, s)] if k > 0 else []
      if m > 0:
        deps.append(Forward(k, m - 1, s))
      elif s > 0:
        updated = [k] if self.continuous else range(self.num_stages)
        deps += [Update(j, None, s - 1) for j in updated]
      return deps
    if isinstance(op, Loss):
      # H(k, m-1) too: the head's running statistics are threaded microbatch by microbatch.
      return [Forward(k, m, s)] + ([Loss(k, m - 1, s)] if m > 0 else [])
    if isinstance(op, Backward):
      last = self.microbatches - 1 if self.name == "gpipe" else m  # gpipe: all forwards first
      deps = [Forward(k, i, s) for i in sorted({m, last})]
      for j in op.backward.losses:
        if j == k:
          deps.append(Loss(k, m, s))
        else:
          # Exactly one op of stage k+1 passes loss j on: an input-only op or the merged one.
          (src,) = [b for b in self.plan_for(k + 1, m) if j in b.passes]
          deps.append(Backward(k + 1, m, s, src))
      return deps
    return [
      op
      for i in range(self.microbatches)
      for op in [Loss(k, i, s), *(Backward(k, i, s, b) for b in self.plan_for(k, i))]
    ]

  def _priority(self, op: Op) -> tuple:
    """Sort key of ready ops on one stage: kind rank, then step, microbatch, plan position."""
    pos = 0
    if isinstance(op, Backward):
      pos = self.plan_for(op.stage, op.microbatch).index(op.backward)
    m = -1 if op.microbatch is None else op.microbatch
    kind = "W" if self.name == "zb" and _weight_only(op) else op.kind
    return (_RANK[kind], op.step, m, pos)

  def latency(self, src: Op, dst: Op) -> float:
    """How long after `src` ends `dst` (which depends on it) may start: nothing on one stage;
    `comm` between stages, plus the data's transfer time for an activation or a cotangent
    between neighbours."""
    if src.stage == dst.stage:
      return 0.0
    data = src.kind == dst.kind and src.kind in "FB" and abs(src.stage - dst.stage) == 1
    extra = self.transfer[min(src.stage, dst.stage)] if data and self.transfer else 0.0
    return self.comm + extra

  def duration(self, op: Op) -> float:
    """The op's cost; a B op pays b for an input gradient and w for a weight gradient (or
    `backward_both` for both from one call, when given)."""
    c = self.costs[op.stage]
    if isinstance(op, Backward):
      b = op.backward
      if b.passes and b.params and c.backward_both is not None:
        return c.backward_both
      return (c.backward_input if b.passes else 0.0) + (c.backward_weight if b.params else 0.0)
    return {"F": c.forward, "H": c.head, "U": c.update}[op.kind]

  def simulate(self, steps: int = 1, duration: Callable[[Op], float] | None = None) -> Timeline:
    """Runs the list-scheduling policy over `steps` consecutive optimizer steps.

    Step s's timing does not depend on later steps (a stage starts step s+1 only after its own
    update of step s), so step s looks the same in every simulation that contains it.

    Args:
      steps: optimizer steps to simulate.
      duration: each op's duration; default `self.duration` (the costs). The SPMD executor
        passes its own (whole ticks) to lay the same policy out on a lock-step clock.

    Returns:
      A Timeline.

    Raises:
      ValueError: if `steps` < 1.
    """
    _check_int("steps", steps)
    duration = self.duration if duration is None else duration
    K = self.num_stages
    ops = [op for s in range(steps) for op in self.ops(s)]
    deps = {op: self.dependencies(op) for op in ops}
    waiting = {op: len(d) for op, d in deps.items()}
    users: dict[Op, list[Op]] = {op: [] for op in ops}
    for op, d in deps.items():
      for dep in d:
        users[dep].append(op)
    ready_at = {op: 0.0 for op in ops}
    ready: list[list[Op]] = [[] for _ in range(K)]
    for op in ops:
      if not waiting[op]:
        ready[op.stage].append(op)
    backward_left = {
      (op.stage, op.step, op.microbatch): len(self.plan_for(op.stage, op.microbatch))
      for op in ops
      if op.microbatch is not None
    }
    inflight, inflight_max = [0] * K, [0] * K
    running: list[tuple[Op, float, float] | None] = [None] * K
    slots, t, left = [], 0.0, len(ops)

    def finish(op: Op, end: float):
      k = op.stage
      if isinstance(op, Forward):
        inflight[k] += 1
        inflight_max[k] = max(inflight_max[k], inflight[k])
      elif isinstance(op, Backward):
        key = (k, op.step, op.microbatch)
        backward_left[key] -= 1
        if not backward_left[key]:
          inflight[k] -= 1
      for user in users[op]:
        ready_at[user] = max(ready_at[user], end + self.latency(op, user))
        waiting[user] -= 1
        if not waiting[user]:
          ready[user.stage].append(user)

    def pick(k: int) -> Op | None:
      cands = [
        op
        for op in ready[k]
        if ready_at[op] <= t and (not isinstance(op, Forward) or inflight[k] < self.caps[k])
      ]
      return min(cands, key=self._priority, default=None)

    while left:
      # Settle time t: finish what ends now, let free stages choose in stage order, and repeat,
      # since a zero-cost op finishes at once and may make another op ready at t.
      changed = True
      while changed:
        changed = False
        for k in range(K):
          if running[k] is not None and running[k][2] <= t:
            finish(running[k][0], running[k][2])
            running[k], left, changed = None, left - 1, True
        for k in range(K):
          if running[k] is None and (op := pick(k)) is not None:
            ready[k].remove(op)
            running[k] = (op, t, t + duration(op))
            slots.append(Slot(op, t, t + duration(op)))
            changed = True
      if not left:
        break
      later = [r[2] for r in running if r is not None and r[2] > t]
      later += [ready_at[op] for q in ready for op in q if ready_at[op] > t]
      if not later:
        stuck = [op for q in ready for op in q][:4]
        raise RuntimeError(f"Schedule deadlocked at t={t} with {left} ops left, e.g. {stuck}.")
      t = min(later)

    desc = f"{self.strategy.name} ({self.strategy.combine}), K={K}, M={self.microbatches}, "
    desc += "continuous" if self.continuous else "flushed"
    return Timeline(tuple(slots), K, steps, tuple(inflight_max), desc)

  def stage_ops(self, step: int = 0) -> list[list[Op]]:
    """The order in which each stage runs the ops of one optimizer step.

    Returns:
      K lists of Op, list k in the order stage k runs them.
    """
    out: list[list[Op]] = [[] for _ in range(self.num_stages)]
    for op in self.dispatch_order(step):
      out[op.stage].append(op)
    return out

  def dispatch_order(self, step: int = 0) -> list[Op]:
    """All ops of one step by simulated start time (ties in stage order): a topological order
    that a single host thread can dispatch asynchronously, stage by stage in the right order.
    """
    _check_int("step", step, minimum=0)
    return [s.op for s in self.simulate(step + 1).slots if s.op.step == step]

  def predict(self, steps: int = 4, slowdown: Slowdown = 1.0) -> dict:
    """Predicted timing from a simulation of `steps` consecutive optimizer steps.

    Args:
      steps: at least 2; the first step's fill is excluded from the steady state.
      slowdown: how much slower ops run while several stages are busy at once, for devices
        that share a host's cores (forced CPU devices); 1 for independent devices. A float for
        any two or more busy stages, or a tuple per count of busy stages (2, 3, ...: `stretch`).
        A stage alone (e.g. in a pipeline bubble) runs at full speed, so every stretch of the
        simulated steady state in which n >= 2 stages are busy takes `stretch(slowdown, n)`
        times as long.

    Returns:
      A dict with
        time_per_step: steady state, (end of the last step - end of the first) / (steps - 1),
          stretched by `slowdown` where stages overlap (by how many overlap).
        makespan_one_step: one step from an empty pipeline to its last update.
        bubble_fraction: idle fraction of the K stages over the steady-state window.
        inflight_max: per stage, the most microbatches with residuals held at once.
        busy_per_stage: per stage, the busy time of one step.
    """
    _check_int("steps", steps, minimum=2)
    tl = self.simulate(steps)
    lo, hi = tl.step_end(0), tl.step_end(steps - 1)
    busy_window = sum(max(0.0, min(s.end, hi) - max(s.start, lo)) for s in tl.slots)
    window = self.num_stages * (hi - lo)
    busy = [0.0] * self.num_stages
    for op in self.ops(0):
      busy[op.stage] += self.duration(op)
    return {
      "time_per_step": (hi - lo + _stretched(tl, lo, hi, slowdown)) / (steps - 1),
      "makespan_one_step": self.simulate(1).makespan,
      "bubble_fraction": 1.0 - busy_window / window if window > 0 else 0.0,
      "inflight_max": list(tl.inflight_max),
      "busy_per_stage": busy,
    }


def _weight_only(op: Op) -> bool:
  """A B op that computes only a weight gradient (nothing for the stage below)."""
  return isinstance(op, Backward) and bool(op.backward.params) and not op.backward.passes


def split_plan(plan: Sequence[Sequence[BackwardOp]]) -> tuple[tuple[BackwardOp, ...], ...]:
  """`zb`'s plan: every op that returns both halves becomes an input-only op (first: the stage
  below waits for it) and a weight-only op of the same losses."""
  out = []
  for ops in plan:
    split = []
    for b in ops:
      if b.params and b.passes:
        split.append(dataclasses.replace(b, params=()))
        split.append(dataclasses.replace(b, passes=()))
      else:
        split.append(b)
    out.append(tuple(split))
  return tuple(out)


def applies(name: str, strategy: Strategy | str, num_stages: int) -> bool:
  """Whether pipeline schedule `name` differs from 1f1b for this strategy: gpipe wherever a
  gradient crosses a stage boundary (reach > 1), zb wherever the plan has an op that returns
  both halves (global; n-wise stages that train with the loss they pass on). 1f1b always."""
  strategy = strategy if isinstance(strategy, Strategy) else parse_strategy(strategy)
  _check_schedule(name)
  if name == "gpipe":
    return strategy.reach_for(num_stages) > 1
  if name == "zb":
    plan = backward_plan(strategy, num_stages)
    return any(b.params and b.passes for ops in plan for b in ops)
  return True


def _check_schedule(name) -> None:
  if name not in SCHEDULES:
    raise ValueError(f"Unknown pipeline schedule {name!r}; valid: {', '.join(SCHEDULES)}.")


def stretch(slowdown: Slowdown, busy: int) -> float:
  """How many times longer a stretch lasts in which `busy` stages are busy at once.

  Args:
    slowdown: a float for every count of two or more busy stages, or a tuple for the counts
      2, 3, ... in turn (its last entry for more; `DataflowExecutor.measure_slowdown`).
    busy: stages busy at once; one alone runs at full speed (1.0).
  """
  if busy < 2:
    return 1.0
  if isinstance(slowdown, (int, float)):
    return float(slowdown)
  return float(slowdown[min(busy - 2, len(slowdown) - 1)]) if slowdown else 1.0


def describe_slowdown(slowdown: Slowdown) -> str:
  """'1.40x' or '2 busy 1.40x, 3 busy 1.85x, ...': for tables and reports."""
  if isinstance(slowdown, (int, float)):
    return f"{slowdown:.2f}x"
  return ", ".join(f"{n} busy {s:.2f}x" for n, s in enumerate(slowdown, start=2))


def _stretched(tl: Timeline, lo: float, hi: float, slowdown: Slowdown) -> float:
  """The time the shared-core slowdown adds within [lo, hi]: each stretch in which n stages
  are busy at once lasts `stretch(slowdown, n)` times as long."""
  events = []
  for slot in tl.slots:
    start, end = max(slot.start, lo), min(slot.end, hi)
    if end > start:
      events += [(start, 1), (end, -1)]
  events.sort()
  total, busy, last = 0.0, 0, lo
  for t, delta in events:
    total += (stretch(slowdown, busy) - 1.0) * (t - last)
    busy, last = busy + delta, t
  return total


def build(
  strategy: Strategy | str,
  num_stages: int,
  microbatches: int,
  continuous: bool = True,
  costs: Sequence[StageCost] | None = None,
  comm: float = 0.0,
  schedule: str = "1f1b",
  transfer: Sequence[float] = (),
  split: Sequence[int] | None = None,
  slowdown: Slowdown = 1.0,
) -> Schedule:
  """The pipeline schedule of one strategy.

  Args:
    strategy: a Strategy or a name accepted by `ilbp.strategy.strategy`.
    num_stages: K >= 1, one device each.
    microbatches: M >= 1 per optimizer step.
    continuous: whether each stage goes on to the next step after its own update (True) or
      waits for every stage's update (False, a flush). Global training flushes either way: its
      first stage's last backward op is the last op of the step.
    costs: K StageCost; default `relative_costs(num_stages)`.
    comm: latency >= 0 of every message between two stages, in the costs' unit.
    schedule: the pipeline schedule, one of `SCHEDULES` (see the module docstring).
    transfer: empty, or K - 1 times >= 0: a data message's time over boundary b on top of
      `comm` (its bytes over the bandwidth).
    split: `zb` only: per stage, the first microbatch whose merged ops are split. None: the
      split the costs predict fastest, tried from the last microbatch down to the first (the
      same count j on every stage; no split at all if none is faster). Two VJP calls cost more
      than one merged call (docs/pipeline.md), so splitting pays only where the stage below
      would otherwise wait: in the drain, ZB-H1's bubble.
    slowdown: `zb` with `split=None` only: the shared-core slowdown (`predict`) the split is
      chosen under. On devices that share cores an idle stage lends its cores to the busy one,
      so a bubble costs less and filling it gains less than the split's extra VJP call costs.

  Returns:
    A Schedule.

  Raises:
    ValueError: naming the argument that is out of range.
  """
  strategy = strategy if isinstance(strategy, Strategy) else parse_strategy(strategy)
  _check_int("num_stages", num_stages)
  _check_int("microbatches", microbatches)
  if not isinstance(continuous, bool):
    raise ValueError(f"continuous must be a bool, got {continuous!r}.")
  _check_schedule(schedule)
  costs = relative_costs(num_stages) if costs is None else list(costs)
  if len(costs) != num_stages:
    raise ValueError(f"costs needs one StageCost per stage ({num_stages}), got {len(costs)}.")
  for k, c in enumerate(costs):
    if not isinstance(c, StageCost):
      raise ValueError(f"costs[{k}] must be a StageCost, got {c!r}.")
  if isinstance(comm, bool) or not isinstance(comm, int | float) or not 0 <= comm < math.inf:
    raise ValueError(f"comm must be a finite number >= 0, got {comm!r}.")
  transfer = tuple(transfer)
  if transfer and len(transfer) != num_stages - 1:
    raise ValueError(f"transfer needs one time per boundary ({num_stages - 1}), got {transfer}.")
  if not all(isinstance(t, int | float) and 0 <= t < math.inf for t in transfer):
    raise ValueError(f"transfer must hold finite numbers >= 0, got {transfer}.")
  plan = tuple(tuple(ops) for ops in backward_plan(strategy, num_stages))
  if schedule == "gpipe":
    caps = (microbatches,) * num_stages
  else:
    caps = tuple(max(max(b.losses) - k + 1 for b in ops) for k, ops in enumerate(plan))
  make = lambda split: Schedule(
    strategy,
    num_stages,
    microbatches,
    continuous,
    tuple(costs),
    float(comm),
    plan,
    caps,
    schedule,
    tuple(float(t) for t in transfer),
    tuple(split),
  )
  if schedule != "zb":
    if split is not None:
      raise ValueError(f"split is for schedule='zb' only, got schedule={schedule!r}.")
    return make(())
  if split is not None:
    split = tuple(split)
    if len(split) != num_stages or not all(isinstance(i, int) and i >= 0 for i in split):
      raise ValueError(f"split needs one microbatch index >= 0 per stage, got {split}.")
    return make(split)
  best, best_time = None, math.inf
  for j in range(microbatches + 1):  # j microbatches split, the last ones.
    sched = make((microbatches - j,) * num_stages)
    t = sched.predict(3, slowdown=slowdown)["time_per_step"]
    if t < best_time - 1e-9 * max(1.0, t):
      best, best_time = sched, t
  return best


@dataclasses.dataclass(frozen=True)
class Link:
  """A boundary between two stages' devices: a message of n bytes takes latency + n /
  bandwidth (seconds; bytes per second, inf for a free copy)."""

  latency: float
  bandwidth: float = math.inf

  def seconds(self, nbytes: float) -> float:
    return self.latency + (nbytes / self.bandwidth if nbytes else 0.0)


@dataclasses.dataclass(frozen=True)
class MeasuredCosts:
  """Op costs of one model at one microbatch size, timed on the devices a run uses
  (`DataflowExecutor.measure`).

  Attributes:
    stages: K StageCost in seconds per microbatch (the update once per step), each program
      timed alone.
    link: the boundary transfer (`Link`, measured between stages 0 and 1).
    boundary_bytes: K - 1 bytes per microbatch crossing boundary b (a_b up; its cotangent,
      the same size, down).
    residual_bytes: K bytes of VJP residuals one in-flight microbatch holds on stage k.
    slowdown: how much slower ops run while several stages are busy at once (devices that
      share a host's cores): per count of busy stages 2, 3, ..., K (a tuple, as
      `DataflowExecutor.measure_slowdown` measures it), or one float for any count (costs
      written before the counts were measured); 1 for independent devices.
    rows: examples per microbatch per device the costs were timed at; a prediction holds only
      for that microbatch size.
    source: what was measured where (model, device, batch), for reports.
  """

  stages: tuple[StageCost, ...]
  link: Link
  boundary_bytes: tuple[int, ...]
  residual_bytes: tuple[int, ...]
  slowdown: Slowdown = 1.0
  rows: int = 0
  source: str = ""


def measured_schedule(
  costs: MeasuredCosts,
  strategy: Strategy | str,
  microbatches: int,
  schedule: str = "1f1b",
  continuous: bool = True,
  split: Sequence[int] | None = None,
) -> Schedule:
  """The Schedule that `predict_step` simulates: `build` with the measured op costs, `comm`
  the link's latency and each boundary's transfer its bytes over the bandwidth. Under `zb`
  with `split=None`, the split these costs predict fastest (`build`), so an executor that
  runs this Schedule (`DataflowExecutor.use_costs`) runs the split the cost model predicts,
  shared-core slowdown included.

  Args:
    costs: measured op costs; K = len(costs.stages).
    strategy: a Strategy or a name.
    microbatches: M.
    schedule: one of `SCHEDULES`.
    continuous: as for `build`.
    split: zb only: as for `build`.

  Returns:
    A Schedule whose costs are in seconds.

  Raises:
    ValueError: if the byte counts do not match K, or as `build`.
  """
  K = len(costs.stages)
  if len(costs.boundary_bytes) != K - 1 or len(costs.residual_bytes) != K:
    raise ValueError(
      f"MeasuredCosts for {K} stages needs {K - 1} boundary_bytes and {K} residual_bytes, got "
      f"{len(costs.boundary_bytes)} and {len(costs.residual_bytes)}."
    )
  transfer = [costs.link.seconds(b) - costs.link.latency for b in costs.boundary_bytes]
  return build(
    strategy,
    K,
    microbatches,
    continuous,
    costs=costs.stages,
    comm=costs.link.latency,
    schedule=schedule,
    transfer=transfer,
    split=split,
    slowdown=costs.slowdown,
  )


def predict_step(
  costs: MeasuredCosts,
  strategy: Strategy | str,
  microbatches: int,
  schedule: str = "1f1b",
  continuous: bool = True,
  split: Sequence[int] | None = None,
  steps: int = 4,
) -> dict:
  """The cost model: seconds per optimizer step and the schedule's memory, from measured costs.

  The strategy (with its combine rule), K = len(costs.stages), M, the pipeline schedule and
  continuous or flushed steps give every op and its dependencies (`build`); each op lasts its
  measured cost, each message between neighbouring stages `costs.link.seconds(bytes)` (the
  activation up, the cotangent down; a flush signal the latency alone), and the list-scheduling
  simulation over `steps` steps gives the steady-state time per step (`Schedule.predict`).

  Devices that share cores (forced CPU devices on one host) are accounted for by
  `costs.slowdown`, one factor per count of busy stages: every stretch of the simulated
  steady state in which n >= 2 stages are busy lasts `stretch(slowdown, n)` times as long; a
  stage alone (a bubble elsewhere) runs at full speed, since idle devices lend their cores.
  On 2 cores, 2 busy stages of 4 share them about as 2 of 2 do, and 4 busy ones queue for
  them: one factor for every overlap (all K busy) overstated every partial overlap. The
  factors are calibrated apart from the rows they predict: `DataflowExecutor.measure_slowdown`
  times the first n stages' forwards dispatched at once against the slowest of them alone,
  never a training step; ops are timed alone the same way. Nothing here is fitted to measured
  step times. On accelerators every factor is about 1.

  Args:
    costs: measured at the microbatch size of the run predicted (`costs.rows`).
    strategy: a Strategy or a name.
    microbatches: M.
    schedule: one of `SCHEDULES`.
    continuous: as for `build`.
    split: zb only: as for `build` (None: the split these costs predict fastest).
    steps: simulated steps (>= 2; the first step's fill is excluded).

  Returns:
    A dict with seconds_per_step (with the slowdown), seconds_per_step_alone (slowdown 1),
    makespan_one_step (seconds, one step from an empty pipeline), bubble_fraction,
    inflight_max (per stage, microbatches whose residuals are held at once),
    inflight_bytes_per_stage (those residuals' bytes), and schedule (the Schedule).
  """
  sched = measured_schedule(costs, strategy, microbatches, schedule, continuous, split)
  shared = sched.predict(steps, slowdown=costs.slowdown)
  alone = sched.predict(steps)
  return {
    "seconds_per_step": shared["time_per_step"],
    "seconds_per_step_alone": alone["time_per_step"],
    "makespan_one_step": shared["makespan_one_step"],
    "bubble_fraction": shared["bubble_fraction"],
    "inflight_max": shared["inflight_max"],
    "inflight_bytes_per_stage": [
      n * b for n, b in zip(shared["inflight_max"], costs.residual_bytes, strict=True)
    ],
    "schedule": sched,
  }


def closed_form(
  strategy: Strategy | str,
  num_stages: int,
  microbatches: int,
  continuous: bool,
  cost: StageCost,
  recompute: float = 0.0,
) -> float:
  """docs/pipeline.md's closed-form time per optimizer step, for comparison with `predict`.

  Global: (M + K - 1)·c_K with c_K = f + r + b + w. Reach n < K: c_n = f + h + (n-1)(b + r) + w
  (an interior stage); flushed (M + K - 1)·c_n, continuous (dataflow) M·c_n.

  Args:
    strategy: a Strategy or a name.
    num_stages: K.
    microbatches: M.
    continuous: as for `build`.
    cost: one stage's costs (the formula assumes equal stages).
    recompute: r, the cost of recomputing a forward instead of storing residuals.

  Returns:
    The predicted time per step, in the unit of `cost`.
  """
  strategy = strategy if isinstance(strategy, Strategy) else parse_strategy(strategy)
  _check_int("num_stages", num_stages)
  _check_int("microbatches", microbatches)
  K, M, c, r = num_stages, microbatches, cost, recompute
  n = strategy.reach_for(K)
  if n == K:
    return (M + K - 1) * (c.forward + r + c.backward_input + c.backward_weight)
  c_n = c.forward + c.head + (n - 1) * (c.backward_input + r) + c.backward_weight
  return M * c_n if continuous else (M + K - 1) * c_n


def _check_int(name: str, value, minimum: int = 1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
