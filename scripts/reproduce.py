"""Reproduces the paper's comparisons: one suite of runs, over strategies and seeds, then a table.

  python -m scripts.reproduce --suite quick --out runs/quick            # 56 min on a 2-core CPU
  python -m scripts.reproduce --suite cifar10 --out /mnt/bucket/cifar10 --dry_run
  python -m scripts.reproduce --suite quick --out /tmp/smoke --smoke    # tiny, end to end
  python -m scripts.reproduce --suite frontier --budget=time --pipeline_microbatches=4 \
      --out runs/frontier_m4                                            # docs/frontier.md

The suites (`quick`, `frontier`, `cifar10`, `cifar100`, `imagenet`, `lm1b`: which configs, strategy
variants and seeds) are defined in `experiments/suites.py`; this module runs them. `--dry_run`
prints a suite's runs and the command of each; every invocation first prints how many runs it
selected and how long the suite (or, under `--smoke`, its smoke version) takes.

Every run is a subprocess of the experiment binary (`python -m experiments.resnet|transformer
--config FILE:strategy=…,stages=…,combine=… --workdir DIR/<run> --config.seed=S …`), one
workdir per run under DIR; its console output goes to `DIR/<run>/reproduce.log`. A run that
ends cleanly gets `DIR/<run>/DONE` (its command, wall time, host). Re-running the same command
skips finished runs (a DONE written by the same command) and resumes interrupted ones from their
newest checkpoint (the trainer's own resume), so a suite survives a pre-empted VM: run it again.
`--only 'stdlib-*-s0,digits-local-*'` selects runs by name glob; `--dry_run` prints the commands;
`--report_only` rebuilds the table and plots from what has finished; `--curves_from=FILE.csv`
adds the seeds of an earlier curves.csv whose workdirs are gone. A failed run is reported
and the suite goes on; the command exits non-zero at the end. DIR is a local path or a mounted
one (NFS/Filestore, or a bucket mounted with gcsfuse). The runs share a JAX persistent
compilation cache (`--compilation_cache`, default DIR/jax_cache): every seed of a strategy
compiles the same programs.

**Several hosts, one DIR.** Start the same command on every host, with DIR on storage they all
mount. Each host walks the runs in the same order and takes the first one that is neither
finished nor claimed: it writes `DIR/<run>/claim.json` (host, pid, a random token, a heartbeat
time), waits `--claim_settle_s` and reads it back, and trains only if the claim still names it
(on storage without exclusive create the last writer wins and the other host moves on). While
training it refreshes the heartbeat every `--heartbeat_s`; a claim is stale, and taken over,
when its heartbeat is older than `--stale_after_s` (hosts' clocks must agree to well within
that, as NTP keeps cloud VMs), or at once when it names a dead process on this host. A host
writes the table from what has finished when it runs out of runs, so the last host to finish
writes the complete one (or run `--report_only` anywhere afterwards). Within one host the
trainer's `run.lock` also refuses a second live run on a workdir.

**Time on the x-axis.** Every run logs `pipeline/seconds`, its modelled pipeline time so far on
K devices at M = `--pipeline_microbatches` (`ilbp.pipeline_time`). Before training, the op costs
of each experiment are measured once (`--measure_pipeline_only` of its binary, under global's
config, into `DIR/pipeline_costs/<experiment>/`; reused while they match) and copied into every
run's workdir, so all strategies of an experiment are timed by the same costs and no run
measures again. The plan printed before training gives each strategy its pipeline schedule (the
fastest of gpipe, 1f1b and zb that applies to it, by `schedule.predict_step` with those costs),
its predicted time per step and its steps. `--budget=steps`: every strategy trains the suite's
step count. `--budget=time`: every strategy trains for global's modelled time at the suite's
step count, T = steps × t_global, so a strategy predicted at t_s per step takes
floor(T / t_s) steps (rounded down: never more time than global). The plan is kept in
`DIR/plan.json`; a DIR trained under one budget refuses the other (use another --out).

Outputs: `DIR/table.md`, `DIR/results.csv`, `DIR/runs.csv` and `DIR/plots/*.png`
(`scripts.reproduce_report` describes them).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import json
import math
import os
import secrets
import socket
import subprocess
import sys
import time

from absl import app, flags

from experiments.suites import SUITES, Run, Suite, suite_runs, variants
from ilbp import files, pipeline_time, workdir_lock
from ilbp.execution import schedule
from ilbp.strategy import strategy as parse_strategy
from scripts import reproduce_report

FLAGS = flags.FLAGS
flags.DEFINE_string("suite", None, "Suite to run: " + ", ".join(SUITES) + ".")
flags.DEFINE_string("out", None, "Directory holding one workdir per run, the table and plots.")
flags.DEFINE_list("only", [], "Run only the runs whose name matches one of these globs.")
flags.DEFINE_bool("dry_run", False, "Print the runs' commands and exit.")
flags.DEFINE_bool("smoke", False, "Tiny settings (runlocal configs, one seed): tests the plumbing.")
flags.DEFINE_list("seeds", [], "Seeds to run instead of the suite's.")
flags.DEFINE_multi_string(
  "set", [], "FIELD=VALUE added to every run as --config.FIELD=VALUE (e.g. dataset.data_dir=…)."
)
flags.DEFINE_bool("report_only", False, "Train nothing: write the table and plots from DIR.")
flags.DEFINE_list(
  "curves_from",
  [],
  "curves.csv files of earlier runs of this suite whose workdirs are gone (another machine): "
  "their seeds join the table's means, the curves and DIR/curves.csv (final metric = a run's "
  "last evaluation). A seed DIR holds as a finished run is not read again.",
)
flags.DEFINE_integer("jobs", 1, "Runs trained at once on this host.")
flags.DEFINE_float("heartbeat_s", 60.0, "How often a live run refreshes its claim.")
flags.DEFINE_float("stale_after_s", 900.0, "A claim whose heartbeat is older is taken over.")
flags.DEFINE_float("claim_settle_s", 2.0, "Wait before reading a new claim back (multi-host).")
flags.DEFINE_integer("pipeline_microbatches", 8, "M for the modelled pipeline time per step.")
flags.DEFINE_enum(
  "budget",
  "steps",
  ["steps", "time"],
  "steps: every strategy trains the suite's step count. time: every strategy trains for "
  "global's modelled pipeline time at the suite's step count (T = steps x global's predicted "
  "s/step, K devices, M = --pipeline_microbatches, each strategy's fastest schedule), so a "
  "strategy predicted at t_s s/step trains floor(T / t_s) steps (rounded down, never more "
  "time than global). The plan is printed before training.",
)
flags.DEFINE_string(
  "compilation_cache",
  "{out}/jax_cache",
  "JAX persistent compilation cache shared by the runs (seeds of a strategy compile the same "
  "programs); '' = none. A JAX_COMPILATION_CACHE_DIR already set wins.",
)

DONE_FILE = "DONE"
CLAIM_FILE = "claim.json"
LOG_FILE = "reproduce.log"
PLAN_FILE = "plan.json"
COSTS_DIR = "pipeline_costs"


def select(runs: list[Run], patterns: list[str]) -> list[Run]:
  """The runs whose name matches any glob in `patterns` (all of them when it is empty)."""
  if not patterns:
    return runs
  chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
  if not chosen:
    raise ValueError(f"--only {','.join(patterns)} matches no run; runs: {runs[0].name}, ….")
  return chosen


# --- finished runs and claims ----------------------------------------------------------------


def is_done(run: Run, out: str) -> bool:
  """Whether `run` finished under the same arguments (its DONE names the same command)."""
  path = os.path.join(out, run.name, DONE_FILE)
  try:
    with open(path) as f:
      return json.load(f).get("args") == run.args()
  except (FileNotFoundError, json.JSONDecodeError):
    return False


def _write_json(path: str, value: dict) -> None:
  """A reader never sees half a file (`files.write_text` writes whole files)."""
  files.write_text(path, json.dumps(value))


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      value = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  return value if isinstance(value, dict) else None


class Claim:
  """A host's claim on one run's workdir (see the module docstring)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, CLAIM_FILE)
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8)}

  def holder_alive(self, holder: dict | None, stale_after_s: float) -> bool:
    """Whether `holder` (a claim's content) still holds its run."""
    if not holder:
      return False
    if holder.get("host") == self.me["host"]:
      pid = holder.get("pid")
      return isinstance(pid, int) and pid > 0 and workdir_lock.pid_alive(pid)
    return time.time() - float(holder.get("heartbeat", 0)) < stale_after_s

  def take(self, stale_after_s: float, settle_s: float) -> dict | None:
    """Claims the run. Returns None when it is ours, else the live holder's claim."""
    holder = _read_json(self.path)
    if self.holder_alive(holder, stale_after_s):
      return holder
    if holder is not None:
      # Stale: move it aside; of two hosts taking it over only one rename succeeds.
      try:
        os.replace(self.path, f"{self.path}.stale.{self.me['token']}")
        os.remove(f"{self.path}.stale.{self.me['token']}")
      except FileNotFoundError:
        return _read_json(self.path) or {"host": "another host"}
    try:  # Exclusive where the storage supports it; otherwise the read-back decides.
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      os.close(fd)
    except FileExistsError:
      return _read_json(self.path) or {"host": "another host"}
    self.refresh()
    if settle_s:
      time.sleep(settle_s)
    now = _read_json(self.path)
    return None if now and now.get("token") == self.me["token"] else (now or {"host": "?"})

  def refresh(self) -> None:
    _write_json(self.path, {**self.me, "heartbeat": time.time(), "at": time.strftime("%c %Z")})

  def release(self) -> None:
    held = _read_json(self.path)
    if held and held.get("token") == self.me["token"]:
      os.remove(self.path)


