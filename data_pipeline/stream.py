"""Streaming LAION-style webdataset shards into training batches, with an exact, elastic position.

Layout of the work: a job of ``world_size`` ranks with ``num_workers`` dataloader workers each has
``world_size * max(num_workers, 1)`` *slots*. In each epoch, every source's shards are put in a
seeded order and dealt round-robin to the slots (``position.Progress.tasks``); a slot reads its
shards (``shards.read_shard``), passes raw samples through a seeded shuffle buffer, decodes them
(``decode``), groups them by aspect-ratio bucket when asked, and emits whole batches. Bad samples
become events ``(reason, identity)`` that ride along with the next batch, so the trainer counts them
exactly once, in the same place it records the samples it consumed.

Streams are infinite: a slot that finishes its shards of epoch ``e`` goes on with its shards of
``e + 1``; the position keeps every open epoch. ``mode=resampled`` draws shards with replacement
instead (no epochs; the position keeps counts only).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from data_pipeline.decode import BadSample, Filters, Transform, aspect_buckets, caption_of, decode_sample, metadata_of
from data_pipeline.latents import cache_shard_urls, decode_sample_parts
from data_pipeline.position import Progress, SourceInfo, SKIP_REASONS
from data_pipeline.shards import MemberLimits, ShardEnd, ShardTask, read_shard
from data_pipeline.sources import RetryPolicy, S3Options, check_readable, expand_urls, storage_options_for
from trainer.runtime import distributed

log = logging.getLogger(__name__)

MODES = ("epoch", "resampled")
EMPTY_PASSES_BEFORE_ERROR = 2


class EmptySourceError(RuntimeError):
    """A source yielded no usable sample in whole passes over its shards."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a slot needs to produce batches; built once from ``data.*`` and sent to workers."""

    sources: tuple[SourceInfo, ...]
    weights: tuple[float, ...]
    image_size: int
    batch_size: int
    image_keys: tuple[str, ...] = ("jpg", "png", "webp")
    caption_key: str = "txt"
    seed: int = 0
    mode: str = "epoch"
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    transform: Transform = field(default_factory=Transform)
    filters: Filters = field(default_factory=Filters)
    buckets: tuple[tuple[int, int], ...] = ()  # (height, width); empty = square image_size crops
    s3: S3Options = field(default_factory=S3Options)
    storage_options: tuple[tuple[str, Any], ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    latents: bool = False  # the shards are a latent cache (data_pipeline.latents), not images
    limits: MemberLimits = field(default_factory=MemberLimits)
    max_caption_chars: int = 0  # 0 = captions kept whole
    caption_required: bool = True  # False for jobs that never read captions (task=autoencoder)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.mode={self.mode!r}: expected one of {MODES}")
        if len(self.weights) != len(self.sources) or any(not w > 0 for w in self.weights):
            raise ValueError(f"data.sources weights {self.weights}: expected one float > 0 per source")

    def options_for(self, url: str) -> dict[str, Any]:
        return storage_options_for(url, self.s3, dict(self.storage_options))


def sample_position(*identity: int) -> int:
    """A 62-bit integer naming a sample (seeds its noise and timestep in the trainer)."""
    digest = hashlib.blake2b(np.asarray(identity, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class _Ref:
    """A raw sample in flight through a slot: identity and bytes."""

    source: int
    epoch: int
    shard: int
    index: int
    position: int
    key: str
    parts: dict[str, bytes]
    url: str
    skip: str = ""  # set by read_shard: oversized_* / duplicate_key


class _Events:
    def __init__(self) -> None:
        self.items: list[tuple] = []

    def take(self) -> list[tuple]:
        out, self.items = self.items, []
        return out


@dataclass
class _SourceStats:
    raw: int = 0
    decoded: int = 0
    good: int = 0
    passes: int = 0
    raw_first_pass: int = -1


class _Slot:
    """One slot's infinite batch stream."""

    def __init__(self, spec: StreamSpec, progress: Progress, slot: int, num_slots: int) -> None:
        self.spec, self.progress = spec, progress
        self.slot, self.num_slots = slot, num_slots
        self.events = _Events()
        self.stats = [_SourceStats() for _ in spec.sources]

    # -- raw samples of one source, epoch after epoch

    def _read(self, source: int, epoch: int, task: ShardTask, draw: int) -> Iterator[_Ref]:
        spec = self.spec
        for item in read_shard(task, spec.options_for(task.url), spec.retry, limits=spec.limits):
            if isinstance(item, ShardEnd):
                self.events.items.append(("end", source, epoch, task.shard, item.count, item.status))
                if item.status != "ok":
                    log.warning("shard %s is %s after %d samples (%s); skipped", task.url, item.status, item.count,
                                item.error)
                continue
            if spec.mode == "epoch":
                pos = sample_position(source, epoch, task.shard, item.index)
            else:
                pos = sample_position(source, self.progress.generation, self.slot, self.num_slots, draw, item.index)
            yield _Ref(source, epoch, task.shard, item.index, pos, item.key, item.parts, task.url, item.skip)

    def _source(self, source: int) -> Iterator[_Ref]:
        spec, info, stats = self.spec, self.spec.sources[source], self.stats[source]
        if spec.mode == "resampled":
            rng = np.random.default_rng([spec.seed, source, self.slot, self.num_slots, self.progress.generation, 0x5E5])
            draw = 0
            while True:
                raw_before = stats.raw
                for _ in range(info.num_shards):
                    shard = int(rng.integers(info.num_shards))
                    for ref in self._read(source, -1, ShardTask(shard, info.urls[shard]), draw):
                        stats.raw += 1
                        yield ref
                    draw += 1
                self._pass_done(source, stats.raw - raw_before)
        epoch = self.progress.first_open[source]
        while True:
            tasks = self.progress.tasks(source, epoch, self.slot, self.num_slots, spec.shuffle_shards)
            raw_before = stats.raw
            for task in tasks:
                for ref in self._read(source, epoch, task, 0):
                    stats.raw += 1
                    yield ref
            if tasks:
                self._pass_done(source, stats.raw - raw_before)
            epoch += 1

    def _pass_done(self, source: int, raw_in_pass: int) -> None:
        stats = self.stats[source]
        stats.passes += 1
        if stats.raw_first_pass < 0:
            stats.raw_first_pass = raw_in_pass
        if stats.passes >= EMPTY_PASSES_BEFORE_ERROR and stats.raw == 0:
            self._fail(source)

    def _check_usable(self, source: int) -> None:
        stats = self.stats[source]
        if stats.good == 0 and stats.passes >= EMPTY_PASSES_BEFORE_ERROR and stats.decoded >= stats.raw_first_pass:
            self._fail(source)

    def _fail(self, source: int) -> None:
        info = self.spec.sources[source]
        raise EmptySourceError(
            f"data source {info.name!r} ({info.num_shards} shards, e.g. {info.urls[0]}) gave no usable sample in "
            f"{self.stats[source].passes} passes over the shards of slot {self.slot}/{self.num_slots} "
            f"(raw samples read: {self.stats[source].raw}); check the URLs, credentials, data.image_keys="
            f"{list(self.spec.image_keys)}, data.caption_key={self.spec.caption_key!r} and the filters")

    # -- decoding

    def _decode(self, ref: _Ref) -> dict[str, Any] | None:
        spec = self.spec
        stats = self.stats[ref.source]
        stats.decoded += 1
        try:
            if ref.skip:
                raise BadSample(ref.skip)
            example = self._cached_example(ref) if spec.latents else self._image_example(ref)
        except BadSample as bad:
            log.debug("sample %s of %s skipped: %s", ref.key, ref.url, bad)
            self.events.items.append(("skip", ref.source, ref.epoch, ref.shard, ref.index, bad.reason))
            self._check_usable(ref.source)
            return None
        stats.good += 1
        example.update(key=ref.key, id=(ref.source, ref.epoch, ref.shard, ref.index), position=ref.position)
        return example

    def _image_example(self, ref: _Ref) -> dict[str, Any]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, ref.position & 0xFFFFFFFF, ref.position >> 32])
        out = decode_sample(ref.parts, image_keys=spec.image_keys, caption_key=spec.caption_key,
                            image_size=spec.image_size, transform=spec.transform, rng=rng,
                            filters=spec.filters, buckets=spec.buckets, max_caption_chars=spec.max_caption_chars,
                            caption_required=spec.caption_required)
        ex = out.example
        return {"bucket": out.bucket, "image": ex.image, "caption": out.caption,
                "original_size": ex.original_size, "crop_top_left": ex.crop_top_left}

    def _cached_example(self, ref: _Ref) -> dict[str, Any]:
        """A latent-cache sample (``data_pipeline.latents``): the posterior instead of pixels."""
        meta = metadata_of(ref.parts) or {}
        caption = caption_of(ref.parts, self.spec.caption_key, meta, self.spec.max_caption_chars)
        mean, logvar = decode_sample_parts(ref.parts)
        return {"bucket": tuple(mean.shape), "latent_mean": mean, "latent_logvar": logvar, "caption": caption,
                "original_size": tuple(meta.get("original_size", (0, 0))),
                "crop_top_left": tuple(meta.get("crop_top_left", (0, 0)))}

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "captions": [e["caption"] for e in examples], "keys": [e["key"] for e in examples],
            "ids": [e["id"] for e in examples], "positions": [e["position"] for e in examples],
            "original_size": torch.tensor([e["original_size"] for e in examples], dtype=torch.int64),
            "crop_top_left": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.int64),
            "events": self.events.take(), "slot": self.slot}
        if self.spec.latents:
            batch["latent_mean"] = torch.stack([e["latent_mean"] for e in examples])
            if all(e["latent_logvar"] is not None for e in examples):
                batch["latent_logvar"] = torch.stack([e["latent_logvar"] for e in examples])
        else:
            batch["images"] = torch.from_numpy(np.stack([e["image"] for e in examples])).permute(0, 3, 1, 2).contiguous()
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, self.slot, self.num_slots, self.progress.generation, 0xB0F])
        sources = [self._source(i) for i in range(len(spec.sources))]
        p = np.asarray(spec.weights, dtype=np.float64) / sum(spec.weights)
        buffer: list[_Ref] = []
        pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
        while True:
            i = 0 if len(sources) == 1 else int(rng.choice(len(sources), p=p))
            ref = next(sources[i])
            if spec.shuffle_buffer > 1:
                if len(buffer) < spec.shuffle_buffer:
                    buffer.append(ref)
                    continue
                j = int(rng.integers(len(buffer)))
                ref, buffer[j] = buffer[j], ref
            example = self._decode(ref)
            if example is None:
                continue
            group = pending[example["bucket"]]
            group.append(example)
            if len(group) == spec.batch_size:
                pending[example["bucket"]] = []
                yield self._collate(group)


