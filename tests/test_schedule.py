"""The pipeline schedule: dependencies, per-stage order, the cost model against hand-worked sums."""

import dataclasses
import itertools

import pytest

from ilbp.execution.gantt import gantt
from ilbp.execution.schedule import (
  Backward,
  Forward,
  Link,
  MeasuredCosts,
  StageCost,
  Update,
  applies,
  build,
  closed_form,
  describe_slowdown,
  predict_step,
  relative_costs,
  stretch,
)
from ilbp.strategy import strategy

NAMES = ("gpipe", "1f1b", "zb")
SPLIT = {"gpipe": None, "1f1b": None, "zb": (1, 1, 1, 1)}  # zb: split from microbatch 1 on

STRATEGIES = [
  strategy("local"),
  strategy("pairwise"),
  strategy("3wise"),
  strategy("global"),
  strategy("pairwise", combine="sum"),
  strategy("global", combine="sum"),
]


def unit_costs(num_stages, head=0.25):
  """Hand-workable costs: f = 1, b = 1, w = 2 (merged = b + w), head on stages with one."""
  return [StageCost(1.0, head if k < num_stages - 1 else 0.0, 1.0, 2.0) for k in range(num_stages)]


def _kinds(ops):
  """Op kinds with B split into "Bi" (input gradient only) and "Bw" (weight gradient)."""
  return [op.kind if op.kind != "B" else ("Bw" if op.backward.params else "Bi") for op in ops]


# --- Every op once, every dependency first -----------------------------------------------------


@pytest.mark.parametrize("strat", STRATEGIES, ids=lambda s: f"{s.name}-{s.combine}")
@pytest.mark.parametrize("continuous", [True, False])
def test_dispatch_order_is_a_topological_order_of_the_step(strat, continuous):
  for (K, M, step), name in itertools.product([(1, 2, 0), (3, 1, 0), (4, 3, 0), (4, 3, 1)], NAMES):
    sched = build(strat, K, M, continuous=continuous, schedule=name)
    order = sched.dispatch_order(step)
    assert sorted(map(repr, order)) == sorted(map(repr, sched.ops(step)))
    assert len(set(order)) == len(order) == len(sched.ops(step))
    pos = {op: i for i, op in enumerate(order)}
    for op in order:
      for dep in sched.dependencies(op):
        if dep.step == step:
          assert pos[dep] < pos[op], (dep, op)


@pytest.mark.parametrize("strat", STRATEGIES, ids=lambda s: f"{s.name}-{s.combine}")
def test_simulated_times_respect_dependencies_latency_and_one_op_per_stage(strat):
  for continuous, name in itertools.product((True, False), NAMES):
    sched = build(strat, 4, 3, continuous=continuous, comm=0.5, schedule=name, split=SPLIT[name])
    tl = sched.simulate(steps=3)
    slot = {s.op: s for s in tl.slots}
    assert len(slot) == len(tl.slots) == 3 * len(sched.ops())
    for s in tl.slots:
      assert s.end - s.start == pytest.approx(sched.duration(s.op))
      for dep in sched.dependencies(s.op):
        latency = 0.5 if dep.stage != s.op.stage else 0.0
        assert s.start >= slot[dep].end + latency - 1e-9, (dep, s.op)
    for k in range(4):
      runs = sorted((s.start, s.end) for s in tl.slots if s.op.stage == k)
      assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(runs))


def test_dependencies_follow_the_backward_plan():
  sched = build("pairwise", 4, 2, continuous=False)
  w1 = sched.plan[1][1]  # stage 1's weight op: loss 2, sent down by stage 2's input-only op
  assert (w1.losses, w1.params, w1.passes) == ((2,), (2,), ())
  assert set(sched.dependencies(Backward(1, 1, 0, w1))) == {
    Forward(1, 1, 0),
    Backward(2, 1, 0, sched.plan[2][0]),
  }
  assert set(sched.dependencies(Forward(2, 0, 1))) == {Forward(1, 0, 1)} | {
    Update(j, None, 0) for j in range(4)
  }
  assert set(build("pairwise", 4, 2).dependencies(Forward(2, 0, 1))) == {
    Forward(1, 0, 1),
    Update(2, None, 0),
  }


