"""The autoencoder job (``trainer.train task=autoencoder``): two DeepSpeed engines on the trunk.

Runs the real entry point on the tiny preset (16 px digits, random-VGG LPIPS, discriminator from
step 2): exact resume of both optimizers, the discriminator untouched before ``disc_start``, the
exported weights + latent scale, and the config checks.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_helpers as th

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "autoencoder_tiny"
BASE = ["loss.disc_start=2", "checkpoint.interval_steps=2", "checkpoint.keep_last=5", "logging.image_interval_steps=0"]


def _run(run_dir: Path, extra: list[str]) -> subprocess.CompletedProcess:
    return th.run(run_dir, BASE + extra, experiment=EXPERIMENT)


def _module_states(path: Path) -> dict[str, torch.Tensor]:
    # DeepSpeed's own model file: tensors and plain containers only.
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def _records(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[int(rec["step"])] = rec
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ae") / "straight"
    _run(run_dir, ["train.max_steps=6"])
    return run_dir


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ae") / "resumed"
    _run(run_dir, ["train.max_steps=4"])
    _run(run_dir, ["train.max_steps=6"])
    return run_dir


def test_resume_continues_both_optimizers_exactly(straight: Path, resumed: Path) -> None:
    a, b = _records(straight), _records(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):  # after the resume: every logged term identical
        for key in ("loss", "loss/nll", "loss/kl", "loss/g_loss", "loss/d_weight", "loss/disc_loss",
                    "loss/logits_real", "loss/logits_fake", "loss/logvar"):
            assert a[step][key] == b[step][key], (step, key)
    tag = Path("checkpoints/step00000006")
    for rel in ("mp_rank_00_model_states.pt", "discriminator/mp_rank_00_model_states.pt"):
        sa, sb = _module_states(straight / tag / rel), _module_states(resumed / tag / rel)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), rel
    for rel in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "discriminator/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        assert (resumed / tag / rel).is_file()
    assert "resumed from checkpoint step00000004" in (resumed / "train.log").read_text()


def test_discriminator_starts_at_disc_start(straight: Path) -> None:
    from trainer.autoencoder_loss import AutoencoderLossConfig
    from trainer.models.discriminator import NLayerDiscriminator

    records = _records(straight)
    # Logged step s ran with global_step s - 1: inactive for s - 1 < disc_start = 2.
    assert [records[s]["loss/disc_active"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss/g_loss"] == 0 and records[2]["loss/d_weight"] == 0
    assert records[3]["loss/d_weight"] > 0 and records[3]["loss/disc_loss"] > 0
    # Untouched for two steps: the checkpoint of step 2 holds the seeded initial discriminator.
    cfg = AutoencoderLossConfig(disc_ndf=16, disc_num_layers=2, lpips_random_backbone=True)
    init = NLayerDiscriminator(cfg.disc_in_channels, cfg.disc_ndf, cfg.disc_num_layers, cfg.use_actnorm,
                               generator=torch.Generator().manual_seed(1)).state_dict()
    at2 = _module_states(straight / "checkpoints/step00000002/discriminator/mp_rank_00_model_states.pt")
    at4 = _module_states(straight / "checkpoints/step00000004/discriminator/mp_rank_00_model_states.pt")
    assert all(torch.equal(at2[k].float(), init[k].float()) for k in init)
    assert not torch.equal(at4["main.0.weight"], at2["main.0.weight"])


def test_exported_autoencoder_and_latent_scale(straight: Path) -> None:
    from trainer.convert.first_stage import load_first_stage
    from trainer.models.autoencoder import AutoencoderConfig

    tag_dir = straight / "checkpoints" / "step00000006"
    path = tag_dir / "autoencoder.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    scale = float(meta["scale_factor"])
    state = json.loads((tag_dir / "trainer_state.json").read_text())
    assert meta["format"] == "ldm-platform/autoencoder" and meta["step"] == "6"
    assert math.isfinite(scale) and scale > 0 and state["latent_scale_factor"] == pytest.approx(scale, rel=1e-12)
    # The live weights of the engine, unprefixed, fp32; a diffusion job loads them by path.
    live = _module_states(tag_dir / "mp_rank_00_model_states.pt")
    exported = load_file(str(path))
    assert set(exported) == {k[len("autoencoder."):] for k in live if k.startswith("autoencoder.")}
    assert all(torch.equal(exported[k], live["autoencoder." + k].float()) for k in exported)
    cfg = AutoencoderConfig(**{**json.loads(meta["config"]), "checkpoint_path": str(path), "scale_factor": scale})
    model = load_first_stage(cfg)
    assert all(torch.equal(model.state_dict()[k], exported[k]) for k in exported)
    with pytest.warns(UserWarning, match=f"model.autoencoder.scale_factor={scale:.6g}"):
        load_first_stage(AutoencoderConfig(**{**json.loads(meta["config"]), "checkpoint_path": str(path),
                                               "scale_factor": 1.0}))
    out = (straight / "metrics.json").read_text()
    assert json.loads(out)["finished"]


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed=zero3"], "deepspeed.zero_stage=3 is not supported"),
    (["loss.lpips_random_backbone=false"], "loss.lpips_backbone"),
    (["model=tiny"], "trains a KL autoencoder"),
    (["eval=digits"], "eval.kind='digits'"),
])
def test_bad_autoencoder_settings_fail_before_training(tmp_path: Path, overrides: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "trainer.train", f"experiment={EXPERIMENT}", f"run_dir={tmp_path / 'run'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=th.train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_overrides_cli_names_the_latest_autoencoder(straight: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "trainer.autoencoder_overrides", str(straight)], cwd=ROOT,
                          env=th.train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    path_arg, scale_arg = proc.stdout.split()
    path = straight.resolve() / "checkpoints" / "step00000006" / "autoencoder.safetensors"
    assert path_arg == f"model.autoencoder.checkpoint_path={path}"
    with safe_open(str(path), "pt") as f:
        assert float(scale_arg.split("=", 1)[1]) == float(f.metadata()["scale_factor"])
    bad = subprocess.run([sys.executable, "-m", "trainer.autoencoder_overrides", str(straight / "nowhere")], cwd=ROOT,
                         env=th.train_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "is not a checkpoint" in bad.stderr
