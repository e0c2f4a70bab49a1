"""The training job's batch source, built from its ``data`` group.

``data.kind=digits`` holds the embedded digits (or their latent cache) in memory, in a global order
that resumes bitwise on any world size (``indexed.InMemoryBatches``); ``data.kind=webdataset``
streams shards or a latent cache with an exact, elastic position (``stream.StreamingBatches``).
Both hand the trainer ``step_batches(samples_seen)`` - the micro-batches of one optimizer step -
and checkpoint their position with ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Union

from data_pipeline.config import DataConfig
from data_pipeline.decode import LabelSpec, read_label_map
from data_pipeline.demo_digits import DigitsDatasetInfo, ensure_digits
from data_pipeline.indexed import InMemoryBatches, load_latent_cache, load_shards
from data_pipeline.latents import cache_shard_urls
from data_pipeline.stream import StreamingBatches, options_of, spec_from_config
from trainer.runtime import distributed

log = logging.getLogger(__name__)

Batches = Union[InMemoryBatches, StreamingBatches]


def digits_dataset(data: DataConfig, rank: int) -> DigitsDatasetInfo:
    """The digits demo dataset of ``data`` (``data.root``), built by rank 0 on first use."""
    return ensure_digits(data.root, image_size=data.image_size, seed=data.seed, rank=rank,
                         barrier=distributed.barrier)


def latent_cache_manifest(data: DataConfig) -> dict[str, Any]:
    """The manifest of ``data.latent_cache`` (a missing or unfinished cache is a clear error)."""
    return cache_shard_urls(data.latent_cache, options_of(data, data.latent_cache))[0]


def label_spec(data: DataConfig, num_classes: int) -> Optional[LabelSpec]:
    """Where the class labels of ``data`` are (``data.label_key``, ``data.label_map``); None without labels."""
    if not num_classes or data.label_key is None:
        return None
    names = read_label_map(data.label_map, num_classes) if data.label_map else None
    return LabelSpec(key=data.label_key, num_classes=num_classes, names=names)


def build_batches(data: DataConfig, *, micro_batch_size: int, gradient_accumulation: int, rank: int,
                  world_size: int, pin_memory: bool = False, caption_required: bool = True,
                  num_classes: int = 0) -> tuple[Batches, Optional[DigitsDatasetInfo]]:
    """The batch source of ``data`` for this rank, and the digits dataset's description when the
    data is the embedded digits (its classifier scores the demo's samples). ``caption_required=False``
    (a job that never reads captions) keeps samples whose caption is missing or empty. ``num_classes``
    > 0: the batches carry ``labels`` (B,) int64 read from ``data.label_key``."""
    labels = label_spec(data, num_classes)
    if data.kind == "digits":
        digits = digits_dataset(data, rank)
        if data.latent_cache:
            urls = cache_shard_urls(data.latent_cache, options_of(data, data.latent_cache))[1]
            samples = load_latent_cache(urls, caption_key=data.caption_key, storage_options=options_of(data, urls[0]),
                                        labels=labels)
            log.info("training data: %d cached latents %s from %s", len(samples.captions),
                     tuple(samples.latents.shape[1:]), data.latent_cache)
        else:
            samples = load_shards([digits.train_url], image_size=data.image_size, image_keys=list(data.image_keys),
                                  caption_key=data.caption_key, caption_required=caption_required, labels=labels)
            log.info("training data: %d samples from %s", len(samples.captions), digits.train_url)
        return InMemoryBatches(samples, data.seed, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                               gradient_accumulation=gradient_accumulation), digits
    spec = spec_from_config(data, micro_batch_size, caption_required=caption_required, labels=labels)
    log.info("streaming %s", ", ".join(f"{s.name}: {s.num_shards} shards" for s in spec.sources))
    if spec.buckets:
        log.info("aspect buckets (height x width): %s", ", ".join(f"{h}x{w}" for h, w in spec.buckets))
        if len(spec.buckets) == 1:
            log.warning("data.buckets.enabled=true gives a single bucket %dx%d (data.image_size=%d, "
                        "data.buckets.step=%d, data.buckets.max_ratio=%s): every image is cropped square; "
                        "lower the step or raise max_ratio for buckets of other aspect ratios",
                        *spec.buckets[0], data.image_size, data.buckets.step, data.buckets.max_ratio)
    return StreamingBatches(spec, rank=rank, world_size=world_size, gradient_accumulation=gradient_accumulation,
                            num_workers=data.num_workers, prefetch_factor=data.prefetch_factor,
                            pin_memory=pin_memory), None
