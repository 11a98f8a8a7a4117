"""Interlocking gradients: the engine (`interlocking_grads`) and its spec (`interlocking_loss`).

Notation (docs/design.md, "The gradient contract"), 1-based as in the paper: stages k = 1..K
with a_0 = x and a_k = f_k(θ_k, a_{k-1}); heads k = 1..K-1 with L_k = aux_loss(h_k(φ_k, a_k), y);
the task loss L_K = loss(a_K, y). With reach n, loss L_j's gradient flows back through stages
max(1, j-n+1)..j and no further, and t(k) = min(k+n-1, K) is the furthest loss reaching stage k.

  combine="furthest":  grad θ_k = ∂L_{t(k)}/∂θ_k
  combine="sum":       grad θ_k = Σ_{j=k..t(k)} ∂L_j/∂θ_k
  always:              grad φ_k = ∂L_k/∂φ_k

`interlocking_loss` states this with `stop_gradient` masks: each loss recomputes its own view of
the stages it reaches. It is the readable spec and the test oracle, not a training engine:
after autodiff XLA does not merge the recomputed views (docs/design.md, "The spec and the
engine"), so it costs up to 1.4x plain backprop.

`interlocking_grads` runs every stage forward once under `jax.vjp`, then walks cotangents
backwards, calling a stage's VJP once per loss that passes through it and keeping the parameter
half only where the strategy says so. Losses whose gradient would reach no stage parameter are
not propagated at all (e.g. the heads' losses under global training), and XLA removes the
halves of each VJP that are not used, so global costs what plain backprop costs and local less.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ilbp.strategy import COMBINE_RULES, Strategy
from ilbp.strategy import strategy as parse_strategy

PyTree = Any


def loss_users(strategy: Strategy, num_stages: int) -> list[list[int]]:
  """Which stages' parameters each loss trains (0-based stages and losses).

  Args:
    strategy: the training strategy.
    num_stages: K.

  Returns:
    A list of K lists: entry j holds the stages k (ascending) whose parameter gradient takes a
    term from loss j (loss K-1 is the task loss). An empty list means loss j trains only its
    own head.
  """
  K = num_stages
  n = strategy.reach_for(K)
  users = []
  for j in range(K):
    reached = range(max(0, j - n + 1), j + 1)
    if strategy.combine == "sum":
      users.append(list(reached))
    else:
      users.append([k for k in reached if min(k + n - 1, K - 1) == j])
  return users


def _check(stage_fns, head_fns, stage_params, head_params, strategy) -> Strategy:
  K = len(stage_fns)
  if K < 1:
    raise ValueError("interlocking_grads needs at least one stage function, got 0.")
  if len(head_fns) != K - 1:
    raise ValueError(
      f"Got {K} stage functions and {len(head_fns)} head functions; "
      f"every stage but the last needs a head, so expected {K - 1} head functions."
    )
  if len(stage_params) != K:
    raise ValueError(f"Got {K} stage functions but {len(stage_params)} stage parameter trees.")
  if len(head_params) != K - 1:
    raise ValueError(f"Got {K - 1} head functions but {len(head_params)} head parameter trees.")
  return parse_strategy(strategy) if not isinstance(strategy, Strategy) else strategy


@dataclasses.dataclass(frozen=True)
class BackwardOp:
  """One VJP call of one stage: the unit every executor schedules.

  Attributes:
    stage: k (0-based).
    losses: the losses whose cotangents (with respect to a_k) this op consumes; all must have
      arrived before it runs.
    params: the losses whose cotangents sum into θ_k's gradient (empty: input gradient only).
    passes: the losses whose cotangent with respect to a_{k-1} goes on to stage k-1.
  """

  stage: int
  losses: tuple[int, ...]
  params: tuple[int, ...]
  passes: tuple[int, ...]


def backward_plan(strategy: Strategy, num_stages: int) -> list[list[BackwardOp]]:
  """The routing rule, once: which VJP calls each stage makes per batch, in arrival order.

  Loss j's gradient reaches stages users[j][0]..j (`loss_users`). At stage k it either trains
  θ_k, or only passes through to reach lower stages, or both. Σ_j vjp(c_j)_θ = vjp(Σ_j c_j)_θ,
  so a stage makes one weight-gradient call for all the losses that train it, plus one
  input-gradient call per loss that passes on alone. When the single loss that trains θ_k also
  passes on, one call serves both. Input-only calls come first (in ascending j: a stage's own
  head's loss arrives before the losses from above), the weight call last; under "furthest"
  its losses are the furthest to arrive.

  Args:
    strategy: the training strategy.
    num_stages: K.

  Returns:
    K lists of BackwardOp; every stage has exactly one op with non-empty `params`.
  """
  users = loss_users(strategy, num_stages)
  plan = []
  for k in range(num_stages):
    arriving = [j for j in range(k, num_stages) if users[j] and users[j][0] <= k]
    params = tuple(j for j in arriving if k in users[j])
    passing = [j for j in arriving if users[j][0] < k]
    merged = params[0] if len(params) == 1 and params[0] in passing else None
    ops = [BackwardOp(k, (j,), (), (j,)) for j in passing if j != merged]
    ops.append(BackwardOp(k, params, params, () if merged is None else (merged,)))
    plan.append(ops)
  return plan


def plan_variants(
  num_stages: int, strategies: Sequence[str], combines: Sequence[str] = COMBINE_RULES
) -> list[tuple[str, str, bool]]:
  """(strategy, combine, combine_matters) for every distinct backward plan, in the order given.

  A (strategy, rule) whose plan equals an earlier one's trains exactly the same thing and is
  left out: local under "sum" after "furthest", and e.g. 3wise when it reaches every stage
  (K = 3) after global. A strategy that reaches every stage is named "global", what it is.
  combine_matters: whether `combines` give the strategy more than one plan.

  Args:
    num_stages: K.
    strategies: strategy names (`ilbp.strategy.strategy`).
    combines: combine rules, in order (`ilbp.strategy.COMBINE_RULES`).

  Returns:
    The variants, strategy by strategy, each strategy's rules in `combines` order.
  """
  out, seen = [], set()
  for name in strategies:
    if parse_strategy(name).reach_for(num_stages) == num_stages:
      name = "global"
    plans = [
      tuple(map(tuple, backward_plan(parse_strategy(name, c), num_stages))) for c in combines
    ]
    for combine, plan in zip(combines, plans, strict=True):
      if plan not in seen:
        seen.add(plan)
        out.append((name, combine, len(set(plans)) > 1))
  return out


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Everything the routing rule decides for one stage, once.

  Attributes:
    ops: the stage's VJP calls per microbatch, in arrival order (`backward_plan`).
    needs_input: whether the stage's own loss trains any stage (`loss_users`), so that loss's
      cotangent with respect to the stage output must be computed.
  """

  ops: tuple[BackwardOp, ...]
  needs_input: bool


def stage_plans(strategy: Strategy, num_stages: int) -> list[StagePlan]:
  """`backward_plan` and `loss_users` combined: one StagePlan per stage (0-based)."""
  users = loss_users(strategy, num_stages)
  plan = backward_plan(strategy, num_stages)
  return [StagePlan(tuple(plan[k]), bool(users[k])) for k in range(num_stages)]


def stage_forward(stage_fn: Callable, params: PyTree, x: PyTree, *, has_aux: bool = False):
  """One stage's forward under `jax.vjp`.

  Returns:
    `(a_k, vjp, aux)`: the output, its VJP (a pytree: it can leave and re-enter `jax.jit`, so
    a pipelined executor keeps it as the stored residuals of an in-flight microbatch), and
    the stage's aux output (None without `has_aux`).
  """
  if has_aux:
    return jax.vjp(stage_fn, params, x, has_aux=True)
  a, vjp = jax.vjp(stage_fn, params, x)
  return a, vjp, None


def loss_step(
  head_fn: Callable | None,
  loss_fn: Callable,
  head_params: PyTree,
  a: PyTree,
  labels: PyTree,
  *,
  needs_input: bool,
  has_aux: bool = False,
  loss_has_aux: bool = False,
):
  """One loss: its value, its head's gradient and (when it trains a stage) d loss / d a_k.

  Args:
    head_fn: `h_k`, or None for the task loss on the last stage's output.
    loss_fn: the loss for these logits.
    head_params: φ_k (ignored for the task loss).
    a: the stage output a_k.
    labels: passed to `loss_fn`.
    needs_input: whether the loss trains any stage (`loss_users`): only then is its cotangent
      with respect to a_k computed.
    has_aux, loss_has_aux: as for `interlocking_grads`.

  Returns:
    `(loss, loss_metrics, head_grads, cotangent, head_aux)`; head_grads is None for the task
    loss, cotangent None when not `needs_input`.
  """
  fn = _head_loss(head_fn, loss_fn, labels, has_aux, loss_has_aux)
  if head_fn is None:
    if not needs_input:
      loss, (_, metrics) = fn(None, a)
      return loss, metrics, None, None, None
    (loss, (_, metrics)), cot = jax.value_and_grad(fn, 1, has_aux=True)(None, a)
    return loss, metrics, None, cot, None
  argnums = (0, 1) if needs_input else 0
  (loss, (h_aux, metrics)), grads = jax.value_and_grad(fn, argnums, has_aux=True)(head_params, a)
  head_grads, cot = grads if needs_input else (grads, None)
  return loss, metrics, head_grads, cot, h_aux


def stage_backward(
  vjp: Callable, op: BackwardOp, arrived: dict[int, PyTree], *, keep_input: bool = False
):
  """Runs one BackwardOp of a stage.

  Args:
    vjp: the stage's VJP from `stage_forward`.
    op: from `backward_plan`.
    arrived: loss index -> cotangent with respect to this stage's output; must hold op.losses.
    keep_input: also return the op's cotangent with respect to the stage input, passed on or
      not (stage 1's input may be rows of its own table, looked up elsewhere).

  Returns:
    `(param_grads, passed)`: θ_k's gradient term (None for an input-only op) and
    {loss j: cotangent with respect to the stage's input} for the losses in `op.passes`;
    with `keep_input`, `(param_grads, passed, that cotangent)`.
  """
  if op.params:
    d_params, d_input = vjp(_tree_sum([arrived[j] for j in op.params]))
  else:
    d_params, d_input = None, vjp(arrived[op.losses[0]])[1]
  passed = {j: d_input for j in op.passes}
  return (d_params, passed, d_input) if keep_input else (d_params, passed)


def interlocking_grads(
  stage_fns: Sequence[Callable],
  head_fns: Sequence[Callable],
  stage_params: Sequence[PyTree],
  head_params: Sequence[PyTree],
  inputs: PyTree,
  labels: PyTree,
  *,
  strategy: Strategy | str,
  loss_fn: Callable,
  aux_loss_fn: Callable | None = None,
  has_aux: bool = False,
  loss_has_aux: bool = False,
):
  """Gradients of every stage and head under an interlocking strategy, one forward pass.

  A loop over the per-stage primitives (`stage_forward`, `loss_step`, `stage_backward` in
  `backward_plan` order) that the pipelined executors also call, one microbatch at a time.

  Args:
    stage_fns: K callables `f_k(params_k, a) -> a_k`; stage K's output is the logits.
    head_fns: K-1 callables `h_k(head_params_k, a_k) -> logits`.
    stage_params: K parameter pytrees.
    head_params: K-1 parameter pytrees.
    inputs: a_0, the network input.
    labels: passed unchanged to the loss functions (any pytree, e.g. a batch dict).
    strategy: a Strategy, or a name accepted by `ilbp.strategy`.
    loss_fn: `loss_fn(logits, labels) -> scalar` for the last stage.
    aux_loss_fn: the same for the heads; defaults to `loss_fn`.
    has_aux: if True, stage and head functions return `(output, aux)` (e.g. updated BatchNorm
      statistics); the aux values of the single forward pass are returned as a fourth result
      `{"stages": [...], "heads": [...]}`.
    loss_has_aux: if True, loss functions return `(loss, metrics_dict)`; those metrics are
      reported per head as `head{k}/{name}`.

  Returns:
    `(stage_grads, head_grads, metrics)` (plus the aux dict when `has_aux`): lists of gradient
    pytrees shaped like `stage_params` / `head_params`, and `metrics` with every loss's value as
    `head{k}/loss`, k = 1..K (head K is the network's own output).

  Raises:
    ValueError: if the numbers of functions and parameter trees do not fit together.
  """
  strategy = _check(stage_fns, head_fns, stage_params, head_params, strategy)
  aux_loss_fn = loss_fn if aux_loss_fn is None else aux_loss_fn
  K = len(stage_fns)
  plans = stage_plans(strategy, K)
  metrics = {}

  # Forward: each stage runs exactly once; its VJP keeps the residuals.
  acts, vjps, stage_aux = [inputs], [], []
  for k in range(K):
    a, vjp, aux = stage_forward(stage_fns[k], stage_params[k], acts[-1], has_aux=has_aux)
    acts.append(a)
    vjps.append(vjp)
    stage_aux.append(aux)

  # Losses: each head's gradient, and each loss's cotangent at its stage where it is used.
  incoming: list[dict[int, PyTree]] = [{} for _ in range(K)]
  head_grads, head_aux = [], []
  for j in range(K):
    is_head = j < K - 1
    loss, loss_metrics, h_grads, cot, h_aux = loss_step(
      head_fns[j] if is_head else None,
      aux_loss_fn if is_head else loss_fn,
      head_params[j] if is_head else None,
      acts[j + 1],
      labels,
      needs_input=plans[j].needs_input,
      has_aux=has_aux and is_head,
      loss_has_aux=loss_has_aux,
    )
    if is_head:
      head_grads.append(h_grads)
      head_aux.append(h_aux)
    metrics[f"head{j + 1}/loss"] = loss
    metrics.update({f"head{j + 1}/{name}": v for name, v in loss_metrics.items()})
    if cot is not None:
      incoming[j][j] = cot

  # Backward: stages top-down, each loss's cotangent routed only as far as it is used.
  stage_grads: list[PyTree] = [None] * K
  for k in reversed(range(K)):
    for op in plans[k].ops:
      d_params, passed = stage_backward(vjps[k], op, incoming[k])
      if op.params:
        stage_grads[k] = d_params
      incoming[k - 1].update(passed)

  if has_aux:
    return stage_grads, head_grads, metrics, {"stages": stage_aux, "heads": head_aux}
  return stage_grads, head_grads, metrics


def interlocking_loss(
  stage_fns: Sequence[Callable],
  head_fns: Sequence[Callable],
  stage_params: Sequence[PyTree],
  head_params: Sequence[PyTree],
  inputs: PyTree,
  labels: PyTree,
  *,
  strategy: Strategy | str,
  loss_fn: Callable,
  aux_loss_fn: Callable | None = None,
  has_aux: bool = False,
):
  """The stop_gradient composition whose `jax.grad` equals `interlocking_grads`.

  The spec in code: loss L_j recomputes stages max(1, j-n+1)..j from a detached input, with
  live parameters exactly at the stages it trains (`loss_users`) and stop_gradient elsewhere;
  the total is the plain sum of all losses. Arguments as for `interlocking_grads`.

  Args:
    has_aux: if True, stage and head functions return `(output, aux)` and loss functions
      `(loss, metrics_dict)` (both of `interlocking_grads`' aux options at once), and the
      result is `(total, (metrics, aux))` for `jax.grad(..., has_aux=True)`: `metrics` as
      `interlocking_grads` reports them, `aux` = {"stages": [...], "heads": [...]} from the
      detached forward pass (stages) and the one view that runs each head.

  Returns:
    The scalar sum of all K losses, whose gradient is the interlocking gradient (with aux as
    above when `has_aux`).
  """
  strategy = _check(stage_fns, head_fns, stage_params, head_params, strategy)
  aux_loss_fn = loss_fn if aux_loss_fn is None else aux_loss_fn
  K = len(stage_fns)
  n = strategy.reach_for(K)
  users = loss_users(strategy, K)
  sg = jax.lax.stop_gradient
  split = (lambda out: out) if has_aux else (lambda out: (out, None))
  scored = (lambda out: out) if has_aux else (lambda out: (out, {}))

  # A detached forward pass provides every view's starting point.
  detached, stage_aux = [sg(inputs)], []
  for k in range(K):
    a, aux = split(stage_fns[k](stage_params[k], detached[-1]))
    detached.append(sg(a))
    stage_aux.append(aux)

  total, metrics, head_aux = 0.0, {}, []
  for j in range(K):
    lo = max(0, j - n + 1)
    a = detached[lo]
    for k in range(lo, j + 1):
      theta = stage_params[k] if k in users[j] else sg(stage_params[k])
      a = split(stage_fns[k](theta, a))[0]
    if j < K - 1:
      logits, h_aux = split(head_fns[j](head_params[j], a))
      head_aux.append(h_aux)
      loss, loss_metrics = scored(aux_loss_fn(logits, labels))
    else:
      loss, loss_metrics = scored(loss_fn(a, labels))
    total = total + loss
    metrics[f"head{j + 1}/loss"] = sg(loss)
    metrics.update({f"head{j + 1}/{name}": sg(v) for name, v in loss_metrics.items()})
  if has_aux:
    return total, (metrics, {"stages": stage_aux, "heads": head_aux})
  return total


def backprop_grads(
  stage_fns: Sequence[Callable],
  head_fns: Sequence[Callable],
  stage_params: Sequence[PyTree],
  head_params: Sequence[PyTree],
  inputs: PyTree,
  labels: PyTree,
  *,
  loss_fn: Callable,
  aux_loss_fn: Callable | None = None,
  has_aux: bool = False,
):
  """Plain end-to-end backprop with heads trained on detached activations: the cost baseline.

  One forward pass; `jax.grad` of the task loss for the stages, and each head's own loss on
  `stop_gradient(a_k)` for the heads. Equal to `interlocking_grads` with the global strategy;
  the benchmarks and cost tests measure every strategy against this. Arguments as for
  `interlocking_grads`.

  Returns:
    `(stage_grads, head_grads)`, plus `{"stages": [...], "heads": [...]}` aux when `has_aux`.
  """
  _check(stage_fns, head_fns, stage_params, head_params, Strategy(None))
  aux_loss_fn = loss_fn if aux_loss_fn is None else aux_loss_fn

  def total_loss(stage_params, head_params):
    a, stage_aux, head_aux, total = inputs, [], [], 0.0
    for k, f in enumerate(stage_fns):
      a, aux = f(stage_params[k], a) if has_aux else (f(stage_params[k], a), None)
      stage_aux.append(aux)
      if k < len(head_fns):
        out = head_fns[k](head_params[k], jax.lax.stop_gradient(a))
        logits, h_aux = out if has_aux else (out, None)
        head_aux.append(h_aux)
        total = total + aux_loss_fn(logits, labels)
    return total + loss_fn(a, labels), {"stages": stage_aux, "heads": head_aux}

  (stage_grads, head_grads), aux = jax.grad(total_loss, (0, 1), has_aux=True)(
    list(stage_params), list(head_params)
  )
  return (stage_grads, head_grads, aux) if has_aux else (stage_grads, head_grads)


def _head_loss(head_fn, loss_fn, labels, has_aux, loss_has_aux):
  """`fn(head_params, a) -> (loss, (head_aux, loss_metrics))` for value_and_grad."""

  def fn(params, a):
    if head_fn is None:
      logits, h_aux = a, None
    elif has_aux:
      logits, h_aux = head_fn(params, a)
    else:
      logits, h_aux = head_fn(params, a), None
    out = loss_fn(logits, labels)
    loss, loss_metrics = out if loss_has_aux else (out, {})
    return loss, (h_aux, loss_metrics)

  return fn


def _tree_sum(trees: list[PyTree]) -> PyTree:
  return trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *trees)
