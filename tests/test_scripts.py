"""The scripts run and print their tables (tiny settings: these check plumbing, not speed)."""

import json
import subprocess
import sys

import pytest

from ilbp.execution import schedule


def _run(args):
  out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_benchmark_step_prints_every_strategy(tmp_path):
  path = tmp_path / "rows.json"
  stdout = _run(
    [
      "scripts.benchmark_step",
      "--config=experiments/configs/benchmark.py:model=resnet_tiny,head=pool,stages=3,batch=4",
      "--strategies=local,global",
      "--nospec",
      "--warmup=1",
      "--repeats=2",
      f"--json_out={path}",
    ]
  )
  for name in ("backprop", "local", "global"):
    assert f"\n{name} " in stdout
  rows = {r["strategy"]: r for r in json.loads(path.read_text())}
  assert abs(rows["global"]["flops_ratio"] - 1.0) < 0.05
  assert rows["local"]["flops_ratio"] < rows["global"]["flops_ratio"]


def test_compare_strategies_prints_table(tmp_path):
  stdout = _run(
    [
      "scripts.compare_strategies",
      "--config",
      "experiments/configs/resnet_digits.py:runlocal=1,stages=2",
      "--strategies=local,global",
      f"--workdir={tmp_path}",
    ]
  )
  assert "| strategy | head 1 | head 2 (output) |" in stdout
  assert "| local |" in stdout and "| global |" in stdout
  rows = json.loads((tmp_path / "results.json").read_text())
  assert [r["strategy"] for r in rows] == ["local", "global"]
  assert (tmp_path / "table.md").exists()


def test_benchmark_pipeline_prints_measured_and_predicted_rows(tmp_path):
  path = tmp_path / "rows.json"
  stdout = _run(
    [
      "scripts.benchmark_pipeline",
      "--config=experiments/configs/benchmark.py:batch=8",
      "--config.model.name=resnet_tiny",
      "--microbatches=2",
      "--strategies=local,global",
      "--executors=dataflow,fused,spmd",
      "--schedules=1f1b,zb",
      "--chunks=2",
      "--steps_per_chunk=2",
      "--spmd_steps_per_call=2",
      "--op_repeats=2",
      f"--gantt_dir={tmp_path}",
      f"--json_out={path}",
    ]
  )
  assert "vs global" in stdout and "predicted" in stdout
  rows = json.loads(path.read_text())
  keys = {"executor", "strategy", "combine", "schedule", "stages", "microbatches", "ms_per_step"}
  keys |= {"predicted_ms_per_step", "bubble_fraction", "inflight_microbatches_max"}
  assert all(keys | {"held_bytes_per_stage"} <= set(r) for r in rows)
  # Every row carries its executor's memory plan, one entry per stage (fused: one group).
  assert {r["executor"] for r in rows} == {"dataflow", "fused", "spmd"}
  for r in rows:
    groups = 1 if r["executor"] == "fused" else r["stages"]
    assert len(r["held_bytes_per_stage"]) == groups and min(r["held_bytes_per_stage"]) > 0
  flow = {(r["strategy"], r["mode"], r["schedule"]): r for r in rows if r["executor"] == "dataflow"}
  # zb applies to global only (local has no VJP call with both halves), on both pipelines.
  assert set(flow) == {
    ("local", "continuous", "1f1b"),
    ("local", "flushed", "1f1b"),
    ("global", "flushed", "1f1b"),
    ("global", "flushed", "zb"),
  }
  spmd = {(r["strategy"], r["mode"], r["schedule"]): r for r in rows if r["executor"] == "spmd"}
  assert set(spmd) == set(flow)
  # spmd's global B ops read stored residuals: a slot per microbatch in flight, no recompute.
  assert spmd["global", "flushed", "zb"]["padding"]["slots"]["residuals"] == 2
  assert all(r["predicted_ms_per_step"] > 0 for r in spmd.values())
  assert flow["global", "flushed", "1f1b"]["vs_global"] == 1.0
  assert flow["local", "continuous", "1f1b"]["inflight_microbatches_max"] == 1
  assert flow["global", "flushed", "zb"]["inflight_microbatches_max"] == 2
  assert all(r["predicted_ms_per_step"] > 0 for r in flow.values())
  assert (tmp_path / "gantt_local_furthest_continuous_1f1b_K2_M2.png").stat().st_size > 0
  assert {r["strategy"] for r in rows if r["executor"] == "fused"} == {"local", "global"}


