"""The UNet of latent diffusion (Rombach et al., CVPR 2022, Sec. 3.3 and App. E): conditional
through cross-attention, or unconditional (``context_dim=None``).

Architecture and parameter names follow CompVis ``ldm/modules/diffusionmodules/openaimodel.py``
(``UNetModel`` with ``use_spatial_transformer=True``, ``legacy=False``), so CompVis and Stable
Diffusion checkpoints load unchanged: ``time_embed.{0,2}``, ``input_blocks.{i}.{j}``,
``middle_block.{0,1,2}``, ``output_blocks.{i}.{j}``, ``out.{0,2}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.attention import AttentionBlock, GroupNorm32, SpatialTransformer

@dataclass
class UNetConfig:
    """Defaults are the SD v1 / LDM text-to-image UNet (CompVis ``v1-inference.yaml``).

    ``attention_resolutions`` lists downsampling factors ``ds`` (1 at the input resolution, doubling
    at each level) whose blocks get a ``SpatialTransformer``, as in CompVis. Heads are set by exactly
    one of ``num_heads`` (fixed count; SD v1) or ``num_head_channels`` (fixed width, count =
    channels // width; SD v2); the other must be -1. ``dropout`` acts in ResBlocks only: CompVis
    passes none to its transformers. ``context_dim=None`` builds the unconditional UNet: each
    attention resolution gets a self-attention ``AttentionBlock`` instead of a ``SpatialTransformer``
    (CompVis ``use_spatial_transformer=False``; ``transformer_depth`` and ``use_linear_in_transformer``
    are then unused). Activation checkpointing is applied from outside the model, per
    block kind of ``CHECKPOINT_BLOCKS`` (``trainer.runtime.engine.apply_activation_checkpointing``).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attention_resolutions: List[int] = field(default_factory=lambda: [4, 2, 1])
    num_heads: int = 8
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: Optional[int] = 768
    use_linear_in_transformer: bool = False
    dropout: float = 0.0
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        # Hydra may hand over ListConfig; plain int lists keep `in` tests and pickling simple.
        self.channel_mult = [int(m) for m in self.channel_mult]
        self.attention_resolutions = [int(r) for r in self.attention_resolutions]
        for key in ("in_channels", "out_channels", "model_channels", "num_res_blocks",
                    "transformer_depth", "context_dim", "norm_num_groups"):
            value = getattr(self, key)
            if value is None and key == "context_dim":  # unconditional: no cross-attention
                continue
            if value <= 0:
                raise ValueError(f"unet.{key}={value} must be a positive integer")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"unet.channel_mult={self.channel_mult} must be a non-empty list of "
                             f"positive integers")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"unet.dropout={self.dropout} must be in [0, 1)")
        allowed_ds = self.downsample_factors
        for ds in self.attention_resolutions:
            if ds not in allowed_ds:
                raise ValueError(
                    f"unet.attention_resolutions contains {ds}, a downsampling factor that never "
                    f"occurs with channel_mult={self.channel_mult}; allowed: {allowed_ds}")
        if len(set(self.attention_resolutions)) != len(self.attention_resolutions):
            raise ValueError(f"unet.attention_resolutions={self.attention_resolutions} has duplicates")
        heads_set = self.num_heads > 0
        width_set = self.num_head_channels > 0
        if heads_set == width_set or (self.num_heads if width_set else self.num_head_channels) != -1:
            raise ValueError(
                f"unet.num_heads={self.num_heads}, unet.num_head_channels={self.num_head_channels}: "
                f"exactly one must be positive and the other -1 (SD v1: num_heads=8, "
                f"num_head_channels=-1; SD v2: num_heads=-1, num_head_channels=64)")
        for ch in self.level_channels:
            if ch % self.norm_num_groups:
                raise ValueError(
                    f"unet.norm_num_groups={self.norm_num_groups} must divide every level's channels "
                    f"{self.level_channels} (model_channels={self.model_channels} x "
                    f"channel_mult={self.channel_mult}); {ch} is not divisible")
        # The middle block always has a transformer at the last level's width (CompVis).
        attention_channels = sorted({ch for ch, ds in zip(self.level_channels, allowed_ds)
                                     if ds in self.attention_resolutions}
                                    | {self.level_channels[-1]})
        for ch in attention_channels:
            if heads_set and ch % self.num_heads:
                raise ValueError(
                    f"unet.num_heads={self.num_heads} must divide the channels of every block with "
                    f"attention {attention_channels}; {ch} is not divisible")
            if width_set and ch % self.num_head_channels:
                raise ValueError(
                    f"unet.num_head_channels={self.num_head_channels} must divide the channels of "
                    f"every block with attention {attention_channels}; {ch} is not divisible")

    @property
    def downsample_factors(self) -> list[int]:
        """``ds`` of each level: 1, 2, 4, ..., 2 ** (len(channel_mult) - 1)."""
        return [2 ** level for level in range(len(self.channel_mult))]

    @property
    def level_channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a transformer on ``channels`` channels (CompVis non-legacy)."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f_i = max_period ** (-i / half)``
    (CompVis ``timestep_embedding``; Vaswani et al. 2017 positions, DDPM timesteps). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between (DDPM / CompVis ``ResBlock``
    with ``use_scale_shift_norm=False``). The second conv starts at zero, so the block starts as
    its skip connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 norm_num_groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_num_groups, channels), nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_num_groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        for p in self.out_layers[3].parameters():
            p.detach().zero_()
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # + (B, C_out, 1, 1)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (CompVis ``Downsample`` with ``use_conv=True``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (CompVis ``Upsample`` with ``use_conv=True``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C, 2H, 2W)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """``forward(x (B, C_in, H, W), timesteps (B,), context (B, L, context_dim)) -> (B, C_out, H, W)``;
    ``context`` is None for an unconditional UNet (``context_dim=None``).

    H and W must be divisible by ``2 ** (len(channel_mult) - 1)`` so that skips line up.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        time_embed_dim = cfg.model_channels * 4
        groups = cfg.norm_num_groups
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.model_channels, time_embed_dim), nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim))

        def transformer(channels: int) -> nn.Module:
            heads, dim_head = cfg.heads_and_dim(channels)
            if cfg.context_dim is None:
                return AttentionBlock(channels, heads, norm_num_groups=groups)
            return SpatialTransformer(channels, heads, dim_head, cfg.context_dim,
                                      depth=cfg.transformer_depth,
                                      use_linear=cfg.use_linear_in_transformer,
                                      norm_num_groups=groups)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        num_levels = len(cfg.channel_mult)
        for level, (out_ch, ds) in enumerate(zip(cfg.level_channels, cfg.downsample_factors)):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_embed_dim, out_ch, cfg.dropout, groups)]
                ch = out_ch
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != num_levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, ch, cfg.dropout, groups),
            transformer(ch),
            ResBlock(ch, time_embed_dim, ch, cfg.dropout, groups))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(num_levels)):
            out_ch, ds = cfg.level_channels[level], cfg.downsample_factors[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_embed_dim, out_ch, cfg.dropout,
                                   groups)]
                ch = out_ch
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        for p in self.out[2].parameters():
            p.detach().zero_()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.ndim != 4 or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {self.cfg.in_channels}, H, W) "
                             f"with H and W divisible by {factor} (2 ** (len(channel_mult) - 1))")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype)  # (B, C_model)
        emb = self.time_embed(t_emb)  # (B, 4 C_model)
        skips = []
        h = x  # (B, C_in, H, W)
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, C_last, H/f, W/f)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)  # (B, C_out, H, W)


# The blocks activation checkpointing can recompute, by the kind ``deepspeed.activation_checkpointing``
# names: ResBlocks, and SpatialTransformers (attention and feed-forward hold most activations at high
# resolution).
CHECKPOINT_BLOCKS = {"res": ResBlock, "transformer": SpatialTransformer}
