"""Concat conditioning's extra UNet input channels (issue 18; Rombach et al. 2022, Sec. 3.3, 4.4, 4.5).

Made on the fly from the high-resolution image of each sample, with that sample's generator (keyed by
its global position, ``trainer.diffusion.SampleGenerators``), so a resumed run redraws the same inputs:

* ``lowres`` (4x super-resolution, CompVis' LDM-SR ``concat_mode``): the image degraded by ``factor``
  (``data_pipeline.degrade``), then brought to the latent's size by bicubic interpolation. CompVis
  concatenates the low-resolution image itself at the latent resolution (64 px low-res with 64x64 VQ-f4
  latents of the 256 px image); in pixel space (f = 1) it is the bicubic upsampling. 3 channels.
* ``masked_image`` (inpainting, SD-inpainting layout): the mask at the latent size (nearest), then the
  latent of the masked image (first stage mode, scaled as the diffusion latents): 1 + latent channels,
  the order of CompVis' ``LatentInpaintDiffusion`` and diffusers' ``StableDiffusionInpaintPipeline``, so
  their checkpoints' ``conv_in`` needs no permutation.

A latent cache of a concat task (``data_pipeline.precompute``) stores ``make_condition``'s output per
sample instead, drawn once from a generator keyed by the sample's identity (``data_pipeline.latents``).

The condition is never dropped for guidance: SD-inpainting and LDM-SR use none on the concat part
(text guidance still applies when the model also has text cross-attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.degrade import DEGRADATIONS, check_factor, degrade
from data_pipeline.masks import MASK_KINDS, check_coverage, draw_masks, mask_at, masked_images

CONCAT_INPUT_KINDS = ("lowres", "masked_image")


@dataclass(frozen=True)
class ConcatSettings:
    """How the concat input is made from the image (the ``model.conditioning`` keys in brackets)."""

    kind: str  # [concat] lowres | masked_image
    sr_factor: int = 4  # [sr_factor] the low-resolution image is H / sr_factor
    degradation: str = "bicubic"  # [degradation] data_pipeline.degrade.DEGRADATIONS
    mask: str = "strokes_boxes"  # [mask] data_pipeline.masks.MASK_KINDS
    mask_min_coverage: float = 0.1  # [mask_min_coverage]
    mask_max_coverage: float = 0.5  # [mask_max_coverage]

    def __post_init__(self) -> None:
        if self.kind not in CONCAT_INPUT_KINDS:
            raise ValueError(f"model.conditioning.concat={self.kind!r}; expected one of {list(CONCAT_INPUT_KINDS)}")
        if not isinstance(self.sr_factor, int) or self.sr_factor < 1:
            raise ValueError(f"model.conditioning.sr_factor={self.sr_factor!r}; expected an integer >= 1")
        if self.degradation not in DEGRADATIONS:
            raise ValueError(f"model.conditioning.degradation={self.degradation!r}; expected one of "
                             f"{list(DEGRADATIONS)}")
        if self.mask not in MASK_KINDS:
            raise ValueError(f"model.conditioning.mask={self.mask!r}; expected one of {list(MASK_KINDS)}")
        try:
            check_coverage(self.mask_min_coverage, self.mask_max_coverage)
        except ValueError as e:
            raise ValueError(f"model.conditioning.mask_min_coverage / mask_max_coverage: {e}") from None


def concat_settings(cond: Any) -> Optional[ConcatSettings]:
    """``model.conditioning``'s concat input settings (None for concat='none')."""
    if cond.concat == "none":
        return None
    return ConcatSettings(kind=cond.concat, sr_factor=cond.sr_factor, degradation=cond.degradation, mask=cond.mask,
                          mask_min_coverage=cond.mask_min_coverage, mask_max_coverage=cond.mask_max_coverage)


def concat_channels(kind: str, latent_channels: int, image_channels: int = 3) -> int:
    """Channels the concat input adds to the UNet's input."""
    return image_channels if kind == "lowres" else latent_channels + 1


def lowres_to_latent_size(low: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Low-resolution images (B, 3, h, w) -> (B, 3, *latent_size), bicubic, in [-1, 1]."""
    if tuple(low.shape[-2:]) == tuple(latent_size):
        return low
    return F.interpolate(low.float(), size=latent_size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


@torch.no_grad()
def masked_image_condition(first_stage: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """cat(mask at the latent size, latent of the masked image): (B, 1 + C_latent, h, w)."""
    masked = masked_images(images, masks.to(images))  # (B, 3, H, W)
    latent = first_stage.to_latent(first_stage.encode(masked).mode()).float()  # (B, C, h, w)
    return torch.cat([mask_at(masks.to(latent), tuple(latent.shape[-2:])), latent], dim=1)


def draw_inputs(images: torch.Tensor, generators: Optional[Sequence[torch.Generator]], settings: ConcatSettings
                ) -> torch.Tensor:
    """What is drawn per sample from the image (B, 3, H, W): the low-resolution image (B, 3, H/f, W/f)
    for ``lowres``, the mask (B, 1, H, W) for ``masked_image``."""
    height, width = images.shape[-2:]
    if settings.kind == "lowres":
        check_factor(settings.sr_factor, height, width, "model.conditioning.sr_factor")
        return degrade(images.float().cpu(), settings.sr_factor, settings.degradation, generators).to(images.device)
    if generators is None:
        raise ValueError("masked_image concat inputs need one generator per sample")
    return draw_masks(generators, height, width, settings.mask, min_coverage=settings.mask_min_coverage,
                      max_coverage=settings.mask_max_coverage).to(images.device)


def condition_from(kind: str, first_stage: nn.Module, images: torch.Tensor, drawn: torch.Tensor,
                   latent_size: tuple[int, int]) -> torch.Tensor:
    """The concat input at the latent size from the image and what was drawn (``draw_inputs``; or, at
    sampling, the user's low-resolution image / mask). For ``lowres`` ``images`` is unused."""
    if kind == "lowres":
        return lowres_to_latent_size(drawn, latent_size)
    return masked_image_condition(first_stage, images, drawn)


def make_condition(first_stage: nn.Module, images: torch.Tensor, generators: Optional[Sequence[torch.Generator]],
                   settings: ConcatSettings, latent_size: tuple[int, int]) -> torch.Tensor:
    """A training batch's concat input (B, C_concat, *latent_size) from its images (B, 3, H, W) in [-1, 1]."""
    drawn = draw_inputs(images, generators, settings)
    return condition_from(settings.kind, first_stage, images, drawn, latent_size)
