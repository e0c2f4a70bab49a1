"""End to end through the real entry point: a class-conditional job (model/conditioning=class on the
digits) resumes bitwise, and the class-conditional demo recipe learns its digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import train_helpers as th

pytestmark = pytest.mark.slow

CLASS = ["model/conditioning=class", "model.conditioning.num_classes=10", "data.label_key=json:digit",
         "checkpoint.interval_steps=2", "checkpoint.keep_last=3"]


def _ema(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step{step:08d}" / "ema.safetensors"))


def test_class_conditional_resume_is_bitwise(tmp_path: Path) -> None:
    """4 steps straight vs 2 steps, stop, resume for 2 more: the same losses and weights, bit for bit
    (class dropout to the null class, timesteps and noise all drawn per sample from its position)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    th.run(straight, [*CLASS, "train.max_steps=4"])
    th.run(resumed, [*CLASS, "train.max_steps=2"])
    th.run(resumed, [*CLASS, "train.max_steps=4"])
    a, b = th.losses(straight), th.losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a == b  # bitwise, fp32
    ema_a, ema_b = _ema(straight, 4), _ema(resumed, 4)
    assert ema_a.keys() == ema_b.keys()
    assert any(k.startswith("class_embedder.") for k in ema_a)  # the embedder trains with the UNet
    assert all(ema_a[k].equal(ema_b[k]) for k in ema_a)


def test_demo_class_recognises_the_requested_digit(tmp_path: Path) -> None:
    """experiment=demo_class, shortened (300 of its 800 steps, 5 samples per class): most samples show
    the requested digit (the full recipe: 100%, see README)."""
    run_dir = tmp_path / "run"
    th.run(run_dir, ["train.max_steps=300", "eval.samples_per_prompt=5", "checkpoint.interval_steps=300"],
           experiment="demo_class", timeout=600)
    record = json.loads(next((run_dir / "checkpoints" / "eval").glob("*.json")).read_text())
    row = record["results"][0]
    assert row["num_samples"] == 50 and row["guidance_scale"] == 3.0
    assert row["digit_accuracy"] >= 0.6, row
