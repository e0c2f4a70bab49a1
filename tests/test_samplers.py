"""Samplers (trainer.sampling) against diffusers' schedulers driven by the same model and noise."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from trainer.diffusion import NoiseSchedule
from trainer.sampling import (SAMPLERS, cfg_model_fn, ddim, ddpm, dpm_solver_pp_2m, get_sampler, inference_timesteps,
                              plms)
from trainer.sampling.samplers import _dpm_timesteps

DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# Stable Diffusion's scheduler config (CompVis v1-inference.yaml values).
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The toy networks are tiny; on a loaded machine intra-op threads only add contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ToyDenoiser(torch.nn.Module):
    """A deterministic stand-in for a trained network: the exact posterior-mean prediction for
    N(0, 0.25 I) data in the given parameterisation, plus a small fixed random conv net of (x, t),
    so every sampler's output stays O(1) and depends non-linearly on x and t."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str, data_var: float = 0.25) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(16, 4, 3, 3, generator=g) * 0.2
        self.w2 = torch.randn(4, 16, 3, 3, generator=g) * 0.2
        self.w_emb = torch.randn(16, 2, generator=g)
        self.abar = schedule.alphas_cumprod
        self.prediction_type = prediction_type
        self.data_var = data_var

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])  # diffusers passes a 0-d t, ours (B,)
        a = self.abar[t].reshape(-1, 1, 1, 1)
        den = a * self.data_var + (1 - a)
        coef = {"eps": (1 - a).sqrt() / den, "v": (a * (1 - a)).sqrt() * (1 - self.data_var) / den,
                "x0": a.sqrt() * self.data_var / den}[self.prediction_type]
        tf = t.float() / 1000
        emb = torch.stack([torch.sin(3 * tf), torch.cos(3 * tf)], -1) @ self.w_emb.T  # (B, 16)
        h = torch.tanh(torch.nn.functional.conv2d(x, self.w1, padding=1) + emb[:, :, None, None])
        return coef * x + 0.1 * torch.tanh(torch.nn.functional.conv2d(h, self.w2, padding=1))


def as_eps_model(model: ToyDenoiser, schedule: NoiseSchedule):
    """The same network, its output converted to eps at the timestep it is called with."""
    def eps_fn(x, t):
        tt = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        a = schedule.alphas_cumprod[tt].reshape(-1, 1, 1, 1)
        return schedule.x0_and_eps(model(x, t), x, a.sqrt(), (1 - a).sqrt())[1]
    return eps_fn


def run_diffusers(scheduler, model_fn, x, num_steps, generator=None, **step_kwargs):
    scheduler.set_timesteps(num_steps)
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t), t, x, **step_kwargs).prev_sample
    return x


def x_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


# --- parity with diffusers, SD defaults -------------------------------------------------------------------

STEPS = [10, 25, 50]


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_ddim_eta0_matches_diffusers(prediction_type, num_steps):
    s = NoiseSchedule(prediction_type=prediction_type)
    model = ToyDenoiser(s, prediction_type)
    ref = run_diffusers(DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      prediction_type=DIFFUSERS_PREDICTION[prediction_type]), model, x_T(), num_steps)
    assert max_diff(ddim(model, x_T(), s, num_steps=num_steps), ref) <= TOL


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_ddim_eta_positive_matches_diffusers_with_same_noise(prediction_type, num_steps):
    s = NoiseSchedule(prediction_type=prediction_type)
    model = ToyDenoiser(s, prediction_type)
    ref = run_diffusers(DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      prediction_type=DIFFUSERS_PREDICTION[prediction_type]), model, x_T(), num_steps,
                        generator=torch.Generator().manual_seed(3), eta=0.7)
    ours = ddim(model, x_T(), s, num_steps=num_steps, eta=0.7, generator=torch.Generator().manual_seed(3))
    assert max_diff(ours, ref) <= TOL
    assert max_diff(ours, ddim(model, x_T(), s, num_steps=num_steps)) > 0.05  # the noise matters


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_ddpm_matches_diffusers_with_same_noise(prediction_type, num_steps):
    s = NoiseSchedule(prediction_type=prediction_type)
    model = ToyDenoiser(s, prediction_type)
    ref = run_diffusers(DDPMScheduler(**SD, clip_sample=False, steps_offset=1,
                                      prediction_type=DIFFUSERS_PREDICTION[prediction_type]), model, x_T(), num_steps,
                        generator=torch.Generator().manual_seed(3))
    ours = ddpm(model, x_T(), s, num_steps=num_steps, generator=torch.Generator().manual_seed(3))
    assert max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_dpm_solver_pp_2m_matches_diffusers(prediction_type, num_steps):
    s = NoiseSchedule(prediction_type=prediction_type)
    model = ToyDenoiser(s, prediction_type)
    ref = run_diffusers(DPMSolverMultistepScheduler(**SD, prediction_type=DIFFUSERS_PREDICTION[prediction_type]),
                        model, x_T(), num_steps)
    assert max_diff(dpm_solver_pp_2m(model, x_T(), s, num_steps=num_steps), ref) <= TOL


