"""The data settings of a job: the ``data`` group (what to read and how) and the ``precompute``
group (how ``python -m data_pipeline.precompute`` writes a latent cache). Each validates itself in
``__post_init__``, naming the key, the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_pipeline.latents import DTYPES, FORMATS, STORES
from data_pipeline.sources import RetryPolicy, S3Options
from trainer.checks import check_choice, check_int, invalid
from trainer.runtime.device import DEVICES

DATA_KINDS = ("digits", "webdataset")
DATA_MODES = ("epoch", "resampled")
CROPS = ("center", "random")


@dataclass
class FilterConfig:
    """Filters on img2dataset metadata; a sample failing one is skipped and counted as filtered_*."""

    min_size: int = 0  # smaller side of the stored image, pixels
    max_aspect_ratio: float = 0.0  # max(w/h, h/w); 0 = off
    min_caption_length: int = 0
    max_caption_length: int = 0  # 0 = off
    min_scores: dict[str, float] = field(default_factory=dict)  # e.g. {similarity: 0.28, aesthetic: 5.0}
    max_scores: dict[str, float] = field(default_factory=dict)  # e.g. {pwatermark: 0.5}

    def __post_init__(self) -> None:
        check_int("data.filters.min_size", self.min_size, 0)
        check_int("data.filters.min_caption_length", self.min_caption_length, 0)
        check_int("data.filters.max_caption_length", self.max_caption_length, 0)
        if self.max_aspect_ratio and self.max_aspect_ratio < 1.0:
            raise invalid("data.filters.max_aspect_ratio", self.max_aspect_ratio, "0 (off) or a float >= 1")


@dataclass
class BucketConfig:
    """Aspect-ratio bucketing: batches of one bucket each, buckets of about image_size**2 pixels."""

    enabled: bool = False
    step: int = 64  # bucket sides are multiples of this (a multiple of the UNet's total downsampling x 8)
    max_ratio: float = 2.0

    def __post_init__(self) -> None:
        check_int("data.buckets.step", self.step, 8)
        if not self.max_ratio >= 1.0:
            raise invalid("data.buckets.max_ratio", self.max_ratio, "a float >= 1")


@dataclass
class DataConfig:
    """Where training images and captions come from.

    ``digits`` builds the embedded coloured-digits dataset (scikit-learn's handwritten digits) into
    ``root`` on first use and holds it in memory (its order resumes bitwise). ``webdataset`` streams
    the shards ``urls`` names (brace patterns, globs, list files; any fsspec URL) - or several
    ``sources`` ({name, urls, weight}) mixed by weight - with an exact, elastic position.
    """

    kind: str = "digits"
    root: str = ".cache/data/digits"
    # One pattern (a string) or a list of them; a string becomes a one-element list. Hydra's override
    # grammar reads { } [ ] , itself, so a brace pattern is quoted inside the shell's quotes:
    # 'data.urls="s3://bucket/laion/{00000..12345}.tar"' or 'data.urls=["s3://a/{0..9}.tar",b.txt]'.
    urls: Any = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for non-local URLs
    s3: S3Options = field(default_factory=S3Options)
    image_size: int = 32
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "png", "webp"])
    caption_key: str = "txt"  # or json:<field>
    # Class labels, for class-conditional models (model.conditioning.cross_attn=class): a part extension
    # (e.g. cls: an integer or a name) or json:<field> (the digits' json:digit). label_map: a JSON file
    # {name: class} for labels stored as names. A sample whose label is missing, unmapped or outside
    # [0, model.conditioning.num_classes) is skipped and counted (missing_label / bad_label).
    label_key: Optional[str] = None
    label_map: Optional[str] = None
    seed: int = 0
    mode: str = "epoch"  # epoch | resampled (shards drawn with replacement)
    shuffle_shards: bool = True
    # Raw samples a reader holds for its shuffle windows (per canonical stream when num_streams is set);
    # 0 = no sample shuffling. Fixed at the first start with the position.
    shuffle_buffer: int = 1000
    # Canonical streams of the global sample order (data_pipeline/position.py), fixed at the first start
    # and kept in the position: a resume may use any ranks x workers that divides it. 0 = the first
    # start's ranks x max(num_workers, 1) x the first of 12, 6, 4, 3, 2, 1 that the smallest source's
    # shard count allows (room to grow the job later).
    num_streams: int = 0
    num_workers: int = 2  # dataloader workers per rank
    prefetch_factor: int = 2
    crop: str = "center"  # center | random
    flip_prob: float = 0.0
    max_pixels: int = 8192 * 8192  # larger images are skipped before decoding (decompression bombs)
    draft: bool = True  # JPEG reduced-scale decoding
    # Members larger than these are skipped unread (checked from the tar header, also in .tar.gz),
    # counted as oversized_image_file / oversized_caption / oversized_member; far above any real
    # LAION sample, they bound what one sample can cost.
    max_image_bytes: int = 64 << 20
    max_caption_bytes: int = 64 << 10
    max_member_bytes: int = 16 << 20  # any other member (json, cached latents, ...)
    # Captions are cut to this many characters before any cleaning or tokenizing; 77 CLIP tokens
    # never span more than a few hundred characters of real text. 0 = whole captions.
    max_caption_chars: int = 4096
    buckets: BucketConfig = field(default_factory=BucketConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Start the data afresh on resume instead of refusing a position saved for other data.
    reset_position: bool = False
    # Train from a latent cache made by `python -m data_pipeline.precompute` (its folder or URL)
    # instead of encoding images at every step; its manifest must match this job's autoencoder,
    # resolution and crop policy unless latent_cache_check=false.
    latent_cache: Optional[str] = None
    latent_cache_check: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise invalid("data.kind", self.kind, f"one of {DATA_KINDS}")
        check_int("data.image_size", self.image_size, 8)
        self.urls = _url_list("data.urls", self.urls)
        if self.kind == "webdataset" and not (self.urls or self.sources or self.latent_cache):
            raise invalid("data.urls", self.urls, "one or more shard URLs (brace patterns, globs, list files) "
                       "or data.sources when data.kind='webdataset'")
        if self.urls and self.sources:
            raise invalid("data.sources", "...", "either data.urls or data.sources, not both")
        for i, src in enumerate(self.sources):
            if isinstance(src, dict) and src.get("urls"):
                _url_list(f"data.sources[{i}].urls", src["urls"])
            unknown = set(src) - {"name", "urls", "weight"}
            if unknown or not src.get("urls"):
                raise invalid(f"data.sources[{i}]", dict(src), "a mapping with urls (and optional name, weight)")
            if not float(src.get("weight", 1.0)) > 0:
                raise invalid(f"data.sources[{i}].weight", src.get("weight"), "a float > 0")
        if not self.image_keys:
            raise invalid("data.image_keys", self.image_keys, "at least one image extension")
        if not self.caption_key or self.caption_key == "json:":
            raise invalid("data.caption_key", self.caption_key, "a part extension (txt) or json:<field>")
        if self.label_key is not None and (not self.label_key or self.label_key == "json:"):
            raise invalid("data.label_key", self.label_key, "a part extension (cls) or json:<field>")
        if self.label_map is not None and self.label_key is None:
            raise invalid("data.label_map", self.label_map, "null unless data.label_key names where labels are")
        check_int("data.seed", self.seed, 0)
        if self.mode not in DATA_MODES:
            raise invalid("data.mode", self.mode, f"one of {DATA_MODES}")
        check_int("data.shuffle_buffer", self.shuffle_buffer, 0)
        check_int("data.num_streams", self.num_streams, 0)
        check_int("data.num_workers", self.num_workers, 0)
        check_int("data.prefetch_factor", self.prefetch_factor, 1)
        if self.crop not in CROPS:
            raise invalid("data.crop", self.crop, f"one of {CROPS}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise invalid("data.flip_prob", self.flip_prob, "a float in [0, 1]")
        check_int("data.max_pixels", self.max_pixels, 1)
        for key in ("max_image_bytes", "max_caption_bytes", "max_member_bytes"):
            check_int(f"data.{key}", getattr(self, key), 1)
        check_int("data.max_caption_chars", self.max_caption_chars, 0)
        if self.buckets.enabled and self.image_size % self.buckets.step:
            raise invalid("data.image_size", self.image_size, f"a multiple of data.buckets.step={self.buckets.step} "
                       "when bucketing")




def _url_list(key: str, value: Any) -> list[str]:
    """``value`` (one pattern or a list of patterns) as a list of non-empty strings."""
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) and u.strip() for u in urls):
        raise invalid(key, value, "a shard URL pattern (brace pattern, glob, list file) or a list of them, "
                      "e.g. 'data.urls=\"s3://bucket/laion/{00000..12345}.tar\"'")
    return list(urls)


@dataclass
class PrecomputeConfig:
    """``python -m data_pipeline.precompute``: encode this experiment's data with its autoencoder."""

    out: Optional[str] = None  # the cache folder or URL (required)
    store: str = "mean_logvar"  # or "mean": only the posterior mean
    dtype: str = "fp16"  # or fp32
    format: str = "safetensors"  # or npy
    batch_size: int = 32
    device: str = "auto"  # auto: the GPU of this rank when there is one
    # Also store the frozen text encoder's per-token outputs (and the empty prompt's once); training
    # from the cache then never runs the encoder.
    text: bool = False

    def __post_init__(self) -> None:
        for key, allowed in (("store", STORES), ("dtype", DTYPES), ("format", FORMATS), ("device", DEVICES)):
            check_choice(f"precompute.{key}", getattr(self, key), allowed)
        check_int("precompute.batch_size", self.batch_size, 1)
