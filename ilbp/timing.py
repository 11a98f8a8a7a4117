"""Wall-clock timing of jitted work: the one timer the benchmarks and executors share.

JAX dispatches asynchronously, so a call returns before its work is done: every timer here
blocks on the call's outputs (`jax.block_until_ready`) before it stops the clock.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def timed_ms(fn: Callable[[], Any]) -> tuple[Any, float]:
  """Runs `fn()` to completion.

  Returns:
    (its outputs, milliseconds from the call until every output is ready).
  """
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, 1e3 * (time.perf_counter() - start)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Median milliseconds of `fn()` run to completion.

  Args:
    fn: the work, called with no arguments (a jitted call, usually).
    repeats: timed calls (at least 1).
    warmup: untimed calls first (compilation, caches).
  """
  if repeats < 1:
    raise ValueError(f"repeats must be at least 1, got {repeats}.")
  for _ in range(warmup):
    timed_ms(fn)
  return statistics.median(timed_ms(fn)[1] for _ in range(repeats))


def iqr(values: list[float]) -> float:
  """Interquartile range (0 for fewer than two values): the spread a median is quoted with."""
  if len(values) < 2:
    return 0.0
  q1, _, q3 = statistics.quantiles(values, n=4)
  return q3 - q1


def machine() -> str:
  """The machine in words, for the header of every benchmark's figures.

  XLA:CPU picks other kernels on other CPUs (AVX2 or AVX-512, AMD or Intel), so a CPU figure
  means little without the CPU's model and vector extensions beside it: e.g.
  "jax 0.10.2 | cpu: 2 x cpu | AMD EPYC (avx2), 2 cores | python 3.12.3".
  """
  model, exts = platform.processor() or platform.machine(), []
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    info = ""
  for line in info.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "model name":
      model = value.strip()
    elif key.strip() == "flags":
      flags = set(value.split())
      exts = [e for e in ("avx512f", "avx2", "neon", "asimd") if e in flags]
      break
  cpu = f"{model} ({', '.join(exts)})" if exts else model
  devices = jax.devices()
  return (
    f"jax {jax.__version__} | {jax.default_backend()}: {len(devices)} x "
    f"{devices[0].device_kind} | {cpu}, {os.cpu_count()} cores | "
    f"python {platform.python_version()}"
  )
