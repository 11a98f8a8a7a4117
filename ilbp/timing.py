"""One way to time a piece of JAX work: the median wall time of complete runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_ms(fn: Callable, repeats: int, warmup: int = 1) -> float:
  """Median milliseconds of `fn()` run to completion (`jax.block_until_ready`), after `warmup`
  calls that are not timed (compilation, first-touch allocation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)
