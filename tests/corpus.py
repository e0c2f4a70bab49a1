"""Test corpora in img2dataset's webdataset layout, written with ``data_pipeline.writer.ShardWriter``.

* ``build_clean_corpus``: every sample good (``.jpg`` + ``.txt`` + ``.json``).
* ``build_corrupt_corpus``: good samples mixed with planted bad ones, and the exact outcome a
  loader should report: which keys survive and how many samples are skipped for which reason.

Layout (as img2dataset writes it): shard ``{shard:05d}.tar``, sample key ``{shard:05d}{index:04d}``
(9 digits), members ``{key}.jpg``, ``{key}.txt`` (the caption, UTF-8) and ``{key}.json`` (the
img2dataset metadata: key, caption, url, width, height, original_width, original_height, status,
error_message, sha256, similarity, aesthetic, pwatermark). Everything is a function of ``seed``:
the same arguments give byte-identical shards. No network: ``url`` fields are never fetched.

``out_dir`` may be a local directory or an fsspec URL (``s3://bucket/prefix``, ``memory://x``);
``storage_options`` go to fsspec.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import tempfile
import zlib
from collections import Counter

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from data_pipeline.writer import ShardWriter

JPEG_QUALITY = 90
# (width, height) of the planted oversized PNG. 84 Mpx: above the loaders' limits
# (data_pipeline.decode.Transform.max_pixels = 8192**2 = 67.1 Mpx, data_pipeline.indexed
# MAX_IMAGE_PIXELS = 4096**2) and below PIL's own Image.MAX_IMAGE_PIXELS (89.5 Mpx), so
# PIL.Image.open reads its size without a warning and only the loader's own check can reject it.
# (30000 x 30000 would not do: Image.open itself raises DecompressionBombError above 2 x 89.5 Mpx.)
OVERSIZED_PNG_SIZE = (12000, 7000)
NOT_UTF8_CAPTION = b"\xff\xfe\xfa caption"
HTML_ERROR_PAGE = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"

# The reasons a loader reports; per-sample ones are counted once per sample, truncated_shard once
# per damaged shard (its samples from the damaged one on are lost without a per-sample count).
PER_SAMPLE_REASONS = ("undecodable_image", "empty_image", "missing_caption", "missing_image",
                      "oversized_image", "caption_not_utf8")
TRUNCATED_SHARD = "truncated_shard"

# Sample kinds of the corrupt corpus -> the reason a loader skips them for (None: good).
_REASON_OF_KIND = {
    "good": None,
    "good_non_ascii": None,  # a valid UTF-8 caption outside ASCII: must not be taken for bad bytes
    "undecodable_image": "undecodable_image",  # random bytes
    "html_page": "undecodable_image",  # an error page saved as .jpg, as crawls do
    "empty_image": "empty_image",
    "missing_caption": "missing_caption",
    "missing_image": "missing_image",
    "oversized_image": "oversized_image",
    "caption_not_utf8": "caption_not_utf8",
}
# Each per-sample reason appears in both 00000.tar and 00001.tar (undecodable_image three times),
# every bad sample has exactly one defect, and 00001.tar ends with a bad sample.
_CORRUPT_PLAN: tuple[tuple[str, ...], ...] = (
    ("good", "undecodable_image", "good_non_ascii", "empty_image", "missing_caption", "good",
     "missing_image", "oversized_image", "caption_not_utf8", "good"),
    ("caption_not_utf8", "good", "oversized_image", "missing_image", "good", "missing_caption",
     "empty_image", "html_page", "good", "undecodable_image"),
    ("good",) * 6,  # 00002.tar: cut in the middle of the .jpg of its sample TRUNCATED_AT
    ("good",) * 4,  # 00003.tar: a clean shard after the damaged one; reading must go on
)
TRUNCATED_SHARD_INDEX = 2
TRUNCATED_AT = 3
# The truncated shard's images are larger and noisy (~15 KB as JPEG) so the cut lies tens of KB
# into the file, past the first blocks a streaming tar reader buffers, as it does in real shards.
_TRUNCATED_IMAGE_SIZE = (128, 128)


# ----------------------------------------------------------------------------- pieces


def sample_key(shard: int, index: int) -> str:
    """img2dataset's 9-digit key: 5 digits of shard, 4 of index within the shard."""
    return f"{shard:05d}{index:04d}"


def _join(out_dir: str | os.PathLike, name: str) -> str:
    base = os.fspath(out_dir)
    return f"{base.rstrip('/')}/{name}" if "://" in base else os.path.join(base, name)


