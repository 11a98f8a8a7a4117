"""The SPMD executor against the fused one over the full cross product; prints a pass/fail table.

Usage (from the repository root; 8 forced CPU devices are set up here when none are given):

  .venv/bin/python -m scripts.check_spmd                          # everything (~80 programs)
  .venv/bin/python -m scripts.check_spmd --models=transformer --stages=4 --data_parallel=2

Every (model, K, D, steps per call, strategy, combine rule) runs 3 optimizer steps with M
microbatches on the SPMD executor and on the fused executor over the same D devices (the same
split of each microbatch), and compares parameters, BatchNorm statistics and optimizer states.
Strategies whose backward plan is the same at that K (at K = 2, pairwise and 3wise are global)
run once. `vs fused` is the largest |spmd - fused| of any tensor over that tensor's largest
|element| (at least 1e-2, so that exactly-zero gradients' float noise is not divided by zero);
`pass` is tests/test_spmd.py's criterion: 1e-5 relative per element or to that largest element.
Each case also runs the dataflow executor (the same per-stage ops, one program each) and
compares spmd with it (`vs dataflow`): `= dataflow` marks a case that misses fused's 1e-5 but
equals dataflow's result (both pipelines round differently from the one fused program), not an
spmd error. Only `FAIL` fails the script.

The ResNet computes in float64 by default (`--float64`; parameters and statistics stay
float32). In float32, reduction-order rounding flips the ReLUs of near-zero pre-activations in
resnet_tiny's conv heads and moves a channel's gradient by up to 1e-1 of its tensor within 3
steps — fused on 1 vs 2 devices differs that much — so no 1e-5 check decides anything; in
float64 every case of the grid equals fused (WORKSPACE.md, 2026-11-26: 78 of 78).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import ilbp
from ilbp import executor, interlock, placement, state
from ilbp.models import resnet, transformer
from ilbp.pipeline import dataflow, spmd
from ilbp.tasks import Classification, LanguageModeling

_MODELS = flags.DEFINE_list("models", ["resnet", "transformer"], "resnet and/or transformer.")
_STAGES = flags.DEFINE_list("stages", ["2", "4"], "Stage counts K.")
_DATA = flags.DEFINE_list("data_parallel", ["1", "2"], "Devices per stage D.")
_PER_CALL = flags.DEFINE_list("steps_per_call", ["1", "3"], "Optimizer steps per call.")
_STRATEGIES = flags.DEFINE_list(
  "strategies", ["local", "pairwise", "3wise", "global"], "Strategies."
)
_COMBINES = flags.DEFINE_list("combines", ["furthest", "sum"], "Combine rules.")
_FLOAT64 = flags.DEFINE_bool(
  "float64",
  True,
  "Compute the ResNet in float64 (parameters and statistics stay float32; see the module doc).",
)
_SPLITS = {2: (3, 2), 4: (2, 1, 1, 1)}  # resnet_tiny's 5 blocks per stage.


def problem(name: str, K: int, rng: np.random.Generator):
  """(model, task, batch, input spec, M) of a tiny model."""
  if name == "resnet":
    dtype = jnp.float64 if _FLOAT64.value else jnp.float32
    model = resnet.make_model(
      "resnet_tiny", num_classes=10, num_stages=K, split=_SPLITS[K], head="conv",
      input_shape=(8, 8, 3), dtype=dtype,
    )  # fmt: skip
    batch = {
      "image": rng.normal(size=(16, 8, 8, 3)).astype(dtype),
      "label": rng.integers(0, 10, size=16).astype(np.int32),
    }
    return model, Classification(), batch, jax.ShapeDtypeStruct((1, 8, 8, 3), dtype), 4
  model = transformer.make_model(
    vocab_size=37, num_layers=4, num_stages=K, d_model=16, num_heads=2, d_ff=32, max_len=12,
    dropout_rate=0.1,
  )  # fmt: skip
  tokens = rng.integers(0, 37, size=(8, 13)).astype(np.int32)
  batch = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": (rng.random((8, 12)) > 0.1).astype(np.float32),
  }
  return model, LanguageModeling(), batch, jax.ShapeDtypeStruct((1, 12), jnp.int32), 2


def compare(reference, candidate) -> tuple[float, bool]:
  """(max error relative to each tensor's largest element, whether every tensor passes)."""
  worst, ok = 0.0, True
  for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(candidate), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not x.size:
      continue
    scale = float(np.max(np.abs(x)))
    err = np.abs(x - y)
    worst = max(worst, float(np.max(err)) / max(scale, 1e-2))
    ok &= bool(np.all(err <= 1e-5 * np.abs(x) + max(1e-5 * scale, 1e-7)))
  return worst, ok


def run_case(model, task, batch, spec, M, strat, D, S) -> tuple[float, bool, float, bool, float]:
  """3 steps on spmd, fused and dataflow -> (max rel err vs fused, pass vs fused, max rel err
  vs dataflow, pass vs dataflow, seconds)."""
  start = time.perf_counter()
  tx, sched = state.make_optimizer(
    name="sgd", learning_rate=0.05, total_steps=10, weight_decay=1e-4
  )
  args = (model, task, strat, tx, sched, spec)
  fused = executor.FusedExecutor(*args, microbatches=M, devices=jax.devices()[:D])
  ex = spmd.SpmdExecutor(*args, microbatches=M, data_parallel=D, steps_per_call=S)
  rng = jax.random.PRNGKey(1)
  a, b = fused.init_state(rng), ex.init_state(rng)
  for _ in range(3):
    a, _ = fused.train_step(a, fused.put_batch(batch))
  if S == 1:
    for _ in range(3):
      b, _ = ex.train_step(b, ex.put_batch(batch))
  else:
    for _ in range(3 // S):
      b, _ = ex.train_steps(b, ex.put_batches([batch] * S))
  flow = dataflow.DataflowExecutor(*args, microbatches=M, continuous=True, data_parallel=D)
  c = flow.init_state(rng)
  for _ in range(3):
    c, _ = flow.train_step(c, flow.put_batch(batch))
  got = jax.device_get(ex.unpack_state(b))
  err, ok = compare(jax.device_get(a), got)
  flow_err, flow_ok = compare(jax.device_get(c), got)
  return err, ok, flow_err, flow_ok, time.perf_counter() - start


def main(argv):
  del argv
  placement.force_cpu_devices(8)  # K = 4 stages x D = 2.
  if _FLOAT64.value:
    jax.config.update("jax_enable_x64", True)
  rows, seen = [], set()
  for name in _MODELS.value:
    for K in map(int, _STAGES.value):
      for D in map(int, _DATA.value):
        for S in map(int, _PER_CALL.value):
          for strategy in _STRATEGIES.value:
            for combine in _COMBINES.value:
              strat = ilbp.strategy(strategy, combine)
              plan = str(interlock.backward_plan(strat, K))
              if (name, K, D, S, plan) in seen:
                continue
              seen.add((name, K, D, S, plan))
              model, task, batch, spec, M = problem(name, K, np.random.default_rng(0))
              err, ok, ferr, fok, secs = run_case(model, task, batch, spec, M, strat, D, S)
              result = "pass" if ok else ("= dataflow" if fok else "FAIL")
              row = (name, K, D, S, M, strategy, combine, err, ferr, result, secs)
              rows.append(row)
              print(
                "  ".join(str(v) if not isinstance(v, float) else f"{v:.2e}" for v in row[:-1])
                + f"  ({secs:.0f} s)",
                flush=True,
              )
  header = (
    "model", "K", "D", "steps/call", "M", "strategy", "combine", "vs fused", "vs dataflow",
    "result",
  )  # fmt: skip
  print("\n| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    cells = [f"{v:.1e}" if isinstance(v, float) else str(v) for v in row[:-1]]
    print("| " + " | ".join(cells) + " |")
  failed = sum(r[9] == "FAIL" for r in rows)
  same = sum(r[9] == "= dataflow" for r in rows)
  print(
    f"\n{len(rows) - failed - same}/{len(rows)} equal fused; {same} differ from fused but equal "
    f"the dataflow executor; {failed} fail; {sum(r[10] for r in rows):.0f} s in all."
  )
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
