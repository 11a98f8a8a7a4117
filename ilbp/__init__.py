"""ilbp: Interlocking Backpropagation (Gomez et al., JMLR 2022) in JAX/Flax.

The library has no flags (absl only for logging): import it from a notebook. Where things live:
  ilbp.strategy   Strategy values ("local", "pairwise", "<n>wise", "global")
  ilbp.interlock  per-stage primitives and backward_plan; interlocking_grads (the engine) and
                  interlocking_loss (the spec)
  ilbp.staged     StagedModel: Flax stage and head modules -> explicit per-stage functions
  ilbp.tasks      losses, targets and evaluation sums for classification and language modelling
  ilbp.state      TrainState (one StageState per stage), optimizers and schedules
  ilbp.execution  how a step runs: the Executor protocol and config (base), the per-stage layer
                  (stage), the fused, dataflow and spmd executors, the schedule and its Gantt
  ilbp.families   config -> model, data, task
  ilbp.trainer    train_and_evaluate(config, workdir): the loop behind the experiment binaries
  ilbp.checkpoint orbax checkpoints (damaged ones skipped) and the resume compatibility check
  ilbp.rundir     a workdir's metrics.jsonl, config.json and config history; refused runs
  ilbp.stop       Ctrl-C and SIGTERM (pre-emption): stop after a step, with a checkpoint
  ilbp.workdir_lock one live run per workdir
  ilbp.files      the two file helpers etils.epath lacks (is_url, write a file whole)
  ilbp.placement  device meshes and shardings
  ilbp.profiling  XLA FLOPs and memory of a jitted function
  ilbp.results    reading a run's metrics.jsonl (final evaluation, throughput)
  ilbp.models     resnet, transformer, conv, split (where to cut a network into stages)
  ilbp.data       images, text, tokenizers, prepare (TFDS, offline)
"""

from ilbp.interlock import interlocking_grads, interlocking_loss, loss_users
from ilbp.staged import StagedModel
from ilbp.strategy import Strategy, strategy

__all__ = [
  "StagedModel",
  "Strategy",
  "interlocking_grads",
  "interlocking_loss",
  "loss_users",
  "strategy",
]
