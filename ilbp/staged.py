"""A network cut depthwise into K stages, with an auxiliary head on every stage but the last.

`StagedModel` holds K Flax stage modules and K-1 head modules and turns them into the pure
functions `ilbp.interlock` works on. Module convention (every model family follows it):

  stage_k(x, train: bool = False) -> a_k          stage K's output is the task logits
  head_k(a_k, train: bool = False) -> logits      k = 1..K-1

Dropout draws from the "dropout" RNG stream; BatchNorm keeps its running statistics in the
"batch_stats" collection. Variables are split into `params` (trained) and `state` (everything
else, e.g. batch_stats), each laid out as {"stages": (v_1..v_K), "heads": (v_1..v_{K-1})}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ilbp import interlock
from ilbp.strategy import Strategy

PyTree = Any


def _split(variables: dict) -> tuple[PyTree, PyTree]:
  variables = dict(variables)
  params = variables.pop("params", {})
  return params, variables


class StagedModel:
  """K stage modules and K-1 auxiliary heads.

  Attributes:
    stages: the K stage modules, applied in order.
    heads: the K-1 head modules; head k reads stage k's output.
    info: free-form facts a model family reports about itself (e.g. the blocks or layers in
      each stage, per-head cost); the trainer logs it.
  """

  def __init__(
    self, stages: Sequence[nn.Module], heads: Sequence[nn.Module], info: dict | None = None
  ):
    if not stages:
      raise ValueError("A StagedModel needs at least one stage.")
    if len(heads) != len(stages) - 1:
      raise ValueError(
        f"A StagedModel with {len(stages)} stages needs {len(stages) - 1} heads "
        f"(one per stage but the last), got {len(heads)}."
      )
    self.stages = tuple(stages)
    self.heads = tuple(heads)
    self.info = dict(info or {})

  @property
  def num_stages(self) -> int:
    return len(self.stages)

  def init(self, rng: jax.Array, inputs: jax.Array) -> tuple[PyTree, PyTree]:
    """Initialises every stage and head on an example batch.

    Args:
      rng: PRNG key; stage k and head k get independent keys folded from it.
      inputs: an example input batch (only its shape and dtype matter).

    Returns:
      (params, state), each {"stages": tuple, "heads": tuple}.
    """
    params, state = {"stages": [], "heads": []}, {"stages": [], "heads": []}
    rng = _init_key(rng)
    a = inputs
    for k, stage in enumerate(self.stages):
      key = jax.random.fold_in(rng, 2 * k)
      variables = stage.init({"params": key, "dropout": key}, a, train=False)
      p, s = _split(variables)
      params["stages"].append(p)
      state["stages"].append(s)
      a = stage.apply(variables, a, train=False)
      if k < len(self.heads):
        hkey = jax.random.fold_in(rng, 2 * k + 1)
        hp, hs = _split(self.heads[k].init({"params": hkey, "dropout": hkey}, a, train=False))
        params["heads"].append(hp)
        state["heads"].append(hs)
    return _freeze(params), _freeze(state)

  def stage_fns(
    self, state: PyTree, *, train: bool, rng: jax.Array | None = None
  ) -> tuple[list[Callable], list[Callable]]:
    """Pure functions for `ilbp.interlocking_grads(..., has_aux=True)`.

    Args:
      state: non-parameter variables as returned by `init`.
      train: training mode (batch statistics, dropout).
      rng: dropout key; stage k and head k get independent keys folded from it.

    Returns:
      (stage_fns, head_fns): `f_k(params_k, a) -> (a_k, new_state_k)` and
      `h_k(head_params_k, a_k) -> (logits, new_head_state_k)`.
    """
    stage_fns = [
      _module_fn(m, s, train, _fold(rng, 2 * k))
      for k, (m, s) in enumerate(zip(self.stages, state["stages"]))
    ]
    head_fns = [
      _module_fn(m, s, train, _fold(rng, 2 * k + 1))
      for k, (m, s) in enumerate(zip(self.heads, state["heads"]))
    ]
    return stage_fns, head_fns

  def apply(
    self, params: PyTree, state: PyTree, inputs: jax.Array, *, train: bool = False, rng=None
  ) -> tuple[list[jax.Array], PyTree]:
    """One forward pass through every stage and head (no gradients).

    Returns:
      (logits, new_state): K logits, heads 1..K-1 then the last stage's output.
    """
    stage_fns, head_fns = self.stage_fns(state, train=train, rng=rng)
    logits, new_state = [], {"stages": [], "heads": []}
    a = inputs
    for k, f in enumerate(stage_fns):
      a, s = f(params["stages"][k], a)
      new_state["stages"].append(s)
      if k < len(head_fns):
        out, hs = head_fns[k](params["heads"][k], a)
        logits.append(out)
        new_state["heads"].append(hs)
    logits.append(a)
    return logits, _freeze(new_state)

  def grads(
    self,
    params: PyTree,
    state: PyTree,
    inputs: jax.Array,
    labels: PyTree,
    *,
    strategy: Strategy,
    loss_fn: Callable,
    aux_loss_fn: Callable | None = None,
    rng: jax.Array | None = None,
    loss_has_aux: bool = False,
  ) -> tuple[PyTree, PyTree, dict]:
    """Interlocking gradients of one training batch, from a single forward pass.

    Every stage and head runs forward exactly once in training mode, so each BatchNorm's
    running statistics are updated once per step.

    Returns:
      (grads, new_state, metrics), grads laid out like `params`.
    """
    stage_fns, head_fns = self.stage_fns(state, train=True, rng=rng)
    stage_grads, head_grads, metrics, aux = interlock.interlocking_grads(
      stage_fns,
      head_fns,
      list(params["stages"]),
      list(params["heads"]),
      inputs,
      labels,
      strategy=strategy,
      loss_fn=loss_fn,
      aux_loss_fn=aux_loss_fn,
      has_aux=True,
      loss_has_aux=loss_has_aux,
    )
    return _freeze({"stages": stage_grads, "heads": head_grads}), _freeze(aux), metrics

  def backprop_grads(
    self,
    params: PyTree,
    state: PyTree,
    inputs: jax.Array,
    labels: PyTree,
    *,
    loss_fn: Callable,
    aux_loss_fn: Callable | None = None,
    rng: jax.Array | None = None,
    loss_has_aux: bool = False,
  ) -> tuple[PyTree, PyTree, dict]:
    """The cost baseline: end-to-end backprop, heads trained on detached activations.

    Same arguments and results as `grads` (metrics empty), so a train step built with
    `train.make_train_step` can run it in place of the engine for benchmarks.
    """
    scalar = lambda fn: None if fn is None else (lambda z, y: fn(z, y)[0]) if loss_has_aux else fn
    stage_fns, head_fns = self.stage_fns(state, train=True, rng=rng)
    stage_grads, head_grads, aux = interlock.backprop_grads(
      stage_fns,
      head_fns,
      list(params["stages"]),
      list(params["heads"]),
      inputs,
      labels,
      loss_fn=scalar(loss_fn),
      aux_loss_fn=scalar(aux_loss_fn),
      has_aux=True,
    )
    return _freeze({"stages": stage_grads, "heads": head_grads}), _freeze(aux), {}

  def spec_grads(
    self,
    params: PyTree,
    state: PyTree,
    inputs: jax.Array,
    labels: PyTree,
    *,
    strategy: Strategy,
    loss_fn: Callable,
    aux_loss_fn: Callable | None = None,
    rng: jax.Array | None = None,
  ) -> PyTree:
    """`jax.grad` of the stop_gradient spec `interlocking_loss`, in training mode.

    The oracle that `grads` must equal, and the cost of a naive implementation. Batch statistics
    are those of the training-mode forward pass; the updated statistics are dropped.
    """
    stage_fns, head_fns = self.stage_fns(state, train=True, rng=rng)
    drop_aux = lambda fns: [lambda p, a, f=f: f(p, a)[0] for f in fns]

    def total(p):
      return interlock.interlocking_loss(
        drop_aux(stage_fns),
        drop_aux(head_fns),
        list(p["stages"]),
        list(p["heads"]),
        inputs,
        labels,
        strategy=strategy,
        loss_fn=loss_fn,
        aux_loss_fn=aux_loss_fn,
      )

    return jax.grad(total)(params)


def _init_key(rng: jax.Array) -> jax.Array:
  """An RBG key derived from `rng` for parameter initialisation.

  XLA:CPU compiles the default threefry generator once per parameter shape, which made
  initialising a small ResNet slower than training it; RBG (also what large TPU codebases
  use) compiles once. Deterministic for a given `rng` and backend.
  """
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and "rbg" in str(jax.random.key_impl(rng)):
    return rng
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def _fold(rng, i):
  return None if rng is None else jax.random.fold_in(rng, i)


def _freeze(tree: dict) -> dict:
  return {key: tuple(value) for key, value in tree.items()}


def _module_fn(module: nn.Module, state: PyTree, train: bool, rng) -> Callable:
  """`fn(params, x) -> (y, new_state)` for one module, threading its mutable collections."""
  mutable = list(state.keys()) if train else False
  rngs = {"dropout": rng} if rng is not None else {}

  def fn(params, x):
    variables = {"params": params, **state}
    if mutable:
      y, new_state = module.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
      return y, dict(new_state)
    return module.apply(variables, x, train=train, rngs=rngs), state

  return fn
