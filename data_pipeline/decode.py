"""From a sample's bytes to a training example: pure functions, no I/O, no pickle.

Images are opened lazily, refused above a pixel limit before any pixel is decoded (decompression
bombs), decoded at reduced scale when the format allows (JPEG draft mode: the DCT is scaled by 1/2,
1/4 or 1/8 so that the result still covers the target), converted to RGB, resized with an
antialiased bicubic filter so the target is covered, then cropped (center or random) and
optionally flipped. The
original size and the crop's top-left corner are kept for size/crop conditioning (SDXL).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import fsspec
import numpy as np
import torch
from PIL import Image

# Errors PIL raises on bad image bytes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError,
                 Image.DecompressionBombError, MemoryError)


class BadSample(Exception):
    """A sample to skip; ``reason`` is its counter's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Transform:
    crop: str = "center"  # center | random
    flip_prob: float = 0.0
    max_pixels: int = 8192 * 8192
    draft: bool = True  # JPEG reduced-scale decoding


@dataclass
class Example:
    image: np.ndarray  # (H, W, 3) uint8
    original_size: tuple[int, int]  # (height, width) of the stored image
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """A lazily opened image, its size checked against ``max_pixels`` before decoding."""
    if not data:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample("oversized_image", str(e)) from None
    except DECODE_ERRORS as e:
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadSample("undecodable_image", f"size {w}x{h}")
    if w * h > max_pixels:
        raise BadSample("oversized_image", f"{w}x{h} is over {max_pixels} pixels")
    return img


def decode_to(data: bytes, target_hw: tuple[int, int], tf: Transform, rng: np.random.Generator) -> Example:
    """Decode, cover ``target_hw`` (height, width) by an antialiased bicubic resize, crop, flip."""
    img = open_image(data, tf.max_pixels)
    w, h = img.size
    th, tw = target_hw
    scale = max(th / h, tw / w)
    new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
    if tf.crop == "random":
        top = int(rng.integers(0, new_h - th + 1))
        left = int(rng.integers(0, new_w - tw + 1))
    else:
        top, left = (new_h - th) // 2, (new_w - tw) // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if tf.draft and img.format == "JPEG" and scale < 1.0:
                img.draft("RGB", (new_w, new_h))  # decodes at the smallest 1/2^k scale still >= the size
            img = img.convert("RGB") if img.mode != "RGB" else img  # (convert would copy an RGB image)
            arr = np.array(img, dtype=np.uint8)  # (h, w, 3)
    except DECODE_ERRORS as e:
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None
    if arr.shape[:2] != (new_h, new_w):
        # torch's uint8 antialiased bicubic is Pillow's filter (within +-2 levels, mean 0.004) at
        # several times its speed (SIMD kernels); it is most of the decoding cost at 512 px.
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True)
        arr = x[0].permute(1, 2, 0).numpy()
    arr = arr[top:top + th, left:left + tw]
    if tf.flip_prob > 0 and rng.random() < tf.flip_prob:
        arr = arr[:, ::-1]
    return Example(image=np.ascontiguousarray(arr), original_size=(h, w), crop_top_left=(top, left))


def caption_of(parts: dict[str, bytes], caption_key: str, metadata: dict[str, Any] | None,
               max_chars: int = 0, required: bool = True) -> str:
    """The caption from part ``caption_key`` (e.g. ``txt``), or from a JSON field with ``json:<field>``,
    cut to its first ``max_chars`` characters (0: whole) before anything else looks at it: the
    tokenizer reads only the start, and cleaning (here, and the tokenizer's) costs time per character.
    Not ``required``: a missing, undecodable or empty caption is ``""`` instead of a ``BadSample``."""
    if not required:
        try:
            return caption_of(parts, caption_key, metadata, max_chars)
        except BadSample:
            return ""
    if caption_key.startswith("json:"):
        field_name = caption_key[5:]
        if metadata is None or not isinstance(metadata.get(field_name), str):
            raise BadSample("missing_caption", f"no string field {field_name!r} in .json")
        text = metadata[field_name]
    else:
        raw = parts.get(caption_key)
        if raw is None:
            raise BadSample("missing_caption", f"no .{caption_key} part")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("caption_not_utf8", str(e)) from None
    if max_chars:
        text = text[:max_chars]
    text = text.strip()
    if not text:
        raise BadSample("empty_caption")
    return text


