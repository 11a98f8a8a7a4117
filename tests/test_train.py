"""Train state, optimizers, the fused train / eval steps, microbatches, data-parallel sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import conv_bn_model, devices_env

import ilbp
from ilbp import state
from ilbp.execution import fused as steps
from ilbp.tasks import Classification, LanguageModeling

TASK = Classification()


def _setup(image_batch, name="sgd", **kw):
  model = conv_bn_model(3)
  tx, schedule = state.make_optimizer(name=name, learning_rate=0.05, total_steps=10, **kw)
  st = state.create_train_state(model, tx, jax.random.PRNGKey(0), image_batch["image"])
  return model, tx, schedule, st


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_train_step_learns_and_reports_every_head(image_batch, name):
  model, tx, schedule, st = _setup(image_batch, name, weight_decay=1e-4)
  step = jax.jit(
    steps.make_train_step(model, TASK, ilbp.strategy("pairwise"), tx, schedule), donate_argnums=0
  )
  losses = []
  for _ in range(8):
    st, metrics = step(st, image_batch)
    losses.append(float(metrics["head3/loss"]))
  assert int(st.step) == 8
  assert losses[-1] < losses[0]
  for k in (1, 2, 3):
    assert {f"head{k}/loss", f"head{k}/accuracy"} <= set(metrics)
  assert {"grad_norm/stage1", "grad_norm/head2", "param_norm/stage3", "learning_rate"} <= set(
    metrics
  )


def test_eval_step_sums_every_head_and_masks_padding(image_batch):
  model, _, _, st = _setup(image_batch)
  eval_step = jax.jit(steps.make_eval_step(model, TASK))
  mask = jnp.concatenate([jnp.ones(10), jnp.zeros(6)])
  sums = eval_step(st, {**image_batch, "mask": mask})
  assert float(sums["count"]) == 10.0
  full = eval_step(st, {**image_batch, "mask": jnp.ones(16)})
  # Padding examples contribute nothing: the masked sum equals the sum over the first 10.
  logits, _ = model.apply(st.params, st.model_state, image_batch["image"])
  for k, head_logits in enumerate(logits):
    correct = np.sum(np.argmax(head_logits[:10], -1) == np.asarray(image_batch["label"][:10]))
    assert float(sums[f"head{k + 1}/accuracy"]) == correct
    assert float(full[f"head{k + 1}/loss"]) > float(sums[f"head{k + 1}/loss"])
  assert set(TASK.finalize({"loss": 5.0, "accuracy": 3.0, "count": 10.0})) == {"loss", "accuracy"}


def test_language_modeling_task_weights_tokens():
  task = LanguageModeling()
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
  batch = {
    "inputs": jnp.zeros((2, 3), jnp.int32),
    "targets": jnp.array([[1, 2, 3], [4, 0, 0]]),
    "weights": jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
  }
  sums = task.eval_sums(logits, batch)
  assert float(sums["count"]) == 4.0
  loss, _ = task.loss(logits, batch)
  np.testing.assert_allclose(float(loss), float(sums["loss"]) / 4, rtol=1e-6)
  out = task.finalize(sums)
  np.testing.assert_allclose(out["perplexity"], np.exp(out["loss"]), rtol=1e-6)


def test_weight_decay_skips_biases_and_norm_scales():
  params = {"stage": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "head": {}}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx, _ = state.make_optimizer(
    name="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.5, schedule="constant"
  )
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["stage"]["kernel"], -0.5)
  np.testing.assert_allclose(updates["stage"]["bias"], 0.0)


def test_grad_clip_is_per_stage_and_per_head():
  grads = {"stage": {"w": jnp.full(4, 10.0)}, "head": {"w": jnp.full(4, 0.1)}}
  tx, _ = state.make_optimizer(
    name="sgd", learning_rate=1.0, momentum=0.0, schedule="constant", grad_clip_norm=1.0
  )
  updates, _ = tx.update(grads, tx.init(grads), grads)
  np.testing.assert_allclose(optax.global_norm(updates["stage"]), 1.0, rtol=1e-6)
  # The small head is not scaled down by its stage's norm (nor by any other stage's: every
  # stage has its own optimizer state and update).
  np.testing.assert_allclose(updates["head"]["w"], -0.1, rtol=1e-6)


def test_per_module_clip_equals_clip_by_global_norm_of_each_subtree():
  rng = np.random.default_rng(0)
  grads = {
    "stage": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)) * 3, "bias": rng.normal(size=4)}},
    "head": {"dense": {"kernel": rng.normal(size=(4, 5)) * 0.01}},
  }
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  clip = state._clip_per_module(1.0)
  got, _ = clip.update(grads, clip.init(grads))
  alone = optax.clip_by_global_norm(1.0)
  for key in ("stage", "head"):
    want, _ = alone.update(grads[key], alone.init(grads[key]))
    for g, w in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(g, w)
  # The last stage has no head: an empty subtree is left alone.
  last = {"stage": grads["stage"], "head": {}}
  got, _ = clip.update(last, clip.init(last))
  assert got["head"] == {}


def test_schedules_and_bad_optimizer_names():
  sched = state.make_schedule(learning_rate=1.0, total_steps=100, schedule="step", warmup_steps=10)
  assert float(sched(5)) == pytest.approx(0.5)
  assert float(sched(40)) == pytest.approx(1.0)
  assert float(sched(60)) == pytest.approx(0.1)
  assert float(sched(80)) == pytest.approx(0.01)
  # "piecewise": x0.1 at absolute steps, counted from the start of the run (warm-up included).
  pw = state.make_schedule(
    learning_rate=1.0, total_steps=100, schedule="piecewise", warmup_steps=10, decay_steps=(30, 60)
  )
  for step, rate in [(5, 0.5), (29, 1.0), (30, 0.1), (59, 0.1), (60, 0.01), (100, 0.01)]:
    assert float(pw(step)) == pytest.approx(rate)
  for boundaries in ((60, 30), (10, 30), ()):
    with pytest.raises(ValueError, match="increasing and after the warm-up"):
      state.make_schedule(
        learning_rate=1.0,
        total_steps=100,
        schedule="piecewise",
        warmup_steps=10,
        decay_steps=boundaries,
      )
  cos = state.make_schedule(learning_rate=1.0, total_steps=10, schedule="cosine")
  assert float(cos(10)) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="sgd, adamw"):
    state.make_optimizer(name="lamb")
  with pytest.raises(ValueError, match="constant, cosine"):
    state.make_schedule(learning_rate=1.0, total_steps=10, schedule="poly")


def test_batch_size_must_split_over_data_devices_and_microbatches():
  from experiments.configs import resnet_digits
  from ilbp.execution import base as executor

  config = resnet_digits.get_config("runlocal=1")
  config.batch_size, config.execution.microbatches = 24, 2
  executor.validate(config, num_devices=4)  # 24 = 2 microbatches x 4 devices x 3
  config.batch_size = 20
  with pytest.raises(ValueError, match="batch_size=20 does not split into 2 microbatches x 4"):
    executor.validate(config, num_devices=4)


SHARDED = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from conftest import conv_bn_model
  import ilbp
  from ilbp import placement, state
  from ilbp.execution import fused as steps
  from ilbp.tasks import Classification
  assert jax.device_count() == 4, jax.devices()
  model = conv_bn_model(3)
  rng = jax.random.PRNGKey(0)
  batch = {"image": np.asarray(jax.random.normal(rng, (16, 8, 8, 3))),
           "label": np.asarray(jax.random.randint(rng, (16,), 0, 10))}
  tx, sched = state.make_optimizer(name="sgd", learning_rate=0.1, total_steps=4)
  st = state.create_train_state(model, tx, rng, batch["image"])
  step_fn = steps.make_train_step(model, Classification(), ilbp.strategy("pairwise"), tx, sched)
  plain = jax.jit(step_fn)
  mesh = placement.data_mesh()
  sharded = placement.jit_train_step(step_fn, mesh)
  s1, s2 = st, placement.replicate(st, mesh)
  for _ in range(3):
    s1, m1 = plain(s1, batch)
    s2, m2 = sharded(s2, placement.shard_batch(batch, mesh))
  assert len(s2.params[0]["stage"]["Conv_0"]["kernel"].sharding.device_set) == 4
  for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Microbatches split over the data axis too: each device computes a quarter, not everything.
  from ilbp.execution import fused as executor
  spec = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  args = (model, Classification(), ilbp.strategy("pairwise"), tx, sched, spec)
  flops, states = {}, {}
  for n in (1, 4):
    ex = executor.FusedExecutor(*args, microbatches=2, devices=jax.devices()[:n])
    st, b = ex.init_state(rng), ex.put_batch(batch)
    flops[n] = ex._train.lower(st, b).compile().cost_analysis()["flops"]
    for _ in range(2):
      st, _ = ex.train_step(st, b)
    states[n] = st
  assert flops[4] < 0.3 * flops[1], flops
  for a, b in zip(jax.tree.leaves(states[1]), jax.tree.leaves(states[4])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  print("SHARDED_OK")
  """
)


def test_sharded_step_equals_unsharded_on_4_devices():
  env = devices_env(4)
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), os.getcwd()])
  out = subprocess.run(
    [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
  )
  assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