# --- Per-stage order ---------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_local_runs_f_h_b_per_microbatch_with_one_in_flight(K):
  M = 4
  for continuous in (True, False):
    sched = build("local", K, M, continuous=continuous)
    assert sched.caps == (1,) * K
    for step in (0, 1):
      for ops in sched.stage_ops(step):
        assert _kinds(ops) == ["F", "H", "Bw"] * M + ["U"]
        assert [op.microbatch for op in ops[:-1]] == [m for m in range(M) for _ in range(3)]
    assert sched.predict()["inflight_max"] == [1] * K


@pytest.mark.parametrize("K", [2, 3, 4])
def test_global_is_1f1b_after_warm_up(K):
  M = 8
  sched = build("global", K, M)
  assert sched.caps == tuple(K - k for k in range(K))
  for k, ops in enumerate(sched.stage_ops()):
    kinds = [x for x in _kinds(ops) if x in ("F", "Bw")]
    warm = K - k
    assert kinds == ["F"] * warm + ["Bw", "F"] * (M - warm) + ["Bw"] * warm


def test_pairwise_stage_sends_its_own_cotangent_before_its_weight_op():
  sched = build("pairwise", 4, 8)
  for step in (0, 1):
    ops = [op for op in sched.stage_ops(step)[1] if op.kind == "B"]
    for m in range(8):
      mine = [op.backward for op in ops if op.microbatch == m]
      # Loss 1 (stage 1's head) goes down to stage 0 first; loss 2 from stage 2 trains θ_1.
      assert [(b.losses, b.params, b.passes) for b in mine] == [((1,), (), (1,)), ((2,), (2,), ())]


@pytest.mark.parametrize("strat", STRATEGIES, ids=lambda s: f"{s.name}-{s.combine}")
def test_in_flight_microbatches_stay_within_the_cap(strat):
  for K, name in itertools.product((2, 3, 4), ("1f1b", "zb")):
    sched = build(strat, K, 8, schedule=name)
    got = sched.predict()["inflight_max"]
    assert all(g <= c for g, c in zip(got, sched.caps)), (got, sched.caps)
    if strat.reach is None and strat.combine == "furthest":
      assert got == [K - k for k in range(K)]  # 1F1B's warm-up depth, no more (zb too)


# --- Pipeline schedules: gpipe, 1f1b, zb --------------------------------------------------------


@pytest.mark.parametrize("name", ["global", "pairwise", "3wise"])
def test_gpipe_runs_every_forward_of_a_stage_before_its_backwards(name):
  K, M = 4, 4
  sched = build(name, K, M, schedule="gpipe")
  assert sched.caps == (M,) * K
  for ops in sched.stage_ops():
    kinds = [x for x in _kinds(ops) if x != "H"]
    assert kinds[:M] == ["F"] * M and "F" not in kinds[M:], kinds
  assert sched.predict()["inflight_max"] == [M] * K


def test_zb_splits_merged_ops_defers_weight_ops_and_keeps_1f1b_memory():
  K, M = 4, 8
  free_split = [StageCost(1, 0, 1, 1, backward_both=2)] * K  # two halves cost one merged call
  ones, zb = (
    build("global", K, M, costs=free_split),
    build("global", K, M, costs=free_split, schedule="zb"),
  )
  assert zb.caps == ones.caps and zb.split == (0,) * K  # every microbatch split: it pays
  a, b = ones.predict(), zb.predict()
  assert b["inflight_max"] == a["inflight_max"] == [4, 3, 2, 1]
  assert b["time_per_step"] < 0.92 * a["time_per_step"]  # ZB-H1: 27 of 32
  assert b["bubble_fraction"] < a["bubble_fraction"]
  for k, ops in enumerate(zb.stage_ops()):
    kinds = _kinds(ops)
    if k:  # input-only op before the weight-only op of the same microbatch
      for m in range(M):
        mine = [x for x, op in zip(kinds, ops) if op.kind == "B" and op.microbatch == m]
        assert mine == ["Bi", "Bw"], (k, m, mine)
    # Deferred: some weight-only op runs after a later microbatch's forward.
    w_pos = {op.microbatch: i for i, op in enumerate(ops) if _kinds([op]) == ["Bw"]}
    f_pos = {op.microbatch: i for i, op in enumerate(ops) if op.kind == "F"}
    if k < K - 1:
      assert any(w_pos[m] > f_pos[m + 1] for m in range(M - 1)), kinds


