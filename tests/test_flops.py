"""Analytical FLOPs (trainer/flops.py) against torch's FlopCounterMode on the real networks: tiny and
SD-shaped configs, forward, backward, every activation-checkpointing mode, trained and frozen text
encoders, the first stage. Built on the meta device (shapes only), so SD-sized counts take seconds.

SDPA runs on the math backend here, so attention is counted as its matmuls (CPU's fused kernel has no
flop formula in torch; the fused GPU kernels' formula adds the recomputed scores, which model FLOPs
do not credit)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import trainer.plan  # noqa: F401  (registers the plan schema)
from trainer.flops import (diffusion_training_flops, first_stage_flops, images_per_second, peak_tflops_for,
                           text_encoder_flops, unet_flops)
from trainer.models.autoencoder import build_first_stage
from trainer.models.text_encoders import build_text_encoder
from trainer.models.unet import CHECKPOINT_BLOCKS, UNetModel
from trainer.runtime.engine import apply_activation_checkpointing
from trainer.tasks.diffusion import DiffusionTrainModule

TOLERANCE = 0.02  # the bar; the counts below agree exactly


def _model_cfg(compose, preset: str):
    return OmegaConf.to_object(compose("plan", [f"model={preset}"])).model


def _count(fn, *, backward: bool = True) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of ``fn()`` as FlopCounterMode sees them."""
    with sdpa_kernel(SDPBackend.MATH):
        counter = FlopCounterMode(display=False)
        with counter:
            out = fn()
            forward = counter.get_total_flops()
            if backward:
                out.float().sum().backward()
        return forward, counter.get_total_flops()


def _close(analytic: int, counted: int) -> None:
    assert counted > 0
    assert abs(analytic - counted) <= TOLERANCE * counted, (analytic, counted, analytic / counted)


_SLOW = pytest.mark.slow  # SD-shaped with recomputation: ~10 s each on 2 cores
UNET_CASES = [(preset, size, ac) for preset, size in (("tiny", 16), ("tiny", 24))
              for ac in ("none", "res", "transformer", "all")]
UNET_CASES += [("sd_v1", 32, "none"), ("sd_v2", 32, "none")]
UNET_CASES += [pytest.param(preset, 32, ac, marks=_SLOW) for preset in ("sd_v1", "sd_v2")
               for ac in ("res", "transformer", "all")]


@pytest.mark.parametrize("preset,size,checkpointing", UNET_CASES)
def test_unet_flops_match_flop_counter(compose, preset, size, checkpointing):
    cfg = _model_cfg(compose, preset).unet
    batch, context_len = 2, 77
    with torch.device("meta"):
        unet = UNetModel(cfg)
        x = torch.randn(batch, cfg.in_channels, size, size)
        t = torch.randint(0, 1000, (batch,))
        context = torch.randn(batch, context_len, cfg.context_dim)
    if checkpointing != "none":
        kinds = True if checkpointing == "all" else [checkpointing]
        assert apply_activation_checkpointing(unet, kinds, CHECKPOINT_BLOCKS) > 0
    forward, total = _count(lambda: unet(x, t, context))
    flops = unet_flops(cfg, size, size, context_len, checkpointing=checkpointing)
    _close(batch * flops.forward, forward)
    _close(batch * flops.hardware, total)
    if checkpointing == "none":
        assert flops.recompute == 0 and flops.model == flops.hardware
    else:
        assert flops.recompute > 0 and flops.model == unet_flops(cfg, size, size, context_len).model


@pytest.mark.slow
def test_sd_v1_unet_at_512px_is_about_0p8_tflop_forward(compose):
    """The SD v1 UNet at 64x64 latents (512 px): forward ~0.80 TFLOP per image (~0.40 TMAC, the figure
    usually quoted), counted exactly."""
    cfg = _model_cfg(compose, "sd_v1").unet
    with torch.device("meta"):
        unet = UNetModel(cfg)
        x, t, context = torch.randn(1, 4, 64, 64), torch.zeros(1, dtype=torch.long), torch.randn(1, 77, 768)
    forward, total = _count(lambda: unet(x, t, context))
    flops = unet_flops(cfg, 64, 64, 77)
    assert flops.forward == forward and flops.model == total
    assert 0.78e12 < flops.forward < 0.82e12