class ShardStream(torch.utils.data.IterableDataset):
    """The batches of one rank: its slots are its dataloader workers (or itself without workers)."""

    def __init__(self, spec: StreamSpec, base_state: dict[str, Any] | None, *, rank: int, world_size: int,
                 num_workers: int) -> None:
        super().__init__()
        self.spec, self.base_state = spec, base_state
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        per_rank = max(self.num_workers, 1)
        slot = self.rank * per_rank + (info.id if info is not None else 0)
        progress = Progress(self.spec.sources, seed=self.spec.seed, mode=self.spec.mode)
        if self.base_state is not None:
            progress.load_state(self.base_state)
        return iter(_Slot(self.spec, progress, slot, self.world_size * per_rank))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def buckets_of(data: Any) -> tuple[tuple[int, int], ...]:
    """The aspect-ratio buckets of ``data.buckets`` (empty when bucketing is off)."""
    if not data.buckets.enabled:
        return ()
    return tuple(aspect_buckets(data.image_size, step=data.buckets.step, max_ratio=data.buckets.max_ratio))


def options_of(data: Any, url: str) -> dict[str, Any]:
    """fsspec options of ``data.*`` (``data.s3``, ``data.storage_options``) for ``url``."""
    return storage_options_for(url, data.s3, dict(data.storage_options or {}))


