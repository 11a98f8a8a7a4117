"""The table, CSVs and plots of a `scripts.reproduce` suite, built from its runs' metrics.jsonl.

`write(out, suite=, runs=, missing=, curves_from=)` writes, for the runs that finished (and the
seeds of earlier curves.csv files, `curves_from`, whose workdirs are gone):

  table.md     per experiment and evaluation split (test; validation when the config holds one
               out): one row per strategy (and combine rule) with the number of seeds and the
               mean ± sd over them of every head's final accuracy or perplexity, the gap
               recovered at the output
               ((m - local) / (global - local), 0 = local, 1 = global, whichever direction is
               better), training steps/s, and the modelled pipeline time per step on K devices;
               where the runs logged pipeline/seconds (`ilbp.pipeline_time`), also the schedule
               each strategy was modelled on, its time per step from its measured op costs, the
               speed-up retained ((t_global - t_s) / (t_global - t_local), 1 = local's speed,
               0 = global's), the modelled time at which its output first reached global's and
               local's final output quality, and the bytes each stage holds in flight
  results.csv  the same numbers, one row per (experiment, split, strategy, combine); `seeds`
               is, as in table.md, how many seeds the mean and sd are over
  runs.csv     every run's own final metrics (one row per run and split), naming its seed
  curves.csv   every run's evaluations (one row per run, split and evaluated step): the step,
               its modelled pipeline seconds where the run logged them, and every head's
               metric, so the curves can be drawn again once the workdirs are gone
               (`scripts.reproduce --report_only --curves_from=FILE`)
  plots/       <exp>_<split>_heads.png: each head's metric vs modelled pipeline time
               (pipeline/seconds; vs step for runs without it), mean with a ±1 sd band;
               <exp>_<split>_tradeoff.png: output metric vs modelled time per step (the
               runs' measured op costs where they logged pipeline/seconds);
               gantt_K<K>_<strategy>_<combine>.png: the pipeline schedule of each strategy

Two models of time. "modelled time/step" is `ilbp.execution.schedule` with `relative_costs`
(op-cost ratios of one measurement of resnet20 stages, `schedule.RELATIVE`, in units of one
stage forward) under 1F1B. pipeline/seconds and the columns beside it come from each run's own
`pipeline_costs.json`: op costs of the run's model measured on this host (the dataflow
executor's programs, each timed alone), under the schedule the run was modelled on. Neither is
a measurement of these runs' wall time: the runs themselves train one fused program.
"""

from __future__ import annotations

import csv
import math
import os
import statistics

from ilbp import pipeline_time, results
from ilbp.execution import gantt, schedule
from ilbp.strategy import strategy as parse_strategy

SPLIT_NAMES = {"eval": "test", "val": "validation"}


def _mean_sd(values: list[float]) -> tuple[float, float]:
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return math.nan, math.nan
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _fmt(mean: float, sd: float, kind: str) -> str:
  """Formats as 99.2 ± 0.3 (accuracy, in %) or 6.00 ± 0.05 (others); no sd for one seed."""
  if math.isnan(mean):
    return "—"
  scale, digits = (100.0, 1) if kind == "accuracy" else (1.0, 2)
  text = f"{scale * mean:.{digits}f}"
  return text if math.isnan(sd) else f"{text} ± {scale * sd:.{digits}f}"


def modelled_time(strategy: str, combine: str, num_stages: int, microbatches: int) -> float:
  """Steady-state time per step of the 1F1B pipeline schedule with `relative_costs`, in stage
  forwards."""
  sched = schedule.build(parse_strategy(strategy, combine), num_stages, microbatches)
  return sched.predict()["time_per_step"]


