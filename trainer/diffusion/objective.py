"""The training objective: noise the latents, ask the network, regress the target.

The network is an argument (DiT's ``diffusion.training_losses(model, ...)``), so the same objective
serves a bare UNet, a compiled one or a DeepSpeed engine. So is the randomness: one
``torch.Generator`` for a batch, or ``SampleGenerators`` - one generator per sample, keyed by the
sample's global position in the data, so that a sample's caption dropout, timestep and noise are
the same whatever the world size, the accumulation or the batch it lands in.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from trainer.diffusion.config import TIMESTEP_SAMPLINGS, DiffusionConfig
from trainer.diffusion.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SampleGenerators:
    """One CPU generator per sample of a batch, seeded from ``(seed, global position)``.

    Each draw takes one call per sample of the per-sample shape (the batch's shape without its first
    dimension) and stacks the results along dim 0: (B, *shape). A sample's numbers depend only on its
    position and on the order of the draws (caption dropout, then the posterior sample, the timestep,
    the noise), never on the other samples of the batch.
    """

    def __init__(self, seed: int, positions: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed((seed * 2**40 + int(p)) % 2**63) for p in positions]

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators])

    def randn(self, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.generators])

    def randint(self, high: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.stack([torch.randint(0, high, shape, generator=g) for g in self.generators])


Generator = Union[torch.Generator, SampleGenerators, None]


def _per_sample(shape: tuple[int, ...], generator: SampleGenerators) -> tuple[int, ...]:
    if shape[0] != len(generator):
        raise ValueError(f"a batch of {shape[0]} samples drawn with {len(generator)} per-sample generators")
    return tuple(shape[1:])


def _rand(shape: tuple[int, ...], generator: Generator, device: torch.device) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device (a CPU generator gives the same numbers whatever
    the target device), then moved."""
    if isinstance(generator, SampleGenerators):
        return generator.rand(_per_sample(shape, generator)).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randn(shape: tuple[int, ...], generator: Generator, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(generator, SampleGenerators):
        return generator.randn(_per_sample(shape, generator), dtype).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def drop_conditions(prompts: list[str], p: float, generator: Generator = None) -> list[str]:
    """Replace each caption by the empty prompt with probability ``p``.

    Classifier-free guidance training (Ho & Salimans 2022): the text encoder then encodes "" and
    the network learns the unconditional model from the empty prompt's embedding, which is what
    Stable Diffusion feeds as the negative prompt at sampling time.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} is invalid; allowed: a probability in [0, 1]")
    drop = _rand((len(prompts),), generator, torch.device("cpu")) < p
    return ["" if d else prompt for prompt, d in zip(prompts, drop.tolist())]


def drop_labels(labels: torch.Tensor, null_class: int, p: float, generator: Generator = None) -> torch.Tensor:
    """Class-label ``drop_conditions``: each label (B,) becomes ``null_class`` with probability ``p``,
    so the class embedder's null row learns the unconditional model (classifier-free guidance, Ho &
    Salimans 2022). Draws the same uniforms as ``drop_conditions`` for the same generator state."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} is invalid; allowed: a probability in [0, 1]")
    drop = _rand((labels.shape[0],), generator, labels.device) < p  # (B,)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def drop_context(context: torch.Tensor, uncond_context: torch.Tensor, p: float,
                 generator: Generator = None) -> torch.Tensor:
    """Tensor-level ``drop_conditions`` for cached text embeddings: each row of ``context``
    (B, L, D) becomes ``uncond_context`` ((L, D), (1, L, D) or (B, L, D)) with probability ``p``.
    Draws the same uniforms as ``drop_conditions`` for the same generator state."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} is invalid; allowed: a probability in [0, 1]")
    if uncond_context.shape[-context.ndim + 1:] != context.shape[1:]:
        raise ValueError(f"uncond_context shape {tuple(uncond_context.shape)} does not match context rows "
                         f"{tuple(context.shape[1:])}; allowed: (L, D), (1, L, D) or (B, L, D)")
    drop = _rand((context.shape[0],), generator, context.device) < p  # (B,)
    drop = drop.reshape(-1, *([1] * (context.ndim - 1)))
    return torch.where(drop, uncond_context.to(context.dtype), context)


class GaussianDiffusion:
    """DDPM training objective (Ho et al. 2020, L_simple) for the eps / v / x0 parameterisations,
    with optional offset noise and min-SNR-gamma loss weighting."""

    def __init__(self, schedule: NoiseSchedule, *, offset_noise: float = 0.0,
                 min_snr_gamma: Optional[float] = None, timestep_sampling: str = "uniform") -> None:
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is invalid; allowed: {TIMESTEP_SAMPLINGS}")
        if not offset_noise >= 0.0:
            raise ValueError(f"offset_noise={offset_noise!r} is invalid; allowed: a float >= 0")
        if min_snr_gamma is not None and not min_snr_gamma > 0.0:
            raise ValueError(f"min_snr_gamma={min_snr_gamma!r} is invalid; allowed: None or a float > 0")
        self.schedule = schedule
        self.offset_noise = offset_noise
        self.min_snr_gamma = min_snr_gamma
        self.timestep_sampling = timestep_sampling

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "GaussianDiffusion":
        return cls(NoiseSchedule.from_config(cfg), offset_noise=cfg.offset_noise,
                   min_snr_gamma=cfg.min_snr_gamma, timestep_sampling=cfg.timestep_sampling)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def sample_timesteps(self, batch_size: int, device: torch.device, generator: Generator = None) -> torch.Tensor:
        """t ~ U{0, ..., T-1}, (B,) int64."""
        if isinstance(generator, SampleGenerators):
            _per_sample((batch_size,), generator)
            return generator.randint(self.num_train_timesteps).to(device)
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
        return t.to(device)

    def sample_noise(self, x0: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        """eps ~ N(0, I) like x0, plus the offset-noise term when enabled."""
        noise = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
        if self.offset_noise > 0.0:
            # Guttenberg 2023: a per-(sample, channel) constant shifts the image mean, which
            # the standard schedule otherwise almost never destroys (so the model cannot learn
            # to change it); this is what lets fine-tunes produce very dark / bright images.
            offset = _randn((x0.shape[0], x0.shape[1]) + (1,) * (x0.ndim - 2), generator, x0.device, x0.dtype)
            noise = noise + self.offset_noise * offset
        return noise

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight (B,) float32 on the parameterisation's MSE.

        min-SNR-gamma (Hang et al. 2023) weights the *x0-space* loss by min(SNR, gamma); expressed
        on each parameterisation's own MSE (eps: ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2,
        v: (SNR + 1) ||x0 - x0_hat||^2) this is min(SNR, gamma) / SNR for eps,
        min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0.
        """
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = self.schedule.snr(t)
        gamma = self.min_snr_gamma
        prediction_type = self.schedule.prediction_type
        if prediction_type == "eps":
            # == min(snr, gamma) / snr, written so that snr = 0 (zero terminal SNR) gives 1, its limit.
            return gamma / torch.clamp(snr, min=gamma)
        clipped = torch.clamp(snr, max=gamma)
        if prediction_type == "v":
            return clipped / (snr + 1)
        return clipped

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, context: torch.Tensor, *,
                        generator: Generator = None, t: Optional[torch.Tensor] = None,
                        noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Per-sample losses for a batch of clean latents.

        ``model_fn(x_t, t, context)`` is the network (the UNet's ``forward(x, timesteps, context)``).
        ``t`` and ``noise`` are drawn (in that order, from ``generator``) unless given.
        Returns ``loss`` (B,) = weight * mse, the unweighted ``mse`` (B,), ``weight`` (B,) and ``t``;
        reduce with ``loss.mean()``.
        """
        B = x0.shape[0]  # x0: (B, C, H, W)
        if t is None:
            t = self.sample_timesteps(B, x0.device, generator)
        if noise is None:
            noise = self.sample_noise(x0, generator)
        x_t = self.schedule.q_sample(x0, t, noise)  # (B, C, H, W)
        model_output = model_fn(x_t, t, context)  # (B, C, H, W)
        target = self.schedule.target(x0, noise, t)
        # float32 MSE, so the loss value does not depend on the autocast dtype of the network.
        mse = (model_output.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
        weight = self.loss_weight(t)
        return {"loss": weight * mse, "mse": mse.detach(), "weight": weight, "t": t}


def build_diffusion(cfg: DiffusionConfig) -> GaussianDiffusion:
    return GaussianDiffusion.from_config(cfg)
