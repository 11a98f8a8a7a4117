"""The modelled pipeline time of a run: pipeline/seconds in metrics.jsonl, its op-cost cache in
the workdir, and how both behave on resume (`ilbp.pipeline_time`)."""

import json
import textwrap

import pytest
from conftest import Preempted, build_with_batches, preempt_at, run_with_devices, with_overrides

from experiments.configs import resnet_digits
from ilbp import families, pipeline_time, rundir, trainer
from ilbp.execution import schedule


def _tiny(**overrides):
  """resnet_tiny on digits, K = 2, measured (runlocal turns it off), modelled at M = 2."""
  config = resnet_digits.get_config("strategy=pairwise,stages=2,runlocal=1")
  config.pipeline_time.measure = True
  config.pipeline_time.microbatches = 2
  config.log_every_steps = 1
  return with_overrides(config, **overrides)


def _series(workdir) -> dict[int, float]:
  rows = [json.loads(x) for x in (workdir / rundir.METRICS_FILE).read_text().splitlines()]
  return {r["step"]: r[pipeline_time.METRIC] for r in rows if pipeline_time.METRIC in r}


def _cache(workdir) -> dict:
  return json.loads((workdir / pipeline_time.COSTS_FILE).read_text())


FAKE = schedule.MeasuredCosts(
  stages=(
    schedule.StageCost(1e-3, 1e-5, 0.0, 2e-3, 5e-4, None),
    schedule.StageCost(1e-3, 0.0, 1.4e-3, 2e-3, 5e-4, 2.3e-3),
  ),
  link=schedule.Link(1e-4, 1e9),
  boundary_bytes=(4096,),
  residual_bytes=(10_000, 20_000),
  rows=32,
  source="fake",
)


@pytest.fixture
def fake_measure(monkeypatch):
  """Replaces the measurement with FAKE; returns the list of calls."""
  calls = []

  def measure(config, run, batch, state):
    calls.append(config.pipeline_time.microbatches)
    return FAKE

  monkeypatch.setattr(pipeline_time, "measure", measure)
  return calls


def test_a_run_measures_once_and_logs_linear_pipeline_seconds(tmp_path, capsys):
  final = trainer.train_and_evaluate(_tiny(total_steps=3), str(tmp_path))
  assert final["step"] == 3
  cache = _cache(tmp_path)
  (segment,) = cache["segments"]
  rate = segment["seconds_per_step"]
  assert segment["step"] == 0 and segment["microbatches"] == 2 and rate > 0
  # Every logged step, at a fixed per-step prediction: rate x step, exactly.
  assert _series(tmp_path) == {s: rate * s for s in (1, 2, 3)}
  costs = pipeline_time.costs_from_json(cache["costs"])
  assert len(costs.stages) == 2 and costs.rows == 32 and costs.stages[1].backward_input > 0
  assert costs.slowdown == 1.0  # One CPU device: the stages share it, timed alone.
  assert rate == schedule.predict_step(costs, "pairwise", 2)["seconds_per_step"]
  out = capsys.readouterr().out
  assert "pipeline time: modelled on 2 devices, M=2, 1f1b" in out and "measured now" in out
  assert f"| pipeline {3 * rate:.2f} s modelled" in out


def test_resume_continues_the_series_exactly_from_the_cache(tmp_path, monkeypatch, fake_measure):
  every = {"total_steps": 4, "checkpoint_every_steps": 2}
  straight = tmp_path / "straight"
  trainer.train_and_evaluate(_tiny(**every), str(straight))
  resumed = tmp_path / "resumed"
  with monkeypatch.context() as m:
    m.setattr(families, "build", build_with_batches(preempt_at(3)))
    with pytest.raises(Preempted):  # Dies asking for step 4's batch: checkpoint at step 2.
      trainer.train_and_evaluate(_tiny(**every), str(resumed))
  assert len(fake_measure) == 2  # Once per workdir.
  trainer.train_and_evaluate(_tiny(**every), str(resumed))
  assert len(fake_measure) == 2  # The resume read the cache.
  assert _series(resumed) == _series(straight) and sorted(_series(resumed)) == [1, 2, 3, 4]
  assert len(_cache(resumed)["segments"]) == 1


