"""The schedule on a lock-step clock: what every stage does at every tick of the SPMD program.

The SPMD executor (`executor.py`) runs one `lax.scan` over ticks; at each tick every stage runs
at most one B *group* of ops and one F group, and then messages move one hop. The ops, their
dependencies and the stage-local policy (priorities, in-flight caps) are `schedule.py`'s; this
module only lays them out on ticks:

  1. `Schedule.simulate` with tick durations: F and every B op that waits for a cotangent from
     the stage above take one tick; H, U and the B ops that consume only the stage's own loss
     take none. This fixes each stage's order of ops, under any pipeline schedule (gpipe,
     1f1b, zb: `Schedule.plan_for` gives each microbatch's B ops).
  2. Ops are grouped: an F group is F(k, m) with its H(k, m) and the B(k, m) ops that need
     only the stage's own loss (they run on the forward's VJP, so the stage output and its own
     cotangent are never stored); a B group is any other B op alone; U joins the tick of its
     last dependency and runs after that tick's groups.
  3. Ticks are assigned as soon as possible in that order: a group runs one tick after every
     group it depends on (a message sent at the end of tick t is there at tick t + 1), and no
     earlier than the stage's previous group. A tick holds at most one B group and one F group
     of another microbatch (run in that order, so in flight stays within the schedule's cap),
     of which at most one sends a cotangent down: in the steady state of 1F1B a stage runs one
     forward beside one backward every tick, as its own device would without the clock (K = 2,
     global, M = 8: 30 ticks instead of 48). Without that (`merge=False`) a stage that waits a
     tick for each cotangent spends every other tick on one op alone.
  4. Buffer slots: each stage input that a later tick reads (stages k > 0: the activation
     that arrived), each cotangent that waits for a later B op, and (without remat) the VJP
     residuals a forward stores for its later B ops get a slot from an interval colouring
     over ticks, so the buffers hold the in-flight count, not M. With remat, a B op in a
     group of its own re-runs the forward from the stored input instead.

Everything here is plain Python and numpy, unit-tested on one CPU (tests/test_spmd.py).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ilbp.execution.schedule import (
  Backward,
  Forward,
  Loss,
  Op,
  Schedule,
  Slowdown,
  Update,
  stretch,
)
from ilbp.interlock import BackwardOp


@dataclasses.dataclass(frozen=True)
class Group:
  """What one stage runs in one tick.

  Attributes:
    stage: k.
    step: the optimizer step within the call.
    microbatch: m (of the F or B ops).
    forward: F(k, m) and H(k, m) run (first).
    backward: the B(k, m) ops (`Schedule.plan_for(k, m)`'s) that run next.
    update: U(k) of `step` runs last.
  """

  stage: int
  step: int
  microbatch: int
  forward: bool
  backward: tuple[BackwardOp, ...]
  update: bool = False

  @property
  def kind(self) -> tuple:
    """What the group's F/H/B part computes, without which microbatch or whether U follows:
    one program branch per kind (U is a branch of its own per stage)."""
    return (self.stage, self.forward, self.backward)


@dataclasses.dataclass(frozen=True)
class TickTable:
  """A static plan of one call of the SPMD program.

  Attributes:
    num_ticks: T, the scan length.
    groups: {(tick, stage): (Group, ...)}: a B group, an F group, or a B group then an F group.
    kinds: the distinct tuples of `Group.kind`s of one tick on one stage, in a fixed order
      (branch 1 + i runs kinds[i]; branch 0 idles).
    fields: per-(tick, stage) int32 arrays [T, K] (or [T, K, n]): `branch`, `update` (1 when
      U follows, else 0) and `u_step` (its step); the F group's `step`, `microbatch`, `x_slot`
      (its stage input's slot), `own_slot` (where F stores its own loss's cotangent for a later
      B op) and `res_store` (where F stores its VJP residuals); the B group's `b_step`,
      `b_microbatch`, `b_x_slot`, `cot_slots` (one per loss its B op consumes) and `res_slot`
      (where it reads its residuals); `x_store` / `cot_store` (where a message arriving this
      tick is stored). Unused entries point at the spare slot (index x_slots / cot_slots /
      res_slots), which nothing reads.
    x_slots: slots for stored stage inputs (per stage, the most held at once, over stages).
    cot_slots: slots for stored cotangents.
    res_slots: slots for stored VJP residuals (0 with remat).
    remat: a separate B op re-runs the forward (True) or reads the stored residuals.
    fwd_sends, bwd_sends: [T, K-1] bools: boundary b carries an activation (stage b -> b+1) or
      a cotangent (stage b+1 -> b) at the end of tick t.
  """

  num_ticks: int
  groups: dict
  kinds: tuple
  fields: dict
  x_slots: int
  cot_slots: int
  fwd_sends: np.ndarray
  bwd_sends: np.ndarray
  res_slots: int = 0
  remat: bool = True

  def parts(self) -> list[tuple[tuple[int, int], Group]]:
    """Every group, as ((tick, stage), group), in the order the program runs them (a tick's B
    group before its F group)."""
    return _parts(self.groups)

  @functools.cached_property
  def res_stores(self) -> tuple[bool, ...]:
    """Per kind (`kinds[i]`), whether its F group stores VJP residuals in a slot, in any tick."""
    stores = [False] * len(self.kinds)
    for (t, k), g in self.parts():
      if g.forward and self.fields["res_store"][t, k] < self.res_slots:
        stores[self.fields["branch"][t, k] - 1] = True
    return tuple(stores)

  @functools.cached_property
  def res_spare(self) -> bool:
    """Whether the residual buffers need the spare slot: some F group of a kind that stores
    stores nothing in its own tick (its write goes to the spare). Otherwise the branches of
    kinds that store always write a real slot, the others write nothing, and the buffers hold
    `res_slots` slots only."""
    return any(
      g.forward
      and self.res_stores[self.fields["branch"][t, k] - 1]
      and self.fields["res_store"][t, k] == self.res_slots
      for (t, k), g in self.parts()
    )


def is_own(schedule: Schedule, b: BackwardOp, k: int) -> bool:
  """Whether stage k's B op runs in its forward's group, on the forward's VJP: it consumes only
  stage k's own loss, and the schedule lets it follow its forward at once (gpipe holds every
  backward until the step's last forward)."""
  return b.losses == (k,) and schedule.name != "gpipe"


def _tick_duration(schedule: Schedule):
  def duration(op: Op) -> float:
    if isinstance(op, Forward):
      return 1.0
    if isinstance(op, Backward):
      return 0.0 if is_own(schedule, op.backward, op.stage) else 1.0
    return 0.0

  return duration


def build(schedule: Schedule, steps: int, remat: bool = True, merge: bool = True) -> TickTable:
  """Lays `steps` consecutive optimizer steps of `schedule` out on ticks (module docstring).

  Args:
    schedule: from `schedule.build` (its strategy, K, M, continuity and pipeline schedule).
    steps: optimizer steps in one call; the pipeline is empty at the start and end of a call.
    remat: a B op in a group of its own re-runs the forward (True), or reads the residuals
      its forward stored (False: residual slots are allocated).
    merge: a B group and an F group may share a tick (step 3); False: one group per tick.

  Returns:
    A TickTable.
  """
  K = schedule.num_stages
  timeline = schedule.simulate(steps, duration=_tick_duration(schedule))
  order = sorted(timeline.slots, key=lambda s: (s.start, s.op.stage))

  # 2. Groups, in simulated order of their first (anchor) op.
  anchors, group_of, members = [], {}, {}
  for slot in order:
    op = slot.op
    if isinstance(op, Forward):
      key = ("F", op.stage, op.step, op.microbatch)
      ops = [op, Loss(op.stage, op.microbatch, op.step)]
      ops += [
        Backward(op.stage, op.microbatch, op.step, b)
        for b in schedule.plan_for(op.stage, op.microbatch)
        if is_own(schedule, b, op.stage)
      ]
    elif isinstance(op, Backward) and not is_own(schedule, op.backward, op.stage):
      key = ("B", op.stage, op.step, op.microbatch, op.backward)
      ops = [op]
    else:
      continue
    anchors.append(key)
    members[key] = ops
    for o in ops:
      group_of[o] = key

  # 3. Ticks, as soon as possible in that order. A stage's groups keep their order; a group
  # may share its predecessor's tick when one is an F group and the other a B group on another
  # microbatch and at most one of them sends a cotangent down (one message per boundary and
  # direction per tick): in the steady state a tick runs one forward and one backward.
  tick, last = {}, [-1] * K
  kinds_at: dict[tuple[int, int], list] = {}  # (tick, stage) -> the groups' keys
  u_tick: dict[Op, int] = {}

  def dep_tick(dep: Op) -> int:
    if isinstance(dep, Update):
      if dep not in u_tick:
        u_tick[dep] = max(dep_tick(d) for d in schedule.dependencies(dep))
      return u_tick[dep]
    return tick[group_of[dep]]

  def passes_down(key) -> bool:
    return any(isinstance(o, Backward) and o.backward.passes for o in members[key])

  def shares(key, t: int) -> bool:
    others = kinds_at.get((t, key[1]), [])
    if not merge or len(others) != 1 or others[0][0] == key[0]:
      return False
    return not (passes_down(others[0]) and passes_down(key))

  for key in anchors:
    k, t = key[1], 0
    for op in members[key]:
      for dep in schedule.dependencies(op):
        if group_of.get(dep) != key:
          t = max(t, dep_tick(dep) + 1)
    t = max(t, last[k]) if t <= last[k] and shares(key, last[k]) else max(t, last[k] + 1)
    tick[key] = last[k] = t
    kinds_at.setdefault((t, k), []).append(key)
  for s in range(steps):
    for k in range(K):
      dep_tick(Update(k, None, s))

  groups: dict[tuple[int, int], tuple[Group, ...]] = {}
  for key in anchors:
    ops = members[key]
    first = ops[0]
    backward = tuple(o.backward for o in ops if isinstance(o, Backward))
    g = Group(first.stage, first.step, first.microbatch, isinstance(first, Forward), backward)
    at = tick[key], first.stage
    # The B group first: the program runs a tick's B group, then its F group, so a slot the B
    # group reads last can take what the F group stores (in flight: the schedule's cap).
    groups[at] = tuple(sorted((*groups.get(at, ()), g), key=lambda g: g.forward))
  for u, t in u_tick.items():
    parts = groups[t, u.stage]
    # U joins the tick of its last dependency and runs after its groups, all of its step (a
    # group of the next step depends on U).
    assert all(g.step == u.step for g in parts), (u, parts)
    groups[t, u.stage] = (*parts[:-1], dataclasses.replace(parts[-1], update=True))
  T = max(t for t, _ in groups) + 1
  return _with_slots(schedule, groups, T, remat)


def _parts(groups: dict):
  """Every group of a table's {(tick, stage): groups}, as ((tick, stage), group)."""
  return [(at, g) for at, parts in groups.items() for g in parts]


def _with_slots(schedule, groups, T, remat) -> TickTable:
  """Allocates buffer slots and fills the per-tick arrays."""
  K = schedule.num_stages
  parts = _parts(groups)
  width = max((len(b.losses) for _, g in parts for b in g.backward), default=1)
  # Intervals per stage: (start, end, key); start is half a tick later for a message stored
  # after the tick's compute, so a slot whose last reader runs in that tick can take it.
  x_iv = [[] for _ in range(K)]
  cot_iv = [[] for _ in range(K)]
  res_iv = [[] for _ in range(K)]
  readers: dict = {}  # (buffer, k, s, m[, j]) -> last tick that reads it
  for (t, k), g in parts:
    sm = (g.step, g.microbatch)
    if k > 0:
      readers["x", k, *sm] = max(readers.get(("x", k, *sm), -1), t)
    if not g.forward:
      if not remat:
        readers["r", k, *sm] = max(readers.get(("r", k, *sm), -1), t)
      for b in g.backward:
        for j in b.losses:
          readers["c", k, *sm, j] = max(readers.get(("c", k, *sm, j), -1), t)
  fwd_sends = np.zeros((T, max(K - 1, 0)), bool)
  bwd_sends = np.zeros((T, max(K - 1, 0)), bool)
  writers = {}
  for (t, k), g in parts:
    sm = (g.step, g.microbatch)
    if g.forward and k < K - 1:
      fwd_sends[t, k] = True
      writers["x", k + 1, *sm] = t + 0.5
    # F's own cotangent and residuals: after the tick's B group (half a tick on).
    if g.forward and ("c", k, *sm, k) in readers:
      writers["c", k, *sm, k] = t + 0.5
    if g.forward and ("r", k, *sm) in readers:
      writers["r", k, *sm] = t + 0.5
    for b in g.backward:
      for j in b.passes:
        bwd_sends[t, k - 1] = True
        writers["c", k - 1, *sm, j] = t + 0.5
  for key, end in readers.items():
    ivs = {"x": x_iv, "c": cot_iv, "r": res_iv}[key[0]]
    ivs[key[1]].append((writers[key], end, key))
  slot_of, x_slots = _colour(x_iv)
  cot_of, cot_slots = _colour(cot_iv)
  res_of, res_slots = _colour(res_iv)
  slot_of.update(cot_of)
  slot_of.update(res_of)

  kinds = tuple(sorted({tuple(g.kind for g in gs) for gs in groups.values()}, key=repr))
  lossw = max(width, 1)
  names = ("branch", "update", "u_step", "step", "microbatch", "b_step", "b_microbatch")
  slots = ("x_slot", "b_x_slot", "own_slot", "x_store", "cot_store", "res_store", "res_slot")
  f = {name: np.zeros((T, K), np.int32) for name in names + slots}
  f["cot_slots"] = np.full((T, K, lossw), cot_slots, np.int32)
  for name in ("x_slot", "b_x_slot", "x_store"):
    f[name][:] = x_slots
  for name in ("own_slot", "cot_store"):
    f[name][:] = cot_slots
  for name in ("res_store", "res_slot"):
    f[name][:] = res_slots
  for (t, k), gs in groups.items():
    f["branch"][t, k] = 1 + kinds.index(tuple(g.kind for g in gs))
    f["update"][t, k] = int(gs[-1].update)
    f["u_step"][t, k] = gs[-1].step
  for (t, k), g in parts:
    sm = (g.step, g.microbatch)
    if g.forward:  # The F group's fields.
      f["step"][t, k], f["microbatch"][t, k] = sm
      if k > 0:
        f["x_slot"][t, k] = slot_of["x", k, *sm]
      f["own_slot"][t, k] = slot_of.get(("c", k, *sm, k), cot_slots)
      f["res_store"][t, k] = slot_of.get(("r", k, *sm), res_slots)
    else:  # The B group's.
      f["b_step"][t, k], f["b_microbatch"][t, k] = sm
      if k > 0:
        f["b_x_slot"][t, k] = slot_of["x", k, *sm]
      (b,) = g.backward
      for n, j in enumerate(b.losses):
        f["cot_slots"][t, k, n] = slot_of["c", k, *sm, j]
      if not remat:
        f["res_slot"][t, k] = slot_of["r", k, *sm]
    if g.forward and k < K - 1 and ("x", k + 1, *sm) in slot_of:
      f["x_store"][t, k + 1] = slot_of["x", k + 1, *sm]
    for b in g.backward:
      for j in b.passes:
        f["cot_store"][t, k - 1] = slot_of["c", k - 1, *sm, j]
  return TickTable(T, groups, kinds, f, x_slots, cot_slots, fwd_sends, bwd_sends, res_slots, remat)


def _colour(per_stage: list[list[tuple]]) -> tuple[dict, int]:
  """Greedy interval colouring per stage: {key: slot}, and the most slots any stage needs."""
  slot_of, most = {}, 0
  for intervals in per_stage:
    free_at: list[float] = []  # slot -> tick of its last reader
    for start, end, key in sorted(intervals):
      slot = next((i for i, e in enumerate(free_at) if e < start), None)
      if slot is None:
        slot = len(free_at)
        free_at.append(end)
      free_at[slot] = end
      slot_of[key] = slot
    most = max(most, len(free_at))
  return slot_of, most


def predict_time(table: TickTable, schedule: Schedule, slowdown: Slowdown = 1.0) -> float:
  """The cost model of a lock-step program: time of one call of `table`, in the costs' unit.

  Every tick lasts as long as its slowest stage: the sum of its groups' ops' durations
  (`schedule.duration`, from `schedule.costs`), plus, under remat, a forward for a B group
  (the B op's recompute). A tick in which n >= 2 stages are busy takes `stretch(slowdown, n)`
  times as long (devices sharing cores; 1 on accelerators), as in `Schedule.predict`. Without
  remat a B op reads its stored residuals: no recompute.

  Returns:
    The predicted time of the whole call (divide by its steps for time per step).
  """
  total = 0.0
  for t in range(table.num_ticks):
    busy = []
    for k in range(schedule.num_stages):
      time = 0.0
      for g in table.groups.get((t, k), ()):
        ops = [Forward(k, g.microbatch, g.step), Loss(k, g.microbatch, g.step)]
        ops = ops if g.forward else []
        ops += [Backward(k, g.microbatch, g.step, b) for b in g.backward]
        ops += [Update(k, None, g.step)] if g.update else []
        recompute = schedule.costs[k].forward if table.remat and not g.forward else 0.0
        time += recompute + sum(schedule.duration(op) for op in ops)
      if (t, k) in table.groups:
        busy.append(time)
    if busy:
      total += max(busy) * stretch(slowdown, len(busy))
  return total
