"""Decoder-only pre-LayerNorm Transformer language model, cut into K stages.

The network is the usual stack (token embedding, L causal self-attention + GELU-MLP blocks,
final LayerNorm, unembedding) split depthwise into groups of consecutive blocks:

  stage 1      int32 tokens [B, L] -> embedding (+ learned positions) -> blocks -> [B, L, d]
               (or the tokens' rows of the embedding, [B, L, d], looked up by the caller)
  stage k      [B, L, d] -> blocks -> [B, L, d]
  stage K      [B, L, d] -> blocks -> final LayerNorm -> Dense(vocab) -> float32 [B, L, vocab]
  head k<K     [B, L, d] -> (one extra block if head="block") -> LayerNorm -> Dense(vocab)

The unembedding is not tied to the token embedding: tying would share a parameter between
stage 1 and stage K, which sit on different devices and are trained by different losses.
Every aux head therefore owns a d x vocab projection, the same size as the real output layer;
`StagedModel.info` reports that cost so it is never hidden.

Precision: parameters are always float32; matmuls run in `dtype` (bfloat16 on accelerators);
LayerNorm, the attention softmax and RoPE run in float32; all logits are cast to float32 so
losses are float32. Interior activations (what crosses between stages) are in `dtype`.

`make_model` is the entry point; `CausalSelfAttention` and `apply_rotary` are public so tests
can check the positional maths on a single layer.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ilbp.staged import StagedModel

POSITIONS = ("learned", "rotary")
HEADS = ("linear", "block")

_dense_init = nn.initializers.xavier_uniform()
# Token embeddings at unit scale and small learned positions, as in flax examples/lm1b.
_embed_init = nn.initializers.normal(stddev=1.0)
_posemb_init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters shared by every stage and head (hashable, so a Flax module field).

  Attributes:
    vocab_size: number of token ids (output logits per position).
    d_model: width of the residual stream.
    num_heads: attention heads; d_model must be divisible by it.
    d_ff: hidden width of each MLP.
    max_len: longest sequence a stage accepts (size of the learned position table).
    dropout_rate: applied to attention weights, to each residual branch and to the embedding.
    positions: "learned" (absolute table added in stage 1) or "rotary" (RoPE on q/k).
    dtype: computation dtype; parameters stay float32.
  """

  vocab_size: int
  d_model: int
  num_heads: int
  d_ff: int
  max_len: int
  dropout_rate: float = 0.1
  positions: str = "learned"
  dtype: Any = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def _norm(x: jax.Array, dtype: Any, name: str) -> jax.Array:
  """LayerNorm computed in float32 (bf16 statistics are too coarse), returned in `dtype`."""
  y = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name=name)(x.astype(jnp.float32))
  return y.astype(dtype)


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (RoPE, Su et al. 2021) in the rotate-half layout.

  Channel pairs (i, i + D/2) of each head are rotated by angle position * base^(-2i/D), so the
  dot product of a rotated query at position m and a rotated key at position n depends on the
  positions only through m - n.

  Args:
    x: queries or keys [B, L, H, D] with D even.
    positions: integer or float positions, [L] or [B, L].
    base: wavelength base of the rotation frequencies.

  Returns:
    The rotated array, same shape and dtype as `x`.
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(positions, jnp.float32)[..., :, None] * inv_freq  # [..., L, D/2]
  # Broadcast over heads; computed in float32 because bf16 angles lose position resolution.
  sin, cos = jnp.sin(angles)[..., None, :], jnp.cos(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention; RoPE on q/k when config.positions == "rotary"."""

  config: TransformerConfig

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool = False, positions: jax.Array | None = None
  ) -> jax.Array:
    """Attends each position to itself and every earlier position.

    Args:
      x: [B, L, d_model] in the computation dtype.
      train: enables attention-weight dropout.
      positions: positions used by RoPE, [L] or [B, L]; default 0..L-1. Ignored for learned
        positions (those are added to the embedding in stage 1).

    Returns:
      [B, L, d_model] in the computation dtype.
    """
    cfg = self.config
    length = x.shape[1]
    proj = functools.partial(
      nn.DenseGeneral,
      features=(cfg.num_heads, cfg.head_dim),
      dtype=cfg.dtype,
      param_dtype=jnp.float32,
      kernel_init=_dense_init,
    )
    q, k, v = proj(name="query")(x), proj(name="key")(x), proj(name="value")(x)
    if cfg.positions == "rotary":
      if positions is None:
        positions = jnp.arange(length)
      q, k = apply_rotary(q, positions), apply_rotary(k, positions)
    # Scale q before the matmul and accumulate scores in float32 so bf16 cannot overflow.
    q = q * jnp.asarray(cfg.head_dim**-0.5, q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    # Masked entries become exactly 0 after softmax, so future tokens cannot leak at all.
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(cfg.dtype), v)
    return nn.DenseGeneral(
      features=cfg.d_model,
      axis=(-2, -1),
      dtype=cfg.dtype,
      param_dtype=jnp.float32,
      kernel_init=_dense_init,
      name="out",
    )(out)


class Block(nn.Module):
  """Pre-LayerNorm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies one block to a [B, L, d_model] activation."""
    cfg = self.config
    dense = functools.partial(
      nn.Dense, dtype=cfg.dtype, param_dtype=jnp.float32, kernel_init=_dense_init
    )
    residual_dropout = nn.Dropout(cfg.dropout_rate, deterministic=not train)
    h = CausalSelfAttention(cfg, name="attn")(_norm(x, cfg.dtype, "norm_attn"), train)
    x = x + residual_dropout(h)
    h = dense(cfg.d_ff, name="mlp_in")(_norm(x, cfg.dtype, "norm_mlp"))
    h = dense(cfg.d_model, name="mlp_out")(nn.gelu(h))
    return x + residual_dropout(h)


def _logits(x: jax.Array, cfg: TransformerConfig) -> jax.Array:
  """LayerNorm + Dense(vocab), cast to float32 so every loss is computed in float32."""
  x = _norm(x, cfg.dtype, "norm")
  logits = nn.Dense(
    cfg.vocab_size,
    dtype=cfg.dtype,
    param_dtype=jnp.float32,
    kernel_init=_dense_init,
    name="unembed",
  )(x)
  return logits.astype(jnp.float32)


class Stage(nn.Module):
  """A group of consecutive blocks; stage 1 adds the embedding, stage K the unembedding.

  Attributes:
    config: shared hyperparameters.
    num_layers: Transformer blocks in this stage.
    first: whether this stage embeds tokens (stage 1).
    last: whether this stage ends in the final LayerNorm + unembedding (stage K).
  """

  config: TransformerConfig
  num_layers: int
  first: bool = False
  last: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Tokens [B, L] (stage 1) or activations [B, L, d] -> activations or float32 logits."""
    cfg = self.config
    if self.first:
      x = self._embed(x, train)
    for i in range(self.num_layers):
      x = Block(cfg, name=f"layer_{i}")(x, train)
    return _logits(x, cfg) if self.last else x

  def _embed(self, tokens: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    looked_up = tokens.ndim == 3 and jnp.issubdtype(tokens.dtype, jnp.floating)
    if not looked_up and (tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer)):
      raise ValueError(
        f"Stage 1 expects integer tokens [B, L] (or their rows of its embedding table, "
        f"[B, L, d_model]), got {tokens.dtype}{tokens.shape}."
      )
    length = tokens.shape[1]
    if length > cfg.max_len:
      raise ValueError(f"Sequence length {length} exceeds max_len={cfg.max_len}.")
    if looked_up:
      # The caller looked the tokens up in this stage's table (a vocabulary-parallel table
      # split over devices): the same values nn.Embed gives, cast as it casts them.
      x = tokens.astype(cfg.dtype)
    else:
      x = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=jnp.float32,
        embedding_init=_embed_init,
        name="embed",
      )(tokens)
    if cfg.positions == "learned":
      table = self.param("pos_embed", _posemb_init, (cfg.max_len, cfg.d_model), jnp.float32)
      x = x + table[:length].astype(cfg.dtype)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)