def member_limits(data: Any) -> MemberLimits:
    """``MemberLimits`` from ``data.*``: the caption part is ``data.caption_key`` unless it is a JSON field."""
    caption_ext = "json" if data.caption_key.startswith("json:") else data.caption_key
    return MemberLimits(image_exts=tuple(data.image_keys), caption_ext=caption_ext,
                        max_image_bytes=data.max_image_bytes, max_caption_bytes=data.max_caption_bytes,
                        max_member_bytes=data.max_member_bytes)


def spec_from_config(data: Any, batch_size: int, caption_required: bool = True) -> StreamSpec:
    """``StreamSpec`` from the trainer's ``DataConfig`` (``data.*``): URL patterns are expanded here."""
    s3 = data.s3
    extra = dict(data.storage_options or {})
    raw_sources = list(data.sources) or [{"name": "default", "urls": list(data.urls), "weight": 1.0}]
    if data.latent_cache:
        raw_sources = [{"name": "latents", "urls": cache_shard_urls(data.latent_cache,
                                                                     options_of(data, data.latent_cache))[1], "weight": 1.0}]
    sources, weights = [], []
    for i, src in enumerate(raw_sources):
        name = src.get("name") or f"source{i}"
        urls = src.get("urls")
        if not urls:
            raise ValueError(f"data.sources[{i}] ({name!r}) has no urls")
        sources.append(SourceInfo(name, tuple(expand_urls(urls, s3=s3, storage_options=extra))))
        weights.append(float(src.get("weight", 1.0)))
    for i, info in enumerate(sources):
        check_readable(info.urls[0], options_of(data, info.urls[0]),
                       RetryPolicy(max_retries=2), f"data source {info.name!r} (data.{'sources' if data.sources else 'urls'})")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.sources names must be unique, got {names}")
    f = data.filters
    filters = Filters(min_size=f.min_size, max_aspect_ratio=f.max_aspect_ratio,
                      min_caption_length=f.min_caption_length, max_caption_length=f.max_caption_length,
                      min_scores=tuple(sorted(dict(f.min_scores).items())),
                      max_scores=tuple(sorted(dict(f.max_scores).items())))
    return StreamSpec(
        sources=tuple(sources), weights=tuple(weights), image_size=data.image_size, batch_size=batch_size,
        image_keys=tuple(data.image_keys), caption_key=data.caption_key, seed=data.seed, mode=data.mode,
        shuffle_shards=data.shuffle_shards, shuffle_buffer=data.shuffle_buffer,
        transform=Transform(crop=data.crop, flip_prob=data.flip_prob, max_pixels=data.max_pixels, draft=data.draft),
        filters=filters, buckets=buckets_of(data), s3=s3, storage_options=tuple(sorted(extra.items())),
        retry=data.retry, latents=bool(data.latent_cache), limits=member_limits(data),
        max_caption_chars=data.max_caption_chars, caption_required=caption_required)