def pipeline_model(workdir: str, strategy: str, combine: str) -> dict | None:
  """A run's modelled pipeline, from its pipeline_costs.json (None without one): the schedule,
  M and seconds per step of its last session, and the bytes of residuals each stage holds in
  flight under that schedule (`schedule.predict_step`)."""
  data = pipeline_time.read(workdir)
  if not data or not data.get("segments") or "costs" not in data:
    return None
  seg = data["segments"][-1]
  costs = pipeline_time.costs_from_json(data["costs"])
  pred = schedule.predict_step(
    costs, parse_strategy(strategy, combine), seg["microbatches"], seg["schedule"],
    seg["continuous"],
  )  # fmt: skip
  return {
    "schedule": seg["schedule"],
    "microbatches": seg["microbatches"],
    "seconds_per_step": seg["seconds_per_step"],
    "inflight_bytes": pred["inflight_bytes_per_stage"],
  }


def mean_curve(row: dict, k: int) -> list[tuple[int, float, float, float | None]]:
  """Head k's (1-based) metric over the steps evaluated in every seed: (step, mean, sd,
  modelled pipeline seconds there, or None where a run did not log them)."""
  by_seed = [dict(c) for c in row["curves"].values()]
  steps = sorted(set.intersection(*(set(c) for c in by_seed))) if by_seed else []
  out = []
  for step in steps:
    values = [c[step][k - 1] for c in by_seed if c[step][k - 1] is not None]
    if not values:
      continue
    times = [t.get(step) for t in row["times"].values()]
    time = statistics.fmean(times) if times and None not in times else None
    out.append((step, *_mean_sd(values), time))
  return out


def time_to_reach(row: dict, target: float) -> float | None:
  """The modelled pipeline seconds at which the output head's mean first reached `target`
  (at least it for accuracy, at most for perplexity); None when never, or without times."""
  if math.isnan(target):
    return None
  sign = 1.0 if row["kind"] == "accuracy" else -1.0
  for _, mean, _, time in mean_curve(row, row["stages"]):
    if sign * (mean - target) >= -1e-12 * max(1.0, abs(target)):
      return time
  return None


def aggregate(runs, out: str, microbatches: int) -> list[dict]:
  """One dict per (experiment, split, variant) with per-head means and sds over seeds.

  Args:
    runs: finished `experiments.suites.Run`s.
    out: the suite directory.
    microbatches: M for the modelled pipeline time.

  Returns:
    Rows in run order, each with experiment, split, variant, strategy, combine, kind, stages,
    seeds (the list of them), head{k} (mean, sd) and per_seed lists, output (mean, sd), gap,
    steps_per_sec, modelled, modelled_vs_global, curves ({seed: [(step, [value of each
    head])]}), times ({seed: {step: pipeline/seconds}}, empty for runs without them),
    pipeline (`pipeline_model` of its first seed, or None), speedup_retained,
    time_to_global and time_to_local (None where not reached or not modelled).
  """
  groups: dict[tuple, list] = {}
  for run in runs:
    rows = results.read_metrics(os.path.join(out, run.name))
    groups.setdefault((run.experiment.label, run.variant), []).append((run, rows))
  table = []
  for (label, variant), members in groups.items():
    run0 = members[0][0]
    K = run0.experiment.stages
    finals = [results.final_eval(rows) for _, rows in members]
    kind = results.metric_kind(finals[0])
    rates = [results.throughput(rows) for _, rows in members]
    model = modelled_time(run0.strategy, run0.combine, K, microbatches)
    pipeline = pipeline_model(os.path.join(out, run0.name), run0.strategy, run0.combine)
    for split in results.SPLITS:
      if not any(f"{split}/head1/{kind}" in f for f in finals):
        continue
      row = {
        "experiment": label,
        "config": run0.experiment.config,
        "split": split,
        "variant": variant,
        "strategy": run0.strategy,
        "combine": run0.combine,
        "kind": kind,
        "stages": K,
        "seeds": [run.seed for run, _ in members],
        "steps": max((rows[-1]["step"] for _, rows in members if rows), default=0),
        "steps_per_sec": _mean_sd(rates),
        "modelled": model,
        "pipeline": pipeline,
        "curves": {},
        "times": {},
      }
      for k in range(1, K + 1):
        row[f"head{k}_per_seed"] = [f.get(f"{split}/head{k}/{kind}", math.nan) for f in finals]
      _summarise_heads(row)
      for run, rows in members:
        key = f"{split}/head1/{kind}"
        row["curves"][run.seed] = [
          (r["step"], [r.get(f"{split}/head{k}/{kind}") for k in range(1, K + 1)])
          for r in rows
          if key in r
        ]
        row["times"][run.seed] = {
          r["step"]: r[pipeline_time.METRIC] for r in rows if pipeline_time.METRIC in r
        }
      table.append(row)
  _relate(table)
  return table


