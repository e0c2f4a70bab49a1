"""Reference statistics for FID: computed once per (source content, feature extractor, resolution)
and cached as ``<cache_dir>/<key>.npz`` (mu, sigma, num_samples) beside ``<key>.json``.

A source is one of

* a ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid / torch-fidelity format; used as is);
* a directory of images (png / jpg / jpeg / webp, recursive, sorted by relative path);
* webdataset shards: a brace pattern, glob or list file (``data_pipeline.sources.expand_urls``).

Every image is converted to RGB, center-cropped to a square, resized to ``resolution`` with PIL
bicubic and handed to the extractor as uint8 (B, 3, R, R). Undecodable images are skipped and
counted. The cache key hashes what the statistics depend on: the source's content listing
(directory: relative path, size and sha256 of every file; shards: URL, size and ETag or mtime),
the extractor's ``describe()`` and the resolution; so an edited image or other weights give a
new key, while moving a directory does not.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from data_pipeline.decode import DECODE_ERRORS
from data_pipeline.shards import ShardTask, read_samples
from data_pipeline.sources import RetryPolicy, expand_urls, filesystem, storage_options_for
from eval.metrics import FeatureStats
from trainer.images import atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the first present part of a sample is its image
CACHE_VERSION = 1
# Refuse decompression bombs before decoding (as data_pipeline.decode does for training).
MAX_PIXELS = 8192 * 8192


class RunningStats:
    """Mean and unbiased covariance of features seen batch by batch, in float64, without keeping
    them: batches are merged with Chan et al.'s parallel update, which stays accurate where
    accumulating raw sums of outer products loses digits to cancellation."""

    def __init__(self, dim: int) -> None:
        self.num_samples = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros((dim, dim))  # sum of outer products of deviations from the mean

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)  # (b, D)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features of shape {x.shape}; expected (b, {self.mean.shape[0]})")
        if not np.isfinite(x).all():
            raise ValueError("the feature extractor returned NaN or inf")
        b = x.shape[0]
        if b == 0:
            return
        batch_mean = x.mean(axis=0)
        centered = x - batch_mean
        delta = batch_mean - self.mean
        total = self.num_samples + b
        self.m2 += centered.T @ centered + np.outer(delta, delta) * (self.num_samples * b / total)
        self.mean = self.mean + delta * (b / total)
        self.num_samples = total

    def stats(self) -> FeatureStats:
        if self.num_samples < 2:
            raise ValueError(f"a covariance needs at least 2 samples; got {self.num_samples}")
        return FeatureStats(mu=self.mean.copy(), sigma=self.m2 / (self.num_samples - 1),
                            num_samples=self.num_samples)


# ----------------------------------------------------------------------------- images


def square_rgb(data: bytes, resolution: int) -> np.ndarray:
    """Image bytes -> (resolution, resolution, 3) uint8: RGB, center crop to a square, PIL bicubic.
    Raises one of ``DECODE_ERRORS`` (or ``Image.DecompressionBombError``) for bytes PIL cannot read."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise Image.DecompressionBombError(f"{width}x{height} is over {MAX_PIXELS} pixels")
        rgb = img.convert("RGB")
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def decoded_images(images: Iterable[tuple[str, bytes]], resolution: int, skipped: Counter) -> Iterator[np.ndarray]:
    """(name, encoded bytes) -> ``square_rgb`` uint8 (R, R, 3) images; undecodable ones are counted
    in ``skipped`` and logged."""
    for name, data in images:
        try:
            yield square_rgb(data, resolution)
        except DECODE_ERRORS as e:
            skipped["undecodable_image"] += 1
            log.warning("skipping %s: not a readable image (%s: %s)", name, type(e).__name__, e)


def _features_of(images: Iterable[tuple[str, bytes]], extractor: Callable, *, resolution: int,
                 batch_size: int, skipped: Counter) -> RunningStats:
    running = RunningStats(int(extractor.dim))
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            chw = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()  # (b, 3, R, R) uint8
            running.update(extractor(chw))
            batch.clear()

    for image in decoded_images(images, resolution, skipped):
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    flush()
    return running


# ----------------------------------------------------------------------------- sources


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _directory_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: p.relative_to(root).as_posix())


def _directory_listing(root: Path, files: list[Path]) -> list[dict[str, Any]]:
    return [{"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p.read_bytes())}
            for p in files]


def _shard_listing(urls: list[str], storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    listing = []
    for url in urls:
        fs, path = filesystem(url, storage_options_for(url, None, storage_options))
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"reference shard {url!r} does not exist") from None
        entry = {"url": url, "size": info.get("size")}
        etag = info.get("ETag") or info.get("etag")
        if etag:
            entry["etag"] = str(etag).strip('"')
        else:  # local and other stores without ETags: a rewrite of the same size still changes mtime
            entry["mtime"] = info.get("mtime") or str(info.get("LastModified") or info.get("last_modified") or "")
        listing.append(entry)
    return listing


def shard_images(urls: list[str], storage_options: dict[str, Any] | None, skipped: Counter
                 ) -> Iterator[tuple[str, bytes]]:
    """(name, image bytes) of every sample of the webdataset shards, in order; samples without an
    image part and damaged shards are counted in ``skipped``."""
    tasks = [ShardTask(i, url) for i, url in enumerate(urls)]
    options = storage_options_for(urls[0], None, storage_options)
    for task, sample in read_samples(tasks, options, RetryPolicy(), skipped):
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample.parts), None)
        if key is None:
            skipped["no_image"] += 1
            log.warning("skipping %s:%s: no image part (%s)", task.url, sample.key, ", ".join(SHARD_IMAGE_KEYS))
            continue
        yield f"{task.url}:{sample.key}.{key}", sample.parts[key]