# --- the plan: each strategy's schedule and steps from the cost model --------------------------


def pipeline_overrides(microbatches: int) -> tuple[str, ...]:
  """What every run gets: pipeline/seconds on, modelled at M = `microbatches`."""
  return ("pipeline_time.measure=True", f"pipeline_time.microbatches={microbatches}")


def suite_config(run: Run):
  """The run's experiment config as the binary builds it (its --config argument), before the
  --config.FIELD overrides."""
  module = run.experiment.config.removesuffix(".py").replace("/", ".")
  arg = f"strategy={run.strategy},stages={run.experiment.stages},combine={run.combine}"
  return importlib.import_module(module).get_config(arg + (",runlocal=1" if run.smoke else ""))


def suite_steps(run: Run) -> int:
  """The step count the suite trains `run` for: its overrides' total_steps, else the config's."""
  overrides = run.experiment.smoke_overrides if run.smoke else run.experiment.overrides
  for item in reversed((*overrides, *run.extra)):
    field, _, value = item.partition("=")
    if field == "total_steps":
      return int(value)
  return int(suite_config(run).total_steps)


@dataclasses.dataclass(frozen=True)
class Planned:
  """One strategy variant's part of the plan."""

  strategy: str
  combine: str
  label: str  # Its table row: "pairwise (sum)", or "local" where the rule changes nothing.
  schedule: str  # The fastest pipeline schedule that applies to it.
  seconds_per_step: float  # `schedule.predict_step` at that schedule.
  steps: int


