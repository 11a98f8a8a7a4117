"""The SPMD executor: exactly the fused executor's training, as one program over a mesh.

The tick table is checked on one CPU against schedule.py's dependencies. Multi-device cases run
in a subprocess with 8 forced CPU devices (as tests/test_pipeline.py does); the fused executor
with the same microbatches is the reference: after 3 optimizer steps, parameters, BatchNorm
statistics and optimizer states agree to 1e-5 relative. The full cross product of strategies,
combine rules, K, D, models and steps per call is `scripts/check_spmd.py`; here a covering set
takes every value of every factor at least once.
"""

import itertools
import textwrap

import ml_collections
import pytest
from conftest import run_with_devices

import ilbp
from ilbp import trainer
from ilbp.execution import schedule
from ilbp.execution.spmd import ticks

CASES = [
  (name, combine, K, continuous, pipeline, remat)
  for name, combine in [
    ("local", "furthest"),
    ("pairwise", "furthest"),
    ("pairwise", "sum"),
    ("3wise", "sum"),
    ("global", "furthest"),
    ("global", "sum"),
  ]
  for K in (2, 4)
  for continuous in (True, False)
  for pipeline, remat in (("1f1b", True), ("1f1b", False), ("gpipe", False), ("zb", False))
  # Stored residuals and the other schedules: at K = 4, continuous (global flushes anyway).
  if (pipeline, remat) == ("1f1b", True) or (K == 4 and continuous)
  if schedule.applies(pipeline, name, K)
]


@pytest.mark.parametrize("name, combine, K, continuous, pipeline, remat", CASES)
def test_tick_table_keeps_every_dependency_and_slot(name, combine, K, continuous, pipeline, remat):
  # zb splits the last two microbatches' merged ops (the others run merged).
  split = [2] * K if pipeline == "zb" else None
  sched = schedule.build(ilbp.strategy(name, combine), K, 4, continuous, schedule=pipeline,
                         split=split)  # fmt: skip
  steps = 2
  table = ticks.build(sched, steps, remat=remat)
  tick_of = {}
  for gs in table.groups.values():
    # At most a B group and an F group (of another microbatch), the B group first; at most
    # one cotangent down per boundary and tick.
    assert [g.forward for g in gs] in ([True], [False], [False, True]), gs
    assert sum(any(b.passes for b in g.backward) for g in gs) <= 1, gs
  for (t, k), g in table.parts():
    assert g.stage == k
    ops = [schedule.Forward(k, g.microbatch, g.step), schedule.Loss(k, g.microbatch, g.step)]
    ops = ops if g.forward else []
    ops += [schedule.Backward(k, g.microbatch, g.step, b) for b in g.backward]
    ops += [schedule.Update(k, None, g.step)] if g.update else []
    for op in ops:
      assert op not in tick_of, op
      tick_of[op] = (t, len(tick_of))
  # Every op of every step runs exactly once ...
  assert set(tick_of) == {op for s in range(steps) for op in sched.ops(s)}
  for op, (t, order) in tick_of.items():
    for dep in sched.dependencies(op):
      t_dep, order_dep = tick_of[dep]
      if dep.stage != op.stage:  # ... after its dependencies: messages take a tick ...
        assert t_dep < t, (dep, op)
      else:  # ... or earlier in the same tick's group, on the same stage.
        assert (t_dep, order_dep) < (t, order), (dep, op)
  # Flushed: no stage starts step 1 before every stage's update of step 0.
  if not continuous:
    last_update = max(tick_of[schedule.Update(k, None, 0)][0] for k in range(K))
    first = min(t for op, (t, _) in tick_of.items() if op.step == 1)
    assert first > last_update
  # Stored inputs: each arrives (end of the sender's tick) into the slot its readers use, and
  # no slot holds two live microbatches at once.
  f, spans = table.fields, {}
  for (t, k), g in table.parts():
    if g.forward and k + 1 < K:
      key = (k + 1, int(f["x_store"][t, k + 1]), g.step, g.microbatch)
      spans[key] = [t + 0.5, t + 0.5]
  for (t, k), g in table.parts():
    if k > 0:
      key = (k, int(f["x_slot" if g.forward else "b_x_slot"][t, k]), g.step, g.microbatch)
      assert key in spans and spans[key][0] < t, (key, t)
      spans[key][1] = max(spans[key][1], t)
  for k in range(1, K):
    for slot in range(table.x_slots):
      held = sorted(v for key, v in spans.items() if key[:2] == (k, slot))
      assert all(a[1] < b[0] for a, b in itertools.pairwise(held)), (k, slot, held)
  assert table.x_slots <= max(sched.caps) + 1
  # Stored residuals (no remat): every B op in a group of its own reads the slot its forward
  # wrote, and no slot holds two live microbatches; under remat nothing is stored.
  spans = {}
  for (t, k), g in table.parts():
    if g.forward and int(f["res_store"][t, k]) < table.res_slots:
      spans[k, int(f["res_store"][t, k]), g.step, g.microbatch] = [
        t + 0.5,
        t + 0.5,
      ]  # After the tick's B group.
  for (t, k), g in table.parts():
    if not g.forward:
      if remat:
        assert int(f["res_slot"][t, k]) == table.res_slots == 0
        continue
      key = (k, int(f["res_slot"][t, k]), g.step, g.microbatch)
      assert key in spans and spans[key][0] < t, (key, t)
      spans[key][1] = max(spans[key][1], t)
  for k in range(K):
    for slot in range(table.res_slots):
      held = sorted(v for key, v in spans.items() if key[:2] == (k, slot))
      assert all(a[1] < b[0] for a, b in itertools.pairwise(held)), (k, slot, held)
  assert table.res_slots <= max(sched.caps)
  # A kind whose F group stores residuals stores them in every tick it runs, so the residual
  # buffers hold no spare slot (`TickTable.res_spare`), and the other kinds store nothing.
  assert not table.res_spare
  for (t, k), g in table.parts():
    if g.forward and not remat:
      stores = table.res_stores[int(f["branch"][t, k]) - 1]
      assert stores == (int(f["res_store"][t, k]) < table.res_slots), (t, k)


