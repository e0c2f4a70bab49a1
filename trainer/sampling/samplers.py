"""Samplers: pure functions that integrate the reverse process from x_T to x_0.

All share one signature, ``sampler(model_fn, x_T, schedule, *, num_steps, generator=None, **opts)``:
``model_fn(x_t, t)`` returns the network output in ``schedule.prediction_type`` for x_t (B, C, H, W)
at integer timesteps t (B,); ``schedule`` is a ``NoiseSchedule``. Each converts the output to x0 / eps
with the schedule's helpers, so eps-, v- and x0-prediction models all work with every sampler.

Defaults reproduce Stable Diffusion's scheduler config (timestep_spacing="leading", steps_offset=1,
set_alpha_to_one=False) for DDPM/DDIM/PLMS and diffusers' own defaults for DPM-Solver++; with the same
settings each sampler matches its diffusers scheduler (see tests/test_samplers.py). Per-step scalars are
Python floats computed in float64 from the float32 ``alphas_cumprod``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from trainer.diffusion.schedule import NoiseSchedule

SamplerModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' DPMSolverMultistepScheduler: with a zero-terminal-SNR schedule sigma/alpha is infinite at
# t = T - 1, so it substitutes abar = 2^-24 (the float32 machine epsilon / 2) there.
DPM_ZERO_SNR_ALPHAS_CUMPROD = 2.0**-24


def _check_common(schedule: NoiseSchedule, num_steps: int, timestep_spacing: str, steps_offset: int) -> None:
    T = schedule.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps!r} is invalid; allowed: an int in [1, num_train_timesteps={T}]")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={timestep_spacing!r} is invalid; allowed: {TIMESTEP_SPACINGS}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset={steps_offset!r} is invalid; allowed: an int >= 0")


def _check_timesteps(timesteps: np.ndarray, T: int, num_steps: int, timestep_spacing: str, steps_offset: int
                     ) -> list[int]:
    out = [int(t) for t in timesteps]
    if len(out) != num_steps or max(out) >= T or min(out) < 0 or len(set(out)) != len(out):
        raise ValueError(f"num_steps={num_steps} with timestep_spacing={timestep_spacing!r} and "
                         f"steps_offset={steps_offset} gives timesteps {out[:3]}... outside [0, {T}) or "
                         f"repeated; allowed: fewer steps or a smaller steps_offset")
    return out


def _trailing(T: int, N: int) -> np.ndarray:
    # diffusers' np.arange(T, 0, -T / N) has N + 1 values for some N (61, 103, ...) as T / (T / N)
    # rounds above N, the last being the invalid timestep -1; keep the first N, rounded identically.
    return np.round(np.arange(T, 0, -T / N))[:N] - 1


def inference_timesteps(num_train_timesteps: int, num_steps: int, *, timestep_spacing: str = "leading",
                        steps_offset: int = 0) -> list[int]:
    """The descending sub-sequence of training timesteps visited by DDPM / DDIM / PLMS.

    The spacings are those of Lin et al. 2024, Table 2 (diffusers' ``timestep_spacing``, computed
    with the same numpy calls so the rounding agrees): "leading" (CompVis' "uniform" DDIM
    discretisation, to which CompVis adds 1, hence SD's ``steps_offset=1``), "trailing" (starts at
    T - 1, needed for zero terminal SNR) and "linspace".
    """
    T, N = num_train_timesteps, num_steps
    if timestep_spacing == "leading":
        timesteps = np.arange(N)[::-1] * (T // N) + steps_offset
    elif timestep_spacing == "trailing":
        timesteps = _trailing(T, N)
    else:
        timesteps = np.linspace(0, T - 1, N).round()[::-1]
    return _check_timesteps(timesteps, T, N, timestep_spacing, steps_offset)


def _dpm_timesteps(num_train_timesteps: int, num_steps: int, timestep_spacing: str, steps_offset: int) -> list[int]:
    """DPM-Solver's grid (diffusers' DPMSolverMultistepScheduler): N + 1 points of which the last
    (the clean end) is replaced by sigma = 0, so "leading" and "linspace" differ from DDIM's."""
    T, N = num_train_timesteps, num_steps
    if timestep_spacing == "leading":
        timesteps = np.arange(1, N + 1)[::-1] * (T // (N + 1)) + steps_offset
    elif timestep_spacing == "trailing":
        timesteps = _trailing(T, N)
    else:
        timesteps = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
    return _check_timesteps(timesteps, T, N, timestep_spacing, steps_offset)


def _timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """N(0, I) like x, drawn on the generator's device as diffusers' ``randn_tensor`` does, so a seeded
    CPU generator gives the same noise as a diffusers pipeline on any device."""
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def ddpm(model_fn: SamplerModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, num_steps: int,
         generator: Optional[torch.Generator] = None, timestep_spacing: str = "leading",
         steps_offset: int = 1) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, "Denoising
    Diffusion Probabilistic Models", eqs. 6-7, variance beta-tilde), on a strided sub-sequence when
    num_steps < T (betas recomputed between visited steps). Noise is drawn from ``generator`` once
    per step except the last, in diffusers' ``DDPMScheduler`` order (diffusers also draws at the last
    step when t > 0 and adds it scaled by 1e-10, the clamped zero variance)."""
    _check_common(schedule, num_steps, timestep_spacing, steps_offset)
    timesteps = inference_timesteps(schedule.num_train_timesteps, num_steps,
                                    timestep_spacing=timestep_spacing, steps_offset=steps_offset)
    abar = schedule.alphas_cumprod.tolist()
    x = x_T
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        a_t = abar[t]
        a_prev = 1.0 if last else abar[timesteps[i + 1]]
        beta_t = 1.0 - a_t / a_prev
        x0, _ = schedule.x0_and_eps(model_fn(x, _timestep_batch(t, x)), x, a_t**0.5, (1.0 - a_t) ** 0.5)
        # Posterior mean, Ho et al. eq. 7.
        x = (a_prev**0.5 * beta_t / (1.0 - a_t)) * x0 + ((1.0 - beta_t) ** 0.5 * (1.0 - a_prev) / (1.0 - a_t)) * x
        if not last:
            variance = max((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
            x = x + variance**0.5 * _randn_like(x, generator)
    return x


@torch.no_grad()
def ddim(model_fn: SamplerModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, num_steps: int,
         generator: Optional[torch.Generator] = None, eta: float = 0.0, timestep_spacing: str = "leading",
         steps_offset: int = 1, set_alpha_to_one: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with sigma from eq. 16).

    ``eta=0`` is the deterministic sampler, ``eta=1`` the DDPM posterior variance. The step after the
    last visited timestep goes to abar = 1 if ``set_alpha_to_one`` else abar_0 (CompVis' and SD's
    choice). With eta > 0 the noise is drawn once per step from ``generator`` (diffusers' order).
    Each step goes to the next visited timestep; diffusers' DDIM/PNDM step to t - T // num_steps,
    the same point except with "linspace" (or "trailing" when num_steps does not divide T).
    """
    _check_common(schedule, num_steps, timestep_spacing, steps_offset)
    if not eta >= 0.0:
        raise ValueError(f"eta={eta!r} is invalid; allowed: a float >= 0")
    timesteps = inference_timesteps(schedule.num_train_timesteps, num_steps,
                                    timestep_spacing=timestep_spacing, steps_offset=steps_offset)
    abar = schedule.alphas_cumprod.tolist()
    final_abar = 1.0 if set_alpha_to_one else abar[0]
    x = x_T
    for i, t in enumerate(timesteps):
        a_t = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else final_abar
        x0, eps = schedule.x0_and_eps(model_fn(x, _timestep_batch(t, x)), x, a_t**0.5, (1.0 - a_t) ** 0.5)
        std = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1.0 - a_prev - std**2, 0.0) ** 0.5 * eps
        if eta > 0.0:
            x = x + std * _randn_like(x, generator)
    return x


