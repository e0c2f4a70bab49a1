"""Discrete-time Gaussian noise schedules and the eps / v / x0 parameterisations.

Notation (DDPM, Ho et al. 2020): ``abar_t = prod_{s<=t} (1 - beta_s)`` for integer t in [0, T),
``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``.  We write ``alpha_t = sqrt(abar_t)`` and
``sigma_t = sqrt(1 - abar_t)`` (the variance-preserving alpha/sigma of Kingma et al. 2021).

The betas are built in float32 with the same operations as diffusers' schedulers, so
``alphas_cumprod`` equals ``DDPMScheduler(...).alphas_cumprod`` bit for bit and a model trained
here samples identically under diffusers. (CompVis builds them in float64 and casts the cumulative
product to float32; the two differ by ~1e-6 relative at large t.)
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
PREDICTION_TYPES = ("eps", "v", "x0")

# Nichol & Dhariwal 2021, eq. 17: the offset s keeps beta_0 from being vanishingly small and
# betas are clipped at 0.999 to avoid the singularity at t = T (diffusers' squaredcos_cap_v2).
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
               ) -> torch.Tensor:
    """Betas (T,) in float32.

    ``scaled_linear`` is what Rombach et al. / CompVis call ``linear``: linear in sqrt(beta)
    (``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``). ``linear`` is DDPM's linear in beta.
    ``cosine`` ignores beta_start / beta_end.
    """
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "cosine":
        def abar(u: float) -> float:
            return math.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = [min(1 - abar((i + 1) / T) / abar(i / T), COSINE_MAX_BETA) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; allowed: {BETA_SCHEDULES}")


def enforce_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.

    Shift and scale sqrt(abar) so that sqrt(abar_{T-1}) = 0 (the last step is pure noise, as at
    sampling time) while sqrt(abar_0) is unchanged. Same float32 operation order as diffusers.
    """
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def _expand(coef: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims, for broadcasting against a batch."""
    return coef.reshape(coef.shape[0], *([1] * (ndim - 1)))


class NoiseSchedule:
    """The forward process q(x_t | x0) and the conversions between the model's output and x0/eps.

    Tensors are float32 of shape (T,); ``to(device)`` moves them (call once, next to the model).
    """

    def __init__(self, *, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012,
                 rescale_zero_terminal_snr: bool = False, prediction_type: str = "eps") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: {PREDICTION_TYPES}")
        if not (isinstance(num_train_timesteps, int) and num_train_timesteps >= 2):
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be an int >= 2")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.rescale_zero_terminal_snr = rescale_zero_terminal_snr
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_zero_terminal_snr:
            betas = enforce_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod**0.5
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod) ** 0.5

    @classmethod
    def from_config(cls, cfg) -> "NoiseSchedule":
        """Build from a ``DiffusionConfig`` (or anything with the same attribute names)."""
        return cls(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                   beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                   rescale_zero_terminal_snr=cfg.rescale_zero_terminal_snr,
                   prediction_type=cfg.prediction_type)

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _gather(self, table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return _expand(table.to(t.device)[t], ndim)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), (B,) float32. Zero at the terminal step
        of a zero-terminal-SNR schedule."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise (B, ...), t (B,) int."""
        alpha = self._gather(self.sqrt_alphas_cumprod, t, x0.ndim)
        sigma = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        return (alpha * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses for ``prediction_type``: eps, x0, or
        v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, "Progressive Distillation", eq. 9)."""
        if self.prediction_type == "eps":
            return noise
        if self.prediction_type == "x0":
            return x0
        alpha = self._gather(self.sqrt_alphas_cumprod, t, x0.ndim)
        sigma = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        return (alpha * noise.float() - sigma * x0.float()).to(x0.dtype)

    def x0_and_eps(self, model_output: torch.Tensor, x_t: torch.Tensor,
                   alpha: float | torch.Tensor, sigma: float | torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the model output at a noise level given directly by alpha = sqrt(abar)
        and sigma = sqrt(1 - abar) (Python floats or tensors broadcastable to x_t). Samplers call
        this with per-step scalars."""
        if self.prediction_type == "eps":
            eps = model_output
            x0 = (x_t - sigma * eps) / alpha
        elif self.prediction_type == "v":
            # x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v, since alpha^2 + sigma^2 = 1.
            x0 = alpha * x_t - sigma * model_output
            eps = alpha * model_output + sigma * x_t
        else:
            x0 = model_output
            eps = (x_t - alpha * x0) / sigma
        return x0, eps

    def predict_x0_and_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the model output at integer timesteps t (B,)."""
        alpha = self._gather(self.sqrt_alphas_cumprod, t, x_t.ndim)
        sigma = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        return self.x0_and_eps(model_output, x_t, alpha, sigma)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"prediction_type={self.prediction_type!r}, "
                f"rescale_zero_terminal_snr={self.rescale_zero_terminal_snr})")
