"""Super-resolution and inpainting metrics as pure functions on tensors (issue 18, item 4).

Images are float (B, 3, H, W) in [-1, 1] (the models' range); masks (B, 1, H, W) in {0, 1} with 1 where
the image was filled. Feature extraction (FID's features) is the caller's: FID here takes the (N, D)
features of ``eval.features`` and goes through ``eval.metrics``.

* Super-resolution (Rombach et al. 2022, Sec. 4.4, Tab. 5): PSNR and SSIM of the model's output against
  the held-out high-resolution image, with the bicubic upsampling of the same low-resolution input as a
  baseline row, and FID of outputs and of the baseline against the high-resolution images.
* Inpainting (Sec. 4.5, Tab. 7): FID of completions against the originals, and LPIPS on the masked
  region: the completion is composited into the original (kept pixels from the original, as an inpainting
  pipeline returns it) so that only the filled region differs, then LPIPS compares it with the original.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from eval.image_metrics import psnr, ssim
from eval.metrics import Features, feature_stats, frechet_distance

SIGNED_RANGE = 2.0  # data_range of images in [-1, 1]


def _check_images(reference: torch.Tensor, output: torch.Tensor, what: str) -> None:
    if reference.shape != output.shape or reference.ndim != 4 or not reference.is_floating_point():
        raise ValueError(f"{what}: reference {tuple(reference.shape)} {reference.dtype} and output "
                         f"{tuple(output.shape)} {output.dtype}; expected float (B, C, H, W) of one shape in [-1, 1]")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (the feature extractors' input), -1 -> 0 and 1 -> 255."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def superres_scores(high: torch.Tensor, output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of ``output`` against ``high``: {"psnr": (B,), "ssim": (B,)} float64.
    Computed on the uint8-quantised images, as images are saved and as the paper's numbers are."""
    _check_images(high, output, "superres_scores")
    high_u8, output_u8 = to_uint8(high), to_uint8(output)
    return {"psnr": psnr(high_u8, output_u8), "ssim": ssim(high_u8, output_u8)}


def fid_of(reference_features: Features, output_features: Features) -> float:
    """FID between two (N, D) feature sets (N >= 2 each)."""
    return frechet_distance(feature_stats(reference_features), feature_stats(output_features))


def superres_table(high: torch.Tensor, output: torch.Tensor, baseline: torch.Tensor, *,
                   features: Optional[dict[str, Features]] = None) -> dict[str, dict[str, Any]]:
    """Rows "model" and "bicubic": mean PSNR, mean SSIM and (with ``features`` holding "high", "model" and
    "bicubic" (N, D) features) FID against the high-resolution images; ``num_images`` in each row."""
    rows: dict[str, dict[str, Any]] = {}
    for name, images in (("model", output), ("bicubic", baseline)):
        scores = superres_scores(high, images)
        fid = None if features is None else fid_of(features["high"], features[name])
        rows[name] = {"psnr": float(scores["psnr"].mean()), "ssim": float(scores["ssim"].mean()), "fid": fid,
                      "num_images": int(high.shape[0])}
    return rows


def composite(original: torch.Tensor, completion: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The completion inside the mask, the original outside it: (B, C, H, W)."""
    _check_images(original, completion, "composite")
    if masks.shape != (original.shape[0], 1, *original.shape[-2:]):
        raise ValueError(f"composite: masks of shape {tuple(masks.shape)}; expected (B, 1, H, W) = "
                         f"{(original.shape[0], 1, *original.shape[-2:])}")
    masks = masks.to(original.dtype)
    return completion * masks + original * (1.0 - masks)


def masked_lpips(lpips: torch.nn.Module, original: torch.Tensor, completion: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
    """LPIPS of the composited completion against the original, per image: (B,) float64. Pixels outside
    the mask are the original's, so the distance comes from the filled region only."""
    filled = composite(original, completion, masks)
    device = next(lpips.parameters()).device
    with torch.no_grad():
        distance = lpips(original.float().to(device), filled.float().to(device))  # (B, 1, 1, 1)
    return distance.flatten().to("cpu", torch.float64)


def masked_psnr(original: torch.Tensor, completion: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) over the masked pixels only, per image: (B,) float64 (images with an empty mask: nan)."""
    _check_images(original, completion, "masked_psnr")
    masks = masks.to(torch.float64)
    diff = ((original.to(torch.float64) - completion.to(torch.float64)) ** 2 * masks).sum(dim=(1, 2, 3))
    count = masks.sum(dim=(1, 2, 3)) * original.shape[1]
    mse = diff / count
    return 10.0 * torch.log10(SIGNED_RANGE**2 / mse)
