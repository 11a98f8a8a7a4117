"""Where to cut a network into stages: XLA's FLOPs per block, and the cut that evens them out.

A pipeline runs at the pace of its slowest stage, so `balanced_split` cuts a chain of blocks
into contiguous stages whose costliest one is as cheap as possible. The costs are FLOPs that
XLA counts for one batch-1 inference call of each block (`ilbp.profiling.compiled_cost`):
deterministic for a program and backend, and nothing is executed, only compiled.

A model family assembles its own chain (`ilbp.models.resnet`: stem + residual blocks, the
classifier and the auxiliary heads) and passes the modules here.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ilbp import profiling


def module_flops(module: nn.Module, shape: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
  """FLOPs XLA counts for one inference call of `module`, and its output shape.

  Args:
    module: a Flax module whose `apply(variables, x)` is its inference call.
    shape: the input's shape (float32).

  Returns:
    (FLOPs, output shape). Variables and input are abstract: only compilation runs.
  """
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  out = jax.eval_shape(module.apply, variables, x)
  return profiling.compiled_cost(module.apply, variables, x)["flops"], tuple(out.shape)


def chain_flops(
  modules: Sequence[nn.Module], shape: tuple[int, ...]
) -> tuple[tuple[float, ...], tuple[tuple[int, ...], ...]]:
  """FLOPs of each module of a chain, each fed the one before's output.

  Args:
    modules: the chain, in order. Modules that are equal (same fields) and see the same input
      shape are compiled once: blocks of one group after the first usually are.
    shape: the first module's input shape.

  Returns:
    (FLOPs of each module, output shape of each module).
  """
  seen: dict[tuple, tuple[float, tuple[int, ...]]] = {}
  flops, shapes = [], []
  for module in modules:
    key = (module, shape)
    if key not in seen:
      seen[key] = module_flops(module, shape)
    cost, shape = seen[key]
    flops.append(cost)
    shapes.append(shape)
  return tuple(flops), tuple(shapes)


def balanced_split(
  costs: Sequence[float], num_stages: int, end_costs: Sequence[float] | None = None
) -> tuple[int, ...]:
  """Cuts costs into contiguous stages so that the costliest stage is as cheap as possible.

  Dynamic programming over (stages used, items covered): exact, O(num_stages · n²).

  Args:
    costs: cost of each item (block), in order.
    num_stages: number of non-empty stages, 1 <= num_stages <= len(costs).
    end_costs: optional; end_costs[i] is added to a stage that ends after item i, except the
      last stage (an auxiliary head at the stage's output).

  Returns:
    Items per stage, summing to len(costs).
  """
  n = len(costs)
  if not 1 <= num_stages <= n:
    raise ValueError(
      f"num_stages must be between 1 and {n} (the number of items), got {num_stages}."
    )
  if end_costs is not None and len(end_costs) != n:
    raise ValueError(f"end_costs needs one entry per item ({n}), got {len(end_costs)}.")
  prefix = [0.0]
  for c in costs:
    prefix.append(prefix[-1] + c)
  inf = float("inf")
  # best[k][i]: smallest achievable max-stage cost when the first i items form k stages;
  # start[k][i]: where the k-th stage begins in that optimum.
  best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
  start = [[0] * (n + 1) for _ in range(num_stages + 1)]
  best[0][0] = 0.0
  for k in range(1, num_stages + 1):
    for i in range(k, n - (num_stages - k) + 1):
      end = end_costs[i - 1] if end_costs is not None and k < num_stages else 0.0
      for j in range(k - 1, i):
        cost = max(best[k - 1][j], prefix[i] - prefix[j] + end)
        if cost < best[k][i]:
          best[k][i], start[k][i] = cost, j
  sizes, i = [], n
  for k in range(num_stages, 0, -1):
    j = start[k][i]
    sizes.append(i - j)
    i = j
  return tuple(reversed(sizes))
