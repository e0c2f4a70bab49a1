"""Launching ``trainer.train`` from tests: one process, or N gloo ranks through the real torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the settings of a test job; they win over
    ``base``'s (a SLURM cluster's env carries the caller's own TORCH_EXTENSIONS_DIR, for one)."""
    env = dict(os.environ if base is None else base)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    env.pop("WANDB_API_KEY", None)
    return env


def python_command(target: list[str], nproc: int = 1) -> list[str]:
    """``python <target>`` (a script or ``-m <module>``, and its arguments); under the real torchrun with
    ``nproc`` ranks when ``nproc`` > 1."""
    if nproc == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]


def train_command(run_dir: Path, overrides: list[str], nproc: int = 1, experiment: str = "tiny") -> list[str]:
    args = [f"experiment={experiment}", f"run_dir={run_dir}", f"data.root={ROOT / '.cache' / 'data' / 'digits16'}",
            *overrides]
    return python_command(["-m", "trainer.train", *args], nproc)


def start(run_dir: Path, overrides: list[str], nproc: int = 1) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.{int(time.time() * 1000)}.out", "w")
    return subprocess.Popen(train_command(run_dir, overrides, nproc), cwd=ROOT, env=train_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)


def output_of(proc: subprocess.Popen) -> str:
    return Path(proc.stdout.name).read_text() if proc.stdout else ""


def run(run_dir: Path, overrides: list[str], nproc: int = 1, timeout: float = 300,
        expect: int | None = 0, experiment: str = "tiny") -> subprocess.CompletedProcess:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(train_command(run_dir, overrides, nproc, experiment), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=timeout)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"trainer.train exited {proc.returncode}, expected {expect}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record of a step wins)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[int(record["step"])] = record["loss"]
    return out


def straight_and_resumed(tmp_path: Path, overrides: list[str], *, stop: int = 3, steps: int = 6
                         ) -> tuple[dict[int, float], dict[int, float], subprocess.CompletedProcess]:
    """Losses of ``steps`` steps straight and of a run stopped after ``stop`` and resumed to ``steps``
    (run dirs ``reference`` and ``resumed`` under ``tmp_path``), and the straight run's process."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    proc = run(reference, [*overrides, f"train.max_steps={steps}"])
    run(resumed, [*overrides, f"train.max_steps={stop}"])
    run(resumed, [*overrides, f"train.max_steps={steps}"])
    return losses(reference), losses(resumed), proc


def latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode} before {what}:\n{output_of(proc)[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