def _summarise_heads(row: dict) -> None:
  """Each head's (mean, sd) over the row's seeds, and the output head's, from `head{k}_per_seed`."""
  K = row["stages"]
  for k in range(1, K + 1):
    row[f"head{k}"] = _mean_sd(row[f"head{k}_per_seed"])
  row["output"] = row[f"head{K}"]


def _relate(table: list[dict]) -> None:
  """The columns that relate a row to local's and global's of its experiment and split: gap
  recovered, modelled time over global's, speed-up retained, time to their final quality."""
  for row in table:
    same = [r for r in table if (r["experiment"], r["split"]) == (row["experiment"], row["split"])]
    local = next((r for r in same if r["strategy"] == "local"), None)
    # Global is end-to-end backprop under the furthest rule (under "sum" it also adds the heads).
    glob = next((r for r in same if r["strategy"] == "global" and r["combine"] == "furthest"), None)
    denom = glob["output"][0] - local["output"][0] if glob and local else math.nan
    ok = math.isfinite(denom) and denom != 0
    gap = (row["output"][0] - local["output"][0]) / denom if ok else math.nan
    row["gap"] = gap + 0.0  # Local's own gap is 0, not -0.
    row["modelled_vs_global"] = row["modelled"] / glob["modelled"] if glob else math.nan
    t = lambda r: r["pipeline"]["seconds_per_step"] if r and r["pipeline"] else math.nan
    span = t(glob) - t(local)
    row["speedup_retained"] = (t(glob) - t(row)) / span if span else math.nan
    row["time_to_global"] = time_to_reach(row, glob["output"][0]) if glob else None
    row["time_to_local"] = time_to_reach(row, local["output"][0]) if local else None


class CurvesMismatch(ValueError):
  """A curves.csv whose runs do not fit the suite's (`add_seeds`)."""


def read_curves_csv(path: str) -> dict:
  """A curves.csv (`write_curves_csv`) -> {(experiment, split, strategy, combine): {seed:
  [(step, [each head's metric], pipeline seconds or None)]}}, points in step order."""
  out: dict = {}
  with open(path, newline="") as f:
    for r in csv.DictReader(f):
      heads = sorted((k for k in r if k.startswith("head") and r[k]), key=lambda k: int(k[4:]))
      key = (r["experiment"], r["split"], r["strategy"], r["combine"])
      seconds = float(r["pipeline_seconds"]) if r["pipeline_seconds"] else None
      point = (int(r["step"]), [float(r[h]) for h in heads], seconds)
      out.setdefault(key, {}).setdefault(int(r["seed"]), []).append(point)
  for seeds in out.values():
    for points in seeds.values():
      points.sort(key=lambda p: p[0])
  return out


def add_seeds(table: list[dict], curves: dict) -> list[str]:
  """Adds to `table` (from `aggregate`) the seeds of `curves` (`read_curves_csv`: runs whose
  workdirs are gone) that its rows do not hold: their curves and times, and their final
  metrics (each run's last evaluation), then recomputes the means and the related columns.
  Steps/s and the pipeline model stay those of the rows' own runs.

  Returns:
    "experiment split strategy (combine) seed s" for every seed added.
  """
  added = []
  for row in table:
    key = (row["experiment"], row["split"], row["strategy"], row["combine"])
    for seed, points in sorted(curves.get(key, {}).items()):
      if seed in row["seeds"] or not points:
        continue
      K = row["stages"]
      if len(points[-1][1]) != K:
        raise CurvesMismatch(
          f"curves for {' '.join(map(str, key))} seed {seed} have {len(points[-1][1])} heads, "
          f"the runs have {K}: not the same experiment."
        )
      row["seeds"] = [*row["seeds"], seed]
      row["curves"][seed] = [(step, heads) for step, heads, _ in points]
      row["times"][seed] = {step: t for step, _, t in points if t is not None}
      for k in range(1, K + 1):
        row[f"head{k}_per_seed"] = [*row[f"head{k}_per_seed"], points[-1][1][k - 1]]
      _summarise_heads(row)
      row["steps"] = max(row["steps"], points[-1][0])
      added.append(f"{row['experiment']} {row['split']} {row['variant']} seed {seed}")
  _relate(table)
  return added


