"""Image helpers for sample grids: float tensors in a value range -> uint8 arrays -> PNG files."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image


def to_uint8(images: torch.Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
    """Map a float batch (N, C, H, W) with C in {1, 3} to uint8 (N, H, W, 3).

    `value_range=(lo, hi)` maps lo -> 0 and hi -> 255; values outside are clamped. The rounding
    (scale to [0, 255], then round) matches diffusers' `VaeImageProcessor.pt_to_numpy` + `numpy_to_pil`
    and CompVis' `ldm/models/diffusion/ddpm.py` image logging, so our grids equal theirs bit for bit.
    """
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range={tuple(value_range)!r} is invalid; allowed: (lo, hi) with hi > lo")
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images.shape={tuple(images.shape)} is invalid; allowed: (N, C, H, W) with C in (1, 3)")
    x = images.detach().to(device="cpu", dtype=torch.float32)  # (N, C, H, W)
    x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB; a no-op for C == 3
    return x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3)


def tile_uint8(batch: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile a uint8 batch (N, H, W, 3) into one (H', W', 3) image, `nrow` images per row.

    Layout follows `torchvision.utils.make_grid`: `padding` black pixels around and between
    images, so H' = rows * (H + padding) + padding and W' = nrow * (W + padding) + padding.
    """
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"batch of shape {batch.shape} and dtype {batch.dtype} is invalid; "
                         f"allowed: uint8 (N, H, W, 3)")
    num_images, height, width, _ = batch.shape
    if num_images == 0:
        raise ValueError("images is empty; allowed: at least one image")
    if nrow is None:
        nrow = math.ceil(math.sqrt(num_images))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow={nrow!r} is invalid; allowed: an int >= 1 or None")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding={padding!r} is invalid; allowed: an int >= 0")
    ncol = min(nrow, num_images)
    num_rows = math.ceil(num_images / ncol)
    grid = np.zeros((num_rows * (height + padding) + padding, ncol * (width + padding) + padding, 3), np.uint8)
    for i in range(num_images):
        row, col = divmod(i, ncol)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top:top + height, left:left + width] = batch[i]
    return grid


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2,
              value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
    """Float batch (N, C, H, W) in `value_range` -> one uint8 grid (H', W', 3); nrow defaults to ceil(sqrt(N))."""
    return tile_uint8(to_uint8(images, value_range), nrow=nrow, padding=padding)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so readers see either the old file or the whole new one, never a torn file.

    The bytes go to `<path>.tmp-<pid>` in the same directory (same filesystem, so `os.replace` is an
    atomic rename) and are fsynced before the rename, so a crash cannot leave an empty file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def put_bytes(url: str, data: bytes) -> str:
    """Write ``data`` to a local path (``atomic_write_bytes``) or an fsspec URL (one PUT, which object
    stores make visible whole). Returns ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        atomic_write_bytes(path, data)
    else:
        fs.pipe_file(path, data)
    return url


def save_png(array_hwc_uint8: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a uint8 (H, W, 3) array as PNG, atomically; parent directories are created."""
    array = np.asarray(array_hwc_uint8)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"array of shape {array.shape} and dtype {array.dtype} is invalid; "
                         f"allowed: uint8 (H, W, 3)")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
