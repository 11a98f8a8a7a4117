"""Strategy parsing: names, reach, combine rules and the errors for bad input."""

import pytest

import ilbp
from ilbp.strategy import Strategy


@pytest.mark.parametrize(
  "name, reach",
  [("local", 1), ("pairwise", 2), ("3wise", 3), ("7wise", 7), ("1wise", 1), ("global", None)],
)
def test_names_give_reach(name, reach):
  s = ilbp.strategy(name)
  assert s.reach == reach
  assert s.combine == "furthest"


def test_canonical_name_round_trips():
  for name in ("local", "pairwise", "3wise", "global"):
    assert ilbp.strategy(name).name == name
  assert ilbp.strategy("2wise").name == "pairwise"


def test_reach_at_least_num_stages_is_global():
  assert ilbp.strategy("global").reach_for(4) == 4
  assert ilbp.strategy("7wise").reach_for(4) == 4
  assert ilbp.strategy("pairwise").reach_for(4) == 2
  # t(k) = min(k + n - 1, K)
  assert [ilbp.strategy("pairwise").target(k, 4) for k in (1, 2, 3, 4)] == [2, 3, 4, 4]


def test_strategy_is_immutable_value():
  a, b = ilbp.strategy("pairwise", combine="sum"), Strategy(2, "sum")
  assert a == b and hash(a) == hash(b)
  with pytest.raises(AttributeError):
    a.reach = 3


@pytest.mark.parametrize("bad", ["lokal", "0wise", "wise", "-1wise", "", None, 2.5])
def test_unknown_names_list_valid_ones(bad):
  with pytest.raises(ValueError, match="pairwise"):
    ilbp.strategy(bad)


def test_reach_below_one_and_unknown_combine():
  with pytest.raises(ValueError, match=">= 1"):
    Strategy(0)
  with pytest.raises(ValueError, match="furthest, sum"):
    ilbp.strategy("local", combine="mean")
