"""ilbp: Interlocking Backpropagation (Gomez et al., JMLR 2022) in JAX/Flax.

The library has no flags and no absl: import it from a notebook. Where things live:
  ilbp.strategy   Strategy values ("local", "pairwise", "<n>wise", "global")
  ilbp.interlock  interlocking_grads (the engine) and interlocking_loss (the spec)
  ilbp.staged     StagedModel: Flax stage and head modules -> the pure functions above
  ilbp.tasks      losses and evaluation sums for classification and language modelling
  ilbp.train      TrainState, optimizers, train_step / eval_step
  ilbp.trainer    train_and_evaluate(config, workdir): the loop behind the experiment binaries
  ilbp.checkpoint orbax checkpoints and the resume compatibility check
  ilbp.placement  device meshes and shardings
  ilbp.profiling  XLA FLOPs and memory of a jitted function
  ilbp.models     resnet, transformer;  ilbp.data: images, text
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
