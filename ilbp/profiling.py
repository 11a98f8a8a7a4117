"""XLA's own accounting of a jitted function: FLOPs and compiled memory.

FLOPs from `cost_analysis()` are deterministic for a given program and backend, so tests can
assert ratios between strategies; wall-clock timings belong in `scripts/` benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable


def compiled_cost(fn: Callable, *args, **kwargs) -> dict:
  """Compiles `jax.jit(fn)` for `args` and reports XLA's cost and memory analysis.

  Args:
    fn: the function to compile (jitted here if it is not already).
    *args, **kwargs: example arguments (arrays or ShapeDtypeStructs).

  Returns:
    {"flops": float, "bytes_accessed": float, "temp_bytes": int, "argument_bytes": int,
     "output_bytes": int}; memory fields are -1 where the backend does not report them.
  """
  import jax

  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  compiled = jitted.lower(*args, **kwargs).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # Older jax returned one dict per device program.
    cost = cost[0]
  out = {
    "flops": float(cost.get("flops", 0.0)),
    "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
  }
  memory = compiled.memory_analysis()
  for name, attr in (
    ("temp_bytes", "temp_size_in_bytes"),
    ("argument_bytes", "argument_size_in_bytes"),
    ("output_bytes", "output_size_in_bytes"),
  ):
    out[name] = int(getattr(memory, attr, -1)) if memory is not None else -1
  return out
