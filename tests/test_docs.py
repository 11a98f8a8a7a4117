"""The docs against the code: the README's example runs, links resolve, the guide's commands parse.

The README's library example is run as written. Every relative link and image in README.md and
docs/*.md must name a file of this repository, and an `#anchor` a heading of the page it points
to (GitHub's heading slugs).

The Cloud TPU / GPU guide's commands are checked against the code and the pins (no network, no
training):
Every `python -m` command in docs/cloud_tpu_gpu.md (also inside `gcloud ... --command="..."`)
must name a module of this repository, pass only flags that module defines, give a `--config`
whose file, `:arg` keys and `--config.FIELD=` overrides build, and ask for a strategy and a
`config.execution` that are valid on an 8-device host (a v5e-8, or 8 GPUs); a
`scripts.reproduce` command must name a suite whose every selected run passes the same checks.
Suite directories (`--out`) must not be `gs://` paths (reproduce.py writes them locally).
Versions quoted as `name==version` must be the requirements files' pins, and the accelerator
files must pin what jax's own metadata asks for.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags
from packaging.requirements import Requirement

from ilbp import families
from ilbp.execution import base as executor
from ilbp.strategy import strategy as parse_strategy

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "cloud_tpu_gpu.md"
REQUIREMENTS = ("requirements.txt", "requirements-tpu.txt", "requirements-cuda.txt")
# absl's own flags that the guide may pass to any binary.
ABSL_FLAGS = ("verbosity", "v", "alsologtostderr", "logtostderr")
DEVICES = 8  # The largest single host the guide targets.
# Shell variables the guide's commands need a value for (a `for I in 0 1 2` loop); others stay.
SHELL_VARIABLES = {"I": "0"}
_PUNCTUATION = set("();<>|&")


def _code_blocks(text: str) -> list[str]:
  return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_library_example_runs(capsys):
  section = README.read_text().split("## Using the library", 1)[1].split("\n## ", 1)[0]
  (example,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S)
  exec(compile(example, "README.md (Using the library)", "exec"), {"__name__": "readme"})
  assert "'head3/loss'" in capsys.readouterr().out


def _markdown_files() -> list[Path]:
  return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  heading = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(text: str) -> list[str]:
  """Targets of the markdown links, images and <img src=> of `text`, outside code."""
  text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
  text = re.sub(r"`[^`\n]*`", "", text)
  targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
  return targets + re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", text)


def _anchors(path: Path) -> set[str]:
  text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
  return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", text, flags=re.M)}


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
  checked = 0
  for target in _links(page.read_text()):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, gs: ... not checked here.
      continue
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.is_file(), f"{page.relative_to(ROOT)}: {target} names no file"
    assert file.is_relative_to(ROOT), f"{page.relative_to(ROOT)}: {target} leaves the repository"
    if anchor and file.suffix == ".md":
      assert anchor in _anchors(file), f"{page.relative_to(ROOT)}: no heading for #{anchor}"
    checked += 1
  assert checked or page.name != "quick_suite.md"  # That page's plots are checked, not skipped.


def _tokens(text: str) -> list[str]:
  lexer = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _commands(text: str):
  """Shell commands of `text` as token lists (continuations and multi-line quotes joined)."""
  pending = ""
  for line in text.splitlines():
    pending += line + "\n"
    if pending.rstrip().endswith("\\"):
      continue
    try:
      tokens = _tokens(pending)
    except ValueError:  # An open quote: the command goes on on the next line.
      continue
    pending = ""
    yield tokens
    for token in tokens:  # e.g. gcloud ... --command="cd ~/ilbp && .venv/bin/python -m ..."
      if " -m " in token:
        yield from _commands(token.partition("=")[2] if token.startswith("--") else token)


def _python_module_runs(tokens: list[str]):
  """(module, args) for every `python -m module args` in one command."""
  for i, token in enumerate(tokens[:-2]):
    if re.fullmatch(r"python(3(\.\d+)?)?", Path(token).name) and tokens[i + 1] == "-m":
      args = []
      for arg in tokens[i + 3 :]:
        if set(arg) <= _PUNCTUATION:
          break
        args.append(re.sub(r"\$(\w+)", lambda m: SHELL_VARIABLES.get(m[1], m[0]), arg))
      if args and args[-1].isdigit():  # The fd of a redirection such as `2>&1`.
        args.pop()
      yield tokens[i + 2], args


def _guide_runs() -> list[tuple[str, list[str]]]:
  runs = []
  for block in _code_blocks(GUIDE.read_text()):
    for tokens in _commands(block):
      runs.extend(_python_module_runs(tokens))
  return [(m, a) for m, a in runs if m.split(".")[0] in ("experiments", "scripts")]


def _module_flags(module: str) -> tuple[dict[str, str], bool | None]:
  """{flag name: DEFINE kind} of a binary (read from its source) and its config's lock_config."""
  source = _module_path(module).read_text()
  if "launch.main_for" in source:
    source += (ROOT / "experiments" / "launch.py").read_text()
  kinds = {name: kind for kind, name in re.findall(r"DEFINE_(\w+)\(\s*[\"'](\w+)[\"']", source)}
  lock = re.search(r"DEFINE_config_file\([^)]*?lock_config=(True|False)", source, flags=re.S)
  return kinds, (lock.group(1) == "True") if lock else None


