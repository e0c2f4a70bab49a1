"""Conditions -> images with any sampler: encode the conditions (prompts, class labels, or nothing
for an unconditional model), draw x_T per sample, denoise, decode.

Pure function of its arguments (no process group, no checkpoint format): the training job's
scheduled samples, evaluation and ``trainer.sample`` all call it. Each sample's starting noise comes
from its own seed, so an image does not depend on the batch it was drawn in.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from trainer.diffusion.schedule import NoiseSchedule
from trainer.sampling.samplers import cfg_model_fn, get_sampler


@torch.no_grad()
def text_to_image(unet: nn.Module, encode: Callable[[list[Any]], Optional[torch.Tensor]], first_stage: nn.Module,
                  prompts: Sequence[Any], seeds: Sequence[int], *, schedule: NoiseSchedule,
                  latent_shape: tuple[int, int, int], sampler: str = "ddim", num_steps: int = 50,
                  guidance_scale: float = 1.0, negative_prompt: Any = "", batch_size: int = 16,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] (float32, on CPU) for ``prompts[i]`` started from ``seeds[i]``.

    ``encode(prompts)`` returns the text encoder's hidden states (B, L, D); ``latent_shape`` is
    (C, h, w) of the UNet's input. Classifier-free guidance uses ``negative_prompt``'s embedding as
    the unconditional branch ("" as trained with condition dropout).

    Any other conditioning goes through the same steps: ``prompts`` are then class labels and
    ``encode`` the class embedder (``negative_prompt`` the null class), or anything (None) with an
    ``encode`` that returns None, for an unconditional UNet (no guidance then).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    sample_fn = get_sampler(sampler)
    schedule = schedule.to(device)
    uncond = encode([negative_prompt])  # (1, L, D), or None (unconditional)
    if uncond is None and guidance_scale != 1.0:
        raise ValueError(f"guidance_scale={guidance_scale}: an unconditional model has no conditional branch to "
                         f"guide; allowed: 1")
    uncond = None if uncond is None else uncond.to(dtype)

    def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return unet(x.to(dtype), t, c).float()

    out = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start:start + batch_size])
        batch_seeds = seeds[start:start + batch_size]
        x_T = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(int(s)))
                           for s in batch_seeds]).to(device)  # (B, C, h, w)
        context = encode(batch_prompts)  # (B, L, D) or None
        context = None if context is None else context.to(dtype)
        model_fn = cfg_model_fn(model, context, uncond, guidance_scale)
        generator = torch.Generator().manual_seed(int(batch_seeds[0]))
        latents = sample_fn(model_fn, x_T, schedule, num_steps=num_steps, generator=generator)
        images = first_stage.decode_latent(latents.to(dtype)).float()  # (B, 3, H, W)
        out.append(images.clamp(-1.0, 1.0).cpu())
    return torch.cat(out)
