"""``python -m trainer.submit <trainer.train overrides> [slurm.nodes=4 slurm.gpus_per_node=8 ...] [--dry-run]``

Renders ``slurm/train.sbatch`` from the same Hydra config as ``trainer.train`` (so a wrong key fails
here, before anything is queued), writes it beside the run, submits it with ``sbatch`` and prints
the job id, the log file, the run directory and where the W&B run lives. ``--dry-run`` (or
``slurm.dry_run=true``) prints the script instead. The job checkpoints on ``slurm.signal`` and
requeues itself; every restart resumes the same run (same checkpoints, data position, W&B run).
"""

from __future__ import annotations

import shlex
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trainer.cli import hydra_command
from trainer.config import TrainConfig
from trainer.images import atomic_write_bytes
from trainer.runtime.lifecycle import SlurmConfig
from trainer.runtime.tracking import is_secret_key, redact_text

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = {"train": ROOT / "slurm" / "train.sbatch", "precompute": ROOT / "slurm" / "precompute.sbatch",
             "eval": ROOT / "slurm" / "eval_watch.sbatch"}
EVAL_POLL_INTERVAL_S = 120
CONF_DIR = str(ROOT / "conf")
SUBMIT_ONLY = ("slurm.dry_run",)  # overrides that concern submission, not the job


@dataclass(frozen=True)
class Run:
    """What a job script needs to know of the run besides ``slurm.*``."""

    experiment: str
    run_dir: Path  # absolute: the job may start in another directory
    checkpoint_dir: str  # absolute or a URL
    precompute_out: Optional[str] = None

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Run":
        root = cfg.checkpoint.dir or str(Path(cfg.run_dir) / "checkpoints")
        return cls(experiment=cfg.experiment, run_dir=Path(cfg.run_dir).resolve(),
                   checkpoint_dir=root if "://" in root else str(Path(root).resolve()),
                   precompute_out=cfg.precompute.out)


def job_name(s: SlurmConfig, run: Run) -> str:
    return s.job_name or (run.experiment if s.job == "train" else f"{run.experiment}-{s.job}")


def log_dir(s: SlurmConfig, run: Run) -> Path:
    """Where the sbatch script and the job's output go (absolute: the job may start elsewhere)."""
    return Path(s.log_dir).resolve() if s.log_dir else run.run_dir / "slurm"


def network_lines(s: SlurmConfig) -> str:
    """The exports that pin gloo and NCCL to ``slurm.socket_ifname`` (nothing when unset)."""
    if not s.socket_ifname:
        return "# slurm.socket_ifname unset: gloo/NCCL choose the network interface themselves"
    name = shlex.quote(s.socket_ifname)
    return f"export GLOO_SOCKET_IFNAME={name} NCCL_SOCKET_IFNAME={name}"


def refuse_secrets(overrides: list[str]) -> None:
    """A job script is a file others can read: an override holding a credential is refused."""
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if (value and any(is_secret_key(part) for part in key.split("."))) or redact_text(o) != o:
            raise ValueError(f"the override of {key!r} holds a credential, which the SLURM script would store in "
                             f"plain text; pass credentials through the job's environment (AWS_ACCESS_KEY_ID / "
                             f"AWS_SECRET_ACCESS_KEY, an AWS profile: data.s3.profile, WANDB_API_KEY)")


