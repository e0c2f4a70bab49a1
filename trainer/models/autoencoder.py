"""The first stage of latent diffusion: the KL-regularised autoencoder (Rombach et al., CVPR 2022,
Sec. 3.1 and Appendix G), the VQ-regularised one (frozen: for the paper's VQ-f4 checkpoints, which its
class-conditional, LSUN and super-resolution models were trained on) and the identity first stage of
the pixel-space baseline LDM-1.

The network follows CompVis ``ldm/modules/diffusionmodules/model.py`` (Encoder, Decoder) and
``ldm/models/autoencoder.py`` (AutoencoderKL, VQModelInterface) module for module, with the same parameter names, so a
CompVis or Stable Diffusion VAE state dict loads unchanged. The training losses (LPIPS and the patch
discriminator) are not part of this module.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("kl", "vq", "identity")
NUM_GROUPS = 32  # CompVis Normalize(): GroupNorm(32, C, eps=1e-6)
GROUP_NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # CompVis DiagonalGaussianDistribution clamp


@dataclass
class AutoencoderConfig:
    """The first stage. Field names are CompVis ``ddconfig`` names plus ``embed_dim``.

    ``scale_factor``/``shift_factor`` map a posterior sample z to the diffusion latent
    ``(z - shift) * scale`` (paper Sec. 4.3.2 and Appendix D.1: rescale latents to unit variance). They
    apply to kind ``kl`` only; the identity first stage always uses 1.0 and 0.0.
    """

    kind: str = "kl"
    embed_dim: int = 4
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: List[int] = field(default_factory=list)
    dropout: float = 0.0
    double_z: bool = True
    n_embed: int = 8192  # kind 'vq': codebook size (CompVis VQModel n_embed; its vectors have embed_dim)
    scale_factor: float = 0.18215  # SD KL-f8 (CompVis v1-inference.yaml)
    shift_factor: float = 0.0
    checkpoint_path: Optional[str] = None

    def __post_init__(self) -> None:
        self.ch_mult = list(self.ch_mult)
        self.attn_resolutions = list(self.attn_resolutions)
        if self.kind not in KINDS:
            raise ValueError(f"model.autoencoder.kind={self.kind!r}; allowed: {', '.join(KINDS)}")
        for key in ("in_channels", "out_ch"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.autoencoder.{key}={getattr(self, key)} must be a positive "
                                 f"number of channels")
        if not math.isfinite(self.scale_factor) or self.scale_factor <= 0:
            raise ValueError(f"model.autoencoder.scale_factor={self.scale_factor} must be a finite "
                             f"number > 0 (latents are multiplied by it and divided by it)")
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"model.autoencoder.shift_factor={self.shift_factor} must be finite")
        if self.kind == "identity":
            if self.out_ch != self.in_channels:
                raise ValueError(
                    f"model.autoencoder.out_ch={self.out_ch} must equal in_channels="
                    f"{self.in_channels} for kind 'identity' (decode returns its input)")
            return
        self._check_kl()

    def _check_kl(self) -> None:
        for key in ("embed_dim", "z_channels", "resolution", "ch", "num_res_blocks"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.autoencoder.{key}={getattr(self, key)} must be >= 1")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"model.autoencoder.ch_mult={self.ch_mult} must be a non-empty list of "
                             f"positive channel multipliers")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.autoencoder.dropout={self.dropout}; allowed: 0 <= dropout < 1")
        if self.kind == "kl" and not self.double_z:
            # CompVis AutoencoderKL asserts ddconfig["double_z"]: the encoder emits mean and log-variance.
            raise ValueError("model.autoencoder.double_z=False; kind 'kl' needs double_z=True (the "
                             "encoder outputs the posterior mean and log-variance)")
        if self.kind == "vq" and self.double_z:
            raise ValueError("model.autoencoder.double_z=True; kind 'vq' needs double_z=false (CompVis VQModel: "
                             "the encoder outputs z_channels, quantized after quant_conv)")
        if self.kind == "vq" and self.n_embed < 1:
            raise ValueError(f"model.autoencoder.n_embed={self.n_embed} must be >= 1 (the codebook size)")
        bad_widths = [self.ch * m for m in self.ch_mult if (self.ch * m) % NUM_GROUPS]
        if bad_widths:
            raise ValueError(
                f"model.autoencoder.ch={self.ch} with ch_mult={self.ch_mult} gives widths {bad_widths} "
                f"that GroupNorm({NUM_GROUPS}) cannot split; allowed: ch * mult divisible by {NUM_GROUPS}")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"model.autoencoder.resolution={self.resolution} is not divisible by the downsample "
                f"factor {self.downsample_factor} (2^(len(ch_mult)-1), ch_mult={self.ch_mult})")
        levels = self.level_resolutions
        unknown = [r for r in self.attn_resolutions if r not in levels]
        if unknown:
            raise ValueError(
                f"model.autoencoder.attn_resolutions={self.attn_resolutions}: {unknown} never occur; "
                f"allowed: a subset of the level resolutions {levels} (resolution={self.resolution}, "
                f"ch_mult={self.ch_mult})")

    @property
    def downsample_factor(self) -> int:
        return 1 if self.kind == "identity" else 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.in_channels if self.kind == "identity" else self.embed_dim

    @property
    def level_resolutions(self) -> list[int]:
        """Feature-map side length at each encoder level (CompVis ``curr_res``)."""
        return [self.resolution // 2**i for i in range(len(self.ch_mult))]


def _normalize(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NUM_GROUPS, num_channels, eps=GROUP_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """CompVis ResnetBlock without a time embedding (temb_channels=0 in the autoencoder)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """CompVis AttnBlock: single-head self-attention over all H*W positions, 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same function as CompVis (1x1 convs are linear maps over channels), computed in the op order
        # of diffusers' AttnProcessor2_0: norm on (B, C, H*W), matmuls on tokens, residual added last
        # to the channels-last view. Layout decides which conv kernel runs next, and a 1e-7 rounding
        # difference grows ~100x through a randomly initialised decoder; this keeps parity bitwise.
        b, c, height, width = x.shape
        tokens = self.norm(x.reshape(b, c, height * width)).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (self._project(conv, tokens).unsqueeze(1) for conv in (self.q, self.k, self.v))
        # (B, 1, H*W, C): one head. The default SDPA scale C^-1/2 is the scale CompVis applies.
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C)
        out = self._project(self.proj_out, out).transpose(1, 2).reshape(b, c, height, width)
        return out + x  # (B, C, H, W)

    @staticmethod
    def _project(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, conv.weight.reshape(conv.out_channels, conv.in_channels), conv.bias)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CompVis pads right/bottom only, so an even side halves exactly; torch conv padding is symmetric.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (empty unless the level's resolution
    is in attn_resolutions) and an optional ``downsample``/``upsample`` (CompVis names)."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """CompVis Encoder: image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], dropout: float, in_channels: int, resolution: int,
                 z_channels: int, double_z: bool = True) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            curr_res = resolution // 2**i
            block_in, block_out = ch * in_ch_mult[i], ch * mult
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            level = _Level(blocks, attn)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch*mult, H/2^i, W/2^i)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2*z_channels, H/f, W/f)


