#!/usr/bin/env bash
# Creates .venv in the repository root, installs the pinned requirements and ilbp itself
# (editable, so `import ilbp` works from any directory) once. Re-running is cheap: a stamp file
# records which requirements.txt and pyproject.toml were installed.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  # The venv's own setuptools builds it: no download, no unpinned build dependency.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
