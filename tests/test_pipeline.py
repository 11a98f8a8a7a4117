"""The dataflow executor: exactly the fused executor's training, with stages on their own devices.

Multi-device cases run in a subprocess with forced CPU devices (JAX_NUM_CPU_DEVICES before jax is
imported). The fused executor with the same microbatches is the reference: after 3 optimizer
steps, parameters, BatchNorm statistics and optimizer states agree to 1e-5 relative.
"""

import textwrap

import jax
import pytest
from conftest import conv_bn_model, image_problem, run_with_devices

import ilbp
from experiments.configs import resnet_digits, transformer_stdlib
from ilbp import state, trainer
from ilbp.execution import dataflow, schedule
from ilbp.execution.base import ExecutionConfig
from ilbp.tasks import Classification

COMMON = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from conftest import (assert_evaluated_alike, assert_trained_alike, conv_bn_model,
                      image_problem)
  import ilbp
  from ilbp import interlock, state
  from ilbp.models import resnet, transformer
  from ilbp.execution import dataflow
  from ilbp.execution.fused import FusedExecutor
  from ilbp.tasks import Classification, LanguageModeling

  # SGD: a conv bias before BatchNorm, or an attention key bias, has an exactly-zero gradient,
  # whose float noise Adam would normalise into full-size steps. One optimizer object for
  # every case, so the executors share their compiled update programs.
  tx, sched = state.make_optimizer(name="sgd", learning_rate=0.05, total_steps=10,
                                   weight_decay=1e-4)

  def check(model, task, batch, spec, name, combine="furthest", M=4, continuous=True, D=1,
            pipeline="1f1b", costs=None, residuals="matmuls"):
    strat = ilbp.strategy(name, combine)
    args = (model, task, strat, tx, sched, spec)
    # The reference keeps every residual jax.vjp keeps; the pipeline (by default) only the
    # matmul and conv outputs, recomputing the rest in its B ops: the same training.
    fused = FusedExecutor(*args, microbatches=M, devices=jax.devices()[:1], residuals="all")
    flow = dataflow.DataflowExecutor(*args, microbatches=M, continuous=continuous,
                                     data_parallel=D, pipeline=pipeline, residuals=residuals)
    if costs is not None:  # The schedule measured costs predict fastest (zb: their split).
      flow.use_costs(costs)
    rng = jax.random.PRNGKey(1)
    a, b = fused.init_state(rng), flow.init_state(rng)
    # Stage k's whole state lives on stage k's D devices and nowhere else.
    for k, stage in enumerate(b.stages):
      want = set(flow.meshes[k].devices.flat)
      assert len(want) == D
      for leaf in jax.tree.leaves(stage):
        assert leaf.sharding.device_set == want, (k, leaf.sharding)
    for _ in range(3):
      a, ma = fused.train_step(a, fused.put_batch(batch))
      b, mb = flow.train_step(b, flow.put_batch(batch))
    a, b, ma, mb = jax.device_get((a, b, ma, mb))
    assert int(b.step) == 3
    assert_trained_alike(a, b, ma, mb)
    assert_evaluated_alike(*jax.device_get((fused.eval_step(a, batch), flow.eval_step(b, batch))))
    # The first microbatch whose merged VJP calls zb splits (M: none).
    split = min(flow.schedule.split, default=M)
    print("EXACT", model.num_stages, name, combine, M, continuous, D, pipeline, split, residuals,
          flush=True)
    return flow

  images, image_spec, rng = image_problem()
  """
)

CONV_BN_EVERY_PLAN = textwrap.dedent(
  """
  from ilbp.execution import schedule
  seen, turn = set(), 0
  for K in (2, 3, 4):
    model = conv_bn_model(K)
    for name in ("local", "pairwise", "3wise", "global"):
      for combine in ("furthest", "sum"):
        strat = ilbp.strategy(name, combine)
        plan = interlock.backward_plan(strat, K)
        if (K, str(plan)) in seen:  # e.g. K = 2: pairwise and 3wise are global.
          continue
        seen.add((K, str(plan)))
        # Each plan under one pipeline schedule, in turn among those that apply to it (the
        # programs are the same; only the order and zb's split VJP calls differ).
        usable = [p for p in ("gpipe", "zb", "1f1b") if schedule.applies(p, strat, K)]
        pipeline = usable[turn % len(usable)]
        turn += len(usable) > 1
        # K = 2 keeps every residual (as jax.vjp does); K = 3, 4 the matmul outputs only.
        residuals = "all" if K == 2 else "matmuls"
        check(model, Classification(), images, image_spec, name, combine, pipeline=pipeline,
              residuals=residuals)
  print("PLANS", len(seen))
  """
)

VARIANTS = textwrap.dedent(
  """
  # Flushed steps; several devices per stage; M = 1 and M = 2.
  check(conv_bn_model(3), Classification(), images, image_spec, "pairwise", continuous=False)
  check(conv_bn_model(4), Classification(), images, image_spec, "local", continuous=False, M=2)
  check(conv_bn_model(4), Classification(), images, image_spec, "3wise", "sum", D=2)
  check(conv_bn_model(2), Classification(), images, image_spec, "local", M=1, D=2)
  # The real ResNet family with the authors' conv heads (BatchNorm in the heads too).
  net = resnet.make_model("resnet_tiny", num_classes=10, num_stages=3, split=(2, 2, 1),
                          head="conv", input_shape=(8, 8, 3))
  check(net, Classification(), images, image_spec, "pairwise", "sum")
  # The Transformer with dropout: every executor draws the same per-microbatch keys.
  lm = transformer.make_model(vocab_size=37, num_layers=4, num_stages=4, d_model=16,
                              num_heads=2, d_ff=32, max_len=12, dropout_rate=0.1)
  tokens = rng.integers(0, 37, size=(8, 13)).astype(np.int32)
  text = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": (rng.random((8, 12)) > 0.1).astype(np.float32)}
  text_spec = jax.ShapeDtypeStruct((1, 12), jnp.int32)
  for name, combine in (("pairwise", "furthest"), ("3wise", "sum")):
    check(lm, LanguageModeling(), text, text_spec, name, combine, M=4)
  """
)


def test_dataflow_equals_fused_for_every_backward_plan_k2_to_4():
  out = run_with_devices(COMMON + CONV_BN_EVERY_PLAN, 4)
  # K=2: local, global×2; K=3: local, pairwise×2, global×2; K=4: local, 3 reaches × 2.
  assert "PLANS 15" in out, out
  assert out.count("EXACT") == 15
  runs = [line.split() for line in out.splitlines() if line.startswith("EXACT")]
  pipelines = [r[7] for r in runs]
  assert pipelines.count("zb") == 4 and pipelines.count("gpipe") == 4, out
  # zb splits some microbatches' merged VJP calls into two (exactness of the split calls).
  assert sum(r[7] == "zb" and int(r[8]) < 4 for r in runs) == 3, out


def test_dataflow_equals_fused_flushed_data_parallel_resnet_transformer():
  out = run_with_devices(COMMON + VARIANTS, 8)
  assert out.count("EXACT") == 7, out


ZB_MEASURED = textwrap.dedent(
  """
  from ilbp.execution import schedule
  K, M = 3, 4

  def costs(both, weight):
    # Seconds per op (a merged VJP call `both`; None: the two halves' sum), a 10 us link.
    stages = tuple(
      schedule.StageCost(1e-3, 0.0 if k == K - 1 else 1.4e-5, 1.38e-3, weight, 4.7e-4, both)
      for k in range(K)
    )
    return schedule.MeasuredCosts(stages, schedule.Link(1e-5, 1e9), (4096,) * (K - 1),
                                  (10_000,) * K)

  default = schedule.build("global", K, M, schedule="zb").split
  for both, weight in ((3e-3, 2.19e-3), (None, 1e-3)):
    c = costs(both, weight)
    flow = check(conv_bn_model(K), Classification(), images, image_spec, "global", M=M,
                 pipeline="zb", costs=c)
    # The split `build` picks for these costs (what predict_step simulates), not the default.
    transfer = [c.link.seconds(b) - c.link.latency for b in c.boundary_bytes]
    want = schedule.build("global", K, M, costs=c.stages, comm=c.link.latency,
                          transfer=transfer, schedule="zb")
    assert flow.schedule.split == want.split != default, (flow.schedule.split, default)
    assert flow.order == want.dispatch_order()
    assert schedule.predict_step(c, "global", M, "zb")["schedule"].split == want.split
    print("SPLIT", list(want.split), "measured costs" in flow.description, flush=True)
  """
)


def test_dataflow_zb_with_the_split_of_measured_costs_equals_fused():
  out = run_with_devices(COMMON + ZB_MEASURED, 3)
  # A partial split (the last two microbatches) and a split of all; the default splits one.
  assert out.count("EXACT") == 2, out
  assert "SPLIT [2, 2, 2] True" in out and "SPLIT [0, 0, 0] True" in out, out


def test_use_costs_rebuilds_zb_only():
  _, spec, _ = image_problem()
  tx, sched = state.make_optimizer(name="sgd", learning_rate=0.05, total_steps=10)
  # A cheap weight-only half (0.5 f; merged 2.3 f): splitting every microbatch pays.
  cost = schedule.StageCost(1e-3, 1e-5, 1.4e-3, 5e-4, 5e-4, 2.3e-3)
  costs = schedule.MeasuredCosts((cost,) * 2, schedule.Link(1e-5), (4096,), (1, 1))
  for pipeline in ("gpipe", "1f1b", "zb"):
    ex = dataflow.DataflowExecutor(
      conv_bn_model(2), Classification(), ilbp.strategy("global"), tx, sched, spec,
      microbatches=4, pipeline=pipeline, devices=[jax.devices()[0]] * 2,
    )  # fmt: skip
    before = (ex.schedule, ex.order, ex.description)
    changed = ex.use_costs(costs)
    if pipeline != "zb":  # No split to choose: the schedule stays as it was.
      assert not changed and (ex.schedule, ex.order, ex.description) == before
      continue
    assert changed and before[0].split == (3, 3) and ex.schedule.split == (0, 0)
    assert ex.schedule == schedule.predict_step(costs, "global", 4, "zb")["schedule"]
    assert "split from microbatch [0, 0] (measured costs)" in ex.description
    with pytest.raises(ValueError, match="costs are for 2 stages, this executor has 3"):
      dataflow.DataflowExecutor(
        conv_bn_model(3), Classification(), ilbp.strategy("global"), tx, sched, spec,
        microbatches=4, pipeline="zb", devices=[jax.devices()[0]] * 3,
      ).use_costs(costs)  # fmt: skip


RESUME = textwrap.dedent(
  """
  import os, shutil, jax, numpy as np
  from experiments.configs import resnet_digits
  from conftest import Preempted, checkpoint_params, crash_after
  from ilbp import families, trainer

  def config(kind, **kw):
    c = resnet_digits.get_config("strategy=pairwise,stages=2,runlocal=1")
    c.total_steps, c.checkpoint_every_steps, c.eval_every_steps = 6, 2, 6
    c.execution.kind, c.execution.microbatches = kind, 2
    for k, v in kw.items():
      setattr(c, k, v)
    return c


  root = os.environ["TMP_ROOT"]
  final = trainer.train_and_evaluate(config("dataflow"), f"{root}/straight")
  for resume_kind in ("dataflow", "fused"):
    work = f"{root}/{resume_kind}"
    real = crash_after(3)
    try:
      trainer.train_and_evaluate(config("dataflow"), work)
      raise AssertionError("no crash")
    except Preempted:
      pass
    families.build = real
    assert sorted(os.listdir(f"{work}/checkpoints")) == ["2"], os.listdir(f"{work}/checkpoints")
    again = trainer.train_and_evaluate(config(resume_kind), work)
    for key, value in final.items():
      np.testing.assert_allclose(again[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    for x, y in zip(jax.tree.leaves(checkpoint_params(f"{root}/straight")),
                    jax.tree.leaves(checkpoint_params(work))):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    print("RESUMED", resume_kind, flush=True)
  """
)


def test_dataflow_resume_equals_uninterrupted_and_resumes_under_fused(tmp_path):
  out = run_with_devices(f"import os\nos.environ['TMP_ROOT'] = {str(tmp_path)!r}\n" + RESUME, 2)
  assert "RESUMED dataflow" in out and "RESUMED fused" in out, out


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"execution.kind": "pipelined"}, "fused, dataflow, spmd"),
    ({"execution.kind": "spmd"}, "JAX_NUM_CPU_DEVICES=3"),
    ({"execution.steps_per_call": 2}, "only config.execution.kind='spmd'"),
    ({"execution.kind": "spmd", "execution.steps_per_call": 0}, "steps_per_call must be"),
    ({"execution.microbatches": 3}, "microbatches"),
    ({"execution.microbatches": 0}, "microbatches must be >= 1"),
    ({"execution.kind": "dataflow"}, "JAX_NUM_CPU_DEVICES=3"),
    ({"execution.gradients": "autodiff"}, "engine, spec"),
    ({"execution.schedule": "zero_bubble"}, "valid: gpipe, 1f1b, zb"),
    ({"execution.residuals": "some"}, "residuals='some'; valid: all, matmuls"),
    ({"execution.kind": "dataflow", "execution.remat": True}, "remat=True is for kind='spmd'"),
    ({"execution.kind": "dataflow", "execution.gradients": "spec"}, "only with"),
    ({"execution.data_parallel": 5}, "devices are visible"),
  ],
)
def test_bad_execution_configs_name_the_field(overrides, message, monkeypatch, tmp_path):
  config = resnet_digits.get_config("strategy=pairwise,stages=3,runlocal=1")
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  monkeypatch.setattr(trainer.factory, "make", lambda *a: pytest.fail("compiled"))
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_fused_with_microbatches_trains_stdlib_transformer(tmp_path):
  config = transformer_stdlib.get_config("strategy=pairwise,stages=4,runlocal=1")
  config.execution.microbatches = 2
  final = trainer.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == config.total_steps
  assert ExecutionConfig.from_config(config, 1).data_parallel == 1


BINARIES = textwrap.dedent(
  """
  import os, subprocess, sys
  root = os.environ["TMP_ROOT"]
  for binary, cfg in (("resnet", "resnet_digits.py:strategy=3wise,stages=3,runlocal=1"),
                      ("transformer", "transformer_stdlib.py:strategy=local,stages=4,runlocal=1")):
    cmd = [sys.executable, "-m", f"experiments.{binary}", "--config",
           f"experiments/configs/{cfg}", "--workdir", f"{root}/{binary}",
           "--config.execution.kind=dataflow", "--config.execution.microbatches=2",
           "--config.execution.residuals=matmuls"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "execution: dataflow" in out.stdout and "[eval] step" in out.stdout, out.stdout
    print("BINARY", binary, flush=True)
  """
)


def test_both_binaries_run_the_dataflow_executor(tmp_path):
  out = run_with_devices(f"import os\nos.environ['TMP_ROOT'] = {str(tmp_path)!r}\n" + BINARIES, 4)
  assert "BINARY resnet" in out and "BINARY transformer" in out, out
