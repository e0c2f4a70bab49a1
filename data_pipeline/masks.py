"""Inpainting masks drawn per sample, and the SD-inpainting input layout (issue 18; Rombach et al. 2022,
Sec. 4.5).

A mask is float (1, H, W) with 1 where the image is to be filled and 0 where it is kept. Two kinds:

* ``strokes_boxes`` (training): large random strokes and boxes after LaMa's mask generator (Suvorov et
  al., WACV 2022; the setup the paper's inpainting model follows): thick and medium polylines with
  round joints, plus a few boxes, redrawn until the masked fraction lies in
  ``[min_coverage, max_coverage]``.
* ``half`` (the demo): the left, right, top or bottom half, the side drawn per sample.

Every random number comes from the ``torch.Generator`` passed in (the sample's generator, keyed by its
global position), so the same generator state gives the same mask and a resumed run redraws it.

The model input follows SD-inpainting: masked image = image * (1 - mask); the UNet takes
cat(noisy latent, mask at the latent size, latent of the masked image) -- 4 + 1 + 4 channels for SD
(CompVis ``LatentInpaintDiffusion`` concat_keys ("mask", "masked_image"); diffusers'
``StableDiffusionInpaintPipeline`` concatenates in the same order), 3 + 1 + 3 for the pixel-space demo.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

MASK_KINDS = ("strokes_boxes", "half")
HALF_SIDES = ("left", "right", "top", "bottom")
# LaMa's "thick" and "medium" irregular masks, as fractions of the image side: stroke width, vertex
# step length, vertices per stroke; and box sides.
STROKE_WIDTH_RANGE = (0.06, 0.2)
STROKE_STEP_RANGE = (0.1, 0.35)
MAX_VERTICES = 5
BOX_SIDE_RANGE = (0.15, 0.5)
MAX_TRIES = 16  # redraws before the closest-to-range mask is returned


def check_coverage(min_coverage: float, max_coverage: float) -> None:
    if not (0.0 < min_coverage <= max_coverage <= 1.0):
        raise ValueError(f"mask coverage [{min_coverage!r}, {max_coverage!r}]; expected "
                         f"0 < min_coverage <= max_coverage <= 1")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _draw_stroke(draw: ImageDraw.ImageDraw, generator: torch.Generator, height: int, width: int) -> None:
    side = min(height, width)
    line_width = max(1, round(_uniform(generator, *STROKE_WIDTH_RANGE) * side))
    x, y = _uniform(generator, 0, width), _uniform(generator, 0, height)
    for _ in range(_randint(generator, 1, MAX_VERTICES)):
        angle = _uniform(generator, 0.0, 2 * math.pi)
        step = _uniform(generator, *STROKE_STEP_RANGE) * side
        nx = min(max(x + step * math.cos(angle), 0.0), width - 1.0)
        ny = min(max(y + step * math.sin(angle), 0.0), height - 1.0)
        draw.line([(x, y), (nx, ny)], fill=255, width=line_width)
        r = line_width / 2
        draw.ellipse([nx - r, ny - r, nx + r, ny + r], fill=255)
        x, y = nx, ny


def _draw_box(draw: ImageDraw.ImageDraw, generator: torch.Generator, height: int, width: int) -> None:
    box_w = _uniform(generator, *BOX_SIDE_RANGE) * width
    box_h = _uniform(generator, *BOX_SIDE_RANGE) * height
    x0 = _uniform(generator, 0, width - box_w)
    y0 = _uniform(generator, 0, height - box_h)
    draw.rectangle([x0, y0, x0 + box_w - 1, y0 + box_h - 1], fill=255)


def strokes_boxes_mask(height: int, width: int, generator: torch.Generator, *, min_coverage: float = 0.1,
                       max_coverage: float = 0.5) -> torch.Tensor:
    """A LaMa-style mask (1, H, W) in {0, 1} whose masked fraction lies in [min_coverage, max_coverage].

    A target fraction is drawn uniformly from the range, then shapes are added (a stroke, or a box with
    probability 1/3) until the masked fraction reaches it; a mask that overshoots ``max_coverage`` is redrawn, up to ``MAX_TRIES`` times, after
    which the drawn mask closest to the range is returned (only very small images get there).
    """
    check_coverage(min_coverage, max_coverage)
    best, best_gap = None, math.inf
    for _ in range(MAX_TRIES):
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        coverage, target = 0.0, _uniform(generator, min_coverage, max_coverage)
        while coverage < target:
            if float(torch.rand((), generator=generator)) < 1 / 3:
                _draw_box(draw, generator, height, width)
            else:
                _draw_stroke(draw, generator, height, width)
            coverage = float((np.asarray(canvas) > 0).mean())
        mask = torch.from_numpy((np.asarray(canvas) > 0).astype(np.float32)).unsqueeze(0)  # (1, H, W)
        if coverage <= max_coverage:
            return mask
        gap = coverage - max_coverage
        if gap < best_gap:
            best, best_gap = mask, gap
    assert best is not None
    return best


def half_mask(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """The left, right, top or bottom half masked (the side drawn from ``generator``): (1, H, W)."""
    side = HALF_SIDES[_randint(generator, 0, len(HALF_SIDES) - 1)]
    mask = torch.zeros(1, height, width)
    if side == "left":
        mask[..., : width // 2] = 1.0
    elif side == "right":
        mask[..., width // 2:] = 1.0
    elif side == "top":
        mask[..., : height // 2, :] = 1.0
    else:
        mask[..., height // 2:, :] = 1.0
    return mask


def draw_masks(generators: Sequence[torch.Generator], height: int, width: int, kind: str = "strokes_boxes", *,
               min_coverage: float = 0.1, max_coverage: float = 0.5) -> torch.Tensor:
    """One mask per generator (per sample): (B, 1, H, W) float in {0, 1}."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind={kind!r}; expected one of {list(MASK_KINDS)}")
    if kind == "half":
        masks = [half_mask(height, width, g) for g in generators]
    else:
        masks = [strokes_boxes_mask(height, width, g, min_coverage=min_coverage, max_coverage=max_coverage)
                 for g in generators]
    return torch.stack(masks)


def masked_images(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """SD-inpainting's masked image: images (B, C, H, W) in [-1, 1] with the masked pixels set to 0."""
    if images.ndim != 4 or masks.shape != (images.shape[0], 1, *images.shape[-2:]):
        raise ValueError(f"images of shape {tuple(images.shape)} and masks of shape {tuple(masks.shape)}; "
                         f"expected (B, C, H, W) and (B, 1, H, W)")
    return images * (1.0 - masks.to(images.dtype))


def mask_at(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (B, 1, H, W) resized to the latent size (B, 1, h, w), nearest as diffusers'
    StableDiffusionInpaintPipeline does, so a model trained here sees what that pipeline feeds it."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks of shape {tuple(masks.shape)}; expected (B, 1, H, W)")
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=size, mode="nearest")
