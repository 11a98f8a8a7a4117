"""Tests for ilbp.models.resnet: architectures, parameter counts, splits, heads, dtypes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilbp.models import resnet

TINY_INPUT = (8, 8, 3)
# Threefry keys cost XLA CPU one slow compile per parameter shape (~0.5 s each here); the
# RngBitGenerator-based "rbg" keys compile ~4x faster, and these tests need shapes, not streams.
KEY = jax.random.key(0, impl="rbg")


def _param_count(model, input_shape):
  """Parameters (BN scale/bias included, running stats not) without running anything."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  params, _ = jax.eval_shape(model.init, jax.random.key(0), x)
  return sum(leaf.size for leaf in jax.tree.leaves(params))


def _compositions(n, k):
  """Every way to cut n items into k non-empty contiguous parts."""
  for cuts in itertools.combinations(range(1, n), k - 1):
    bounds = (0, *cuts, n)
    yield tuple(b - a for a, b in itertools.pairwise(bounds))


def _max_stage_cost(costs, sizes, end_costs=None):
  """The costliest stage; a stage but the last also pays end_costs at its last item."""
  bounds = list(np.cumsum((0, *sizes)))
  ends = [0.0 if end_costs is None or b == bounds[-1] else end_costs[b - 1] for b in bounds[1:]]
  return max(sum(costs[a:b]) + e for (a, b), e in zip(itertools.pairwise(bounds), ends))


def test_resnet50_parameter_count_matches_torchvision():
  # torchvision.models.resnet50(num_classes=1000): 25,557,032 parameters.
  model = resnet.make_model("resnet50", num_classes=1000, num_stages=1, split=(16,))
  assert model.num_stages == 1 and not model.heads
  assert _param_count(model, (224, 224, 3)) == 25_557_032


def test_resnet20_parameter_count_with_projection_shortcuts():
  # Derived by hand for option-B shortcuts (1×1 conv + BN where the shape changes), no conv bias:
  #   stem   3·3·3·16 + BN 2·16                                       =     464
  #   group1 3 × (2·3·3·16·16 + 2·2·16)                               =  14,016
  #   group2 (3·3·16·32 + 3·3·32·32 + 2·2·32 + 16·32 + 2·32)
  #          + 2 × (2·3·3·32·32 + 2·2·32)                             =  51,648
  #   group3 (3·3·32·64 + 3·3·64·64 + 2·2·64 + 32·64 + 2·64)
  #          + 2 × (2·3·3·64·64 + 2·2·64)                             = 205,696
  #   dense  64·10 + 10                                               =     650
  # Total 272,474 (He et al.'s option A zero-padding would give 269,722, i.e. 2,752 fewer).
  model = resnet.make_model("resnet20", num_classes=10, num_stages=1, split=(9,))
  assert _param_count(model, (32, 32, 3)) == 272_474


@pytest.mark.parametrize(
  "name, blocks", [("resnet20", 9), ("resnet56", 27), ("resnet110", 54), ("resnet34_cifar", 16),
                   ("resnet101", 33), ("resnet152", 50), ("resnet_tiny", 5)]
)  # fmt: skip
def test_block_counts(name, blocks):
  assert len(resnet.block_specs(resnet.ARCHS[name])) == blocks


def test_tiny_stage_and_head_shapes():
  model = resnet.make_model(
    "resnet_tiny", num_classes=7, num_stages=5, split=(1, 1, 1, 1, 1), input_shape=TINY_INPUT
  )
  x = jnp.ones((2, *TINY_INPUT))
  params, state = model.init(KEY, x)
  stage_fns, head_fns = model.stage_fns(state, train=False)
  # Stem keeps 8×8 and has 4 channels; groups of width 4/8/8/16 downsample after the first.
  expected = [(2, 8, 8, 4), (2, 8, 8, 4), (2, 4, 4, 8), (2, 2, 2, 8), (2, 7)]
  a = x
  for k, f in enumerate(stage_fns):
    a, _ = f(params[k]["stage"], a)
    assert a.shape == expected[k], k
    if k < len(head_fns):
      logits, _ = head_fns[k](params[k]["head"], a)
      assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert a.dtype == jnp.float32


