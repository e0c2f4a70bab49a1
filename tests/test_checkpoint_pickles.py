"""No checkpoint file can run code on load (issue 19, item 1): DeepSpeed's own loads (resume,
universal conversion, consolidation for sampling / export / evaluation) go through torch's weights-only
unpickler with an allow-list of DeepSpeed's few types; a planted payload is refused naming the file."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_helpers as th
from trainer.runtime.pickles import ALLOWED_GLOBALS, UnsafeCheckpointError, check_pickles, weights_only_loads


class Payload:
    """Unpickled with ``weights_only=False`` it creates ``marker`` (any code could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    """Add a payload to a real checkpoint file, keeping everything it held."""
    with weights_only_loads():
        state = torch.load(path, map_location="cpu")
    state["payload"] = Payload(marker)
    torch.save(state, path)


def test_a_payload_is_refused_before_and_during_any_load(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt.*io\.open"):
        check_pickles(tmp_path)
    # DeepSpeed's own engine asks for weights_only=False; inside the context torch refuses anyway.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    with pytest.raises(UnsafeCheckpointError, match="weights-only"):
        with weights_only_loads():
            TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_deepspeeds_own_types_load() -> None:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    buf = io.BytesIO()
    dyn = DynamicLossScaler(init_scale=8.0, scale_window=10, min_scale=1.0, delayed_shift=2,
                            consecutive_hysteresis=False)
    state = {"zero_stage": ZeroStageEnum.gradients, "scaler": LossScaler(2.0), "dyn": dyn,
             "map": {"w": fragment_address(numel=4, start=2)}, "t": torch.arange(3)}
    torch.save(state, buf)
    buf.seek(0)
    with weights_only_loads():
        back = torch.load(buf, weights_only=False)
    assert back["zero_stage"] is ZeroStageEnum.gradients and back["scaler"].cur_scale == 2.0
    assert back["dyn"].cur_scale == 8.0 and back["map"]["w"].numel == 4 and back["map"]["w"].start == 2
    assert len(ALLOWED_GLOBALS) == 4


# ----------------------------------------------------------------------------- end to end

CONFIGS = {"zero0": ["deepspeed=zero0"], "zero1_bf16": ["deepspeed=zero1", "deepspeed.precision=bf16"],
           "zero2": ["deepspeed=zero2"], "zero3_bf16": ["deepspeed=zero3", "deepspeed.precision=bf16"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pickles")
    out = {}
    for name, overrides in CONFIGS.items():
        th.run(root / name, [*overrides, "train.max_steps=2", "checkpoint.interval_steps=2"])
        out[name] = root / name
    return out


def _planted(src: Path, dest: Path, file_glob: str) -> tuple[Path, Path]:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("wandb"))
    (files,) = [sorted((dest / "checkpoints" / "step00000002").glob(file_glob))]
    assert files, f"no {file_glob} in {dest}"
    marker = dest.parent / f"{dest.name}.pwned"
    plant(files[0], marker)
    return files[0], marker


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=th.ROOT, env=th.train_env(), capture_output=True, text=True,
                          timeout=300)


KINDS = [("zero0", "mp_rank_00_model_states.pt"), ("zero1_bf16", "*optim_states.pt"),
         ("zero2", "*optim_states.pt"), ("zero2", "mp_rank_00_model_states.pt"),
         ("zero3_bf16", "*model_states.pt"), ("zero3_bf16", "*optim_states.pt")]


@pytest.mark.slow
@pytest.mark.parametrize("config, file_glob", KINDS)
def test_resume_refuses_a_planted_payload(checkpoints, tmp_path: Path, config: str, file_glob: str) -> None:
    run_dir = tmp_path / "run"
    planted, marker = _planted(checkpoints[config], run_dir, file_glob)
    proc = th.run(run_dir, [*CONFIGS[config], "train.max_steps=3"], expect=None)
    assert proc.returncode != 0
    assert planted.name in proc.stdout + proc.stderr and "io.open" in proc.stdout + proc.stderr
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("config, file_glob", [("zero0", "mp_rank_00_model_states.pt"),
                                               ("zero2", "*optim_states.pt"), ("zero3_bf16", "*model_states.pt")])
def test_sample_export_and_eval_refuse_a_planted_payload(checkpoints, tmp_path: Path, config: str,
                                                         file_glob: str) -> None:
    run_dir = tmp_path / "run"
    planted, marker = _planted(checkpoints[config], run_dir, file_glob)
    commands = {
        "sample": ["-m", "trainer.sample", f"checkpoint={run_dir}", "prompt=a seven", "n=1", "steps=2",
                   "use_ema=false", f"out={tmp_path / 'samples'}"],
        "export": ["-m", "trainer.export", f"checkpoint={run_dir}", f"out={tmp_path / 'export'}",
                   "format=safetensors", "use_ema=false"],
        "eval": ["-m", "eval.run", f"checkpoint={run_dir}", "eval.use_ema=false", f"out={tmp_path / 'eval'}"],
    }
    for what, args in commands.items():
        proc = _cli(*args)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, (what, out[-3000:])
        assert planted.name in out and "io.open" in out, (what, out[-3000:])
        assert not marker.exists(), what


@pytest.mark.slow
def test_clean_checkpoints_still_resume_and_consolidate(checkpoints, tmp_path: Path) -> None:
    for config, overrides in CONFIGS.items():
        run_dir = tmp_path / config
        shutil.copytree(checkpoints[config], run_dir, ignore=shutil.ignore_patterns("wandb"))
        th.run(run_dir, [*overrides, "train.max_steps=3", "checkpoint.interval_steps=100"])
        assert th.latest(run_dir) == "step00000003"
        proc = _cli("-m", "trainer.export", f"checkpoint={run_dir}", f"out={tmp_path / config}_export",
                    "format=safetensors", "use_ema=false")
        assert proc.returncode == 0, proc.stderr[-3000:]
