"""Stop requests from the scheduler: a signal is recorded, the loop checkpoints at the step's end.

SLURM sends ``--signal=USR1@90`` before a time limit and SIGTERM on preemption or ``scancel``;
torchrun forwards SIGTERM to its workers. The handler only sets a flag (nothing unsafe happens
inside a signal handler); the training loop agrees on it across ranks after each step, so every rank
stops after the same step and writes the same checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional, Sequence

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
