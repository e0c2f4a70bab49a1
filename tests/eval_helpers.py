"""Stand-ins for the evaluation networks' weights: same architectures, random values, written as
tensor-only state dicts (``torch.save`` of ``{name: tensor}``, loadable with ``weights_only=True``)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from eval.features import build_inception_v3
from trainer.images import atomic_write_bytes


def _save_state_dict(state: dict[str, torch.Tensor], path: Path) -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """torch-fidelity's FID Inception-v3 with seeded random weights, saved as a state dict at ``path``.

    Convolutions get He-normal weights and BatchNorm an identity-like transform (running mean ~0,
    var ~1), so that, unlike PyTorch's default initialisation, different images still give clearly
    different pool3 features after the ~90 layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_inception_v3()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module.state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = tensor[0].numel()
            tensor = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif name.endswith("running_mean"):
            tensor = 0.05 * torch.randn(tensor.shape, generator=generator)
        elif name.endswith("running_var"):
            tensor = 0.9 + 0.2 * torch.rand(tensor.shape, generator=generator)
        state[name] = tensor.clone()
    return _save_state_dict(state, Path(path))
