"""Which losses pull each stage which way: per-stage gradient alignment of a trained run.

Usage (from the repository root):

  .venv/bin/python -m scripts.gradient_alignment --workdir runs/quick/stdlib-pairwise-furthest-s0
  .venv/bin/python -m scripts.gradient_alignment --workdir RUN --step 50 --batches 8 --json_out F

For a run's checkpoint (its workdir: config.json and checkpoints/), on --batches training
batches from --data_step on, it computes for every stage k and every loss j ≥ k that can reach
it — its own head's L_k, the next head's L_{k+1}, …, the output loss L_K — the gradient
g_j = ∂L_j/∂θ_k (the exact total derivative through stages k+1..j, as the engine computes it
for a strategy of reach j−k+1 under the furthest rule), summed over the batches. It prints,
per stage, each g_j's norm and the cosine between every pair.

What it answers: under combine=furthest a stage is trained by one loss only, L_{t(k)} (pairwise:
the next head's); its own head L_k merely reads it. cos(g_k, g_{k+1}) says whether the next
head asks the stage for what its own head would; cos(g_{k+1}, g_K) whether it asks for what the
output would. Run it on checkpoints of different strategies to see how training under one rule
changes those directions.
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax.flatten_util import ravel_pytree

from ilbp import families, trainer
from ilbp.checkpoint import Checkpointer
from ilbp.execution.fused import FusedExecutor
from ilbp.execution.stage import microbatch_rng
from ilbp.strategy import Strategy

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory (config.json, checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_BATCHES = flags.DEFINE_integer("batches", 4, "Training batches the gradients are summed over.")
_DATA_STEP = flags.DEFINE_integer("data_step", 100_000, "Index of the first training batch.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the numbers as JSON.")


def _flat(tree) -> jax.Array:
  return ravel_pytree(tree)[0].astype(jnp.float32)


def alignment(workdir: str, step: int | None, batches: int, data_step: int) -> dict:
  """Per stage: the norm of ∂L_j/∂θ_k for every j ≥ k, and their pairwise cosines.

  Returns:
    {"step": checkpoint step, "strategy": the run's, "stages": [{"losses": [j...],
    "norms": {j: ...}, "cosines": {"j,j'": ...}} for k = 1..K]} (1-based names).
  """
  config = ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))
  config.execution.kind, config.execution.microbatches = "fused", 1
  families.check_workdir(config, workdir)
  built = families.build(config, workdir)
  model, task, K = built.model, built.task, built.model.num_stages
  tx, _ = trainer.make_optimizer(config)
  fused = FusedExecutor(model, task, Strategy(1), tx, None, built.input_spec)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"{workdir}/checkpoints holds no checkpoint; train the run first.")
  rng = jax.random.PRNGKey(config.seed)
  st = ckpt.restore(step, fused.state_target(rng))
  ckpt.close()

  @jax.jit
  def per_reach(params, model_state, inputs, targets, rng):
    """Stage k's gradient from L_{min(k+n-1, K)} for every reach n = 1..K (furthest rule)."""
    out = []
    for n in range(1, K + 1):
      grads, _, _ = model.gradients(
        params, model_state, inputs, targets, loss_fn=task.loss,
        strategy=Strategy(n, "furthest"), rng=rng,
      )  # fmt: skip
      out.append([_flat(g["stage"]) for g in grads])
    return out

  sums = None
  for i, batch in enumerate(itertools.islice(built.data.train_batches(data_step), batches)):
    batch = fused.put_batch(batch)
    g = per_reach(
      st.params, st.model_state, task.inputs(batch), task.targets(batch),
      microbatch_rng(st.rng, data_step + i, 0),
    )  # fmt: skip
    sums = g if sums is None else jax.tree.map(jnp.add, sums, g)
  sums = jax.device_get(sums)
  stages = []
  for k in range(K):
    # Reach n gives loss j = min(k + n, K) (0-based k, 1-based j); keep each j once.
    by_loss = {}
    for n in range(1, K + 1):
      by_loss.setdefault(min(k + n, K), np.asarray(sums[n - 1][k], np.float64))
    norms = {j: float(np.linalg.norm(v)) for j, v in by_loss.items()}
    cosines = {
      f"{a},{b}": float(by_loss[a] @ by_loss[b] / max(norms[a] * norms[b], 1e-30))
      for a, b in itertools.combinations(sorted(by_loss), 2)
    }
    stages.append({"losses": sorted(by_loss), "norms": norms, "cosines": cosines})
  return {
    "workdir": workdir,
    "step": int(step),
    "strategy": f"{config.strategy}/{config.get('combine', 'furthest')}",
    "stages": stages,
  }


def render(result: dict) -> str:
  """A plain-text table of `alignment`'s numbers."""
  lines = [
    f"{result['workdir']} @ step {result['step']} ({result['strategy']}): stage k's gradient "
    "from loss L_j, norm and cosines"
  ]
  for k, s in enumerate(result["stages"], start=1):
    norms = "  ".join(f"|g{j}|={s['norms'][j]:.3g}" for j in s["losses"])
    cos = "  ".join(f"cos(g{p.replace(',', ',g')})={c:+.3f}" for p, c in s["cosines"].items())
    lines.append(f"stage {k}: {norms}" + (f"  | {cos}" if cos else ""))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO.
  result = alignment(_WORKDIR.value, _STEP.value, _BATCHES.value, _DATA_STEP.value)
  print(render(result))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
