"""Transformer language models on LM1B and the offline stdlib corpus, any strategy.

  python -m experiments.transformer \
    --config experiments/configs/transformer_lm1b.py:strategy=pairwise,stages=4 --workdir DIR
"""

from absl import app

from experiments import launch

if __name__ == "__main__":
  app.run(launch.main_for("transformer"), flags_parser=launch.parse_flags)