def markdown(table: list[dict], suite: str, missing: list[str], microbatches: int, added=()) -> str:
  """table.md: one markdown table per (experiment, split), then the notes (`added`: the seeds
  read from curves.csv files, `add_seeds`)."""
  lines = [f"# Suite {suite}", ""]
  for exp, split in dict.fromkeys((r["experiment"], r["split"]) for r in table):
    rows = [r for r in table if (r["experiment"], r["split"]) == (exp, split)]
    K, kind = rows[0]["stages"], rows[0]["kind"]
    unit = " (%)" if kind == "accuracy" else ""
    lines += [
      f"## {exp}: {SPLIT_NAMES[split]} {kind}{unit}",
      "",
      f"`{rows[0]['config']}`, K = {K}, {rows[0]['steps']} steps, "
      f"seeds {', '.join(map(str, sorted({s for r in rows for s in r['seeds']})))}.",
      "",
    ]
    heads = [f"head {k}" + (" (output)" if k == K else "") for k in range(1, K + 1)]
    timed = any(r["pipeline"] for r in rows)
    extra = [
      "schedule",
      "ms/step (measured costs)",
      "speed-up retained",
      "T to global's output (s)",
      "T to local's output (s)",
      "in flight MB per stage",
    ]
    lines.append(
      f"| strategy | seeds | {' | '.join(heads)} | gap recovered | steps/s "
      f"| modelled time/step (K={K}, M={microbatches}) | vs global |"
      + ("".join(f" {c} |" for c in extra) if timed else "")
    )
    lines.append("|---" * (len(heads) + 6 + (len(extra) if timed else 0)) + "|")
    for r in rows:
      cells = [_fmt(*r[f"head{k}"], kind) for k in range(1, K + 1)]
      sps = r["steps_per_sec"]
      gap = "—" if math.isnan(r["gap"]) else f"{r['gap']:.2f}"
      vs = r["modelled_vs_global"]
      vs = "—" if math.isnan(vs) else f"{vs:.3f}"  # No global run finished: nothing to divide.
      lines.append(
        f"| {r['variant']} | {len(r['seeds'])} | {' | '.join(cells)} | "
        f"{gap} | {_fmt(*sps, 'steps/s')} | "
        f"{r['modelled']:.2f} | {vs} |"
        + ("".join(f" {c} |" for c in _timed_cells(r)) if timed else "")
      )
    lines.append("")
  R = schedule.RELATIVE
  lines += [
    "Notes:",
    "- Each cell is the mean ± sample sd over seeds of the final evaluation "
    "(test split = eval/…, validation split = val/…); accuracy in %, perplexity per token.",
    "- Gap recovered = (m − m_local) / (m_global − m_local) on the output head's means, with "
    "global = end-to-end backprop (furthest rule): 0 = local, 1 = global, whether the metric "
    "is higher-better (accuracy) or lower-better (perplexity).",
    "- steps/s: the median over each run's logged intervals after the first (which includes "
    "compilation), mean ± sd over seeds; one fused program per step on this host, timed on a "
    "machine that may be shared.",
    "- Modelled time/step: `ilbp.execution.schedule` with the relative-cost model (op-cost "
    "ratios measured on resnet20 stages, `schedule.RELATIVE`: forward 1, input gradient "
    f"{R['backward_input']}, weight gradient {R['backward_weight']}, both from one call "
    f"{R['backward_both']}, aux head {R['head']}), K stages on K devices, M = {microbatches} "
    "microbatches, continuous, 1F1B; a model of the schedule, not a measurement of these runs.",
    "- A strategy shown without a combine rule trains the same under both rules.",
  ]
  if any(r["pipeline"] for r in table):
    lines += [
      "- schedule … in flight: each run's own modelled pipeline (`ilbp.pipeline_time`, "
      "pipeline_costs.json in its workdir): op costs of its model measured on this host, each "
      "program timed alone, K devices, M = its config's pipeline_time.microbatches, the "
      "schedule named (the fastest that applies to the strategy, under `scripts.reproduce`; "
      "global's is the strongest global baseline). ms/step is its prediction; pipeline/seconds "
      "(the x-axis of the curves) is that times the steps.",
      "- Speed-up retained = (t_global − t_s) / (t_global − t_local) on those ms/step: 1 = as "
      "fast as local, 0 = as slow as global (furthest rule).",
      "- T to global's / local's output: the modelled pipeline seconds at which the mean over "
      "seeds of the output head first reached the final mean of global (furthest) / local, at "
      "the steps evaluated in every seed; — = not reached.",
      "- In flight: the residual bytes each stage holds at the schedule's peak (microbatches in "
      "flight × one microbatch's VJP residuals), stage 1 first.",
    ]
  if missing:
    lines.append(f"- Not finished (left out above): {', '.join(missing)}.")
  if added:
    lines.append(
      "- Read from curves.csv (their workdirs gone; final metric = last evaluation; steps/s "
      f"and the pipeline columns from the other seeds): {', '.join(added)}."
    )
  return "\n".join(lines) + "\n"


