"""Sampling a concat-conditioned UNet (super-resolution, inpainting; Rombach et al. 2022, Sec. 3.3):
the per-sample conditioning image is concatenated to the noisy latent at every model call.

The condition is the same in both halves of a classifier-free-guidance batch: guidance acts on the
cross-attention condition (text) only, as SD-inpainting and LDM-SR sample.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from trainer.diffusion.schedule import NoiseSchedule
from trainer.sampling.pipeline import text_to_image


class WithConcat(nn.Module):
    """``unet(cat(x, concat), t, context)`` for a fixed batch of concat inputs (B, C_concat, h, w);
    an input of k * B samples (a guidance batch) repeats them k times, in the order of the batch halves."""

    def __init__(self, unet: nn.Module, concat: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.concat = concat

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch = self.concat.shape[0]
        if x.shape[0] % batch or x.shape[-2:] != self.concat.shape[-2:]:
            raise ValueError(f"x of shape {tuple(x.shape)} for concat inputs of shape {tuple(self.concat.shape)}; "
                             f"expected a multiple of {batch} samples at {tuple(self.concat.shape[-2:])}")
        concat = self.concat.to(x).repeat(x.shape[0] // batch, 1, 1, 1)
        return self.unet(torch.cat([x, concat], dim=1), timesteps, context)  # (kB, C_out, h, w)


@torch.no_grad()
def concat_to_image(unet: nn.Module, encode: Callable[[list[Any]], Optional[torch.Tensor]], first_stage: nn.Module,
                    conditions: Sequence[Any], seeds: Sequence[int], concat: torch.Tensor, *,
                    schedule: NoiseSchedule, latent_channels: int, sampler: str = "ddim", num_steps: int = 50,
                    guidance_scale: float = 1.0, negative_prompt: Any = "", batch_size: int = 16,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] on CPU: sample ``i`` from ``seeds[i]``, conditioned on ``concat[i]``
    (N, C_concat, h, w) at the latent size and on ``conditions[i]`` through ``encode`` (as
    ``text_to_image``: prompts, or anything with an ``encode`` returning None for no cross-attention)."""
    if len(conditions) != len(seeds) or concat.shape[0] != len(seeds):
        raise ValueError(f"{len(conditions)} conditions, {len(seeds)} seeds and {concat.shape[0]} concat inputs; "
                         f"expected one of each per sample")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    latent_shape = (latent_channels, *concat.shape[-2:])
    out = []
    for start in range(0, len(seeds), batch_size):
        end = min(start + batch_size, len(seeds))
        model = WithConcat(unet, concat[start:end].to(device))
        out.append(text_to_image(model, encode, first_stage, list(conditions[start:end]), list(seeds[start:end]),
                                 schedule=schedule, latent_shape=latent_shape, sampler=sampler, num_steps=num_steps,
                                 guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                 batch_size=end - start, device=device))
    return torch.cat(out)
