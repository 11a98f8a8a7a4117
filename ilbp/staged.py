"""A network cut depthwise into K stages, with an auxiliary head on every stage but the last.

`StagedModel` holds K Flax stage modules and K-1 head modules and turns them into explicit
functions of their arguments. Module convention (every model family follows it):

  stage_k(x, train: bool = False) -> a_k          stage K's output is the task logits
  head_k(a_k, train: bool = False) -> logits      k = 1..K-1

Dropout draws from the "dropout" RNG stream; BatchNorm keeps its running statistics in the
"batch_stats" collection. Variables are laid out **by stage**, so that stage k's whole state can
live on stage k's devices: `params` and `state` are K-tuples of {"stage": ..., "head": ...}
(the last stage's "head" is empty); `params` holds the trained variables, `state` everything
else (e.g. batch_stats).

The explicit per-stage functions (`stage_apply`, `head_apply`, `init_stage`) take everything as
arguments; the executors jit them one stage at a time. `gradients` computes one batch's
gradients of the whole model by one of three methods (the engine, the stop_gradient spec, or the
plain-backprop cost baseline) with one signature.
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
GRADIENT_METHODS = ("engine", "spec", "backprop")


def _split(variables: dict) -> tuple[PyTree, PyTree]:
  variables = dict(variables)
  params = variables.pop("params", {})
  return params, variables


def stage_keys(rng: jax.Array | None, k: int) -> tuple[jax.Array | None, jax.Array | None]:
  """The (stage, head) keys of stage k (0-based), folded from a step's or microbatch's key."""
  if rng is None:
    return None, None
  return jax.random.fold_in(rng, 2 * k), jax.random.fold_in(rng, 2 * k + 1)


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

  # --- One stage at a time -----------------------------------------------------------------

  def stage_apply(self, k: int, params, state, x, *, train: bool, rng=None):
    """a_k = f_k(θ_k, a_{k-1}): `(output, new_stage_state)`; params/state are stage k's."""
    return _apply(self.stages[k], params["stage"], state["stage"], x, train, stage_keys(rng, k)[0])

  def head_apply(self, k: int, params, state, a, *, train: bool, rng=None):
    """Head k's logits from a_k: `(logits, new_head_state)` (k < K-1)."""
    return _apply(self.heads[k], params["head"], state["head"], a, train, stage_keys(rng, k)[1])

  def init_stage(self, k: int, rng: jax.Array, input_spec: jax.ShapeDtypeStruct):
    """Initialises stage k (and its head) from its input's abstract shape alone.

    Jit it with stage k's output shardings to create the variables on stage k's devices.

    Args:
      k: 0-based stage index.
      rng: the model's init key (the same for every stage; stage k folds its own from it).
      input_spec: shape and dtype of a_{k-1} (for k = 0, of the network input).

    Returns:
      `(params_k, state_k)`, each {"stage": ..., "head": ...}.
    """
    rng = _init_key(rng)
    x = jnp.zeros(input_spec.shape, input_spec.dtype)
    key = jax.random.fold_in(rng, 2 * k)
    params, state = _split(self.stages[k].init({"params": key, "dropout": key}, x, train=False))
    head_params, head_state = {}, {}
    if k < len(self.heads):
      a = self.stages[k].apply({"params": params, **state}, x, train=False)
      hkey = jax.random.fold_in(rng, 2 * k + 1)
      head_params, head_state = _split(
        self.heads[k].init({"params": hkey, "dropout": hkey}, a, train=False)
      )
    return {"stage": params, "head": head_params}, {"stage": state, "head": head_state}

  def input_specs(self, inputs: Any) -> list[jax.ShapeDtypeStruct]:
    """The abstract input of every stage (a_0 .. a_{K-1}) for a network input like `inputs`."""
    specs = [jax.ShapeDtypeStruct(inputs.shape, inputs.dtype)]
    for k in range(self.num_stages - 1):
      init = lambda rng, k=k: self.init_stage(k, rng, specs[-1])
      params, state = jax.eval_shape(init, jax.random.key(0))
      out = jax.eval_shape(
        lambda p, s, x, k=k: self.stage_apply(k, p, s, x, train=False)[0], params, state, specs[-1]
      )
      specs.append(jax.ShapeDtypeStruct(out.shape, out.dtype))
    return specs

  # --- The whole model ---------------------------------------------------------------------

  def init(self, rng: jax.Array, inputs: jax.Array) -> tuple[tuple, tuple]:
    """Initialises every stage and head for inputs shaped like `inputs`.

    Args:
      rng: PRNG key; stage k and head k get independent keys folded from it.
      inputs: an example input batch (only its shape and dtype matter).

    Returns:
      (params, state), each a K-tuple of {"stage": ..., "head": ...}.
    """
    per_stage = [self.init_stage(k, rng, s) for k, s in enumerate(self.input_specs(inputs))]
    return tuple(p for p, _ in per_stage), tuple(s for _, s in per_stage)

  def stage_fns(
    self, state: PyTree, *, train: bool, rng: jax.Array | None = None
  ) -> tuple[list[Callable], list[Callable]]:
    """The functions `ilbp.interlocking_grads(..., has_aux=True)` takes, with `state` and `rng`
    bound: `f_k(stage_params_k, a) -> (a_k, new_stage_state_k)` and
    `h_k(head_params_k, a_k) -> (logits, new_head_state_k)`."""
    K = self.num_stages

    def stage_fn(k):
      return lambda p, a: self.stage_apply(k, {"stage": p}, state[k], a, train=train, rng=rng)

    def head_fn(k):
      return lambda p, a: self.head_apply(k, {"head": p}, state[k], a, train=train, rng=rng)

    return [stage_fn(k) for k in range(K)], [head_fn(k) for k in range(K - 1)]

  def apply(
    self, params: PyTree, state: PyTree, inputs: jax.Array, *, train: bool = False, rng=None
  ) -> tuple[list[jax.Array], tuple]:
    """One forward pass through every stage and head (no gradients).

    Returns:
      (logits, new_state): K logits, heads 1..K-1 then the last stage's output.
    """
    logits, new_state = [], []
    a = inputs
    for k in range(self.num_stages):
      a, s = self.stage_apply(k, params[k], state[k], a, train=train, rng=rng)
      hs = state[k]["head"]
      if k < len(self.heads):
        out, hs = self.head_apply(k, params[k], state[k], a, train=train, rng=rng)
        logits.append(out)
      new_state.append({"stage": s, "head": hs})
    logits.append(a)
    return logits, tuple(new_state)

  def gradients(
    self,
    params: PyTree,
    state: PyTree,
    inputs: jax.Array,
    labels: PyTree,
    *,
    loss_fn: Callable,
    strategy: Strategy | None = None,
    method: str = "engine",
    rng: jax.Array | None = None,
  ) -> tuple[tuple, tuple, dict]:
    """One batch's gradients of every stage and head, in training mode.

    Args:
      params, state: K-tuples of {"stage", "head"} as from `init`.
      inputs: the network input.
      labels: passed to `loss_fn` (e.g. the batch's targets).
      loss_fn: `loss_fn(logits, labels) -> (loss, metrics_dict)` for every head.
      strategy: the interlocking strategy (ignored by "backprop").
      method: "engine" (`interlocking_grads`: one forward, cotangents routed by strategy),
        "spec" (`jax.grad` of the stop_gradient composition `interlocking_loss`: the literal
        formulation, slower) or "backprop" (end-to-end backprop with heads trained on
        detached activations: the cost baseline, equal to the engine under "global").
      rng: dropout key; stage k and head k fold their own from it (`stage_keys`).

    Every stage and head runs its training-mode forward once per call as far as running
    statistics go: the new state is that of a single forward pass.

    Returns:
      (grads, new_state, metrics): grads laid out like `params`; metrics `head{k}/loss` and the
      loss's own metrics for k = 1..K.
    """
    if method not in GRADIENT_METHODS:
      raise ValueError(f"Unknown gradient method {method!r}; valid: {', '.join(GRADIENT_METHODS)}.")
    stage_fns, head_fns = self.stage_fns(state, train=True, rng=rng)
    sp = [p["stage"] for p in params]
    hp = [p["head"] for p in params[:-1]]
    if method == "engine":
      stage_grads, head_grads, metrics, aux = interlock.interlocking_grads(
        stage_fns, head_fns, sp, hp, inputs, labels, strategy=strategy, loss_fn=loss_fn,
        has_aux=True, loss_has_aux=True,
      )  # fmt: skip
    elif method == "spec":
      total = lambda sp, hp: interlock.interlocking_loss(
        stage_fns, head_fns, sp, hp, inputs, labels, strategy=strategy, loss_fn=loss_fn,
        has_aux=True,
      )  # fmt: skip
      (stage_grads, head_grads), (metrics, aux) = jax.grad(total, (0, 1), has_aux=True)(sp, hp)
    else:
      stage_grads, head_grads, aux = interlock.backprop_grads(
        stage_fns, head_fns, sp, hp, inputs, labels, loss_fn=lambda z, y: loss_fn(z, y)[0],
        has_aux=True,
      )  # fmt: skip
      metrics = {}
    return per_stage(stage_grads, head_grads), per_stage(aux["stages"], aux["heads"]), metrics


def per_stage(stage_trees: Sequence[PyTree], head_trees: Sequence[PyTree]) -> tuple:
  """K stage trees and K-1 head trees -> a K-tuple of {"stage", "head"} (last head empty)."""
  heads = [*head_trees, {}]
  return tuple({"stage": s, "head": h} for s, h in zip(stage_trees, heads))


def _init_key(rng: jax.Array) -> jax.Array:
  """An RBG key derived from `rng` for parameter initialisation.

  XLA:CPU compiles the default threefry generator once per parameter shape, which made
  initialising a small ResNet slower than training it; RBG (also what large TPU codebases
  use) compiles once. Deterministic for a given `rng` and backend.
  """
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and "rbg" in str(jax.random.key_impl(rng)):
    return rng
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def _apply(module: nn.Module, params, state, x, train: bool, rng) -> tuple[Any, dict]:
  """`(y, new_state)` for one module, threading its mutable collections in training mode."""
  variables = {"params": params, **state}
  rngs = {"dropout": rng} if rng is not None else {}
  if train and state:
    y, new_state = module.apply(variables, x, train=True, rngs=rngs, mutable=list(state))
    return y, dict(new_state)
  return module.apply(variables, x, train=train, rngs=rngs), state
