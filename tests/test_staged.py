"""StagedModel: Flax stages and heads as pure functions, BatchNorm statistics and cost."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import conv_bn_model

import ilbp
from ilbp.profiling import compiled_cost
from ilbp.staged import StagedModel
from ilbp.tasks import Classification

TASK = Classification()
STRATEGIES = ("local", "pairwise", "3wise", "global")


def _grads(model, params, state, batch, strategy=None, method="engine"):
  return model.gradients(
    params, state, batch["image"], batch, loss_fn=TASK.loss, strategy=strategy, method=method
  )


def test_init_layout_and_apply_shapes(image_batch):
  model = conv_bn_model(3)
  params, state = model.init(jax.random.PRNGKey(0), image_batch["image"])
  assert len(params) == 3 and [bool(p["head"]) for p in params] == [True, True, False]
  assert set(state[0]["stage"]) == {"batch_stats"}
  logits, _ = model.apply(params, state, image_batch["image"])
  assert [tuple(x.shape) for x in logits] == [(16, 10)] * 3


def test_head_count_must_match():
  stages = conv_bn_model(3).stages
  with pytest.raises(ValueError, match="3 stages needs 2 heads"):
    StagedModel(stages, [])


@pytest.mark.parametrize("name", STRATEGIES)
def test_flax_grads_equal_spec(image_batch, name):
  model = conv_bn_model(4)
  params, state = model.init(jax.random.PRNGKey(0), image_batch["image"])
  strategy = ilbp.strategy(name)
  grads, new_state, metrics = _grads(model, params, state, image_batch, strategy)
  spec, spec_state, spec_metrics = _grads(model, params, state, image_batch, strategy, "spec")
  for u, v in zip(jax.tree.leaves((grads, new_state)), jax.tree.leaves((spec, spec_state))):
    np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5)
  names = {f"head{k}/{m}" for k in range(1, 5) for m in ("loss", "accuracy")}
  assert set(metrics) == set(spec_metrics) == names
  for name in names:
    np.testing.assert_allclose(metrics[name], spec_metrics[name], rtol=1e-5)


@pytest.mark.parametrize("name", STRATEGIES)
def test_batch_stats_updated_once_per_step(image_batch, name):
  model = conv_bn_model(4)
  params, state = model.init(jax.random.PRNGKey(0), image_batch["image"])
  _, new_state, _ = _grads(model, params, state, image_batch, ilbp.strategy(name))
  # One training-mode forward pass moves each running mean once: m' = 0.9 m + 0.1 batch_mean.
  _, once = model.apply(params, state, image_batch["image"], train=True)
  _, twice = model.apply(params, once, image_batch["image"], train=True)
  for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(once)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice))]
  assert any(moved)  # the check above can tell one update from two
  # Stage 1's running mean, by hand: its BatchNorm reads the conv of the raw image batch.
  conv = nn.Conv(8, (3, 3)).apply({"params": params[0]["stage"]["Conv_0"]}, image_batch["image"])
  old_mean = state[0]["stage"]["batch_stats"]["BatchNorm_0"]["mean"]
  np.testing.assert_allclose(
    new_state[0]["stage"]["batch_stats"]["BatchNorm_0"]["mean"],
    0.9 * old_mean + 0.1 * conv.mean(axis=(0, 1, 2)),
    rtol=1e-5,
    atol=1e-6,
  )


def test_cost_relative_to_backprop():
  """FLOPs from XLA's cost analysis, 4-stage conv + BatchNorm, batch 16 (issue #2 §4)."""
  model = conv_bn_model(4, width=16)
  images = jnp.zeros((16, 32, 32, 3))
  batch = {"image": images, "label": jnp.zeros((16,), jnp.int32)}
  params, state = model.init(jax.random.PRNGKey(0), images)

  backprop = lambda p, s, b: _grads(model, p, s, b, method="backprop")
  base = compiled_cost(backprop, params, state, batch)["flops"]
  ratio = {}
  for name in STRATEGIES:
    fn = lambda p, s, b, name=name: _grads(model, p, s, b, ilbp.strategy(name))
    ratio[name] = compiled_cost(fn, params, state, batch)["flops"] / base
  assert ratio["global"] <= 1.05, ratio
  assert ratio["local"] <= 0.92, ratio
  assert ratio["pairwise"] <= 1.15, ratio
  # The spec (stop_gradient composition) is what the engine must beat: it recomputes views.
  spec = compiled_cost(
    lambda p, s, b: _grads(model, p, s, b, ilbp.strategy("pairwise"), "spec"), params, state, batch
  )["flops"]
  assert spec / base > ratio["pairwise"], (spec / base, ratio)
