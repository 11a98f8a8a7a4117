"""ilbp.models.split: the balanced cut on known costs, and XLA FLOPs along a chain of modules.

The cuts of real ResNets are checked against every alternative in tests/test_resnet.py.
"""

import flax.linen as nn
import pytest

from ilbp.models import split


def test_balanced_split_on_known_costs():
  assert split.balanced_split([1, 1, 1, 1], 2) == (2, 2)
  assert split.balanced_split([5, 1, 1, 1, 1, 1], 2) == (1, 5)
  assert split.balanced_split([3, 3, 3], 3) == (1, 1, 1)
  assert split.balanced_split([1, 2, 3], 1) == (3,)
  # A stage that ends after item 1 pays 10 more (its head): the even cut becomes the worst.
  assert split.balanced_split([1, 1, 1, 1], 2, end_costs=[0, 10, 0, 0]) == (1, 3)
  assert split.balanced_split([1, 1, 1, 1], 2, end_costs=[9, 9, 0, 0]) == (3, 1)
  # The last stage has no head: its end cost never counts.
  assert split.balanced_split([1, 1], 1, end_costs=[5, 5]) == (2,)
  with pytest.raises(ValueError, match="between 1 and 3"):
    split.balanced_split([1, 1, 1], 4)
  with pytest.raises(ValueError, match="one entry per item"):
    split.balanced_split([1, 1, 1], 2, end_costs=[1])


def test_chain_flops_follow_the_shapes_and_compile_equal_modules_once(monkeypatch):
  compiled = []
  measure = split.module_flops

  def counting(module, shape):
    compiled.append((module, shape))
    return measure(module, shape)

  monkeypatch.setattr(split, "module_flops", counting)
  chain = [nn.Dense(16), nn.Dense(16), nn.Dense(16), nn.Dense(4)]
  flops, shapes = split.chain_flops(chain, (1, 8))
  assert shapes == ((1, 16), (1, 16), (1, 16), (1, 4))
  # A matrix product counts 2·m·n·k FLOPs: 8->16 is half of 16->16, and 16->4 a quarter.
  assert flops[1] == flops[2] and flops[0] < flops[1] and flops[3] < flops[1]
  assert len(compiled) == 3  # The two 16->16 layers on (1, 16) inputs: compiled once.
