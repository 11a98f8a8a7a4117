"""What the benchmark scripts time when given no --config: a small model at a real dataset's shapes.

  python -m scripts.benchmark_pipeline    # resnet20, pool heads, K = 2, batch 64, M = 8
  python -m scripts.benchmark_step        # :head=conv,stages=4,batch=32
  python -m scripts.benchmark_pipeline --config=experiments/configs/benchmark.py:family=transformer

ResNet (default): CIFAR-10's shapes (32×32×3, 10 classes), He et al.'s resnet20 cut into
FLOP-balanced stages, SGD with momentum at a constant rate. Transformer (`family=transformer`):
the stdlib LM's model (4 pre-LN layers, d_model 128, 4 heads, d_ff 512, rotary positions, no
dropout) on 64-token sequences of a 1024-id vocabulary, AdamW.

The scripts feed random batches of these shapes (`ilbp.families.build_synthetic`): nothing is
read or downloaded. Any experiment config works in this one's place (`--config=...`), and any
field can be overridden (`--config.model.name=resnet56`, `--config.batch_size=128`).
"""

from experiments.configs import common

FAMILIES = ("resnet", "transformer")


def get_config(arg: str | None = None):
  defaults = dict(common.COMMON_ARGS, stages=2)
  args = common.parse_arg(
    arg, **defaults, family="resnet", model="resnet20", head="", batch=64, microbatches=8
  )
  if args.family not in FAMILIES:
    raise ValueError(f"Unknown family {args.family!r}; valid: {', '.join(FAMILIES)}.")
  if args.family == "resnet":
    args.head = args.head or "pool"
    args.recipe = "cosine"
    c = common.cifar_config(args, dataset="cifar10")
    c.optimizer.weight_decay = 0.0
  else:
    args.head = args.head or "linear"
    args.positions = "rotary"
    c = common.base_config(args)
    c.family = "transformer"
    c.learning_rate = 1e-3
    c.optimizer.name = "adamw"
    c.optimizer.weight_decay = 0.01
    common.transformer_model(
      c, args, num_layers=4, d_model=128, num_heads=4, d_ff=512, dtype="float32", dropout=0.0
    )
    c.dataset = common.ml_collections.ConfigDict()
    c.dataset.name = "stdlib"  # Its shapes only: the benchmarks read no data.
    c.dataset.seq_len = 64  # Tokens per sequence.
    c.dataset.tokenizer = "sentencepiece"  # "bytes" (258 ids) or "sentencepiece".
    c.dataset.vocab_size = 1024  # SentencePiece vocabulary size.
  c.batch_size = c.eval_batch_size = args.batch  # Examples (images or sequences) per step.
  c.execution.microbatches = args.microbatches  # M: what pipelines overlap stages across.
  c.optimizer.schedule = "constant"  # Steps are timed, not trained: no warm-up, no decay.
  c.optimizer.warmup_steps = 0
  return c
