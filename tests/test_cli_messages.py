"""A user's mistake on any command: one message naming the fix, exit code 2, no traceback (issue 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

import data_pipeline.precompute
import eval.reconstruction
import eval.run
import trainer.export
import trainer.plan
import trainer.sample
import trainer.submit
import trainer.train
from trainer.cli import hydra_command, nearest_keys

ROOT = Path(__file__).resolve().parents[1]

HYDRA_CASES = [
    # (command, its main, argv, the suggestion the message must hold)
    ("trainer.train", trainer.train.main, ["train.max_step=10"], "did you mean train.max_steps"),
    ("trainer.train", trainer.train.main, ["modle=sd_v1"], "did you mean model"),
    ("trainer.train", trainer.train.main, ["model.unet.model_chanels=32"], "did you mean model.unet.model_channels"),
    ("trainer.submit", trainer.submit.main, ["slurm.node=4", "slurm.dry_run=true"], "did you mean slurm.nodes"),
    ("data_pipeline.precompute", data_pipeline.precompute.main, ["precompute.outt=x"], "did you mean precompute.out"),
    ("trainer.plan", trainer.plan.main, ["world_sise=8"], "did you mean world_size"),
    ("trainer.sample", trainer.sample.main, ["checkpoint=x", "prompt=a", "stpes=5"], "did you mean steps"),
    ("trainer.export", trainer.export.main, ["checkpoint=x", "out=y", "formt=diffusers"], "did you mean format"),
    ("eval.reconstruction", eval.reconstruction.main, ["checkpoint=x", "data=y", "featurs=digits"],
     "did you mean features"),
]


def _run_hydra_main(main, argv, monkeypatch, capsys) -> tuple[int, str]:
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exc:
        hydra_command(main)
    GlobalHydra.instance().clear()
    assert "HYDRA_FULL_ERROR" not in os.environ  # not left set for what runs next
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command,main,argv,suggestion", HYDRA_CASES, ids=[f"{c[0]} {c[2][-1]}" for c in HYDRA_CASES])
def test_a_misspelt_key_gets_the_nearest_key(command, main, argv, suggestion, monkeypatch, capsys) -> None:
    code, err = _run_hydra_main(main, argv, monkeypatch, capsys)
    assert code == 2
    assert suggestion in err
    assert "+" + argv[-1].split("=")[0] not in err  # not Hydra's advice to append the key
    assert "Traceback" not in err


def test_a_config_check_failure_is_a_message_not_a_traceback(monkeypatch, capsys) -> None:
    code, err = _run_hydra_main(trainer.train.main, ["experiment=ldm_1p45b_256"], monkeypatch, capsys)
    assert code == 2
    assert "error: data.urls=[] is invalid" in err and "Traceback" not in err


def test_an_unquoted_brace_pattern_says_how_to_quote_it(monkeypatch, capsys) -> None:
    code, err = _run_hydra_main(trainer.train.main, ["experiment=ldm_1p45b_256", "data.urls=[s3://b/{0..9}.tar]"],
                                monkeypatch, capsys)
    assert code == 2
    assert "'data.urls=\"s3://bucket/laion/{00000..12345}.tar\"'" in err and "Traceback" not in err


def test_full_error_keeps_the_traceback(monkeypatch) -> None:
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["prog", "train.max_step=10"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(Exception, match="train.max_step"):
        hydra_command(trainer.train.main)
    GlobalHydra.instance().clear()


def test_eval_run_suggests_its_own_and_eval_keys(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        eval.run.main(["checkpoint=x", "poll_intervl_s=3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "did you mean poll_interval_s" in err and "Traceback" not in err
    args = eval.run.parse_args(["checkpoint=x", "eval.num_sampels=4"])
    with pytest.raises(ValueError, match=r"eval.num_sampels is not a key .* did you mean eval.num_samples"):
        eval.run.protocol_config({}, args)


def test_nearest_keys_ranks_by_spelling() -> None:
    assert nearest_keys("max_step", ["seed", "max_steps", "micro_batch_size"]) == ["max_steps"]
    assert nearest_keys("zzz", ["seed", "max_steps"]) == []


def test_the_command_line_exits_2_with_the_suggestion() -> None:
    """The real entry point (``python -m``), not the function: the wiring in ``__main__``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "train.max_step=10"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "did you mean train.max_steps?" in proc.stderr and "Traceback" not in proc.stderr
    assert "+train.max_step" not in proc.stderr


def _autoencoder_run(tmp_path: Path) -> Path:
    """A run directory whose checkpoint is a task=autoencoder one (its state is all that is read)."""
    tag = tmp_path / "ae_run" / "checkpoints" / "step00000010"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("step00000010")
    (tag / "trainer_state.json").write_text(json.dumps({"step": 10, "zero_stage": 2, "world_size": 1,
                                                        "config": {"task": "autoencoder", "train": {"max_steps": 10}}}))
    return tmp_path / "ae_run"


@pytest.mark.parametrize("command", ["sample", "export", "eval.run"])
def test_an_autoencoder_run_is_not_a_text_to_image_checkpoint(command, tmp_path, monkeypatch, capsys) -> None:
    run = _autoencoder_run(tmp_path)
    if command == "eval.run":
        with pytest.raises(SystemExit) as exc:
            eval.run.main([f"checkpoint={run}", "device=cpu"])
        code, err = exc.value.code, capsys.readouterr().err
    else:
        main = trainer.sample.main if command == "sample" else trainer.export.main
        argv = [f"checkpoint={run}", f"out={tmp_path / 'out'}"] + (["prompt=a seven"] if command == "sample" else [])
        code, err = _run_hydra_main(main, argv, monkeypatch, capsys)
    assert code == 2
    assert "is a task=autoencoder run, not a text-to-image checkpoint" in err
    assert "EMA" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
