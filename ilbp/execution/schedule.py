"""A pipeline schedule for interlocking backprop: the ops, their order, a cost model, a Gantt.

K stages, one device each; M microbatches per optimizer step. Per stage k and microbatch m:

  F(k, m)      stage forward, residuals stored    after F(k-1, m) and F(k, m-1); microbatch 0
               of step s > 0 also after U(k, s-1) (continuous) or every U(·, s-1) (flushed)
  H(k, m)      loss k: aux head (k < K-1) or task   after F(k, m) and H(k, m-1)
               loss; its cotangent w.r.t. a_k if
               a stage uses it
  B(k, m, op)  one VJP call per `backward_plan`     after F(k, m) and, per loss j in op.losses,
               op (input-only, weight, or both)     H(k, m) if j == k, else the stage-(k+1) op
                                                    of microbatch m that passes j on
  U(k)         stage k's optimizer update           after every H(k, ·) and B(k, ·) of the step

Order (what the executor follows): a list-scheduling simulation in which each stage runs one op
at a time and, when free, takes the ready op of highest priority: B ops (lowest step, microbatch,
plan position), then H, then U, then F — F only while fewer than W_k microbatches are in flight
at stage k (forward done, not all B ops done). W_k is the longest cotangent round trip ending at
stage k, max over its ops of max(op.losses) - k + 1 (local 1; global K - k: 1F1B's warm-up), so
residual memory stays bounded. Stages free at the same time choose in stage order.

Costs are per-op durations (`StageCost`, any one unit); `unit_costs` gives the first-guess units
of docs/pipeline.md (forward f = 1, input gradient b = 1, weight gradient w = 2). `closed_form`
is that document's closed-form table, for comparison with the simulation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

from ilbp.interlock import BackwardOp, backward_plan
from ilbp.strategy import Strategy
from ilbp.strategy import strategy as parse_strategy

# Priority among ready ops; see the module docstring.
_RANK = {"B": 0, "H": 1, "U": 2, "F": 3}


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


def unit_costs(num_stages: int, head: float = 0.25) -> list[StageCost]:
  """docs/pipeline.md's first-guess units, for when nothing is measured: f = 1, b = 1, w = 2,
  no update cost.

  Args:
    num_stages: K.
    head: H's cost on the stages with an auxiliary head (k < K-1). The last stage's task loss
      on its own logits costs 0: it has no head network.

  Returns:
    K StageCost.
  """
  _check_int("num_stages", num_stages)
  return [StageCost(1.0, head if k < num_stages - 1 else 0.0, 1.0, 2.0) for k in range(num_stages)]


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
    plan: `backward_plan(strategy, K)`, as tuples.
    caps: W_k, the in-flight microbatch cap of each stage.
  """

  strategy: Strategy
  num_stages: int
  microbatches: int
  continuous: bool
  costs: tuple[StageCost, ...]
  comm: float
  plan: tuple[tuple[BackwardOp, ...], ...]
  caps: tuple[int, ...]

  def ops(self, step: int = 0) -> list[Op]:
    """Every op of one optimizer step, stage by stage, microbatch by microbatch."""
    out = []
    for k in range(self.num_stages):
      for m in range(self.microbatches):
        out += [Forward(k, m, step), Loss(k, m, step)]
        out += [Backward(k, m, step, b) for b in self.plan[k]]
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
      deps = [Forward(k, m, s)]
      for j in op.backward.losses:
        if j == k:
          deps.append(Loss(k, m, s))
        else:
          # Exactly one op of stage k+1 passes loss j on: an input-only op or the merged one.
          (src,) = [b for b in self.plan[k + 1] if j in b.passes]
          deps.append(Backward(k + 1, m, s, src))
      return deps
    return [
      op
      for i in range(self.microbatches)
      for op in [Loss(k, i, s), *(Backward(k, i, s, b) for b in self.plan[k])]
    ]

  def _priority(self, op: Op) -> tuple:
    """Sort key of ready ops on one stage: kind rank, then step, microbatch, plan position."""
    pos = self.plan[op.stage].index(op.backward) if isinstance(op, Backward) else 0
    m = -1 if op.microbatch is None else op.microbatch
    return (_RANK[op.kind], op.step, m, pos)

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
    backward_left = {(op.stage, op.step, op.microbatch): len(self.plan[op.stage]) for op in ops}
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
        latency = self.comm if user.stage != k else 0.0
        ready_at[user] = max(ready_at[user], end + latency)
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

  def predict(self, steps: int = 4, slowdown: float = 1.0) -> dict:
    """Predicted timing from a simulation of `steps` consecutive optimizer steps.

    Args:
      steps: at least 2; the first step's fill is excluded from the steady state.
      slowdown: how much slower ops run while two or more stages are busy at once, for devices
        that share a host's cores (forced CPU devices); 1 for independent devices. A stage
        alone (e.g. in a pipeline bubble) runs at full speed, so every stretch of the simulated
        steady state in which several stages are busy takes `slowdown` times as long.

    Returns:
      A dict with
        time_per_step: steady state, (end of the last step - end of the first) / (steps - 1),
          stretched by `slowdown` where stages overlap.
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
    overlap = _overlap(tl, lo, hi) if slowdown != 1.0 else 0.0
    return {
      "time_per_step": (hi - lo + (slowdown - 1.0) * overlap) / (steps - 1),
      "makespan_one_step": self.simulate(1).makespan,
      "bubble_fraction": 1.0 - busy_window / window if window > 0 else 0.0,
      "inflight_max": list(tl.inflight_max),
      "busy_per_stage": busy,
    }


def _overlap(tl: Timeline, lo: float, hi: float) -> float:
  """Time within [lo, hi] during which at least two stages are busy."""
  events = []
  for slot in tl.slots:
    start, end = max(slot.start, lo), min(slot.end, hi)
    if end > start:
      events += [(start, 1), (end, -1)]
  events.sort()
  total, busy, last = 0.0, 0, lo
  for t, delta in events:
    if busy >= 2:
      total += t - last
    busy, last = busy + delta, t
  return total


def build(
  strategy: Strategy | str,
  num_stages: int,
  microbatches: int,
  continuous: bool = True,
  costs: Sequence[StageCost] | None = None,
  comm: float = 0.0,
) -> Schedule:
  """The pipeline schedule of one strategy.

  Args:
    strategy: a Strategy or a name accepted by `ilbp.strategy.strategy`.
    num_stages: K >= 1, one device each.
    microbatches: M >= 1 per optimizer step.
    continuous: whether each stage goes on to the next step after its own update (True) or
      waits for every stage's update (False, a flush). Global training flushes either way: its
      first stage's last backward op is the last op of the step.
    costs: K StageCost; default `unit_costs(num_stages)`.
    comm: latency >= 0 of every message between two stages, in the costs' unit.

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
  costs = unit_costs(num_stages) if costs is None else list(costs)
  if len(costs) != num_stages:
    raise ValueError(f"costs needs one StageCost per stage ({num_stages}), got {len(costs)}.")
  for k, c in enumerate(costs):
    if not isinstance(c, StageCost):
      raise ValueError(f"costs[{k}] must be a StageCost, got {c!r}.")
  if isinstance(comm, bool) or not isinstance(comm, int | float) or not 0 <= comm < math.inf:
    raise ValueError(f"comm must be a finite number >= 0, got {comm!r}.")
  plan = tuple(tuple(ops) for ops in backward_plan(strategy, num_stages))
  caps = tuple(max(max(b.losses) - k + 1 for b in ops) for k, ops in enumerate(plan))
  return Schedule(
    strategy, num_stages, microbatches, continuous, tuple(costs), float(comm), plan, caps
  )


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