def test_flat_layout_packs_adds_and_writes_subtrees():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ilbp.execution.spmd.flat import FlatLayout

  # Two stages of different trees and dtypes; "stage" and "head" subtrees read and written
  # alone. Leaf "c" (same path, shape and dtype in both) is stacked, between stage 0's flat
  # float32 leaves "a" and "d"; "a" differs in shape.
  trees = [
    {
      "head": {"w": jnp.ones((2, 3))},
      "stage": {
        "a": jnp.arange(4.0), "c": jnp.full((2, 2), 3.0), "d": jnp.arange(2.0),
        "n": jnp.arange(3),
      },
    },
    {
      "stage": {
        "a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((5,), jnp.bfloat16),
        "c": jnp.full((2, 2), 4.0),
      },
    },
  ]  # fmt: skip
  for stack in (True, False):
    layout = FlatLayout(trees, stack=stack)
    c = 0 if stack else 4  # "c" in the float32 flat buffer, or stacked.
    assert layout.width == {"bfloat16": 5, "float32": 12 + c, "int32": 3}
    assert layout.padding_bytes(0) == 5 * 2 and layout.padding_bytes(1) == 6 * 4 + 3 * 4
    assert layout.stacked_bytes() == (16 if stack else 0)
    assert layout.bytes() == 5 * 2 + (12 + c) * 4 + 3 * 4 + layout.stacked_bytes()
    for k, tree in enumerate(trees):
      bufs = layout.pack(k, tree)
      shapes = jax.tree.map(lambda b: b.shape, bufs)
      assert shapes == {
        "flat": {"bfloat16": (5,), "float32": (12 + c,), "int32": (3,)},
        "stacked": ((2, 2),) if stack else (),
      }
      if stack:
        np.testing.assert_array_equal(bufs["stacked"][0], tree["stage"]["c"])
      assert jax.tree.structure(layout.zeros()) == jax.tree.structure(bufs)
      jax.tree.map(np.testing.assert_array_equal, layout.unpack(k, bufs), tree)
      for top in tree:
        sub = tree[top]
        added = layout.unpack(k, layout.add(k, bufs, top, sub))
        written = layout.unpack(k, layout.write(k, bufs, top, jax.tree.map(jnp.zeros_like, sub)))
        for name in tree:
          factor = (2, 0) if name == top else (1, 1)
          twice = jax.tree.map(lambda x, f=factor[0]: x * f, tree[name])
          zeroed = jax.tree.map(lambda x, f=factor[1]: x * f, tree[name])
          jax.tree.map(np.testing.assert_array_equal, added[name], twice)
          jax.tree.map(np.testing.assert_array_equal, written[name], zeroed)
      # The padding stays zero.
      for dt, b in layout.add(k, bufs, None, tree)["flat"].items():
        np.testing.assert_array_equal(b[layout.sizes[k].get(dt, 0) :], 0)


