"""Throughput accounting of a training run: samples/s, achieved TFLOP/s per device and MFU from the
analytical model FLOPs (trainer/flops.py), on the console line, in metrics.jsonl and metrics.json, with
evaluation time excluded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import torch

import train_helpers as th
import trainer.config  # noqa: F401  (registers the train schema)
from trainer.flops import diffusion_training_flops
from trainer.runtime.device import device_peak_tflops


def test_run_logs_tflops_and_mfu(tmp_path: Path, compose) -> None:
    cfg = OmegaConf.to_object(compose("train", ["experiment=tiny"]))
    run_dir = tmp_path / "run"
    peak = 0.002  # TFLOP/s: a CPU has no table entry, so MFU is against this
    proc = th.run(run_dir, ["train.max_steps=3", f"train.peak_tflops={peak}"])
    per_sample = diffusion_training_flops(cfg.model.unet, cfg.model.text_encoder, cfg.model.autoencoder, 16,
                                          cached_latents=False).total.model
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        # One rank does the whole global batch of 8 (micro 4 x accumulation 2).
        assert r["tflops_per_device"] == pytest.approx(8 * per_sample / r["step_time_s"] / 1e12, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / peak, rel=1e-6)
        assert r["samples_per_s"] == pytest.approx(8 / r["step_time_s"], rel=1e-6)
        assert r["samples_per_s_per_device"] == pytest.approx(r["samples_per_s"])
    assert "TFLOP/s/device" in proc.stderr and "| MFU " in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    step_seconds = sum(r["step_time_s"] for r in steps)
    assert metrics["train_seconds_this_session"] == pytest.approx(step_seconds, rel=1e-6)
    # Checkpoints (steps 2 and 3), the sample grid and start-up are outside the training time.
    assert metrics["seconds_this_session"] > metrics["train_seconds_this_session"]
    assert metrics["samples_per_second"] == pytest.approx(24 / step_seconds, rel=1e-6)
    assert metrics["tflops_per_device"] == pytest.approx(24 * per_sample / step_seconds / 1e12, rel=1e-6)
    assert metrics["mfu"] == pytest.approx(metrics["tflops_per_device"] / peak, rel=1e-6)
    assert metrics["peak_tflops_per_device"] == peak


def test_peak_from_override_or_table() -> None:
    assert device_peak_tflops(torch.device("cpu")) is None
    assert device_peak_tflops(torch.device("cpu"), 123.0) == 123.0


def test_peak_tflops_is_checked(compose) -> None:
    with pytest.raises(Exception, match="train.peak_tflops"):
        OmegaConf.to_object(compose("train", ["experiment=tiny", "train.peak_tflops=-1"]))