@torch.no_grad()
def plms(model_fn: SamplerModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, num_steps: int,
         generator: Optional[torch.Generator] = None, timestep_spacing: str = "leading",
         steps_offset: int = 1, set_alpha_to_one: bool = False) -> torch.Tensor:
    """Pseudo linear multi-step (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", PNDM eq. 9 transfer with the 4th-order Adams-Bashforth eps combination, eq. 12).

    This is CompVis' PLMSSampler (= diffusers ``PNDMScheduler(skip_prk_steps=True)``): instead of
    PNDM's Runge-Kutta warm-up, the first step averages eps at both ends (one extra network call,
    num_steps + 1 in all), then orders 2, 3, 4 as the history fills. Deterministic; ``generator`` is
    accepted for the shared signature and unused.

    v- and x0-prediction outputs are converted to eps at their own timestep before extrapolating.
    (diffusers' PNDM with ``prediction_type="v_prediction"`` extrapolates the raw v outputs and
    converts with the current x_t, which converges only at first order: tests/test_samplers.py.)
    """
    _check_common(schedule, num_steps, timestep_spacing, steps_offset)
    timesteps = inference_timesteps(schedule.num_train_timesteps, num_steps,
                                    timestep_spacing=timestep_spacing, steps_offset=steps_offset)
    abar = schedule.alphas_cumprod.tolist()
    if abar[timesteps[0]] == 0.0:
        raise ValueError(f"plms cannot start at timestep {timesteps[0]} where alphas_cumprod is 0 (zero terminal "
                         f"SNR): its transfer divides by alphas_cumprod; allowed: ddim, dpm_solver_pp_2m or "
                         f"timestep_spacing 'leading'/'linspace'")
    final_abar = 1.0 if set_alpha_to_one else abar[0]

    def eps_at(x: torch.Tensor, t: int) -> torch.Tensor:
        return schedule.x0_and_eps(model_fn(x, _timestep_batch(t, x)), x, abar[t] ** 0.5, (1.0 - abar[t]) ** 0.5)[1]

    def transfer(x: torch.Tensor, a_t: float, a_prev: float, eps: torch.Tensor) -> torch.Tensor:
        # PNDM eq. 9, algebraically the DDIM eta=0 step.
        eps_coef = (a_prev - a_t) / (a_t * (1.0 - a_prev) ** 0.5 + (a_t * (1.0 - a_t) * a_prev) ** 0.5)
        return (a_prev / a_t) ** 0.5 * x - eps_coef * eps

    history: list[torch.Tensor] = []  # eps at the last (up to 3) visited timesteps, oldest first
    x = x_T
    for i, t in enumerate(timesteps):
        has_next = i + 1 < len(timesteps)
        a_t = abar[t]
        a_prev = abar[timesteps[i + 1]] if has_next else final_abar
        eps = eps_at(x, t)
        if not history:
            eps_prime = eps
            if has_next:
                x_euler = transfer(x, a_t, a_prev, eps)
                eps_prime = (eps + eps_at(x_euler, timesteps[i + 1])) / 2
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        x = transfer(x, a_t, a_prev, eps_prime)
        history = (history + [eps])[-3:]
    return x


