"""End to end through the real launcher: ZeRO 0/2/3 on 2 gloo ranks, exact resume after SIGTERM,
kill -9 and a crash mid-checkpoint, resume on another world size, W&B run continuity.

Each run is the ``tiny`` experiment (16 px digits, 8 samples per step, fp32). Losses are compared
from ``metrics.jsonl``, which a resumed run rewrites so it reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest
import torch

import train_helpers as th

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank ZeRO-2 run of STEPS steps."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    th.run(run_dir, ["deepspeed=zero2", f"train.max_steps={STEPS}", "checkpoint.interval_steps=100"], nproc=2)
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict[int, float]:
    out = th.losses(reference_dir)
    assert sorted(out) == list(range(1, STEPS + 1))
    return out


@pytest.mark.parametrize("stage, recompute", [(0, "none"), (3, "all")])
def test_zero_stages_train_the_same_model(tmp_path: Path, reference_dir: Path, reference, stage: int,
                                          recompute: str) -> None:
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    th.run(run_dir, [f"deepspeed=zero{stage}", f"deepspeed.activation_checkpointing={recompute}",
                     f"train.max_steps={STEPS}", "checkpoint.interval_steps=100"], nproc=2)
    got = th.losses(run_dir)
    assert got[1] == reference[1]  # same weights, same batch, same noise before any update
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert got[STEPS] < got[1]  # it learns
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == [f"step{STEPS:08d}"]
    state = json.loads((run_dir / "checkpoints" / tags[0] / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"], state["zero_stage"]) == (STEPS, 2, stage)
    assert state["samples_seen"] == STEPS * 8
    # The EMA, kept partitioned under ZeRO-3, is gathered whole into the checkpoint and equals the
    # EMA of the same trajectory under ZeRO-2.
    ema = load_file(str(run_dir / "checkpoints" / tags[0] / "ema.safetensors"))
    ref_ema = load_file(str(reference_dir / "checkpoints" / tags[0] / "ema.safetensors"))
    assert ema.keys() == ref_ema.keys() and len(ema) > 50
    for name in ema:
        assert ema[name].shape == ref_ema[name].shape
        torch.testing.assert_close(ema[name], ref_ema[name], rtol=1e-4, atol=1e-6)


def test_sigterm_checkpoints_and_resume_is_bitwise(tmp_path: Path, reference) -> None:
    run_dir = tmp_path / "run"
    run_dir.parent.mkdir(exist_ok=True)
    proc = th.start(run_dir, ["deepspeed=zero2", f"train.max_steps={STEPS}", "checkpoint.interval_steps=100"], nproc=2)
    th.wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(th.losses(run_dir)) >= 2, 180, proc,
                "step 2")
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
    proc.wait(timeout=120)
    out = th.output_of(proc)
    stopped_at = th.latest(run_dir)
    assert stopped_at is not None, out[-3000:]
    k = int(stopped_at[4:])
    assert 2 <= k < STEPS, out[-3000:]
    assert "stopped by SIGTERM" in (run_dir / "train.log").read_text()
    first_run_ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}

    th.run(run_dir, ["deepspeed=zero2", f"train.max_steps={STEPS}", "checkpoint.interval_steps=100"], nproc=2)
    got = th.losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(k + 1, STEPS + 1):
        assert got[step] == reference[step], (step, got[step], reference[step])  # bitwise, fp32
    run_ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and run_ids == first_run_ids


def test_kill9_after_checkpoint_resumes_bitwise(tmp_path: Path, reference) -> None:
    run_dir = tmp_path / "run"
    run_dir.parent.mkdir(exist_ok=True)
    proc = th.start(run_dir, ["deepspeed=zero2", f"train.max_steps={STEPS}", "checkpoint.interval_steps=2"], nproc=2)
    th.wait_for(lambda: th.latest(run_dir) == "step00000004", 180, proc, "checkpoint step 4")
    th.kill_group(proc)
    assert th.latest(run_dir) in ("step00000004", "step00000006")
    k = int(th.latest(run_dir)[4:])
    th.run(run_dir, ["deepspeed=zero2", f"train.max_steps={STEPS}", "checkpoint.interval_steps=2"], nproc=2)
    got = th.losses(run_dir)
    for step in range(k + 1, STEPS + 1):
        assert got[step] == reference[step], step


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_two_ranks_on_one(tmp_path: Path, reference, stage: int) -> None:
    run_dir = tmp_path / "run"
    half = STEPS // 2
    th.run(run_dir, [f"deepspeed=zero{stage}", f"train.max_steps={half}", "checkpoint.interval_steps=100"], nproc=2)
    proc = th.run(run_dir, [f"deepspeed=zero{stage}", f"train.max_steps={STEPS}", "checkpoint.interval_steps=100"],
                  nproc=1)
    log = (run_dir / "train.log").read_text()
    assert "saved on 2 ranks on 1 ranks through its universal conversion" in log, proc.stderr[-3000:]
    got = th.losses(run_dir)
    # The first step after the resume is computed from the restored weights: the same loss.
    assert got[half + 1] == pytest.approx(reference[half + 1], abs=1e-6)
    if stage == 3:
        # DeepSpeed's universal conversion of a ZeRO-3 checkpoint restores the weights exactly but
        # not every Adam moment in place (see the closing note of issue 3): later steps drift at
        # ~1e-3 relative; the run continues to learn.
        for step in range(half + 2, STEPS + 1):
            assert got[step] == pytest.approx(reference[step], rel=1e-2), step
        return
    for step in range(half + 2, STEPS + 1):
        # One rank accumulating 2 micro-batches of 4 sums the same per-sample gradients as two
        # ranks with 4 each, in another order: fp32 rounding only.
        assert got[step] == pytest.approx(reference[step], abs=1e-6), step


CRASH_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from trainer.runtime import checkpoint

    original = checkpoint.CheckpointStore._commit

    def commit(self, tag, out):
        if tag == "step00000004":  # every file of the tag is written, its pointer not yet
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, tag, out)

    checkpoint.CheckpointStore._commit = commit
    from trainer.train import main
    sys.argv = ["trainer.train", *sys.argv[1:]]
    main()
""")


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    th.run(ref_dir, ["train.max_steps=6", "checkpoint.interval_steps=100"])
    script = tmp_path / "crash.py"
    script.write_text(CRASH_DURING_SAVE)
    cmd = th.train_command(run_dir, ["train.max_steps=6", "checkpoint.interval_steps=2"])
    proc = subprocess.run([sys.executable, str(script), *cmd[3:]], cwd=th.ROOT, env=th.train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert th.latest(run_dir) == "step00000002"
    assert (run_dir / "checkpoints" / "step00000004" / "trainer_state.json").exists()  # written, not committed
    th.run(run_dir, ["train.max_steps=6", "checkpoint.interval_steps=2"])
    log = (run_dir / "train.log").read_text()
    assert "resumed from checkpoint step00000002" in log
    ref, got = th.losses(ref_dir), th.losses(run_dir)
    assert all(got[s] == ref[s] for s in range(1, 7))
    assert th.latest(run_dir) == "step00000006"
