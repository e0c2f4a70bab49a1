"""Stop requests from the scheduler: a signal is recorded, the loop checkpoints at the step's end.

SLURM sends ``--signal=USR1@90`` before a time limit and SIGTERM on preemption or ``scancel``;
torchrun forwards SIGTERM to its workers. The handler only sets a flag (nothing unsafe happens
inside a signal handler); the training loop agrees on it across ranks after each step, so every rank
stops after the same step and writes the same checkpoint.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from trainer.checks import check_int, invalid

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")

SIGNALS = ("USR1", "USR2", "TERM")
SLURM_JOBS = ("train", "precompute", "eval")


@dataclass
class SlurmConfig:
    """How ``trainer.submit`` asks SLURM for the job (``slurm/train.sbatch``), and how the running job
    handles the time-limit signal: checkpoint, then requeue itself (up to ``max_requeues`` times)."""

    # "precompute": the latent cache as a job array of array_tasks tasks; "eval": an evaluation
    # watcher beside training (slurm/eval_watch.sbatch: python -m eval.run watch=true on the run's checkpoints)
    job: str = "train"
    array_tasks: int = 8
    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU tasks
    tasks_per_node: Optional[int] = None  # default: one per GPU (1 without GPUs)
    cpus_per_task: int = 8
    mem: Optional[str] = None  # e.g. "0" (all of the node's memory), "200G"
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    job_name: Optional[str] = None  # default: the experiment name
    signal: str = "USR1"  # sent to every task signal_seconds before the time limit
    signal_seconds: int = 90
    max_requeues: int = 100
    log_dir: Optional[str] = None  # default: <run_dir>/slurm
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, venv, ...)
    extra_directives: list[str] = field(default_factory=list)  # e.g. ["--exclusive", "--constraint=h100"]
    python: Optional[str] = None  # interpreter on the nodes; default: the one running trainer.submit
    # The network interface(s) the ranks talk over across nodes, e.g. ib0, eth0, hsn0 ('ib0,ib1'): exported as
    # GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME. Unset, gloo binds to what the hostname resolves to
    # and NCCL picks an interface itself; on nodes with several networks either may pick one the
    # other nodes cannot reach, and the job hangs at the rendezvous until dist.timeout_s.
    socket_ifname: Optional[str] = None
    dry_run: bool = False  # print the sbatch script instead of submitting it

    def __post_init__(self) -> None:
        if self.job not in SLURM_JOBS:
            raise invalid("slurm.job", self.job, f"one of {SLURM_JOBS}")
        check_int("slurm.array_tasks", self.array_tasks, 1)
        check_int("slurm.nodes", self.nodes, 1)
        check_int("slurm.gpus_per_node", self.gpus_per_node, 0)
        if self.tasks_per_node is not None:
            check_int("slurm.tasks_per_node", self.tasks_per_node, 1)
        check_int("slurm.cpus_per_task", self.cpus_per_task, 1)
        if self.signal not in SIGNALS:
            raise invalid("slurm.signal", self.signal, f"one of {SIGNALS}")
        check_int("slurm.signal_seconds", self.signal_seconds, 1)
        check_int("slurm.max_requeues", self.max_requeues, 0)
        if self.socket_ifname is not None and not re.fullmatch(r"[\w.:-]+(,[\w.:-]+)*", self.socket_ifname):
            raise invalid("slurm.socket_ifname", self.socket_ifname,
                          "an interface name such as ib0, or a comma-separated list of them (quoted: 'ib0,ib1')")
        for d in self.extra_directives:
            if not d.startswith("--"):
                raise invalid("slurm.extra_directives", d, "sbatch options written as --name[=value]")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)




class StopWaiting(RuntimeError):
    """A stop signal arrived while the data loader was waiting for data (raised by the batch source)."""


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


# ----------------------------------------------------------------------------- process faults

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LOCK_FILE = ".run.lock"


def exit_with_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """Under torchrun, ask the kernel for SIGTERM when the launcher dies (Linux ``PR_SET_PDEATHSIG``):
    torch's elastic agent starts ranks in their own session, so a ``kill -9`` of torchrun would leave
    them training and checkpointing into a run directory a relaunch also writes to. SIGTERM is the
    ordinary stop request (checkpoint at the step's end, then exit). Returns whether it was set."""
    if "TORCHELASTIC_RUN_ID" not in environ or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); this rank will not notice its launcher dying",
                    ctypes.get_errno())
        return False
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class RunDirLock:
    """One job per run directory: an exclusive ``flock`` on ``<run_dir>/.run.lock``, held for the life
    of the process. The kernel drops it when the holder dies however it dies, so a stale lock of a
    killed job never blocks the next one; the file names the holder for the message."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RuntimeError(f"run directory {self.path.parent} is in use by another job ({holder}); wait for it "
                               f"to end, stop it, or choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