def test_jointly_trained_text_encoder_and_unet(compose):
    """The paper's layout (trainable text transformer feeding cross-attention): the context's gradient
    flows into the text encoder, so its projections' input gradients are counted too."""
    model = _model_cfg(compose, "tiny")
    batch, size = 2, 16
    with torch.device("meta"):
        unet = UNetModel(model.unet)
        text, _ = build_text_encoder(model.text_encoder, build_tokenizer=False)
        module = DiffusionTrainModule(unet, text)
        x = torch.randn(batch, model.unet.in_channels, size, size)
        t = torch.randint(0, 1000, (batch,))
        tokens = torch.randint(0, model.text_encoder.vocab_size, (batch, model.text_encoder.max_length))
    forward, total = _count(lambda: module(x, t, tokens))
    flops = diffusion_training_flops(model.unet, model.text_encoder, model.autoencoder, size, cached_latents=True)
    _close(batch * flops.total.forward, forward)
    _close(batch * flops.total.model, total)
    assert flops.text_encoder.backward == 2 * flops.text_encoder.forward


def test_frozen_open_clip_text_tower(compose):
    cfg = _model_cfg(compose, "sd_v1").text_encoder
    with torch.device("meta"):
        encoder, _ = build_text_encoder(cfg, allow_random_init=True, build_tokenizer=False)
        tokens = torch.randint(0, 49408, (2, cfg.max_length))
    forward, _ = _count(lambda: encoder(tokens), backward=False)
    flops = text_encoder_flops(cfg)
    _close(2 * flops.forward, forward)
    assert flops.backward == 0


@pytest.mark.parametrize("preset,size", [("tiny_kl", 32), ("tiny_kl", 48), ("sd_v1", 64)])
def test_first_stage_encode_and_decode(compose, preset, size):
    cfg = _model_cfg(compose, preset).autoencoder
    with torch.device("meta"):
        ae = build_first_stage(cfg)
        image = torch.randn(1, 3, size, size)
        latent = torch.randn(1, cfg.embed_dim, size // cfg.downsample_factor, size // cfg.downsample_factor)
    encode, decode = first_stage_flops(cfg, size, size)
    _close(encode.forward, _count(lambda: ae.encode(image).mean, backward=False)[0])
    _close(decode.forward, _count(lambda: ae.decode(latent), backward=False)[0])


def test_attention_in_the_first_stage_follows_the_config_resolution(compose):
    """CompVis places the autoencoder's attention by its config resolution, whatever the image size."""
    cfg = _model_cfg(compose, "tiny_kl").autoencoder
    with_attn = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), {"attn_resolutions": [16]}))
    with torch.device("meta"):
        ae = build_first_stage(with_attn)
        image = torch.randn(1, 3, 64, 64)
    encode, _ = first_stage_flops(with_attn, 64, 64)
    _close(encode.forward, _count(lambda: ae.encode(image).mean, backward=False)[0])
    assert encode.forward > first_stage_flops(cfg, 64, 64)[0].forward


def test_training_flops_by_data_path(compose):
    model = _model_cfg(compose, "sd_v1")
    cached = diffusion_training_flops(model.unet, model.text_encoder, model.autoencoder, 256, cached_latents=True,
                                      cached_text=True)
    live = diffusion_training_flops(model.unet, model.text_encoder, model.autoencoder, 256, cached_latents=False)
    assert cached.first_stage.forward == 0 and cached.text_encoder.forward == 0
    assert live.first_stage.forward > 0 and live.text_encoder.forward > 0 and live.text_encoder.backward == 0
    assert live.total.model == cached.total.model + live.first_stage.forward + live.text_encoder.forward
    with pytest.raises(ValueError, match="divisible"):
        diffusion_training_flops(model.unet, model.text_encoder, model.autoencoder, 100, cached_latents=True)


def test_peak_table_and_throughput():
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("cpu") is None
    # 1 TFLOP per image at 50% of 312 TFLOP/s: 156 images/s.
    assert images_per_second(1e12, 312.0, 0.5) == pytest.approx(156.0)
