"""End-to-end runs of `train_and_evaluate` through the experiment configs.

Every strategy, both model families, TFDS datasets under `tfds.testing.mock_data`, the offline
digits and stdlib data; resume == uninterrupted (also after a crash between checkpoints); NaN
stops with the step; bad configs fail before any compute; warm-up longer than a smoke run is
clamped; a second run on a live workdir refuses; the CIFAR configs carry the authors' recipe.
"""

import itertools
import json
import math
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from clu import metric_writers
from conftest import Preempted, build_with_batches, checkpoint_params, preempt_at, with_overrides

from experiments.configs import (
  common,
  resnet_cifar10,
  resnet_cifar100,
  resnet_digits,
  resnet_imagenet,
  transformer_lm1b,
  transformer_stdlib,
)
from ilbp import checkpoint as ckpt
from ilbp import families, results, rundir, state, trainer, workdir_lock
from ilbp.models import resnet

STRATEGIES = ("local", "pairwise", "3wise", "global")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _tiny(module, arg, **overrides):
  config = module.get_config(arg + ",runlocal=1")
  return with_overrides(config, **overrides)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resnet_cifar10_every_strategy_mock_data(tmp_path, capsys, strategy):
  # The default (authors') recipe: 4 stages cut at the groups, 10% of train held out.
  config = _tiny(resnet_cifar10, f"strategy={strategy},stages=4", total_steps=2)
  with tfds.testing.mock_data(num_examples=64):
    final = trainer.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 2
  # Validation (held out of train) and test metrics, each under its own name.
  for prefix in ("val", "eval"):
    assert final[f"{prefix}/count"] == 64  # mock_data serves 64 examples for every split.
    for k in (1, 2, 3, 4):
      assert 0.0 <= final[f"{prefix}/head{k}/accuracy"] <= 1.0
      assert math.isfinite(final[f"{prefix}/head{k}/loss"])
  rows = _metrics(tmp_path)
  keys = set().union(*rows)
  assert {"train/head4/loss", "steps_per_sec", "train/grad_norm/stage1"} <= keys
  assert {"val/head4/accuracy", "eval/head4/accuracy"} <= keys
  out = capsys.readouterr().out
  assert "[val] step 2: accuracy h1=" in out and "[eval] step 2: accuracy h1=" in out
  assert os.path.exists(tmp_path / "config.json")
  assert list(tmp_path.glob("events.out.tfevents.*"))
  assert os.listdir(tmp_path / "checkpoints")