def _load_npz_stats(source: str, expected_dim: int | None) -> tuple[FeatureStats, dict[str, Any]]:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {source} do not exist")
    raw = path.read_bytes()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"reference statistics {source} are not a readable .npz: {type(e).__name__}: {e}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"reference statistics {source} hold {sorted(arrays)}; expected 'mu' and 'sigma' "
                         "(pytorch-fid / torch-fidelity format)")
    num_samples = int(arrays["num_samples"]) if "num_samples" in arrays else 0  # 0: not recorded
    stats = FeatureStats(mu=arrays["mu"].astype(np.float64), sigma=arrays["sigma"].astype(np.float64),
                         num_samples=num_samples)
    if expected_dim is not None and stats.dim != expected_dim:
        raise ValueError(f"reference statistics {source} have dimension {stats.dim}, but the feature "
                         f"extractor gives {expected_dim}: they were computed with another network")
    return stats, {"source": source, "num_images": num_samples, "num_skipped": 0, "checksum": _sha256(raw),
                   "cached": False}


# ----------------------------------------------------------------------------- cache


def _npz_bytes(stats: FeatureStats) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, num_samples=np.int64(stats.num_samples))
    return buf.getvalue()


def _read_cache(npz_path: Path, json_path: Path, dim: int) -> tuple[FeatureStats, dict[str, Any]] | None:
    if not (npz_path.is_file() and json_path.is_file()):
        return None
    try:
        record = json.loads(json_path.read_text())
        with np.load(npz_path, allow_pickle=False) as npz:
            stats = FeatureStats(mu=npz["mu"], sigma=npz["sigma"], num_samples=int(npz["num_samples"]))
    except (ValueError, OSError, KeyError, EOFError) as e:
        log.warning("ignoring unreadable reference cache %s (%s: %s); recomputing", npz_path, type(e).__name__, e)
        return None
    if stats.dim != dim or record.get("version") != CACHE_VERSION:
        log.warning("ignoring reference cache %s (dimension %d, version %r); recomputing", npz_path, stats.dim,
                    record.get("version"))
        return None
    return stats, record


def reference_stats(source: str, extractor: Any, *, resolution: int, cache_dir: str | os.PathLike | None,
                    batch_size: int = 64, storage_options: dict[str, Any] | None = None,
                    ) -> tuple[FeatureStats, dict[str, Any]]:
    """FID reference statistics of ``source`` under ``extractor`` at ``resolution``, and
    ``{"source", "num_images", "num_skipped", "checksum", "cached"}``.

    ``extractor``: a callable on uint8 (B, 3, R, R) tensors returning (B, D) features, with ``dim``
    and ``describe()`` (``eval.features``). ``storage_options``: fsspec options for remote shards.
    With ``cache_dir=None`` nothing is cached.
    """
    source = os.fspath(source)
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} must be a positive integer")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    if source.endswith(".npz"):
        return _load_npz_stats(source, int(extractor.dim))

    skipped: Counter = Counter()
    if "://" not in source and Path(source).is_dir():
        root = Path(source)
        files = _directory_files(root)
        kind, listing = "directory", _directory_listing(root, files)
        images: Iterable[tuple[str, bytes]] = ((p.relative_to(root).as_posix(), p.read_bytes()) for p in files)
    else:
        urls = expand_urls(source, storage_options=storage_options)
        kind, listing = "webdataset", _shard_listing(urls, storage_options)
        images = shard_images(urls, storage_options, skipped)
    if not listing:
        raise ValueError(f"reference source {source!r} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    described = extractor.describe()
    key_material = {"version": CACHE_VERSION, "kind": kind, "listing": listing, "extractor": described,
                    "resolution": resolution}
    checksum = _sha256(json.dumps(key_material, sort_keys=True, default=str).encode())

    if cache_dir is not None:
        npz_path, json_path = Path(cache_dir) / f"{checksum}.npz", Path(cache_dir) / f"{checksum}.json"
        cached = _read_cache(npz_path, json_path, int(extractor.dim))
        if cached is not None:
            stats, record = cached
            log.info("reference statistics of %s from cache %s", source, npz_path)
            return stats, {"source": source, "num_images": stats.num_samples,
                           "num_skipped": int(record.get("num_skipped", 0)), "checksum": checksum, "cached": True}

    running = _features_of(images, extractor, resolution=resolution, batch_size=batch_size, skipped=skipped)
    num_skipped = int(sum(skipped.values()))
    if running.num_samples < 2:
        raise ValueError(f"reference source {source!r} has {running.num_samples} readable images "
                         f"({num_skipped} skipped: {dict(skipped)}); FID needs at least 2")
    stats = running.stats()
    if num_skipped:
        log.warning("reference %s: %d images used, %d skipped (%s)", source, stats.num_samples, num_skipped,
                    dict(skipped))
    if cache_dir is not None:
        record = {"version": CACHE_VERSION, "source": source, "kind": kind, "checksum": checksum,
                  "num_images": stats.num_samples, "num_skipped": num_skipped, "skipped": dict(skipped),
                  "extractor": described, "resolution": resolution, "num_listed": len(listing)}
        # The .json first: the .npz marks a complete entry.
        atomic_write_bytes(json_path, (json.dumps(record, indent=2, sort_keys=True, default=str) + "\n").encode())
        atomic_write_bytes(npz_path, _npz_bytes(stats))
    return stats, {"source": source, "num_images": stats.num_samples, "num_skipped": num_skipped,
                   "checksum": checksum, "cached": False}
