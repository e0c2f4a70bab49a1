"""FID, KID and CLIP score as pure functions on features and embeddings (issue 7).

Nothing here extracts features, loads a model or gathers across ranks: callers hand in the
(N, D) features of ``eval.features`` and the (B, E) embeddings of ``eval.clip_score``. The
arithmetic is torchmetrics' own (``_compute_fid``, ``poly_mmd``), run in float64, so numbers
are comparable with torchmetrics / torch-fidelity / pytorch-fid reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

Features = Union[np.ndarray, torch.Tensor]  # (N, D)


@dataclass(frozen=True)
class FeatureStats:
    """The Gaussian FID compares: mean (D,) and unbiased covariance (D, D) of N features."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_samples: int

    def __post_init__(self) -> None:
        dim = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if dim < 1 or self.sigma.shape != (dim, dim):
            raise ValueError(f"FeatureStats: mu has shape {self.mu.shape} and sigma {self.sigma.shape}; "
                             "expected (D,) and (D, D)")

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def _as_float64_numpy(features: Features, what: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{what} has shape {arr.shape}; expected (N, D)")
    return arr


def _as_float64_tensor(features: Features, what: str) -> torch.Tensor:
    return torch.from_numpy(_as_float64_numpy(features, what))


def feature_stats(features: Features) -> FeatureStats:
    """Mean and unbiased covariance (``np.cov(rowvar=False)``, as pytorch-fid and torchmetrics) of
    (N, D) features, N >= 2."""
    arr = _as_float64_numpy(features, "features")  # (N, D)
    if arr.shape[0] < 2:
        raise ValueError(f"feature_stats needs at least 2 samples for a covariance; got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError("features contain NaN or inf; check the feature extractor's input range")
    sigma = np.atleast_2d(np.cov(arr, rowvar=False))  # (D, D)
    return FeatureStats(mu=arr.mean(axis=0), sigma=sigma, num_samples=int(arr.shape[0]))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b) (Heusel et al. 2017, FID):
    ||mu_a - mu_b||^2 + Tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)).

    torchmetrics' ``_compute_fid`` in float64: the trace of the square root is the sum of the
    square roots of the eigenvalues of sigma_a @ sigma_b, which stays well defined when a
    covariance is singular (fewer samples than dimensions), where ``scipy.linalg.sqrtm`` needs
    pytorch-fid's diagonal offset.
    """
    if a.dim != b.dim:
        raise ValueError(f"frechet_distance: feature dimensions differ: {a.dim} vs {b.dim}; both "
                         "statistics must come from the same feature extractor")
    fid = _compute_fid(torch.from_numpy(a.mu), torch.from_numpy(a.sigma),
                       torch.from_numpy(b.mu), torch.from_numpy(b.sigma))
    return float(fid)


def kid(features_a: Features, features_b: Features, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the cubic
    polynomial kernel (x.y / D + 1)^3, averaged over ``num_subsets`` random subsets of
    ``subset_size`` samples of each set; returns (mean, std) as torchmetrics does (population std).

    Subsets are drawn like torchmetrics' ``KernelInceptionDistance.compute`` (a ``randperm`` of
    ``features_a`` then of ``features_b`` per subset) but from a generator seeded with ``seed``,
    so the result is reproducible. ``subset_size`` is clipped to the smaller set.
    """
    fa = _as_float64_tensor(features_a, "features_a")  # (Na, D)
    fb = _as_float64_tensor(features_b, "features_b")  # (Nb, D)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"kid: feature dimensions differ: {fa.shape[1]} vs {fb.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"kid: num_subsets={num_subsets!r} must be >= 1")
    size = min(subset_size, fa.shape[0], fb.shape[0])
    if size < 2:
        raise ValueError(f"kid: subset size {size} (subset_size={subset_size}, {fa.shape[0]} and "
                         f"{fb.shape[0]} samples) must be >= 2 for the unbiased MMD estimate")
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(num_subsets):
        idx_a = torch.randperm(fa.shape[0], generator=generator)[:size]
        idx_b = torch.randperm(fb.shape[0], generator=generator)[:size]
        scores.append(poly_mmd(fa[idx_a], fb[idx_b]))
    stacked = torch.stack(scores)
    return float(stacked.mean()), float(stacked.std(unbiased=False))


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score 100 * max(cos(image, text), 0), (B,) — the definition of torchmetrics'
    ``CLIPScore`` and the Stable Diffusion model cards (Hessel et al. 2021 with w = 100)."""
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"clip_score: image embeddings {tuple(image_embeds.shape)} and text embeddings "
                         f"{tuple(text_embeds.shape)} must both be (B, E) with the same shape")
    image = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    text = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    return (100 * (image * text).sum(dim=-1)).clamp(min=0)  # (B,)
