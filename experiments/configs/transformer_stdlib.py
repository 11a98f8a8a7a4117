"""Transformer LM on the Python standard library's own source: the offline LM quickstart.

~29.7 MB of real code nobody here wrote, split by file (1,704 train / 86 eval files), byte
tokens. Command:
  python -m experiments.transformer \
    --config experiments/configs/transformer_stdlib.py:strategy=pairwise,stages=4 --workdir DIR

4 layers (one per stage), d_model 128, 4 heads, d_ff 512, 128-byte sequences, batch 32,
AdamW 3e-3 with warm-up and cosine decay, 400 steps. Hardware: 2-core CPU, 4–5 minutes per
strategy (measured on a shared machine).
Eval perplexity per head for local / pairwise / global: see WORKSPACE.md (measured).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, **common.COMMON_ARGS, head="linear", positions="rotary")
  c = common.base_config(args)
  c.family = "transformer"
  c.batch_size = 32
  c.eval_batch_size = 64
  c.total_steps = 400
  c.learning_rate = 3e-3
  c.optimizer.name = "adamw"
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 40
  c.optimizer.grad_clip_norm = 1.0
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.max_eval_batches = 16  # 16 × 64 × 128 ≈ 131k eval bytes.
  c.checkpoint_every_steps = 200
  # No dropout (both sizes): 400 steps see ~1.6M bytes of 29.7M, no overfitting to fight.
  common.transformer_model(
    c, args, num_layers=4, d_model=128, num_heads=4, d_ff=512, dtype="float32", dropout=0.0
  )

  c.dataset = common.ml_collections.ConfigDict()
  c.dataset.name = "stdlib"  # The running Python's standard library source files.
  c.dataset.seq_len = 128  # Bytes per packed sequence.
  c.dataset.tokenizer = "bytes"  # "bytes" (258 ids) or "sentencepiece".
  c.dataset.vocab_size = 8000  # SentencePiece only.
  c.dataset.max_eval_sequences = common.ml_collections.config_dict.placeholder(int)
  c.dataset.max_files = common.ml_collections.config_dict.placeholder(int)  # None = all files.
  c.dataset.cache_dir = common.ml_collections.config_dict.placeholder(str)  # None = workdir.

  if args.runlocal:
    common.transformer_model(
      c, args, num_layers=4, d_model=32, num_heads=2, d_ff=64, dtype="float32", dropout=0.0
    )
    c.dataset.max_files = 8
    c.dataset.seq_len = 32
    c.batch_size = c.eval_batch_size = 8
    c.total_steps = 4
    c.optimizer.warmup_steps = 0
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.max_eval_batches = 2
  return c
