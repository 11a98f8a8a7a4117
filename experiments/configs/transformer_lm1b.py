"""Transformer language model on the One Billion Word benchmark (TFDS lm1b).

Command (Cloud TPU VM v3-8 / one GPU host; TFDS downloads lm1b on first use):
  python -m experiments.transformer \
    --config experiments/configs/transformer_lm1b.py:strategy=pairwise,stages=4 --workdir DIR

Paper-scale defaults. The authors did not release their Transformer configuration, so the sizes
follow the flax lm1b example: 8 pre-LN decoder layers, d_model 512, 8 heads, d_ff 2048, 32k
SentencePiece vocabulary trained on the training text (cached in the workdir), 256-token packed
sequences, batch 256, AdamW 1e-3 with 4k warm-up steps and cosine decay, 200k steps, bfloat16
compute. Each aux head is LayerNorm + its own d_model × vocab projection (16.4M parameters,
32.8 MFLOPs per token), the same size as the output layer.
Expected wall time and perplexity: not yet measured.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, **common.COMMON_ARGS, head="linear", positions="learned")
  c = common.base_config(args)
  c.family = "transformer"
  c.batch_size = 256
  c.eval_batch_size = 256
  c.total_steps = 200_000
  c.learning_rate = 1e-3
  c.optimizer.name = "adamw"
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 0.1
  c.optimizer.warmup_steps = 4000
  c.optimizer.grad_clip_norm = 1.0
  c.log_every_steps = 200
  c.eval_every_steps = 5000
  c.max_eval_batches = 200  # 200 × 256 sequences of 256 tokens ≈ 13M eval tokens.
  c.checkpoint_every_steps = 5000
  common.transformer_model(
    c, args, num_layers=8, d_model=512, num_heads=8, d_ff=2048, dtype="bfloat16"
  )

  c.dataset = common.ml_collections.ConfigDict()
  c.dataset.name = "lm1b"  # TFDS name.
  c.dataset.seq_len = 256  # Tokens per packed sequence.
  c.dataset.tokenizer = "sentencepiece"  # "sentencepiece" (trained on train text) or "bytes".
  c.dataset.vocab_size = 32_000  # SentencePiece vocabulary size.
  c.dataset.max_eval_sequences = common.ml_collections.config_dict.placeholder(int)
  c.dataset.cache_dir = common.ml_collections.config_dict.placeholder(str)  # None = workdir.
  c.dataset.data_dir = common.ml_collections.config_dict.placeholder(str)  # TFDS data dir.

  if args.runlocal:
    common.transformer_model(
      c, args, num_layers=4, d_model=32, num_heads=2, d_ff=64, dtype="float32"
    )
    c.dataset.tokenizer = "bytes"
    c.dataset.seq_len = 32
    c.batch_size = c.eval_batch_size = 8
    c.total_steps = 4
    c.optimizer.warmup_steps = 0
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.max_eval_batches = 1
  return c