def _timed_cells(r: dict) -> list[str]:
  """The table cells of a row's own modelled pipeline (— where it has none)."""
  p = r["pipeline"]
  if not p:
    return ["—"] * 6
  # + 0.0: a -0.0 (global's 0 over a negative difference) prints as 0.00.
  fmt = lambda v: "—" if v is None or math.isnan(v) else f"{round(v, 2) + 0.0:.2f}"
  return [
    p["schedule"],
    f"{1e3 * p['seconds_per_step']:.2f}",
    fmt(r["speedup_retained"]),
    fmt(r["time_to_global"]),
    fmt(r["time_to_local"]),
    "/".join(f"{b / 1e6:.2f}" for b in p["inflight_bytes"]),
  ]


def write_csv(table: list[dict], path: str) -> None:
  K = max((r["stages"] for r in table), default=0)
  fields = ["experiment", "config", "split", "strategy", "combine", "metric", "seeds", "steps"]
  fields += [f"head{k}_{s}" for k in range(1, K + 1) for s in ("mean", "sd")]
  fields += ["output_mean", "output_sd", "gap_recovered", "steps_per_sec_mean"]
  fields += ["steps_per_sec_sd", "modelled_time_per_step", "modelled_vs_global"]
  fields += ["schedule", "pipeline_seconds_per_step", "speedup_retained", "time_to_global"]
  fields += ["time_to_local", "inflight_bytes_per_stage"]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    for r in table:
      row = {key: r[key] for key in ("experiment", "config", "split", "strategy", "combine")}
      row |= {"metric": r["kind"], "seeds": len(r["seeds"]), "steps": r["steps"]}
      for k in range(1, r["stages"] + 1):
        row[f"head{k}_mean"], row[f"head{k}_sd"] = r[f"head{k}"]
      row["output_mean"], row["output_sd"] = r["output"]
      row["steps_per_sec_mean"], row["steps_per_sec_sd"] = r["steps_per_sec"]
      row |= {"gap_recovered": r["gap"], "modelled_time_per_step": r["modelled"]}
      row["modelled_vs_global"] = r["modelled_vs_global"]
      p = r["pipeline"]
      if p:
        row |= {"schedule": p["schedule"], "pipeline_seconds_per_step": p["seconds_per_step"]}
        row["inflight_bytes_per_stage"] = "/".join(str(b) for b in p["inflight_bytes"])
      row |= {key: r[key] for key in ("speedup_retained", "time_to_global", "time_to_local")}
      w.writerow(row)


