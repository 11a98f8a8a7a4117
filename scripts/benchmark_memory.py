"""Time and peak memory per optimizer step of every executor, each in a process of its own.

Usage (from the repository root):

  .venv/bin/python -m scripts.benchmark_memory              # resnet20, K=2, M=8, global, 1f1b
  .venv/bin/python -m scripts.benchmark_memory --strategy=pairwise --schedule=zb \
      --executors=dataflow,spmd --json_out=/tmp/mem.json
  .venv/bin/python -m scripts.benchmark_memory \
      --config=experiments/configs/benchmark.py:family=transformer

Peak memory is a property of a process, so each executor trains in a child process of its own
(the same flags and `--child=EXECUTOR`), one after the other on the same machine, and the
parent reads what each child reports. The model, split, batch and optimizer come from --config
(default `experiments/configs/benchmark.py`, random batches of its shapes); --stages,
--microbatches, --strategy, --combine and --schedule set `config.execution` and the strategy
for every executor alike.

Executors: `fused` (one program on one device, the same M microbatches), `dataflow`, `spmd`
(B ops read stored residuals) and `spmd_remat` (B ops re-run the forward). Per executor:

- `ms/step`: the median over --chunks of (wall time of --steps_per_chunk steps, blocking at
  the end) / steps, after a warm-up chunk (spmd: --spmd_steps_per_call steps per call);
- `peak RSS`: the child's peak resident set (`getrusage`), which on CPU holds every forced
  device's arrays, the compiled programs and the Python runtime; compare it between rows, not
  with the plan;
- `device peak`: on an accelerator, the most bytes in use on any one device
  (`memory_stats()["peak_bytes_in_use"]`; none on CPU);
- `plan`: the executor's own memory plan, the fullest device's state plus in-flight bytes
  (`Executor.memory`, as benchmark_pipeline's `held MB/dev`).

Ratios are against dataflow's row of the same run. Name the machine beside every figure:
XLA:CPU picks other kernels on other CPUs.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from ilbp import families, placement, timing, trainer
from ilbp.execution import factory, memory
from ilbp.execution.base import ExecutionConfig
from ilbp.strategy import strategy as parse_strategy

EXECUTORS = ("fused", "dataflow", "spmd", "spmd_remat")

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/benchmark.py", "Experiment config (model, split, batch)."
)
_EXECUTORS = flags.DEFINE_list("executors", list(EXECUTORS), f"Any of {', '.join(EXECUTORS)}.")
_STAGES = flags.DEFINE_integer("stages", None, "K (one device per stage); default: config's.")
_MICRO = flags.DEFINE_integer("microbatches", None, "M per optimizer step; default: config's.")
_STRATEGY = flags.DEFINE_string("strategy", "global", "local, pairwise, <n>wise or global.")
_COMBINE = flags.DEFINE_string("combine", None, "Combine rule (furthest, sum); default: config's.")
_SCHEDULE = flags.DEFINE_string("schedule", "1f1b", "Pipeline schedule: gpipe, 1f1b or zb.")
_STEPS = flags.DEFINE_integer("steps_per_chunk", 8, "Steps timed together.")
_CHUNKS = flags.DEFINE_integer("chunks", 5, "Timed chunks (median reported).")
_PER_CALL = flags.DEFINE_integer(
  "spmd_steps_per_call", 8, "spmd: optimizer steps per call (divides --steps_per_chunk)."
)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the rows as a JSON list.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one executor and report it.")

_MARK = "BENCHMARK_MEMORY_ROW "


def configure(kind: str):
  """The config of one executor's row (flags applied)."""
  config = _CONFIG.value.copy_and_resolve_references()
  with config.unlocked():
    config.num_stages = _STAGES.value or config.num_stages
    config.strategy = _STRATEGY.value
    config.combine = _COMBINE.value or config.combine
    ex = config.execution
    ex.kind = "spmd" if kind.startswith("spmd") else kind
    ex.num_stages = config.num_stages
    ex.microbatches = _MICRO.value or ex.microbatches
    ex.schedule = _SCHEDULE.value
    ex.remat = kind == "spmd_remat"
    ex.steps_per_call = _PER_CALL.value if ex.kind == "spmd" else 1
    # Global's own dependencies flush every step; local and n-wise run without a flush.
    ex.continuous = True
  return config


