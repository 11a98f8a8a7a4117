"""The SPMD executor's program: one branch per kind of tick, the tick, the scan over ticks.

`make` returns `call(state, inputs, targets) -> (state, metrics)` for `jax.jit`: a `shard_map`
manual over 'stage' (the 'data' axis is left to XLA's partitioner, see `executor.py`) whose body
scans over the ticks of a `ticks.TickTable`. Per tick, each device looks up its stage's entry,
`lax.switch`es to that branch (0 idles; others run its B group, then its F group), puts an
`optimization_barrier` after the compute, and then moves every boundary's activation up and
cotangent down with one `ppermute` each, storing what arrives in the slot the table names.
Inside the shard_map, batch dimensions are global. The branches run the per-stage layer
(`Stage.forward`, `loss`, `backward`, `update`, `evaluate`), as the other executors do.
Everything a program needs comes in one frozen `ProgramSpec`, built once by the executor.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ilbp.execution.schedule import Schedule
from ilbp.execution.spmd import residuals
from ilbp.execution.spmd.flat import FlatLayout
from ilbp.execution.spmd.ticks import TickTable, is_own
from ilbp.execution.spmd.vocab import VocabSplit
from ilbp.execution.stage import Stage, Where, named_sums, sum_squares
from ilbp.state import StageState

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class ProgramSpec:
  """What the SPMD programs are built from (the executor builds it once).

  Attributes:
    stages: the K `Stage`s.
    schedule: the pipeline schedule the tick tables are laid out from.
    layouts: the packed state's `FlatLayout` per part ("params", "model_state", "opt_state").
    abstract: every stage's StageState as shapes and dtypes.
    specs: stage k's input (a_{k-1}) shape and dtype, batch 1.
    mesh: the ('stage', 'data') mesh.
    vocab: stage 1's token table split over the stages (`vocab.py`), or None.
  """

  stages: tuple[Stage, ...]
  schedule: Schedule
  layouts: dict[str, FlatLayout]
  abstract: tuple[StageState, ...]
  specs: tuple[jax.ShapeDtypeStruct, ...]
  mesh: Mesh
  vocab: VocabSplit | None = None

  def __post_init__(self):
    inner = self.specs[1:]  # a_1 .. a_{K-1}: what crosses a boundary (and is stored).
    if len({s.dtype for s in inner}) > 1:
      raise ValueError(f"Stage outputs of different dtypes ({inner}); spmd needs one dtype.")

  @property
  def num_stages(self) -> int:
    return len(self.stages)

  @property
  def microbatches(self) -> int:
    return self.schedule.microbatches

  @property
  def act_dtype(self):
    """The dtype of every boundary's message and stored slot."""
    return self.specs[1].dtype if len(self.specs) > 1 else jnp.float32

  @functools.cached_property
  def sizes(self) -> list[int]:
    """Features per example of stage k's input."""
    return [int(np.prod(s.shape[1:])) for s in self.specs]

  @property
  def features(self) -> int:
    """The widest boundary: every slot holds that many features per example."""
    return max(self.sizes[1:], default=1)

  def act_shape(self, rows: int, k: int) -> tuple[int, ...]:
    """a_{k-1}, stage k's input, for `rows` examples."""
    return (rows, *self.specs[k].shape[1:])

  def messages(self, rows: int) -> list[jax.Array]:
    """Zeros in the shape of every boundary's message (boundary b: a_b, stage b+1's input)."""
    K = self.num_stages
    return [jnp.zeros(self.act_shape(rows, b + 1), self.act_dtype) for b in range(K - 1)]


def _index(tree: PyTree, s, m) -> PyTree:
  return jax.tree.map(lambda x: x[s, m], tree)