def write_runs_csv(table: list[dict], path: str) -> None:
  """Every run's own final metric per head (the values the means are taken over)."""
  K = max((r["stages"] for r in table), default=0)
  fields = ["experiment", "split", "strategy", "combine", "seed", "metric"]
  fields += [f"head{k}" for k in range(1, K + 1)]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    for r in table:
      for i, seed in enumerate(r["seeds"]):
        row = {key: r[key] for key in ("experiment", "split", "strategy", "combine")}
        row |= {"seed": seed, "metric": r["kind"]}
        row |= {f"head{k}": r[f"head{k}_per_seed"][i] for k in range(1, r["stages"] + 1)}
        w.writerow(row)


def write_curves_csv(table: list[dict], path: str) -> None:
  """Every run's evaluations: the points each curve is drawn through."""
  K = max((r["stages"] for r in table), default=0)
  fields = ["experiment", "split", "strategy", "combine", "seed", "metric", "step"]
  fields += ["pipeline_seconds", *(f"head{k}" for k in range(1, K + 1))]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    for r in table:
      for seed, points in r["curves"].items():
        times = r["times"].get(seed, {})
        for step, values in points:
          row = {key: r[key] for key in ("experiment", "split", "strategy", "combine")}
          row |= {"seed": seed, "metric": r["kind"], "step": step}
          row["pipeline_seconds"] = times.get(step)
          row |= {f"head{k}": v for k, v in enumerate(values, 1)}
          w.writerow(row)


def _axis_label(kind: str, split: str) -> str:
  return f"{SPLIT_NAMES[split]} " + ("accuracy (%)" if kind == "accuracy" else "perplexity")


def plot_curves(rows: list[dict], path: str) -> None:
  """Each head's metric vs modelled pipeline time (vs step when a run has no pipeline/seconds),
  one line per strategy: mean over seeds, band ±1 sd."""
  curves_figure(rows).savefig(path, format="png")


def curves_figure(rows: list[dict]):
  """The figure `plot_curves` saves (a matplotlib Figure)."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  K, kind, split = rows[0]["stages"], rows[0]["kind"], rows[0]["split"]
  scale = 100.0 if kind == "accuracy" else 1.0
  fig = Figure(figsize=(4.2 * K, 4.2), dpi=110)
  axes = fig.subplots(1, K, squeeze=False)[0]
  # Time on the x-axis when every point of every curve has it (evaluated in every seed).
  timed = all(t is not None for r in rows for k in range(K) for *_, t in mean_curve(r, k + 1))
  for i, r in enumerate(rows):
    colour = f"C{i % 10}"
    for k, ax in enumerate(axes):
      points = mean_curve(r, k + 1)
      if not points:
        continue
      xs = [time if timed else step for step, _, _, time in points]
      mean = [scale * m for _, m, _, _ in points]
      sd = [scale * (0.0 if math.isnan(s) else s) for _, _, s, _ in points]
      ax.plot(xs, mean, color=colour, marker="o", markersize=3, label=r["variant"])
      ax.fill_between(
        xs,
        [m - s for m, s in zip(mean, sd)],
        [m + s for m, s in zip(mean, sd)],
        color=colour,
        alpha=0.18,
        linewidth=0,
      )
  pipelines = [r["pipeline"] for r in rows if r["pipeline"]]
  m = pipelines[0]["microbatches"] if pipelines else "?"
  for k, ax in enumerate(axes):
    ax.set_title(f"head {k + 1}" + (" (output)" if k + 1 == K else ""))
    if timed:
      ax.set_xlabel(f"modelled pipeline time (s; K={K} devices, M={m})")
    else:
      ax.set_xlabel("training step")
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Steps are whole: no 2.5 ticks.
    ax.set_ylabel(_axis_label(kind, split))
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=9)
  seeds = max(len(r["seeds"]) for r in rows)
  better = "higher" if kind == "accuracy" else "lower"
  fig.suptitle(
    f"{rows[0]['experiment']}: {_axis_label(kind, split)} per head vs "
    f"{'modelled time' if timed else 'step'} ({better} is better; "
    f"line: mean over {seeds} seed(s), band: ±1 sd)"
  )
  fig.tight_layout(rect=(0, 0.1, 1, 1))  # Room for the legend below.
  return fig


def plot_tradeoff(rows: list[dict], microbatches: int, path: str) -> None:
  """Final output metric (mean ± sd over seeds) vs modelled pipeline time per step: from the
  runs' measured op costs where every row has them, else the relative-cost model."""
  from matplotlib.figure import Figure

  K, kind, split = rows[0]["stages"], rows[0]["kind"], rows[0]["split"]
  scale = 100.0 if kind == "accuracy" else 1.0
  measured = all(r["pipeline"] for r in rows)
  if measured:
    rows = [{**r, "modelled": 1e3 * r["pipeline"]["seconds_per_step"]} for r in rows]
    m = rows[0]["pipeline"]["microbatches"]
    what = f"ms; measured op costs, K={K}, M={m}"
  else:
    what = f"units of one stage forward; K={K}, M={microbatches}, relative-cost model"
  fig = Figure(figsize=(7.5, 5), dpi=110)
  ax = fig.add_subplot()
  shared_x: dict[float, int] = {}  # Labels of points at the same modelled time alternate sides.
  for i, r in enumerate(rows):
    mean, sd = r["output"]
    ax.errorbar(
      r["modelled"],
      scale * mean,
      yerr=None if math.isnan(sd) else scale * sd,
      fmt="o",
      color=f"C{i % 10}",
      capsize=4,
      label=r["variant"],
    )
    j = shared_x[round(r["modelled"], 6)] = shared_x.get(round(r["modelled"], 6), -1) + 1
    ax.annotate(
      r["variant"],
      (r["modelled"], scale * mean),
      xytext=(-7, 4) if j % 2 else (7, 4),
      textcoords="offset points",
      ha="right" if j % 2 else "left",
      fontsize=8,
    )
  ax.set_xlabel(f"modelled pipeline time per step ({what}; lower is faster)")
  better = "higher" if kind == "accuracy" else "lower"
  ax.set_ylabel(f"output head {_axis_label(kind, split)} ({better} is better)")
  ax.set_title(f"{rows[0]['experiment']}: output metric vs modelled time per step")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, format="png")


