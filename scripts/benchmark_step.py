"""Cost of one interlocking training step relative to plain backprop, measured in one run.

Usage (from the repository root):

  .venv/bin/python -m scripts.benchmark_step                       # resnet20, batch 32, K=4
  .venv/bin/python -m scripts.benchmark_step \
      --config=experiments/configs/benchmark.py:family=transformer,stages=4
  .venv/bin/python -m scripts.benchmark_step --config.model.name=resnet56 \
      --config.batch_size=128 --config.num_stages=8 --config.combine=sum \
      --strategies=local,pairwise,3wise,global --json_out=/tmp/step.json
  .venv/bin/python -m scripts.benchmark_step --config.model.name=resnet34_cifar \
      --convs=xla,auto                    # the same rows with XLA's and the explicit conv VJPs

The model, batch, stage count, combine rule, compute dtype and optimizer come from --config (an
experiment config and `--config.FIELD=VALUE` overrides, as the experiment binaries take them;
default `experiments/configs/benchmark.py:head=conv,stages=4,batch=32`); --strategies and
--convs are what it compares.

Inputs are random batches of the config's shapes (`ilbp.families.build_synthetic`; the cost of
a step does not depend on the values). Every row is compiled and timed in this process against
the baseline: plain end-to-end backprop (`ilbp.interlock.backprop_grads`, heads trained on
detached activations), compiled the same way, with the same model, batch, RNG and optimizer.

Columns:
  strategy    the strategy's name (`backprop` is the baseline itself).
  conv        (with several --convs) the convolution implementation (`ilbp.models.conv`).
  GFLOP       XLA cost analysis of the jitted gradient computation (`StagedModel.gradients`:
              the engine `interlocking_grads`; for the baseline, `backprop_grads`).
  FLOPs/bp    GFLOP divided by the baseline's.
  spec/bp     the same for `jax.grad` of the stop_gradient spec `interlocking_loss`: what a
              naive implementation would cost, i.e. what the engine saves.
  temp MiB    XLA's compiled temporary memory (`memory_analysis().temp_size_in_bytes`) of the
              engine's gradient computation (spec MiB: of the spec's).
  step ms     median wall time of one full jitted train step (`fused.make_train_step`:
              gradients + optimizer update, state donated), blocking on the results, over
              --repeats steps after --warmup steps. Rows are timed round-robin (one step of
              every row, then the next round) so drift on a shared machine hits all alike.
  IQR ms      interquartile range of those step times.
  time/bp     step ms divided by the baseline's step ms.
  fwd ms      median wall time of one jitted training-mode forward pass of every stage and
              head (`StagedModel.apply(train=True)`: BatchNorm batch statistics, dropout on),
              timed in the same round-robin as the steps (one per conv implementation; JSON
              `forward_ms`).
  step/fwd    step ms divided by fwd ms: what a step costs in forward passes. A framework whose
              backward is efficient lands near 3 (backward ≈ 2 forwards).

The baseline step is `fused.make_train_step(..., gradients="backprop")`: the same step with the
backprop gradients (`StagedModel.gradients(method="backprop")`); its metrics lack the per-head
loss/accuracy values (a few reductions).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from ilbp import families, files, timing, trainer
from ilbp import state as train_state
from ilbp.execution import fused
from ilbp.models import conv as conv_lib
from ilbp.profiling import compiled_cost
from ilbp.staged import StagedModel
from ilbp.strategy import Strategy
from ilbp.strategy import strategy as parse_strategy

DEFAULT_CONFIG = "experiments/configs/benchmark.py:head=conv,stages=4,batch=32"
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  DEFAULT_CONFIG,
  "Experiment config: model, batch, stages, combine rule, dtype, optimizer, seed.",
  lock_config=True,
)
_CONVS = flags.DEFINE_list(
  "convs",
  ["auto"],
  "ResNet convolution implementations to compare in one run (ilbp.models.conv: auto, xla, "
  "explicit); the first one's backprop row is the baseline of every time/bp.",
)
_STRATEGIES = flags.DEFINE_list(
  "strategies", ["local", "pairwise", "3wise", "global"], "Strategies to compare."
)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps per row.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per row first (compilation included).")
_SPEC = flags.DEFINE_bool("spec", True, "Also compile the stop_gradient spec (spec/bp column).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the rows as a JSON list.")

_MIB = 2**20


def build(config, conv: str | None = None) -> tuple[families.Built, dict]:
  """The config's model (with `conv` as its convolution implementation, for a ResNet) and one
  random batch of its shapes, on the default device.

  Returns:
    (what `families.build_synthetic` built, batch).
  """
  if conv is not None:
    config = copy.deepcopy(config)
    config.model.conv = conv
  built = families.build_synthetic(config)
  return built, jax.device_put(next(built.data.train_batches(0)))


def grads_fn(model: StagedModel, task: Any, strategy: Strategy, method: str) -> Callable:
  """`fn(params, state, batch, rng)`: the gradients as the train step computes them, by
  `method` ("engine", "spec" or the "backprop" baseline; `StagedModel.gradients`)."""
  return lambda params, state, batch, rng: model.gradients(
    params,
    state,
    task.inputs(batch),
    task.targets(batch),
    loss_fn=task.loss,
    strategy=strategy,
    method=method,
    rng=rng,
  )


def forward_flops(model: StagedModel, params, state, inputs) -> tuple[float, float]:
  """XLA FLOPs of one inference forward pass: (stages only, auxiliary heads only).

  Shows how much of a step the heads are: with K-1 heads, a head that is large next to a stage
  (e.g. a conv head on a narrow ResNet, or a d x vocab readout on a small LM) dominates.
  """
  stage_fns, _ = model.stage_fns(state, train=False)

  def stages_only(params, inputs):
    a = inputs
    for f, p in zip(stage_fns, params):
      a = f(p["stage"], a)[0]
    return a

  def everything(params, inputs):
    return model.apply(params, state, inputs, train=False)[0]

  stages = compiled_cost(stages_only, params, inputs)["flops"]
  return stages, compiled_cost(everything, params, inputs)["flops"] - stages


def forward_step(model: StagedModel, task: Any) -> Callable:
  """`step(state, batch) -> (state, logits)`: the training-mode forward of every stage and
  head, jitted, with the state passed through unchanged (the `forward_ms` row)."""
  forward = jax.jit(
    lambda st, batch: model.apply(
      st.params, st.model_state, task.inputs(batch), train=True, rng=st.rng
    )
  )
  return lambda st, batch: (st, forward(st, batch))


def time_steps(steps: dict[str, Callable], states: dict, batch: dict) -> dict[str, list[float]]:
  """Runs every jitted step --warmup times, then --repeats rounds of one step each, timed.

  Args:
    steps: row name -> jitted `step(state, batch) -> (state, outputs)` (train steps donate
      their state).
    states: row name -> initial TrainState (consumed).
    batch: the batch fed to every step.

  Returns:
    row name -> list of --repeats wall times in seconds.
  """
  for name, step in steps.items():
    for _ in range(_WARMUP.value):
      states[name], _ = timing.timed_ms(lambda step=step, name=name: step(states[name], batch))[0]
  times = {name: [] for name in steps}
  for _ in range(_REPEATS.value):
    for name, step in steps.items():
      (states[name], _), ms = timing.timed_ms(
        lambda step=step, name=name: step(states[name], batch)
      )
      times[name].append(ms / 1e3)
  return times


def fmt(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], show_conv: bool = False) -> None:
  """Prints the rows as an aligned text table (with a conv column if `show_conv`)."""
  columns = [
    ("strategy", "strategy", "s"),
    *([("conv", "conv", "s")] if show_conv else []),
    ("GFLOP", "gflop", ".3f"),
    ("FLOPs/bp", "flops_ratio", ".3f"),
    ("spec/bp", "spec_flops_ratio", ".3f"),
    ("temp MiB", "temp_mib", ".1f"),
    ("spec MiB", "spec_temp_mib", ".1f"),
    ("step ms", "step_ms", ".2f"),
    ("IQR ms", "step_iqr_ms", ".2f"),
    ("time/bp", "time_ratio", ".3f"),
    ("fwd ms", "forward_ms", ".2f"),
    ("step/fwd", "step_per_forward", ".2f"),
  ]
  cells = [[title for title, _, _ in columns]]
  cells += [[fmt(row[key], spec) for _, key, spec in columns] for row in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  for i, line in enumerate(cells):
    first = line[0].ljust(widths[0])
    print("  ".join([first] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]))
    if i == 0:
      print("  ".join("-" * w for w in widths))


def main(argv: list[str]) -> None:
  """Builds the model, measures every row and prints (and optionally saves) the table."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; use --config.FIELD=VALUE.")
  config = _CONFIG.value
  wall_start = time.perf_counter()
  rng = jax.random.PRNGKey(config.seed)
  convs = [conv_lib.check_impl(c, "--convs") for c in _CONVS.value] or ["auto"]
  if config.family != "resnet":
    convs = [None]  # no convolutions
  optimizer, _ = trainer.make_optimizer(config)
  # One model (and initial state) per convolution implementation; the same parameters.
  variants = {}
  for conv in convs:
    built, batch = build(config, conv)
    state = train_state.create_train_state(built.model, optimizer, rng, built.input_spec)
    variants[conv] = (built.model, state)
  task, desc = built.task, families.describe(config, built)
  model, state = variants[convs[0]]
  params, model_state, step_rng = state.params, state.model_state, state.rng
  k = model.num_stages
  device = jax.devices()[0]

  print(f"{timing.machine()} (the step runs on one device)")
  print(f"model: {desc}")
  print(
    f"batch {config.batch_size} | K={k} stages | combine={config.combine} | optimizer "
    f"{config.optimizer.name} | dtype {config.model.dtype} | {_WARMUP.value} warm-up + "
    f"{_REPEATS.value} timed steps per row"
    + (f" | convs {', '.join(convs)}" if convs != [None] else "")
  )

  fwd_stages, fwd_heads = forward_flops(model, params, model_state, task.inputs(batch))
  print(
    f"forward GFLOP per batch (XLA): stages {fwd_stages / 1e9:.4g}, {k - 1} aux heads "
    f"{fwd_heads / 1e9:.4g} ({fwd_heads / fwd_stages:.3g}x the stages)"
  )

  strategies = {name: parse_strategy(name, config.combine) for name in _STRATEGIES.value}
  # Row -> (conv, strategy, gradient method): the baseline is the same model and train step
  # with the end-to-end backprop gradients (and the first --convs implementation).
  rows_spec = {}
  for conv in convs:
    suffix = f"/{conv}" if len(convs) > 1 else ""
    rows_spec[f"backprop{suffix}"] = (conv, Strategy(None, config.combine), "backprop")
    rows_spec.update({f"{s.name}{suffix}": (conv, s, "engine") for s in strategies.values()})
  base = next(iter(rows_spec))

  costs, spec_costs = {}, {}
  for name, (conv, strat, method) in rows_spec.items():
    m = variants[conv][0]
    costs[name] = compiled_cost(
      grads_fn(m, task, strat, method), params, model_state, batch, step_rng
    )
    if method != "backprop" and _SPEC.value:
      spec = grads_fn(m, task, strat, "spec")
      spec_costs[name] = compiled_cost(spec, params, model_state, batch, step_rng)
  compile_done = time.perf_counter()

  jitted, states = {}, {}
  for name, (conv, strat, method) in rows_spec.items():
    m, st = variants[conv]
    step = fused.make_train_step(m, task, strat, optimizer, gradients=method)
    jitted[name] = jax.jit(step, donate_argnums=0)
    states[name] = jax.tree.map(jnp.copy, st)
  for conv, (m, st) in variants.items():
    jitted[f"forward/{conv}"] = forward_step(m, task)
    states[f"forward/{conv}"] = st
  times = time_steps(jitted, states, batch)
  forward_ms = {conv: 1e3 * statistics.median(times[f"forward/{conv}"]) for conv in convs}

  base_flops = costs[base]["flops"]
  base_ms = 1e3 * statistics.median(times[base])
  rows = []
  for name, (conv, strat, method) in rows_spec.items():
    ms = [1e3 * t for t in times[name]]
    spec = spec_costs.get(name)
    rows.append(
      {
        "strategy": name.split("/")[0],
        "conv": conv,
        "reach": strat.reach_for(k),
        "combine": None if method == "backprop" else strat.combine,
        "gflop": costs[name]["flops"] / 1e9,
        "flops_ratio": costs[name]["flops"] / base_flops,
        "spec_flops_ratio": spec["flops"] / base_flops if spec else None,
        "temp_mib": costs[name]["temp_bytes"] / _MIB,
        "spec_temp_mib": spec["temp_bytes"] / _MIB if spec else None,
        "step_ms": statistics.median(ms),
        "step_iqr_ms": timing.iqr(ms),
        "step_min_ms": min(ms),
        "time_ratio": statistics.median(ms) / base_ms,
        "forward_ms": forward_ms[conv],
        "step_per_forward": statistics.median(ms) / forward_ms[conv],
        "step_ms_all": ms,
        "model": config.model.get("name", config.family),
        "description": desc,
        "batch": config.batch_size,
        "stages": k,
        "dtype": config.model.dtype,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "forward_gflop_stages": fwd_stages / 1e9,
        "forward_gflop_heads": fwd_heads / 1e9,
      }
    )
  print()
  for conv in convs:
    fwd = [1e3 * t for t in times[f"forward/{conv}"]]
    print(
      f"forward (training mode, all stages and heads{f', conv={conv}' if conv else ''}): "
      f"{forward_ms[conv]:.2f} ms median, IQR {timing.iqr(fwd):.2f} ms"
    )
  print()
  print_table(rows, show_conv=len(convs) > 1)
  total = time.perf_counter() - wall_start
  print(f"\ncompile (cost analysis) {compile_done - wall_start:.1f} s, total {total:.1f} s")
  if _JSON_OUT.value:
    files.write_text(_JSON_OUT.value, json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} rows to {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
