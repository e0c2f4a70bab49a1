"""The VQ first stage (CompVis ``VQModelInterface``, frozen): the paper's class-conditional, LSUN and
super-resolution LDM-4 checkpoints were trained on VQ-f4 latents, so importing them needs it. It equals
diffusers' ``VQModel`` with the converted weights, a CompVis class-conditional checkpoint with a VQ first
stage imports whole (UNet, codebook, class embedder), and what a VQ first stage cannot do is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import trainer.config  # noqa: F401 - registers the train_schema
from trainer.convert.diffusers_vae import diffusers_vae_config, vae_from_diffusers, vae_to_diffusers
from trainer.interchange import load_pretrained
from trainer.models.autoencoder import AutoencoderConfig, VQModel, build_first_stage
from trainer.models.config import build_components, count_parameters

TINY_VQ = dict(kind="vq", embed_dim=3, z_channels=3, n_embed=64, double_z=False, resolution=32, ch=32,
               ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], scale_factor=1.0)
VQ_OVERRIDES = [f"model.autoencoder.{k}={v}" for k, v in TINY_VQ.items() if k != "ch_mult"] + \
               ["model.autoencoder.ch_mult=[1,2,2]", "model.autoencoder.attn_resolutions=[8]"]
VQ_F4_PARAMETERS = 55_322_782  # conf/model/autoencoder/vq_f4.yaml, CompVis vq-f4 module for module (codebook 24,576)


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    return module.eval()


def test_vq_first_stage_equals_diffusers_vqmodel_both_ways() -> None:
    diffusers = pytest.importorskip("diffusers")
    cfg = AutoencoderConfig(**TINY_VQ)
    ours = _perturbed(build_first_stage(cfg))
    assert isinstance(ours, VQModel)
    theirs = diffusers.VQModel(**diffusers_vae_config(cfg)).eval()
    sd, report = vae_to_diffusers(ours.state_dict(), cfg)
    assert report.ok
    theirs.load_state_dict(sd, strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = ours.encode(x).mode()  # the unquantized latent latent diffusion trains on: (2, 3, 8, 8)
        torch.testing.assert_close(h, theirs.encode(x).latents, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.encode(x).sample(), h)  # a point mass: no posterior noise
        out = ours.decode(h)
        torch.testing.assert_close(out, theirs.decode(h).sample, rtol=1e-4, atol=1e-4)
        # Decoding quantizes: a latent moved less than half the way to another code decodes the same.
        codes = ours.quantize(h)
        assert torch.equal(ours.quantize(codes + 1e-4 * torch.randn_like(codes)), codes)
        assert not torch.equal(codes, h)
    back, report = vae_from_diffusers(theirs.state_dict(), cfg)
    assert report.ok and all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_vq_f4_preset_and_refusals() -> None:
    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = AutoencoderConfig(**yaml.safe_load((root / "conf/model/autoencoder/vq_f4.yaml").read_text()))
    assert count_parameters(build_first_stage(cfg)) == VQ_F4_PARAMETERS
    assert cfg.downsample_factor == 4 and cfg.latent_channels == 3
    with pytest.raises(ValueError, match="model.autoencoder.double_z=True; kind 'vq' needs double_z=false"):
        AutoencoderConfig(**{**TINY_VQ, "double_z": True})
    with pytest.raises(ValueError, match="model.autoencoder.n_embed=0"):
        AutoencoderConfig(**{**TINY_VQ, "n_embed": 0})


def test_a_compvis_class_conditional_checkpoint_with_a_vq_first_stage_imports_whole(compose, tmp_path) -> None:
    """cin256-v2's layout: model.diffusion_model.*, first_stage_model.* (VQ: quantize.embedding.weight,
    and the training loss's weights, not loaded), cond_stage_model.embedding.weight (ClassEmbedder with
    the null class row), model_ema.*; read with weights_only, every tensor lands."""
    overrides = ["experiment=tiny", "model=tiny_kl", "model/conditioning=class", "model.conditioning.num_classes=10",
                 "data.label_key=json:digit", "model.unet.in_channels=3", "model.unet.out_channels=3", *VQ_OVERRIDES]
    cfg = OmegaConf.to_object(compose("train", overrides))
    src = build_components(cfg.model)
    for m in (src.unet, src.first_stage, src.class_embedder):
        _perturbed(m, seed=3)
    sd = {**{f"model.diffusion_model.{k}": v for k, v in src.unet.state_dict().items()},
          **{f"first_stage_model.{k}": v for k, v in src.first_stage.state_dict().items()},
          "first_stage_model.loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4),
          "cond_stage_model.embedding.weight": src.class_embedder.embedding.weight.detach().clone(),
          **{"model_ema.diffusion_model" + k.replace(".", ""): v for k, v in src.unet.state_dict().items()},
          "model_ema.num_updates": torch.tensor(10)}
    path = tmp_path / "cin.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, path)
    dst = build_components(cfg.model)
    summary = load_pretrained(dst, str(path), cfg.model)
    assert summary["class_embedder"] == 1 and summary["first_stage"] == len(src.first_stage.state_dict())
    for a, b in ((src.unet, dst.unet), (src.first_stage, dst.first_stage), (src.class_embedder, dst.class_embedder)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # Another number of classes is refused, naming what to set.
    cfg20 = OmegaConf.to_object(compose("train", [*overrides, "model.conditioning.num_classes=20"]))
    with pytest.raises(ValueError, match="class embedder; model.conditioning.num_classes"):
        load_pretrained(build_components(cfg20.model), str(path), cfg20.model)


def test_the_autoencoder_job_refuses_a_vq_first_stage(compose) -> None:
    with pytest.raises(Exception, match="task=autoencoder trains a KL autoencoder; model.autoencoder.kind='vq'"):
        OmegaConf.to_object(compose("train", ["experiment=autoencoder_tiny", *VQ_OVERRIDES, "model.unet.in_channels=3",
                                                       "model.unet.out_channels=3"]))


def test_vq_first_stage_flops_match_the_counter() -> None:
    """Encode as a counter sees it; decode adds the codebook distance matmul (the quantizer's cdist,
    which FlopCounterMode does not count) to the counted convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.flops import first_stage_flops

    cfg = AutoencoderConfig(**TINY_VQ)
    ae = build_first_stage(cfg).eval()
    encode, decode = first_stage_flops(cfg, 32, 32)
    with torch.no_grad():
        image, latent = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 8, 8)
        with FlopCounterMode(display=False) as counter:
            ae.encode(image)
        assert abs(encode.forward / counter.get_total_flops() - 1) < 0.02
        with FlopCounterMode(display=False) as counter:
            ae.decode(latent)
    quantize = 2 * 8 * 8 * cfg.embed_dim * cfg.n_embed
    assert abs((decode.forward - quantize) / counter.get_total_flops() - 1) < 0.02


def test_n_embed_keeps_the_fingerprint_of_runs_made_before_it(compose) -> None:
    import json

    from trainer.config import check_compatible, config_fingerprint

    config = OmegaConf.to_container(compose("train", ["experiment=tiny", "model=tiny_kl"]), resolve=True)
    before = json.loads(json.dumps(config))
    del before["model"]["autoencoder"]["n_embed"]  # a run saved before the VQ first stage existed
    assert config_fingerprint(config) == config_fingerprint(before)
    assert "n_embed" in config["model"]["autoencoder"]  # the fingerprint leaves the config as it is
    check_compatible({"config_fingerprint": config_fingerprint(before), "config": before}, config, allow_change=False)
    other = OmegaConf.to_container(compose("train", ["experiment=tiny", "model=tiny_kl",
                                                     "model.autoencoder.n_embed=16"]), resolve=True)
    assert config_fingerprint(other) != config_fingerprint(config)
    with pytest.raises(ValueError, match="model.autoencoder.n_embed: 8192 -> 16"):
        check_compatible({"config_fingerprint": config_fingerprint(before), "config": before}, other,
                         allow_change=False)