class Head(nn.Module):
  """Auxiliary head: optional extra block, then LayerNorm + Dense(vocab), float32 logits.

  Attributes:
    config: shared hyperparameters.
    block: whether to put one Transformer block before the projection (head="block").
  """

  config: TransformerConfig
  block: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps a stage's [B, L, d] output to float32 logits [B, L, vocab]."""
    if self.block:
      x = Block(self.config, name="block")(x, train)
    return _logits(x, self.config)


def split_layers(num_layers: int, num_stages: int) -> tuple[int, ...]:
  """Layers per stage, as even as possible; earlier stages take the extra layers.

  Same convention as `numpy.array_split`: 7 layers over 3 stages gives (3, 2, 2).
  """
  base, extra = divmod(num_layers, num_stages)
  return tuple(base + (k < extra) for k in range(num_stages))


def _block_params(d: int, d_ff: int) -> int:
  # q, k, v, out projections (with biases) + two-layer MLP + two LayerNorms (scale, bias).
  return 4 * (d * d + d) + (d * d_ff + d_ff) + (d_ff * d + d) + 2 * 2 * d


def _block_flops(d: int, d_ff: int, length: int) -> int:
  # Per token, forward, 2 FLOPs per multiply-add: projections 8d^2, MLP 4 d d_ff, and scores
  # plus weighted sum 4 L d over the full L x L matrix (the causal half is computed, then
  # masked). LayerNorm, softmax, GELU and bias adds are left out.
  return 8 * d * d + 4 * d * d_ff + 4 * length * d


