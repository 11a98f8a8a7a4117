"""The SPMD executor against the fused one over the full cross product; prints a pass/fail table.

Usage (from the repository root; 8 forced CPU devices are set up here when none are given):

  .venv/bin/python -m scripts.check_spmd                          # everything (~80 programs)
  .venv/bin/python -m scripts.check_spmd --models=transformer --stages=4 --data_parallel=2

The two models are experiment configs, each with `--X_config.FIELD=VALUE` overrides as the
experiment binaries take them: --resnet_config (default resnet_digits.py's `runlocal` variant
with conv heads: resnet_tiny, batch 64, 8x8 inputs) and --transformer_config (default
transformer_stdlib.py's `runlocal` variant: 4 layers, d_model 32, dropout 0.1, batch 8),
each fed one random batch of its shapes (`ilbp.families.build_synthetic`); --models picks
which run. The config's K is replaced by each of --stages.

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

The ResNet computes in float64 by default (`--float64`, which sets its config's model.dtype;
parameters and statistics stay float32). In float32, reduction-order rounding flips the ReLUs
of near-zero pre-activations in resnet_tiny's conv heads and moves a channel's gradient by up to
1e-1 of its tensor within 3 steps — fused on 1 vs 2 devices differs that much — so no 1e-5
check decides anything; in float64 every case of the grid equals fused (2026-11-26: 78 of 78,
then with 16 8x8x3 images and hand-picked splits).
"""

from __future__ import annotations

import copy
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import ilbp
from ilbp import families, interlock, placement, state
from ilbp.execution import dataflow
from ilbp.execution.fused import FusedExecutor
from ilbp.execution.spmd.executor import SpmdExecutor

_CONFIGS = {
  "resnet": config_flags.DEFINE_config_file(
    "resnet_config",
    "experiments/configs/resnet_digits.py:runlocal=1,head=conv",
    "The ResNet's experiment config (--models=resnet).",
    lock_config=True,
  ),
  "transformer": config_flags.DEFINE_config_file(
    "transformer_config",
    "experiments/configs/transformer_stdlib.py:runlocal=1",
    "The Transformer's experiment config (--models=transformer).",
    lock_config=True,
  ),
}
_MODELS = flags.DEFINE_list("models", ["resnet", "transformer"], "resnet and/or transformer.")
_STAGES = flags.DEFINE_list("stages", ["2", "4"], "Stage counts K.")
_DATA = flags.DEFINE_list("data_parallel", ["1", "2"], "Devices per stage D.")
_PER_CALL = flags.DEFINE_list("steps_per_call", ["1", "3"], "Optimizer steps per call.")
_MICRO = flags.DEFINE_list("microbatches", ["4"], "Microbatch counts M.")
_STRATEGIES = flags.DEFINE_list(
  "strategies", ["local", "pairwise", "3wise", "global"], "Strategies."
)
_COMBINES = flags.DEFINE_list("combines", ["furthest", "sum"], "Combine rules.")
_FLOAT64 = flags.DEFINE_bool(
  "float64",
  True,
  "Compute the ResNet in float64 (parameters and statistics stay float32; see the module doc).",
)


def problem(name: str, K: int):
  """(built, batch, (optimizer, schedule)) of model `name`'s config at K stages."""
  config = copy.deepcopy(_CONFIGS[name].value)
  config.num_stages = K
  if name == "resnet" and _FLOAT64.value:
    config.model.dtype = "float64"
  built = families.build_synthetic(config)
  # SGD whatever the config says: a conv bias before BatchNorm, or an attention key bias, has an
  # exactly-zero gradient, whose float noise Adam would normalise into full-size steps.
  opt = state.make_optimizer(name="sgd", learning_rate=0.05, total_steps=10, weight_decay=1e-4)
  return built, next(built.data.train_batches(0)), opt


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


def run_case(built, batch, opt, M, strat, D, S) -> tuple[float, bool, float, bool, float]:
  """3 steps on spmd, fused and dataflow -> (max rel err vs fused, pass vs fused, max rel err
  vs dataflow, pass vs dataflow, seconds)."""
  start = time.perf_counter()
  args = (built.model, built.task, strat, *opt, built.input_spec)
  fused = FusedExecutor(*args, microbatches=M, devices=jax.devices()[:D])
  ex = SpmdExecutor(*args, microbatches=M, data_parallel=D, steps_per_call=S)
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
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; use --resnet_config.FIELD=VALUE.")
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
              built, batch, opt = problem(name, K)
              for M in map(int, _MICRO.value):
                err, ok, ferr, fok, secs = run_case(built, batch, opt, M, strat, D, S)
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