def test_zb_with_measured_ratios_splits_only_the_drain_and_beats_1f1b_at_k4():
  # A merged call (1.9 f) is far cheaper than its halves apart (1.14 f + 1.83 f): zb splits
  # only the last microbatches, where the stage below would wait, and still gains.
  for K in (2, 4):
    one = build("global", K, 8).predict()["time_per_step"]
    zb = build("global", K, 8, schedule="zb")
    assert 0 < min(zb.split) < 8, zb.split
    assert zb.predict()["time_per_step"] < one
  # Forcing every microbatch to split costs more than 1f1b.
  assert build("global", 4, 8, schedule="zb", split=(0,) * 4).predict()["time_per_step"] > one


def test_zb_chooses_its_split_under_the_shared_core_slowdown():
  # Devices that share cores: a bubble lends its cores to the busy stage, so filling it gains
  # less. The split chosen is the fastest under the slowdown it is chosen for.
  for slowdown in (1.0, 1.5, 2.0):
    zb = build("global", 2, 8, schedule="zb", slowdown=slowdown)

    def time(split, slowdown=slowdown):
      sched = build("global", 2, 8, schedule="zb", split=split)
      return sched.predict(3, slowdown=slowdown)["time_per_step"]

    assert time(zb.split) <= min(time((j, j)) for j in range(9)) * (1 + 1e-9), slowdown
  assert build("global", 2, 8, schedule="zb", slowdown=2.0).split == (8, 8)  # none pays


def test_which_schedules_apply():
  assert applies("1f1b", "local", 4) and not applies("gpipe", "local", 4)
  assert not applies("zb", "local", 4)
  for name in ("pairwise", "global"):
    assert applies("gpipe", name, 4) and applies("zb", name, 4)
  with pytest.raises(ValueError, match="valid: gpipe, 1f1b, zb"):
    applies("zero-bubble", "global", 4)


def test_bad_schedule_arguments():
  with pytest.raises(ValueError, match="'zb2'; valid: gpipe, 1f1b, zb"):
    build("global", 2, 4, schedule="zb2")
  with pytest.raises(ValueError, match="zb"):
    build("global", 2, 4, split=(0, 0))
  with pytest.raises(ValueError, match="split"):
    build("global", 2, 4, schedule="zb", split=(0,))
  with pytest.raises(ValueError, match="transfer"):
    build("global", 3, 4, transfer=(1.0,))


# --- Cost model --------------------------------------------------------------------------------


def test_global_two_stages_two_microbatches_by_hand():
  # K = 2, M = 2, f = b = 1, w = 2, no head cost. Stage 0 has no input gradient, so its B op
  # costs w = 2; stage 1's merged op costs b + w = 3. Caps: W_0 = 2, W_1 = 1.
  #   stage 0: F0 [0,1] H0 F1 [1,2] H1 ... idle ...     B0 [5,7] ... idle ... B1 [9,11] U
  #   stage 1:          F0 [1,2] H0 B0 [2,5] F1 [5,6] H1 B1 [6,9] U
  # Stage 1 waits for B0 before F1 (cap 1); stage 0's B_m waits for stage 1's B_m.
  # Critical path F0 + F0 + B0 + F1 + B1 + B1 = 1 + 1 + 3 + 1 + 3 + 2 = 11.
  costs = [StageCost(1, 0, 1, 2)] * 2
  sched = build("global", 2, 2, costs=costs)
  starts = {(s.op.kind, s.op.stage, s.op.microbatch): s.start for s in sched.simulate().slots}
  assert starts[("B", 1, 0)] == 2 and starts[("F", 1, 1)] == 5 and starts[("B", 0, 1)] == 9
  pred = sched.predict()
  assert pred["makespan_one_step"] == 11
  assert pred["time_per_step"] == 11  # flushed by the semantics: the next F0 waits for B1
  assert pred["busy_per_stage"] == [1 + 1 + 2 + 2, 1 + 1 + 3 + 3]
  assert pred["bubble_fraction"] == pytest.approx(1 - (6 + 8) / (2 * 11))