# Skip reasons of a label the data lacks or the map cannot place: bad data, skipped and counted, but
# when every sample fails so, data.label_key or data.label_map is wrong - the first such sample a reader
# meets is logged as a warning naming the key, the sample, its shard and the value.
LABEL_REASONS = frozenset({"missing_label", "bad_label"})


@dataclass(frozen=True)
class LabelSpec:
    """Where a sample's class label is and what it may be: ``key`` is a part extension (``cls``, its
    text an integer or a name) or ``json:<field>``; ``names`` (``data.label_map``) maps names (and
    their string forms of ints) to classes; a label must land in ``[0, num_classes)``."""

    key: str
    num_classes: int
    names: Optional[dict[str, int]] = None


def label_hint(spec: Optional[LabelSpec]) -> str:
    """The label settings to check, for the message of a source whose every sample was skipped."""
    if spec is None:
        return ""
    return (f", data.label_key={spec.key!r}" + (", data.label_map" if spec.names is not None else "")
            + f" (model.conditioning.num_classes={spec.num_classes})")


def read_label_map(path: str, num_classes: int) -> dict[str, int]:
    """``data.label_map``: a JSON object {label name: class}; every class must be in
    ``[0, num_classes)`` - checked when the job starts, before any work, naming the key."""
    try:
        with fsspec.open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"data.label_map={path!r} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"data.label_map={path!r} is not a JSON object {{name: class}}: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"data.label_map={path!r} must be a non-empty JSON object {{name: class}}")
    out = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
            raise ValueError(f"data.label_map={path!r} maps {name!r} to {value!r}, outside the classes "
                             f"[0, {num_classes}) of model.conditioning.num_classes={num_classes}")
        out[str(name)] = value
    return out


def label_of(parts: dict[str, bytes], spec: LabelSpec, metadata: dict[str, Any] | None) -> int:
    """The class of a sample; a missing, unmapped or out-of-range label is a ``BadSample`` (skipped and
    counted like other bad data: one mislabelled sample does not stop a job)."""
    if spec.key.startswith("json:"):
        field_name = spec.key[5:]
        if metadata is None or field_name not in metadata:
            raise BadSample("missing_label", f"no field {field_name!r} in .json (data.label_key={spec.key!r})")
        value: Any = metadata[field_name]
    else:
        raw = parts.get(spec.key)
        if raw is None:
            raise BadSample("missing_label", f"no .{spec.key} part (data.label_key={spec.key!r})")
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise BadSample("bad_label", str(e)) from None
    if spec.names is not None:
        if str(value) not in spec.names:
            raise BadSample("bad_label", f"label {value!r} (data.label_key={spec.key!r}) is not in data.label_map")
        label = spec.names[str(value)]
    elif isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise BadSample("bad_label", f"label {value!r} (data.label_key={spec.key!r}) is not an integer "
                                     f"(data.label_map maps names to classes)")
    else:
        label = int(value)
    if not 0 <= label < spec.num_classes:
        raise BadSample("bad_label", f"class {label} (data.label_key={spec.key!r}) is outside [0, {spec.num_classes}) "
                                     f"of model.conditioning.num_classes")
    return label


