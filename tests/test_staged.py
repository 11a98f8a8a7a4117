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
LOSS = lambda logits, batch: TASK.loss(logits, batch)[0]
STRATEGIES = ("local", "pairwise", "3wise", "global")


def _spec_grads(model, params, state, batch, strategy):
  """jax.grad of the stop_gradient spec, with batch statistics in training mode."""
  return model.spec_grads(params, state, batch["image"], batch, strategy=strategy, loss_fn=LOSS)


def test_init_layout_and_apply_shapes(image_batch):
  model = conv_bn_model(3)
  params, state = model.init(jax.random.PRNGKey(0), image_batch["image"])
  assert len(params["stages"]) == 3 and len(params["heads"]) == 2
  assert set(state["stages"][0]) == {"batch_stats"}
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
  grads, _, metrics = model.grads(
    params, state, image_batch["image"], image_batch, strategy=strategy, loss_fn=LOSS
  )
  spec = _spec_grads(model, params, state, image_batch, strategy)
  for u, v in zip(jax.tree.leaves(grads), jax.tree.leaves(spec)):
    np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5)
  assert set(metrics) == {f"head{k}/loss" for k in range(1, 5)}


@pytest.mark.parametrize("name", STRATEGIES)
def test_batch_stats_updated_once_per_step(image_batch, name):
  model = conv_bn_model(4)
  params, state = model.init(jax.random.PRNGKey(0), image_batch["image"])
  _, new_state, _ = model.grads(
    params, state, image_batch["image"], image_batch, strategy=ilbp.strategy(name), loss_fn=LOSS
  )
  # One training-mode forward pass moves each running mean once: m' = 0.9 m + 0.1 batch_mean.
  _, once = model.apply(params, state, image_batch["image"], train=True)
  _, twice = model.apply(params, once, image_batch["image"], train=True)
  for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(once)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice))]
  assert any(moved)  # the check above can tell one update from two
  # Stage 1's running mean, by hand: its BatchNorm reads the conv of the raw image batch.
  conv = nn.Conv(8, (3, 3)).apply({"params": params["stages"][0]["Conv_0"]}, image_batch["image"])
  old_mean = state["stages"][0]["batch_stats"]["BatchNorm_0"]["mean"]
  np.testing.assert_allclose(
    new_state["stages"][0]["batch_stats"]["BatchNorm_0"]["mean"],
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

  def backprop(params, state, batch):
    return model.backprop_grads(params, state, batch["image"], batch, loss_fn=LOSS)

  base = compiled_cost(backprop, params, state, batch)["flops"]
  ratio = {}
  for name in STRATEGIES:
    fn = lambda p, s, b, name=name: model.grads(
      p, s, b["image"], b, strategy=ilbp.strategy(name), loss_fn=LOSS
    )
    ratio[name] = compiled_cost(fn, params, state, batch)["flops"] / base
  assert ratio["global"] <= 1.05, ratio
  assert ratio["local"] <= 0.92, ratio
  assert ratio["pairwise"] <= 1.15, ratio
  # The spec (stop_gradient composition) is what the engine must beat: it recomputes views.
  spec = compiled_cost(
    lambda p, s, b: _spec_grads(model, p, s, b, ilbp.strategy("pairwise")), params, state, batch
  )["flops"]
  assert spec / base > ratio["pairwise"], (spec / base, ratio)