def plan(
  costs: schedule.MeasuredCosts,
  num_stages: int,
  microbatches: int,
  steps: int,
  budget: str,
  continuous: bool = True,
) -> dict[tuple[str, str], Planned]:
  """Every strategy variant's schedule, predicted time per step and steps.

  Args:
    costs: the experiment's measured op costs.
    num_stages: K.
    microbatches: M of the modelled pipeline.
    steps: the suite's step count.
    budget: "steps" (every variant trains `steps`) or "time" (every variant trains for global's
      modelled time T = steps x t_global: floor(T / t_s) steps, at least 1).
    continuous: continuous (True) or flushed steps.

  Returns:
    {(strategy, combine): Planned}, in `suites.variants` order; global under the furthest rule
    is the budget's reference.
  """
  if budget not in ("steps", "time"):
    raise ValueError(f"budget must be 'steps' or 'time', got {budget!r}.")
  out = {}
  for name, combine, matters in variants(num_stages):
    strategy = parse_strategy(name, combine)
    times = {
      sched: schedule.predict_step(costs, strategy, microbatches, sched, continuous)[
        "seconds_per_step"
      ]
      for sched in schedule.SCHEDULES
      if schedule.applies(sched, strategy, num_stages)
    }
    best = min(times, key=times.get)
    label = f"{name} ({combine})" if matters else name
    out[name, combine] = Planned(name, combine, label, best, times[best], steps)
  if budget == "time":
    total = steps * out["global", "furthest"].seconds_per_step
    for key, p in out.items():
      # The tolerance keeps global's own floor(steps * t / t) at `steps`.
      n = max(1, math.floor(total / p.seconds_per_step * (1 + 1e-9)))
      out[key] = dataclasses.replace(p, steps=n)
  return out


