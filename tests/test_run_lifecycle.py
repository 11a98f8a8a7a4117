"""A run's life outside the happy path: refusals in one line that leave nothing behind, a stop
on SIGTERM that checkpoints and resumes exactly, damaged checkpoints, and the records a resume
keeps (metrics.jsonl one series, config_history.jsonl, a warning for a changed schedule)."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import Preempted, build_with_batches, preempt_at, with_overrides

from experiments.configs import resnet_digits
from ilbp import families, rundir, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/resnet_digits.py:strategy=pairwise,stages=2,runlocal=1"


def _tiny(**overrides):
  config = resnet_digits.get_config("strategy=pairwise,stages=2,runlocal=1")
  return with_overrides(config, **overrides)


def _binary(*args):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "experiments.resnet", *args]
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _steps(workdir):
  with open(os.path.join(workdir, rundir.METRICS_FILE)) as f:
    return [json.loads(line)["step"] for line in f]


def test_refusals_are_one_line_and_leave_nothing(tmp_path):
  work = str(tmp_path / "run")
  cases = {
    "learning_rate": ["--config", CONFIG, "--workdir", work, "--config.learning_rte=0.1"],
    "config_config.py": ["--config", "experiments/configs/config_config.py", "--workdir", work],
    "from 1 to 5": ["--config", CONFIG.replace("stages=2", "stages=20"), "--workdir", work],
  }
  # Started together: each pays Python's and JAX's start-up once, side by side.
  procs = {expected: _binary(*args) for expected, args in cases.items()}
  for expected, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and expected in lines[0], err
  assert not os.path.exists(work)
  # In-process, the same refusals: a workdir that is a file, an unknown model.
  (tmp_path / "afile").write_text("")
  with pytest.raises(rundir.RunRefused, match="is a file"):
    trainer.train_and_evaluate(_tiny(), str(tmp_path / "afile"))
  with pytest.raises(rundir.RunRefused, match="Unknown ResNet 'resnet21'"):
    trainer.train_and_evaluate(_tiny(**{"model.name": "resnet21"}), work)
  assert not os.path.exists(work)
  os.makedirs(work)  # An existing directory keeps existing, without a run.lock.
  with pytest.raises(rundir.RunRefused):
    trainer.train_and_evaluate(_tiny(**{"model.name": "resnet21"}), work)
  assert os.listdir(work) == []


def test_sigterm_checkpoints_the_step_and_the_resume_is_exact(tmp_path):
  every = {"total_steps": 60, "log_every_steps": 1, "checkpoint_every_steps": 30}
  work = tmp_path / "stopped"
  proc = _binary(
    "--config", CONFIG, "--workdir", str(work), *(f"--config.{k}={v}" for k, v in every.items())
  )
  for line in proc.stdout:
    if line.startswith("[train] step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  stopped = re.fullmatch(
    r"Stopped at step (\d+) \(SIGTERM\); checkpoint \1 written; re-run the same command to "
    r"resume\.",
    lines[0],
  )
  assert stopped, lines
  step = int(stopped.group(1))
  assert 3 <= step < 60 and os.path.isdir(work / "checkpoints" / str(step))
  assert _steps(work)[-1] == step  # The steps since the last line were logged at the stop.

  config = _tiny(**every)
  resumed = trainer.train_and_evaluate(config, str(work))
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-7)
  steps = _steps(work)
  assert steps == sorted(set(steps)) and steps[-1] == 60


def _damage(workdir, step):
  """Truncates the largest file of checkpoint `step`."""
  paths = [
    os.path.join(root, name)
    for root, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step)))
    for name in names
  ]
  with open(max(paths, key=os.path.getsize), "r+b") as f:
    f.truncate(os.path.getsize(f.name) // 2)


def test_damaged_newest_checkpoint_is_named_and_the_one_before_resumes(tmp_path, caplog):
  config = _tiny(total_steps=4, checkpoint_every_steps=2, eval_every_steps=4)
  first = trainer.train_and_evaluate(config, str(tmp_path))
  _damage(tmp_path, 4)
  with caplog.at_level("WARNING"):
    again = trainer.train_and_evaluate(config, str(tmp_path))  # From step 2; step 4 rewritten.
  assert any("checkpoints/4 is damaged" in r.getMessage() for r in caplog.records)
  assert again == pytest.approx(first, rel=1e-6, abs=1e-7)
  _damage(tmp_path, 2)
  _damage(tmp_path, 4)
  with pytest.raises(rundir.RunRefused, match=r"No intact checkpoint.*steps 4, 2"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_resume_keeps_one_metrics_series_and_records_config_changes(tmp_path, monkeypatch, caplog):
  every = {"total_steps": 4, "checkpoint_every_steps": 2, "log_every_steps": 1}
  with monkeypatch.context() as m:
    m.setattr(families, "build", build_with_batches(preempt_at(3)))
    with pytest.raises(Preempted):  # Dies asking for step 4's batch: rows 1-3, checkpoint 2.
      trainer.train_and_evaluate(_tiny(**every), str(tmp_path))
  assert _steps(tmp_path) == [1, 2, 3]
  # Resumed under another microbatch count: rows past step 2 dropped, the change recorded.
  trainer.train_and_evaluate(_tiny(**every, **{"execution.microbatches": 2}), str(tmp_path))
  assert _steps(tmp_path) == [1, 2, 3, 4]
  (entry,) = [json.loads(x) for x in (tmp_path / rundir.HISTORY_FILE).read_text().splitlines()]
  assert entry["resumed_at_step"] == 2
  assert entry["changed"] == {"execution.microbatches": {"from": 1, "to": 2}}
  # A finished run given more steps: the stretched schedule is warned about.
  longer = _tiny(**{**every, "total_steps": 5}, **{"execution.microbatches": 2})
  with caplog.at_level("WARNING"):
    assert trainer.train_and_evaluate(longer, str(tmp_path))["step"] == 5
  assert any("total_steps changed from 4 to 5" in r.getMessage() for r in caplog.records)
  assert _steps(tmp_path) == [1, 2, 3, 4, 5]