@pytest.mark.parametrize("num_steps", STEPS)
def test_plms_eps_matches_diffusers_pndm(num_steps):
    s = NoiseSchedule(prediction_type="eps")
    model = ToyDenoiser(s, "eps")
    ref = run_diffusers(PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1), model,
                        x_T(), num_steps)
    assert max_diff(plms(model, x_T(), s, num_steps=num_steps), ref) <= TOL


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_plms_v_and_x0_match_diffusers_pndm_on_eps(prediction_type, num_steps):
    """PLMS extrapolates eps (PNDM eq. 12). Our v / x0 models are converted to eps at each evaluation,
    so we match PNDM run on the same network's eps. (diffusers' PNDM with prediction_type
    "v_prediction" extrapolates the raw v outputs instead; see test_plms_v_converges.)"""
    s = NoiseSchedule(prediction_type=prediction_type)
    model = ToyDenoiser(s, prediction_type)
    ref = run_diffusers(PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
                        as_eps_model(model, s), x_T(), num_steps)
    assert max_diff(plms(model, x_T(), s, num_steps=num_steps), ref) <= TOL


def _fine_ddim(model, schedule, x, t_start):
    """Deterministic DDIM through every training step from t_start: a reference solution of the
    probability-flow ODE that PLMS integrates."""
    abar = schedule.alphas_cumprod.tolist()
    ts = list(range(t_start, 0, -1))
    for i, t in enumerate(ts):
        a_t, a_prev = abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else abar[0]
        x0, eps = schedule.x0_and_eps(model(x, torch.full((x.shape[0],), t)), x, a_t**0.5, (1 - a_t) ** 0.5)
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def test_plms_v_converges():
    s = NoiseSchedule(prediction_type="v")
    model = ToyDenoiser(s, "v")
    ref = _fine_ddim(model, s, x_T(), t_start=981)  # leading, steps_offset=1, 50 steps starts at 981
    ours = plms(model, x_T(), s, num_steps=50)
    diffusers_v = run_diffusers(PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                              prediction_type="v_prediction"), model, x_T(), 50)
    assert max_diff(ours, ref) < 1e-3
    assert max_diff(ours, ref) < 0.1 * max_diff(diffusers_v, ref)


# --- timestep spacing options -----------------------------------------------------------------------------

