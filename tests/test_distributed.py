"""Multi-host jobs: when the launcher joins processes, and a real two-process run on CPU.

Two processes on this machine join through a coordinator on a free local port (JAX's gloo
collectives on CPU), as the hosts of a GPU cluster do; a Cloud TPU slice differs only in how JAX
finds the coordinator.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from ilbp import distributed


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


def _binary(workdir, steps, extra_env=None):
  env = dict(os.environ, **(extra_env or {}))
  env.pop("XLA_FLAGS", None)  # One CPU device per process.
  cmd = [
    sys.executable,
    "-m",
    "experiments.resnet",
    "--config=experiments/configs/resnet_digits.py:strategy=pairwise,stages=2,runlocal=1",
    f"--workdir={workdir}",
    f"--config.total_steps={steps}",
  ]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_train_checkpoint_and_resume_on_one(tmp_path):
  workdir = tmp_path / "run"
  port = _free_port()
  procs = [
    _binary(
      workdir,
      4,
      {
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i),
      },
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
  # Process 0 alone writes the console lines and metrics; evaluation counts every test image
  # once (each process evaluated its own share).
  assert "Done: 4 steps" in outs[0][0] and "Done:" not in outs[1][0]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval/count" in r]
  assert evals and evals[-1]["step"] == 4 and evals[-1]["eval/count"] == 355
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]
  # The checkpoint both processes wrote resumes in one process, which trains on to step 6.
  stdout, stderr = _binary(workdir, 6).communicate(timeout=300)
  assert "at step 4." in stdout and "Done: 6 steps" in stdout, stdout[-2000:] + stderr[-2000:]


@pytest.mark.parametrize(
  "kind, message", [("spmd", "one process so far"), ("dataflow", "one host")]
)
def test_pipelines_refuse_several_processes(monkeypatch, kind, message):
  import jax

  from experiments.configs import resnet_digits
  from ilbp import executor

  config = resnet_digits.get_config("strategy=pairwise,stages=2,runlocal=1")
  config.execution.kind = kind
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=message):
    executor.validate(config, num_devices=4)
