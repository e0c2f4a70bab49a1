"""Stop requests from the scheduler: a signal is recorded, the loop checkpoints at the step's end.

SLURM sends ``--signal=USR1@90`` before a time limit and SIGTERM on preemption or ``scancel``;
torchrun forwards SIGTERM to its workers. The handler only sets a flag (nothing unsafe happens
inside a signal handler); the training loop agrees on it across ranks after each step, so every rank
stops after the same step and writes the same checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Callable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequest:
    def __init__(self, signals: Sequence[str] = DEFAULT_SIGNALS) -> None:
        self.received: Optional[str] = None
        self._previous = {}
        for name in signals:
            signum = getattr(signal, name, None)
            if signum is None:
                raise ValueError(f"signal {name!r} does not exist on this platform")
            if threading.current_thread() is threading.main_thread():
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("received %s: the run will checkpoint and stop after the current step", self.received)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def requeue_slurm_job(max_requeues: int, environ: Mapping[str, str] = os.environ,
                      run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> bool:
    """Requeue this SLURM job (``scontrol requeue $SLURM_JOB_ID``) unless it has been requeued
    ``max_requeues`` times already (``SLURM_RESTART_COUNT``). Call on one rank, after the checkpoint.
    Returns whether the job was requeued; outside SLURM it does nothing."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        log.warning("SLURM job %s was requeued %d times (slurm.max_requeues=%d): not requeuing again; "
                    "resubmit to continue from the checkpoint", job_id, restarts, max_requeues)
        return False
    proc = run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed (exit %d): %s; resubmit to continue from the checkpoint",
                  job_id, proc.returncode, (proc.stderr or proc.stdout).strip())
        return False
    log.warning("requeued SLURM job %s (restart %d of at most %d); it resumes from the checkpoint",
                job_id, restarts + 1, max_requeues)
    return True