def metric_names(spec: ProgramSpec, inputs, targets) -> tuple[list[str], list[list[str]]]:
  """(the loss metrics every H op reports, each stage's metric names in its U op's order)."""
  K, last = spec.num_stages, spec.stages[-1]
  rows = jax.tree.leaves(inputs)[0].shape[2]
  one = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), tree)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  x = jax.ShapeDtypeStruct((rows, *spec.specs[K - 1].shape[1:]), spec.specs[K - 1].dtype)
  logits = jax.eval_shape(
    lambda p, s, key, x: last.forward(p, s, Where(key, 0, 0), x)[0],
    spec.abstract[K - 1].params["stage"],
    spec.abstract[K - 1].model_state["stage"],
    key,
    x,
  )
  loss_metrics = jax.eval_shape(last.task.loss, logits, one(targets))[1]
  head = ["loss", *sorted(loss_metrics)]
  per_stage = []
  for stage, abstract in zip(spec.stages, spec.abstract):
    metrics = jax.eval_shape(
      lambda st, stage=stage: stage.update(st, st.params, dict.fromkeys(head, 0.0), 0)[1],
      abstract,
    )
    per_stage.append(list(metrics))
  return head, per_stage


def input_specs(spec: ProgramSpec, rows: int, inputs=None) -> list:
  """Stage k's input inside the program, for `rows` examples: stage 1's tokens (or, with a
  split table, their rows), the other stages' activation as read from a slot. `inputs`: the
  call's input arrays ([S, M, rows, ...]), for stage 1's exact shapes and dtypes."""
  first = jax.ShapeDtypeStruct((rows, *spec.specs[0].shape[1:]), spec.specs[0].dtype)
  if spec.vocab:
    first = jax.ShapeDtypeStruct((*first.shape, spec.vocab.width), jnp.float32)
  elif inputs is not None:
    first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), inputs)
  act = lambda k: jax.ShapeDtypeStruct(spec.act_shape(rows, k), spec.act_dtype)
  return [first, *(act(k) for k in range(1, spec.num_stages))]


def output_spec(spec: ProgramSpec, rows: int) -> jax.ShapeDtypeStruct:
  """The last stage's output (the logits) for `rows` examples."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return jax.eval_shape(
    lambda p, s, key, x: spec.stages[-1].forward(p, s, Where(key, 0, 0), x)[0],
    spec.abstract[-1].params["stage"],
    spec.abstract[-1].model_state["stage"],
    key,
    input_specs(spec, rows)[-1],
  )


def keeps_own(spec: ProgramSpec) -> list[bool]:
  """Per stage, whether its own loss's cotangent waits for a later B op (in a slot)."""
  schedule = spec.schedule
  return [
    any(
      k in b.losses and not is_own(schedule, b, k)
      for m in range(spec.microbatches)
      for b in schedule.plan_for(k, m)
    )
    for k in range(spec.num_stages)
  ]


def stored_residuals(
  spec: ProgramSpec, table: TickTable, rows: int, inputs=None
) -> residuals.Residuals:
  """The stored-residual layout of `table`'s program: the stages whose separate B ops read
  what their forward stored (none under remat). `inputs` as for `input_specs`."""
  needed = [False] * spec.num_stages
  if not table.remat:
    for (_, k), groups in table.groups.items():
      needed[k] = needed[k] or any(not g.forward for g in groups)
  x_specs, traced = input_specs(spec, rows, inputs), {}
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  for k, stage in enumerate(spec.stages):
    if not needed[k]:
      continue
    out = {}

    def probe(p, s, key, x, stage=stage, out=out):
      a, vjp, _ = stage.forward(p, s, Where(key, jnp.int32(0), jnp.int32(0)), x)
      leaves, out["treedef"] = jax.tree.flatten(vjp)
      out["found"] = residuals.sources(leaves, p, x)
      return a, leaves

    abstract = spec.abstract[k]
    args = (abstract.params["stage"], abstract.model_state["stage"], key, x_specs[k])
    a, leaves = jax.eval_shape(probe, *args)
    traced[k] = (a.dtype, leaves, out["treedef"], out["found"])
  return residuals.Residuals(traced, rows)


