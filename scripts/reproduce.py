"""Reproduces the paper's comparisons: one suite of runs, over strategies and seeds, then a table.

  python -m scripts.reproduce --suite quick --out runs/quick            # 56 min on a 2-core CPU
  python -m scripts.reproduce --suite cifar10 --out /mnt/bucket/cifar10 --dry_run
  python -m scripts.reproduce --suite quick --out /tmp/smoke --smoke    # tiny, end to end

The suites (`quick`, `cifar10`, `cifar100`, `imagenet`, `lm1b`: which configs, strategy
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
`--report_only` rebuilds the table and plots from what has finished. A failed run is reported
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

Outputs: `DIR/table.md`, `DIR/results.csv`, `DIR/runs.csv` and `DIR/plots/*.png`
(`scripts.reproduce_report` describes them).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import secrets
import socket
import subprocess
import sys
import time

from absl import app, flags

from experiments.suites import SUITES, Run, Suite, suite_runs
from ilbp import files, workdir_lock
from scripts import reproduce_report

FLAGS = flags.FLAGS
flags.DEFINE_string("suite", None, "Suite to run: quick, cifar10, cifar100, imagenet, lm1b.")
flags.DEFINE_string("out", None, "Directory holding one workdir per run, the table and plots.")
flags.DEFINE_list("only", [], "Run only the runs whose name matches one of these globs.")
flags.DEFINE_bool("dry_run", False, "Print the runs' commands and exit.")
flags.DEFINE_bool("smoke", False, "Tiny settings (runlocal configs, one seed): tests the plumbing.")
flags.DEFINE_list("seeds", [], "Seeds to run instead of the suite's.")
flags.DEFINE_multi_string(
  "set", [], "FIELD=VALUE added to every run as --config.FIELD=VALUE (e.g. dataset.data_dir=…)."
)
flags.DEFINE_bool("report_only", False, "Train nothing: write the table and plots from DIR.")
flags.DEFINE_integer("jobs", 1, "Runs trained at once on this host.")
flags.DEFINE_float("heartbeat_s", 60.0, "How often a live run refreshes its claim.")
flags.DEFINE_float("stale_after_s", 900.0, "A claim whose heartbeat is older is taken over.")
flags.DEFINE_float("claim_settle_s", 2.0, "Wait before reading a new claim back (multi-host).")
flags.DEFINE_integer("pipeline_microbatches", 8, "M for the modelled pipeline time per step.")
flags.DEFINE_string(
  "compilation_cache",
  "{out}/jax_cache",
  "JAX persistent compilation cache shared by the runs (seeds of a strategy compile the same "
  "programs); '' = none. A JAX_COMPILATION_CACHE_DIR already set wins.",
)

DONE_FILE = "DONE"
CLAIM_FILE = "claim.json"
LOG_FILE = "reproduce.log"


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
  suite = SUITES[FLAGS.suite]
  out = FLAGS.out or "DIR"
  seeds = [int(s) for s in FLAGS.seeds]
  all_runs = suite_runs(suite, smoke=FLAGS.smoke, seeds=seeds, extra=FLAGS.set)
  runs = select(all_runs, FLAGS.only)
  print(summary(suite, runs, len(all_runs), FLAGS.smoke))
  if FLAGS.dry_run:
    for run in runs:
      print(f"{run.name}\n  {run.command(out)}")
    return
  out = os.path.abspath(out)  # The runs start in the repository root.
  os.makedirs(out, exist_ok=True)
  failed = []
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
  written = reproduce_report.write(
    out,
    suite=f"{suite.name}{' (smoke)' if FLAGS.smoke else ''}",
    runs=finished,
    # Only what this command asked for counts as missing (--only narrows it); the table still
    # holds every finished run in DIR, e.g. those another host trained.
    missing=[r.name for r in runs if r not in finished],
    microbatches=FLAGS.pipeline_microbatches,
  )
  with open(written[0]) as f:
    print("\n" + f.read())
  print("Written:\n  " + "\n  ".join(written))
  if failed:
    print("FAILED runs:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