def _is_int(value: Any) -> bool:
  # numbers.Integral admits numpy ints (e.g. from a config array); bool is excluded on purpose.
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive(**values: Any) -> None:
  for name, value in values.items():
    if not _is_int(value) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _resolve_layers(num_layers: int, num_stages: int, layers_per_stage) -> tuple[int, ...]:
  if num_stages > num_layers:
    raise ValueError(
      f"num_stages={num_stages} exceeds num_layers={num_layers}: every stage needs at least "
      f"one layer, so num_stages must be in 1..{num_layers}."
    )
  if layers_per_stage is None:
    return split_layers(num_layers, num_stages)
  layers = tuple(layers_per_stage)
  if len(layers) != num_stages:
    raise ValueError(
      f"layers_per_stage={layers} has {len(layers)} entries; it needs one per stage "
      f"(num_stages={num_stages})."
    )
  if any(not _is_int(n) or n < 1 for n in layers):
    raise ValueError(f"layers_per_stage={layers} must hold ints >= 1.")
  layers = tuple(int(n) for n in layers)
  if sum(layers) != num_layers:
    raise ValueError(
      f"layers_per_stage={layers} sums to {sum(layers)}, but num_layers={num_layers}."
    )
  return layers


def make_model(
  *,
  vocab_size: int,
  num_layers: int,
  num_stages: int,
  d_model: int,
  num_heads: int,
  d_ff: int,
  max_len: int,
  dropout_rate: float = 0.1,
  positions: str = "learned",
  head: str = "linear",
  layers_per_stage: Sequence[int] | None = None,
  dtype: Any = jnp.float32,
) -> StagedModel:
  """Builds a staged decoder-only Transformer language model.

  Every argument is checked before any array is created, so a bad config fails at once.

  Args:
    vocab_size: number of token ids.
    num_layers: total Transformer blocks across all stages (aux-head blocks not counted).
    num_stages: K, the number of stages; 1..num_layers.
    d_model: residual width; divisible by num_heads.
    num_heads: attention heads.
    d_ff: MLP hidden width.
    max_len: longest sequence accepted (learned-position table size; also the L used for
      the attention term of the FLOP estimates).
    dropout_rate: dropout on attention weights, residual branches and embeddings; in [0, 1).
    positions: "learned" or "rotary" (rotary needs an even head dimension).
    head: aux head kind, "linear" (LayerNorm + Dense) or "block" (one extra block first).
    layers_per_stage: blocks per stage, num_stages ints >= 1 summing to num_layers; None
      splits as evenly as possible with earlier stages taking the extra layers.
    dtype: computation dtype (e.g. jnp.bfloat16); parameters and logits stay float32.

  Returns:
    A `StagedModel` with K `Stage`s and K-1 `Head`s. Its `info` holds `layers_per_stage`,
    `stage_params`, `head_params` (per aux head), `head_flops_per_token` and
    `stage_flops_per_token` (forward FLOPs per token, multiply-add = 2; roughly triple for a
    training step).

  Raises:
    ValueError: on any invalid argument, naming it and what is valid.
  """
  _check_positive(
    vocab_size=vocab_size,
    num_layers=num_layers,
    num_stages=num_stages,
    d_model=d_model,
    num_heads=num_heads,
    d_ff=d_ff,
    max_len=max_len,
  )
  if d_model % num_heads:
    raise ValueError(
      f"d_model={d_model} is not divisible by num_heads={num_heads}; pick num_heads among "
      f"the divisors of d_model."
    )
  if positions not in POSITIONS:
    raise ValueError(f"positions={positions!r} is unknown; valid: {POSITIONS}.")
  if positions == "rotary" and (d_model // num_heads) % 2:
    raise ValueError(
      f"Rotary positions rotate channel pairs, so the head dim must be even; "
      f"d_model / num_heads = {d_model // num_heads}."
    )
  if head not in HEADS:
    raise ValueError(f"head={head!r} is unknown; valid: {HEADS}.")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 1).")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype={dtype} must be a floating dtype (float32, bfloat16, ...).")
  layers = _resolve_layers(num_layers, num_stages, layers_per_stage)

  cfg = TransformerConfig(
    vocab_size=vocab_size,
    d_model=d_model,
    num_heads=num_heads,
    d_ff=d_ff,
    max_len=max_len,
    dropout_rate=float(dropout_rate),
    positions=positions,
    dtype=dtype,
  )
  last = num_stages - 1
  stages = [Stage(cfg, num_layers=n, first=k == 0, last=k == last) for k, n in enumerate(layers)]
  heads = [Head(cfg, block=head == "block") for _ in range(last)]

  d, block_p, block_f = d_model, _block_params(d_model, d_ff), _block_flops(d_model, d_ff, max_len)
  readout_params = 2 * d + d * vocab_size + vocab_size  # LayerNorm + Dense(vocab)
  readout_flops = 2 * d * vocab_size
  extra_block = head == "block"
  stage_params, stage_flops = [], []
  for k, n in enumerate(layers):
    p, f = n * block_p, n * block_f
    if k == 0:
      p += vocab_size * d + (max_len * d if positions == "learned" else 0)
    if k == last:
      p, f = p + readout_params, f + readout_flops
    stage_params.append(p)
    stage_flops.append(f)
  info = {
    "layers_per_stage": layers,
    "stage_params": tuple(stage_params),
    "head_params": readout_params + (block_p if extra_block else 0),
    "head_flops_per_token": readout_flops + (block_f if extra_block else 0),
    "stage_flops_per_token": tuple(stage_flops),
    # Stage 1's token table: a caller may look tokens up itself and give stage 1 the rows
    # (`Stage._embed`), e.g. to split the table over devices (ilbp.execution.spmd.vocab).
    "embedding": ("stage", "embed", "embedding"),
  }
  return StagedModel(stages, heads, info)