class Decoder(nn.Module):
    """CompVis Decoder: z (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    ``up[i]`` is the level at resolution ``resolution / 2^i`` (CompVis prepends while building from
    the lowest resolution), so the forward pass walks ``up`` in reverse.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], dropout: float, resolution: int,
                 z_channels: int) -> None:
        super().__init__()
        num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout)
        levels: list[_Level] = [None] * num_levels  # type: ignore[list-item]
        for i in reversed(range(num_levels)):
            curr_res = resolution // 2**i
            block_out = ch * ch_mult[i]
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            level = _Level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(block_in)
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, ch*mult, ...), doubled except at up[0]
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, h*f, w*f)


class DiagonalGaussianDistribution:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) (CompVis ldm/modules/distributions).

    ``parameters`` is (B, 2C, H, W): mean and log-variance stacked on the channel axis; logvar is
    clamped to [-30, 20] as CompVis does. ``deterministic=True`` makes a point mass at ``mean``:
    std = var = 0, ``sample()`` returns ``mean`` itself without drawing noise, kl and nll are 0.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(f"DiagonalGaussianDistribution: parameters of shape {tuple(parameters.shape)}"
                             f"; expected (B, 2C, ...) with mean and log-variance on dim 1")
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @classmethod
    def point_mass(cls, x: torch.Tensor) -> "DiagonalGaussianDistribution":
        """A deterministic posterior at ``x`` (the identity first stage)."""
        return cls(torch.cat([x, torch.zeros_like(x)], dim=1), deterministic=True)

    def _sum_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.mean.ndim))

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * eps, eps drawn from ``generator`` (on the device of ``mean``)."""
        if self.deterministic:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL(self || other), summed over all but the batch axis; ``other=None`` is N(0, I). (B,)"""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * terms.sum(dim=self._sum_dims())

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample), summed over all but the batch axis. (B,)"""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=self._sum_dims())


