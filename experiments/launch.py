"""The shared absl entry point behind `experiments.resnet` and `experiments.transformer`.

Flags: --config (an ml_collections config file, `path.py:arg`, locked so a typo in
--config.FIELD fails) and --workdir. Everything else lives in the config, except how the
processes of a multi-host job join (`--distributed`, see `ilbp/distributed.py`): on a Cloud TPU
pod slice run the same command on every worker; elsewhere set --coordinator_address (host:port
of process 0), --num_processes and --process_id on each process, or launch under Slurm / mpirun.
"""

from __future__ import annotations

import jax
from absl import flags, logging
from ml_collections import config_flags

from ilbp import distributed, trainer

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir", None, "Run directory: config, metrics, checkpoints. Re-use to resume."
)
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_enum(
  "distributed",
  "auto",
  list(distributed.MODES),
  "Join the processes of a multi-host job (jax.distributed.initialize) first: auto = when the "
  "environment describes several processes (TPU slice, Slurm, Open MPI, a coordinator).",
)
flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)."
)
flags.DEFINE_integer("num_processes", None, "Processes in the job (default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (default: $JAX_PROCESS_ID).")
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
    joined = distributed.initialize(
      FLAGS.distributed,
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
    config = FLAGS.config
    if config.family != family:
      raise ValueError(
        f"{FLAGS['config'].value!r} is a {config.family!r} config; run it with "
        f"`python -m experiments.{config.family}`."
      )
    logging.info(
      "JAX devices: %s (process %d of %d; %s)",
      jax.devices(),
      jax.process_index(),
      jax.process_count(),
      joined,
    )
    trainer.train_and_evaluate(config, FLAGS.workdir)

  return main