def render_script(s: SlurmConfig, run: Run, overrides: list[str]) -> str:
    """The sbatch script of ``s.job``; ``overrides`` are passed to the job's Python entry point."""
    refuse_secrets(overrides)
    directives = []
    if s.job == "precompute" and not run.precompute_out:
        raise ValueError("slurm.job=precompute needs precompute.out=<cache folder or URL>")
    if s.gpus_per_node and s.job == "precompute":
        directives.append("--gpus-per-task=1")
    elif s.gpus_per_node:
        directives.append(f"--gpus-per-node={s.gpus_per_node}")
    for key in ("partition", "account", "qos", "mem"):
        if getattr(s, key):
            directives.append(f"--{key}={getattr(s, key)}")
    directives += list(s.extra_directives)
    if s.job == "eval":
        return _render_eval(s, run, overrides, directives)
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith(SUBMIT_ONLY)]
    if s.job == "precompute":  # the cache folder: absolute, whatever directory the array runs in
        job_overrides = [o if not o.startswith("precompute.out=") or "://" in o
                         else f"precompute.out={Path(o.split('=', 1)[1]).resolve()}" for o in job_overrides]
    if not any(o.startswith("run_dir=") for o in job_overrides):
        job_overrides.append(f"run_dir={run.run_dir}")  # the same folder on every restart, wherever sbatch ran
    values = {
        "job_name": job_name(s, run),
        "last_task": s.array_tasks - 1, "nodes": s.nodes, "ntasks_per_node": s.ntasks_per_node,
        "cpus_per_task": s.cpus_per_task, "time": s.time, "signal": s.signal, "signal_seconds": s.signal_seconds,
        "log_dir": str(log_dir(s, run)),
        "directives": "\n".join(f"#SBATCH {d}" for d in directives),
        "setup": "\n".join(s.setup), "python": shlex.quote(s.python or sys.executable),
        "overrides": " ".join(shlex.quote(o) for o in job_overrides), "network": network_lines(s),
    }
    return string.Template(TEMPLATES[s.job].read_text()).substitute(values)


def _render_eval(s: SlurmConfig, run: Run, overrides: list[str], directives: list[str]) -> str:
    """The evaluation watcher: the run's checkpoint root, the ``eval.*`` overrides of the command line
    (the protocol is otherwise the one saved with the run's checkpoints)."""
    # A preset chosen with `eval=<name>` becomes eval.run's `protocol=<name>` (dropping it would
    # silently evaluate the run's saved protocol instead).
    presets = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == "eval"]
    eval_overrides = [f"protocol={name}" for name in presets[-1:]] + [o for o in overrides if o.startswith("eval.")]
    values = {"job_name": job_name(s, run), "ntasks_per_node": max(1, s.gpus_per_node), "cpus_per_task": s.cpus_per_task,
              "time": s.time, "log_dir": str(log_dir(s, run)),
              "directives": "\n".join(f"#SBATCH {d}" for d in directives),
              "setup": "\n".join(s.setup), "python": shlex.quote(s.python or sys.executable),
              "network": network_lines(s), "checkpoint_root": shlex.quote(run.checkpoint_dir), "poll_interval_s": EVAL_POLL_INTERVAL_S,
              "overrides": " ".join(shlex.quote(o) for o in eval_overrides)}
    return string.Template(TEMPLATES["eval"].read_text()).substitute(values)


def submit(script: str, s: SlurmConfig, run: Run) -> tuple[str, Path, Path]:
    """Write the script under ``<run_dir>/slurm/`` and ``sbatch`` it: (job id, script, log file)."""
    path = log_dir(s, run) / f"{s.job}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    atomic_write_bytes(path, script.encode())  # (creates the log folder the job writes to)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("sbatch is not on PATH: run trainer.submit on a SLURM login node "
                           "(or use --dry-run to see the script)") from None
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    name = job_name(s, run)
    return job_id, path, log_dir(s, run) / (f"{name}-{job_id}.out" if s.job != "precompute" else f"{name}-{job_id}_<task>.out")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(dict_cfg: DictConfig) -> None:
    cfg: TrainConfig = OmegaConf.to_object(dict_cfg)  # validates every group before anything is queued
    run = Run.of(cfg)
    script = render_script(cfg.slurm, run, list(HydraConfig.get().overrides.task))
    if cfg.slurm.dry_run:
        print(script, end="")
        return
    job_id, path, log_file = submit(script, cfg.slurm, run)
    run_dir = run.run_dir
    print(f"submitted job {job_id}\n  script:  {path}\n  log:     {log_file}\n  run dir: {run_dir}\n"
          f"  W&B:     {run_dir / 'wandb'} (mode {cfg.logging.wandb_mode}; the run id is kept in the checkpoints "
          f"and reused by every restart)")


def _argv_with_dry_run(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--dry-run"] + (["slurm.dry_run=true"] if "--dry-run" in argv else [])


if __name__ == "__main__":
    sys.argv = _argv_with_dry_run(sys.argv)
    hydra_command(main)
