"""The shape of the code: imports flow one way, executors are peers, the library loads no
TensorFlow, a batch crosses few modules, and the repository cites nothing outside itself.

These read the source (the import graph, attribute accesses) or run the spmd binary once under
a profiler; none of them times anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_with_devices

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "ilbp"

# Modules that read TFDS datasets (and so load TensorFlow) and the trainer (clu's writers):
# everything else in the library imports without it.
LOADS_TENSORFLOW = {"ilbp.trainer", "ilbp.data.images", "ilbp.data.prepare"}
EXECUTORS = ("ilbp.execution.fused", "ilbp.execution.dataflow", "ilbp.execution.spmd")


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
  """The library modules `path` imports, at the top or inside a function alike (a lazy import
  still makes a dependency). `from ilbp import x` depends on the module ilbp.x, not on the
  package's __init__."""
  found = set()
  name = _module_name(path)
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, f"{path}: relative import; the library imports absolutely"
      base = node.module or ""
      targets = [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
        for alias in node.names
      ]
    else:
      continue
    for target in targets:
      while target and target not in modules:  # `import a.b.c` of a function or class in a.b
        target = target.rpartition(".")[0]
      if target and target != name:
        found.add(target)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}  # 1: on the current path, 2: done.
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return [*path[path.index(nxt) :], nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_library_import_graph_has_no_cycle_even_through_lazy_imports():
  graph = _graph()
  assert "ilbp.execution.fused" in graph and "ilbp.execution.spmd.program" in graph
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_executors_are_peers_that_import_only_downward():
  graph = _graph()

  def family(name: str) -> str | None:
    return next((e for e in EXECUTORS if name == e or name.startswith(e + ".")), None)

  for name, deps in graph.items():
    own = family(name)
    for dep in deps:
      other = family(dep)
      # No executor imports another executor or the factory above them all.
      if own:
        assert other in (None, own), f"{name} imports the peer executor {dep}"
        assert dep != "ilbp.execution.factory", f"{name} imports the factory above it"
      # The seam and the per-stage layer sit below every executor.
      if name in ("ilbp.execution.base", "ilbp.execution.stage", "ilbp.execution.schedule"):
        assert other is None, f"{name} imports the executor {dep}"
    # Nothing in the library but the trainer reaches up to the trainer or the binaries.
    if name != "ilbp.trainer":
      assert "ilbp.trainer" not in deps, f"{name} imports the trainer"
  factory = graph["ilbp.execution.factory"]
  assert {family(dep) for dep in factory} >= set(EXECUTORS), "the factory imports every executor"
  factory_source = (LIBRARY / "execution" / "factory.py").read_text()
  top = [n for n in ast.parse(factory_source).body if isinstance(n, ast.Import | ast.ImportFrom)]
  top_level = {
    f"{n.module}.{a.name}" if isinstance(n, ast.ImportFrom) else a.name
    for n in top
    for a in n.names
  }
  for executor in EXECUTORS:
    assert any(t == executor or t.startswith(executor) for t in top_level), (
      f"the factory imports {executor} at the top, not lazily"
    )


@pytest.mark.parametrize("folder", ["ilbp", "experiments", "scripts"])
def test_no_module_reads_another_objects_private_attributes(folder):
  allowed = {"_replace", "_asdict", "_fields"}  # NamedTuple's public API.
  offences = []
  for path in sorted((ROOT / folder).rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if not isinstance(node, ast.Attribute) or node.attr in allowed:
        continue
      if not node.attr.startswith("_") or node.attr.startswith("__"):
        continue
      if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
        continue
      offences.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
  assert not offences, "\n".join(offences)


def test_import_ilbp_and_the_library_modules_load_no_tensorflow():
  names = sorted(set(_modules()) - LOADS_TENSORFLOW)
  script = (
    "import importlib, sys\n"
    f"for name in {names!r}:\n"
    "  importlib.import_module(name)\n"
    "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', "
    "'tensorflow_datasets'))\n"
    "print('LOADED', loaded[:5])\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "LOADED []" in out.stdout, out.stdout


# Run the spmd binary for one step under a profiler: record the repository modules on the call
# stack whenever a stage's model function is applied or an optimizer update is applied while
# training, and which per-stage layer methods each executor calls.
WALK = r"""
import os, runpy, sys, tempfile, threading
ROOT = os.getcwd()
STAGE = os.path.join(ROOT, "ilbp", "execution", "stage.py")
TRAINING = {"forward", "loss", "backward", "update"}
walk, called = set(), {}

def repo_modules(frame):
  mods = []
  while frame:
    path = frame.f_code.co_filename
    if path.startswith(ROOT) and "site-packages" not in path:
      mods.append(os.path.relpath(path, ROOT))
    frame = frame.f_back
  return mods

def profile(frame, event, arg):
  if event != "call":
    return
  code = frame.f_code
  if code.co_filename == STAGE and code.co_name in TRAINING:
    mods = repo_modules(frame)
    kind = next((m for m in mods if m.startswith("ilbp/execution/")
                 and m not in ("ilbp/execution/stage.py",)), None)
    called.setdefault(kind, set()).add(code.co_name)
  elif code.co_name == "stage_apply" or (
      code.co_name == "apply_updates" and "optax" in code.co_filename):
    mods = repo_modules(frame)
    if "experiments/launch.py" in mods and "ilbp/execution/factory.py" not in mods:
      walk.update(mods)

sys.setprofile(profile)
threading.setprofile(profile)
work = tempfile.mkdtemp()
sys.argv = ["resnet", "--config=experiments/configs/resnet_digits.py:runlocal=1",
            f"--workdir={work}/spmd", "--config.execution.kind=spmd", "--config.num_stages=2",
            "--config.total_steps=1", "--config.eval_every_steps=1"]
try:
  runpy.run_module("experiments.resnet", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
print("WALK", sorted(walk))
from experiments.configs import resnet_digits
from ilbp import trainer
for kind in ("dataflow", "fused"):
  config = resnet_digits.get_config("runlocal=1,stages=2")
  config.execution.kind, config.total_steps, config.eval_every_steps = kind, 1, 1
  trainer.train_and_evaluate(config, f"{work}/{kind}")
sys.setprofile(None)
for kind, names in sorted(called.items(), key=str):
  print("CALLS", kind, sorted(names))
"""


def test_a_batch_crosses_at_most_8_modules_and_every_executor_runs_the_same_stage_layer():
  out = run_with_devices(WALK, 2)
  walk = eval(next(line[5:] for line in out.splitlines() if line.startswith("WALK ")))
  assert "experiments/resnet.py" in walk and "ilbp/execution/spmd/program.py" in walk
  assert len(walk) <= 8, walk
  calls = {
    line.split()[1]: line.split(" ", 2)[2] for line in out.splitlines() if line.startswith("CALLS ")
  }
  every = "['backward', 'forward', 'loss', 'update']"
  for module in (
    "ilbp/execution/fused.py",
    "ilbp/execution/dataflow.py",
    "ilbp/execution/spmd/program.py",
  ):
    assert calls.get(module) == every, (module, calls)


def test_nothing_cites_files_outside_the_repository():
  # Spelled in pieces so that this file does not cite them either.
  shared = ["../" + "shared", "PIPELINE" + ".md", "DESIGN" + ".md", "STYLE" + ".md"]
  tracked = subprocess.run(
    ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  offences = []
  for name in tracked:
    path = ROOT / name
    if path.suffix not in (".py", ".md", ".sh", ".toml", ".txt", ".cfg") or not path.is_file():
      continue
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      offences += [f"{name}:{number}: {line.strip()}" for s in shared if s in line]
  assert not offences, "\n".join(offences)
