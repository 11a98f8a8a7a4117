"""Shared test fixtures: a small Flax conv + BatchNorm staged model; multi-device runs."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ilbp.staged import StagedModel


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

  XLA_FLAGS must be set before jax is imported, so multi-device tests run in their own
  process (tests/ and the repository root on the path). Fails with the script's stderr.
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), os.getcwd()])
  out = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out.stdout
