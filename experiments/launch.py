"""The shared absl entry point behind `experiments.resnet` and `experiments.transformer`.

Flags: --config (an ml_collections config file, `path.py:arg`, locked so a typo in
--config.FIELD fails) and --workdir. Everything else lives in the config, except how the
processes of a multi-host job join (`--distributed`, see `ilbp/distributed.py`): on a Cloud TPU
pod slice run the same command on every worker; elsewhere set --coordinator_address (host:port
of process 0), --num_processes and --process_id on each process, or launch under Slurm / mpirun.

A run that cannot start (a bad flag or config, a workdir in use or that is a file), a NaN loss
and a stop on Ctrl-C or SIGTERM end in one line on stderr and a non-zero exit status, without a
traceback: the line names the problem and what to do. A stopped run exits with 128 + the signal
number, as a shell reports a process killed by it, so that a job scheduler retries it.
"""

from __future__ import annotations

import os
import re
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

# The trainer (and with it TensorFlow) is imported in `main`: a command line that does not
# parse fails within a second or two.
from ilbp import distributed

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
flags.DEFINE_bool(
  "measure_pipeline_only",
  False,
  "Measure the op costs behind pipeline/seconds into WORKDIR/pipeline_costs.json (reused when "
  "it still matches the config) and exit without training (`ilbp.pipeline_time`).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _one_line(text: str) -> str:
  return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _config_file(argv: list[str]) -> str | None:
  """The file part of --config in `argv` (None when not given)."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
    if re.match(r"^--?config=", arg):
      return arg.split("=", 1)[1].split(":", 1)[0]
  return None


def _unknown_field(error: BaseException, argv: list[str]) -> str:
  """ml_collections reports an unknown --config.FIELD as a KeyError inside an AttributeError,
  its "did you mean" hint on the second line."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  lines = str(error.args[0] if error.args else error).splitlines()
  key = lines[0].strip("'\"") if lines else ""
  overrides = [a.split("=", 1)[0].lstrip("-") for a in argv if re.match(r"^--?config\.", a)]
  named = next((o for o in overrides if key in o.split(".")[1:]), f"config.{key}")
  hint = " ".join(lines[1:]) or f"See {_config_file(argv)} for the fields."
  return f"--{named}: the config has no field {key!r}. {hint}"


def _flag_error(error: BaseException, argv: list[str]) -> str:
  """One line for a command line absl or ml_collections cannot parse."""
  path = _config_file(argv)
  if path is not None and not os.path.isfile(path):
    return (
      f"--config: no config file {path!r} (from {os.getcwd()}). Pass one of "
      "experiments/configs/*.py, e.g. experiments/configs/resnet_digits.py:strategy=pairwise."
    )
  if isinstance(error, (AttributeError, KeyError)):
    return _unknown_field(error, argv)
  # A ValueError in get_config arrives with its whole traceback in the message: the first line
  # names the flag, the last the error.
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = f"{lines[0]} {lines[-1]}" if len(lines) > 1 else "".join(lines)
  return f"{text} (--helpshort lists the flags)"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for `app.run(..., flags_parser=parse_flags)`), every error one line.

  Raises:
    SystemExit: a flag absl cannot parse, an unknown --config.FIELD, a missing config file.
  """
  try:
    args = FLAGS(argv)
    FLAGS.config.get("family")  # ml_collections reports a missing file only on first use.
  except Exception as error:  # Any parse error ends in one line.
    raise SystemExit(_flag_error(error, argv)) from None
  return args


def main_for(family: str):
  """Returns an absl `main` that trains a config of `family` ("resnet" or "transformer")."""

  def main(argv):
    if len(argv) > 1:
      raise SystemExit(f"Unexpected arguments {argv[1:]}: use --config.FIELD=VALUE.")
    # TensorFlow is only the input pipeline: keep it off the accelerators JAX uses.
    import tensorflow as tf

    from ilbp import rundir, stop, trainer, workdir_lock

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
      raise SystemExit(
        f"{config_flags.get_config_filename(FLAGS['config'])} is a {config.family!r} config; "
        f"run it with `python -m experiments.{config.family}`."
      )
    logging.info(
      "JAX devices: %s (process %d of %d; %s)",
      jax.devices(),
      jax.process_index(),
      jax.process_count(),
      joined,
    )
    try:
      if FLAGS.measure_pipeline_only:
        measured = trainer.measure_pipeline(config, FLAGS.workdir)
        how = "measured" if measured["measured"] else "already there"
        print(f"Op costs {how}: {FLAGS.workdir}/pipeline_costs.json", flush=True)
        return
      trainer.train_and_evaluate(config, FLAGS.workdir)
    # Errors whose message is the whole story: no traceback.
    except (rundir.RunRefused, trainer.NonFiniteLossError, workdir_lock.WorkdirInUseError) as error:
      raise SystemExit(_one_line(error)) from None
    except stop.RunStopped as stopped:
      print(stopped, file=sys.stderr, flush=True)
      sys.exit(128 + stopped.signum)
    except KeyboardInterrupt:
      print(
        "Interrupted: stopped without a new checkpoint; re-run the same command to resume "
        "from the last one.",
        file=sys.stderr,
        flush=True,
      )
      sys.exit(128 + 2)  # As a shell reports SIGINT.

  return main