def _pattern_image(rng: np.random.Generator, size: tuple[int, int], *, noisy: bool = False) -> np.ndarray:
    """A (height, width, 3) uint8 image: a random background with stripes, a box or a checkerboard."""
    width, height = size
    background, foreground = rng.integers(0, 256, size=(2, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:height, 0:width]
    period = int(rng.integers(4, 17))
    pattern = int(rng.integers(3))
    if pattern == 0:
        mask = (xs // period) % 2 == 0
    elif pattern == 1:
        mask = (abs(xs - width / 2) < width / 4) & (abs(ys - height / 2) < height / 4)
    else:
        mask = ((xs // period) + (ys // period)) % 2 == 0
    rgb = np.where(mask[..., None], foreground, background).astype(np.float64)
    if noisy:
        rgb += rng.normal(0.0, 40.0, size=rgb.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def oversized_png(size: tuple[int, int] = OVERSIZED_PNG_SIZE) -> bytes:
    """A ~100-byte PNG declaring ``size`` (width, height), 8-bit RGB, whose IDAT holds one row only.

    The header is valid, so ``PIL.Image.open`` reports the size without decoding; the pixel data
    is far short of the declared image, so a full decode fails (after allocating the image).
    """
    width, height = size
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, RGB, deflate, no interlace
    one_row = b"\x00" + bytes(3 * width)  # filter type 0, then a black row
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(one_row, 9)) + _png_chunk(b"IEND", b""))


def _metadata(key: str, caption: str | None, rng: np.random.Generator, *, image: bytes | None,
              size: tuple[int, int] | None) -> bytes:
    """img2dataset's per-sample JSON; scores are deterministic draws from ``rng``."""
    scale = int(rng.integers(2, 5))  # img2dataset stores a downscaled copy of the original
    scores = {"similarity": round(float(rng.uniform(0.25, 0.45)), 4),
              "aesthetic": round(float(rng.uniform(4.0, 7.0)), 4),
              "pwatermark": round(float(rng.uniform(0.0, 1.0)), 4)}
    downloaded = image is not None and size is not None
    meta = {
        "key": key,
        "caption": caption,
        "url": f"https://images.example.com/{key}.jpg",
        "width": size[0] if downloaded else None,
        "height": size[1] if downloaded else None,
        "original_width": size[0] * scale if downloaded else None,
        "original_height": size[1] * scale if downloaded else None,
        "status": "success" if downloaded else "failed_to_download",
        "error_message": None if downloaded else "HTTP Error 404: Not Found",
        "sha256": hashlib.sha256(image).hexdigest() if downloaded else None,
        **scores,
    }
    return json.dumps(meta, sort_keys=True).encode()


def _good_parts(key: str, caption: str, rng: np.random.Generator, size: tuple[int, int], *,
                noisy: bool = False) -> dict[str, bytes]:
    image = _jpeg(_pattern_image(rng, size, noisy=noisy))
    return {"jpg": image, "txt": caption.encode(),
            "json": _metadata(key, caption, rng, image=image, size=size)}


def _bad_parts(kind: str, key: str, caption: str, rng: np.random.Generator,
               size: tuple[int, int]) -> dict[str, bytes]:
    """The parts of a planted sample of ``kind``; each has exactly one defect."""
    if kind in ("good", "good_non_ascii"):
        return _good_parts(key, caption, rng, size)
    parts = _good_parts(key, caption, rng, size)
    if kind == "undecodable_image":
        # Random bytes whose first ones match no image format PIL knows (checked by the tests).
        parts["jpg"] = b"\x00garbage" + rng.bytes(503)
    elif kind == "html_page":
        parts["jpg"] = HTML_ERROR_PAGE
    elif kind == "empty_image":
        parts["jpg"] = b""
    elif kind == "missing_caption":
        del parts["txt"]
        parts["json"] = _metadata(key, None, rng, image=parts["jpg"], size=size)
    elif kind == "missing_image":
        del parts["jpg"]
        parts["json"] = _metadata(key, caption, rng, image=None, size=None)
    elif kind == "oversized_image":
        del parts["jpg"]
        parts["png"] = oversized_png()
        parts["json"] = _metadata(key, caption, rng, image=parts["png"], size=OVERSIZED_PNG_SIZE)
    elif kind == "caption_not_utf8":
        parts["txt"] = NOT_UTF8_CAPTION
        # img2dataset's JSON is valid UTF-8 even when the caption bytes were not.
        parts["json"] = _metadata(key, NOT_UTF8_CAPTION.decode("utf-8", errors="replace"), rng,
                                  image=parts["jpg"], size=size)
    else:
        raise ValueError(f"unknown sample kind {kind!r}; known: {sorted(_REASON_OF_KIND)}")
    return parts


def _put_bytes_atomic(url: str, data: bytes, storage_options: dict | None) -> None:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)  # one PUT: atomic on object stores


# ----------------------------------------------------------------------------- corpora


def build_clean_corpus(out_dir: str | os.PathLike, *, n_shards: int = 4, per_shard: int = 8,
                       sizes: tuple[tuple[int, int], ...] = ((64, 48), (40, 64), (96, 96)), seed: int = 0,
                       labels: tuple[str, ...] = (), storage_options: dict | None = None) -> list[str]:
    """Write ``n_shards`` shards ``out_dir/{i:05d}.tar`` of ``per_shard`` good samples; return their URLs.

    Sample ``n`` (counted over the whole corpus) has key ``sample_key(shard, index)``, a JPEG of
    ``sizes[n % len(sizes)]`` (width, height) at quality 90, caption ``"a photo number {n}"``; with
    ``labels``, its ``.json`` also has ``"label": labels[n % len(labels)]`` (a class name, for
    ``data.label_key=json:label`` with a ``data.label_map``).
    """
    if not 1 <= n_shards <= 99999 or not 1 <= per_shard <= 9999:
        raise ValueError(f"n_shards={n_shards} must be in [1, 99999] and per_shard={per_shard} in "
                         "[1, 9999] (5- and 4-digit parts of the key)")
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"sizes={sizes!r} must be a non-empty sequence of positive (width, height)")
    urls = []
    for shard in range(n_shards):
        url = _join(out_dir, f"{shard:05d}.tar")
        with ShardWriter(url, storage_options) as writer:
            for index in range(per_shard):
                n = shard * per_shard + index
                key = sample_key(shard, index)
                rng = np.random.default_rng([seed, 0, shard, index])
                parts = _good_parts(key, f"a photo number {n}", rng, tuple(sizes[n % len(sizes)]))
                if labels:
                    meta = json.loads(parts["json"]) | {"label": labels[n % len(labels)]}
                    parts["json"] = json.dumps(meta, sort_keys=True).encode()
                writer.write(key, parts)
        urls.append(url)
    return urls


def build_corrupt_corpus(out_dir: str | os.PathLike, *, seed: int = 0,
                         storage_options: dict | None = None) -> dict:
    """Write 4 shards mixing good and planted bad samples; return what a loader should find.

    Returns ``{"good_keys": set[str], "skipped": Counter[str, int], "urls": list[str],
    "bad_keys": dict[str, set[str]]}``: the keys a loader must yield, the number of skips per
    reason (``truncated_shard`` counts damaged shards, the rest count samples), the four shard URLs
    in order, and for each reason the keys it covers (for ``truncated_shard``: the samples lost).

    The expected outcome assumes the caption is read from ``.txt`` and images from ``.jpg`` or
    ``.png`` with a pixel limit below ``OVERSIZED_PNG_SIZE``'s 84 Mpx.
    """
    urls: list[str] = []
    good_keys: set[str] = set()
    skipped: Counter = Counter()
    bad_keys: dict[str, set[str]] = {}
    n = 0
    for shard, kinds in enumerate(_CORRUPT_PLAN):
        url = _join(out_dir, f"{shard:05d}.tar")
        urls.append(url)
        samples = []
        for index, kind in enumerate(kinds):
            key = sample_key(shard, index)
            rng = np.random.default_rng([seed, 1, shard, index])
            caption = f"a photo number {n}" + (" of a café façade № 5" if kind == "good_non_ascii" else "")
            n += 1
            if shard == TRUNCATED_SHARD_INDEX:
                parts = _good_parts(key, caption, rng, _TRUNCATED_IMAGE_SIZE, noisy=True)
            else:
                parts = _bad_parts(kind, key, caption, rng, (64, 48) if index % 2 else (48, 64))
            samples.append((key, parts))
            reason = _REASON_OF_KIND[kind]
            if shard == TRUNCATED_SHARD_INDEX and index >= TRUNCATED_AT:
                reason = None
                bad_keys.setdefault(TRUNCATED_SHARD, set()).add(key)
            elif reason is None:
                good_keys.add(key)
            else:
                skipped[reason] += 1
                bad_keys.setdefault(reason, set()).add(key)
        if shard == TRUNCATED_SHARD_INDEX:
            _write_truncated(url, samples, storage_options)
            skipped[TRUNCATED_SHARD] += 1
        else:
            with ShardWriter(url, storage_options) as writer:
                for key, parts in samples:
                    writer.write(key, parts)
    return {"good_keys": good_keys, "skipped": skipped, "urls": urls, "bad_keys": bad_keys}


def _write_truncated(url: str, samples: list[tuple[str, dict[str, bytes]]], storage_options: dict | None) -> None:
    """The whole shard, cut in the middle of the data of the first member of sample TRUNCATED_AT."""
    victim = f"{samples[TRUNCATED_AT][0]}.{sorted(samples[TRUNCATED_AT][1])[0]}"
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        whole = os.path.join(tmp, "whole.tar")
        with ShardWriter(whole) as writer:
            for key, parts in samples:
                writer.write(key, parts)
        with tarfile.open(whole) as tar:
            member = tar.getmember(victim)
        with open(whole, "rb") as f:
            data = f.read(member.offset_data + member.size // 2)
    _put_bytes_atomic(url, data, storage_options)


def corpus_keys(out_dir: str | os.PathLike, storage_options: dict | None = None) -> set[str]:
    """Every sample key in ``out_dir/*.tar``, read back with plain ``tarfile`` (a damaged shard raises)."""
    fs, path = fsspec.core.url_to_fs(os.fspath(out_dir), **(storage_options or {}))
    keys: set[str] = set()
    for shard in sorted(fs.glob(f"{path.rstrip('/')}/*.tar")):
        with fs.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for name in tar.getnames():
                directory, _, base = name.rpartition("/")
                stem = base.partition(".")[0]
                keys.add(f"{directory}/{stem}" if directory else stem)
    return keys
