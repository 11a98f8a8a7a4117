"""Stopping a run cleanly on Ctrl-C or SIGTERM, with a checkpoint of the step it reached.

A pre-empted Cloud TPU or spot VM gets SIGTERM some seconds before it goes. Inside
`StopSignals` the first SIGINT or SIGTERM is only noted; the training loop asks `should_stop`
after every executor call (the only place the state is whole), checkpoints that step and raises
`RunStopped`. A second signal interrupts at once (KeyboardInterrupt), for a run stuck where no
call ends.

Every process of a multi-host job must stop after the same call, or the others would wait
forever in the next collective. There JAX's preemption service (started by
`jax.distributed.initialize`) owns SIGTERM: it tells every process, and
`multihost_utils.reached_preemption_sync_point` turns True on all of them at the same call.
Ctrl-C on one process is passed on as SIGTERM to itself, so it takes the same path. With the
service disabled (`jax_enable_preemption_service=False`) a multi-host run leaves signals alone:
it dies as before and resumes from its last regular checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
  """The run stopped on a signal after checkpointing `step`; the message says how to resume.

  Attributes:
    step: the last step trained, and the step of the checkpoint written.
    signum: the signal that asked for the stop (signal.SIGINT or signal.SIGTERM).
  """

  def __init__(self, step: int, signum: int):
    self.step, self.signum = step, signum
    super().__init__(
      f"Stopped at step {step} ({signal.Signals(signum).name}); checkpoint {step} written; "
      "re-run the same command to resume."
    )


class StopSignals:
  """A context that notes SIGINT and SIGTERM for the training loop instead of dying.

  Handlers can only be installed from the main thread; elsewhere (a run started in a worker
  thread) the context does nothing and signals act as they always do.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}
    # Several processes: JAX's preemption service decides (see the module docstring).
    self._synced = jax.process_count() > 1 and jax.config.jax_enable_preemption_service

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      return self
    if jax.process_count() > 1 and not self._synced:
      return self
    for signum in (signal.SIGINT,) if self._synced else _SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    if self.signum is not None:
      raise KeyboardInterrupt  # Asked twice: stop now, without a checkpoint.
    self.signum = signum
    if self._synced:
      os.kill(os.getpid(), signal.SIGTERM)  # The preemption service tells every process.
    # Nothing is logged here: a handler runs between any two bytecodes, also inside logging's
    # own lock; `RunStopped` says what happened once the checkpoint is written.

  def should_stop(self, call: int) -> bool:
    """Whether to stop after executor call number `call` (counted from 0 in this session, the
    same on every process): all processes of a job answer alike."""
    if not self._synced:
      return self.signum is not None
    if multihost_utils.reached_preemption_sync_point(call):
      self.signum = self.signum or signal.SIGTERM
      return True
    return False
