"""Time per optimizer step of pipelined interlocking training, measured and predicted.

Usage (from the repository root; on CPU, one forced device per stage unless JAX_NUM_CPU_DEVICES
or XLA_FLAGS names a device count):

  .venv/bin/python -m scripts.benchmark_pipeline                 # resnet20, K=2, M=8, batch 64
  .venv/bin/python -m scripts.benchmark_pipeline --stages=4 --strategies=local,pairwise,global \
      --executors=dataflow,fused --json_out=/tmp/pipe.json --gantt_dir=/tmp/gantt
  .venv/bin/python -m scripts.benchmark_pipeline --stages=2 --microbatches=1,4,8 \
      --config.model.head=conv --config.model.split=balanced_heads
  .venv/bin/python -m scripts.benchmark_pipeline \
      --config=experiments/configs/benchmark.py:family=transformer
  .venv/bin/python -m scripts.benchmark_pipeline --stages=4 --strategies=pairwise,global \
      --combines=furthest,sum --schedules=1f1b,zb

The model, its split, the batch and the optimizer come from --config (an experiment config and
`--config.FIELD=VALUE` overrides, as the experiment binaries take them; default
`experiments/configs/benchmark.py`), fed random batches of the config's shapes
(`ilbp.families.build_synthetic`). What this benchmark sweeps are its own flags: --stages and
--microbatches (default: the config's K and M), --strategies, --combines (combine rules:
furthest, sum; default the config's), --schedules (pipeline schedules: gpipe, 1f1b, zb; a row
only where the schedule applies to the strategy, `schedule.applies`), --executors and --modes
(and --spmd_remat). Every (K, M) is timed, measured and predicted on its own, one
after the other.

Rows: every (strategy, combine rule) on every executor, where its backward plan differs from
every earlier one's (`interlock.plan_variants`, as the suites choose their runs): local runs
under one rule, and a strategy that reaches every stage is global (pairwise at K = 2). On
`dataflow` and `spmd`, a strategy of reach < K runs `continuous` (no flush between steps) and
`flushed`; global runs flushed — its semantics force the flush — as a one-forward-one-backward
pipeline (dispatched without a host wait: its own dependencies flush it). That global row
(under the furthest rule, plain backprop, where it ran) is the baseline every row on the same
executor is divided by (`vs global`). `fused` runs the whole network as one program on one
device (no pipelining, the same M microbatches): a second, unpipelined reference.
`spmd` runs one program over a ('stage', 'data') mesh; a call runs --spmd_steps_per_call
steps (continuous within a call), and its rows add the compiled program's memory per device
(`memory_analysis`: arguments + outputs + temporaries - aliased) and the padding its flat
buffers carry per device (the widest stage's state and stored-input slots, `padding`). Its B
ops read the residuals their forward stored, or with --spmd_remat re-run the forward.
Every row carries the executor's memory plan per stage (`ilbp.execution.memory`: state with
gradient sums, its padding, in-flight activations; JSON `held_bytes_per_stage` and the rest);
`held MB/dev` is the fullest device's state plus in-flight activations.

Measured: `ms/step` is the median over --chunks of (wall time of --steps_per_chunk consecutive
steps, blocking only at the end) / steps_per_chunk, after a warm-up chunk; rows are timed
round-robin, one chunk each per round, so drift on a shared machine hits all rows alike.
Predicted (dataflow): the cost model `schedule.predict_step` with op costs measured here after
each round of timed chunks, each program timed alone (`DataflowExecutor.measure`, once per
strategy, combine rule and round, medians pooled over rounds and strategies), the boundary as
latency + bytes / bandwidth, and the shared-core slowdown measured on its own (not fitted to
any row): per count n of busy stages, the first n stages' forwards at once against alone, so a
stretch where 2 of 4 stages overlap is stretched as 2 busy stages are, not as 4. Interleaved
with the rounds, the calibration sees the same drift on a shared machine as the rows, but
times no training step: the rows it predicts are apart from it. `in-flight` is the most
microbatches whose residuals a stage holds at once in that simulation.
zb (dataflow and spmd): which microbatches' merged VJP calls are split depends on the model's
costs, so after the warm-up one calibration (pooled the same way) chooses each zb row's
split, the one those costs predict fastest (`DataflowExecutor.use_costs`, as `predict_step`
chooses it), and the row is timed and predicted with that split (JSON `zb_split`: per stage,
the first microbatch split; M: none).
Predicted (spmd): the same measured op costs (pooled from the dataflow rows, so run both) in
the lock-step tick model (`ticks.predict_time`: each tick as long as its slowest stage's work,
a B group and an F group of another microbatch side by side in the steady state; under
--spmd_remat a B op that waits for a cotangent from above pays a recomputed forward).

On CPU, forced devices share the machine's cores: time K = 2 on a 2-core box, and compare
larger K with the prediction.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from ilbp import families, files, placement, timing, trainer
from ilbp.execution import dataflow, fused, gantt, memory
from ilbp.execution import schedule as schedule_lib
from ilbp.execution.spmd import ticks
from ilbp.execution.spmd.executor import SpmdExecutor
from ilbp.interlock import plan_variants
from ilbp.strategy import COMBINE_RULES
from ilbp.strategy import strategy as parse_strategy

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  "experiments/configs/benchmark.py",
  "Experiment config: model, split, batch, combine rule, optimizer, seed.",
  lock_config=True,
)
_STAGES = flags.DEFINE_list("stages", None, "Stage counts K (one device each); default: config's.")
_MICRO = flags.DEFINE_list(
  "microbatches", None, "Microbatch counts M per optimizer step; default: config's."
)
_STRATEGIES = flags.DEFINE_list("strategies", ["local", "pairwise", "global"], "Strategies.")
_COMBINES = flags.DEFINE_list(
  "combines",
  None,
  "Combine rules (furthest, sum); default: the config's. A (strategy, rule) gets a row only "
  "where its backward plan differs from every earlier one's (`interlock.plan_variants`).",
)
_EXECUTORS = flags.DEFINE_list("executors", ["dataflow"], "dataflow, spmd and/or fused.")
_SPMD_PER_CALL = flags.DEFINE_integer(
  "spmd_steps_per_call", 8, "spmd: optimizer steps per call (divides --steps_per_chunk)."
)
_SCHEDULES = flags.DEFINE_list(
  "schedules",
  ["1f1b"],
  "Pipeline schedules (gpipe, 1f1b, zb); a row only where the schedule applies to the strategy "
  "(`schedule.applies`).",
)
_SPMD_REMAT = flags.DEFINE_bool(
  "spmd_remat", False, "spmd: B ops re-run the forward instead of reading stored residuals."
)
_MODES = flags.DEFINE_list(
  "modes", ["continuous", "flushed"], "Dataflow modes for reach < K (global is always flushed)."
)
_STEPS = flags.DEFINE_integer("steps_per_chunk", 8, "Steps timed together (one block at the end).")
_CHUNKS = flags.DEFINE_integer("chunks", 5, "Timed chunks per row (median reported).")
_REPEATS = flags.DEFINE_integer(
  "op_repeats", 5, "Repeats per op in each round's calibration of the op costs."
)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the rows as a JSON list.")
_GANTT_DIR = flags.DEFINE_string("gantt_dir", None, "Write the predicted Gantt PNG of each row.")


def counts(values: list[str] | None, default: int, flag: str) -> list[int]:
  """A list flag of positive integers, or [default] when it is not given."""
  try:
    out = [int(v) for v in values] if values else [default]
  except ValueError as e:
    raise ValueError(f"--{flag}={','.join(values)}: give whole numbers, e.g. 1,4,8.") from e
  if min(out) < 1:
    raise ValueError(f"--{flag}: every count must be at least 1, got {out}.")
  return out


def combines(values: list[str] | None, default: str) -> list[str]:
  """The --combines flag: combine rules, or [default] (the config's) when it is not given."""
  out = values or [default]
  for rule in out:
    if rule not in COMBINE_RULES:
      raise ValueError(f"--combines: unknown {rule!r}; valid: {', '.join(COMBINE_RULES)}.")
  return out


def make_rows(config, built, tx, sched, m: int) -> list[dict]:
  """One row per (executor, strategy, combine, mode, schedule) of one (K, M), each with its
  executor. A (strategy, combine rule) gets rows only where its backward plan differs from
  every earlier one's (`interlock.plan_variants`: e.g. local once, whatever the rules, and a
  strategy that reaches every stage as global). A schedule gets a row only where it applies to
  the strategy (`schedule.applies`: gpipe where a gradient crosses stages, zb where the plan
  merges both halves of a VJP call); fused runs no pipeline (schedule "-")."""
  k = config.num_stages
  rows = []
  variants = plan_variants(k, _STRATEGIES.value, combines(_COMBINES.value, config.combine))
  for mode in _MODES.value:
    if mode not in ("continuous", "flushed"):
      raise ValueError(f"--modes: unknown {mode!r}; valid: continuous, flushed.")
  for name in _SCHEDULES.value:
    if name not in schedule_lib.SCHEDULES:
      raise ValueError(
        f"--schedules: unknown {name!r}; valid: {', '.join(schedule_lib.SCHEDULES)}."
      )
  residuals = config.execution.residuals  # What every row's stage forwards keep.
  for kind in _EXECUTORS.value:
    if kind not in ("dataflow", "fused", "spmd"):
      raise ValueError(f"--executors: unknown {kind!r}; valid: dataflow, fused, spmd.")
    for name, rule, _ in variants:
      strat = parse_strategy(name, rule)
      is_global = strat.reach_for(k) == k
      modes = ["flushed"] if is_global or kind == "fused" else _MODES.value
      pipelines = ["-"] if kind == "fused" else _SCHEDULES.value
      pipelines = [p for p in pipelines if p == "-" or schedule_lib.applies(p, strat, k)]
      for mode, pipeline in itertools.product(modes, pipelines):
        args = (built.model, built.task, strat, tx, sched, built.input_spec)
        if kind == "fused":
          ex = fused.FusedExecutor(
            *args, microbatches=m, devices=jax.devices()[:1], residuals=residuals
          )
        elif kind == "spmd":
          ex = SpmdExecutor(
            *args,
            microbatches=m,
            continuous=mode == "continuous" or is_global,
            steps_per_call=_SPMD_PER_CALL.value,
            pipeline=pipeline,
            remat=_SPMD_REMAT.value,
            residuals=residuals,
          )
        else:
          # Global's own dependencies flush every step; dispatching it without a host wait
          # (continuous=True) keeps the baseline free of a per-step block that it does not need.
          ex = dataflow.DataflowExecutor(
            *args,
            microbatches=m,
            continuous=mode == "continuous" or is_global,
            pipeline=pipeline,
            data_parallel=1,
            residuals=residuals,
          )
        label = "-" if kind == "fused" else mode
        rows.append(
          {
            "executor": kind,
            "strategy": strat.name,
            "combine": strat.combine,
            "mode": label,
            "schedule": pipeline,
            "ex": ex,
            "s": strat,
          }
        )
  return rows


def time_rows(rows: list[dict], batch: dict, seed: int) -> dict:
  """Warm-up chunk, then --chunks rounds of one timed chunk per row (round-robin), each round
  followed by one calibration of the cost model (`DataflowExecutor.measure`, once per strategy
  on its first dataflow row): drift on a shared machine hits the rows and the calibration
  alike, while the calibration times no training step.

  Between the warm-up and the first timed round, one more calibration chooses the split of
  every dataflow zb row (`use_splits`); a row whose schedule changed warms up again.

  Returns:
    {Strategy: one MeasuredCosts per timed round}.
  """
  per_call = _SPMD_PER_CALL.value
  if any(row["executor"] == "spmd" for row in rows) and _STEPS.value % per_call:
    raise ValueError(
      f"--spmd_steps_per_call={per_call} must divide --steps_per_chunk={_STEPS.value} (a chunk "
      "is whole spmd calls); change either flag."
    )
  for row in rows:
    row["state"] = row["ex"].init_state(jax.random.PRNGKey(seed))
    spmd_row = row["executor"] == "spmd"
    row["batch"] = (
      row["ex"].put_batches([batch] * per_call) if spmd_row else row["ex"].put_batch(batch)
    )
    row["times"] = []

  def chunk(row: dict):
    ex, st = row["ex"], row["state"]
    if row["executor"] == "spmd":
      for _ in range(_STEPS.value // per_call):
        st, metrics = ex.train_steps(st, row["batch"])
    else:
      for _ in range(_STEPS.value):
        st, metrics = ex.train_step(st, row["batch"])
    return st, metrics

  first = {}
  for row in rows:
    if row["executor"] == "dataflow":
      first.setdefault(row["s"], row)

  def calibrate(strategies) -> dict:
    out = {}
    for s in strategies:
      if s not in first:  # No dataflow row to measure on (the spmd rows need one).
        continue
      row = first[s]
      jax.block_until_ready(row["state"])
      out[s] = [row["ex"].measure(row["state"], row["batch"], _REPEATS.value)]
    return out

  samples = {s: [] for s in first}
  for r in range(_CHUNKS.value + 1):
    for row in rows:
      jax.block_until_ready(row["state"])
      (row["state"], _), ms = timing.timed_ms(lambda row=row: chunk(row))
      if r:  # The first round compiles and warms up.
        row["times"].append(ms / _STEPS.value)
    if not r:
      for row in use_splits(rows, calibrate):
        jax.block_until_ready(row["state"])
        row["state"], _ = chunk(row)  # Compiles the new split's VJP calls, untimed.
    else:
      for s, costs in calibrate(first).items():
        samples[s] += costs
  return samples


def use_splits(rows: list[dict], calibrate) -> list[dict]:
  """Every dataflow zb row runs the split that op costs measured now predict fastest for its
  strategy (`DataflowExecutor.use_costs`, pooled as `measure` pools them), the split its
  prediction then assumes (`predict`).

  Args:
    rows: the rows of one (K, M).
    calibrate: strategies -> {Strategy: [MeasuredCosts]}, measured now.

  Returns:
    The rows whose schedule changed.
  """
  zb = [r for r in rows if r["executor"] in ("dataflow", "spmd") and r["schedule"] == "zb"]
  if not zb:
    return []
  measure(zb, calibrate(list(dict.fromkeys(r["s"] for r in zb))))
  return [r for r in zb if "costs" in r and r["ex"].use_costs(r.pop("costs"))]


def measure(rows: list[dict], samples: dict) -> None:
  """The calibrations of `time_rows` ({Strategy: [MeasuredCosts]}) pooled into each dataflow
  (and spmd) row's MeasuredCosts (`row["costs"]`, by the row's strategy and combine rule): the
  forward, VJP and update programs are the same whatever the strategy, so each stage's cost of
  them is the median over every round and strategy (less noise); the loss op (which may also
  return a cotangent) is each strategy's own median over the rounds; the link and the
  shared-core slowdown are the medians over all."""
  flow = [r for r in rows if r["executor"] in ("dataflow", "spmd")]
  if not samples:
    return
  fields = ("forward", "head", "backward_input", "backward_weight", "update")
  all_costs = [c for per_round in samples.values() for c in per_round]
  measured = {s: per_round[0] for s, per_round in samples.items()}
  link = schedule_lib.Link(
    latency=statistics.median(c.link.latency for c in all_costs),
    bandwidth=statistics.median(c.link.bandwidth for c in all_costs),
  )
  # Per count of busy stages, the median over the calibrations.
  slowdown = tuple(statistics.median(s) for s in zip(*(c.slowdown for c in all_costs)))
  for s, own in measured.items():
    stages = []
    for k, cost in enumerate(own.stages):
      med = lambda field, k=k: statistics.median(getattr(c.stages[k], field) for c in all_costs)
      both = None if cost.backward_both is None else med("backward_both")
      pooled = schedule_lib.StageCost(*(med(f) for f in fields), backward_both=both)
      head = statistics.median(c.stages[k].head for c in samples[s])
      stages.append(dataclasses.replace(pooled, head=head))
    pooled_costs = dataclasses.replace(own, stages=tuple(stages), link=link, slowdown=slowdown)
    for row in flow:
      if row["s"] == s:
        row["costs"] = pooled_costs


def predict_spmd(row: dict, flow: list[dict], batch_size: int) -> None:
  """The lock-step tick model with the dataflow rows' pooled op costs (same strategy); the
  compiled program's memory per device, and the padding of the flat buffers."""
  ex = row["ex"]
  compiled = ex.lower(row["state"], row["batch"]).compile()
  mem = compiled.memory_analysis()
  used = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  pad = ex.padding(batch_size)
  row.update(
    memory_mb_per_device=(used - mem.alias_size_in_bytes) / 1e6,
    zb_split=list(ex.schedule.split),
    remat=ex.remat,
    padding_kb_per_device=(
      max(pad["state_padding_bytes_per_stage"]) + max(pad["slot_padding_bytes_per_stage"])
    )
    / 1e3,
    padding=pad,
    inflight_microbatches_max=max(pad["slots"]["inputs"], pad["slots"]["residuals"]),
    predicted_ms_per_step=None,
    predicted_alone_ms_per_step=None,
    bubble_fraction=None,
  )
  same = [r for r in flow if r["s"] == row["s"]]
  if not same:
    return
  costs = same[0]["costs"]
  sched = schedule_lib.build(
    row["s"],
    ex.K,
    ex.M,
    ex.schedule.continuous,
    costs=costs.stages,
    schedule=ex.schedule.name,
    split=ex.schedule.split or None,
  )
  table = ticks.build(sched, ex.steps_per_call, remat=ex.remat)
  # Every tick ends with one message over each boundary (the largest activation's).
  comm = costs.link.seconds(max(costs.boundary_bytes, default=0))
  per_step = lambda slow: (
    1e3 * (ticks.predict_time(table, sched, slow) + comm * table.num_ticks) / ex.steps_per_call
  )
  row.update(
    predicted_ms_per_step=per_step(costs.slowdown), predicted_alone_ms_per_step=per_step(1.0)
  )


def predict(row: dict) -> None:
  """Measured op costs -> the cost model's ms per step, in-flight and bubble
  (`schedule.predict_step`, with the zb split the executor ran: the one `use_splits` chose)."""
  ex = row["ex"]
  if row["executor"] == "spmd":
    return
  if row["executor"] != "dataflow":
    row.update(
      predicted_ms_per_step=None,
      predicted_alone_ms_per_step=None,
      inflight_microbatches_max=None,
      bubble_fraction=None,
    )
    return
  costs = row["costs"]
  p = schedule_lib.predict_step(
    costs,
    row["s"],
    ex.M,
    schedule=ex.schedule.name,
    continuous=row["mode"] == "continuous",
    split=ex.schedule.split or None,
  )
  row.update(
    predicted_ms_per_step=1e3 * p["seconds_per_step"],
    predicted_alone_ms_per_step=1e3 * p["seconds_per_step_alone"],
    inflight_microbatches_max=max(p["inflight_max"]),
    inflight_per_stage=p["inflight_max"],
    predicted_inflight_bytes_per_stage=p["inflight_bytes_per_stage"],
    bubble_fraction=p["bubble_fraction"],
    zb_split=list(ex.schedule.split),
    op_costs_ms=[dataclasses_asdict(c) for c in costs.stages],
    link={"latency_ms": 1e3 * costs.link.latency, "bandwidth_bytes_per_s": costs.link.bandwidth},
    boundary_bytes=list(costs.boundary_bytes),
    slowdown=list(costs.slowdown),
    schedule_obj=p["schedule"],
  )


def dataclasses_asdict(cost: schedule_lib.StageCost) -> dict:
  """A StageCost in seconds -> a dict in milliseconds."""
  return {k: v if v is None else round(1e3 * v, 4) for k, v in dataclasses.asdict(cost).items()}


def print_table(rows: list[dict]) -> None:
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  columns = [
    ("executor", "executor", "s"),
    ("strategy", "strategy", "s"),
    ("combine", "combine", "s"),
    ("mode", "mode", "s"),
    ("schedule", "schedule", "s"),
    ("ms/step", "ms_per_step", ".1f"),
    ("IQR", "iqr_ms", ".1f"),
    ("vs global", "vs_global", ".3f"),
    ("pred alone", "predicted_alone_ms_per_step", ".1f"),
    ("predicted", "predicted_ms_per_step", ".1f"),
    ("pred/meas", "predicted_over_measured", ".3f"),
    ("in-flight", "inflight_microbatches_max", "d"),
    ("bubble", "bubble_fraction", ".2f"),
    ("held MB/dev", "held_mb_per_device_max", ".1f"),
    ("mem MB/dev", "memory_mb_per_device", ".1f"),
    ("pad KB/dev", "padding_kb_per_device", ".1f"),
  ]
  cells = [[c[0] for c in columns]] + [
    [fmt(r.get(key), spec) for _, key, spec in columns] for r in rows
  ]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  for i, line in enumerate(cells):
    left = [c.ljust(w) for c, w in zip(line[:5], widths[:5])]
    print("  ".join(left + [c.rjust(w) for c, w in zip(line[5:], widths[5:])]))
    if i == 0:
      print("  ".join("-" * w for w in widths))


def benchmark(config, m: int, seed: int) -> list[dict]:
  """Every row of one (K = config.num_stages, M = m): timed, measured, predicted; JSON-ready."""
  k = config.num_stages
  built = families.build_synthetic(config)
  desc = families.describe(config, built)
  tx, sched = trainer.make_optimizer(config)
  batch = next(built.data.train_batches(0))
  print(
    f"\nmodel: {desc}\nbatch {config.batch_size} in M={m} microbatches | K={k} stages, one "
    f"device each | {_STEPS.value} steps x {_CHUNKS.value} chunks per row",
    flush=True,
  )
  rows = make_rows(config, built, tx, sched, m)
  measure(rows, time_rows(rows, batch, seed))
  flow = [r for r in rows if r["executor"] == "dataflow"]
  for row in rows:
    predict(row)
    if row["executor"] == "spmd":
      predict_spmd(row, flow, config.batch_size)
  base = {}
  for r in sorted(rows, key=lambda r: r["combine"] != "furthest"):  # Plain backprop first.
    if (
      r["s"].reach_for(k) == k and r["mode"] in ("flushed", "-") and r["schedule"] in ("1f1b", "-")
    ):
      base.setdefault(r["executor"], statistics.median(r["times"]))
  out = []
  for row in rows:
    ms = statistics.median(row["times"])
    pred = row["predicted_ms_per_step"]
    row.update(
      ms_per_step=ms,
      iqr_ms=timing.iqr(row["times"]),
      vs_global=ms / base[row["executor"]] if row["executor"] in base else None,
      predicted_over_measured=pred / ms if pred else None,
    )
    if _GANTT_DIR.value and row["executor"] == "dataflow":
      os.makedirs(_GANTT_DIR.value, exist_ok=True)
      parts = (row["strategy"], row["combine"], row["mode"], row["schedule"])
      name = f"gantt_{'_'.join(parts)}_K{k}_M{m}.png"
      path = os.path.join(_GANTT_DIR.value, name)
      alone = row["predicted_alone_ms_per_step"]
      title = (
        f"{row['strategy']} ({', '.join(parts[1:])}), K={k}, M={m}, op costs timed alone: "
        f"{alone:.1f} ms/step (with shared-core slowdown {pred:.1f}; measured {ms:.1f})"
      )
      gantt.gantt(row["schedule_obj"].simulate(3), path, title=title, unit="s")
      row["gantt"] = path
    drop = ("ex", "s", "state", "batch", "schedule_obj", "costs")
    keep = {key: v for key, v in row.items() if key not in drop}
    held = memory.as_dict(row["ex"].memory(config.batch_size))
    keep.update(
      **held,
      held_mb_per_device_max=max(held["held_bytes_per_stage"]) / 1e6,
      stages=k,
      microbatches=m,
      batch=config.batch_size,
      model=config.model.get("name", config.family),
      description=desc,
      execution=row["ex"].description,
      backend=jax.default_backend(),
      ms_all=row["times"],
    )
    keep.pop("times")
    out.append(keep)
  print()
  print_table(out)
  print(
    "\nvs global: ms/step over global (flushed, 1F1B; the furthest rule where it ran) on the same "
    "executor."
  )
  slow = [r["costs"].slowdown for r in rows if "costs" in r]
  if slow:
    print(
      "pred alone: the schedule with op costs timed alone; predicted: the same with every "
      "stretch in which n stages overlap as much slower as n stages' forwards measured at once "
      f"against alone ({schedule_lib.describe_slowdown(slow[0])}; devices sharing cores, ~1 on "
      "accelerators)."
    )
  same = lambda r: (r["executor"], r["strategy"], r["combine"], r["mode"])
  orders = {
    (*same(r), r["schedule"]): r["schedule_obj"].dispatch_order()
    for r in rows
    if "schedule_obj" in r
  }
  for r in rows:
    zb, one = orders.get((*same(r), "zb")), orders.get((*same(r), "1f1b"))
    if r["schedule"] == "zb" and zb is not None and zb == one:
      print(
        f"zb ({r['executor']}, {r['strategy']}, {r['combine']}): no microbatch split pays under "
        "these costs, so it runs 1f1b's op order; its time differs from 1f1b's by noise alone."
      )
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; use --config.FIELD=VALUE.")
  config = _CONFIG.value
  stages = counts(_STAGES.value, config.num_stages, "stages")
  micro = counts(_MICRO.value, config.execution.microbatches, "microbatches")
  # One CPU device per stage of the largest K (D = 1; fused uses one), not more: on the 2-core
  # box idle forced devices were not free (resnet20 K = 2 spmd calls ~25 ms per step slower
  # with 8 devices than with 2, ~100 times the context switches).
  placement.force_cpu_devices(max(stages))
  wall = time.perf_counter()
  if jax.device_count() < max(stages):
    raise ValueError(
      f"--stages={max(stages)} needs {max(stages)} devices; {jax.device_count()} are visible."
    )
  where = timing.machine()
  print(where)
  print(f"config: {config_flags.get_config_filename(flags.FLAGS['config'])}")
  out = []
  for k in stages:
    cfg = copy.deepcopy(config)
    cfg.num_stages = k
    for m in micro:
      out += benchmark(cfg, m, config.seed)
  print(f"total {time.perf_counter() - wall:.1f} s")
  if _JSON_OUT.value:
    for row in out:
      row["machine"] = where
    files.write_text(_JSON_OUT.value, json.dumps(out, indent=1))
    print(f"wrote {len(out)} rows to {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
