"""Tests for the staged Transformer language model (ilbp.models.transformer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilbp.models import transformer
from ilbp.models.transformer import make_model

VOCAB, D, HEADS, D_FF, MAX_LEN = 13, 16, 2, 32, 8


def _model(**overrides):
  kwargs = dict(
    vocab_size=VOCAB,
    num_layers=3,
    num_stages=3,
    d_model=D,
    num_heads=HEADS,
    d_ff=D_FF,
    max_len=MAX_LEN,
    dropout_rate=0.0,
  )
  kwargs.update(overrides)
  return make_model(**kwargs)


def _tokens(batch=2, length=MAX_LEN, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, dtype=jnp.int32)


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _init(model, x, seed=0):
  return model.init(jax.random.key(seed), x)


def _forward(model, params, state, x, **kwargs):
  """The K logits (heads 1..K-1, then the last stage) as one jitted call."""
  return jax.jit(lambda p, x: model.apply(p, state, x, **kwargs)[0])(params, x)


# ------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("head", ["linear", "block"])
def test_future_tokens_never_change_earlier_logits(positions, head):
  model = _model(positions=positions, head=head)
  x = _tokens()
  params, state = _init(model, x)
  t = 4
  x_changed = x.at[:, t].set((x[:, t] + 1) % VOCAB)
  both = _forward(model, params, state, jnp.concatenate([x, x_changed]))
  before, after = [out[: len(x)] for out in both], [out[len(x) :] for out in both]
  assert len(before) == model.num_stages
  for k, (a, b) in enumerate(zip(before, after)):
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6, err_msg=f"output {k} leaked")
    # Non-vacuous: the changed token does reach its own and later positions.
    assert not np.allclose(a[:, t:], b[:, t:], atol=1e-4), f"output {k} ignores token {t}"


# ---------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
  "num_stages,head,positions",
  [(1, "linear", "learned"), (3, "linear", "rotary"), (2, "block", "learned")],
)
def test_every_stage_and_head_output_shape(num_stages, head, positions):
  model = _model(num_stages=num_stages, head=head, positions=positions)
  batch, length = 3, 5  # shorter than max_len is allowed
  x = _tokens(batch, length)
  params, state = _init(model, x)
  stage_fns, head_fns = model.stage_fns(state, train=False)
  a = x
  for k, f in enumerate(stage_fns):
    a, _ = f(params[k]["stage"], a)
    if k < num_stages - 1:
      assert a.shape == (batch, length, D)
      logits, _ = head_fns[k](params[k]["head"], a)
      assert logits.shape == (batch, length, VOCAB)
      assert logits.dtype == jnp.float32
  assert a.shape == (batch, length, VOCAB)
  assert a.dtype == jnp.float32
  assert len(model.heads) == num_stages - 1
  assert ("pos_embed" in params[0]["stage"]) == (positions == "learned")


def test_sequence_longer_than_max_len_is_rejected():
  model = _model()
  params, state = _init(model, _tokens())
  with pytest.raises(ValueError, match="max_len"):
    model.apply(params, state, _tokens(length=MAX_LEN + 1))


# ------------------------------------------------------------------------------ layer split


@pytest.mark.parametrize(
  "num_layers,num_stages,expected",
  [(6, 3, (2, 2, 2)), (7, 3, (3, 2, 2)), (8, 3, (3, 3, 2)), (4, 4, (1, 1, 1, 1)), (5, 1, (5,))],
)
def test_even_split_gives_extra_layers_to_earlier_stages(num_layers, num_stages, expected):
  model = _model(num_layers=num_layers, num_stages=num_stages)
  assert model.info["layers_per_stage"] == expected
  assert tuple(s.num_layers for s in model.stages) == expected


def test_explicit_split_is_built_as_given():
  model = _model(num_layers=6, num_stages=3, layers_per_stage=np.array([1, 4, 1]))
  assert model.info["layers_per_stage"] == (1, 4, 1)
  params, _ = _init(model, _tokens())
  built = tuple(sum(name.startswith("layer_") for name in p) for p in (q["stage"] for q in params))
  assert built == (1, 4, 1)


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(num_layers=4, num_stages=2, layers_per_stage=(1, 2)), "sums to 3"),
    (dict(num_layers=3, num_stages=2, layers_per_stage=(1, 1, 1)), "one per stage"),
    (dict(num_layers=3, num_stages=2, layers_per_stage=(3, 0)), ">= 1"),
    (dict(num_layers=2, num_stages=3), "num_stages must be in 1..2"),
    (dict(num_stages=0), "num_stages must be a positive int"),
    (dict(d_model=16, num_heads=3), "not divisible"),
    (dict(d_model=18, num_heads=2, positions="rotary"), "head dim must be even"),
    (dict(positions="sinusoidal"), "valid: \\('learned', 'rotary'\\)"),
    (dict(head="mlp"), "valid: \\('linear', 'block'\\)"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(dtype=jnp.int32), "floating dtype"),
  ],
)
def test_bad_config_raises_value_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    _model(**overrides)


def test_odd_head_dim_is_fine_with_learned_positions():
  _model(d_model=18, num_heads=2, positions="learned")


# --------------------------------------------------------------------------------- dropout


def test_dropout_only_in_train_mode():
  model = _model(dropout_rate=0.3, head="block")
  x = _tokens()
  params, state = _init(model, x)
  train = jax.jit(lambda p, x, r: model.apply(p, state, x, train=True, rng=r)[0])
  a = train(params, x, jax.random.key(1))
  b = train(params, x, jax.random.key(2))
  a_again = train(params, x, jax.random.key(1))
  evaluate = jax.jit(lambda p, x, r: model.apply(p, state, x, train=False, rng=r)[0])
  evals = [evaluate(params, x, jax.random.key(k)) for k in (1, 1, 3)]
  eval_no_rng = _forward(model, params, state, x)
  for k in range(model.num_stages):
    assert not np.allclose(a[k], b[k]), f"output {k}: different dropout keys gave equal outputs"
    np.testing.assert_array_equal(a[k], a_again[k])
    np.testing.assert_array_equal(evals[0][k], evals[1][k])
    np.testing.assert_array_equal(evals[0][k], evals[2][k])  # eval ignores the dropout key
    np.testing.assert_array_equal(evals[0][k], eval_no_rng[k])
    assert not np.allclose(a[k], evals[0][k])


# ------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_bfloat16_compute_keeps_float32_params_and_logits(positions):
  model = _model(dtype=jnp.bfloat16, positions=positions, head="block")
  x = _tokens()
  params, state = _init(model, x)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = _forward(model, params, state, x)
  for out in logits:
    assert out.dtype == jnp.float32
    assert np.isfinite(out).all()
  # What crosses between stages is in the compute dtype (half the pipeline traffic).
  a1 = model.stages[0].apply({"params": params[0]["stage"]}, x)
  assert a1.dtype == jnp.bfloat16
  # bf16 compute stays close to the float32 model with the same parameters.
  ref = _forward(_model(positions=positions, head="block"), params, state, x)
  np.testing.assert_allclose(logits[-1], ref[-1], atol=0.15, rtol=0.05)


# ------------------------------------------------------------------------ parameter counts


def test_parameter_count_matches_hand_count():
  vocab, d, ff, max_len = 11, 8, 16, 6
  model = make_model(
    vocab_size=vocab,
    num_layers=3,
    num_stages=2,
    d_model=d,
    num_heads=2,
    d_ff=ff,
    max_len=max_len,
    head="linear",
  )
  params, _ = _init(model, jnp.zeros((1, max_len), jnp.int32))
  layer_norm = 2 * d  # scale + bias
  attention = 4 * (d * d + d)  # q, k, v, out: weight + bias each
  mlp = (d * ff + ff) + (ff * d + d)
  block = 2 * layer_norm + attention + mlp  # = 600 for d=8, ff=16
  readout = layer_norm + d * vocab + vocab  # LayerNorm + untied Dense(vocab) = 115
  stage1 = vocab * d + max_len * d + 2 * block  # token + learned position tables, 2 layers
  stage2 = block + readout
  assert block == 600 and readout == 115
  assert [_count(p["stage"]) for p in params] == [stage1, stage2] == [1336, 715]
  assert _count(params[0]["head"]) == readout
  assert model.info["head_params"] == readout
  assert model.info["stage_params"] == (stage1, stage2)
  # The aux head costs as much as the real output layer: 2 d vocab FLOPs per token.
  assert model.info["head_flops_per_token"] == 2 * d * vocab
  block_flops = 8 * d * d + 4 * d * ff + 4 * max_len * d
  assert model.info["stage_flops_per_token"] == (2 * block_flops, block_flops + 2 * d * vocab)


def test_block_head_counts_one_extra_block():
  model = _model(num_stages=2, head="block", positions="rotary")
  params, _ = _init(model, _tokens())
  block = 4 * D * D + 2 * D * D_FF + 9 * D + D_FF
  readout = 2 * D + D * VOCAB + VOCAB
  assert _count(params[0]["head"]) == model.info["head_params"] == block + readout
  assert model.info["head_flops_per_token"] == (
    2 * D * VOCAB + 8 * D * D + 4 * D * D_FF + 4 * MAX_LEN * D
  )
  # Rotary: no position table, so stage 1 is the token table plus its blocks.
  assert _count(params[0]["stage"]) == VOCAB * D + 2 * block


# --------------------------------------------------------------------------------- rotary


def test_rotary_score_depends_only_on_relative_offset():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 6, 3, 8))
  pos = jnp.arange(6)

  def scores(positions):
    rq, rk = transformer.apply_rotary(q, positions), transformer.apply_rotary(k, positions)
    return jnp.einsum("bqhd,bkhd->bhqk", rq, rk)

  base = scores(pos)
  for shift in (1, 7, 1000):
    np.testing.assert_allclose(scores(pos + shift), base, atol=1e-4, rtol=1e-4)
  # Non-vacuous: rotation changes the scores, and changing the offsets changes them.
  assert not np.allclose(base, jnp.einsum("bqhd,bkhd->bhqk", q, k), atol=1e-3)
  assert not np.allclose(scores(2 * pos), base, atol=1e-3)
  # Rotation preserves each vector's norm (it is a rotation, not a rescaling).
  np.testing.assert_allclose(
    jnp.linalg.norm(transformer.apply_rotary(q, pos), axis=-1),
    jnp.linalg.norm(q, axis=-1),
    rtol=1e-5,
  )


def test_rotary_attention_layer_is_shift_invariant():
  """Same tokens at positions p or p + s: a single attention layer's outputs are unchanged."""
  cfg = transformer.TransformerConfig(
    vocab_size=VOCAB, d_model=D, num_heads=HEADS, d_ff=D_FF, max_len=MAX_LEN,
    dropout_rate=0.0, positions="rotary",
  )  # fmt: skip
  layer = transformer.CausalSelfAttention(cfg)
  x = jax.random.normal(jax.random.key(0), (2, MAX_LEN, D))
  variables = layer.init(jax.random.key(1), x)
  pos = jnp.arange(MAX_LEN)
  out = layer.apply(variables, x, positions=pos)
  np.testing.assert_allclose(layer.apply(variables, x), out, atol=1e-6)  # default is 0..L-1
  for shift in (1, 5, 123):
    shifted = layer.apply(variables, x, positions=pos + shift)
    np.testing.assert_allclose(shifted, out, atol=1e-4, rtol=1e-4)
  # Per-example positions [B, L] work, and each example sees only its own offsets.
  per_example = jnp.stack([pos + 3, pos + 40])
  np.testing.assert_allclose(layer.apply(variables, x, positions=per_example), out, atol=1e-4)
  # Non-vacuous: positions matter when the relative offsets change.
  assert not np.allclose(layer.apply(variables, x, positions=2 * pos), out, atol=1e-3)
  # A learned-position layer has no RoPE: the positions argument is ignored.
  plain_cfg = dataclasses.replace(cfg, positions="learned")
  plain = transformer.CausalSelfAttention(plain_cfg)
  np.testing.assert_array_equal(
    plain.apply(variables, x, positions=2 * pos), plain.apply(variables, x, positions=pos)
  )