def metadata_of(parts: dict[str, bytes]) -> dict[str, Any] | None:
    raw = parts.get("json")
    if raw is None:
        return None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("bad_metadata", str(e)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_metadata", "the .json part is not an object")
    return meta


@dataclass(frozen=True)
class Filters:
    """Sample filters on img2dataset metadata. Scores missing from a sample's JSON fail their filter."""

    min_size: int = 0  # smaller side of the original image, pixels
    max_aspect_ratio: float = 0.0  # max(w/h, h/w); 0 = off
    min_caption_length: int = 0  # characters
    max_caption_length: int = 0  # 0 = off
    min_scores: tuple[tuple[str, float], ...] = ()  # e.g. (("similarity", 0.28), ("aesthetic", 5.0))
    max_scores: tuple[tuple[str, float], ...] = ()  # e.g. (("pwatermark", 0.5),)

    @property
    def needs_metadata(self) -> bool:
        return bool(self.min_scores or self.max_scores)

    def check_caption(self, caption: str) -> None:
        if len(caption) < self.min_caption_length or (self.max_caption_length and len(caption) > self.max_caption_length):
            raise BadSample("filtered_caption_length", f"{len(caption)} characters")

    def check_scores(self, metadata: dict[str, Any] | None) -> None:
        for name, bound in self.min_scores:
            value = (metadata or {}).get(name)
            if not isinstance(value, (int, float)) or value < bound:
                raise BadSample("filtered_score", f"{name}={value!r} < {bound}")
        for name, bound in self.max_scores:
            value = (metadata or {}).get(name)
            if not isinstance(value, (int, float)) or value > bound:
                raise BadSample("filtered_score", f"{name}={value!r} > {bound}")

    def check_size(self, height: int, width: int) -> None:
        if min(height, width) < self.min_size:
            raise BadSample("filtered_min_size", f"{width}x{height}")
        if self.max_aspect_ratio and max(width / height, height / width) > self.max_aspect_ratio:
            raise BadSample("filtered_aspect_ratio", f"{width}x{height}")


@dataclass
class Decoded:
    example: Example
    caption: str
    bucket: int  # index into the buckets, -1 without bucketing


def decode_sample(parts: dict[str, bytes], *, image_keys: Sequence[str], caption_key: str, image_size: int,
                  transform: Transform, rng: np.random.Generator, filters: Filters = Filters(),
                  buckets: Sequence[tuple[int, int]] = (), max_caption_chars: int = 0,
                  caption_required: bool = True) -> Decoded:
    """A sample's parts -> its training example, or ``BadSample`` naming why it is skipped. Cheap checks
    (parts, caption, metadata, header size) run before the image is decoded."""
    image_ext = next((k for k in image_keys if k in parts), None)
    if image_ext is None:
        raise BadSample("missing_image", f"parts {sorted(parts)}")
    meta = metadata_of(parts) if filters.needs_metadata or caption_key.startswith("json:") else None
    caption = caption_of(parts, caption_key, meta, max_caption_chars, caption_required)
    if caption_required:
        filters.check_caption(caption)
    filters.check_scores(meta)
    data = parts[image_ext]
    bucket = -1
    if buckets or filters.min_size or filters.max_aspect_ratio:
        w, h = open_image(data, transform.max_pixels).size
        filters.check_size(h, w)
        if buckets:
            bucket = nearest_bucket(buckets, h, w)
    target = buckets[bucket] if bucket >= 0 else (image_size, image_size)
    return Decoded(decode_to(data, target, transform, rng), caption, bucket)


def aspect_buckets(size: int, *, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets of about ``size**2`` pixels, sides multiples of ``step``, aspect ratios
    up to ``max_ratio`` both ways (the NovelAI / SDXL scheme). Sorted by aspect ratio (w / h)."""
    if size % step:
        raise ValueError(f"bucket size {size} is not a multiple of the bucket step {step}")
    area = size * size
    buckets = {(size, size)}
    width = size + step
    while True:
        height = (area // width) // step * step
        if height < step or width / height > max_ratio:
            break
        buckets.add((height, width))
        buckets.add((width, height))
        width += step
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(buckets: Sequence[tuple[int, int]], height: int, width: int) -> int:
    """Index of the bucket whose aspect ratio is closest to the image's (in log space)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - target))