def test_a_cache_that_no_longer_matches_is_measured_again(tmp_path, fake_measure, capsys):
  trainer.train_and_evaluate(_tiny(total_steps=2, checkpoint_every_steps=2), str(tmp_path))
  first = _cache(tmp_path)["segments"][0]["seconds_per_step"]
  # Resumed with 2 more steps at another modelled M: other op costs, measured again.
  trainer.train_and_evaluate(
    _tiny(**{"total_steps": 4, "pipeline_time.microbatches": 4}), str(tmp_path)
  )
  assert fake_measure == [2, 4]
  cache = _cache(tmp_path)
  assert cache["key"]["microbatches"] == 4
  second = cache["segments"][1]["seconds_per_step"]
  assert [s["step"] for s in cache["segments"]] == [0, 2] and second != first
  assert _series(tmp_path) == {
    1: first,
    2: 2 * first,
    3: 2 * first + second,
    4: 2 * first + 2 * second,
  }
  # A schedule change re-predicts from the same costs, without measuring.
  trainer.train_and_evaluate(
    _tiny(**{"total_steps": 5, "pipeline_time.microbatches": 4, "pipeline_time.schedule": "gpipe"}),
    str(tmp_path),
  )
  assert fake_measure == [2, 4] and "from pipeline_costs.json" in capsys.readouterr().out
  # A file that does not parse is measured again, not trusted.
  (tmp_path / pipeline_time.COSTS_FILE).write_text("{")
  trainer.train_and_evaluate(
    _tiny(**{"total_steps": 6, "pipeline_time.microbatches": 4}), str(tmp_path)
  )
  assert fake_measure == [2, 4, 4]


ZB_RUN = textwrap.dedent(
  """
  import dataclasses
  from experiments.configs import resnet_digits
  from ilbp import pipeline_time, trainer
  from ilbp.execution import schedule

  # Op costs with a cheap weight-only half (0.5 f; a merged call 2.3 f): splitting every
  # microbatch pays, where the default ratios split only the last.
  stages = (
    schedule.StageCost(1e-3, 1e-5, 0.0, 5e-4, 5e-4, None),
    schedule.StageCost(1e-3, 0.0, 1.4e-3, 5e-4, 5e-4, 2.3e-3),
  )
  costs = schedule.MeasuredCosts(stages, schedule.Link(1e-4, 1e9), (4096,), (1, 1), rows=32)
  pipeline_time.measure = lambda *args: costs
  config = resnet_digits.get_config("strategy=pairwise,stages=2,runlocal=1")
  config.total_steps = 2
  config.pipeline_time.measure, config.pipeline_time.microbatches = True, 2
  config.execution.kind, config.execution.microbatches = "dataflow", 2
  config.execution.schedule = "zb"
  final = trainer.train_and_evaluate(config, WORKDIR)
  print("STEP", final["step"])
  print("MODEL SPLIT", list(schedule.predict_step(costs, "pairwise", 2, "zb")["schedule"].split))
  """
)


def test_a_dataflow_zb_run_runs_the_split_its_costs_predict(tmp_path):
  out = run_with_devices(f"WORKDIR = {str(tmp_path)!r}\n" + ZB_RUN, 2)
  assert "STEP 2" in out and "MODEL SPLIT [0, 0]" in out, out
  # Built with the default ratios' split; once the costs are in, the split they predict, the
  # one the modelled pipeline (the run's own: M = 2, zb, continuous) is predicted with.
  assert "zb, split from microbatch [1, 1] (relative costs)" in out, out
  assert "M=2, zb (split from microbatch [0, 0]):" in out, out
  assert "execution: dataflow" in out and "zb, split from microbatch [0, 0] (measured costs)" in out


def test_off_single_stage_and_bad_settings(tmp_path, fake_measure):
  trainer.train_and_evaluate(
    _tiny(total_steps=1, **{"pipeline_time.measure": False}), str(tmp_path / "off")
  )
  assert (
    not _series(tmp_path / "off") and not (tmp_path / "off" / pipeline_time.COSTS_FILE).exists()
  )
  assert pipeline_time.settings(_tiny(num_stages=1)) is None
  assert resnet_digits.get_config("runlocal=1").pipeline_time.measure is False
  assert resnet_digits.get_config().pipeline_time.measure is True
  with pytest.raises(rundir.RunRefused, match=r"pipeline_time.microbatches=3 does not divide"):
    trainer.train_and_evaluate(_tiny(**{"pipeline_time.microbatches": 3}), str(tmp_path / "a"))
  with pytest.raises(rundir.RunRefused, match=r"Unknown config.pipeline_time.schedule='x'"):
    trainer.train_and_evaluate(_tiny(**{"pipeline_time.schedule": "x"}), str(tmp_path / "b"))
  assert not fake_measure


def test_seconds_at_sums_segments_and_costs_round_trip():
  segments = [{"step": 0, "seconds_per_step": 0.5}, {"step": 4, "seconds_per_step": 0.25}]
  assert [pipeline_time.seconds_at(segments, s) for s in (0, 2, 4, 6)] == [0.0, 1.0, 2.0, 2.5]
  assert pipeline_time.costs_from_json(pipeline_time.costs_to_json(FAKE)) == FAKE
  free = pipeline_time.costs_to_json(
    FAKE.__class__(**{**FAKE.__dict__, "link": schedule.Link(0.0)})
  )
  assert free["link"]["bandwidth"] is None
  assert json.loads(json.dumps(free)) == free
