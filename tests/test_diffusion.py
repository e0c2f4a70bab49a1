"""Noise schedules, parameterisations and the training objective (trainer.diffusion)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.diffusion import (DiffusionConfig, GaussianDiffusion, NoiseSchedule, build_diffusion, drop_conditions,
                               drop_context)

DIFFUSERS_SCHEDULE = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}


# --- schedules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
def test_alphas_cumprod_equal_diffusers(beta_schedule, rescale):
    ours = NoiseSchedule(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                         rescale_zero_terminal_snr=rescale, prediction_type="v")
    ref = DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[beta_schedule], beta_start=0.00085, beta_end=0.012,
                        rescale_betas_zero_snr=rescale)
    assert ours.alphas_cumprod.dtype == ref.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_scaled_linear_is_compvis_linear():
    s = NoiseSchedule()
    # CompVis make_beta_schedule("linear"): linspace(sqrt(start), sqrt(end), T, float64) ** 2.
    ref = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(s.betas.double(), ref, rtol=1e-6, atol=0)
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-6)


def test_zero_terminal_snr():
    plain = NoiseSchedule(prediction_type="v")
    s = NoiseSchedule(rescale_zero_terminal_snr=True, prediction_type="v")
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.snr(torch.tensor([999])).item() == 0.0
    assert s.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])


# --- forward process and parameterisations on hand-computed values ---------------------------------------

def _tiny_schedule(prediction_type: str) -> NoiseSchedule:
    # betas = [0.1, 0.5] -> alphas_cumprod = [0.9, 0.45]
    return NoiseSchedule(num_train_timesteps=2, beta_schedule="linear", beta_start=0.1, beta_end=0.5,
                         prediction_type=prediction_type)


X0 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
NOISE = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
T_IDX = torch.tensor([1, 0])
ABAR = [0.45, 0.9]  # per row of the batch, from T_IDX


def _hand(fn) -> torch.Tensor:
    return torch.tensor([[fn(ABAR[b], X0[b, i].item(), NOISE[b, i].item()) for i in range(2)] for b in range(2)])


def test_tiny_schedule_values():
    s = _tiny_schedule("eps")
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor([0.9, 0.45]))


def test_q_sample_hand_computed():
    s = _tiny_schedule("eps")
    expected = _hand(lambda a, x0, n: math.sqrt(a) * x0 + math.sqrt(1 - a) * n)
    torch.testing.assert_close(s.q_sample(X0, T_IDX, NOISE), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_target_hand_computed(prediction_type):
    s = _tiny_schedule(prediction_type)
    expected = {
        "eps": _hand(lambda a, x0, n: n),
        "x0": _hand(lambda a, x0, n: x0),
        "v": _hand(lambda a, x0, n: math.sqrt(a) * n - math.sqrt(1 - a) * x0),
    }[prediction_type]
    torch.testing.assert_close(s.target(X0, NOISE, T_IDX), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_x0_and_eps_recovered_from_target(prediction_type):
    s = _tiny_schedule(prediction_type)
    x_t = s.q_sample(X0, T_IDX, NOISE)
    x0, eps = s.predict_x0_and_eps(s.target(X0, NOISE, T_IDX), x_t, T_IDX)
    torch.testing.assert_close(x0, X0, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps, NOISE, rtol=0, atol=1e-6)


def test_q_sample_and_v_equal_diffusers():
    torch.manual_seed(0)
    s = NoiseSchedule(prediction_type="v")
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 1, 500, 999])
    assert torch.equal(s.q_sample(x0, t, noise), ref.add_noise(x0, noise, t))
    assert torch.equal(s.target(x0, noise, t), ref.get_velocity(x0, noise, t))


# --- min-SNR weighting ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_min_snr_weights_hand_computed(prediction_type):
    gamma = 5.0
    diffusion = GaussianDiffusion(NoiseSchedule(prediction_type=prediction_type), min_snr_gamma=gamma)
    t = torch.tensor([0, 100, 400, 700, 999])
    abar = diffusion.schedule.alphas_cumprod[t].double().tolist()
    expected = []
    for a in abar:
        snr = a / (1 - a)
        expected.append({"eps": min(snr, gamma) / snr, "v": min(snr, gamma) / (snr + 1),
                         "x0": min(snr, gamma)}[prediction_type])
    torch.testing.assert_close(diffusion.loss_weight(t).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_min_snr_weights_at_zero_terminal_snr_are_finite():
    t = torch.tensor([0, 999])
    for prediction_type, last in (("eps", 1.0), ("v", 0.0), ("x0", 0.0)):
        s = NoiseSchedule(rescale_zero_terminal_snr=True, prediction_type=prediction_type)
        w = GaussianDiffusion(s, min_snr_gamma=5.0).loss_weight(t)
        assert torch.isfinite(w).all()
        assert w[1].item() == last  # the limit of min(snr, gamma) / snr is 1 for eps


def test_no_min_snr_means_unit_weights():
    d = GaussianDiffusion(NoiseSchedule())
    assert torch.equal(d.loss_weight(torch.tensor([0, 999])), torch.ones(2))


# --- training_losses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_training_losses_values(prediction_type):
    torch.manual_seed(0)
    d = GaussianDiffusion(NoiseSchedule(prediction_type=prediction_type), min_snr_gamma=5.0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 500, 990])
    context = torch.randn(3, 7, 16)
    seen = {}

    def model_fn(x_t, t_in, ctx):
        seen.update(x_t=x_t, t=t_in, ctx=ctx)
        return 0.5 * x_t

    out = d.training_losses(model_fn, x0, context, t=t, noise=noise)
    assert torch.equal(seen["x_t"], d.schedule.q_sample(x0, t, noise))
    assert seen["t"] is t and seen["ctx"] is context
    mse = (0.5 * seen["x_t"] - d.schedule.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["loss"], d.loss_weight(t) * mse)
    assert out["loss"].shape == (3,) and out["loss"].dtype == torch.float32


def test_training_losses_perfect_model_has_zero_loss():
    d = GaussianDiffusion(NoiseSchedule(prediction_type="v"))
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([3, 800])
    out = d.training_losses(lambda x_t, t_in, c: d.schedule.target(x0, noise, t_in), x0, None, t=t, noise=noise)
    assert torch.equal(out["loss"], torch.zeros(2))


def test_training_losses_deterministic_and_uniform_timesteps():
    d = GaussianDiffusion(NoiseSchedule())
    x0 = torch.randn(4096, 1, 1, 1)
    a = d.training_losses(lambda x, t, c: x, x0, None, generator=torch.Generator().manual_seed(7))
    b = d.training_losses(lambda x, t, c: x, x0, None, generator=torch.Generator().manual_seed(7))
    c = d.training_losses(lambda x, t, c: x, x0, None, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])
    assert not torch.equal(a["t"], c["t"])
    assert a["t"].min() >= 0 and a["t"].max() <= 999
    assert abs(a["t"].double().mean().item() - 499.5) < 15  # sd of the mean: 289 / 64 = 4.5
    # the generator order is t, then noise
    g = torch.Generator().manual_seed(7)
    assert torch.equal(torch.randint(0, 1000, (4096,), generator=g), a["t"])


def test_offset_noise():
    x0 = torch.zeros(64, 4, 16, 16)
    d = GaussianDiffusion(NoiseSchedule(), offset_noise=0.3)
    noise = d.sample_noise(x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    expected = torch.randn(64, 4, 16, 16, generator=g) + 0.3 * torch.randn(64, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)
    # The per-(sample, channel) mean has variance 1/(16*16) + 0.3^2 instead of 1/(16*16).
    channel_mean_var = noise.mean(dim=(2, 3)).var().item()
    assert abs(channel_mean_var - (1 / 256 + 0.09)) < 0.02
    plain = GaussianDiffusion(NoiseSchedule()).sample_noise(x0, torch.Generator().manual_seed(3))
    assert plain.mean(dim=(2, 3)).var().item() < 0.01


def test_from_config():
    cfg = DiffusionConfig(prediction_type="v", rescale_zero_terminal_snr=True, offset_noise=0.1, min_snr_gamma=5.0)
    d = build_diffusion(cfg)
    assert d.schedule.prediction_type == "v" and d.schedule.alphas_cumprod[-1].item() == 0.0
    assert d.offset_noise == 0.1 and d.min_snr_gamma == 5.0


# --- condition dropout ------------------------------------------------------------------------------------

def test_drop_conditions_rate_and_determinism():
    prompts = [f"a photo of thing {i}" for i in range(20000)]
    a = drop_conditions(prompts, 0.1, torch.Generator().manual_seed(0))
    b = drop_conditions(prompts, 0.1, torch.Generator().manual_seed(0))
    c = drop_conditions(prompts, 0.1, torch.Generator().manual_seed(1))
    assert a == b and a != c
    rate = sum(p == "" for p in a) / len(a)
    assert abs(rate - 0.1) < 0.007  # 3.3 sd of a binomial proportion at n = 20000
    assert all(p in ("", q) for p, q in zip(a, prompts))
    assert drop_conditions(prompts[:10], 0.0) == prompts[:10]
    assert drop_conditions(prompts[:10], 1.0) == [""] * 10


def test_drop_context_matches_drop_conditions():
    B, L, D = 256, 5, 3
    context = torch.randn(B, L, D)
    uncond = torch.full((1, L, D), -7.0)
    out = drop_context(context, uncond, 0.3, torch.Generator().manual_seed(4))
    dropped = drop_conditions(["x"] * B, 0.3, torch.Generator().manual_seed(4))
    for b in range(B):
        expected = uncond[0] if dropped[b] == "" else context[b]
        assert torch.equal(out[b], expected)
    assert 0.2 < sum(d == "" for d in dropped) / B < 0.4
    assert torch.equal(drop_context(context, uncond[0], 0.0), context)


# --- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("num_train_timesteps", 0), ("num_train_timesteps", 10.0), ("beta_schedule", "sigmoid"),
    ("beta_start", 0.0), ("beta_end", 1.5), ("prediction_type", "epsilon"), ("offset_noise", -0.1),
    ("min_snr_gamma", 0.0), ("cond_drop_prob", 1.5), ("timestep_sampling", "logit_normal"),
])
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ValueError, match=rf"diffusion\.{key}={value!r}.*allowed"):
        DiffusionConfig(**{key: value})


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match=r"beta_start=0.02 > diffusion.beta_end=0.012"):
        DiffusionConfig(beta_start=0.02)
    with pytest.raises(ValueError, match=r"rescale_zero_terminal_snr=True .*prediction_type='eps'.*allowed"):
        DiffusionConfig(rescale_zero_terminal_snr=True)
    with pytest.warns(UserWarning, match="ignored by beta_schedule='cosine'"):
        DiffusionConfig(beta_schedule="cosine", beta_start=0.0001)


def test_objects_reject_bad_values():
    with pytest.raises(ValueError, match=r"beta_schedule='sigmoid'.*allowed"):
        NoiseSchedule(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match=r"prediction_type='epsilon'.*allowed"):
        NoiseSchedule(prediction_type="epsilon")
    with pytest.raises(ValueError, match=r"min_snr_gamma=-1.*allowed"):
        GaussianDiffusion(NoiseSchedule(), min_snr_gamma=-1)
    with pytest.raises(ValueError, match=r"p=1.5.*allowed"):
        drop_conditions(["a"], 1.5)
    with pytest.raises(ValueError, match=r"uncond_context shape \(1, 6, 3\).*allowed"):
        drop_context(torch.zeros(2, 5, 3), torch.zeros(1, 6, 3), 0.5)