def test_global_flushed_costs_m_plus_k_minus_1_microbatch_slots():
  K, M = 2, 8
  c_K = 1 + 1 + 2  # f + b + w at the last stage, which has no head
  t = build("global", K, M, costs=unit_costs(K)).predict()["time_per_step"]
  assert t == pytest.approx((M + K - 1) * c_K, rel=0.05)
  assert t == pytest.approx(closed_form("global", K, M, True, unit_costs(K)[-1]), rel=0.05)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_global_continuous_equals_flushed(K):
  for costs in (None, [StageCost(1, 0.5, 1, 2, update=0.3)] * K):
    times = [build("global", K, 8, c, costs).predict()["time_per_step"] for c in (True, False)]
    assert times[0] == pytest.approx(times[1])


def test_local_continuous_has_no_fill_in_the_steady_state():
  K, M = 2, 8
  costs = unit_costs(K)
  c_1 = max(c.forward + c.head + c.backward_weight for c in costs)  # 3.25 at stage 0
  cont = build("local", K, M, continuous=True, costs=costs).predict()
  flushed = build("local", K, M, continuous=False, costs=costs).predict()
  assert cont["time_per_step"] == pytest.approx(M * c_1)
  assert cont["time_per_step"] == pytest.approx(closed_form("local", K, M, True, costs[0]))
  assert flushed["time_per_step"] > cont["time_per_step"] + 0.5
  assert flushed["time_per_step"] == pytest.approx(flushed["makespan_one_step"])


def test_shorter_reach_is_faster_when_continuous_only_if_backward_halves_are_free():
  K, M = 4, 8
  names = ("local", "pairwise", "global")
  t = {s: build(s, K, M, costs=unit_costs(K)).predict()["time_per_step"] for s in names}
  assert t["local"] < t["pairwise"] < t["global"]
  # With the measured ratios (a merged VJP call costs about one weight-only call), pairwise's
  # two VJP calls per stage cost more than global's bubble at M = 8 (docs/pipeline.md).
  t = {s: build(s, K, M).predict()["time_per_step"] for s in names}
  assert t["local"] < t["global"] < t["pairwise"] < 1.15 * t["global"]


def test_comm_latency_slows_the_pipeline():
  fast = build("global", 3, 4).predict()["time_per_step"]
  slow = build("global", 3, 4, comm=0.5).predict()["time_per_step"]
  assert slow > fast


def test_predict_step_from_measured_costs_by_hand():
  # The hand-worked K = 2, M = 2 global step, with a link: every activation or cotangent
  # message takes latency 0.25 + 50 bytes / 200 bytes per s = 0.5 s.
  costs = MeasuredCosts(
    stages=(StageCost(1, 0, 1, 2),) * 2,
    link=Link(latency=0.25, bandwidth=200.0),
    boundary_bytes=(50,),
    residual_bytes=(1000, 3000),
  )
  p = predict_step(costs, "global", 2)
  # Critical path F0 + msg + F0 + B0 (the cap holds F1 at stage 1) + F1 + B1 + msg + B1.
  assert p["seconds_per_step"] == pytest.approx(1 + 0.5 + 1 + 3 + 1 + 3 + 0.5 + 2)
  assert p["seconds_per_step"] == p["seconds_per_step_alone"]
  assert p["inflight_max"] == [2, 1]
  assert p["inflight_bytes_per_stage"] == [2000, 3000]
  gp = predict_step(costs, "global", 2, schedule="gpipe")
  assert gp["inflight_bytes_per_stage"] == [2000, 6000]
  shared = predict_step(dataclasses.replace(costs, slowdown=2.0), "global", 2)
  assert p["seconds_per_step"] < shared["seconds_per_step"] < 2 * p["seconds_per_step"]
  with pytest.raises(ValueError, match="residual_bytes"):
    predict_step(dataclasses.replace(costs, residual_bytes=(1,)), "global", 2)


