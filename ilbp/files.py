"""Run-directory files on a local disk or in a bucket (gs://, and any URL TensorFlow reads).

Local paths use Python's own file functions. A URL goes through `tf.io.gfile` (TensorFlow is
imported only then), which reads and writes Google Cloud Storage from a Cloud TPU VM with the
VM's credentials. Object stores have no append: a file that grows (metrics.jsonl) is
rewritten whole by its writer, with `write_text` (a new object renamed over the old one), so an
interrupted write leaves the previous complete object.
"""

from __future__ import annotations

import os
import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
  """Whether `path` is a URL such as gs://bucket/run (not a local or mounted path)."""
  return bool(_URL.match(str(path)))


def _gfile():
  import tensorflow as tf  # Only for URLs: a local run does not pay TensorFlow's import.

  return tf.io.gfile


def makedirs(path: str) -> None:
  if is_url(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def read_text(path: str) -> str:
  if is_url(path):
    with _gfile().GFile(path, "r") as f:
      return f.read()
  with open(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Replaces the file's content with `text` (for a URL: written whole under a temporary name,
  then renamed over the old object, so a reader never sees a part)."""
  if is_url(path):
    gfile, tmp = _gfile(), f"{path}.tmp-{os.getpid()}"
    with gfile.GFile(tmp, "w") as f:
      f.write(text)
    gfile.rename(tmp, path, overwrite=True)
  else:
    with open(path, "w") as f:
      f.write(text)