def plan_overrides(planned: Planned, budget: str) -> tuple[str, ...]:
  """The --config overrides a run gets from its part of the plan."""
  extra = (f"pipeline_time.schedule={planned.schedule}",)
  return (*extra, f"total_steps={planned.steps}") if budget == "time" else extra


def measure_costs(run: Run, out: str, env: dict, attempts: int = 60) -> dict:
  """The op costs of `run`'s experiment, measured once into DIR/pipeline_costs/<experiment>
  by its binary (`--measure_pipeline_only`; reused while they match); another host measuring
  there at the same time is waited for.

  Returns:
    The cache file's content (`ilbp.pipeline_time`).

  Raises:
    RuntimeError: the measurement failed, with the end of its output.
  """
  workdir = os.path.join(out, COSTS_DIR, run.experiment.label)
  args = [a for a in run.args(out) if not a.startswith("--workdir=")]
  args += [f"--workdir={workdir}", "--measure_pipeline_only"]
  for _ in range(attempts):
    proc = subprocess.run(
      [sys.executable, *args], cwd=_ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode == 0 or "in use" not in proc.stderr:
      break
    time.sleep(5)
  if proc.returncode:
    raise RuntimeError(
      f"Measuring the op costs of {run.experiment.label} failed (exit {proc.returncode}): "
      f"{(proc.stdout + proc.stderr)[-2000:]}"
    )
  return pipeline_time.read(workdir)


def seed_costs(workdir: str, measured: dict) -> None:
  """Gives a run's workdir the experiment's costs (its own segments, if any, kept)."""
  os.makedirs(workdir, exist_ok=True)
  data = pipeline_time.read(workdir) or {"version": measured["version"], "segments": []}
  if data.get("key") == measured["key"] and data.get("costs") == measured["costs"]:
    return
  data |= {"key": measured["key"], "costs": measured["costs"], "copied_from": COSTS_DIR}
  pipeline_time.write(workdir, data)


def check_budget(out: str, budget: str) -> dict:
  """DIR/plan.json's runs ({} when none); refuses a DIR planned under the other budget."""
  saved = _read_json(os.path.join(out, PLAN_FILE)) or {"budget": budget, "runs": {}}
  if saved["budget"] != budget:
    raise ValueError(
      f"--out={out} holds runs trained under --budget={saved['budget']}; their step counts "
      f"differ from --budget={budget}'s. Use another --out, or --budget={saved['budget']}."
    )
  return saved["runs"]


def make_plan(runs: list[Run], out: str, budget: str, microbatches: int, env: dict) -> dict:
  """Measures each selected experiment's costs, seeds its runs' workdirs, prints the plan and
  returns {run name: its plan overrides}, also written to DIR/plan.json."""
  overrides = check_budget(out, budget)
  for label in dict.fromkeys(r.experiment.label for r in runs):
    members = [r for r in runs if r.experiment.label == label]
    # Measured under global's config: its costs are the budget's reference.
    reference = dataclasses.replace(members[0], strategy="global", combine="furthest")
    measured = measure_costs(reference, out, env)
    costs = pipeline_time.costs_from_json(measured["costs"])
    K = reference.experiment.stages
    steps = suite_steps(reference)
    continuous = bool(suite_config(reference).execution.continuous)
    parts = plan(costs, K, microbatches, steps, budget, continuous)
    print(render_plan(label, parts, budget, K, microbatches, costs.source))
    for run in members:
      seed_costs(os.path.join(out, run.name), measured)
      overrides[run.name] = list(plan_overrides(parts[run.strategy, run.combine], budget))
  _write_json(os.path.join(out, PLAN_FILE), {"budget": budget, "runs": overrides})
  return overrides


def render_plan(label, parts: dict, budget: str, K: int, M: int, source: str) -> str:
  """The plan of one experiment, a few lines for the console."""
  lines = [
    f"plan for {label} (--budget={budget}; modelled on K={K} devices, M={M}; op costs: {source}):",
    f"  {'strategy':<20} {'schedule':<8} {'ms/step':>9} {'steps':>6} {'modelled s':>11}",
  ]
  for p in parts.values():
    lines.append(
      f"  {p.label:<20} {p.schedule:<8} {1e3 * p.seconds_per_step:>9.2f} {p.steps:>6} "
      f"{p.steps * p.seconds_per_step:>11.3f}"
    )
  return "\n".join(lines)


def with_plan(runs: list[Run], overrides: dict) -> list[Run]:
  """The runs with their plan's overrides (runs without a plan unchanged)."""
  return [
    dataclasses.replace(r, extra=(*r.extra, *overrides[r.name])) if r.name in overrides else r
    for r in runs
  ]


# --- running -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Live:
  run: Run
  proc: subprocess.Popen
  claim: Claim
  log: object
  start: float
  beat: float


def child_env(cache: str) -> dict:
  """The runs' environment: this one, plus a shared JAX compilation cache when `cache` is set."""
  env = dict(os.environ)
  if cache and "JAX_COMPILATION_CACHE_DIR" not in env:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    # Every program, not only those compiling for over a second (the default): on a CPU most
    # of a small run's start-up is many sub-second compilations.
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def execute(
  runs: list[Run],
  out: str,
  *,
  jobs=1,
  heartbeat_s=60.0,
  stale_after_s=900.0,
  settle_s=2.0,
  compilation_cache="",
) -> list[str]:
  """Trains every run that is neither finished nor claimed, `jobs` at a time.

  Returns:
    The names of the runs that failed (non-zero exit), with the log to read.
  """
  pending, live, failed = list(runs), [], []
  total = len(runs)
  env = child_env(compilation_cache)

  def start(run: Run) -> None:
    workdir = os.path.join(out, run.name)
    if is_done(run, out):
      print(f"[{total - len(pending)}/{total}] {run.name}: finished, skipped", flush=True)
      return
    os.makedirs(workdir, exist_ok=True)
    claim = Claim(workdir)
    holder = claim.take(stale_after_s, settle_s)
    if holder is not None:
      print(
        f"[{total - len(pending)}/{total}] {run.name}: claimed by {holder.get('host')} "
        f"pid {holder.get('pid')}, skipped",
        flush=True,
      )
      return
    log = open(os.path.join(workdir, LOG_FILE), "a")  # noqa: SIM115 (the child writes it)
    log.write(f"\n$ {run.command(out)}\n")
    log.flush()
    proc = subprocess.Popen(
      [sys.executable, *run.args(out)], stdout=log, stderr=subprocess.STDOUT, cwd=_ROOT, env=env
    )
    now = time.time()
    live.append(_Live(run, proc, claim, log, now, now))
    print(f"[{total - len(pending)}/{total}] {run.name}: training (pid {proc.pid})", flush=True)

  def finish(item: _Live, rc: int) -> None:
    item.log.close()
    wall = time.time() - item.start
    workdir = os.path.join(out, item.run.name)
    if rc == 0:
      done = {"args": item.run.args(), "wall_s": wall, "host": socket.gethostname()}
      _write_json(os.path.join(workdir, DONE_FILE), {**done, "at": time.strftime("%c %Z")})
      print(f"    {item.run.name}: done in {wall:.0f} s", flush=True)
    else:
      failed.append(f"{item.run.name} (exit {rc}; see {os.path.join(workdir, LOG_FILE)})")
      print(f"    {item.run.name}: FAILED, exit {rc} after {wall:.0f} s", flush=True)
    item.claim.release()

  try:
    while pending or live:
      while pending and len(live) < jobs:
        start(pending.pop(0))
      for item in list(live):
        rc = item.proc.poll()
        if rc is not None:
          live.remove(item)
          finish(item, rc)
        elif time.time() - item.beat >= heartbeat_s:
          item.claim.refresh()
          item.beat = time.time()
      if live:
        time.sleep(0.5)
  finally:
    for item in live:  # Interrupted (Ctrl-C): stop our trainers; they resume next time.
      item.proc.terminate()
      item.proc.wait()
      item.log.close()
      item.claim.release()
  return failed


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summary(suite: Suite, runs: list[Run], total: int, smoke: bool) -> str:
  """The first line printed: the suite, how many of its runs are selected, where and how long."""
  count = f"{len(runs)} runs" if len(runs) == total else f"{len(runs)} of {total} runs"
  name = f"{suite.name} (smoke)" if smoke else suite.name
  return f"suite {name}: {count}; {suite.where}; {suite.smoke_wall if smoke else suite.wall}."


def main(argv):
  del argv
  if FLAGS.suite not in SUITES:
    raise app.UsageError(f"--suite must be one of {', '.join(SUITES)}, got {FLAGS.suite!r}.")
  if not FLAGS.out and not FLAGS.dry_run:
    raise app.UsageError("--out DIR is required.")
  if FLAGS.out:
    try:
      workdir_lock.require_local(FLAGS.out, "--out")
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  curves_from = []  # Read (and so checked) before anything trains, used by the report.
  for path in FLAGS.curves_from:
    try:
      curves_from.append(reproduce_report.read_curves_csv(path))
    except (OSError, KeyError, ValueError) as e:
      raise app.UsageError(
        f"--curves_from={path}: not a readable curves.csv ({type(e).__name__}: {e}); pass the "
        "curves.csv an earlier report of this suite wrote."
      ) from None
  suite = SUITES[FLAGS.suite]
  out = FLAGS.out or "DIR"
  seeds = [int(s) for s in FLAGS.seeds]
  extra = [*FLAGS.set, *pipeline_overrides(FLAGS.pipeline_microbatches)]
  all_runs = suite_runs(suite, smoke=FLAGS.smoke, seeds=seeds, extra=extra)
  runs = select(all_runs, FLAGS.only)
  print(summary(suite, runs, len(all_runs), FLAGS.smoke))
  if FLAGS.dry_run:
    for run in runs:
      print(f"{run.name}\n  {run.command(out)}")
    planned = "pipeline_time.schedule" + (" and total_steps" if FLAGS.budget == "time" else "")
    print(f"  (and --config.{planned} from the plan, made from measured op costs at the start)")
    return
  out = os.path.abspath(out)  # The runs start in the repository root.
  os.makedirs(out, exist_ok=True)
  failed = []
  try:
    planned = check_budget(out, FLAGS.budget)
    if not FLAGS.report_only:
      env = child_env(FLAGS.compilation_cache.replace("{out}", out))
      planned = make_plan(runs, out, FLAGS.budget, FLAGS.pipeline_microbatches, env)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  all_runs = with_plan(all_runs, planned)
  runs = with_plan(runs, planned)
  if not FLAGS.report_only:
    failed = execute(
      runs,
      out,
      jobs=FLAGS.jobs,
      heartbeat_s=FLAGS.heartbeat_s,
      stale_after_s=FLAGS.stale_after_s,
      settle_s=FLAGS.claim_settle_s,
      compilation_cache=FLAGS.compilation_cache.replace("{out}", out),
    )
  finished = [r for r in all_runs if is_done(r, out)]
  try:
    written = reproduce_report.write(
      out,
      suite=f"{suite.name}{' (smoke)' if FLAGS.smoke else ''}",
      runs=finished,
      # Only what this command asked for counts as missing (--only narrows it); the table
      # still holds every finished run in DIR, e.g. those another host trained.
      missing=[r.name for r in runs if r not in finished],
      microbatches=FLAGS.pipeline_microbatches,
      curves_from=curves_from,
    )
  except reproduce_report.CurvesMismatch as e:  # The runs themselves are kept.
    raise app.UsageError(f"{e} Drop that --curves_from file; rerun with --report_only.") from None
  with open(written[0]) as f:
    print("\n" + f.read())
  print("Written:\n  " + "\n  ".join(written))
  if failed:
    print("FAILED runs:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
