"""Process faults (issue 19, item 11): a rank whose launcher died exits; a run directory is held by
one job at a time, and the lock of a job that died is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.runtime.lifecycle import LOCK_FILE, RunDirLock

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}

HOLDER = """
import sys, time
from trainer.runtime.lifecycle import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _wait(predicate, timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_run_dir_is_held_by_one_job_and_a_dead_jobs_lock_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"{tmp_path}.*in use by another job \(pid {holder.pid} on"):
            RunDirLock(tmp_path).acquire()
        holder.kill()  # kill -9: no cleanup runs, the kernel drops the flock
        holder.wait(timeout=60)
        with RunDirLock(tmp_path):
            assert f"pid {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
    finally:
        holder.kill()
        holder.wait()


# The launcher (like torch's elastic agent) starts the rank in its own session, then dies by SIGKILL.
LAUNCHER = """
import os, subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True,
                        env={**os.environ, "TORCHELASTIC_RUN_ID": "test"})
print(rank.pid, flush=True)
time.sleep(600)
"""
RANK = """
import signal, sys, time
from pathlib import Path
from trainer.runtime.lifecycle import exit_with_launcher
signal.signal(signal.SIGTERM, lambda *a: (Path(sys.argv[1]).write_text("stopped"), sys.exit(0)))
assert exit_with_launcher()
Path(sys.argv[1] + ".ready").write_text("")
time.sleep(600)
"""


def test_a_rank_exits_when_its_launcher_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "rank"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, str(marker)], env=ENV, stdout=subprocess.PIPE,
                                text=True)
    rank_pid = int(launcher.stdout.readline())
    try:
        assert _wait(lambda: Path(f"{marker}.ready").exists()), "the rank did not start"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=60)
        assert _wait(lambda: marker.exists()), "the rank kept running after its launcher died"
        assert marker.read_text() == "stopped"
    finally:
        try:
            os.kill(rank_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
