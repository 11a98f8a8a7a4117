"""ilbp.workdir_lock: one live run per workdir; a dead holder never blocks.

The trainer-level behaviour (a live holder in another process refuses a run and leaves the
workdir untouched; a killed holder's lock is taken over and the run resumes) is in
test_experiments.py; these cover the lock itself, including filesystems without flock.
"""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from ilbp import workdir_lock


def _recorded(workdir):
  return (workdir / workdir_lock.LOCK_FILE).read_text()


def test_held_lock_refuses_naming_the_holder_and_is_released_on_exceptions(tmp_path):
  with pytest.raises(KeyError), workdir_lock.hold(str(tmp_path)):
    holder = json.loads(_recorded(tmp_path))
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    # flock is per open file, so even this process cannot take it twice.
    with pytest.raises(workdir_lock.WorkdirInUseError) as error, workdir_lock.hold(str(tmp_path)):
      pass
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(error.value)
    assert str(tmp_path) in str(error.value) and "--workdir" in str(error.value)
    raise KeyError("the run failed")
  assert _recorded(tmp_path) == ""  # Released, naming nobody.
  with workdir_lock.hold(str(tmp_path)):  # And free to take again.
    pass


@pytest.fixture
def no_flock(monkeypatch):
  def flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", flock)


def _write_holder(workdir, host, pid):
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid}))


@pytest.mark.usefixtures("no_flock")
def test_without_flock_a_live_holder_on_this_host_refuses_and_a_dead_one_is_taken_over(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_holder(tmp_path, socket.gethostname(), sleeper.pid)
    refused = pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {sleeper.pid} on host")
    with refused, workdir_lock.hold(str(tmp_path)):
      pass
    assert json.loads(_recorded(tmp_path))["pid"] == sleeper.pid  # Left as it was.
  finally:
    sleeper.kill()
    sleeper.wait()  # Reaped: the pid is gone.
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads(_recorded(tmp_path))["pid"] == os.getpid()


@pytest.mark.usefixtures("no_flock")
def test_without_flock_a_holder_on_another_host_is_taken_over_with_a_warning(tmp_path, caplog):
  _write_holder(tmp_path, "some-other-host", 12345)
  with caplog.at_level("WARNING"), workdir_lock.hold(str(tmp_path)):
    assert json.loads(_recorded(tmp_path))["pid"] == os.getpid()
  assert any("some-other-host" in r.getMessage() for r in caplog.records)