# --- Gantt and arguments -----------------------------------------------------------------------


def test_gantt_writes_a_png(tmp_path):
  tl = build("pairwise", 3, 4).simulate(steps=2)
  path = gantt(tl, tmp_path / "pairwise.png", unit="ms")
  data = path.read_bytes()
  assert data.startswith(b"\x89PNG") and len(data) > 5000
  assert Forward(0, 3).label == "F3" and Update(2).label == "U"


@pytest.mark.parametrize(
  ("kwargs", "field"),
  [
    ({"num_stages": 0}, "num_stages"),
    ({"num_stages": 2.0}, "num_stages"),
    ({"microbatches": 0}, "microbatches"),
    ({"costs": unit_costs(3)}, "costs"),
    ({"costs": [1.0, 1.0]}, "costs[0]"),
    ({"comm": -1.0}, "comm"),
    ({"continuous": "yes"}, "continuous"),
    ({"strategy": "fourwise"}, "fourwise"),
  ],
)
def test_bad_arguments_name_the_field(kwargs, field):
  args = {"strategy": "pairwise", "num_stages": 2, "microbatches": 4} | kwargs
  with pytest.raises(ValueError, match=field.replace("[", r"\[")):
    build(**args)


def test_bad_costs_and_steps_name_the_field():
  with pytest.raises(ValueError, match="backward_weight"):
    StageCost(1, 0, 1, -2)
  with pytest.raises(ValueError, match="head"):
    relative_costs(2, head=float("nan"))
  with pytest.raises(ValueError, match="steps"):
    build("local", 2, 2).predict(steps=1)
  with pytest.raises(ValueError, match="step"):
    build("local", 2, 2).dispatch_order(-1)


def test_slowdown_stretches_only_where_stages_overlap():
  sched = build("global", 2, 8, costs=unit_costs(2, head=0.0))
  alone = sched.predict(steps=4)["time_per_step"]
  shared = sched.predict(steps=4, slowdown=2.0)["time_per_step"]
  # Stages that never overlap would cost `alone`; stages always overlapping 2x as much.
  assert alone < shared < 2 * alone
  one = build("local", 1, 4, costs=unit_costs(1))
  assert (
    one.predict(steps=3, slowdown=3.0)["time_per_step"] == one.predict(steps=3)["time_per_step"]
  )


def test_slowdown_per_count_of_busy_stages():
  # One factor per count of busy stages (2, 3, 4): each stretches only the time in which that
  # many stages are busy, so the three extras add up to one factor for every overlap.
  sched = build("global", 4, 8, costs=unit_costs(4, head=0.0))
  step = lambda slowdown: sched.predict(steps=4, slowdown=slowdown)["time_per_step"]
  alone = step(1.0)
  extra = [step(tuple(2.0 if i == n else 1.0 for i in range(3))) - alone for n in range(3)]
  assert all(e >= 0 for e in extra) and sum(e > 0 for e in extra) >= 2, extra
  assert sum(extra) == pytest.approx(step(2.0) - alone)
  assert step((1.5, 1.5, 1.5)) == pytest.approx(step(1.5))
  # Counts past the tuple's end take its last factor; one stage alone is never stretched.
  assert stretch((1.4, 1.9), 4) == 1.9 and stretch((1.4, 1.9), 1) == 1.0 == stretch((), 3)
  assert describe_slowdown((1.4, 2.3)) == "2 busy 1.40x, 3 busy 2.30x"


def test_the_config_checks_the_same_schedule_names():
  from ilbp.execution import base, schedule

  assert base.SCHEDULES == schedule.SCHEDULES