def test_benchmark_pipeline_sweeps_combine_rules_and_runs_zb_with_its_measured_split(tmp_path):
  path = tmp_path / "rows.json"
  _run(
    [
      "scripts.benchmark_pipeline",
      "--config=experiments/configs/benchmark.py:batch=8",
      "--config.model.name=resnet_tiny",
      "--microbatches=2",
      "--strategies=local,global",
      "--combines=furthest,sum",
      "--executors=dataflow",
      "--modes=flushed",
      "--schedules=1f1b,zb",
      "--chunks=1",
      "--steps_per_chunk=1",
      "--op_repeats=1",
      f"--json_out={path}",
    ]
  )
  rows = {(r["strategy"], r["combine"], r["schedule"]): r for r in json.loads(path.read_text())}
  # Local has one plan under both rules: one row. Global's differ (sum trains with the aux
  # losses too): a row per rule and schedule.
  assert set(rows) == {
    ("local", "furthest", "1f1b"),
    ("global", "furthest", "1f1b"),
    ("global", "furthest", "zb"),
    ("global", "sum", "1f1b"),
    ("global", "sum", "zb"),
  }
  keys = {"executor", "strategy", "combine", "schedule", "stages", "microbatches", "ms_per_step"}
  keys |= {"predicted_ms_per_step", "bubble_fraction", "inflight_microbatches_max"}
  assert all(keys | {"held_bytes_per_stage"} <= set(r) for r in rows.values())
  assert rows["global", "sum", "1f1b"]["vs_global"] > 0
  assert rows["global", "furthest", "1f1b"]["vs_global"] == 1.0  # The baseline: plain backprop.
  for rule in ("furthest", "sum"):
    zb = rows["global", rule, "zb"]
    # The split chosen from the costs measured in this run, and predicted with that split.
    assert len(zb["zb_split"]) == 2 and all(0 <= j <= 2 for j in zb["zb_split"])
    assert f"{zb['zb_split']} (measured costs)" in zb["execution"]
    costs = schedule.MeasuredCosts(
      stages=tuple(schedule.StageCost(**{k: v and v / 1e3 for k, v in c.items()})
                   for c in zb["op_costs_ms"]),
      link=schedule.Link(zb["link"]["latency_ms"] / 1e3, zb["link"]["bandwidth_bytes_per_s"]),
      boundary_bytes=tuple(zb["boundary_bytes"]),
      residual_bytes=(1, 1),
      slowdown=tuple(zb["slowdown"]),
    )  # fmt: skip
    p = schedule.predict_step(costs, "global", 2, "zb", False, split=zb["zb_split"])
    assert 1e3 * p["seconds_per_step"] == pytest.approx(zb["predicted_ms_per_step"], rel=0.02)


def test_benchmark_memory_runs_each_executor_in_its_own_process(tmp_path):
  path = tmp_path / "mem.json"
  stdout = _run(
    [
      "scripts.benchmark_memory",
      "--config=experiments/configs/benchmark.py:batch=8",
      "--config.model.name=resnet_tiny",
      "--microbatches=2",
      "--executors=dataflow,spmd",
      "--chunks=1",
      "--steps_per_chunk=2",
      "--spmd_steps_per_call=2",
      f"--json_out={path}",
    ]
  )
  assert "cores" in stdout.splitlines()[0]  # The machine is named above the figures.
  rows = {r["executor"]: r for r in json.loads(path.read_text())}
  assert set(rows) == {"dataflow", "spmd"}
  for r in rows.values():
    assert r["stages"] == 2 and r["microbatches"] == 2 and r["schedule"] == "1f1b"
    assert r["ms_per_step"] > 0 and r["peak_rss_mb"] > 0 and r["plan_mb_per_device_max"] > 0
  # Each child is its own process: each reports its own peak, not the parent's.
  assert rows["dataflow"]["peak_rss_mb"] != rows["spmd"]["peak_rss_mb"]
  assert "\nspmd " in stdout and "1.00x" in stdout  # dataflow's own ratio.
