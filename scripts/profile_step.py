"""Where one jitted train step spends its time, per XLA operation, from a profiler trace.

Usage (from the repository root; --config, --convs and --warmup are benchmark_step's):

  .venv/bin/python -m scripts.profile_step --config.model.name=resnet34_cifar
  .venv/bin/python -m scripts.profile_step \
      --config=experiments/configs/benchmark.py:family=transformer --strategy=pairwise
  .venv/bin/python -m scripts.profile_step --config=experiments/configs/resnet_imagenet.py \
      --config.model.name=resnet50 --config.batch_size=8 \
      --convs=xla                         # XLA's own conv weight gradients, for comparison

Runs --steps train steps of one strategy under `jax.profiler`, reads the trace (XPlane
protobuf) and joins every executed operation with the compiled HLO, then prints:

  * time per kind of operation, summed over the threads that ran them (on XLA:CPU, ops of one
    step run concurrently on the intra-op threads, so the sum exceeds the step's wall time):
      conv forward      convolutions of the forward pass
      conv input grad   convolutions under `transpose(...)` in the HLO metadata: input gradients
      conv weight grad  convolutions XLA built for weight gradients (no source metadata)
      matmul            dot products (the explicit conv weight gradients land here, and every
                        Transformer matmul)
      transpose/copy    layout changes, e.g. activations transposed for a weight gradient
      reduce            reductions (BatchNorm statistics, losses)
      other             the rest: elementwise fusions, pads, slices, ...
  * the --top most expensive operations, with their shape and the source they came from.

The classification reads fusion names and metadata of the HLO text; it is a guide to where to
look, not an exact accounting. On accelerators use the TensorBoard profile plugin instead.
"""

from __future__ import annotations

import collections
import glob
import re
import statistics
import tempfile

import jax
from absl import app, flags

from ilbp import families, timing, trainer
from ilbp import state as train_state
from ilbp.execution import fused
from ilbp.strategy import strategy as parse_strategy
from scripts import benchmark_step as bench  # defines --config, --convs and --warmup

_STRATEGY = flags.DEFINE_string("strategy", "local", "Strategy to profile.")
_STEPS = flags.DEFINE_integer("steps", 3, "Profiled steps (after --warmup untimed ones).")
_TOP = flags.DEFINE_integer("top", 25, "How many of the most expensive operations to list.")

_CONV_LINE = re.compile(r"= (\S+) convolution\(.*")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def hlo_index(text: str) -> tuple[dict, dict]:
  """(instruction name -> (shape, opcode, line), computation name -> its lines)."""
  instructions, computations, current = {}, {}, None
  for line in text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      m = _COMPUTATION.match(line)
      current = m.group(1) if m else None
      computations[current] = []
      continue
    if current is not None:
      computations[current].append(line)
    m = _INSTRUCTION.match(line)
    if m:
      instructions[m.group(1)] = (m.group(2), m.group(3), line)
  return instructions, computations


def classify(name: str, instructions: dict, computations: dict) -> tuple[str, str, str]:
  """(kind, output shape, source op_name) of one executed operation."""
  if name not in instructions:
    return "other", "", ""
  shape, opcode, line = instructions[name]
  body = [line]
  called = re.search(r"calls=%([\w.\-]+)", line)
  if called:
    body += computations.get(called.group(1), [])
  text = "\n".join(body)
  sources = re.findall(r'op_name="([^"]+)"', text)
  source = max(sources, key=len) if sources else ""
  if " convolution(" in text:
    conv_sources = [re.search(r'op_name="([^"]+)"', ln) for ln in body if " convolution(" in ln]
    conv_source = next((m.group(1) for m in conv_sources if m), "")
    if not conv_source:
      return "conv weight grad", shape, source
    if "transpose(" in conv_source:
      return "conv input grad", shape, conv_source
    return "conv forward", shape, conv_source
  if " dot(" in text:
    return "matmul", shape, source
  if opcode in ("transpose", "copy") or name.startswith(("transpose", "copy")):
    return "transpose/copy", shape, source
  if " reduce(" in text or " reduce-window(" in text:
    return "reduce", shape, source
  return "other", shape, source


def op_times(trace_dir: str, num_steps: int) -> collections.Counter:
  """Executed operation name -> ms per step, summed over threads, from the XPlane trace."""
  try:
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
  except ImportError as e:  # pragma: no cover - tensorflow is in requirements.txt
    raise SystemExit(f"Reading the trace needs tensorflow's xplane_pb2 ({e}).") from e
  (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  times = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:  # XLA:CPU's intra-op threads run the operations.
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if not name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          times[name] += event.duration_ps / 1e9 / num_steps
  return times


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; use --config.FIELD=VALUE.")
  config = flags.FLAGS.config
  rng = jax.random.PRNGKey(config.seed)
  conv = (flags.FLAGS.convs or ["auto"])[0] if config.family == "resnet" else None
  built, batch = bench.build(config, conv)
  model, task = built.model, built.task
  optimizer, _ = trainer.make_optimizer(config)
  st = train_state.create_train_state(model, optimizer, rng, built.input_spec)
  strategy = parse_strategy(_STRATEGY.value, config.combine)
  step = jax.jit(fused.make_train_step(model, task, strategy, optimizer), donate_argnums=0)
  hlo = step.lower(st, batch).compile().as_text()
  for _ in range(max(flags.FLAGS.warmup, 1)):
    st, _ = timing.timed_ms(lambda st=st: step(st, batch))[0]
  wall = []
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(_STEPS.value):
      (st, _), ms = timing.timed_ms(lambda st=st: step(st, batch))
      wall.append(ms)
    jax.profiler.stop_trace()
    times = op_times(trace_dir, _STEPS.value)
  if not times:
    raise SystemExit(
      f"The trace holds no XLA:CPU operations (backend {jax.default_backend()}); on an "
      "accelerator, open the trace in TensorBoard's profile plugin instead."
    )

  instructions, computations = hlo_index(hlo)
  kinds, rows = collections.Counter(), []
  for name, ms in times.items():
    kind, shape, source = classify(name, instructions, computations)
    kinds[kind] += ms
    rows.append((ms, name, kind, shape, source))
  total = sum(kinds.values())
  print(
    f"{families.describe(config, built)}\nbatch {config.batch_size}, strategy {strategy.name}"
    + (f", conv={conv}" if conv else "")
    + f", backend {jax.default_backend()}: step {statistics.median(wall):.1f} ms wall "
    f"(median of {_STEPS.value}), {total:.1f} ms of operations summed over threads\n"
  )
  for kind, ms in kinds.most_common():
    print(f"{kind:18s} {ms:9.1f} ms  {100 * ms / total:5.1f}%")
  print(f"\nthe {_TOP.value} most expensive operations (ms per step, summed over threads):")
  for ms, name, kind, shape, source in sorted(rows, reverse=True)[: _TOP.value]:
    print(f"{ms:8.2f}  {kind:16s} {name[:28]:28s} {shape[:32]:32s} {source[-60:]}")


if __name__ == "__main__":
  app.run(main)