def make(spec: ProgramSpec, table: TickTable, num_steps: int, inputs, targets) -> Callable:
  """The program of one call of `num_steps` optimizer steps (see module doc).

  Args:
    spec: what the program is built from.
    table: the call's tick table.
    num_steps: optimizer steps per call.
    inputs, targets: example batch arrays ([S, M, rows, ...]) for shapes.
  """
  K, stages = spec.num_stages, spec.stages
  lp, lm, lo = (spec.layouts[p] for p in ("params", "model_state", "opt_state"))
  rows = jax.tree.leaves(inputs)[0].shape[2]
  feat, act_dtype, sizes = spec.features, spec.act_dtype, spec.sizes
  head_names, stage_names = metric_names(spec, inputs, targets)
  width = max(len(n) for n in stage_names)
  keeps = keeps_own(spec)
  act_shape = functools.partial(spec.act_shape, rows)
  vs = spec.vocab
  res = stored_residuals(spec, table, rows, inputs)
  needed = [k in res.layouts for k in range(K)]
  # The last stage's output (the logits): under gpipe its own loss's cotangent waits for the
  # stage's B ops in a buffer of its own (it is no boundary's size).
  logits = output_spec(spec, rows)

  def read(buf, slot, k_in):
    """Stage k_in's input (a_{k_in - 1}) from a slot."""
    flat = lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)[:, : sizes[k_in]]
    return flat.reshape(act_shape(k_in))

  def store(buf, slot, value):
    value = value.reshape(1, rows, -1).astype(buf.dtype)
    return lax.dynamic_update_slice(buf, value, (slot, slot * 0, slot * 0))  # one int type

  def read_cot(carry, slot, k):
    """A cotangent w.r.t. stage k's output, from a slot."""
    if k < K - 1:
      return read(carry["cots"], slot, k + 1)
    flat = lax.dynamic_index_in_dim(carry["last_cots"], slot, 0, keepdims=False)
    return flat.reshape(logits.shape)

  def store_cot(carry, slot, k, cot):
    name = "cots" if k < K - 1 else "last_cots"
    carry[name] = store(carry[name], slot, cot)

  messages = functools.partial(spec.messages, rows)
  # The cotangents w.r.t. stage 1's looked-up rows, out of the switch: its F group's and its B
  # group's (a scalar: no table split).
  rows_shape = (2, rows, *spec.specs[0].shape[1:], vs.width) if vs else ()
  no_rows = lambda: jnp.zeros(rows_shape, jnp.float32)

  def make_branch(kind, step0, rng, inputs, targets):
    """A tick's groups on one stage: a B group (one B op, on stored residuals or a recomputed
    forward) and/or, after it, an F group of another microbatch (F, H and the B ops on its
    own VJP)."""
    k = kind[0][0]
    stage = stages[k]
    parts = {"F" if forward else "B": backward for _, forward, backward in kind}
    # Whether the F group's residuals wait for a later B op (a kind that never stores writes
    # nothing, so that the buffers need no spare slot unless `table.res_spare`).
    stores = needed[k] and table.res_stores[table.kinds.index(kind)]

    def stage_input(carry, s, m, slot, rows):
      if k == 0:  # The tokens, or (a split table) their rows, looked up at the tick's start.
        return carry[rows] if vs else _index(inputs, s, m)
      return read(carry["xs"], slot, k)

    def run_backward(carry, vjp, arrived, op, down, d_rows, part):
      sums = lp.unpack(k, carry["grads"], "stage")
      sums, passed, d_x = stage.backward(vjp, arrived, sums, op, keep_input=True)
      if op.params:
        carry["grads"] = lp.write(k, carry["grads"], "stage", sums)
        if k == 0 and vs:  # The F (0) or the B group's (1) tokens' rows.
          d_rows = d_rows.at[part].set(d_x.astype(jnp.float32))
      for cot in passed.values():
        down[k - 1] = cot.astype(act_dtype)
      return d_rows

    def branch(carry, mine):
      carry = dict(carry)
      params = lp.unpack(k, carry["params"])
      state = lm.unpack(k, carry["model_state"])
      up, down, d_rows = messages(), messages(), no_rows()
      if "B" in parts:
        s, m = mine["b_step"], mine["b_microbatch"]
        x = stage_input(carry, s, m, mine["b_x_slot"], "b_rows")
        if table.remat:  # Re-runs the forward (its statistics discarded).
          where = Where(rng, step0 + s, m)
          a, vjp, _ = stage.forward(params["stage"], state["stage"], where, x)
          out_dtype = a.dtype
        else:  # Reads the residuals its forward stored.
          vjp = res.load(k, carry["res"], mine["res_slot"], params["stage"], x)
          out_dtype = res.layouts[k].out_dtype
        (op,) = parts["B"]
        arrived = {
          j: read_cot(carry, mine["cot_slots"][n], k).astype(out_dtype)
          for n, j in enumerate(op.losses)
        }
        d_rows = run_backward(carry, vjp, arrived, op, down, d_rows, 1)
      if "F" in parts:
        s, m = mine["step"], mine["microbatch"]
        where = Where(rng, step0 + s, m)
        x = stage_input(carry, s, m, mine["x_slot"], "rows")
        a, vjp, new_stage = stage.forward(params["stage"], state["stage"], where, x)
        if stores:
          carry["res"] = res.store(k, carry["res"], mine["res_store"], vjp, params["stage"], x)
        sums = lp.unpack(k, carry["grads"], "head")
        cot, sums, new_head, metrics = stage.loss(
          params["head"], state["head"], where, a, _index(targets, s, m), sums
        )
        # Running statistics move here only: a recompute in a B op discards its own.
        ms = lm.write(k, carry["model_state"], "stage", new_stage)
        carry["model_state"] = lm.write(k, ms, "head", new_head)
        carry["grads"] = lp.write(k, carry["grads"], "head", sums)
        carry["msums"] = carry["msums"] + jnp.stack(
          [jnp.asarray(metrics[n], jnp.float32) for n in head_names]
        )
        if keeps[k]:
          store_cot(carry, mine["own_slot"], k, cot)
        if k < K - 1:
          up[k] = a.astype(act_dtype)
        for op in parts["F"]:
          d_rows = run_backward(carry, vjp, {k: cot}, op, down, d_rows, 0)
      return carry, tuple(up), tuple(down), d_rows

    return branch

  def make_update(k, step0):
    return lambda carry, s: _update(dict(carry), k, s, step0 + s)

  def _update(carry, k, s, step):
    stage = StageState(
      params=lp.unpack(k, carry["params"]),
      model_state=lm.unpack(k, carry["model_state"]),
      opt_state=lo.unpack(k, carry["opt_state"]),
    )
    means = {n: carry["msums"][i] / spec.microbatches for i, n in enumerate(head_names)}
    # Stage 1 with a split table: the clip and its norms count the table's pieces.
    elsewhere = {"grad": carry["vnorms"][0], "param": carry["vnorms"][1]} if vs and not k else None
    sums = lp.unpack(k, carry["grads"])
    new, metrics = stages[k].update(stage, sums, means, step, elsewhere)
    carry["params"] = lp.pack(k, new.params)
    carry["opt_state"] = lo.pack(k, new.opt_state)
    carry["grads"] = lp.zeros()
    carry["msums"] = jnp.zeros_like(carry["msums"])
    row = jnp.stack([jnp.asarray(metrics[n], jnp.float32) for n in stage_names[k]])
    row = jnp.pad(row, (0, width - row.shape[0]))
    carry["metrics"] = lax.dynamic_update_slice(carry["metrics"], row[None], (s, s * 0))
    return carry

  def idle(carry, mine):
    del mine
    return dict(carry), tuple(messages()), tuple(messages()), no_rows()

  def update_pieces(carry, fields):
    """A split table on stage 1's update tick: every stage updates its rows with stage 1's
    optimizer, under the whole table's clip norm; the pieces' squared norms go to stage 1's
    own update (`vocab.py`)."""
    stage, u0 = lax.axis_index("stage"), fields["update"][0] > 0
    scale = lambda tree: jax.tree.map(lambda g: g / spec.microbatches, tree)
    rest = lax.cond(
      u0 & (stage == 0),
      lambda: sum_squares(scale(lp.unpack(0, carry["grads"], "stage"))),
      lambda: jnp.zeros((), jnp.float32),
    )
    grads = scale(carry["vgrads"])
    rest, grad_sq = lax.psum(jnp.stack([rest, sum_squares(grads)]), "stage")
    norm = jnp.sqrt(rest + grad_sq)

    def update(piece):
      g, p, o = vs.trees(piece, grads)
      optimizer = optax.with_extra_args_support(stages[0].optimizer)
      updates, o = optimizer.update(g, o, p, module_norms={"stage": norm})
      return vs.from_trees(optax.apply_updates(p, updates), o)

    carry["vocab"] = lax.cond(u0, update, lambda piece: piece, carry["vocab"])
    carry["vgrads"] = jnp.where(u0, jnp.zeros_like(carry["vgrads"]), carry["vgrads"])
    param_sq = lax.psum(sum_squares(carry["vocab"]["table"]), "stage")
    carry["vnorms"] = jnp.stack([grad_sq, param_sq])
    return carry

  def body(step0, rng, params, model_state, opt_state, vocab, inputs, targets):
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    carry = {
      "params": first(params),
      "model_state": first(model_state),
      "opt_state": first(opt_state),
      "grads": lp.zeros(),
      "xs": jnp.zeros((table.x_slots + 1, rows, feat), act_dtype),
      "cots": jnp.zeros((table.cot_slots + 1, rows, feat), act_dtype),
      "msums": jnp.zeros((len(head_names),), jnp.float32),
      "metrics": jnp.zeros((num_steps, width), jnp.float32),
      "res": res.zeros(table.res_slots, spare=table.res_spare),
    }
    if keeps[K - 1]:
      size = int(np.prod(logits.shape[1:]))
      carry["last_cots"] = jnp.zeros((table.cot_slots + 1, rows, size), logits.dtype)
    if vs:
      carry["vocab"] = first(vocab)
      carry["vgrads"] = jnp.zeros((vs.rows, vs.width), vs.dtype)
      carry["rows"] = carry["b_rows"] = no_rows()[0]
      carry["vnorms"] = jnp.zeros((2,), jnp.float32)
    stage = lax.axis_index("stage")
    branches = [idle] + [make_branch(kd, step0, rng, inputs, targets) for kd in table.kinds]
    updates = [lambda carry, s: dict(carry)] + [make_update(k, step0) for k in range(K)]

    def tick(carry, fields):
      mine = {name: v[stage] for name, v in fields.items()}
      if vs:  # The rows of the tokens stage 1's F and B groups work on this tick, everywhere.
        # Both groups' tokens in one lookup (one psum), F's first as in d_rows.
        tokens = jnp.stack(
          [
            _index(inputs, fields["step"][0], fields["microbatch"][0]),
            _index(inputs, fields["b_step"][0], fields["b_microbatch"][0]),
          ]
        )
        looked_up = vs.lookup(carry["vocab"]["table"], tokens)
        carry["rows"], carry["b_rows"] = looked_up[0], looked_up[1]
      carry, up, down, d_rows = lax.switch(mine["branch"], branches, carry, mine)
      if vs:  # Stage 1's weight-gradient op's cotangent w.r.t. the rows, into every piece.
        d_rows = lax.psum(d_rows, "stage")
        carry["vgrads"] = vs.add_grads(carry["vgrads"], tokens, d_rows)
        carry = update_pieces(carry, fields)
      # U(k) when the group completes the step's gradients (a branch per stage, not per kind).
      carry = lax.switch(mine["update"] * (stage + 1), updates, carry, mine["u_step"])
      # Compute first, then the collectives: a collective scheduled mid-tick serialises stages.
      carry, up, down = lax.optimization_barrier((carry, up, down))
      for b in range(K - 1):
        got = lax.ppermute(up[b], "stage", [(b, b + 1)])
        slot = jnp.where(stage == b + 1, mine["x_store"], table.x_slots)
        carry["xs"] = store(carry["xs"], slot, got)
        got = lax.ppermute(down[b], "stage", [(b + 1, b)])
        slot = jnp.where(stage == b, mine["cot_store"], table.cot_slots)
        carry["cots"] = store(carry["cots"], slot, got)
      return carry, None

    fields = {name: jnp.asarray(v) for name, v in table.fields.items()}
    carry, _ = lax.scan(tick, carry, fields)
    again = lambda tree: jax.tree.map(lambda x: x[None], tree)
    pieces = carry["vocab"] if vs else {}
    out = (carry["params"], carry["model_state"], carry["opt_state"], pieces, carry["metrics"])
    return again(out)

  def call(st, inputs, targets):
    mapped = jax.shard_map(
      body,
      mesh=spec.mesh,
      in_specs=(P(), P(), P("stage"), P("stage"), P("stage"), P("stage"), P(), P()),
      out_specs=P("stage"),
      axis_names={"stage"},
      check_vma=False,
    )
    params, model_state, opt_state, vocab, metrics = mapped(
      st.step, st.rng, st.params, st.model_state, st.opt_state, st.vocab, inputs, targets
    )
    out = {}
    for k, names in enumerate(stage_names):
      for i, name in enumerate(names):
        out[name] = metrics[k, 0, i] if num_steps == 1 else metrics[k, :, i]
    new = st.replace(
      step=st.step + num_steps,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      vocab=vocab,
    )
    return new, out

  return call


