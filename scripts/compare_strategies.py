"""Trains one config under several strategies (same seed and steps) and prints a table.

The README's main command runs it with its default, the offline digits quickstart:

  .venv/bin/python -m scripts.compare_strategies

Any experiment config works, e.g. the stdlib Transformer:

  .venv/bin/python -m scripts.compare_strategies \
    --config experiments/configs/transformer_stdlib.py:stages=4 --strategies local,pairwise,global

Each strategy trains in `<workdir>/<strategy>` through the same `train_and_evaluate` the
experiment binaries use. The table shows every head's final eval accuracy (classification) or
perplexity (language models), and the median training throughput over the logged intervals
after the first (which includes compilation). `<workdir>/results.json` and `table.md` hold
the same numbers. Every number is measured by this run; nothing is cached.
"""

from __future__ import annotations

import copy
import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from ilbp import files, results, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", "experiments/configs/resnet_digits.py", "Experiment config.", lock_config=False
)
flags.DEFINE_list("strategies", ["local", "pairwise", "global"], "Strategies to compare.")
flags.DEFINE_string(
  "workdir", None, "Base directory (default: runs/compare-<config>-<timestamp>, always fresh)."
)


def run(config, strategies: list[str], workdir: str) -> list[dict]:
  """Trains `config` once per strategy; returns one result row per strategy."""
  rows = []
  for name in strategies:
    cfg = copy.deepcopy(config)
    cfg.strategy = name
    run_dir = os.path.join(workdir, name)
    print(f"\n=== {name}: {run_dir}", flush=True)
    start = time.time()
    final = trainer.train_and_evaluate(cfg, run_dir)
    wall = time.time() - start
    rows.append(
      {
        "strategy": name,
        "final": final,
        "steps_per_sec": results.throughput(results.read_metrics(run_dir)),
        "wall_seconds": wall,
        "batch_size": cfg.batch_size,
      }
    )
  return rows


def table(rows: list[dict], num_stages: int) -> str:
  """A markdown table: one row per strategy, one column per head."""
  lm = "eval/head1/perplexity" in rows[0]["final"]
  metric = "perplexity" if lm else "accuracy"
  heads = [f"head {k}" + (" (output)" if k == num_stages else "") for k in range(1, num_stages + 1)]
  lines = [
    f"| strategy | {' | '.join(heads)} | steps/s | examples/s | wall s |",
    "|---" * (len(heads) + 4) + "|",
  ]
  for r in rows:
    vals = [r["final"][f"eval/head{k}/{metric}"] for k in range(1, num_stages + 1)]
    cells = [f"{v:.2f}" if lm else f"{100 * v:.1f}%" for v in vals]
    sps = r["steps_per_sec"] or float("nan")
    lines.append(
      f"| {r['strategy']} | {' | '.join(cells)} | {sps:.1f} | {sps * r['batch_size']:.0f}"
      f" | {r['wall_seconds']:.0f} |"
    )
  return f"eval {metric} per head\n\n" + "\n".join(lines)


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  config = FLAGS.config
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
  workdir = FLAGS.workdir or os.path.join(
    "runs", f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
  )
  rows = run(config, FLAGS.strategies, workdir)
  text = (
    f"{name}: K={config.num_stages}, {config.total_steps} steps, batch {config.batch_size}, "
    f"seed {config.seed}\n" + table(rows, config.num_stages)
  )
  print("\n" + text, flush=True)
  files.write_text(os.path.join(workdir, "table.md"), text + "\n")
  files.write_text(os.path.join(workdir, "results.json"), json.dumps(rows, indent=2))
  print(f"\nWritten: {workdir}/table.md, {workdir}/results.json")


if __name__ == "__main__":
  app.run(main)
