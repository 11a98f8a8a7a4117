"""Shared test fixtures: a small Flax conv + BatchNorm staged model; multi-device runs.

Each pytest worker, and each subprocess of `run_with_devices` (with what it starts in turn),
keeps JAX's persistent compilation cache in a fresh directory of its own, for every program
(other subprocesses run without one): tests build new executors for each case, and their
jitted programs, recompiled per instance, are often the same HLO (one process sweeping the
dataflow executor over 15 backward plans: 101 s without, 66 s with). A directory per process:
no two processes that run at once share one, no test reads what another run compiled, and a
process that exits normally removes its directory.

Every test process (pytest's, and the subprocesses tests start) compiles with LLVM at
optimisation level 0 (`TEST_XLA_FLAGS`): the suite is mostly compilation of tiny programs, and
it runs in 9.5 instead of 12.5 minutes on 2 cores. Benchmarks and runs keep XLA's defaults.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ilbp import placement
from ilbp.staged import StagedModel

# XLA flags of every test process (this one, and what tests start). Tests check semantics, not
# speed, and their time is mostly compilation: LLVM's optimisation level 0 compiles faster.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def devices_env(num_devices: int = 1) -> dict:
  """The environment for a test subprocess with `num_devices` forced CPU devices: this one's
  (TEST_XLA_FLAGS included) with JAX_NUM_CPU_DEVICES, which jax reads when it is imported."""
  return dict(os.environ, **{placement.CPU_DEVICES_ENV: str(num_devices)})


# XLA reads XLA_FLAGS when a backend starts (the first device query), not at import.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def _epath_knows_ram() -> None:
  """TensorFlow's in-memory filesystem (ram://) stands in for a bucket (gs://) in tests. ilbp
  reads and writes a bucket through etils.epath, which knows gs://, s3://, az:// and hf:// only:
  register ram:// the way it registers those, read through tf.io.gfile as gs:// is."""
  from etils.epath import backend, gpath, register

  gpath._URI_PREFIXES = (*gpath._URI_PREFIXES, "ram://")
  gpath._URI_SCHEMES = gpath._URI_SCHEMES | {"ram"}
  gpath._URI_MAP_ROOT["ram://"] = "/ram/"
  gpath._PREFIX_TO_BACKEND["ram"] = backend.tf_backend
  register.register_path_cls("ram://")(gpath.PosixGPath)


_epath_knows_ram()


# Cache every program, however fast its compile (the defaults skip those under 1 s).
_CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0}


def _private_cache_dir() -> str:
  path = tempfile.mkdtemp(prefix="ilbp-jax-cache-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


jax.config.update("jax_compilation_cache_dir", _private_cache_dir())
for _name, _value in _CACHE_SETTINGS.items():
  jax.config.update(_name, _value)


class ConvBNStage(nn.Module):
  """conv 3×3 → BatchNorm → ReLU (→ pool + dense when it is the last stage)."""

  features: int
  num_classes: int | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    if self.num_classes is not None:
      x = nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
    return x


class PoolHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def conv_bn_model(num_stages: int = 4, width: int = 8, num_classes: int = 10) -> StagedModel:
  stages = [ConvBNStage(width * (k + 1)) for k in range(num_stages - 1)]
  stages.append(ConvBNStage(width * num_stages, num_classes))
  return StagedModel(stages, [PoolHead(num_classes) for _ in range(num_stages - 1)])


@pytest.fixture
def image_batch():
  rng = jax.random.PRNGKey(0)
  images = jax.random.normal(rng, (16, 8, 8, 3))
  labels = jax.random.randint(jax.random.fold_in(rng, 1), (16,), 0, 10)
  return {"image": images, "label": labels}


def run_with_devices(script: str, num_devices: int, *, timeout: int = 900) -> str:
  """Runs `script` in a fresh Python with `num_devices` forced CPU devices; returns stdout.

  A process has one device count, fixed when its backends start, and a pytest worker runs
  many test files: multi-device tests run in their own process (tests/ and the repository
  root on the path), so the other tests keep one device. Fails with the script's stderr.
  """
  env = devices_env(num_devices)
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), os.getcwd()])
  env.update({name.upper(): str(value) for name, value in _CACHE_SETTINGS.items()})
  with tempfile.TemporaryDirectory(prefix="ilbp-jax-cache-") as cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    out = subprocess.run(
      [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out.stdout


class Preempted(Exception):
  """Raised by the data stream of `crash_after`: a run killed between checkpoints."""


def build_with_batches(edit):
  """A `families.build` whose training batches pass through `edit(i, step, batch)` (i counts
  from 0 per run, step is the optimizer step the batch feeds)."""
  from ilbp import families

  real = families.build

  def build(config, workdir, shard=None, labels_only=False):
    built = real(config, workdir, shard, labels_only=labels_only)
    source = built.data

    def train_batches(start):
      for i, batch in enumerate(source.train_batches(start)):
        yield edit(i, start + 1 + i, batch)

    data = type(source)(**{**source.__dict__, "train_batches": train_batches})
    return families.Built(built.model, data, built.task, built.input_spec)

  return build


def preempt_at(num_batches: int):
  """An `edit` for `build_with_batches`: raises Preempted when batch `num_batches` (0-based) is
  asked for."""

  def edit(i, step, batch):
    if i == num_batches:
      raise Preempted(f"killed at batch {i} (step {step})")
    return batch

  return edit


def crash_after(num_batches: int):
  """Makes every run built from now on raise Preempted when it asks for batch `num_batches`
  (0-based); returns the real `families.build` to put back."""
  from ilbp import families

  real = families.build
  families.build = build_with_batches(preempt_at(num_batches))
  return real


def with_overrides(config, **overrides):
  """`config` with dotted fields set: with_overrides(c, **{"execution.microbatches": 2})."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def checkpoint_params(workdir: str, step: int | None = None) -> list:
  """Every stage's params in the checkpoint of `step` (default: the newest) of `workdir`."""
  from ilbp.checkpoint import Checkpointer

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.latest_step() if step is None else step
    return [s["params"] for s in ckpt.restore(step)["stages"]]
  finally:
    ckpt.close()


def image_problem():
  """16 numpy 8×8×3 images with labels (seeded) and the input spec: the pipeline tests' batch."""
  import numpy as np

  rng = np.random.default_rng(0)
  images = {
    "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
    "label": rng.integers(0, 10, size=16).astype(np.int32),
  }
  return images, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32), rng


def assert_evaluated_alike(reference: dict, sums: dict) -> None:
  """Two executors' evaluation sums of every head agree to 1e-5."""
  import numpy as np

  for key in reference:
    np.testing.assert_allclose(sums[key], reference[key], rtol=1e-5, atol=1e-5, err_msg=key)


def assert_trained_alike(reference, state, reference_metrics: dict, metrics: dict) -> None:
  """Two executors' TrainStates and step metrics agree to 1e-5 relative to each element, or to
  the tensor's largest element: different XLA fusions of the same float32 sums differ in the
  last bits."""
  import numpy as np

  assert sorted(reference_metrics) == sorted(metrics), (sorted(reference_metrics), sorted(metrics))
  paths = jax.tree_util.tree_flatten_with_path(reference)[0]
  for (path, x), y in zip(paths, jax.tree.leaves(state), strict=True):
    scale = float(np.max(np.abs(x))) if np.size(x) else 0.0
    np.testing.assert_allclose(
      y, x, rtol=1e-5, atol=max(1e-5 * scale, 1e-7), err_msg=jax.tree_util.keystr(path)
    )
  for key in reference_metrics:
    np.testing.assert_allclose(metrics[key], reference_metrics[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)  # fmt: skip
