"""The suites `scripts.reproduce` trains: which experiments, strategy variants and seeds.

`quick`: the offline stdlib Transformer and digits ResNet, K = 4, 3 seeds, on a 2-core CPU.
`frontier`: the stdlib Transformer alone at its config's 400 steps, evaluated every 50, for
equal-time comparisons (`--budget=time`, docs/frontier.md).
`cifar10` and `cifar100`: the authors' recipe, 3 seeds. `imagenet` and `lm1b`: 1 seed, at
accelerator scale. Every suite trains local, pairwise, 3wise and global under both combine rules
wherever the two rules give a different backward plan (`ilbp.interlock.backward_plan`; local is
the same under both, so it runs once).

A run is one experiment under one strategy, combine rule and seed; `Run.args` is the command
line of the experiment binary that trains it. `scripts.reproduce` decides where and when.
"""

from __future__ import annotations

import dataclasses
import os
import shlex

from ilbp.interlock import plan_variants

STRATEGIES = ("local", "pairwise", "3wise", "global")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One config, trained under every strategy variant and seed of a suite.

  Attributes:
    label: short name, the first part of its runs' names, e.g. "stdlib".
    binary: the experiment module, e.g. "experiments.transformer".
    config: the config file.
    stages: K.
    overrides: FIELD=VALUE pairs passed as --config.FIELD=VALUE; "{out}" becomes DIR.
    smoke_overrides: used instead of `overrides` under --smoke (with the config's runlocal=1).
  """

  label: str
  binary: str
  config: str
  stages: int
  overrides: tuple[str, ...] = ()
  smoke_overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Suite:
  """Experiments × strategy variants × seeds.

  Attributes:
    name: what `--suite` takes.
    where: the hardware the suite is meant for.
    experiments: the configs it trains.
    seeds: the seeds of a full run (a smoke run takes the first).
    wall: how long the full suite takes there.
    smoke_wall: how long its smoke version (`--smoke`) takes.
  """

  name: str
  where: str
  experiments: tuple[Experiment, ...]
  seeds: tuple[int, ...]
  wall: str
  smoke_wall: str = "seconds to a minute a run (runlocal configs: mostly start-up and compiling)"


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: an experiment under one strategy, combine rule and seed."""

  experiment: Experiment
  strategy: str
  combine: str
  combine_matters: bool  # False where both rules give the same plan (local): not in the name.
  seed: int
  smoke: bool = False
  extra: tuple[str, ...] = ()  # --set FIELD=VALUE, for every run.

  @property
  def name(self) -> str:
    rule = f"-{self.combine}" if self.combine_matters else ""
    return f"{self.experiment.label}-{self.strategy}{rule}-s{self.seed}"

  @property
  def variant(self) -> str:
    """The table row: "pairwise (sum)", or just "local" where the rule makes no difference."""
    return f"{self.strategy} ({self.combine})" if self.combine_matters else self.strategy

  def args(self, out: str = "{out}") -> list[str]:
    """The binary's arguments after `python`; `out` replaces "{out}" (DIR)."""
    e = self.experiment
    arg = f"strategy={self.strategy},stages={e.stages},combine={self.combine}"
    arg += ",runlocal=1" if self.smoke else ""
    overrides = e.smoke_overrides if self.smoke else e.overrides
    return [
      "-m",
      e.binary,
      f"--config={e.config}:{arg}",
      f"--workdir={os.path.join(out, self.name)}",
      f"--config.seed={self.seed}",
      *(f"--config.{o}".replace("{out}", out) for o in (*overrides, *self.extra)),
    ]

  def command(self, out: str) -> str:
    return shlex.join(["python", *self.args(out)])


def variants(num_stages: int, strategies=STRATEGIES) -> list[tuple[str, str, bool]]:
  """(strategy, combine, combine_matters) for every distinct backward plan, in table order,
  under both combine rules (`ilbp.interlock.plan_variants`): local runs once, and e.g. 3wise
  at K = 3 is global."""
  return plan_variants(num_stages, strategies)


_STDLIB, _DIGITS = (
  "experiments/configs/transformer_stdlib.py",
  "experiments/configs/resnet_digits.py",
)
SUITES = {
  s.name: s
  for s in [
    Suite(
      "quick",
      "this 2-core CPU box, offline",
      (
        Experiment(
          "stdlib",
          "experiments.transformer",
          _STDLIB,
          4,
          overrides=(
            "total_steps=150",
            "optimizer.warmup_steps=15",
            "eval_every_steps=50",
            "checkpoint_every_steps=50",
            "log_every_steps=25",
            "dataset.cache_dir={out}/data_cache",  # Tokenize the corpus once for all runs.
          ),
          smoke_overrides=("dataset.cache_dir={out}/data_cache",),
        ),
        Experiment(
          "digits",
          "experiments.resnet",
          _DIGITS,
          4,
          overrides=("eval_every_steps=50", "checkpoint_every_steps=150", "log_every_steps=50"),
        ),
      ),
      (0, 1, 2),
      wall="56 min for all 42 runs, measured on a shared box (stdlib 150 steps: 80-190 s a "
      "run; digits 300 steps: 17-27 s)",
      smoke_wall="2-3 min for its 14 runs at --jobs=2, measured in the test suite (runlocal "
      "configs, a few steps each: mostly start-up and compiling)",
    ),
    Suite(
      "frontier",
      "this 2-core CPU box, offline; meant for --budget=time (docs/frontier.md)",
      (
        Experiment(
          "stdlib",
          "experiments.transformer",
          _STDLIB,
          4,
          overrides=(
            # The config's 400 steps and warm-up 40; evaluated often enough to draw curves.
            "eval_every_steps=50",
            "checkpoint_every_steps=100",
            "log_every_steps=25",
            "dataset.cache_dir={out}/data_cache",
          ),
          smoke_overrides=("dataset.cache_dir={out}/data_cache",),
        ),
      ),
      (0, 1, 2),
      wall="35-50 min a seed at M = 4 with --jobs=2 (2963 steps; measured on this box with other "
      "work beside it)",
    ),
    *(
      Suite(
        name,
        "one Cloud TPU VM (v3-8 or larger) or GPU host per run; TFDS data under --set "
        "dataset.data_dir=…",
        (Experiment(name, "experiments.resnet", f"experiments/configs/resnet_{name}.py", 4),),
        (0, 1, 2),
        wall="not measured; the authors' recipe, 200 epochs a run",
      )
      for name in ("cifar10", "cifar100")
    ),
    Suite(
      "imagenet",
      "one Cloud TPU VM (v3-8 or larger) per run; ImageNet prepared by hand, --set "
      "dataset.data_dir=…",
      (Experiment("imagenet", "experiments.resnet", "experiments/configs/resnet_imagenet.py", 4),),
      (0,),
      wall="not measured, days a run; one seed (add --seeds=0,1,2)",
    ),
    Suite(
      "lm1b",
      "one Cloud TPU VM (v3-8) or GPU host per run",
      (
        Experiment("lm1b", "experiments.transformer", "experiments/configs/transformer_lm1b.py", 4),
      ),
      (0,),
      wall="not measured, 200k steps a run; one seed (add --seeds)",
    ),
  ]
}


def suite_runs(suite: Suite, *, smoke=False, seeds=None, extra=()) -> list[Run]:
  """Every run of `suite`, in the order they train.

  Args:
    suite: the suite.
    smoke: the tiny version: runlocal configs, the suite's first seed (unless `seeds`).
    seeds: seeds instead of the suite's.
    extra: FIELD=VALUE pairs added to every run as --config.FIELD=VALUE.

  Returns:
    The runs, seed by seed: a suite stopped part-way holds every strategy of the first seeds.
  """
  seeds = tuple(seeds) if seeds else (suite.seeds[:1] if smoke else suite.seeds)
  return [
    Run(e, name, combine, matters, seed, smoke, tuple(extra))
    for seed in seeds
    for e in suite.experiments
    for name, combine, matters in variants(e.stages)
  ]
