"""ilbp.timing: the shared median timer blocks on the work it times."""

import time

import jax.numpy as jnp
import pytest

from ilbp import timing


def test_median_ms_counts_calls_and_measures_the_work():
  calls = []

  def work():
    calls.append(1)
    time.sleep(0.002)
    return jnp.ones(3)

  ms = timing.median_ms(work, repeats=3, warmup=2)
  assert len(calls) == 5
  assert 2.0 <= ms < 1000.0
  out, ms = timing.timed_ms(work)
  assert out.shape == (3,) and ms >= 2.0
  with pytest.raises(ValueError, match="repeats"):
    timing.median_ms(work, repeats=0)


def test_iqr():
  assert timing.iqr([5.0]) == 0.0
  assert timing.iqr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(3.0)