def test_resnet_imagenet_mock_data(tmp_path):
  config = _tiny(resnet_imagenet, "strategy=pairwise,stages=2", total_steps=2)
  with tfds.testing.mock_data(num_examples=32):
    final = trainer.train_and_evaluate(config, str(tmp_path))
  assert set(final) >= {"eval/head1/accuracy", "eval/head2/accuracy"}
  assert not any(key.startswith("val/") for key in final)  # No validation split configured.


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transformer_stdlib_every_strategy(tmp_path, strategy):
  config = _tiny(transformer_stdlib, f"strategy={strategy},stages=4", total_steps=2)
  final = trainer.train_and_evaluate(config, str(tmp_path))
  for k in (1, 2, 3, 4):
    ppl = final[f"eval/head{k}/perplexity"]
    assert 1.0 < ppl < 1000.0
    np.testing.assert_allclose(math.log(ppl), final[f"eval/head{k}/loss"], rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transformer_lm1b_every_strategy_mock_data(tmp_path, strategy):
  config = _tiny(transformer_lm1b, f"strategy={strategy},stages=4", total_steps=2)
  with tfds.testing.mock_data(num_examples=64):
    final = trainer.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 2
  for k in (1, 2, 3, 4):
    assert math.isfinite(final[f"eval/head{k}/perplexity"])
  assert "train/head4/loss" in _metrics(tmp_path)[0]


def _raise(error):
  raise error


def _crash_after(monkeypatch, num_batches):
  """Makes the next run's input stream die after `num_batches` batches, like a preemption."""
  monkeypatch.setattr(families, "build", build_with_batches(preempt_at(num_batches)))


@pytest.mark.parametrize("module", [resnet_digits, transformer_stdlib])
def test_resume_after_crash_equals_uninterrupted(tmp_path, monkeypatch, module):
  arg = "strategy=pairwise,stages=2"
  # Checkpoints at steps 2 and 4 (6 steps, checkpoint every 2); the crash comes at step 3.
  config = _tiny(module, arg, total_steps=6, checkpoint_every_steps=2, eval_every_steps=6)
  straight = tmp_path / "straight"
  final_a = trainer.train_and_evaluate(config, str(straight))

  resumed = tmp_path / "resumed"
  with monkeypatch.context() as m:
    _crash_after(m, 3)
    with pytest.raises(Preempted):
      trainer.train_and_evaluate(config, str(resumed))
  assert sorted(int(s) for s in os.listdir(resumed / "checkpoints") if s.isdigit()) == [2]
  final_b = trainer.train_and_evaluate(config, str(resumed))

  assert final_a == pytest.approx(final_b, rel=1e-6, abs=1e-7)
  a, b = checkpoint_params(straight, 6), checkpoint_params(resumed, 6)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  # The train metrics logged after the resume match the uninterrupted run's.
  last_a = [r for r in _metrics(straight) if r["step"] == 6 and "train/head2/loss" in r][-1]
  last_b = [r for r in _metrics(resumed) if r["step"] == 6 and "train/head2/loss" in r][-1]
  assert last_a["train/head2/loss"] == pytest.approx(last_b["train/head2/loss"], rel=1e-6)


def test_incompatible_resume_is_refused_unless_overridden(tmp_path):
  config = _tiny(resnet_digits, "strategy=pairwise,stages=2", total_steps=2)
  trainer.train_and_evaluate(config, str(tmp_path))
  before = (tmp_path / "metrics.jsonl").read_text()
  for arg in ("strategy=local,stages=2", "strategy=pairwise,stages=3"):
    other = _tiny(resnet_digits, arg, total_steps=2)
    with pytest.raises(ValueError, match="different configuration"):
      trainer.train_and_evaluate(other, str(tmp_path))
  assert (tmp_path / "metrics.jsonl").read_text() == before
  assert json.loads((tmp_path / "config.json").read_text())["strategy"] == "pairwise"
  # The user may override: same shapes, another strategy, train on to step 3.
  other = _tiny(resnet_digits, "strategy=local,stages=2", total_steps=3, allow_config_change=True)
  assert trainer.train_and_evaluate(other, str(tmp_path))["step"] == 3


def test_bucket_workdir_trains_resumes_and_equals_a_local_run(tmp_path, monkeypatch):
  # TensorFlow's in-memory filesystem (ram://) stands in for gs://: ilbp writes a URL workdir
  # through etils.epath and tf.io.gfile either way (conftest registers ram:// with epath). Two
  # libraries that take gs:// themselves do not know ram://: orbax (tensorstore) gets a local
  # checkpoint folder here, and clu's TensorBoard writer a logging-only writer.
  bucket = f"ram://bucket-{tmp_path.name}/run"
  real, real_writer = ckpt.Checkpointer, metric_writers.create_default_writer
  checkpoints, logdirs = [], []

  def local_checkpointer(directory, **kw):
    checkpoints.append(directory)
    return real(str(tmp_path / "checkpoints"), **kw)

  def logging_writer(logdir, **kw):
    logdirs.append(logdir)
    return metric_writers.LoggingWriter()

  monkeypatch.setattr(ckpt, "Checkpointer", local_checkpointer)
  monkeypatch.setattr(metric_writers, "create_default_writer", logging_writer)
  monkeypatch.chdir(tmp_path)  # A path taken for a local one would show up here as "ram:".
  every = {"checkpoint_every_steps": 2, "eval_every_steps": 2, "log_every_steps": 1}
  config = lambda arg="strategy=pairwise,stages=2": _tiny(
    resnet_digits, arg, total_steps=4, **every
  )
  # Killed while asking for step 4's batch, with no chance to close its writer (as under
  # SIGKILL): metrics.jsonl in the bucket holds the rows up to the step-2 checkpoint.
  real_build, real_close = families.build, rundir.MetricsFile.close
  monkeypatch.setattr(families, "build", build_with_batches(preempt_at(3)))
  monkeypatch.setattr(rundir.MetricsFile, "close", lambda self: None)
  with pytest.raises(Preempted):
    trainer.train_and_evaluate(config(), bucket)
  assert [r["step"] for r in results.read_metrics(bucket)] == [1, 2]
  monkeypatch.setattr(families, "build", real_build)
  monkeypatch.setattr(rundir.MetricsFile, "close", real_close)
  # The bucket's config.json is read back: another strategy is refused.
  with pytest.raises(ValueError, match="different configuration"):
    trainer.train_and_evaluate(config("strategy=local,stages=2"), bucket)
  resumed = trainer.train_and_evaluate(config(), bucket)  # Resumes from step 2.
  assert checkpoints == [f"{bucket}/checkpoints"] * 2 and logdirs == [bucket] * 2
  assert os.listdir(tmp_path) == ["checkpoints"]
  gfile = tf.io.gfile
  assert json.loads(gfile.GFile(f"{bucket}/config.json").read())["strategy"] == "pairwise"
  assert gfile.GFile(f"{bucket}/run.lock").read() == ""  # Released.
  rows = results.read_metrics(bucket)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all("eval/head2/accuracy" in rows[i] for i in (1, 3))
  # The same run, uninterrupted in a local workdir, ends with the same metrics.
  monkeypatch.setattr(ckpt, "Checkpointer", real)
  monkeypatch.setattr(metric_writers, "create_default_writer", real_writer)
  local = trainer.train_and_evaluate(config(), str(tmp_path / "local"))
  for key, value in local.items():
    np.testing.assert_allclose(resumed[key], value, rtol=1e-6, err_msg=key)
  learned = lambda rows: [
    {k: v for k, v in r.items() if k.split("/")[0] in ("train", "eval")} for r in rows
  ]
  assert learned(results.read_metrics(str(tmp_path / "local"))) == learned(rows)


def test_bucket_workdir_refusals(tmp_path, monkeypatch):
  gfile = tf.io.gfile
  # A live run on this host holds the bucket workdir's lock record: a second run stops.
  busy = f"ram://bucket-{tmp_path.name}/busy"
  gfile.makedirs(busy)
  holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": "earlier"}
  gfile.GFile(f"{busy}/run.lock", "w").write(json.dumps(holder))
  config = _tiny(resnet_digits, "strategy=local,stages=2", total_steps=1)
  with pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {os.getppid()}"):
    trainer.train_and_evaluate(config, busy)
  assert gfile.listdir(busy) == ["run.lock"]
  # The text pipeline caches its tokenizer with local file functions: a bucket workdir needs a
  # local or mounted cache_dir, said before anything is written.
  lm = f"ram://bucket-{tmp_path.name}/lm"
  text_config = _tiny(transformer_stdlib, "strategy=local,stages=2", total_steps=1)
  with pytest.raises(ValueError, match=re.escape("config.dataset.cache_dir=None")):
    trainer.train_and_evaluate(text_config, lm)
  assert not gfile.exists(lm)
  # reproduce.py keeps its runs, claims and logs on a local or mounted path: a URL --out is
  # refused before anything is written.
  monkeypatch.chdir(tmp_path)
  out = subprocess.run(
    [sys.executable, "-m", "scripts.reproduce", "--suite=quick", "--out=s3://bucket/quick"],
    env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    capture_output=True,
    text=True,
  )
  assert out.returncode != 0 and "--out='s3://bucket/quick' is a URL" in out.stderr, out.stderr
  assert not os.listdir(tmp_path)
  workdir_lock.require_local("/tmp/a:b/c", "--out")  # A colon is not a URL.


def test_nan_loss_stops_with_step_and_keeps_checkpoints(tmp_path, monkeypatch):
  config = _tiny(resnet_digits, "strategy=pairwise,stages=2", total_steps=6)
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  nan = lambda batch: {**batch, "image": np.full_like(batch["image"], np.nan)}
  monkeypatch.setattr(
    families, "build", build_with_batches(lambda i, step, batch: nan(batch) if step == 3 else batch)
  )
  with pytest.raises(trainer.NonFiniteLossError, match="at step 3"):
    trainer.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [2]
  assert [r["step"] for r in _metrics(tmp_path) if "train/head1/loss" in r] == [1, 2]


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"strategy": "twowise"}, "Unknown strategy"),
    ({"num_stages": 0}, "num_stages must be >= 1"),
    ({"model.name": "resnet21"}, "resnet20"),
    ({"model.split": "1,1"}, "split"),
    ({"model.split": "two,two"}, "balanced"),
    ({"optimizer.name": "lamb"}, "sgd, adamw"),
    ({"model.dtype": "float16"}, "float32, bfloat16"),
    ({"dataset.name": "mnist"}, "digits"),
    ({"family": "transformer", "model.d_model": 33}, "divisible"),
    ({"family": "transformer", "dataset.tokenizer": "words"}, "sentencepiece"),
    ({"family": "transformer", "model.positions": "sinusoidal"}, "rotary"),
    ({"family": "transformer", "num_stages": 5}, "num_stages"),
    ({"optimizer.warmup_steps": -1}, "warmup_steps must be >= 0"),
  ],
)
def test_bad_configs_fail_before_compute(tmp_path, monkeypatch, overrides, message):
  family = overrides.pop("family", "resnet")
  module = resnet_digits if family == "resnet" else transformer_stdlib
  config = _tiny(module, "strategy=pairwise,stages=3", **overrides)
  compiled = []
  monkeypatch.setattr(trainer.factory, "make", lambda *a: compiled.append(a))
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not compiled
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_config_arguments_are_validated():
  with pytest.raises(ValueError, match="Unknown config argument 'stage'"):
    resnet_cifar10.get_config("stage=4")
  with pytest.raises(ValueError, match="not a int"):
    resnet_cifar10.get_config("stages=four")
  config = resnet_cifar10.get_config("strategy=3wise,stages=5")
  assert (config.strategy, config.num_stages, config.model.name) == ("3wise", 5, "resnet34_cifar")
  for module in (resnet_cifar10, resnet_imagenet, resnet_digits, transformer_lm1b):
    c = module.get_config()
    for field in (
      "strategy",
      "num_stages",
      "seed",
      "batch_size",
      "total_steps",
      "eval_every_steps",
      "checkpoint_every_steps",
      "learning_rate",
    ):
      assert field in c, (module.__name__, field)


