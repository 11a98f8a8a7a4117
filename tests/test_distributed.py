"""Multi-host jobs: when the launcher joins processes, and real two-process runs on CPU.

Two processes on this machine join through a coordinator on a free local port (JAX's gloo
collectives on CPU), as the hosts of a GPU cluster do; a Cloud TPU slice differs only in how JAX
finds the coordinator. Fused runs data parallel over both; spmd puts one stage on each.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import devices_env

from ilbp import checkpoint, distributed


def test_plan_off_and_single_process_by_default():
  assert distributed.plan("off", {"SLURM_NTASKS": "4"})[0] is None
  kwargs, why = distributed.plan("auto", {})
  assert kwargs is None and "one process" in why
  # One Slurm task, one TPU host: nothing to join.
  assert distributed.plan("auto", {"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "h0"})[0] is None


@pytest.mark.parametrize(
  "environ, what",
  [
    ({"SLURM_NTASKS": "8"}, "Slurm names 8"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI names 2"),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, "TPU host list names 4"),
  ],
)
def test_plan_auto_joins_launched_clusters(environ, what):
  kwargs, why = distributed.plan("auto", environ)
  assert kwargs == {} and what in why  # {}: JAX reads the cluster from the environment itself.


def test_plan_coordinator_from_flags_or_environment():
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234",
    "JAX_NUM_PROCESSES": "2",
    "JAX_PROCESS_ID": "1",
  }
  want = {"coordinator_address": "10.0.0.2:1234", "num_processes": 2, "process_id": 1}
  assert distributed.plan("auto", env)[0] == want
  flags = dict(coordinator_address="10.0.0.2:1234", num_processes=2, process_id=1)
  assert distributed.plan("auto", {}, **flags)[0] == want
  assert distributed.plan("on", {}, tpu_vm=False)[0] == {}
  assert distributed.plan("auto", {}, tpu_vm=True)[0] == {}
  with pytest.raises(ValueError, match="--num_processes and --process_id"):
    distributed.plan("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
  with pytest.raises(ValueError, match="valid: auto, on, off"):
    distributed.plan("sometimes", {})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


_RESNET = ("resnet", "resnet_digits.py:strategy=pairwise,stages=2,runlocal=1")
# Stage 1's token table is split over the stages under spmd (execution.vocab_parallel).
_TRANSFORMER = ("transformer", "transformer_stdlib.py:strategy=pairwise,stages=2,runlocal=1")


def _binary(workdir, steps, extra_env=None, flags=(), devices=1, family=_RESNET):
  env = dict(devices_env(devices), **(extra_env or {}))
  cmd = [
    sys.executable,
    "-m",
    f"experiments.{family[0]}",
    f"--config=experiments/configs/{family[1]}",
    f"--workdir={workdir}",
    f"--config.total_steps={steps}",
    *flags,
  ]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(workdir, steps, flags=(), family=_RESNET):
  """Starts the two processes of one job (one CPU device each)."""
  port = _free_port()
  return [
    _binary(
      workdir,
      steps,
      {
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i),
      },
      flags,
      family=family,
    )
    for i in range(2)
  ]


def _finish(procs) -> list[tuple[str, str]]:
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
  return outs


def _metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _same_steps_after(step, *workdirs):
  """The train and eval metrics of every row past `step` agree between the runs (1e-5)."""
  runs = [[r for r in _metrics(w) if r["step"] > step] for w in workdirs]
  first = runs[0]
  assert first, workdirs[0]
  for other in runs[1:]:
    assert [r["step"] for r in other] == [r["step"] for r in first]
    for x, y in zip(first, other):
      for key, value in x.items():
        if key.startswith(("train/", "eval/")):
          assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (x["step"], key)


def _resume(workdir, steps, flags=(), devices=1, family=_RESNET):
  run = _binary(workdir, steps, flags=flags, devices=devices, family=family)
  stdout, stderr = run.communicate(timeout=300)
  assert f"Done: {steps} steps" in stdout, stdout[-2000:] + stderr[-2000:]
  return stdout


_SPMD = (
  "--config.execution.kind=spmd",
  "--config.execution.microbatches=2",
  "--config.execution.steps_per_call=2",
)


def test_two_processes_train_checkpoint_and_resume_on_one_or_as_stages(tmp_path):
  workdir = tmp_path / "run"
  outs = _finish(_two_processes(workdir, 4))
  # Process 0 alone writes the console lines and metrics; evaluation counts every test image
  # once (each process evaluated its own share).
  assert "Done: 4 steps" in outs[0][0] and "Done:" not in outs[1][0]
  evals = [r for r in _metrics(workdir) if "eval/count" in r]
  assert evals and evals[-1]["step"] == 4 and evals[-1]["eval/count"] == 355
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]
  # The checkpoint both processes wrote resumes in one process, which trains on to step 6;
  # and under spmd on two processes, a stage each, which trains alike.
  staged = tmp_path / "staged"
  shutil.copytree(workdir, staged)
  # (Microbatches as spmd's: a ResNet's BatchNorm statistics are per microbatch.)
  assert "at step 4." in _resume(workdir, 6, ("--config.execution.microbatches=2",))
  _finish(_two_processes(staged, 6, _SPMD))
  _same_steps_after(4, workdir, staged)


def test_spmd_stages_on_two_processes_train_like_one_process(tmp_path):
  # The Transformer, stage 1 on process 0's device, stage 2 on process 1's: activations and
  # cotangents cross processes by ppermute, and so do the looked-up rows of the token table,
  # split over the two stages (each process holds half); both processes feed the whole batch
  # (they hold the same data column), evaluation runs as one program, and each process writes
  # its own stage's checkpoint and its own rows of the table (nothing gathered).
  two, one = tmp_path / "two", tmp_path / "one"
  lm = {"family": _TRANSFORMER}
  procs = [*_two_processes(two, 4, _SPMD, **lm), _binary(one, 4, flags=_SPMD, devices=2, **lm)]
  outs = _finish(procs)
  assert "Done: 4 steps" in outs[0][0] and "Done:" not in outs[1][0]
  assert "token table split over the stages" in outs[0][0] + outs[0][1]
  # The same training as one process driving both devices, to float rounding.
  _same_steps_after(0, one, two)
  assert _metrics(two)[-1]["eval/count"] == _metrics(one)[-1]["eval/count"] > 0
  # The same checkpoint too, read back without a target.
  saved = [checkpoint.Checkpointer(str(w / "checkpoints")).restore(4) for w in (one, two)]
  for x, y in zip(*(jax.tree.leaves(c) for c in saved), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
  # The two processes' checkpoint resumes exactly in one process, under fused and dataflow.
  other = tmp_path / "dataflow"
  shutil.copytree(two, other)
  assert "at step 4." in _resume(two, 6, **lm)
  _resume(other, 6, ("--config.execution.kind=dataflow",), devices=2, **lm)
  _same_steps_after(4, two, other)


def test_dataflow_refuses_several_processes(monkeypatch):
  import jax

  from experiments.configs import resnet_digits
  from ilbp.execution import base as executor

  config = resnet_digits.get_config("strategy=pairwise,stages=2,runlocal=1")
  config.execution.kind = "dataflow"
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="one host"):
    executor.validate(config, num_devices=4)


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


@pytest.mark.parametrize(
  "hosts, K, D, want",
  [
    # 4 hosts x 4 devices, a stage per host: every host feeds the whole batch.
    ([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, 4, 4, {0: (0, 1), 1: (0, 1), 2: (0, 1), 3: (0, 1)}),
    # 2 stages of 8 devices over 4 hosts: hosts 0 and 2 feed the first half of each
    # microbatch (columns 0-3 of both stages), hosts 1 and 3 the second.
    ([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, 2, 8, {0: (0, 2), 1: (1, 2), 2: (0, 2), 3: (1, 2)}),
    # One host: the whole batch.
    ([0] * 8, 4, 2, {0: (0, 1)}),
  ],
)
def test_input_shard_of_each_process(hosts, K, D, want):
  from ilbp import placement

  grid = placement.stage_grid(K, D, [_Device(h) for h in hosts])
  assert {p: placement.input_shard(grid, p) for p in set(hosts)} == want


def test_only_processes_without_a_first_stage_load_labels_only(monkeypatch):
  from experiments.configs import resnet_digits
  from ilbp import placement
  from ilbp.execution import base, factory

  config = resnet_digits.get_config("strategy=pairwise,stages=2,runlocal=1")
  grid = np.array([[_Device(0)], [_Device(1)]])  # A stage on each of two processes.
  monkeypatch.setattr(placement, "stage_grid", lambda K, D, devices=None: grid)
  for kind, process, want in [("spmd", 0, False), ("spmd", 1, True), ("fused", 1, False)]:
    config.execution.kind = kind
    execution = base.ExecutionConfig.from_config(config, num_devices=2)
    monkeypatch.setattr(jax, "process_index", lambda process=process: process)
    assert factory.labels_only(execution) is want, (kind, process)


def test_input_shard_refuses_ragged_columns():
  from ilbp import placement

  # 3 hosts of 2 devices, 2 stages of 3: host 1 holds column 2 of stage 1 and column 0 of
  # stage 2, so no contiguous share of a batch feeds it.
  grid = placement.stage_grid(2, 3, [_Device(h) for h in (0, 0, 1, 1, 2, 2)])
  with pytest.raises(ValueError, match="equal, aligned block of columns"):
    placement.input_shard(grid, 1)