def test_explicit_split_is_respected():
  model = resnet.make_model("resnet20", num_classes=10, num_stages=4, split=(1, 2, 3, 3))
  assert model.num_stages == 4 and len(model.heads) == 3
  assert model.info["blocks_per_stage"] == (1, 2, 3, 3)
  assert [len(s.blocks) for s in model.stages] == [1, 2, 3, 3]
  assert [b.index for s in model.stages for b in s.blocks] == list(range(9))
  assert model.stages[0].stem == "cifar" and all(s.stem is None for s in model.stages[1:])
  assert model.stages[-1].num_classes == 10
  assert all(s.num_classes is None for s in model.stages[:-1])
  assert model.info["block_flops"] is None and model.info["stage_flops"] is None
  assert "1+2+3+3 of 9 (explicit)" in resnet.describe_split(model)


@pytest.mark.parametrize("name, input_shape", [("resnet_tiny", TINY_INPUT), ("resnet20", None)])
def test_balanced_split_is_optimal(name, input_shape):
  input_shape = input_shape or (32, 32, 3)
  num_blocks = len(resnet.block_specs(resnet.ARCHS[name]))
  for k in range(1, min(num_blocks, 5) + 1):
    model = resnet.make_model(name, num_classes=10, num_stages=k, input_shape=input_shape)
    info = model.info
    sizes = info["blocks_per_stage"]
    assert len(sizes) == k == model.num_stages and sum(sizes) == num_blocks
    assert min(sizes) >= 1
    costs = list(info["block_flops"])
    assert len(costs) == num_blocks and all(c > 0 for c in costs)
    costs[0] += info["stem_flops"]
    costs[-1] += info["classifier_flops"]
    best = _max_stage_cost(costs, sizes)
    assert max(info["stage_flops"]) == best
    assert sum(info["stage_flops"]) == pytest.approx(sum(costs))
    for other in _compositions(num_blocks, k):
      assert best <= _max_stage_cost(costs, other), (sizes, other)
  assert "(balanced)" in resnet.describe_split(model)


@pytest.mark.parametrize("head", ["conv", "pool"])
def test_balanced_heads_split_is_optimal_with_the_heads_cost(head):
  n = 9  # resnet20
  for k in range(2, 5):
    model = resnet.make_model("resnet20", num_classes=10, num_stages=k, head=head,
                              split="balanced_heads")  # fmt: skip
    info = model.info
    sizes = info["blocks_per_stage"]
    costs = list(info["block_flops"])
    costs[0] += info["stem_flops"]
    costs[-1] += info["classifier_flops"]
    heads = resnet._head_costs("resnet20", (32, 32, 3), 10, head)
    assert len(heads) == n and all(h > 0 for h in heads)
    bounds = np.cumsum((0, *sizes))
    assert info["head_flops"] == (*(heads[b - 1] for b in bounds[1:-1]), 0.0)
    best = _max_stage_cost(costs, sizes, heads)
    assert max(f + h for f, h in zip(info["stage_flops"], info["head_flops"])) == best
    for other in _compositions(n, k):
      assert best <= _max_stage_cost(costs, other, heads), (sizes, other)
    plain = resnet.make_model("resnet20", num_classes=10, num_stages=k, head=head).info
    assert plain["head_flops"] is None
    if head == "conv" and k == 4:
      # The authors' conv head on a 32x32 output costs more than the blocks before it: the
      # FLOP-balanced cut (2+2+2+3) leaves stage 1 with 2.3x the heads-aware bottleneck.
      assert _max_stage_cost(costs, plain["blocks_per_stage"], heads) > 2 * best
  assert "(balanced_heads), stage+head MFLOPs" in resnet.describe_split(model)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(name="resnet19"), "valid names: resnet20"),
    (dict(head="mlp"), "valid heads: conv, pool"),
    (dict(split="even"), "Unknown split 'even'"),
    (dict(num_stages=0), "from 1 to 9"),
    (dict(num_stages=10), "from 1 to 9"),
    (dict(split=(3, 3, 2)), "covers 8 blocks, but resnet20 has 9"),
    (dict(split=(3, 6)), "has 2 stages, but num_stages is 3"),
    (dict(split=(0, 4, 5)), "at least one block"),
    (dict(num_classes=0), "num_classes"),
    (dict(input_shape=(32, 32)), "input_shape"),
  ],
)
def test_bad_arguments_raise_before_compute(monkeypatch, kwargs, match):
  def no_compute(*args, **kw):
    raise AssertionError("FLOPs were measured before the arguments were validated")

  monkeypatch.setattr(resnet, "_measured_costs", no_compute)
  args = dict(name="resnet20", num_classes=10, num_stages=3, split="balanced", head="conv")
  args.update(kwargs)
  name = args.pop("name")
  with pytest.raises(ValueError, match=match):
    resnet.make_model(name, **args)