def write(
  out: str, *, suite: str, runs, missing: list[str], microbatches: int = 8, curves_from=()
) -> list[str]:
  """Writes table.md, results.csv, runs.csv, curves.csv and the plots; returns their paths,
  table first. `curves_from`: the curves of earlier runs of the same suite whose workdirs are
  gone, each as `read_curves_csv` read its curves.csv; their seeds join the means, curves and
  curves.csv (`add_seeds`)."""
  table = aggregate(runs, out, microbatches)
  added = []
  for curves in curves_from:
    added += add_seeds(table, curves)
  plots = os.path.join(out, "plots")
  os.makedirs(plots, exist_ok=True)
  written = [os.path.join(out, "table.md"), os.path.join(out, "results.csv")]
  written += [os.path.join(out, "runs.csv"), os.path.join(out, "curves.csv")]
  with open(written[0], "w") as f:
    f.write(markdown(table, suite, missing, microbatches, added))
  write_csv(table, written[1])
  write_runs_csv(table, written[2])
  write_curves_csv(table, written[3])
  for exp, split in dict.fromkeys((r["experiment"], r["split"]) for r in table):
    rows = [r for r in table if (r["experiment"], r["split"]) == (exp, split)]
    written.append(os.path.join(plots, f"{exp}_{SPLIT_NAMES[split]}_heads.png"))
    plot_curves(rows, written[-1])
    written.append(os.path.join(plots, f"{exp}_{SPLIT_NAMES[split]}_tradeoff.png"))
    plot_tradeoff(rows, microbatches, written[-1])
  for K, strategy, combine in dict.fromkeys(
    (r["stages"], r["strategy"], r["combine"]) for r in table
  ):
    sched = schedule.build(parse_strategy(strategy, combine), K, microbatches)
    written.append(os.path.join(plots, f"gantt_K{K}_{strategy}_{combine}.png"))
    gantt.gantt(
      sched.simulate(2),
      written[-1],
      title=f"{strategy} ({combine}), K={K}, M={microbatches}: relative-cost model, 2 steps",
    )
  return written
