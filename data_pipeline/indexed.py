"""A small shard set held in memory, read in a global order that any world size can resume.

For datasets that fit in RAM (the embedded digits demo, tests, small fine-tunes). The order of
samples is a function of ``(seed, epoch)`` only: step ``s`` of the job consumes global positions
``[s * B, (s + 1) * B)`` of the concatenated per-epoch permutations, and rank ``r`` of ``W`` takes
the ``r``-th contiguous slice of those. The whole data position is therefore one integer (samples
seen), and a job resumed on another number of ranks continues with exactly the samples the
uninterrupted job would have used.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

# Decompression-bomb guard: refuse images above this many pixels before decoding them.
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class Samples:
    images: torch.Tensor  # (N, 3, S, S) uint8
    captions: list[str]
    keys: list[str]
    skipped: Counter = field(default_factory=Counter)


def expand_urls(urls: list[str] | str) -> list[str]:
    import braceexpand

    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for url in urls:
        out.extend(braceexpand.braceexpand(url))
    return out


def _resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    scale = size / min(w, h)
    if scale != 1.0:
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_shards(urls: list[str] | str, *, image_size: int, image_keys: list[str], caption_key: str,
                storage_options: dict | None = None) -> Samples:
    """Read every sample of the shards into memory; bad samples are skipped and counted by reason."""
    images, captions, keys = [], [], []
    skipped: Counter = Counter()
    for url in expand_urls(urls):
        groups: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        try:
            with fsspec.open(url, "rb", **(storage_options or {})) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                size = getattr(f, "size", None) or f.fs.size(f.path)
                for member in tar:
                    if not member.isfile():
                        continue
                    base, _, ext = member.name.rpartition("/")[2].partition(".")
                    key = member.name.rpartition("/")[0] + "/" + base if "/" in member.name else base
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext.lower()] = tar.extractfile(member).read()
                # tarfile ends quietly at a header cut short; a complete archive still has its two
                # zero end-of-archive blocks after the last member.
                if size is not None and size < tar.offset + 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError(f"{size} bytes end before the end-of-archive blocks")
        except (tarfile.TarError, OSError, EOFError) as e:
            # A truncated tar still yields the members read before the damage.
            skipped["truncated_shard"] += 1
            log.warning("shard %s is damaged (%s); using the %d samples read before the damage", url, e, len(order))
        for key in order:
            parts = groups[key]
            image_ext = next((k for k in image_keys if k in parts), None)
            if image_ext is None:
                skipped["missing_image"] += 1
                continue
            if caption_key not in parts:
                skipped["missing_caption"] += 1
                continue
            try:
                with Image.open(io.BytesIO(parts[image_ext])) as img:
                    if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                        skipped["oversized_image"] += 1
                        continue
                    rgb = _resize_center_crop(img.convert("RGB"), image_size)
            except (OSError, ValueError, Image.DecompressionBombError):
                skipped["undecodable_image"] += 1
                continue
            images.append(torch.from_numpy(rgb).permute(2, 0, 1))  # (3, S, S)
            captions.append(parts[caption_key].decode("utf-8", errors="replace").strip())
            keys.append(key)
    if not images:
        raise ValueError(f"no usable samples in {urls!r} (skipped: {dict(skipped)})")
    if skipped:
        log.warning("skipped samples: %s", dict(skipped))
    return Samples(images=torch.stack(images), captions=captions, keys=keys, skipped=skipped)


class GlobalOrder:
    """Positions -> sample indices, through one seeded permutation per epoch."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)}
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, offset = divmod(start + i, self.num_samples)
            out[i] = self.permutation(epoch)[offset]
        return out


class InMemoryBatches:
    """The micro-batches of one rank for one optimizer step, from the global position."""

    def __init__(self, samples: Samples, seed: int, *, rank: int, world_size: int,
                 micro_batch_size: int, gradient_accumulation: int) -> None:
        self.samples = samples
        self.order = GlobalOrder(len(samples.captions), seed)
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation = gradient_accumulation
        self.seed = seed

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation * self.world_size

    def step_batches(self, samples_seen: int) -> list[dict]:
        """For the step starting at global position ``samples_seen``: ``gradient_accumulation``
        micro-batches with ``images`` (B, 3, S, S) float in [-1, 1], ``captions`` and ``positions``
        (the global position of each sample, which keys its noise)."""
        per_rank = self.micro_batch_size * self.gradient_accumulation
        start = samples_seen + self.rank * per_rank
        out = []
        for a in range(self.gradient_accumulation):
            first = start + a * self.micro_batch_size
            idx = self.order.indices(first, self.micro_batch_size)
            images = self.samples.images[torch.from_numpy(idx)].float() / 127.5 - 1.0
            out.append({"images": images, "captions": [self.samples.captions[i] for i in idx.tolist()],
                        "positions": list(range(first, first + self.micro_batch_size))})
        return out

    def state_dict(self, samples_seen: int) -> dict:
        return {"kind": "in_memory", "samples_seen": samples_seen, "seed": self.seed,
                "num_samples": len(self.samples.captions),
                "epoch": samples_seen // len(self.samples.captions)}

    def check_state(self, state: dict) -> None:
        if state.get("kind") != "in_memory":
            return
        mine = {"seed": self.seed, "num_samples": len(self.samples.captions)}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            raise ValueError(f"the checkpoint's data position was saved for {theirs}, this job reads {mine}; "
                             f"set checkpoint.allow_config_change=true to restart the data order")
