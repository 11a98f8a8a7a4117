"""The two file helpers `etils.epath` does not provide.

Files are read and written through `etils.epath`, which takes local paths and gs:// (and s3://,
az://) alike, through tf.io.gfile or fsspec. It has no public test for "this is an object
store", which the places that must behave differently there (no append, no flock, libraries
that only write locally) need: `is_url`. And its `write_text` writes in place: `write_text`
and `write_bytes` here replace a file whole (the one atomic write of the project).
"""

from __future__ import annotations

import os
import re
import socket

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
  """Whether `path` (a string or an epath.Path) is a URL such as gs://bucket/run."""
  return bool(_URL.match(str(path)))


def write_text(path, text: str) -> None:
  """Replaces the file's content with `text`: written under a temporary name, then renamed over
  the old file, so that an interrupted write leaves the previous complete file (and a reader
  never sees a part). Also the only correct write on TensorFlow's ram:// filesystem, the tests'
  bucket, where opening an existing file for writing appends."""
  _replace(path, lambda tmp: tmp.write_text(text))


def write_bytes(path, data: bytes) -> None:
  """`write_text` for bytes (caches that several runs or hosts may fill at once)."""
  _replace(path, lambda tmp: tmp.write_bytes(data))


def _replace(path, write) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Host and pid: writers on several hosts sharing one directory never share a temporary name.
  tmp = path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
  write(tmp)
  tmp.replace(path)