class StreamingBatches:
    """The trainer's view: micro-batches per optimizer step, the position to checkpoint, skip counts.

    The position records what :meth:`next_batch` handed out, so batches prefetched by workers but
    not consumed before a checkpoint are read again after a resume."""

    def __init__(self, spec: StreamSpec, *, rank: int, world_size: int, gradient_accumulation: int = 1,
                 num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False) -> None:
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.gradient_accumulation = gradient_accumulation
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        slots = world_size * max(num_workers, 1)
        if spec.mode == "epoch":
            for info in spec.sources:
                if info.num_shards < slots:
                    raise ValueError(
                        f"data source {info.name!r} has {info.num_shards} shard(s) but {world_size} rank(s) x "
                        f"{max(num_workers, 1)} worker(s) = {slots} readers need at least one each; lower "
                        f"data.num_workers, use data.mode=resampled, or split the data into more shards")
        self.progress = Progress(spec.sources, seed=spec.seed, mode=spec.mode)
        self._base_state: dict[str, Any] | None = None
        self._loader = None
        self._iter: Iterator[dict[str, Any]] | None = None
        self._captions: list[str] = []  # the first distinct captions seen, for sample grids

    def example_captions(self, n: int) -> list[str]:
        return self._captions[:n]

    # -- position

    def check_state(self, state: dict[str, Any]) -> None:
        self.progress.check_state(state)

    def load_state_dict(self, state: dict[str, Any], *, reset: bool = False) -> None:
        """Continue from a checkpoint's position (before the first batch); ``reset`` starts the data afresh."""
        if self._iter is not None:
            raise RuntimeError("load the data position before the first batch is drawn")
        if reset:
            log.warning("data.reset_position=true: the data starts afresh at epoch 0")
            return
        self.progress.load_state(state)
        self._base_state = state

    def state_dict(self, samples_seen: int | None = None) -> dict[str, Any]:
        """The job-wide position (collective: every rank must call it)."""
        return Progress.merged(distributed.all_gather_object(self.progress.to_state()), self.spec.sources)

    def skip_counts(self, device: torch.device | str = "cpu") -> dict[str, int]:
        """Job-wide skip counts by reason, this run included (collective)."""
        mine = self.progress.skipped
        local = torch.tensor([float(mine.get(r, 0)) for r in SKIP_REASONS], dtype=torch.float64)
        total = distributed.all_reduce_sum(local, device)
        base = self.progress.base_skipped
        return {r: int(total[i].item()) + int(base.get(r, 0)) for i, r in enumerate(SKIP_REASONS)}

    # -- batches

    def _start(self) -> None:
        dataset = ShardStream(self.spec, self._base_state, rank=self.rank, world_size=self.world_size,
                              num_workers=self.num_workers)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "worker_init_fn": _worker_init,
                      "persistent_workers": False}
        self._loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                   pin_memory=self.pin_memory, **kwargs)
        self._iter = iter(self._loader)

    def next_batch(self) -> dict[str, Any]:
        """The next batch of this rank (uint8 images), recorded as consumed."""
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        for event in batch.pop("events"):
            if event[0] == "skip":
                _, source, epoch, shard, index, reason = event
                self.progress.account(source, epoch, shard, index, reason)
            else:
                _, source, epoch, shard, count, status = event
                self.progress.end_shard(source, epoch, shard, count, status)
        for source, epoch, shard, index in batch["ids"]:
            self.progress.account(source, epoch, shard, index)
        if len(self._captions) < 64:
            self._captions.extend(c for c in dict.fromkeys(batch["captions"]) if c not in self._captions)
        return batch

    def step_batches(self, samples_seen: int | None = None) -> list[dict[str, Any]]:
        """``gradient_accumulation`` micro-batches with float images in [-1, 1]."""
        out = []
        for _ in range(self.gradient_accumulation):
            batch = self.next_batch()
            if "images" in batch:
                batch["images"] = batch["images"].float() / 127.5 - 1.0
            out.append(batch)
        return out

    def close(self) -> None:
        """Stop the workers now (not when the iterator is garbage collected)."""
        it, self._iter, self._loader = self._iter, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