def make_eval(spec: ProgramSpec, inputs, targets) -> Callable:
  """The program of one evaluation batch: every head's sums, each stage on its own devices.

  K ticks, not pipelined (evaluation is a small part of a run): at tick k stage k runs its
  inference forward and head (`Stage.evaluate`) while the others idle, then passes its output
  to stage k+1 with one `ppermute`. Stage k's sums come out in row k of a [K, n] array.

  Args:
    spec: what the program is built from.
    inputs, targets: one eval batch's arrays ([rows, ...]) for shapes.

  Returns:
    `sums(params, model_state, inputs, targets) -> [K, n]`, and the n names of the sums.
  """
  K, stages = spec.num_stages, spec.stages
  lp, lm = spec.layouts["params"], spec.layouts["model_state"]
  rows = jax.tree.leaves(inputs)[0].shape[0]
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  # Every head's sums have the names of stage 1's (one task; a branch stacks them by name).
  first = spec.abstract[0]
  x = abstract(inputs)
  if spec.vocab:  # Stage 1 takes the tokens' rows.
    x = jax.ShapeDtypeStruct((*x.shape, spec.vocab.width), jnp.float32)
  names = sorted(
    jax.eval_shape(
      lambda p, s, x, t: stages[0].evaluate(p, s, x, t)[1],
      first.params,
      first.model_state,
      x,
      abstract(targets),
    )
  )

  messages = functools.partial(spec.messages, rows)

  def make_branch(k):
    def branch(params, model_state, arrived, inputs, targets):
      x = inputs if k == 0 else arrived[k - 1].astype(spec.specs[k].dtype)
      a, sums = stages[k].evaluate(lp.unpack(k, params), lm.unpack(k, model_state), x, targets)
      out = messages()
      if k < K - 1:
        out[k] = a.astype(spec.act_dtype)
      return tuple(out), jnp.stack([jnp.asarray(sums[n], jnp.float32) for n in names])

    return branch

  def idle(params, model_state, arrived, inputs, targets):
    del params, model_state, arrived, inputs, targets
    return tuple(messages()), jnp.zeros((len(names),), jnp.float32)

  branches = [idle] + [make_branch(k) for k in range(K)]

  def body(params, model_state, vocab, inputs, targets):
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    params, model_state = first(params), first(model_state)
    if spec.vocab:  # Stage 1 takes the tokens' rows of the split table (`vocab.py`).
      inputs = spec.vocab.lookup(first(vocab)["table"], inputs)
    stage = lax.axis_index("stage")
    arrived, total = tuple(messages()), jnp.zeros((len(names),), jnp.float32)
    for t in range(K):
      out, sums = lax.switch(
        jnp.where(stage == t, stage + 1, 0), branches, params, model_state, arrived, inputs,
        targets,
      )  # fmt: skip
      total = total + sums
      if t < K - 1:
        arrived = list(arrived)
        arrived[t] = lax.ppermute(out[t], "stage", [(t, t + 1)])
        arrived = tuple(arrived)
    return total[None]

  def call(params, model_state, vocab, inputs, targets):
    return jax.shard_map(
      body,
      mesh=spec.mesh,
      in_specs=(P("stage"), P("stage"), P("stage"), P(), P()),
      out_specs=P("stage"),
      axis_names={"stage"},
      check_vma=False,
    )(params, model_state, vocab, inputs, targets)

  return call, names


def sums_by_head(out, names: list[str], num_stages: int) -> dict:
  """The eval program's [K, n] sums -> `head{k}/{name}` and `count`."""
  return named_sums([{n: out[k, i] for i, n in enumerate(names)} for k in range(num_stages)])