def test_splitting_does_not_change_the_network():
  # Blocks keep their global names, so the stages' parameters merge into the one-stage model's.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *TINY_INPUT)), jnp.float32)
  split = resnet.make_model("resnet_tiny", num_classes=5, num_stages=3, split=(2, 2, 1))
  whole = resnet.make_model("resnet_tiny", num_classes=5, num_stages=1, split=(5,))
  params, state = split.init(KEY, x)
  merge = lambda trees: {k: v for t in trees for k, v in t.items()}
  whole_params = ({"stage": merge(p["stage"] for p in params), "head": {}},)
  whole_stats = merge(s["stage"]["batch_stats"] for s in state)
  whole_state = ({"stage": {"batch_stats": whole_stats}, "head": {}},)
  split_logits, _ = split.apply(params, state, x)
  whole_logits, _ = whole.apply(whole_params, whole_state, x)
  np.testing.assert_allclose(split_logits[-1], whole_logits[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["conv", "pool"])
def test_train_mode_updates_batch_stats(head):
  model = resnet.make_model(
    "resnet_tiny", num_classes=3, num_stages=2, split=(3, 2), head=head, input_shape=TINY_INPUT
  )
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, *TINY_INPUT)), jnp.float32)
  params, state = model.init(KEY, x)
  logits, new_state = model.apply(params, state, x, train=True)
  assert [out.shape for out in logits] == [(4, 3), (4, 3)]
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state, new_state)
  # Every running mean and variance moved; only the conv head has BatchNorm, so a pool head
  # carries no state at all.
  stage_stats = jax.tree.leaves([c["stage"] for c in changed])
  assert stage_stats and all(stage_stats)
  head_stats = jax.tree.leaves([c["head"] for c in changed])
  assert all(head_stats) and (len(head_stats) > 0) == (head == "conv")
  eval_logits, eval_state = model.apply(params, new_state, x, train=False)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new_state, eval_state))
  assert not np.allclose(eval_logits[-1], logits[-1])


def test_bfloat16_computes_in_bf16_with_float32_params_and_logits():
  model = resnet.make_model(
    "resnet_tiny", num_classes=4, num_stages=3, split=(2, 2, 1), dtype=jnp.bfloat16
  )
  x = jnp.ones((2, *TINY_INPUT))
  params, state = model.init(KEY, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state))
  stage_fns, _ = model.stage_fns(state, train=False)
  a, _ = stage_fns[0](params[0]["stage"], x)
  assert a.dtype == jnp.bfloat16  # activations cross stage boundaries in the compute dtype
  logits, _ = model.apply(params, state, x, train=True)
  assert len(logits) == 3 and all(out.dtype == jnp.float32 for out in logits)
  assert all(bool(jnp.all(jnp.isfinite(out))) for out in logits)
