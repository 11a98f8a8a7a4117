"""One live run per workdir: a lock that names its holder and dies with it.

`hold(workdir)` takes an exclusive `fcntl.flock` on `workdir/run.lock` for as long as the run
lasts and writes the holder (host, pid, start time) into the file. A second run on the same
workdir finds the lock taken and refuses at once, naming the holder, before it reads or writes
anything else there: two runs would otherwise interleave checkpoints and metrics.

The kernel drops a flock when its process ends, however it ends (exception, SIGKILL,
pre-emption), so a lock file left by a killed run names a dead process but holds no lock: the
next run takes it over and resumes. The file is emptied on release but never deleted: deleting
it would let a run that opened the old file lock it while a newcomer locks a new one.

flock covers the processes of one machine, and of several on Linux NFS mounts. Where the
filesystem refuses flock, and in a bucket (a gs:// workdir), the recorded holder
is checked instead: a live process on this host refuses; a holder on another host cannot be
checked, and is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging
from etils import epath

from ilbp import files

LOCK_FILE = "run.lock"


class WorkdirInUseError(RuntimeError):
  """Another live run holds the workdir; the message names it and what to do."""


def require_local(path: str, flag: str) -> None:
  """Refuses a URL (gs://, s3://, ...) for a directory that needs a local or mounted path.

  Raises:
    ValueError: naming the flag, the path and the two ways to keep it in a bucket.
  """
  if files.is_url(path):
    raise ValueError(
      f"{flag}={path!r} is a URL, but this directory must be a local or mounted path (it is "
      "written with local file functions and guarded by file locks). Pass a local path such "
      "as ~/runs/NAME and copy it to the bucket (docs/cloud_tpu_gpu.md, section 11), or mount "
      "the bucket (e.g. gcsfuse) and pass the mount's path. Nothing was written."
    )


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds `workdir`'s run lock for the duration of the `with` block.

  Args:
    workdir: an existing run directory.

  Raises:
    WorkdirInUseError: another live process holds the lock; nothing in `workdir` was changed.
  """
  path = os.path.join(workdir, LOCK_FILE)
  if files.is_url(workdir):
    with _hold_record(path, workdir):
      yield
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # Never truncated before the lock is ours.
  try:
    _acquire(fd, path, workdir)
    _write(fd, _me())
    try:
      yield
    finally:
      _write(fd, "")  # Released: the file names nobody.
  finally:
    os.close(fd)  # Drops the flock.


@contextlib.contextmanager
def _hold_record(path: str, workdir: str) -> Iterator[None]:
  """A bucket has no flock: the recorded holder decides. After writing our record, wait
  `_SETTLE_S` and read it back: of two runs that started together, the one whose record was
  overwritten stops. (Two writes more than `_SETTLE_S` apart that both read an empty record
  first are not caught.) On release the record is blanked only if it is still ours."""
  record = epath.Path(path)
  read = lambda: record.read_text() if record.exists() else ""
  _judge(_parse(read()), path, workdir)
  me = _me()
  files.write_text(record, me)
  time.sleep(_SETTLE_S)
  now = read()
  if now != me:
    raise WorkdirInUseError(_in_use_message(workdir, path, _parse(now)))
  try:
    yield
  finally:
    if read() == me:
      files.write_text(record, "")


_SETTLE_S = 1.0


def _me() -> str:
  me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%c %Z")}
  return json.dumps(me) + "\n"


def _acquire(fd: int, path: str, workdir: str) -> None:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return
  except BlockingIOError:
    raise WorkdirInUseError(_in_use_message(workdir, path, _holder(fd))) from None
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      raise
  # This filesystem has no flock: judge by the recorded holder.
  _judge(_holder(fd), path, workdir)


def _judge(holder: dict | None, path: str, workdir: str) -> None:
  """Without a flock: refuses a live holder on this host, takes over anything else."""
  if not holder or (holder.get("pid"), holder.get("host")) == (os.getpid(), socket.gethostname()):
    return
  if holder.get("host") == socket.gethostname():
    if pid_alive(int(holder["pid"])):
      raise WorkdirInUseError(_in_use_message(workdir, path, holder))
    return
  logging.warning(
    "%s has no flock and names a run on host %s (pid %s) that cannot be checked from "
    "here; taking the workdir over. Make sure that run is gone.",
    path,
    holder.get("host"),
    holder.get("pid"),
  )


def _holder(fd: int) -> dict | None:
  """The holder recorded in the lock file, or None when it is empty or unreadable."""
  return _parse(os.pread(fd, 4096, 0).decode(errors="replace"))


def _parse(text: str) -> dict | None:
  text = text.strip()
  try:
    holder = json.loads(text) if text else None
  except json.JSONDecodeError:
    return None
  return holder if isinstance(holder, dict) else None


def _write(fd: int, text: str) -> None:
  os.ftruncate(fd, 0)
  os.pwrite(fd, text.encode(), 0)


def pid_alive(pid: int) -> bool:
  """Whether a process with this pid exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


def _in_use_message(workdir: str, path: str, holder: dict | None) -> str:
  who = (
    f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
    if holder
    else "another process (it has not written its name into the lock yet)"
  )
  return (
    f"Workdir {workdir} is in use by a live run: {who}, which holds {path}. This run stopped "
    f"before reading or writing anything there, so two runs never write the same checkpoints. "
    f"Wait for that run to finish, stop it, or pass another --workdir. (A lock left by a run "
    f"that was killed does not block: it is taken over automatically. Where the lock is only a "
    f"record, in a bucket or on a filesystem without flock, and the named process is not an "
    f"ilbp run, delete {path} and start again.)"
  )
