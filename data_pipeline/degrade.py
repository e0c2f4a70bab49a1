"""Super-resolution inputs made from the high-resolution image (issue 18; Rombach et al. 2022, Sec. 4.4).

Pure functions on float images in [-1, 1], either one image (3, H, W) or a batch (B, 3, H, W); the
output keeps the input's rank. Two degradations:

* ``bicubic`` (the default, the paper's SR setting): anti-aliased bicubic downsampling by ``factor``;
  deterministic, no generator.
* ``bsr_light``: a seeded light version of BSRGAN's degradation (Zhang et al., ICCV 2021), the family
  CompVis' ``degradation: bsr_light`` option draws from: a random Gaussian blur (isotropic or
  anisotropic), downsampling with a random interpolation, additive Gaussian noise and a JPEG round trip
  of random quality. Every random number comes from the ``torch.Generator`` the caller passes, one per
  sample (the sample's generator, keyed by its global position), so a resumed run redraws the same
  degradation.

Both give (.., 3, H // factor, W // factor) images clamped to [-1, 1]. ``bicubic_upsample`` is the
baseline (and the pixel-space concat input): bicubic interpolation back to full size.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DEGRADATIONS = ("bicubic", "bsr_light")
# bsr_light's ranges, after BSRGAN's degradation_bsrgan_variant scaled to a light setting: blur sigma in
# pixels of the high-res image, noise std in [-1, 1] units, JPEG quality in percent.
BLUR_SIGMA_RANGE = (0.2, 2.0)
NOISE_STD_RANGE = (0.0, 0.04)
JPEG_QUALITY_RANGE = (60, 95)
RESIZE_MODES = ("bilinear", "bicubic", "area")


def _as_batch(images: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """(3, H, W) or (B, 3, H, W) float -> (B, 3, H, W) and whether the input was a single image."""
    if images.ndim not in (3, 4) or not images.is_floating_point():
        raise ValueError(f"{what}: images of shape {tuple(images.shape)} and dtype {images.dtype}; expected "
                         f"float (3, H, W) or (B, 3, H, W) in [-1, 1]")
    return (images.unsqueeze(0), True) if images.ndim == 3 else (images, False)


def check_factor(factor: int, height: int, width: int, key: str = "factor") -> None:
    """The downsampling factor must be a positive integer dividing both sides."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{key}={factor!r}; expected an integer >= 1")
    if height % factor or width % factor:
        raise ValueError(f"{key}={factor}: images of {height}x{width} px; expected both sides divisible by it")


def bicubic_downsample(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Anti-aliased bicubic downsampling by ``factor`` (PIL's BICUBIC resize up to float rounding):
    (.., 3, H, W) -> (.., 3, H // factor, W // factor), clamped to [-1, 1]."""
    batch, single = _as_batch(images, "bicubic_downsample")
    height, width = batch.shape[-2:]
    check_factor(factor, height, width)
    low = F.interpolate(batch.float(), size=(height // factor, width // factor), mode="bicubic",
                        align_corners=False, antialias=True).clamp(-1.0, 1.0).to(batch.dtype)
    return low[0] if single else low


def bicubic_upsample(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Bicubic upsampling by ``factor``: (.., 3, h, w) -> (.., 3, h * factor, w * factor) in [-1, 1].
    The super-resolution baseline, and the pixel-space model's concat input."""
    batch, single = _as_batch(images, "bicubic_upsample")
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor={factor!r}; expected an integer >= 1")
    high = F.interpolate(batch.float(), scale_factor=factor, mode="bicubic",
                         align_corners=False).clamp(-1.0, 1.0).to(batch.dtype)
    return high[0] if single else high


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _gaussian_kernel(generator: torch.Generator, factor: int) -> torch.Tensor:
    """A random (possibly anisotropic, rotated) Gaussian blur kernel, (k, k) summing to 1."""
    sigma_x = _uniform(generator, *BLUR_SIGMA_RANGE) * factor / 4
    anisotropic = bool(torch.rand((), generator=generator) < 0.5)
    sigma_y = _uniform(generator, *BLUR_SIGMA_RANGE) * factor / 4 if anisotropic else sigma_x
    angle = _uniform(generator, 0.0, math.pi)
    radius = max(1, int(math.ceil(3 * max(sigma_x, sigma_y))))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    kernel = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (kernel / kernel.sum()).float()


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip through PIL of one (3, h, w) image in [-1, 1] (quantised to uint8)."""
    rgb = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def bsr_light(image: torch.Tensor, factor: int, generator: torch.Generator) -> torch.Tensor:
    """One image's light BSR degradation: (3, H, W) -> (3, H // factor, W // factor) in [-1, 1].

    The draws, in order: the blur kernel (sigma x, anisotropy, sigma y, angle), the resize mode, the
    noise std and the noise, the JPEG quality; all from ``generator``.
    """
    if image.ndim != 3:
        raise ValueError(f"bsr_light: an image of shape {tuple(image.shape)}; expected one (3, H, W) image")
    height, width = image.shape[-2:]
    check_factor(factor, height, width)
    x = image.detach().to("cpu", torch.float32).unsqueeze(0)  # (1, 3, H, W)
    kernel = _gaussian_kernel(generator, factor)
    pad = kernel.shape[-1] // 2
    weight = kernel.view(1, 1, *kernel.shape).expand(3, 1, *kernel.shape)
    x = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < min(height, width) else "replicate"),
                 weight, groups=3)
    mode = RESIZE_MODES[int(torch.randint(0, len(RESIZE_MODES), (), generator=generator))]
    size = (height // factor, width // factor)
    if mode == "area":
        x = F.interpolate(x, size=size, mode="area")
    else:
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    noise_std = _uniform(generator, *NOISE_STD_RANGE)
    x = x + noise_std * torch.randn(x.shape, generator=generator)
    quality = int(torch.randint(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1, (), generator=generator))
    low = _jpeg(x[0], quality)  # (3, h, w)
    return low.clamp(-1.0, 1.0).to(image.dtype).to(image.device)


def degrade(images: torch.Tensor, factor: int = 4, kind: str = "bicubic",
            generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """The super-resolution input of each image: (.., 3, H, W) -> (.., 3, H // factor, W // factor).

    ``bicubic`` ignores ``generators``; ``bsr_light`` needs one generator per image (a batch's
    ``SampleGenerators.generators``), so that each sample's degradation depends on its position only.
    """
    if kind not in DEGRADATIONS:
        raise ValueError(f"degradation={kind!r}; expected one of {list(DEGRADATIONS)}")
    if kind == "bicubic":
        return bicubic_downsample(images, factor)
    batch, single = _as_batch(images, "degrade")
    if generators is None or len(generators) != batch.shape[0]:
        count = None if generators is None else len(generators)
        raise ValueError(f"degradation=bsr_light: {batch.shape[0]} images and {count} generators; expected one "
                         f"generator per image")
    low = torch.stack([bsr_light(image, factor, g) for image, g in zip(batch, generators)])
    return low[0] if single else low