def run_child(kind: str) -> dict:
  """Trains `kind` for a warm-up and --chunks timed chunks; returns its row."""
  config = configure(kind)
  placement.force_cpu_devices(config.num_stages)
  execution = ExecutionConfig.from_config(config)
  built = families.build_synthetic(config)
  tx, sched = trainer.make_optimizer(config)
  strat = parse_strategy(config.strategy, config.combine)
  ex = factory.make(execution, built.model, built.task, strat, tx, sched, built.input_spec)
  batch = next(built.data.train_batches(0))
  per_call = execution.steps_per_call
  if _STEPS.value % per_call:
    raise ValueError(
      f"--spmd_steps_per_call={per_call} must divide --steps_per_chunk={_STEPS.value}."
    )
  placed = ex.put_batches([batch] * per_call) if per_call > 1 else ex.put_batch(batch)
  step = ex.train_steps if per_call > 1 else ex.train_step
  st = ex.init_state(jax.random.PRNGKey(config.seed))

  def chunk(st):
    for _ in range(_STEPS.value // per_call):
      st, _ = step(st, placed)
    return st

  times = []
  for r in range(_CHUNKS.value + 1):
    jax.block_until_ready(st)
    st, ms = timing.timed_ms(lambda st=st: chunk(st))
    if r:  # The first chunk compiles and warms up.
      times.append(ms / _STEPS.value)
  device_peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.devices()]
  device_peaks = [p for p in device_peaks if p is not None]
  plan = memory.as_dict(ex.memory(config.batch_size))
  return {
    "executor": kind,
    "strategy": strat.name,
    "combine": strat.combine,
    "schedule": execution.schedule if kind != "fused" else "-",
    "stages": config.num_stages,
    "microbatches": execution.microbatches,
    "batch": config.batch_size,
    "ms_per_step": statistics.median(times),
    "iqr_ms": timing.iqr(times),
    "ms_all": times,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "device_peak_mb": max(device_peaks) / 1e6 if device_peaks else None,
    "plan_mb_per_device_max": max(plan["held_bytes_per_stage"]) / 1e6,
    "execution": ex.description,
    "backend": jax.default_backend(),
    "machine": timing.machine(),
  }


def run_parent() -> list[dict]:
  """Every executor in a child process of its own, one after the other."""
  for kind in _EXECUTORS.value:
    if kind not in EXECUTORS:
      raise ValueError(f"--executors: unknown {kind!r}; valid: {', '.join(EXECUTORS)}.")
  argv = [a for a in sys.argv[1:] if not a.startswith(("--child", "--json_out"))]
  rows = []
  for kind in _EXECUTORS.value:
    cmd = [sys.executable, "-m", "scripts.benchmark_memory", *argv, f"--child={kind}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = [line for line in out.stdout.splitlines() if line.startswith(_MARK)]
    if out.returncode or not found:
      sys.stderr.write(out.stderr[-4000:])
      raise RuntimeError(f"The {kind} child failed (exit {out.returncode}); its log is above.")
    rows.append(json.loads(found[-1][len(_MARK) :]))
    print(f"{kind}: done ({rows[-1]['ms_per_step']:.1f} ms/step)", flush=True)
  return rows


def print_table(rows: list[dict]) -> None:
  base = next((r for r in rows if r["executor"] == "dataflow"), None)
  ratio = lambda r, key: f"{r[key] / base[key]:.2f}x" if base and base[key] else "-"
  mb = lambda v: "-" if v is None else f"{v:.0f}"
  print(
    f"\n{'executor':<11} {'ms/step':>8} {'iqr':>6} {'vs dataflow':>11} {'peak RSS MB':>11} "
    f"{'vs dataflow':>11} {'device peak MB':>14} {'plan MB/dev':>11}"
  )
  for r in rows:
    print(
      f"{r['executor']:<11} {r['ms_per_step']:>8.1f} {r['iqr_ms']:>6.1f} "
      f"{ratio(r, 'ms_per_step'):>11} {r['peak_rss_mb']:>11.0f} {ratio(r, 'peak_rss_mb'):>11} "
      f"{mb(r['device_peak_mb']):>14} {r['plan_mb_per_device_max']:>11.1f}"
    )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; use --config.FIELD=VALUE.")
  if _CHILD.value:
    print(_MARK + json.dumps(run_child(_CHILD.value)), flush=True)
    return
  print(timing.machine(), flush=True)
  rows = run_parent()
  r = rows[0]
  print(
    f"\n{r['strategy']} ({r['combine']}), K={r['stages']}, M={r['microbatches']}, batch "
    f"{r['batch']}, schedule {_SCHEDULE.value}; each executor in its own process"
  )
  print_table(rows)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(rows, f, indent=1)
    print(f"\nwrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
