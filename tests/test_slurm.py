"""SLURM: the rendered sbatch script, self-requeue, and real jobs on a one-node SLURM cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import ROOT, losses, train_env
from trainer.runtime.lifecycle import SlurmConfig
from trainer.submit import Run, render_script

SUBMIT = [sys.executable, "-m", "trainer.submit"]


def _dry_run(*overrides: str) -> str:
    proc = subprocess.run([*SUBMIT, *overrides, "--dry-run"], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_multi_node_script_has_the_lines_that_matter(tmp_path: Path) -> None:
    script = _dry_run("experiment=ldm_1p45b_256", "data.urls=['s3://b/{00000..00009}.tar']", f"run_dir={tmp_path}/run",
                      "slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.partition=h100", "slurm.time=48:00:00")
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR1@90", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --partition=h100", "#SBATCH --time=48:00:00", "#SBATCH --job-name=ldm_1p45b_256",
                 f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out"):
        assert line in lines, line
    assert 'export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}' in lines
    (srun,) = [ln for ln in lines if ln.startswith("srun ")]
    assert srun.startswith(f"srun --kill-on-bad-exit=1 {sys.executable} -m trainer.train experiment=ldm_1p45b_256 ")
    assert "s3://b/{00000..00009}.tar" in srun and "slurm.dry_run" not in srun
    assert f" run_dir={tmp_path}/run " in srun and srun.endswith(" slurm.time=48:00:00")


def test_bad_slurm_settings_fail_before_submission() -> None:
    proc = subprocess.run([*SUBMIT, "experiment=tiny", "slurm.signal=KILL", "--dry-run"], cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "slurm.signal='KILL' is invalid" in proc.stderr


def test_requeue_only_below_the_limit_and_only_under_slurm() -> None:
    from trainer.runtime.lifecycle import requeue_slurm_job

    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    assert not requeue_slurm_job(3, {}, run=run) and calls == []
    assert requeue_slurm_job(3, {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"}, run=run)
    assert calls == [["scontrol", "requeue", "42"]]
    assert not requeue_slurm_job(3, {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "3"}, run=run) and len(calls) == 1


# ----------------------------------------------------------------------------- a real cluster

JOB = ["experiment=tiny", "slurm.gpus_per_node=0", "slurm.tasks_per_node=2", "slurm.cpus_per_task=1",
       "slurm.time=00:10:00", "train.max_steps=40", "checkpoint.interval_steps=4", "checkpoint.keep_last=20",
       f"data.root={ROOT / '.cache' / 'data' / 'digits16'}"]


def _submit(cluster, run_dir: Path, *extra: str) -> str:
    env = {**train_env(), **cluster.env, "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([*SUBMIT, *JOB, f"run_dir={run_dir}", *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted job" in proc.stdout and str(run_dir) in proc.stdout
    return proc.stdout.split("submitted job ", 1)[1].split()[0]


def _log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))


def _wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_itself_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path) -> None:
    plain, preempted = tmp_path / "plain", tmp_path / "preempted"
    first = _submit(slurm_cluster, plain)
    assert slurm_cluster.wait(first, timeout_s=600) == "COMPLETED", _log(plain)
    state = json.loads((plain / "checkpoints" / "step00000040" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and slurm_cluster.restarts(first) == 0

    job = _submit(slurm_cluster, preempted)
    deadline = time.time() + 300
    while not (preempted / "checkpoints" / "latest").exists():  # training is under way
        assert time.time() < deadline, _log(preempted)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster.env, check=True)
    assert slurm_cluster.wait(job, timeout_s=600) == "COMPLETED", _log(preempted)
    log = _log(preempted)
    assert slurm_cluster.restarts(job) == 1, log
    assert "requeued SLURM job" in log and "(restart 1)" in log
    assert losses(preempted) == losses(plain)  # no lost or repeated step, bitwise
    assert len(_wandb_ids(preempted)) == 1 and len(list((preempted / "wandb").glob("offline-run-*"))) == 2


@pytest.mark.slow
def test_precompute_job_array_matches_one_process(slurm_cluster, tmp_path) -> None:
    digits = ROOT / ".cache" / "data" / "digits16"
    base = ["experiment=tiny", "model=tiny_kl", f"data.root={digits}", "precompute.dtype=fp32"]
    single, array = tmp_path / "single", tmp_path / "array"
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.precompute", *base, f"precompute.out={single}"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**train_env(), **slurm_cluster.env}
    proc = subprocess.run([*SUBMIT, *base, f"precompute.out={array}", f"run_dir={tmp_path}/run", "slurm.job=precompute",
                           "slurm.array_tasks=2", "slurm.gpus_per_node=0", "slurm.cpus_per_task=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = proc.stdout.split("submitted job ", 1)[1].split()[0]
    deadline = time.time() + 600
    while slurm_cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip():
        assert time.time() < deadline, _log(tmp_path / "run")
        time.sleep(1)
    log = _log(tmp_path / "run")
    assert "task 0 of 2" in log and "task 1 of 2" in log, log
    assert (array / "manifest.json").exists(), log
    assert {p.name: p.read_bytes() for p in array.glob("*.tar")} == {p.name: p.read_bytes() for p in single.glob("*.tar")}
    assert len(list(array.glob("*.tar"))) == 7


def test_socket_interface_is_exported_for_gloo_and_nccl_and_checked(tmp_path: Path, compose) -> None:
    run = Run(experiment="tiny", run_dir=tmp_path / "run", checkpoint_dir=str(tmp_path / "run" / "checkpoints"),
              precompute_out=None)
    lines = render_script(SlurmConfig(nodes=2, socket_ifname="ib0"), run, []).splitlines()
    assert "export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0" in lines
    assert "GLOO_SOCKET_IFNAME" not in render_script(SlurmConfig(nodes=2), run, [])
    # The documented command-line form of a list of interfaces: quoted, or Hydra splits it at the comma.
    cfg = compose("train", ["experiment=tiny", "slurm.socket_ifname='ib0,ib1'"])
    lines = render_script(SlurmConfig(socket_ifname=cfg.slurm.socket_ifname), run, []).splitlines()
    assert "export GLOO_SOCKET_IFNAME=ib0,ib1 NCCL_SOCKET_IFNAME=ib0,ib1" in lines
    with pytest.raises(ValueError, match=r"slurm.socket_ifname='ib0 && reboot' is invalid"):
        SlurmConfig(socket_ifname="ib0 && reboot")
