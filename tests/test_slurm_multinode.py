"""Multi-node for real (issue 17): training, preemption, a lost node and evaluation on a two-node SLURM cluster.

The cluster (tests/slurm_cluster.py, ``MultiNodeSlurmCluster``) runs one slurmd per network namespace:
``node1`` and ``node2`` have their own addresses, so the rendezvous at the first node of
``SLURM_JOB_NODELIST``, node and local ranks, the port derived from the job id and the ranks' traffic
between hosts are exercised as on a real cluster. Every job goes through ``python -m trainer.submit``
(slurm/train.sbatch) with 2 nodes x 2 CPU tasks (gloo). All slow tier; skipped with the reason
where the machine cannot create namespaces or run SLURM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from test_eval_protocol import DATA_ROOT, METRIC_KEYS, RANK_WORKER, _load_rank
from test_eval_protocol import TRAIN as EVAL_TRAIN
from train_helpers import ROOT, latest, losses, train_env
from train_helpers import run as run_local
from trainer.runtime.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN

pytestmark = pytest.mark.slow

SUBMIT = [sys.executable, "-m", "trainer.submit"]


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_cpu_ops_built() -> None:
    """Build DeepSpeed's CPU shared-memory op (a JIT C++ extension every rank loads at start-up) once,
    here, into the jobs' TORCH_EXTENSIONS_DIR: otherwise the first job's ranks wait on its file lock
    while one of them compiles it (minutes on 2 busy cores; again after torch or deepspeed change)."""
    proc = subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _job(nodes: int = 2) -> list[str]:
    # global batch 8 = micro 2 x 4 ranks (accumulation 2 on 2 ranks)
    return ["experiment=tiny", f"slurm.nodes={nodes}", "slurm.gpus_per_node=0", "slurm.tasks_per_node=2",
            "slurm.cpus_per_task=1", "slurm.time=00:10:00", "slurm.socket_ifname=tnet0", "train.micro_batch_size=2",
            "checkpoint.keep_last=100", f"data.root={DATA_ROOT}"]


def _submit(cluster, run_dir: Path, *extra: str, nodes: int = 2) -> str:
    # No MASTER_ADDR / MASTER_PORT: the job takes them from its node list and job id.
    env = {k: v for k, v in train_env(cluster.env).items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([*SUBMIT, *_job(nodes), f"run_dir={run_dir}", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # Hydra's composition, on a busy machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("submitted job ", 1)[1].split()[0]


def _log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*.out")))


def _wait_for_checkpoint(run_dir: Path, timeout_s: float, tag: str | None = None) -> str:
    deadline = time.monotonic() + timeout_s
    while (found := latest(run_dir)) is None or (tag is not None and found < tag):
        assert time.monotonic() < deadline, f"no checkpoint {tag or ''} within {timeout_s} s\n{_log(run_dir)[-4000:]}"
        time.sleep(0.2)  # polling interval: the job writes the pointer after a complete checkpoint
    return found


def _port(job: str, step: int = 0) -> int:
    """The rendezvous port every task of step ``step`` derives (trainer/runtime/distributed.py)."""
    return SLURM_PORT_BASE + zlib.crc32(f"{job}.{step}".encode()) % SLURM_PORT_SPAN


def _layout_line(job: str) -> str:
    return (f"4 rank(s) on 2 node(s): node1: ranks 0,1 (local 0,1); node2: ranks 2,3 (local 0,1); "
            f"rendezvous node1:{_port(job)} (slurm)")


@pytest.mark.parametrize("stage", [2, 3])
def test_two_nodes_train_with_zero_and_the_checkpoint_resumes_on_one_node(slurm_two_nodes, tmp_path, stage) -> None:
    cluster = slurm_two_nodes
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    zero = [f"deepspeed=zero{stage}", "train.max_steps=8", "checkpoint.interval_steps=4"]
    job = _submit(cluster, two, *zero)
    # The checkpoint of step 4 was written by ranks on both hosts; a one-node job with 2 ranks resumes
    # it (through the universal conversion: another world size) while the two-node job goes on.
    _wait_for_checkpoint(two, 240, "step00000004")
    resumed = _submit(cluster, one, *zero, f"checkpoint.resume={two / 'checkpoints' / 'step00000004'}", nodes=1)
    assert cluster.wait(job, timeout_s=240) == "COMPLETED", _log(two)
    log = _log(two)
    assert _layout_line(job) in log, log[-4000:]
    assert "collective timeout 1800 s" in log
    step4 = two / "checkpoints" / "step00000004"
    assert json.loads((step4 / "trainer_state.json").read_text())["world_size"] == 4
    # Each rank's optimizer partition (ranks 2 and 3: node2) and RNG state is in the one checkpoint.
    for rank in range(4):
        assert list(step4.glob(f"zero_pp_rank_{rank}_*optim_states.pt")), sorted(p.name for p in step4.iterdir())
        assert (step4 / f"rng_rank{rank:05d}.safetensors").exists()

    assert cluster.wait(resumed, timeout_s=240) == "COMPLETED", _log(one)
    log_one = _log(one)
    assert "saved on 4 ranks on 2 ranks through its universal conversion" in log_one, log_one[-4000:]
    assert "2 rank(s) on 1 node(s)" in log_one
    got, reference = losses(one), losses(two)
    assert sorted(got) == [5, 6, 7, 8]
    # The first step after the resume is computed from the restored weights: the same loss.
    assert got[5] == pytest.approx(reference[5], abs=1e-6)
    for step in (6, 7, 8):
        if stage == 3:  # the universal conversion of ZeRO-3 moments drifts ~1e-3 (test_train_resume.py)
            assert got[step] == pytest.approx(reference[step], rel=1e-2), step
        else:  # 2 ranks x 2 micro-batches sum the per-sample gradients of 4 x 1 in another order
            assert got[step] == pytest.approx(reference[step], abs=1e-6), step


def test_time_limit_signal_checkpoints_once_requeues_and_matches_the_uninterrupted_two_node_run(
        slurm_two_nodes, tmp_path) -> None:
    cluster = slurm_two_nodes
    plain, preempted = tmp_path / "plain", tmp_path / "preempted"
    steps = ["train.max_steps=24", "checkpoint.interval_steps=4"]
    first = _submit(cluster, plain, *steps)
    job = _submit(cluster, preempted, *steps)  # both fit at once: 2 x 2 CPUs of the 4 per node
    _wait_for_checkpoint(preempted, 240)
    # What SLURM sends before the time limit (--signal=USR1@90): every task of the step gets it.
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, check=True, timeout=30)
    assert cluster.wait(first, timeout_s=300) == "COMPLETED", _log(plain)
    assert cluster.wait(job, timeout_s=300) == "COMPLETED", _log(preempted)
    log = _log(preempted)
    assert cluster.restarts(job) == 1 and cluster.restarts(first) == 0, log[-4000:]
    assert "requeued SLURM job" in log and "(restart 1)" in log
    # One checkpoint for the signal: every rank stopped after the same step, which was saved once.
    first_run, restarted = log.split("(restart 1)", 1)
    stops = set(re.findall(r"stopped by SIGUSR1 after step (\d+) with a checkpoint", first_run))
    assert len(stops) == 1, first_run[-4000:]
    stop_step = int(stops.pop())
    saved = re.findall(r"saved checkpoint step(\d+)", first_run)
    assert saved.count(f"{stop_step:08d}") == 1 and len(saved) == len(set(saved)), saved
    assert _layout_line(job) in restarted  # the same 2-node layout and port after the requeue
    resumed = re.search(r"resumed from checkpoint (step\d+): step (\d+), (\d+) samples seen, W&B run (\w+)", restarted)
    assert resumed, restarted[-4000:]
    assert int(resumed.group(2)) == stop_step
    assert int(resumed.group(3)) == 8 * stop_step  # the data position: every sample of every step
    # No lost or repeated step, bitwise; one W&B run, continued by the requeued job.
    assert losses(preempted) == losses(plain)
    run_ids = {p.name.rsplit("-", 1)[1] for p in (preempted / "wandb").glob("offline-run-*")}
    assert run_ids == {resumed.group(4)} and len(list((preempted / "wandb").glob("offline-run-*"))) == 2


def _kill_node_tasks(cluster, job: str, node: str, sig: int) -> list[int]:
    pids = cluster.task_pids(job, node)
    assert pids, f"no task of job {job} found on {node}"
    for pid in pids:
        os.kill(pid, sig)
    return pids


def test_a_lost_node_ends_the_whole_job_and_a_rerun_resumes_from_the_last_complete_checkpoint(
        slurm_two_nodes, tmp_path) -> None:
    cluster = slurm_two_nodes
    run_dir = tmp_path / "run"
    timeout_s = 30
    job = _submit(cluster, run_dir, "train.max_steps=400", "checkpoint.interval_steps=4", f"dist.timeout_s={timeout_s}")
    _wait_for_checkpoint(run_dir, 240, "step00000008")
    _kill_node_tasks(cluster, job, "node2", signal.SIGKILL)  # ranks 2 and 3, mid-step
    # Bounded: the survivors' collective fails (peer gone) or times out after dist.timeout_s, and
    # srun --kill-on-bad-exit ends every task; KillWait (5 s) and slack on top.
    assert cluster.wait(job, timeout_s=timeout_s + 5 + 60) == "FAILED", _log(run_dir)[-4000:]
    log = _log(run_dir)
    assert re.search(r"srun: error: node2: tasks? 2-3: Killed", log), log[-4000:]  # the failed ranks and host
    assert re.search(r"rank [01] \(local rank [01]\) on node node1 failed: ", log), log[-4000:]
    assert cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip() == ""
    assert not cluster.task_pids(job, "node1") and not cluster.task_pids(job, "node2")

    last = latest(run_dir)
    last_step = int(last.removeprefix("step"))
    rerun = _submit(cluster, run_dir, f"train.max_steps={last_step + 2}", "checkpoint.interval_steps=4",
                    f"dist.timeout_s={timeout_s}")
    assert cluster.wait(rerun, timeout_s=240) == "COMPLETED", _log(run_dir)[-4000:]
    after = _log(run_dir).split(f"job {rerun} ", 1)[1]
    assert f"resumed from checkpoint {last}: step {last_step}, {8 * last_step} samples seen" in after, after[-4000:]
    assert sorted(losses(run_dir))[-2:] == [last_step + 1, last_step + 2]


def _sbatch(cluster, script: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", str(script)], cwd=ROOT, env=train_env(cluster.env) | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_evaluation_on_two_nodes_gives_the_images_and_numbers_of_one_rank(slurm_two_nodes, tmp_path) -> None:
    """``eval.run`` (the watcher's srun line) and the protocol's sample/gather/score steps with
    2 nodes x 2 ranks, against one rank: the same images per global batch, the same gathered
    features, digits and grid, the same metrics."""
    cluster = slurm_two_nodes
    run_dir, cache = tmp_path / "run", tmp_path / "reference_cache"
    run_local(run_dir, [*EVAL_TRAIN, f"eval.reference_cache={cache}"])
    root, checkpoint = run_dir / "checkpoints", run_dir / "checkpoints" / "step00000004"
    one_eval, four_eval = tmp_path / "eval_one", tmp_path / "eval_four"
    proc = subprocess.run([sys.executable, "-m", "eval.run", f"checkpoint={root}", f"out={one_eval}"], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    worker = tmp_path / "rank_worker.py"
    worker.write_text(RANK_WORKER)
    one_ranks, four_ranks = tmp_path / "ranks1", tmp_path / "ranks4"
    one_ranks.mkdir(), four_ranks.mkdir()
    worker_args = [str(checkpoint), str(DATA_ROOT), str(cache)]
    proc = subprocess.run([sys.executable, str(worker), worker_args[0], str(one_ranks), *worker_args[1:]], cwd=ROOT,
                          env=train_env() | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "eval_job.out"
    script = tmp_path / "eval.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n#SBATCH --cpus-per-task=1\n"
        f"#SBATCH --output={out}\nset -euo pipefail\nexport GLOO_SOCKET_IFNAME=tnet0 OMP_NUM_THREADS=1\n"
        f"srun --kill-on-bad-exit=1 {sys.executable} -m eval.run checkpoint={root} out={four_eval}\n"
        f"srun --kill-on-bad-exit=1 {sys.executable} {worker} {worker_args[0]} {four_ranks} {' '.join(worker_args[1:])}\n")
    job = _sbatch(cluster, script)
    assert cluster.wait(job, timeout_s=300) == "COMPLETED", out.read_text()[-4000:]

    # eval.run: the numbers.
    one = json.loads((one_eval / "step00000004.json").read_text())
    four = json.loads((four_eval / "step00000004.json").read_text())
    assert one["world_size"] == 1 and four["world_size"] == 4 and four["protocol"] == one["protocol"]
    assert [{k: r[k] for k in METRIC_KEYS} for r in four["results"]] == [{k: r[k] for k in METRIC_KEYS} for r in one["results"]]

    # The protocol's steps: global batch j (3 samples) is drawn by rank j % 4 -- ranks 2 and 3 on node2.
    single, single_arrays = _load_rank(one_ranks, 0)
    ranks = [_load_rank(four_ranks, r) for r in range(4)]
    drawn_single = {k: v for k, v in single_arrays.items() if k.startswith("drawn_")}
    for g in ("1", "3"):
        assert single["drawn"][g] == [0, 3, 6, 9, 12, 15, 18]
        assert [info["drawn"][g] for info, _ in ranks] == [[0, 12], [3, 15], [6, 18], [9]]
    drawn_four = [{k: v for k, v in arrays.items() if k.startswith("drawn_")} for _, arrays in ranks]
    assert sorted(k for d in drawn_four for k in d) == sorted(drawn_single)
    for drawn in drawn_four:
        for key, images in drawn.items():
            assert images.dtype == np.uint8 and np.array_equal(images, drawn_single[key]), key
    for info, arrays in ranks:  # every rank holds the whole gathered set, and the same metrics
        assert info["world_size"] == 4 and info["metrics"] == single["metrics"]
        for g in ("1", "3"):
            for key in ("features", "digits", "grid"):
                assert np.array_equal(arrays[f"{key}_g{g}"], single_arrays[f"{key}_g{g}"]), (key, g)
