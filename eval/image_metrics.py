"""Full-reference image metrics for autoencoder reconstructions: PSNR and SSIM, per image.

Pure functions on (B, C, H, W) tensors, computed in float64. Float images are taken to span
``data_range`` 1.0 and uint8 images 255 unless ``data_range`` says otherwise (scikit-image's
convention). SSIM is the Wang et al. (IEEE TIP 2004) setting and equals
``skimage.metrics.structural_similarity(a, b, data_range=..., channel_axis=-1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`` on each (H, W, C) image.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
# scikit-image truncates its Gaussian at 3.5 sigma: radius int(3.5 * 1.5 + 0.5) = 5, an 11-tap window
# as in Wang et al. 2004.
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _prepare(x: torch.Tensor, y: torch.Tensor, data_range: Optional[float], name: str
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{name}: images of shapes {tuple(x.shape)} and {tuple(y.shape)}; expected "
                         f"two tensors of one shape (B, C, H, W)")
    if x.dtype != y.dtype or not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"{name}: dtypes {x.dtype} and {y.dtype}; expected both uint8 or both float")
    if data_range is None:
        data_range = 255.0 if x.dtype == torch.uint8 else 1.0
    if not math.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"{name}: data_range={data_range!r}; expected a finite number > 0")
    return x.to(torch.float64), y.to(torch.float64), float(data_range)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: Optional[float] = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 * log10(data_range^2 / MSE) in dB. (B,) float64;
    identical images give +inf."""
    x, y, data_range = _prepare(x, y, data_range, "psnr")
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_taps(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    """scipy.ndimage's normalised 1-D Gaussian kernel (``_gaussian_kernel1d``)."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: Optional[float] = None) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004), averaged over channels. (B,) float64.

    Local statistics use an 11x11 Gaussian window (sigma 1.5) and population covariances. scikit-image
    filters the whole image with reflected borders, then drops a border of (win_size - 1) // 2 pixels
    before averaging; the pixels left are exactly those whose window lies inside the image, so a
    convolution without padding gives the same map. H and W must be at least the window size.
    """
    x, y, data_range = _prepare(x, y, data_range, "ssim")
    taps = _gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE, x.device)
    win_size = taps.numel()
    height, width = x.shape[-2:]
    if height < win_size or width < win_size:
        raise ValueError(f"ssim: images of {height}x{width} px; expected both sides >= the "
                         f"{win_size}-px Gaussian window")
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    groups = stats.shape[1]
    stats = F.conv2d(stats, taps.view(1, 1, 1, -1).expand(groups, 1, 1, win_size), groups=groups)
    stats = F.conv2d(stats, taps.view(1, 1, -1, 1).expand(groups, 1, win_size, 1), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.chunk(5, dim=1)  # each (B, C, H - 10, W - 10)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
    return ssim_map.mean(dim=(1, 2, 3))  # channel means have equal weight, as skimage averages them
