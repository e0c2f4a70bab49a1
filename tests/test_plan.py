import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import trainer.plan  # noqa: F401  (registers the plan schema)
from trainer.models.config import build_components, count_parameters
from trainer.zero_memory import zero_model_state_bytes

# Counts from the issue: CompVis txt2img-1p4B-eval.yaml, SD v1/v2 inference configs.
EXPECTED = {
    "ldm_1p45b": {"unet": 872_300_484, "first_stage": 83_653_863, "text_encoder": 542_895_360},
    "sd_v1": {"unet": 859_520_964, "first_stage": 83_653_863},
    "sd_v2": {"unet": 865_910_724, "first_stage": 83_653_863},
}

def _plan(compose, model, *extra):
    return OmegaConf.to_object(compose("plan", [f"model={model}", *extra]))

@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_preset_parameter_counts_exact(compose, model):
    plan = _plan(compose, model)
    parts = build_components(plan.model, device="meta")
    for name, expected in EXPECTED[model].items():
        assert count_parameters(getattr(parts, name)) == expected, name

def test_paper_model_is_1p45b_with_logits_head(compose):
    parts = build_components(_plan(compose, "ldm_1p45b").model, device="meta")
    assert parts.text_encoder_trainable
    unet_plus_text = count_parameters(parts.unet) + count_parameters(parts.text_encoder)
    logits_head = 1280 * 30522 + 30522  # built, unused, by CompVis and diffusers
    assert unet_plus_text + logits_head == 1_454_294_526

def test_plan_cli_prints_counts_and_zero_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer.plan", "model=ldm_1p45b", "world_size=8"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "872,300,484" in text and "542,895,360" in text and "83,653,863" in text
    # Stage 0: 2 + 2 + 12 bytes x 1,415,195,844 trainable parameters (bf16 mixed precision), plus the
    # frozen KL-f8 autoencoder whole in bf16 (2 x 83,653,863 bytes): 21.09 + 0.16 = 21.24 GiB.
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:1] in "0123" and "GiB" in line}
    assert rows["0"][1:] == ["2.64", "GiB", "2.64", "GiB", "15.82", "GiB", "0.16", "GiB", "21.24", "GiB"]
    # Stage 3 on 8 ranks: everything trainable partitioned, 21.09 / 8 = 2.64 GiB, plus 0.16 frozen.
    assert rows["3"][-2:] == ["2.79", "GiB"]
    assert list(tmp_path.iterdir()) == [], "plan must write nothing (no Hydra run dir, no log file)"

def test_zero_formula_matches_paper():
    psi, n = 7_500_000_000, 64  # the ZeRO paper's Fig. 1 example: 7.5B parameters on 64 GPUs
    gb = lambda b: b / 1e9  # noqa: E731
    assert gb(zero_model_state_bytes(psi, n, 0).total) == pytest.approx(120.0)
    assert gb(zero_model_state_bytes(psi, n, 1).total) == pytest.approx(31.4, abs=0.05)
    assert gb(zero_model_state_bytes(psi, n, 2).total) == pytest.approx(16.6, abs=0.05)
    assert gb(zero_model_state_bytes(psi, n, 3).total) == pytest.approx(1.88, abs=0.01)

@pytest.mark.parametrize("overrides, keys", [
    (["model.unet.context_dim=768"], ["model.unet.context_dim", "768", "1280"]),
    (["model.unet.in_channels=3"], ["model.unet.in_channels", "4"]),
    (["precision=fp8"], ["precision", "fp8", "bf16"]),
    (["world_size=0"], ["world_size"]),
])
def test_inconsistent_settings_fail_before_building(compose, overrides, keys):
    with pytest.raises(ValueError) as err:
        _plan(compose, "ldm_1p45b", *overrides)
    for k in keys:
        assert k in str(err.value)

def test_unknown_key_is_rejected(compose):
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError
    with pytest.raises((ConfigKeyError, ConfigCompositionException)) as err:
        _plan(compose, "tiny", "model.unet.num_head=4")
    assert "num_head" in str(err.value)


@pytest.mark.parametrize("preset", ["ldm", "sd_v2_v", "zero_snr_v"])
def test_diffusion_presets_are_valid(preset):
    from trainer.diffusion import DiffusionConfig, build_diffusion
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DiffusionConfig),
                                              OmegaConf.load(f"conf/diffusion/{preset}.yaml")))
    diffusion = build_diffusion(cfg)
    assert diffusion.schedule.alphas_cumprod.shape == (1000,)


def test_plan_prints_flops_per_image_and_throughput_at_mfu(compose):
    from trainer.flops import diffusion_training_flops
    from trainer.plan import render_plan

    plan = _plan(compose, "sd_v1", "image_size=512", "mfu=0.5")
    text = render_plan(plan)
    flops = diffusion_training_flops(plan.model.unet, plan.model.text_encoder, plan.model.autoencoder, 512,
                                     cached_latents=True)
    model_tflop = flops.total.model / 1e12
    assert f"model FLOPs {model_tflop:.4f} TFLOP per image" in text
    assert "latent 64x64" in text
    h100 = next(line for line in text.splitlines() if line.startswith("H100"))
    assert f"{0.5 * 989 / model_tflop:.1f} img/s" in h100
    ac = render_plan(_plan(compose, "sd_v1", "activation_checkpointing=all"))
    assert "activation checkpointing all" in ac


@pytest.mark.parametrize("override,key", [("mfu=1.5", "mfu"), ("image_size=0", "image_size"),
                                          ("activation_checkpointing=some", "activation_checkpointing")])
def test_plan_flop_settings_are_checked(compose, override, key):
    with pytest.raises(Exception, match=key):
        _plan(compose, "tiny", override)
