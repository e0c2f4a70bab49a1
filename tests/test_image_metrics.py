"""PSNR and SSIM per image against scikit-image (peak_signal_noise_ratio, structural_similarity in
the Wang et al. 2004 setting), on random and structured pairs, uint8 and float, odd sizes."""

import math

import numpy as np
import pytest
import torch

from eval.image_metrics import psnr, ssim

metrics = pytest.importorskip("skimage.metrics")

TOL = 1e-4
SIZES = [(11, 11), (16, 16), (13, 29), (32, 21), (64, 47)]  # (H, W); 11 is the window size


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    return metrics.structural_similarity(a, b, data_range=data_range, channel_axis=-1,
                                         gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _reference(x: torch.Tensor, y: torch.Tensor, data_range: float) -> tuple[list[float], list[float]]:
    """skimage per image, on (H, W, C) numpy arrays of the tensors' own dtype."""
    values_psnr, values_ssim = [], []
    for a, b in zip(x.permute(0, 2, 3, 1).numpy(), y.permute(0, 2, 3, 1).numpy()):
        with np.errstate(divide="ignore"):  # identical images: mse 0 -> inf
            values_psnr.append(float(metrics.peak_signal_noise_ratio(a, b, data_range=data_range)))
        values_ssim.append(float(_skimage_ssim(a, b, data_range)))
    return values_psnr, values_ssim


def _structured(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """(4, 3, H, W) float64 in [0, 1]: gradient, checkerboard, constant, sinusoid."""
    rows = torch.linspace(0, 1, height, dtype=torch.float64).view(-1, 1)
    cols = torch.linspace(0, 1, width, dtype=torch.float64).view(1, -1)
    gradient = (rows + cols) / 2
    checker = ((torch.arange(height).view(-1, 1) // 3 + torch.arange(width).view(1, -1) // 3) % 2).double()
    constant = torch.full((height, width), 0.3, dtype=torch.float64)
    sinus = 0.5 + 0.5 * torch.sin(rows * 9.0) * torch.cos(cols * 5.0)
    base = torch.stack([gradient, checker, constant, sinus])  # (4, H, W)
    channel_gain = torch.rand(4, 3, 1, 1, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    return base.unsqueeze(1) * channel_gain


def _pairs(height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random and structured images and distorted copies (noise, shift, blur-ish, gain), float64."""
    gen = torch.Generator().manual_seed(seed)
    random = torch.rand(3, 3, height, width, generator=gen, dtype=torch.float64)
    x = torch.cat([random, _structured(height, width, gen)])  # (7, 3, H, W)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y = torch.stack([
        x[0] + 0.05 * noise[0],
        torch.roll(x[1], shifts=(1, 2), dims=(1, 2)),
        torch.rand(3, height, width, generator=gen, dtype=torch.float64),  # unrelated image
        0.8 * x[3] + 0.1,
        x[4] + 0.2 * noise[4],
        x[5] + 0.01 * noise[5],  # constant + slight noise
        (x[6] + torch.roll(x[6], 1, dims=2)) / 2,
    ])
    return x, y.clamp(0, 1)


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_float_images_match_skimage(height, width, dtype):
    x, y = _pairs(height, width, seed=height * 100 + width)
    x, y = x.to(dtype), y.to(dtype)
    ref_psnr, ref_ssim = _reference(x, y, 1.0)
    ours_psnr, ours_ssim = psnr(x, y), ssim(x, y)
    assert ours_psnr.dtype == ours_ssim.dtype == torch.float64
    assert ours_psnr.shape == ours_ssim.shape == (x.shape[0],)
    np.testing.assert_allclose(ours_psnr.numpy(), ref_psnr, rtol=0, atol=TOL)
    np.testing.assert_allclose(ours_ssim.numpy(), ref_ssim, rtol=0, atol=TOL)
    # The pairs span a real range of similarity, so agreement is not agreement on a constant.
    assert min(ref_ssim) < 0.3 and max(ref_ssim) > 0.9


@pytest.mark.parametrize("height,width", SIZES)
def test_uint8_images_match_skimage(height, width):
    x, y = _pairs(height, width, seed=7 + height + width)
    x8, y8 = (x * 255).round().to(torch.uint8), (y * 255).round().to(torch.uint8)
    ref_psnr, ref_ssim = _reference(x8, y8, 255)
    np.testing.assert_allclose(psnr(x8, y8).numpy(), ref_psnr, rtol=0, atol=TOL)
    np.testing.assert_allclose(ssim(x8, y8).numpy(), ref_ssim, rtol=0, atol=TOL)
    # Explicit data_range: the same number, and uint8 equals its float image on [0, 1].
    np.testing.assert_allclose(ssim(x8, y8, data_range=255).numpy(), ref_ssim, rtol=0, atol=TOL)
    x_unit, y_unit = x8.double() / 255, y8.double() / 255
    np.testing.assert_allclose(ssim(x_unit, y_unit).numpy(), ref_ssim, rtol=0, atol=TOL)
    np.testing.assert_allclose(psnr(x_unit, y_unit).numpy(), ref_psnr, rtol=0, atol=TOL)


def test_other_data_range_matches_skimage():
    x, y = _pairs(20, 17, seed=3)
    x, y = x * 2 - 1, y * 2 - 1  # [-1, 1] images: data_range 2
    ref_psnr, ref_ssim = _reference(x, y, 2.0)
    np.testing.assert_allclose(psnr(x, y, data_range=2.0).numpy(), ref_psnr, rtol=0, atol=TOL)
    np.testing.assert_allclose(ssim(x, y, data_range=2.0).numpy(), ref_ssim, rtol=0, atol=TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_identical_images(dtype):
    x, _ = _pairs(15, 19, seed=5)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    values_psnr, values_ssim = psnr(x, x.clone()), ssim(x, x.clone())
    assert torch.isinf(values_psnr).all() and (values_psnr > 0).all()
    torch.testing.assert_close(values_ssim, torch.ones_like(values_ssim), rtol=0, atol=1e-12)
    ref_psnr, ref_ssim = _reference(x, x.clone(), 255 if dtype == torch.uint8 else 1.0)
    assert all(math.isinf(v) for v in ref_psnr)
    np.testing.assert_allclose(ref_ssim, 1.0, atol=1e-6)


def test_psnr_hand_value():
    x = torch.zeros(1, 1, 11, 11, dtype=torch.float64)
    y = x + 0.1  # mse 0.01 -> 10 * log10(1 / 0.01) = 20 dB
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-12)


def test_batch_equals_one_at_a_time():
    x, y = _pairs(23, 31, seed=11)
    batch_psnr, batch_ssim = psnr(x, y), ssim(x, y)
    single_psnr = torch.cat([psnr(x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])])
    single_ssim = torch.cat([ssim(x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(batch_psnr, single_psnr, rtol=0, atol=1e-12)
    torch.testing.assert_close(batch_ssim, single_ssim, rtol=0, atol=1e-12)
    assert len(set(batch_ssim.tolist())) == x.shape[0]  # per-image values, not one batch value


def test_ssim_channels_are_averaged():
    x, y = _pairs(16, 16, seed=13)
    per_channel = torch.stack([ssim(x[:, c:c + 1], y[:, c:c + 1]) for c in range(3)], dim=1)
    torch.testing.assert_close(ssim(x, y), per_channel.mean(dim=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_invalid_inputs(metric):
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="shapes"):
        metric(x, x[:1])
    with pytest.raises(ValueError, match="shapes"):
        metric(x[0], x[0])
    with pytest.raises(ValueError, match="dtypes"):
        metric(x, x.double())
    with pytest.raises(ValueError, match="dtypes"):
        metric(x.to(torch.int32), x.to(torch.int32))
    with pytest.raises(ValueError, match="data_range"):
        metric(x, x, data_range=0.0)


def test_ssim_rejects_images_smaller_than_the_window():
    x = torch.rand(1, 3, 10, 32)
    with pytest.raises(ValueError, match="10x32"):
        ssim(x, x)
