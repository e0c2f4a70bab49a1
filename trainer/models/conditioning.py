"""What a latent diffusion UNet is conditioned on (Rombach et al., CVPR 2022, Sec. 3.3): the
``model.conditioning`` group.

Two independent axes, as in CompVis' ``conditioning_key`` (``crossattn`` / ``concat`` / ``hybrid``):

- ``cross_attn``: what the UNet's cross-attention reads. ``text`` (a text encoder's hidden states,
  the default), ``class`` (a learned embedding of a class label, CompVis ``ClassEmbedder``, with one
  extra row as the null class of classifier-free guidance) or ``none`` (an unconditional model: the
  UNet is built without cross-attention, as CompVis' unconditional LSUN / CelebA-HQ models).
- ``concat``: an image concatenated to the noisy latent as extra UNet input channels (``lowres`` for
  4x super-resolution, ``masked_image`` for inpainting: masked image latent + mask). Both combine
  with any ``cross_attn`` (text-guided inpainting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.checks import check_choice, check_int

CROSS_ATTN_KINDS = ("text", "class", "none")
CONCAT_KINDS = ("none", "lowres", "masked_image")
# data_pipeline.degrade.DEGRADATIONS and data_pipeline.masks.MASK_KINDS (that layer sits above this one;
# tests/test_restoration.py keeps them equal).
CONCAT_DEGRADATIONS = ("bicubic", "bsr_light")
CONCAT_MASKS = ("strokes_boxes", "half")


@dataclass
class ConditioningConfig:
    """Defaults are text-to-image (the paper's LDM and Stable Diffusion).

    ``num_classes`` and ``embed_dim`` are read only for ``cross_attn=class``; ``embed_dim`` must equal
    ``model.unet.context_dim`` (checked by ``ModelConfig``), since the embedding is the context the
    cross-attention reads. ``concat_channels`` is the number of channels ``concat`` adds to the UNet's
    input: ``model.unet.in_channels`` must be the latent channels plus it.
    """

    cross_attn: str = "text"
    num_classes: int = 0
    embed_dim: int = 0
    concat: str = "none"
    concat_channels: int = 0
    # How the concat input is made from the image (data_pipeline/concat.py), read for its kind only:
    # lowres: the low-resolution image is H / sr_factor, made by ``degradation`` (the paper's bicubic x4,
    # or a seeded light BSR degradation); masked_image: masks of kind ``mask`` (LaMa-style strokes and
    # boxes covering [mask_min_coverage, mask_max_coverage] of the image, or one half).
    sr_factor: int = 4
    degradation: str = "bicubic"
    mask: str = "strokes_boxes"
    mask_min_coverage: float = 0.1
    mask_max_coverage: float = 0.5

    def __post_init__(self) -> None:
        check_choice("model.conditioning.cross_attn", self.cross_attn, CROSS_ATTN_KINDS)
        check_choice("model.conditioning.concat", self.concat, CONCAT_KINDS)
        if self.cross_attn == "class":
            check_int("model.conditioning.num_classes", self.num_classes, 1)
            check_int("model.conditioning.embed_dim", self.embed_dim, 1)
        check_int("model.conditioning.concat_channels", self.concat_channels, 0)
        if self.concat != "none":
            check_int("model.conditioning.sr_factor", self.sr_factor, 1)
            check_choice("model.conditioning.degradation", self.degradation, CONCAT_DEGRADATIONS)
            check_choice("model.conditioning.mask", self.mask, CONCAT_MASKS)
            if not 0.0 < self.mask_min_coverage <= self.mask_max_coverage <= 1.0:
                raise ValueError(f"model.conditioning.mask_min_coverage={self.mask_min_coverage!r} and mask_max_coverage="
                                 f"{self.mask_max_coverage!r}; expected 0 < mask_min_coverage <= mask_max_coverage <= 1")
        if (self.concat == "none") != (self.concat_channels == 0):
            raise ValueError(
                f"model.conditioning.concat={self.concat!r} with model.conditioning.concat_channels="
                f"{self.concat_channels}: concat='none' adds no channels (0), any other kind adds at least one")

    @property
    def is_default(self) -> bool:
        """Text conditioning without concat: what every run before this group existed was."""
        return self == ConditioningConfig()

    @property
    def null_class(self) -> int:
        """The embedding row of the unconditional branch (classifier-free guidance dropout)."""
        return self.num_classes


class ClassEmbedder(nn.Module):
    """Class label -> a one-token cross-attention context (CompVis
    ``ldm/modules/encoders/modules.py`` ``ClassEmbedder``): ``labels (B,) int64 -> (B, 1, embed_dim)``.

    Row ``num_classes`` is the null class: condition dropout trains it as the unconditional model
    and guided sampling uses it as the unconditional branch (classifier-free guidance, Ho & Salimans
    2022). Trained with the UNet; its parameters are ``embedding.weight``.
    """

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels.long())[:, None]  # (B, 1, D)