class _FirstStage(nn.Module):
    """Shared latent API. The diffusion model sees ``to_latent(z) = (z - shift) * scale``."""

    scale_factor: float
    shift_factor: float

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior sample -> diffusion latent, ``(z - shift_factor) * scale_factor``."""
        return (z - self.shift_factor) * self.scale_factor

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Diffusion latent -> decoder input, ``latent / scale_factor + shift_factor``."""
        return latent / self.scale_factor + self.shift_factor

    def encode_latent(self, x: torch.Tensor, sample_posterior: bool = True,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Image (B, C, H, W) in [-1, 1] -> scaled diffusion latent (B, latent_channels, H/f, W/f)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.to_latent(z)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled diffusion latent -> image."""
        return self.decode(self.from_latent(latent))


class _ConvAutoencoder(_FirstStage):
    """What CompVis' AutoencoderKL and VQModel share: the encoder (emitting ``encoder_channels``), the
    decoder and ``post_quant_conv``, built in CompVis' order (encoder, decoder, then the subclass's
    ``quant_conv``, then ``post_quant_conv``: the same seed gives the same weights), and the shape checks."""

    def __init__(self, cfg: AutoencoderConfig, kind: str, *, double_z: bool) -> None:
        super().__init__()
        if cfg.kind != kind:
            raise ValueError(f"model.autoencoder.kind={cfg.kind!r}: {type(self).__name__} needs kind {kind!r}")
        arch = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                    attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout,
                    resolution=cfg.resolution, z_channels=cfg.z_channels)
        self.encoder = Encoder(in_channels=cfg.in_channels, double_z=double_z, **arch)
        self.decoder = Decoder(out_ch=cfg.out_ch, **arch)
        self.in_channels = cfg.in_channels
        self.embed_dim = cfg.embed_dim
        self.latent_channels = cfg.latent_channels
        self.downsample_factor = cfg.downsample_factor
        self.scale_factor = float(cfg.scale_factor)
        self.shift_factor = float(cfg.shift_factor)

    def _checked_image(self, x: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"{type(self).__name__}.encode: input of shape {tuple(x.shape)}; expected "
                             f"(B, {self.in_channels}, H, W) with H and W divisible by {f}")
        return x

    def _checked_latent(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"{type(self).__name__}.decode: latent of shape {tuple(z.shape)}; expected "
                             f"(B, {self.embed_dim}, h, w)")
        return z


class AutoencoderKL(_ConvAutoencoder):
    """CompVis AutoencoderKL (networks only): encoder -> quant_conv -> posterior; z -> post_quant_conv
    -> decoder."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__(cfg, "kl", double_z=cfg.double_z)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(self._checked_image(x)))  # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self._checked_latent(z)))  # (B, out_ch, h*f, w*f)


class VectorQuantizer(nn.Module):
    """CompVis ``VectorQuantizer2`` at inference: each latent vector -> its nearest codebook vector
    (euclidean; ``torch.cdist`` as diffusers' ``VectorQuantizer``). No commitment loss or straight-through
    gradient: this project keeps a VQ first stage frozen. Rows are matched in chunks, so a batch of
    64x64 latents against 8192 codes never holds the full distance matrix."""

    CHUNK = 4096  # latent vectors per distance matrix (4096 x n_embed floats)

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, d, height, width = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        codes = self.embedding.weight.to(flat.dtype)  # (K, D)
        index = torch.cat([torch.cdist(chunk, codes).argmin(dim=1) for chunk in flat.split(self.CHUNK)])
        return codes[index].view(b, height, width, d).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)


class VQModel(_ConvAutoencoder):
    """CompVis ``VQModelInterface`` as latent diffusion uses it (``ldm/models/autoencoder.py``): encode ->
    ``quant_conv(encoder(x))``, the unquantized latent the diffusion model is trained on (a point mass: no
    posterior noise); decode -> quantize to the codebook, ``post_quant_conv``, decoder. Parameter names
    are CompVis', so ``first_stage_model.*`` of the paper's VQ-f4 checkpoints loads unchanged."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__(cfg, "vq", double_z=False)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        h = self.quant_conv(self.encoder(self._checked_image(x)))  # (B, embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution.point_mass(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantize(self._checked_latent(z))))  # (B, out_ch, h*f, w*f)


class IdentityFirstStage(_FirstStage):
    """Pixel space (f = 1), the paper's LDM-1: the "posterior" is a point mass at the image, so
    ``encode(x).sample()`` and ``.mode()`` return ``x`` exactly, no noise is drawn, and its KL is 0.
    Scale and shift are fixed at 1.0 and 0.0. No parameters."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.latent_channels = in_channels
        self.downsample_factor = 1
        self.scale_factor = 1.0
        self.shift_factor = 0.0

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"IdentityFirstStage.encode: input of shape {tuple(x.shape)}; expected "
                             f"(B, {self.in_channels}, H, W)")
        return DiagonalGaussianDistribution.point_mass(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return latent


def _field_default(name: str):
    return next(f.default for f in fields(AutoencoderConfig) if f.name == name)


def build_first_stage(cfg: AutoencoderConfig) -> nn.Module:
    """The first-stage network of ``cfg``, randomly initialised. Its pretrained weights
    (``cfg.checkpoint_path``, in our, CompVis' or diffusers' layout) are read by
    ``trainer.convert.first_stage.load_first_stage``."""
    if cfg.kind == "identity":
        ignored = [f"{k}={getattr(cfg, k)}" for k, identity_value in
                   (("scale_factor", 1.0), ("shift_factor", 0.0))
                   if getattr(cfg, k) not in (identity_value, _field_default(k))]
        if cfg.checkpoint_path is not None:
            ignored.append(f"checkpoint_path={cfg.checkpoint_path!r}")
        if ignored:
            warnings.warn(f"model.autoencoder.kind='identity' ignores {', '.join(ignored)} "
                          f"(pixel space uses scale 1.0, shift 0.0 and has no weights)")
        return IdentityFirstStage(cfg.in_channels)
    return VQModel(cfg) if cfg.kind == "vq" else AutoencoderKL(cfg)
