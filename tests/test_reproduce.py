"""scripts/reproduce.py: the smoke quick suite end to end, skip and resume, claims, the report.

The end-to-end run trains the whole quick suite through the experiment binaries on runlocal
configs (14 runs of a few steps, two at a time, sharing a compilation cache); the other tests
reuse its directory or write metrics.jsonl files by hand.
"""

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from experiments import suites
from ilbp import pipeline_time
from ilbp.execution import schedule
from ilbp.strategy import strategy as parse_strategy
from scripts import gradient_alignment, reproduce, reproduce_report

QUICK_ROWS = [
  "local",
  "pairwise (furthest)",
  "pairwise (sum)",
  "3wise (furthest)",
  "3wise (sum)",
  "global (furthest)",
  "global (sum)",
]


def _reproduce(*args, timeout=900):
  out = subprocess.run(
    [sys.executable, "-m", "scripts.reproduce", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("smoke")
  start = time.time()
  stdout = _reproduce("--suite=quick", "--smoke", f"--out={out}", "--jobs=2", "--claim_settle_s=0")
  return out, stdout, time.time() - start


def _table_rows(text: str, section: str) -> dict[str, list[str]]:
  """The rows of one '## section' table of table.md, by strategy."""
  body = text.split(f"## {section}")[1].split("\n## ")[0]
  rows = [line.strip("|").split("|") for line in body.splitlines() if line.startswith("| ")]
  return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_smoke_suite_writes_table_csv_and_every_plot(smoke_dir):
  out, stdout, _ = smoke_dir
  # The smoke suite's own count and time, not the full suite's 42 runs.
  assert stdout.startswith("suite quick (smoke): 14 runs; ") and "14 runs at --jobs=2" in stdout
  assert stdout.count(": done in ") == 14
  text = (out / "table.md").read_text()
  for section in ("stdlib: test perplexity", "digits: test accuracy"):
    rows = _table_rows(text, section)
    assert list(rows) == QUICK_ROWS
    for name, cells in rows.items():
      # seeds, 4 heads, gap recovered, steps/s, modelled time, vs global: all numbers; then
      # the schedule, measured-cost ms/step and speed-up retained, and 4 stages' MB in flight.
      assert cells[0] == "1"
      for value in cells[1:5] + cells[6:9] + cells[10:12]:
        float(value)
      assert cells[4] != "—", name
      assert cells[9] in schedule.SCHEDULES and len(cells[14].split("/")) == 4
    assert float(rows["local"][8]) < 1.0 == float(rows["global (furthest)"][8])
    assert rows["local"][11] == "1.00" and rows["global (furthest)"][11] == "0.00"
  # One measurement per experiment, before training; every run read it and logged the time.
  assert stdout.count("plan for ") == 2 and "--budget=steps" in stdout
  for run in suites.suite_runs(suites.SUITES["quick"], smoke=True):
    log = (out / run.name / reproduce.LOG_FILE).read_text()
    assert "op costs from pipeline_costs.json" in log, run.name
    metrics = [json.loads(x) for x in (out / run.name / "metrics.jsonl").read_text().splitlines()]
    assert all("pipeline/seconds" in r for r in metrics if "train/head1/loss" in r), run.name
  # Perplexities of different strategies differ even after 4 steps: the gap is defined.
  stdlib = _table_rows(text, "stdlib: test perplexity")
  assert stdlib["local"][5] == "0.00" and stdlib["global (furthest)"][5] == "1.00"
  assert "relative-cost model" in text and "not a measurement" in text
  assert "Speed-up retained" in text
  with open(out / "results.csv") as f:
    results = list(csv.DictReader(f))
  assert len(results) == 14 and {r["split"] for r in results} == {"eval"}
  assert {r["seeds"] for r in results} == {"1"}  # A count, as in table.md.
  assert all(
    float(r["output_mean"]) > 0 and float(r["modelled_time_per_step"]) > 0 for r in results
  )
  plots = {p.name for p in (out / "plots").iterdir()}
  expected = {
    f"{e}_test_{kind}.png" for e in ("stdlib", "digits") for kind in ("heads", "tradeoff")
  }
  expected |= {f"gantt_K4_{s}_{c}.png" for s, c, _ in suites.variants(4)}
  assert expected <= plots and len(expected) == 4 + 7
  assert all((out / "plots" / name).stat().st_size > 10_000 for name in expected)


def test_second_invocation_skips_finished_runs(smoke_dir):
  out, _, _ = smoke_dir
  done = out / "digits-local-s0" / reproduce.DONE_FILE
  before = done.read_text()
  stdout = _reproduce("--suite=quick", "--smoke", f"--out={out}")
  assert stdout.count("finished, skipped") == 14 and "training" not in stdout
  assert done.read_text() == before
  assert "| local |" in (out / "table.md").read_text()


def test_interrupted_run_resumes_from_its_checkpoint(smoke_dir):
  out, _, _ = smoke_dir
  # What a run killed between its checkpoints at steps 3 and 6 leaves: no DONE, checkpoint 3.
  workdir = out / "digits-pairwise-furthest-s0"
  (workdir / reproduce.DONE_FILE).unlink()
  shutil.rmtree(workdir / "checkpoints" / "6")
  stdout = _reproduce(
    "--suite=quick", "--smoke", f"--out={out}", "--only=digits-pairwise-furthest-*"
  )
  assert "[1/1] digits-pairwise-furthest-s0: training" in stdout
  log = (workdir / reproduce.LOG_FILE).read_text()
  assert "at step 3." in log.split("$ python")[-1]  # "Resumed from …/checkpoints at step 3."
  assert (workdir / reproduce.DONE_FILE).exists() and (workdir / "checkpoints" / "6").exists()


def test_time_budget_trains_the_planned_steps_from_the_suites_costs(smoke_dir, tmp_path):
  out, _, _ = smoke_dir
  # The smoke suite's measured costs (and compiled programs): nothing is measured again.
  shutil.copytree(out / reproduce.COSTS_DIR, tmp_path / reproduce.COSTS_DIR)
  args = ["--suite=quick", "--smoke", f"--out={tmp_path}", f"--compilation_cache={out}/jax_cache"]
  stdout = _reproduce(*args, "--only=digits-local-s0", "--budget=time")
  assert "plan for digits (--budget=time" in stdout and "[1/1] digits-local-s0: training" in stdout
  costs = pipeline_time.read(tmp_path / reproduce.COSTS_DIR / "digits")
  assert costs == pipeline_time.read(out / reproduce.COSTS_DIR / "digits")
  parts = reproduce.plan(pipeline_time.costs_from_json(costs["costs"]), 4, 8, 6, "time")
  local, glob = parts["local", "furthest"], parts["global", "furthest"]
  # runlocal digits: global trains its 6 steps; local for global's time at its own step time
  # (which of the two is faster depends on this tiny model's costs on a loaded machine).
  assert glob.steps == 6
  assert local.steps == max(1, math.floor(6 * glob.seconds_per_step / local.seconds_per_step))
  planned = json.loads((tmp_path / reproduce.PLAN_FILE).read_text())
  expected = ["pipeline_time.schedule=1f1b", f"total_steps={local.steps}"]
  assert planned["runs"]["digits-local-s0"] == expected
  workdir = tmp_path / "digits-local-s0"
  assert "op costs from pipeline_costs.json" in (workdir / reproduce.LOG_FILE).read_text()
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = rows[-1]
  assert last["step"] == local.steps
  assert last["pipeline/seconds"] == local.steps * local.seconds_per_step
  assert last["pipeline/seconds"] <= 6 * glob.seconds_per_step
  # The DIR keeps its budget.
  refused = subprocess.run(
    [sys.executable, "-m", "scripts.reproduce", *args, "--budget=steps"],
    capture_output=True,
    text=True,
  )
  assert refused.returncode != 0 and "Use another --out" in refused.stderr


def test_gradient_alignment_of_a_smoke_run(smoke_dir):
  out, _, _ = smoke_dir
  result = gradient_alignment.alignment(
    str(out / "stdlib-pairwise-furthest-s0"), step=None, batches=1, data_step=0
  )
  assert result["step"] == 4 and result["strategy"] == "pairwise/furthest"
  # Stage k (1-based) is reached by losses k..K; every pair of them gets a cosine.
  assert [s["losses"] for s in result["stages"]] == [[1, 2, 3, 4], [2, 3, 4], [3, 4], [4]]
  for s in result["stages"]:
    assert all(math.isfinite(v) and v > 0 for v in s["norms"].values())
    assert len(s["cosines"]) == len(s["losses"]) * (len(s["losses"]) - 1) // 2
    assert all(-1.0 - 1e-6 <= c <= 1.0 + 1e-6 for c in s["cosines"].values())
  assert "stage 1: |g1|=" in gradient_alignment.render(result)


def test_dry_run_prints_the_selected_commands(tmp_path):
  stdout = _reproduce(
    "--suite=quick", "--dry_run", f"--out={tmp_path}", "--only=digits-*-s1,*3wise-sum-s2"
  )
  names = [line for line in stdout.splitlines() if line and not line.startswith((" ", "suite"))]
  variants = [
    "local",
    *(f"{s}-{c}" for s in ("pairwise", "3wise", "global") for c in ("furthest", "sum")),
  ]
  assert names[:7] == [f"digits-{v}-s1" for v in variants]
  assert names[7:] == ["stdlib-3wise-sum-s2", "digits-3wise-sum-s2"]
  assert (
    f"python -m experiments.resnet --config=experiments/configs/resnet_digits.py:"
    f"strategy=pairwise,stages=4,combine=sum --workdir={tmp_path}/digits-pairwise-sum-s1 "
    "--config.seed=1 " in stdout
  )
  assert not any(tmp_path.iterdir())  # Nothing trained, nothing written.


def test_suites_list_every_distinct_strategy():
  assert [(s, c) for s, c, _ in suites.variants(4)] == [
    ("local", "furthest"),
    ("pairwise", "furthest"),
    ("pairwise", "sum"),
    ("3wise", "furthest"),
    ("3wise", "sum"),
    ("global", "furthest"),
    ("global", "sum"),
  ]
  # At K = 3, 3wise reaches every stage: it is global, and not trained twice.
  assert [s for s, _, _ in suites.variants(3)] == [
    "local",
    "pairwise",
    "pairwise",
    "global",
    "global",
  ]
  for suite in suites.SUITES.values():
    runs = suites.suite_runs(suite)
    assert len({r.name for r in runs}) == len(runs) == 7 * len(suite.seeds) * len(suite.experiments)
  quick = suites.suite_runs(suites.SUITES["quick"])
  assert {r.seed for r in quick} == {0, 1, 2}
  with pytest.raises(ValueError, match="matches no run"):
    reproduce.select(quick, ["nothing-*"])


def test_claims_one_holder_stale_taken_over(tmp_path):
  a, b = reproduce.Claim(str(tmp_path)), reproduce.Claim(str(tmp_path))
  assert a.take(stale_after_s=60, settle_s=0) is None
  assert b.take(stale_after_s=60, settle_s=0)["token"] == a.me["token"]  # Live: same host, pid.
  # Another host's claim: live while its heartbeat is fresh, taken over once stale.
  other = {"host": "other-host", "pid": 1, "token": "t", "heartbeat": time.time()}
  (tmp_path / reproduce.CLAIM_FILE).write_text(json.dumps(other))
  assert b.take(stale_after_s=60, settle_s=0)["host"] == "other-host"
  other["heartbeat"] -= 120
  (tmp_path / reproduce.CLAIM_FILE).write_text(json.dumps(other))
  assert b.take(stale_after_s=60, settle_s=0) is None
  b.release()
  assert not (tmp_path / reproduce.CLAIM_FILE).exists()
  # A dead process on this host holds nothing.
  dead = {"host": socket.gethostname(), "pid": 2**22 + 7, "token": "d", "heartbeat": time.time()}
  (tmp_path / reproduce.CLAIM_FILE).write_text(json.dumps(dead))
  assert a.take(stale_after_s=60, settle_s=0) is None


def _fake_run(out, run, finals: dict, steps=(10, 20), rate=5.0):
  """A finished run whose metrics.jsonl ends with `finals` (key -> value)."""
  workdir = out / run.name
  workdir.mkdir()
  rows = [
    {"step": s, "steps_per_sec": rate, **{k: v * s / steps[-1] for k, v in finals.items()}}
    for s in steps
  ]
  rows.append({"step": steps[-1], "steps_per_sec": rate})
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (workdir / reproduce.DONE_FILE).write_text(json.dumps({"args": run.args()}))


def test_report_mean_sd_gap_and_splits(tmp_path):
  # Perplexity, K = 4, 2 seeds: local 8/10 -> 9, global 4/6 -> 5, pairwise-sum 6/8 -> 7 (gap 0.5).
  runs = suites.suite_runs(suites.SUITES["quick"], seeds=[0, 1])
  output = {"local": 9.0, "global (furthest)": 5.0, "pairwise (sum)": 7.0}
  chosen = [r for r in runs if r.experiment.label == "stdlib" and r.variant in output]
  for r in chosen:
    value = output[r.variant] + (1 if r.seed else -1)
    finals = {f"eval/head{k}/perplexity": value + 4 - k for k in range(1, 5)}
    _fake_run(tmp_path, r, finals | {"val/head4/perplexity": value, "val/head1/perplexity": 2.0})
  table = reproduce_report.aggregate(chosen, str(tmp_path), microbatches=8)
  test = {r["variant"]: r for r in table if r["split"] == "eval"}
  assert test["pairwise (sum)"]["output"] == (7.0, pytest.approx(2**0.5))
  assert test["pairwise (sum)"]["head1"][0] == 10.0
  assert test["pairwise (sum)"]["gap"] == pytest.approx(0.5)
  assert test["local"]["gap"] == 0.0 and test["global (furthest)"]["gap"] == 1.0
  assert test["local"]["steps_per_sec"] == (5.0, 0.0)
  assert test["local"]["modelled_vs_global"] < 1.0
  assert {r["split"] for r in table} == {"eval", "val"}
  written = reproduce_report.write(str(tmp_path), suite="t", runs=chosen, missing=["x-s9"])
  text = (tmp_path / "table.md").read_text()
  assert "## stdlib: validation perplexity" in text and "x-s9" in text
  assert "| pairwise (sum) | 2 | 10.00 ± 1.41 | 9.00 ± 1.41 |" in text
  assert all(os.path.getsize(p) > 0 for p in written)
  with open(tmp_path / "results.csv") as f:
    seeds = {(r["strategy"], r["combine"], r["split"]): r["seeds"] for r in csv.DictReader(f)}
  assert seeds[("pairwise", "sum", "eval")] == "2"  # How many seeds, as table.md's column says.
  with open(tmp_path / "runs.csv") as f:
    assert sorted({r["seed"] for r in csv.DictReader(f)}) == ["0", "1"]
  with open(tmp_path / "curves.csv") as f:
    points = list(csv.DictReader(f))
  # Every evaluation of every run, so the curves can be drawn again without the workdirs:
  # pairwise (sum) ends at 6 (seed 0) and 8 (seed 1), halfway there at step 10.
  pairwise = {
    (p["seed"], p["step"]): float(p["head4"])
    for p in points
    if (p["strategy"], p["combine"], p["split"]) == ("pairwise", "sum", "eval")
  }
  assert pairwise == {("0", "10"): 3.0, ("0", "20"): 6.0, ("1", "10"): 4.0, ("1", "20"): 8.0}


def test_curves_have_whole_step_ticks(tmp_path):
  # Evaluated at steps 2 and 4: matplotlib's default ticks would be 2.0, 2.25, 2.5, ...
  run = suites.suite_runs(suites.SUITES["quick"])[0]
  _fake_run(tmp_path, run, {f"eval/head{k}/perplexity": 5.0 for k in range(1, 5)}, steps=(2, 4))
  (row,) = reproduce_report.aggregate([run], str(tmp_path), microbatches=8)
  for ax in reproduce_report.curves_figure([row]).axes:
    ticks = [t for t in ax.get_xticks() if 2 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_summary_names_the_selected_runs_and_their_time():
  quick = suites.SUITES["quick"]
  full, smoke = suites.suite_runs(quick), suites.suite_runs(quick, smoke=True)
  assert reproduce.summary(quick, full, len(full), smoke=False) == (
    f"suite quick: 42 runs; {quick.where}; {quick.wall}."
  )
  assert "42 runs" in quick.wall and "14 runs" in quick.smoke_wall
  line = reproduce.summary(quick, smoke[:3], len(smoke), smoke=True)
  assert line.startswith("suite quick (smoke): 3 of 14 runs; ") and quick.smoke_wall in line


# Op costs of 4 equal stages (seconds): global's merged backward and local's weight-only one
# make local the fastest per step, global (sum) the slowest.
_STAGE = schedule.StageCost(1e-3, 2e-5, 1.4e-3, 2.2e-3, 5e-4, 2.3e-3)
COSTS = schedule.MeasuredCosts(
  stages=(_STAGE,) * 4,
  link=schedule.Link(1e-4, 1e9),
  boundary_bytes=(4096,) * 3,
  residual_bytes=(10_000,) * 4,
  rows=8,
  source="test",
)


def test_time_budget_gives_faster_strategies_proportionally_more_steps():
  by_steps = reproduce.plan(COSTS, 4, 8, 150, "steps")
  by_time = reproduce.plan(COSTS, 4, 8, 150, "time")
  assert list(by_time) == [(s, c) for s, c, _ in suites.variants(4)]
  assert {p.steps for p in by_steps.values()} == {150}
  glob = by_time["global", "furthest"]
  assert glob.steps == 150 and glob.label == "global (furthest)"
  total = 150 * glob.seconds_per_step
  for p in by_time.values():
    # Rounded down: never more modelled time than global's, and less than one step short.
    assert p.steps == math.floor(total / p.seconds_per_step + 1e-6)
    assert p.steps * p.seconds_per_step <= total * (1 + 1e-9)
    assert p.seconds_per_step == by_steps[p.strategy, p.combine].seconds_per_step
    # Each strategy's schedule is the fastest that applies to it.
    strategy = parse_strategy(p.strategy, p.combine)
    for name in schedule.SCHEDULES:
      if schedule.applies(name, strategy, 4):
        t = schedule.predict_step(COSTS, strategy, 8, name)["seconds_per_step"]
        assert p.seconds_per_step <= t
  assert by_time["local", "furthest"].steps > 150 > by_time["global", "sum"].steps
  assert by_time["local", "furthest"].label == "local"
  assert "global (furthest)    " in reproduce.render_plan("x", by_time, "time", 4, 8, "test")
  with pytest.raises(ValueError, match="budget must be 'steps' or 'time'"):
    reproduce.plan(COSTS, 4, 8, 150, "wall")


def test_a_suite_dir_keeps_its_budget(tmp_path):
  assert reproduce.check_budget(str(tmp_path), "time") == {}
  (tmp_path / reproduce.PLAN_FILE).write_text(json.dumps({"budget": "steps", "runs": {"a": []}}))
  assert reproduce.check_budget(str(tmp_path), "steps") == {"a": []}
  with pytest.raises(ValueError, match=r"--budget=steps; .* Use another --out"):
    reproduce.check_budget(str(tmp_path), "time")


def test_report_puts_time_on_the_x_axis(tmp_path):
  # Accuracy, K = 4, one seed; evaluated at steps 10, 20 and 40, rising linearly to the final.
  runs = suites.suite_runs(suites.SUITES["quick"], seeds=[0])
  output = {"local": 0.3, "global (furthest)": 0.9, "pairwise (sum)": 0.6}
  chosen = [r for r in runs if r.experiment.label == "digits" and r.variant in output]
  parts = reproduce.plan(COSTS, 4, 8, 40, "steps")
  for r in chosen:
    finals = {f"eval/head{k}/accuracy": output[r.variant] for k in (1, 2, 3, 4)}
    _fake_run(tmp_path, r, finals, steps=(10, 20, 40))
    planned = parts[r.strategy, r.combine]
    reproduce.seed_costs(str(tmp_path / r.name), {"version": 1, **_cache_of(COSTS)})
    seg = {"step": 0, "seconds_per_step": planned.seconds_per_step, "schedule": planned.schedule}
    cache = pipeline_time.read(tmp_path / r.name)
    cache["segments"] = [seg | {"microbatches": 8, "continuous": True}]
    pipeline_time.write(tmp_path / r.name, cache)
    path = tmp_path / r.name / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for row in rows:
      row["pipeline/seconds"] = row["step"] * planned.seconds_per_step
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  table = reproduce_report.aggregate(chosen, str(tmp_path), microbatches=8)
  by = {r["variant"]: r for r in table}
  t = {r.variant: parts[r.strategy, r.combine].seconds_per_step for r in chosen}
  assert by["global (furthest)"]["pipeline"]["schedule"] == parts["global", "furthest"].schedule
  assert by["local"]["speedup_retained"] == 1.0 and by["global (furthest)"]["speedup_retained"] == 0
  expected = (t["global (furthest)"] - t["pairwise (sum)"]) / (t["global (furthest)"] - t["local"])
  assert by["pairwise (sum)"]["speedup_retained"] == pytest.approx(expected)
  # Global reaches its own final 90 % at step 40, local's 30 % at step 20 (45 %; 22.5 % at 10);
  # pairwise reaches 30 % at step 20; local never reaches 90 %.
  assert by["global (furthest)"]["time_to_global"] == pytest.approx(40 * t["global (furthest)"])
  assert by["global (furthest)"]["time_to_local"] == pytest.approx(20 * t["global (furthest)"])
  assert by["pairwise (sum)"]["time_to_local"] == pytest.approx(20 * t["pairwise (sum)"])
  assert by["local"]["time_to_global"] is None
  assert by["local"]["time_to_local"] == pytest.approx(40 * t["local"])
  inflight = by["global (furthest)"]["pipeline"]["inflight_bytes"]
  assert inflight == [n * 10_000 for n in (4, 3, 2, 1)]  # 1F1B's warm-up, 10 kB a microbatch.
  for ax in reproduce_report.curves_figure(list(by.values())).axes:
    assert ax.get_xlabel().startswith("modelled pipeline time (s; K=4 devices, M=8)")
    assert max(x for line in ax.get_lines() for x in line.get_xdata()) == pytest.approx(
      40 * max(t.values())
    )
  text = reproduce_report.markdown(table, "t", [], 8)
  assert f"| {parts['global', 'furthest'].schedule} |" in text and "Speed-up retained" in text
  assert "| 0.04/0.03/0.02/0.01 |" in text
  reproduce_report.write_csv(table, tmp_path / "results.csv")
  with open(tmp_path / "results.csv") as f:
    csv_rows = {r["strategy"]: r for r in csv.DictReader(f)}
  assert csv_rows["local"]["speedup_retained"] == "1.0"
  assert csv_rows["global"]["inflight_bytes_per_stage"] == "40000/30000/20000/10000"


def _cache_of(costs) -> dict:
  return {"key": {}, "costs": pipeline_time.costs_to_json(costs)}


def test_seeds_from_an_earlier_curves_csv_join_the_report(tmp_path):
  # Seed 1's workdirs are gone, its curves.csv kept: seed 0's runs plus that file report as
  # both seeds' runs do (means, sd, gap, curves), and the new curves.csv holds both seeds.
  runs = suites.suite_runs(suites.SUITES["quick"], seeds=[0, 1])
  output = {"local": 9.0, "global (furthest)": 5.0, "pairwise (sum)": 7.0}
  chosen = [r for r in runs if r.experiment.label == "stdlib" and r.variant in output]
  both, first, second = (tmp_path / d for d in ("both", "first", "second"))
  for d in (both, first, second):
    d.mkdir()
  for r in chosen:
    value = output[r.variant] + (1 if r.seed else -1)
    finals = {f"eval/head{k}/perplexity": value + 4 - k for k in range(1, 5)}
    _fake_run(both, r, finals)
    _fake_run(second if r.seed else first, r, finals)
  seed0 = [r for r in chosen if r.seed == 0]
  reproduce_report.write(str(second), suite="t", runs=[r for r in chosen if r.seed], missing=[])
  curves = str(second / "curves.csv")
  earlier = [reproduce_report.read_curves_csv(curves)]
  reproduce_report.write(str(first), suite="t", runs=seed0, missing=[], curves_from=earlier)
  merged = reproduce_report.aggregate(seed0, str(first), 8)
  added = reproduce_report.add_seeds(merged, reproduce_report.read_curves_csv(curves))
  assert len(added) == 3 and all(a.endswith("seed 1") for a in added)
  whole = reproduce_report.aggregate(chosen, str(both), 8)
  for a, b in zip(merged, whole, strict=True):
    for key in ("seeds", "output", "head1", "gap", "time_to_local", "curves"):
      assert a[key] == b[key], key
  # Adding the same file again adds nothing; a file of another experiment's shape is refused.
  assert reproduce_report.add_seeds(merged, reproduce_report.read_curves_csv(curves)) == []
  text = (first / "table.md").read_text()
  assert "| pairwise (sum) | 2 | 10.00 ± 1.41 |" in text and "Read from curves.csv" in text
  with open(first / "curves.csv") as f:
    assert {p["seed"] for p in csv.DictReader(f)} == {"0", "1"}
  short = {k: {1: [(20, [1.0, 2.0], None)]} for k in reproduce_report.read_curves_csv(curves)}
  with pytest.raises(reproduce_report.CurvesMismatch, match="have 2 heads, the runs have 4"):
    reproduce_report.add_seeds(reproduce_report.aggregate(seed0, str(first), 8), short)


def test_a_missing_curves_file_is_refused_before_anything_trains(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "scripts.reproduce", "--suite=quick", "--smoke", f"--out={tmp_path}",
     f"--curves_from={tmp_path}/gone.csv"],
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert out.returncode != 0 and f"--curves_from={tmp_path}/gone.csv: not a readable" in out.stderr
  assert not any(tmp_path.iterdir())  # Nothing trained, nothing written.