def test_transformer_blocks_are_stacked_and_only_stage_extras_padded():
  import jax
  import jax.numpy as jnp
  import optax

  import ilbp
  from ilbp.execution.spmd.flat import FlatLayout
  from ilbp.execution.stage import abstract_stages, make_stages
  from ilbp.models import transformer

  K, d, vocab, length = 4, 16, 32, 8
  model = transformer.make_model(
    vocab_size=vocab, num_layers=8, num_stages=K, d_model=d, num_heads=2, d_ff=32,
    max_len=length, head="linear",
  )  # fmt: skip
  specs = model.input_specs(jax.ShapeDtypeStruct((1, length), jnp.int32))
  local = ilbp.strategy("local")
  stages = abstract_stages(make_stages(model, None, local, optax.adam(1e-3)), specs)
  params = FlatLayout([s.params for s in stages])
  block = jax.tree.leaves(stages[1].params["stage"]["layer_0"])
  # Both layers of every stage are stacked whole: no block parameter is padded.
  assert params.stacked == [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in 2 * block]
  # What stays flat is each stage's own extras: the embedding (stage 1), the heads (stages
  # 1-3), the final norm and unembedding (stage 4); the padding is their imbalance only.
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  extras = [count(s.params) - count(block) * 2 for s in stages]
  assert [params.sizes[k]["float32"] for k in range(K)] == extras
  assert [params.padding_bytes(k) for k in range(K)] == [4 * (max(extras) - e) for e in extras]
  assert max(extras) - extras[1] == count(stages[0].params["stage"]["embed"]) + length * d
  # Adam's moments follow the parameters (stacked alike).
  opt = FlatLayout([s.opt_state for s in stages])
  assert opt.stacked_bytes() >= 2 * params.stacked_bytes()


@pytest.mark.parametrize("pipeline", ["1f1b", "zb"])
def test_a_tick_runs_a_forward_beside_a_backward_in_the_steady_state(pipeline):
  # K = 2, global, M = 8: one group per tick takes 2 ticks per microbatch on stage 1 (F, then
  # B once the cotangent is back); an F group beside a B group takes one, as dataflow does.
  sched = schedule.build(
    "global", 2, 8, False, schedule=pipeline, split=[6, 6] if pipeline == "zb" else None
  )
  merged = ticks.build(sched, 1, remat=False)
  apart = ticks.build(sched, 1, remat=False, merge=False)
  assert merged.num_ticks < apart.num_ticks
  assert any(len(gs) == 2 for gs in merged.groups.values())
  assert all(len(gs) == 1 for gs in apart.groups.values())
  flow = sched.predict(3)["time_per_step"]
  assert ticks.predict_time(merged, sched) < 1.1 * flow < ticks.predict_time(apart, sched)


def test_call_size_falls_back_to_one_step_around_evals_checkpoints_and_the_end():
  config = ml_collections.ConfigDict(
    {"total_steps": 10, "eval_every_steps": 4, "checkpoint_every_steps": 10}
  )
  sizes, done = [], 0
  while done < config.total_steps:
    sizes.append(trainer.call_size(done, config, 3))
    done += sizes[-1]
  # Steps 1-3; 4-6 would pass the eval at 4: step 4 alone; 5-7; 8 (eval) alone; 9-11 would
  # pass the end: 9 and 10 alone.
  assert sizes == [3, 1, 3, 1, 1, 1], sizes
  assert trainer.call_size(0, config, 1) == 1