@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("trailing", 0), ("linspace", 0)])
def test_inference_timesteps_equal_diffusers(spacing, offset):
    for num_steps in (1, 2, 3, 7, 10, 25, 48, 50, 61, 103, 250, 999):
        ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(num_steps)
        # diffusers' trailing grid has a spurious extra timestep -1 for some N (61, 103, ...)
        assert inference_timesteps(1000, num_steps, timestep_spacing=spacing, steps_offset=offset) \
            == ref.timesteps.tolist()[:num_steps]
        ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(num_steps)
        assert _dpm_timesteps(1000, num_steps, spacing, offset) == ref.timesteps.tolist()[:num_steps]


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_plms_ddpm_spacings_match_diffusers(spacing):
    # diffusers' DDIM / PNDM step to t - T // N rather than to the next grid point, which agrees with
    # the grid for "leading" always and for "trailing" when N divides T; "linspace" is checked on DDPM.
    s = NoiseSchedule(prediction_type="v")
    model = ToyDenoiser(s, "v")
    opts = dict(timestep_spacing=spacing, steps_offset=0)
    for set_alpha_to_one in (False, True):
        ref = run_diffusers(DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=set_alpha_to_one,
                                          prediction_type="v_prediction", **opts), model, x_T(), 20)
        assert max_diff(ddim(model, x_T(), s, num_steps=20, set_alpha_to_one=set_alpha_to_one, **opts), ref) <= TOL
        ref = run_diffusers(PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=set_alpha_to_one, **opts),
                            as_eps_model(model, s), x_T(), 20)
        assert max_diff(plms(model, x_T(), s, num_steps=20, set_alpha_to_one=set_alpha_to_one, **opts), ref) <= TOL


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_ddpm_dpm_spacings_match_diffusers(spacing):
    s = NoiseSchedule(prediction_type="eps")
    model = ToyDenoiser(s, "eps")
    offset = 1 if spacing == "leading" else 0
    opts = dict(timestep_spacing=spacing, steps_offset=offset)
    ref = run_diffusers(DDPMScheduler(**SD, clip_sample=False, **opts), model, x_T(), 15,
                        generator=torch.Generator().manual_seed(5))
    assert max_diff(ddpm(model, x_T(), s, num_steps=15, generator=torch.Generator().manual_seed(5), **opts), ref) <= TOL
    ref = run_diffusers(DPMSolverMultistepScheduler(**SD, **opts), model, x_T(), 15)
    assert max_diff(dpm_solver_pp_2m(model, x_T(), s, num_steps=15, **opts), ref) <= TOL


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_zero_terminal_snr_trailing_matches_diffusers(prediction_type):
    """Lin et al. 2024: rescaled schedule + trailing spacing, starting from pure noise at t = 999."""
    s = NoiseSchedule(rescale_zero_terminal_snr=True, prediction_type=prediction_type)
    model = ToyDenoiser(s, prediction_type)
    common = dict(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type=DIFFUSERS_PREDICTION[prediction_type])
    opts = dict(timestep_spacing="trailing", steps_offset=0)
    ref = run_diffusers(DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False), model, x_T(), 25)
    assert max_diff(ddim(model, x_T(), s, num_steps=25, **opts), ref) <= TOL
    ref = run_diffusers(DDPMScheduler(**common, clip_sample=False), model, x_T(), 25,
                        generator=torch.Generator().manual_seed(2))
    assert max_diff(ddpm(model, x_T(), s, num_steps=25, generator=torch.Generator().manual_seed(2), **opts), ref) <= TOL
    ref = run_diffusers(DPMSolverMultistepScheduler(**common), model, x_T(), 25)
    assert max_diff(dpm_solver_pp_2m(model, x_T(), s, num_steps=25, **opts), ref) <= TOL
    with pytest.raises(ValueError, match="plms cannot start at timestep 999"):
        plms(model, x_T(), s, num_steps=25, **opts)


# --- determinism ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_are_deterministic_for_a_seed(name):
    s = NoiseSchedule(prediction_type="v")
    model = ToyDenoiser(s, "v")
    sampler = get_sampler(name)
    opts = {"eta": 1.0} if name == "ddim" else {}
    a = sampler(model, x_T(), s, num_steps=10, generator=torch.Generator().manual_seed(0), **opts)
    b = sampler(model, x_T(), s, num_steps=10, generator=torch.Generator().manual_seed(0), **opts)
    c = sampler(model, x_T(), s, num_steps=10, generator=torch.Generator().manual_seed(1), **opts)
    assert torch.equal(a, b)
    assert torch.equal(a, c) == (name in ("plms", "dpm_solver_pp_2m"))  # only the ancestral ones draw noise


def test_samplers_share_one_signature():
    for name, fn in SAMPLERS.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:5]] == ["model_fn", "x_T", "schedule", "num_steps", "generator"], name
        assert params[3].kind is inspect.Parameter.KEYWORD_ONLY and params[3].default is inspect.Parameter.empty
        assert params[4].default is None
        assert "et al." in fn.__doc__, name


# --- classifier-free guidance -----------------------------------------------------------------------------

