"""The model preset: first stage + UNet + its conditioning (a text encoder, a class embedder or
none), checked against each other.

Each component owns its typed config (``UNetConfig``, ``AutoencoderConfig``, ``TextEncoderConfig``,
``ConditioningConfig``); this module only composes them and checks the settings that span two
components, before any weight is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from trainer.models.autoencoder import AutoencoderConfig, build_first_stage
from trainer.models.conditioning import ClassEmbedder, ConditioningConfig
from trainer.models.text_encoders import TextEncoderConfig, build_text_encoder
from trainer.models.unet import UNetConfig, UNetModel


@dataclass
class ModelConfig:
    # Defaults are the paper's 1.45B model; presets in conf/model/ override them.
    name: str = "ldm_1p45b"
    unet: UNetConfig = field(default_factory=lambda: UNetConfig(context_dim=1280))
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    # Read only when conditioning.cross_attn is text; no text encoder is built otherwise.
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    # Start from published weights: a diffusers pipeline folder or a CompVis .ckpt / .safetensors
    # (trainer.interchange.load_pretrained); every tensor must fit this architecture.
    init_from: Optional[str] = None
    # A CompVis checkpoint's UNet from its EMA copy (``model_ema.*``, CompVis LitEma) instead of
    # ``model.diffusion_model.*``. Off by default, as CompVis' SD v1 inference config (use_ema: False)
    # samples with model.diffusion_model; a checkpoint without model_ema.* is refused when on.
    init_from_ema: bool = False

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the diffusion latent of an ``image_size`` image: the first stage's latent
        channels and its downsampling."""
        f = self.autoencoder.downsample_factor
        return self.autoencoder.latent_channels, image_size // f, image_size // f

    def image_size_multiple(self) -> int:
        """What every image side must be a multiple of: the first stage's downsampling factor times
        the UNet's total downsampling (2^(levels-1)), so each UNet level halves the latent exactly."""
        return self.autoencoder.downsample_factor * self.unet.downsample_factors[-1]

    def check_image_size(self, key: str, size: int) -> None:
        """Refuse an image side (``key=size``) the first stage or the UNet cannot divide."""
        f, unet = self.autoencoder.downsample_factor, self.unet.downsample_factors[-1]
        if size % (f * unet):
            lower, upper = size // (f * unet) * f * unet, (size // (f * unet) + 1) * f * unet
            raise ValueError(
                f"{key}={size} is invalid; allowed: a multiple of {f * unet} (e.g. {lower or upper} or {upper}): "
                f"the first stage (model.autoencoder, factor {f}) makes a {size / f:g} px latent, which the UNet's "
                f"{len(self.unet.channel_mult)} levels (model.unet.channel_mult={self.unet.channel_mult}) "
                f"halve {len(self.unet.channel_mult) - 1} times")

    @property
    def uses_text(self) -> bool:
        return self.conditioning.cross_attn == "text"

    def context_len(self) -> int:
        """Tokens of the context the cross-attention reads: the text encoder's positions, one class
        token, or none (unconditional)."""
        return {"text": self.text_encoder.max_length, "class": 1, "none": 0}[self.conditioning.cross_attn]

    def __post_init__(self) -> None:
        cond = self.conditioning
        if self.unet.context_dim is None and cond.cross_attn != "none":
            raise ValueError(f"model.unet.context_dim=null is the unconditional UNet; "
                             f"model.conditioning.cross_attn={cond.cross_attn!r} needs its context width")
        if cond.cross_attn == "text":
            width = self.text_encoder.output_width
            if self.unet.context_dim != width:
                raise ValueError(
                    f"model.unet.context_dim={self.unet.context_dim} must equal the text encoder's output "
                    f"width {width} (model.text_encoder: kind={self.text_encoder.kind!r}); cross-attention "
                    f"reads the text encoder's hidden states.")
        elif cond.cross_attn == "class":
            if self.unet.context_dim != cond.embed_dim:
                raise ValueError(
                    f"model.unet.context_dim={self.unet.context_dim} must equal model.conditioning.embed_dim="
                    f"{cond.embed_dim} (cross_attn='class'): cross-attention reads the class embedding.")
        elif self.unet.context_dim is not None:
            raise ValueError(
                f"model.conditioning.cross_attn='none' builds an unconditional UNet without cross-attention; "
                f"model.unet.context_dim={self.unet.context_dim} must be null (model.unet.context_dim=null)")
        latent = self.autoencoder.latent_channels
        if self.unet.in_channels != latent + cond.concat_channels:
            extra = (f" plus model.conditioning.concat_channels={cond.concat_channels} "
                     f"(concat={cond.concat!r})" if cond.concat_channels else "")
            raise ValueError(
                f"model.unet.in_channels={self.unet.in_channels} must equal the first stage's latent "
                f"channels {latent} (model.autoencoder: kind={self.autoencoder.kind!r}){extra}.")
        if self.unet.out_channels != latent:
            raise ValueError(
                f"model.unet.out_channels={self.unet.out_channels} must equal the first stage's latent "
                f"channels {latent} (model.autoencoder: kind={self.autoencoder.kind!r}).")


@dataclass
class ModelComponents:
    """The built networks. Only ``trainable_modules`` enter an optimizer. ``text_encoder`` and
    ``tokenizer`` exist for text conditioning only, ``class_embedder`` for class conditioning."""

    unet: UNetModel
    first_stage: nn.Module
    text_encoder: Optional[nn.Module]
    tokenizer: object | None
    class_embedder: Optional[ClassEmbedder] = None

    @property
    def text_encoder_trainable(self) -> bool:
        return self.text_encoder is not None and any(p.requires_grad for p in self.text_encoder.parameters())

    def trainable_modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"unet": self.unet}
        if self.text_encoder_trainable:
            out["text_encoder"] = self.text_encoder
        if self.class_embedder is not None:
            out["class_embedder"] = self.class_embedder
        return out


def build_components(cfg: ModelConfig, *, device: torch.device | str = "cpu",
                     allow_random_init: bool = False, build_tokenizer: bool = True) -> ModelComponents:
    """Build every network of ``cfg`` on ``device``: random initialisation, except the frozen
    OpenCLIP tower, whose weights open_clip reads itself (the first stage's pretrained file is
    loaded by ``trainer.interchange.build_networks``).

    ``device="meta"`` allocates nothing (used by ``trainer.plan``); weights are then not loaded and
    no tokenizer is built. ``allow_random_init`` lets frozen pretrained parts (OpenCLIP) start from
    random weights, for tests only.
    """
    meta = torch.device(device).type == "meta"
    text_encoder, tokenizer, class_embedder = None, None, None
    with torch.device(device):
        unet = UNetModel(cfg.unet)
        first_stage = build_first_stage(cfg.autoencoder)
        if cfg.uses_text:
            text_encoder, tokenizer = build_text_encoder(
                cfg.text_encoder, allow_random_init=allow_random_init or meta,
                build_tokenizer=build_tokenizer and not meta)
        elif cfg.conditioning.cross_attn == "class":
            class_embedder = ClassEmbedder(cfg.conditioning.num_classes, cfg.conditioning.embed_dim)
    return ModelComponents(unet=unet, first_stage=first_stage, text_encoder=text_encoder,
                           tokenizer=tokenizer, class_embedder=class_embedder)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