@pytest.mark.parametrize("arg", ["", "runlocal=1"])
def test_stdlib_config_has_no_dropout_at_either_size(arg):
  # runlocal rebuilds c.model; it once came back with the shared default dropout of 0.1.
  assert transformer_stdlib.get_config(arg).model.dropout_rate == 0.0


def test_binary_runs_from_the_command_line(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "experiments.resnet",
    "--config",
    "experiments/configs/resnet_digits.py:strategy=local,stages=2,runlocal=1",
    "--workdir",
    str(tmp_path),
    "--config.total_steps=2",
    "--config.seed=3",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "[eval] step 2: accuracy h1=" in out.stdout
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 3
  wrong = subprocess.run(
    [sys.executable, "-m", "experiments.transformer", *cmd[3:]], capture_output=True, text=True
  )
  assert wrong.returncode != 0 and "python -m experiments.resnet" in wrong.stderr
  # One line, naming the config file (not the config's contents).
  assert wrong.stderr.strip().splitlines() == [
    f"{cmd[4]} is a 'resnet' config; run it with `python -m experiments.resnet`."
  ], wrong.stderr


class _Built(Exception):
  pass


def test_warmup_longer_than_the_run_is_clamped_and_logged(tmp_path, monkeypatch, caplog):
  config = _tiny(resnet_digits, "strategy=pairwise,stages=2", total_steps=2)
  config.optimizer.warmup_steps = 500
  made = []
  real_make = state.make_optimizer

  def make_optimizer(**kwargs):
    made.append(real_make(**kwargs))
    return made[-1]

  monkeypatch.setattr(state, "make_optimizer", make_optimizer)
  # Stop once the optimizer exists: the rest of the run is what every other test covers.
  monkeypatch.setattr(families, "build", lambda *a, **k: _raise(_Built()))
  with caplog.at_level("WARNING"), pytest.raises(_Built):
    trainer.train_and_evaluate(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("warmup_steps=500" in w and "total_steps=2" in w for w in warnings), warnings
  # The run warms up over its 2 steps: rate 0, then half the peak, then the peak.
  _, schedule = made[0]
  rates = [float(schedule(step)) for step in (0, 1, 2)]
  assert rates == pytest.approx([0.0, config.learning_rate / 2, config.learning_rate])


def _snapshot(workdir):
  """Every file in a workdir but the lock, with its bytes and modification time."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name != workdir_lock.LOCK_FILE:
        with open(path, "rb") as f:
          out[path] = (f.read(), os.stat(path).st_mtime_ns)
  return out


def test_live_workdir_refuses_a_second_run_and_a_killed_runs_lock_does_not(tmp_path):
  config = _tiny(resnet_digits, "strategy=local,stages=2", total_steps=2)
  trainer.train_and_evaluate(config, str(tmp_path))
  before = _snapshot(tmp_path)
  assert any("checkpoints" in path for path in before) and str(tmp_path / "metrics.jsonl") in before

  # Another process holds the workdir, as a live run would.
  hold = "import sys\nfrom ilbp import workdir_lock as w\nwith w.hold(sys.argv[1]):\n"
  hold += "  print('held', flush=True)\n  sys.stdin.read()"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  holder = subprocess.Popen(
    [sys.executable, "-c", hold, str(tmp_path)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    env=dict(os.environ, PYTHONPATH=repo),
  )
  longer = _tiny(resnet_digits, "strategy=local,stages=2", total_steps=3)
  try:
    assert holder.stdout.readline() == "held\n"
    named = re.escape(f"pid {holder.pid} on host {socket.gethostname()}")
    with pytest.raises(workdir_lock.WorkdirInUseError, match=named):
      trainer.train_and_evaluate(longer, str(tmp_path))
    assert _snapshot(tmp_path) == before  # Nothing modified, nothing written.
  finally:
    holder.kill()  # Killed, not released: its lock file still names it.
    holder.wait()
  lock = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
  assert lock["pid"] == holder.pid

  # The dead holder's lock does not block: the run resumes from its step-2 checkpoint.
  assert trainer.train_and_evaluate(longer, str(tmp_path))["step"] == 3
  assert [r["step"] for r in _metrics(tmp_path) if "train/head1/loss" in r] == [2, 3]
  assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""  # Released on exit.


@pytest.mark.parametrize("module", [resnet_cifar10, resnet_cifar100])
def test_cifar_configs_carry_the_authors_recipe(module):
  c = module.get_config()
  # SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, no warm-up.
  assert (c.optimizer.name, c.learning_rate, c.optimizer.momentum) == ("sgd", 0.1, 0.9)
  assert (c.optimizer.nesterov, c.optimizer.weight_decay) == (False, 2e-4)
  assert (c.batch_size, c.optimizer.warmup_steps) == (128, 0)
  # 10% of the 50,000 training images held out; 200 epochs of the other 45,000 at batch 128,
  # the rate x0.1 at epochs 91, 136 and 182.
  assert c.dataset.validation_fraction == 0.1
  assert c.total_steps == math.ceil(200 * 45_000 / 128) == 70_313
  assert c.optimizer.schedule == "piecewise" and c.optimizer.decay_factor == 0.1
  assert c.optimizer.decay_steps == tuple(math.ceil(e * 45_000 / 128) for e in (91, 136, 182))
  lr = state.make_schedule(
    learning_rate=c.learning_rate,
    total_steps=c.total_steps,
    schedule=c.optimizer.schedule,
    warmup_steps=c.optimizer.warmup_steps,
    decay_steps=c.optimizer.decay_steps,
  )
  for step, rate in [(0, 0.1), (31_992, 0.1), (31_993, 0.01), (47_813, 1e-3), (63_985, 1e-4)]:
    assert float(lr(step)) == pytest.approx(rate)
  # Their wide ResNet with conv heads, one group of blocks per stage at K = 4.
  assert (c.model.name, c.model.head, c.num_stages, c.model.split) == (
    "resnet34_cifar",
    "conv",
    4,
    "groups",
  )
  model = resnet.make_model(
    c.model.name, num_classes=10, num_stages=4, split=families.parse_split(c.model.split)
  )
  assert model.info["blocks_per_stage"] == (3, 4, 6, 3) and model.info["split"] == "groups"
  with pytest.raises(ValueError, match="needs num_stages=4, got 3"):
    resnet.make_model(c.model.name, num_classes=10, num_stages=3, split="groups")
  assert module.get_config("stages=3").model.split == "balanced"  # Groups need K = 4.

  # The earlier recipe stays one argument away.
  cos = module.get_config("recipe=cosine")
  assert (cos.total_steps, cos.optimizer.schedule, cos.optimizer.warmup_steps) == (
    64_000,
    "cosine",
    500,
  )
  assert (cos.optimizer.weight_decay, cos.dataset.validation_fraction) == (5e-4, 0.0)
  assert cos.model.split == "balanced"
  with pytest.raises(ValueError, match="authors, cosine"):
    module.get_config("recipe=linear")
  assert common.epochs_to_steps(5, 45_000, 128) == c.eval_every_steps == 1758


def test_synthetic_build_has_the_real_builds_model_and_batch_shapes(tmp_path):
  # The benchmarks time `build_synthetic`'s model on random batches: it must be the model the
  # trainer builds, fed batches of the same shapes and dtypes.
  config = resnet_digits.get_config("stages=2,runlocal=1")
  real, fake = families.build(config, str(tmp_path)), families.build_synthetic(config)
  assert real.input_spec == fake.input_spec
  tx = trainer.make_optimizer(config)[0]

  def init(built):
    create = lambda: state.create_train_state(built.model, tx, jax.random.key(0), built.input_spec)
    return jax.eval_shape(create)

  assert jax.tree.structure(init(real)) == jax.tree.structure(init(fake))
  assert jax.tree.leaves(init(real)) == jax.tree.leaves(init(fake))
  shapes = lambda batch: {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert shapes(next(real.data.train_batches(0))) == shapes(next(fake.data.train_batches(0)))
  assert shapes(next(real.data.eval_batches())) == shapes(next(fake.data.eval_batches()))
  # Batches are a function of (seed, step).
  a, b = next(fake.data.train_batches(3)), list(itertools.islice(fake.data.train_batches(0), 4))[3]
  np.testing.assert_array_equal(a["image"], b["image"])


def test_benchmark_config_defaults_and_transformer_variant():
  from experiments.configs import benchmark

  # scripts.benchmark_pipeline with no flags: resnet20 at 32x32, batch 64, K = 2, M = 8.
  c = benchmark.get_config()
  built = families.build_synthetic(c)
  assert (c.model.name, c.model.head, c.batch_size, c.num_stages) == ("resnet20", "pool", 64, 2)
  assert (built.input_spec.shape, c.execution.microbatches) == ((1, 32, 32, 3), 8)
  t = benchmark.get_config("family=transformer,stages=4")
  built = families.build_synthetic(t)
  assert built.model.num_stages == 4 and built.input_spec.shape == (1, 64)
  assert next(built.data.train_batches(0))["inputs"].max() < 1024
  t.dataset.tokenizer = "bytes"  # Byte tokens: the vocabulary is the tokenizer's own.
  assert next(families.build_synthetic(t).data.train_batches(0))["inputs"].max() < 258
  with pytest.raises(ValueError, match="resnet, transformer"):
    benchmark.get_config("family=vit")