@torch.no_grad()
def dpm_solver_pp_2m(model_fn: SamplerModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, *, num_steps: int,
                     generator: Optional[torch.Generator] = None, timestep_spacing: str = "linspace",
                     steps_offset: int = 0) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Alg. 2): second-order multistep in log-SNR on the data prediction x0_hat,
    first order at the first step and for the final jump to sigma = 0 (diffusers' defaults:
    midpoint form, lower_order_final, final_sigmas_type="zero"). Deterministic; ``generator`` is
    accepted for the shared signature and unused.
    """
    _check_common(schedule, num_steps, timestep_spacing, steps_offset)
    timesteps = _dpm_timesteps(schedule.num_train_timesteps, num_steps, timestep_spacing, steps_offset)
    abar = schedule.alphas_cumprod.clone()
    if abar[-1] == 0.0:
        abar[-1] = DPM_ZERO_SNR_ALPHAS_CUMPROD
    # sigma / alpha in float32 as diffusers computes it; alpha and sigma are then derived from it.
    sigma_over_alpha = (((1 - abar) / abar) ** 0.5)[timesteps].tolist() + [0.0]
    alphas = [1.0 / (s**2 + 1.0) ** 0.5 for s in sigma_over_alpha]
    sigmas = [s * a for s, a in zip(sigma_over_alpha, alphas)]
    lambdas = [math.log(a) - math.log(s) if s > 0.0 else math.inf for a, s in zip(alphas, sigmas)]

    x = x_T
    x0_prev: Optional[torch.Tensor] = None
    for i, t in enumerate(timesteps):
        x0, _ = schedule.x0_and_eps(model_fn(x, _timestep_batch(t, x)), x, alphas[i], sigmas[i])
        if sigmas[i + 1] == 0.0:
            x = x0  # the first-order step to sigma = 0 lands exactly on the data prediction
        else:
            h = lambdas[i + 1] - lambdas[i]
            decay = sigmas[i + 1] / sigmas[i]
            gain = -alphas[i + 1] * math.expm1(-h)
            if x0_prev is None:
                x = decay * x + gain * x0
            else:
                r = (lambdas[i] - lambdas[i - 1]) / h
                # D0 + D1 / 2 with D1 = (x0 - x0_prev) / r: the midpoint form of Lu et al. Alg. 2.
                x = decay * x + gain * (x0 + (0.5 / r) * (x0 - x0_prev))
        x0_prev = x0
    return x


def cfg_model_fn(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], context: torch.Tensor,
                 uncond_context: torch.Tensor, guidance_scale: float) -> SamplerModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a sampler ``model_fn``.

    ``model(x, timesteps, context)`` is the UNet's forward; ``context`` (B, L, D) the prompt
    embeddings, ``uncond_context`` those of the empty / negative prompt ((L, D), (1, L, D) or
    (B, L, D)). Guidance is applied to the raw model output (eps or v, as diffusers' pipelines do):
    out = out_uncond + s * (out_cond - out_uncond), with both halves in one batched forward
    (uncond first, as diffusers). ``guidance_scale == 1`` is the conditional model: one pass, no uncond.
    """
    if guidance_scale == 1.0:
        return lambda x, t: model(x, t, context)
    batch = context.shape[0]
    uncond = uncond_context.reshape(-1, *context.shape[1:]).to(context.dtype)
    if uncond.shape[0] not in (1, batch):
        raise ValueError(f"uncond_context batch {uncond.shape[0]} does not match context batch {batch}; "
                         f"allowed: 1 or {batch}")
    context_in = torch.cat([uncond.expand(batch, *context.shape[1:]), context])  # (2B, L, D)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != batch:
            raise ValueError(f"x batch {x.shape[0]} does not match the context batch {batch}")
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), context_in).chunk(2)  # 2 x (B, C, H, W)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return guided


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "plms": plms,
    "dpm_solver_pp_2m": dpm_solver_pp_2m,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is unknown; allowed: {tuple(SAMPLERS)}")
    return SAMPLERS[name]
