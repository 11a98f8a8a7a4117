"""Training strategies: how far each auxiliary loss's gradient travels back.

A strategy is a value (`Strategy(reach, combine)`), never a code path: the engine in
`ilbp.interlock` reads `reach` and `combine` and nothing else. The gradient each strategy
gives: docs/design.md, "The gradient contract".

  local     reach 1   every stage learns from its own head only (greedy / DGL-style)
  pairwise  reach 2   each loss trains the stage that produced it and the one below
  <n>wise   reach n   each loss trains n consecutive stages
  global    reach K   end-to-end backpropagation of the task loss
"""

from __future__ import annotations

import dataclasses
import re

COMBINE_RULES = ("furthest", "sum")
NAMED_REACHES = {"local": 1, "pairwise": 2, "global": None}
_NWISE = re.compile(r"^(\d+)wise$")


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How far gradients travel.

  Attributes:
    reach: number of stages each loss trains (1 = local); `None` means all stages (global).
    combine: "furthest" (a stage learns from the furthest loss that reaches it, as in the
      authors' implementation) or "sum" (a stage learns from the sum of every loss that
      reaches it).
  """

  reach: int | None
  combine: str = "furthest"

  def __post_init__(self):
    if self.reach is not None and (not isinstance(self.reach, int) or self.reach < 1):
      raise ValueError(
        f"Strategy reach must be an integer >= 1 or None (global), got {self.reach!r}."
      )
    if self.combine not in COMBINE_RULES:
      raise ValueError(f"Unknown combine rule {self.combine!r}; valid: {', '.join(COMBINE_RULES)}.")

  def reach_for(self, num_stages: int) -> int:
    """The effective reach on a network of `num_stages` stages (a reach >= K is global)."""
    if num_stages < 1:
      raise ValueError(f"num_stages must be >= 1, got {num_stages}.")
    return num_stages if self.reach is None else min(self.reach, num_stages)

  def target(self, stage: int, num_stages: int) -> int:
    """t(k) = min(k + n - 1, K): the furthest loss whose gradient reaches `stage` (1-based)."""
    return min(stage + self.reach_for(num_stages) - 1, num_stages)

  @property
  def name(self) -> str:
    """The canonical name, e.g. "pairwise" or "3wise"; `strategy(s.name)` recreates `s`."""
    if self.reach is None:
      return "global"
    return {1: "local", 2: "pairwise"}.get(self.reach, f"{self.reach}wise")


def strategy(name: str | int | Strategy, combine: str = "furthest") -> Strategy:
  """Parses a strategy name.

  Args:
    name: "local", "pairwise", "global", "<n>wise" (e.g. "3wise", n >= 1), a reach as an int,
      or a Strategy (returned with `combine` applied).
    combine: "furthest" (default) or "sum".

  Returns:
    An immutable Strategy.

  Raises:
    ValueError: for an unknown name, a reach below 1, or an unknown combine rule; the message
      lists what is valid.
  """
  if isinstance(name, Strategy):
    return Strategy(name.reach, combine)
  if isinstance(name, int) and not isinstance(name, bool):
    return Strategy(name, combine)
  valid = "'local', 'pairwise', 'global', or '<n>wise' with n >= 1 (e.g. '3wise')"
  if not isinstance(name, str):
    raise ValueError(f"Strategy name must be a string ({valid}), got {name!r}.")
  key = name.strip().lower()
  if key in NAMED_REACHES:
    return Strategy(NAMED_REACHES[key], combine)
  match = _NWISE.match(key)
  if match:
    reach = int(match.group(1))
    if reach < 1:
      raise ValueError(f"Strategy {name!r} has reach {reach}; reach must be >= 1. Valid: {valid}.")
    return Strategy(reach, combine)
  raise ValueError(f"Unknown strategy {name!r}. Valid: {valid}.")