def _module_path(module: str) -> Path:
  return ROOT / Path(*module.split(".")).with_suffix(".py")


_KINDS = ("bool", "boolean", "list", "multi_string", "integer", "float")


def _parse(module: str, args: list[str]) -> flags.FlagValues:
  """Parses `args` as `module` would; returns the flag values."""
  kinds, lock = _module_flags(module)
  kinds.update(dict.fromkeys(ABSL_FLAGS, "string"))
  fv = flags.FlagValues()
  for name, kind in kinds.items():
    if kind == "config_file":
      # Override flags (--config.FIELD=) are defined from the argument list, as from sys.argv.
      config_flags.DEFINE_config_file(
        name, None, "", flag_values=fv, lock_config=bool(lock), sys_argv=["prog", *args]
      )
    else:
      define = getattr(flags, f"DEFINE_{kind if kind in _KINDS else 'string'}")
      define(name, None, "", flag_values=fv)
  for arg in args:
    if arg.startswith("-"):
      name = arg.lstrip("-").partition("=")[0].split(".")[0]
      known = name in kinds or (name.startswith("no") and kinds.get(name[2:]) in _KINDS[:2])
      assert known, f"python -m {module}: no flag --{name}"
  fv(["prog", *args])
  return fv


def _check(module: str, args: list[str]) -> None:
  """Raises unless `python -m module args` would start on an 8-device host (see the docstring)."""
  assert _module_path(module).exists(), f"python -m {module}: no such module in this repository"
  fv = _parse(module, args)
  if "out" in fv and fv["out"].value:
    assert not fv["out"].value.startswith("gs://"), "--out must be a local path"
  if module.startswith("experiments."):
    assert fv["workdir"].present, f"python -m {module} needs --workdir"
    assert fv.config.family == module.split(".")[1], "the config's family runs in another binary"
  if module == "scripts.reproduce":
    from experiments import suites
    from scripts import reproduce

    suite = suites.SUITES[fv["suite"].value]
    seeds = [int(x) for x in fv["seeds"].value or []]
    runs = suites.suite_runs(
      suite, smoke=bool(fv["smoke"].value), seeds=seeds, extra=fv["set"].value or []
    )
    for run in reproduce.select(runs, fv["only"].value or []):
      _, binary, *run_args = run.args("/tmp/ilbp_runs")
      _check(binary, run_args)
  if "config" not in fv:
    return
  config = fv.config
  families.validate(config)
  names = fv["strategies"].value if "strategies" in fv else [config.strategy]
  for name in names:
    parse_strategy(name, config.combine)
  executor.validate(config, num_devices=DEVICES)


def test_guide_has_python_commands():
  modules = {m for m, _ in _guide_runs()}
  binaries = ("experiments.resnet", "experiments.transformer", "scripts.compare_strategies")
  assert {*binaries, "scripts.reproduce"} <= modules


@pytest.mark.parametrize(
  "module,args", _guide_runs(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_guide_command_is_valid(module, args, monkeypatch):
  monkeypatch.chdir(ROOT)  # Config paths in the guide are relative to the repository root.
  _check(module, args)


def _pins() -> dict[str, str]:
  pins = {}
  for name in REQUIREMENTS:
    for line in (ROOT / name).read_text().splitlines():
      line = line.split("#")[0].strip()
      if line and not line.startswith("-"):
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}: {line} is not an exact pin"
        key = _canonical(req.name)
        assert pins.setdefault(key, spec.version) == spec.version, f"{name}: {line} vs {pins[key]}"
  return pins


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def test_guide_versions_are_the_pins():
  pins = _pins()
  quoted = re.findall(r"([A-Za-z][\w.-]*)(?:\[[\w,-]+\])?==([0-9][\w.*]*)", GUIDE.read_text())
  checked = 0
  for name, version in quoted:
    pin = pins.get(_canonical(name))
    if pin is not None:
      prefix = version.removesuffix(".*")
      ok = pin.startswith(prefix + ".") if version.endswith(".*") else pin == version
      assert ok, f"the guide says {name}=={version}; the pin is {pin}"
      checked += 1
  assert checked


def test_accelerator_requirements_follow_jax():
  """requirements-{tpu,cuda}.txt: jax's extra at the pinned jax, and what that extra requires."""
  pins = _pins()
  for name, extra in (("requirements-tpu.txt", "tpu"), ("requirements-cuda.txt", "cuda12")):
    text = (ROOT / name).read_text()
    assert "-r requirements.txt" in text
    assert f"jax[{extra}]=={pins['jax']}" in text
  assert importlib.metadata.version("jax") == pins["jax"]
  for line in importlib.metadata.requires("jax"):
    req = Requirement(line)
    for extra in ("tpu", "cuda12"):
      if req.marker and req.marker.evaluate({"extra": extra}):
        name = _canonical(req.name)
        assert name in pins, f"jax[{extra}] requires {req}, not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs {pins[name]}"
