"""The shared absl entry point behind `experiments.resnet` and `experiments.transformer`.

Flags: --config (an ml_collections config file, `path.py:arg`, locked so a typo in
--config.FIELD fails) and --workdir. Everything else lives in the config.
"""

from __future__ import annotations

import jax
from absl import flags, logging
from ml_collections import config_flags

from ilbp import trainer

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir", None, "Run directory: config, metrics, checkpoints. Re-use to resume."
)
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main_for(family: str):
  """Returns an absl `main` that trains a config of `family` ("resnet" or "transformer")."""

  def main(argv):
    if len(argv) > 1:
      raise ValueError(f"Unexpected positional arguments: {argv[1:]}; use --config.FIELD=VALUE.")
    # TensorFlow is only the input pipeline: keep it off the accelerators JAX uses.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    if not FLAGS["verbosity"].present:
      # Orbax and TF log every save at INFO; the trainer prints its own progress lines.
      logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    if config.family != family:
      raise ValueError(
        f"{FLAGS['config'].value!r} is a {config.family!r} config; run it with "
        f"`python -m experiments.{config.family}`."
      )
    logging.info(
      "JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(), jax.process_count()
    )
    trainer.train_and_evaluate(config, FLAGS.workdir)

  return main