COMMON = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  from conftest import (assert_evaluated_alike, assert_trained_alike, conv_bn_model,
                      image_problem)
  import ilbp
  from ilbp import state
  from ilbp.execution.fused import FusedExecutor
  from ilbp.models import resnet, transformer
  from ilbp.execution.spmd.executor import SpmdExecutor
  from ilbp.tasks import Classification, LanguageModeling

  tx, sched = state.make_optimizer(name="sgd", learning_rate=0.05, total_steps=10,
                                   weight_decay=1e-4)

  def check(model, task, batch, spec, name, combine="furthest", M=4, D=1, S=1, evaluate=False,
            pipeline="1f1b", remat=False, residuals="matmuls"):
    strat = ilbp.strategy(name, combine)
    args = (model, task, strat, tx, sched, spec)
    # The reference splits each microbatch over the same D devices (the same reductions) and
    # keeps every residual jax.vjp keeps; spmd (by default) only the matmul and conv outputs.
    fused = FusedExecutor(*args, microbatches=M, devices=jax.devices()[:D], residuals="all")
    ex = SpmdExecutor(*args, microbatches=M, data_parallel=D, steps_per_call=S,
                      pipeline=pipeline, remat=remat, residuals=residuals)
    rng = jax.random.PRNGKey(1)
    a, b = fused.init_state(rng), ex.init_state(rng)
    # Stage k's packed row lives on stage k's D devices only; so does its unpacked state.
    for part in (b.params, b.model_state, b.opt_state):
      for leaf in jax.tree.leaves(part):
        for shard in leaf.addressable_shards:
          assert shard.device in set(ex.mesh.devices[shard.index[0].start]), shard
    for k, stage in enumerate(ex.unpack_state(b).stages):
      for leaf in jax.tree.leaves(stage):
        assert leaf.sharding.device_set == set(ex.mesh.devices[k]), (k, leaf.sharding)
    for _ in range(3):
      a, ma = fused.train_step(a, fused.put_batch(batch))
    if S == 1:
      for _ in range(3):
        b, mb = ex.train_step(b, ex.put_batch(batch))
    else:
      b, mb = ex.train_steps(b, ex.put_batches([batch] * S))
      mb = {key: v[-1] for key, v in mb.items()}
    bt = ex.unpack_state(b)
    a, bt, ma, mb = jax.device_get((a, bt, ma, mb))
    assert int(bt.step) == 3
    assert_trained_alike(a, bt, ma, mb)
    if evaluate:  # Compiles K + 1 more programs: once is enough.
      assert_evaluated_alike(*jax.device_get((fused.eval_step(a, batch), ex.eval_step(b, batch))))
    print("EXACT", model.num_stages, name, combine, M, D, S, pipeline, remat, residuals,
          flush=True)

  images, image_spec, rng = image_problem()
  """
)

COVERING = textwrap.dedent(
  """
  # K = 4 on the conv + BatchNorm model: every reach and both combine rules between them;
  # 3 steps per call for local and 3wise, so stages run into the next step without a flush;
  # every pipeline schedule (zb splits 3wise's last microbatch), B ops reading the residuals
  # their forward stored: every residual (pairwise: bool ReLU masks in slots of their own) or
  # the conv outputs only.
  model = conv_bn_model(4)
  for name, combine, S, pipeline, residuals in (("local", "furthest", 3, "1f1b", "matmuls"),
                                                ("pairwise", "sum", 1, "gpipe", "all"),
                                                ("3wise", "furthest", 3, "zb", "matmuls")):
    check(model, Classification(), images, image_spec, name, combine, S=S, pipeline=pipeline,
          residuals=residuals)
  # K = 2, D = 2, 3 steps per call, remat: the real ResNet family (conv heads with BatchNorm;
  # at K = 2 pairwise is global: every stage but the last recomputes), computed in float64
  # (parameters stay float32): in float32 a reduction order's last bits flip the ReLUs of
  # near-zero pre-activations, and through the conv heads that moves gradients by up to 1e-1
  # of a tensor within 3 steps, even between fused on 1 and on 2 devices ...
  with jax.enable_x64(True):
    net = resnet.make_model("resnet_tiny", num_classes=10, num_stages=2, split=(3, 2),
                            head="conv", input_shape=(8, 8, 3), dtype=jnp.float64)
    wide = {"image": images["image"].astype(np.float64), "label": images["label"]}
    wide_spec = jax.ShapeDtypeStruct(image_spec.shape, jnp.float64)
    check(net, Classification(), wide, wide_spec, "pairwise", "furthest", D=2, S=3, remat=True)
  # ... and the Transformer with dropout and token weights (K = 4, D = 2, 3 steps per call;
  # global with "sum": every head's loss reaches back to stage 1).
  lm = transformer.make_model(vocab_size=37, num_layers=4, num_stages=4, d_model=16,
                              num_heads=2, d_ff=32, max_len=12, dropout_rate=0.1)
  tokens = rng.integers(0, 37, size=(8, 13)).astype(np.int32)
  text = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": (rng.random((8, 12)) > 0.1).astype(np.float32)}
  text_spec = jax.ShapeDtypeStruct((1, 12), jnp.int32)
  check(lm, LanguageModeling(), text, text_spec, "global", "sum", M=2, D=2, S=3, evaluate=True)
  """
)


def test_spmd_equals_fused_covering_strategies_rules_k_d_models_steps_per_call():
  out = run_with_devices(COMMON + COVERING, 8)
  assert out.count("EXACT") == 5, out


RESUME = textwrap.dedent(
  """
  import os, jax, numpy as np
  from experiments.configs import resnet_digits
  from conftest import Preempted, checkpoint_params, crash_after
  from ilbp import families, trainer

  def config(kind):
    c = resnet_digits.get_config("strategy=pairwise,stages=2,runlocal=1")
    c.total_steps, c.checkpoint_every_steps, c.eval_every_steps = 6, 2, 6
    c.execution.kind, c.execution.microbatches = kind, 2
    c.execution.steps_per_call = 2 if kind == "spmd" else 1
    return c


  # Killed between checkpoints under one executor, resumed under the other, both ways: the two
  # runs must end equal (each executor's own resume is tested against an uninterrupted run in
  # tests/test_train.py and tests/test_pipeline.py).
  root = os.environ["TMP_ROOT"]
  finals = []
  for first, then in (("spmd", "fused"), ("fused", "spmd")):
    work = f"{root}/{first}_{then}"
    real = crash_after(3)
    try:
      trainer.train_and_evaluate(config(first), work)
      raise AssertionError("no crash")
    except Preempted:
      pass
    families.build = real
    assert sorted(os.listdir(f"{work}/checkpoints")) == ["2"], os.listdir(f"{work}/checkpoints")
    finals.append((trainer.train_and_evaluate(config(then), work), checkpoint_params(work)))
    print("RESUMED", first, then, flush=True)
  (one, p_one), (two, p_two) = finals
  assert one["step"] == two["step"] == 6
  for key, value in one.items():
    np.testing.assert_allclose(two[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  for x, y in zip(jax.tree.leaves(p_one), jax.tree.leaves(p_two), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
  print("EQUAL", flush=True)
  """
)


def test_spmd_checkpoint_resumes_under_fused_and_back(tmp_path):
  out = run_with_devices(f"import os\nos.environ['TMP_ROOT'] = {str(tmp_path)!r}\n" + RESUME, 2)
  assert "RESUMED spmd fused" in out and "RESUMED fused spmd" in out and "EQUAL" in out, out


MEMORY = textwrap.dedent(
  """
  import dataclasses, os
  import jax
  from experiments.configs import transformer_stdlib
  from ilbp import checkpoint, families, trainer
  from ilbp.execution import factory, memory
  from ilbp.strategy import strategy as parse_strategy

  MB = 1e6
  SLACK = 0.25 * MB  # Keys, steps, metrics, a batch: small arrays outside any plan.
  for kind in ("spmd", "dataflow"):
    c = transformer_stdlib.get_config("runlocal=1,stages=2,strategy=pairwise")
    c.model.num_layers, c.model.d_model, c.model.d_ff = 2, 128, 512
    c.execution.kind, c.execution.microbatches = kind, 2
    execution = trainer.validate(c)
    tx, lr = trainer.make_optimizer(c)
    built = families.build(c, os.environ["TMP_ROOT"] + "/" + kind, factory.input_shard(execution))
    ex = factory.make(execution, built.model, built.task, parse_strategy(c.strategy, c.combine),
                      tx, lr, built.input_spec)
    plan = ex.memory(c.batch_size)
    print(kind, memory.describe(plan))
    if kind == "spmd":  # Pairwise at K = 2 is global: stage 1's B op waits for stage 2.
      stored = ex.padding(c.batch_size)
      again = factory.make(dataclasses.replace(execution, remat=True), built.model, built.task,
                           parse_strategy(c.strategy, c.combine), tx, lr, built.input_spec)
      remat = again.padding(c.batch_size)
      # Stored residuals: a slot per microbatch in flight (2), no spare; remat: none.
      assert stored["slots"]["residuals"] == 2 and stored["residual_bytes_per_stage"] > 0
      assert remat["slots"]["residuals"] == 0 == remat["residual_bytes_per_stage"]
      # Stage 2 stores none (its backward follows its forward) yet holds stage 1's buffers.
      assert stored["residual_padding_bytes_per_stage"] == [0, stored["residual_bytes_per_stage"]]
      held = [row.inflight_bytes for row in again.memory(c.batch_size)]
      assert [row.inflight_bytes for row in plan] == [
        h + stored["residual_bytes_per_stage"] for h in held
      ]
    st = ex.init_state(jax.random.PRNGKey(0))
    batches = built.data.train_batches(0)
    st, _ = ex.train_step(st, ex.put_batch(next(batches)))
    jax.block_until_ready(st)
    live = memory.live_bytes()
    ckpt = checkpoint.Checkpointer(os.environ["TMP_ROOT"] + "/ckpt_" + kind, async_save=False)
    saved = ex.checkpoint_state(st)  # What a save holds while it writes.
    during_save = memory.live_bytes()
    ckpt.save(1, saved)
    ckpt.close()
    del saved
    for row in plan:
      for device in row.devices:
        # Between steps: the device's own state (gradient sums and in-flight activations are
        # freed by then), never another stage's.
        assert live[device] <= row.state_bytes + SLACK, (kind, row.label, live[device], row)
        # During a save: no copy on any device (a save holds host copies of the stages).
        bound = row.state_bytes + SLACK
        assert during_save[device] <= bound, (kind, row.label, during_save[device], row)
        print("LIVE", kind, row.label, live[device], during_save[device], row.state_bytes)
    del st
  print("MEMORY OK")
  """
)


def test_each_device_holds_its_own_stages_state_while_training_and_saving(tmp_path):
  out = run_with_devices(f"import os\nos.environ['TMP_ROOT'] = {str(tmp_path)!r}\n" + MEMORY, 2)
  assert "MEMORY OK" in out, out


def test_split_token_table_leaves_no_stage_padded_to_hold_it():
  import jax
  import jax.numpy as jnp

  import ilbp
  from ilbp import state
  from ilbp.execution.spmd.flat import FlatLayout
  from ilbp.execution.spmd.vocab import VocabSplit
  from ilbp.execution.stage import abstract_stages, make_stages
  from ilbp.models import transformer

  K, d, vocab, length = 2, 16, 1001, 8
  model = transformer.make_model(vocab_size=vocab, num_layers=2, num_stages=K, d_model=d,
                                 num_heads=2, d_ff=32, max_len=length)  # fmt: skip
  tx, _ = state.make_optimizer(name="adamw", learning_rate=1e-3, grad_clip_norm=1.0)
  specs = model.input_specs(jax.ShapeDtypeStruct((1, length), jnp.int32))
  stages = abstract_stages(make_stages(model, None, ilbp.strategy("local"), tx), specs)
  split = VocabSplit(stages[0], model.info["embedding"], K)
  assert (split.vocab, split.width, split.rows) == (vocab, d, 501)
  assert [split.bounds(k) for k in range(K)] == [(0, 501), (501, 1001)]
  # Adam's two moments follow the table; the step counts are copied into every piece.
  assert len(split.abstract_piece()["moments"]) == 2 and split.abstract_piece()["other"]
  table = vocab * d * 4
  padding = lambda trees: FlatLayout(trees).padding_bytes(1)
  whole = [padding([getattr(s, p) for s in stages]) for p in ("params", "opt_state")]
  slim = [split.slim(stages[0]), stages[1]]
  cut = [padding([getattr(s, p) for s in slim]) for p in ("params", "opt_state")]
  # Whole: stage 2 is padded by the table (params) and its two moments; split: by neither.
  assert whole[0] - cut[0] == table and whole[1] - cut[1] == 2 * table
  assert cut[0] < table // 10
  # Each piece holds half the rows (one zero row in the last), with moments and gradient sums.
  assert split.padding_bytes(1) == 4 * d * 4 and split.padding_bytes(0) == 0