class ContextModel(torch.nn.Module):
    """UNet-like ``forward(x, timesteps, context)``: ToyDenoiser plus a small context-dependent term;
    records its batch sizes."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.denoiser = ToyDenoiser(schedule, prediction_type)
        self.proj = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def forward(self, x, timesteps, context):
        self.calls.append(x.shape[0])
        ctx = (context.mean(dim=1) @ self.proj)[:, :, None, None]  # (B, 4, 1, 1)
        return self.denoiser(x, timesteps) + 0.02 * torch.tanh(x * ctx)


def test_cfg_model_fn_values_and_batching():
    torch.manual_seed(0)
    model = ContextModel(NoiseSchedule(), "eps")
    context, uncond = torch.randn(2, 5, 8), torch.randn(1, 5, 8)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    out = cfg_model_fn(model, context, uncond, 7.5)(x, t)
    assert model.calls == [4]  # cond and uncond in one forward
    cond, unc = model(x, t, context), model(x, t, uncond.expand(2, 5, 8))
    torch.testing.assert_close(out, unc + 7.5 * (cond - unc), rtol=0, atol=1e-6)
    model.calls.clear()
    torch.testing.assert_close(cfg_model_fn(model, context, uncond, 1.0)(x, t), cond, rtol=0, atol=0)
    assert model.calls == [2]  # scale 1 skips the unconditional pass


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_ddim_with_guidance_matches_diffusers_pipeline_loop(prediction_type):
    torch.manual_seed(0)
    s = NoiseSchedule(prediction_type=prediction_type)
    model = ContextModel(s, prediction_type)
    context, uncond = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    scheduler = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=DIFFUSERS_PREDICTION[prediction_type])
    scheduler.set_timesteps(25)
    x = x_T()
    embeds = torch.cat([uncond, context])
    for t in scheduler.timesteps:  # StableDiffusionPipeline's denoising loop
        out_uncond, out_text = model(torch.cat([x, x]), t, embeds).chunk(2)
        x = scheduler.step(out_uncond + 7.5 * (out_text - out_uncond), t, x).prev_sample
    ours = ddim(cfg_model_fn(model, context, uncond, 7.5), x_T(), s, num_steps=25)
    assert max_diff(ours, x) <= TOL
    assert max_diff(ours, ddim(cfg_model_fn(model, context, uncond, 1.0), x_T(), s, num_steps=25)) > 1e-2


# --- bad input --------------------------------------------------------------------------------------------

def test_get_sampler():
    assert get_sampler("ddim") is ddim
    with pytest.raises(ValueError, match=r"sampler='euler' is unknown; allowed: \('ddpm', 'ddim', 'plms', "
                                         r"'dpm_solver_pp_2m'\)"):
        get_sampler("euler")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("opts, match", [
    (dict(num_steps=0), r"num_steps=0 is invalid; allowed: an int in \[1, num_train_timesteps=1000\]"),
    (dict(num_steps=1001), r"num_steps=1001 is invalid"),
    (dict(num_steps=10, timestep_spacing="karras"), r"timestep_spacing='karras' is invalid; allowed"),
    (dict(num_steps=10, steps_offset=-1), r"steps_offset=-1 is invalid; allowed"),
    (dict(num_steps=1000, timestep_spacing="leading", steps_offset=1), r"outside \[0, 1000\) or repeated"),
])
def test_samplers_reject_bad_options(name, opts, match):
    s = NoiseSchedule()
    with pytest.raises(ValueError, match=match):
        get_sampler(name)(lambda x, t: x, x_T(), s, **opts)


def test_sampler_specific_bad_input():
    s = NoiseSchedule()
    with pytest.raises(ValueError, match=r"eta=-0.5 is invalid; allowed: a float >= 0"):
        ddim(lambda x, t: x, x_T(), s, num_steps=10, eta=-0.5)
    with pytest.raises(TypeError):
        ddim(lambda x, t: x, x_T(), s, num_steps=10, guidance=2.0)  # unknown options are not swallowed
    with pytest.raises(ValueError, match=r"uncond_context batch 3 does not match context batch 2"):
        cfg_model_fn(ContextModel(s, "eps"), torch.zeros(2, 5, 8), torch.zeros(3, 5, 8), 7.5)
