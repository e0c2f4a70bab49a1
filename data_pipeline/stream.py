"""Streaming LAION-style webdataset shards into training batches in one global order, whatever the
ranks and workers.

The order is defined in ``data_pipeline.position`` (canonical streams, windowed shuffle, seeded
mixing, units, the interleave); this module produces it. Each physical reader - a dataloader worker,
or the rank itself without workers - drives whole canonical streams (``_Stream``): reads their
shards (``shards.read_shard``), draws through the shuffle windows, decodes (``decode``), groups by
aspect-ratio bucket, and hands out units of one micro-batch each, every unit carrying its stream's
cursor after it and the skip events met on the way. ``StreamingBatches`` takes this rank's units in
global order and records the cursor of the last one consumed per stream, so the position is what
the trainer used, not what workers read ahead.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from data_pipeline.decode import (BadSample, Filters, LabelSpec, Transform, aspect_buckets, caption_of, decode_sample,
                                  LABEL_REASONS, label_hint, label_of, metadata_of)
from data_pipeline.latents import cache_shard_urls, decode_concat_part, decode_sample_parts, decode_text_part
from data_pipeline.position import (SKIP_REASONS, SOURCE_BLOCK, STREAMS_PER_READER, Position, SourceInfo,
                                    StreamCursor, SubCursor, default_streams, layouts_for, window_for, source_choices, stream_shards, window_order)
from data_pipeline.shards import MemberLimits, RawSample, ShardEnd, ShardTask, read_shard
from data_pipeline.sources import RetryPolicy, S3Options, check_readable, expand_urls, storage_options_for
from trainer.runtime import distributed
from trainer.runtime.lifecycle import StopWaiting

log = logging.getLogger(__name__)

MODES = ("epoch", "resampled")
EMPTY_PASSES_BEFORE_ERROR = 2


class EmptySourceError(RuntimeError):
    """A source yielded no usable sample in whole passes over its shards."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a reader needs to produce units; built once from ``data.*`` and sent to workers."""

    sources: tuple[SourceInfo, ...]
    weights: tuple[float, ...]
    image_size: int
    batch_size: int  # the micro-batch size: one unit of the global order
    image_keys: tuple[str, ...] = ("jpg", "png", "webp")
    caption_key: str = "txt"
    seed: int = 0
    mode: str = "epoch"
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000  # raw samples per shuffle window of each canonical stream and source
    transform: Transform = field(default_factory=Transform)
    filters: Filters = field(default_factory=Filters)
    buckets: tuple[tuple[int, int], ...] = ()  # (height, width); empty = square image_size crops
    s3: S3Options = field(default_factory=S3Options)
    storage_options: tuple[tuple[str, Any], ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    latents: bool = False  # the shards are a latent cache (data_pipeline.latents), not images
    num_streams: int = 0  # canonical streams at the first start; 0 = that start's ranks x workers
    limits: MemberLimits = field(default_factory=MemberLimits)
    max_caption_chars: int = 0  # 0 = captions kept whole
    caption_required: bool = True  # False for jobs that never read captions (task=autoencoder)
    exact_epochs: str = "auto"  # auto | true | false (position module docstring, "Exact epochs")
    labels: Optional[LabelSpec] = None  # class labels (data.label_key) for class-conditional jobs

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.mode={self.mode!r}: expected one of {MODES}")
        if self.exact_epochs not in ("auto", "true", "false"):
            raise ValueError(f"data.exact_epochs={self.exact_epochs!r}: expected auto, true or false")
        if self.exact_epochs == "true" and not self.whole_source_possible():
            raise ValueError("data.exact_epochs=true needs data.mode=epoch, one source, no aspect buckets and "
                             f"data.shuffle_buffer > 1 (got mode={self.mode!r}, {len(self.sources)} sources, "
                             f"{len(self.buckets)} buckets, shuffle_buffer={self.shuffle_buffer})")
        if len(self.weights) != len(self.sources) or any(not w > 0 for w in self.weights):
            raise ValueError(f"data.sources weights {self.weights}: expected one float > 0 per source")
        if self.num_streams < 0:
            raise ValueError(f"data.num_streams={self.num_streams}: expected 0 (the first start's readers) or more")

    def options_for(self, url: str) -> dict[str, Any]:
        return storage_options_for(url, self.s3, dict(self.storage_options))

    def whole_source_possible(self) -> bool:
        return self.mode == "epoch" and len(self.sources) == 1 and not self.buckets and self.shuffle_buffer > 1


def sample_position(*identity: int) -> int:
    """A 62-bit integer naming a sample (seeds its crop, flip, noise and timestep)."""
    digest = hashlib.blake2b(np.asarray(identity, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class _Ref:
    """A raw sample drawn by a stream: identity and bytes."""

    source: int
    epoch: int
    shard: int
    index: int
    position: int
    key: str
    parts: dict[str, bytes]
    url: str
    skip: str = ""  # set by read_shard: oversized_* / duplicate_key


class _SubStream:
    """One source's samples within one canonical stream: passes over its shards, drawn through
    seeded shuffle windows (``position`` module docstring)."""

    def __init__(self, spec: StreamSpec, source: int, stream: int, num_streams: int, window: int,
                 cursor: SubCursor, events: list[tuple]) -> None:
        self.spec, self.source, self.stream, self.num_streams = spec, source, stream, num_streams
        self.info = spec.sources[source]
        self.cursor = SubCursor(**vars(cursor))
        self.events = events
        self.window_size = window
        self.window: Optional[list[tuple[int, RawSample]]] = None
        self._next_start = (0, 0)
        self._gen: Optional[Iterator[tuple[int, RawSample]]] = None
        self._shards_of: tuple[int, list[int]] = (-1, [])
        # Resuming inside a window: the shard events met while it was first filled were counted then.
        self._quiet = cursor.taken > 0
        self.passes = 0
        self.raw_in_pass = 0
        self.empty_passes = 0
        self.statuses: list[str] = []

    def shards(self, epoch: int) -> list[int]:
        if self._shards_of[0] != epoch:
            spec = self.spec
            self._shards_of = (epoch, stream_shards(self.info.num_shards, seed=spec.seed, source=self.source,
                                                    stream=self.stream, num_streams=self.num_streams, epoch=epoch,
                                                    mode=spec.mode, shuffle=spec.shuffle_shards))
        return self._shards_of[1]

    def _raw(self, epoch: int, shard_pos: int, index: int) -> Iterator[tuple[int, RawSample]]:
        """The raw samples of pass ``epoch`` from sample ``index`` of its shard number ``shard_pos`` on."""
        shards = self.shards(epoch)
        for pos in range(shard_pos, len(shards)):
            url = self.info.urls[shards[pos]]
            task = ShardTask(shards[pos], url, hi=index if pos == shard_pos else 0)
            for item in read_shard(task, self.spec.options_for(url), self.spec.retry, limits=self.spec.limits):
                if isinstance(item, ShardEnd):
                    self.statuses.append(item.status)
                    if item.status != "ok" and not self._quiet:
                        self.events.append(("shard", item.status, url))
                        if item.status == "unreadable":
                            log.warning("shard %s given up after %d samples and every retry (%s); the one event "
                                        "that makes this run's data differ from an uninterrupted run's", url,
                                        item.count, item.error)
                        else:
                            log.warning("shard %s is %s after %d samples (%s); the rest of it is skipped", url,
                                        item.status, item.count, item.error)
                    continue
                yield pos, item

    def _open_window(self) -> None:
        c = self.cursor
        while True:
            if self._gen is None:
                self._gen = self._raw(c.epoch, c.shard_pos, c.index)
            items = list(itertools.islice(self._gen, self.window_size))
            self._quiet = False
            if items:
                break
            self._pass_done()
            c.epoch, c.window, c.shard_pos, c.index, c.taken = c.epoch + 1, 0, 0, 0, 0
            self._gen = None
        self.raw_in_pass += len(items)
        order = window_order(len(items), seed=self.spec.seed, source=self.source, stream=self.stream,
                             epoch=c.epoch, window=c.window)
        self.window = [items[i] for i in order]
        last_pos, last = items[-1]
        self._next_start = (last_pos, last.index + 1)

    def _pass_done(self) -> None:
        self.passes += 1
        self.empty_passes = self.empty_passes + 1 if self.raw_in_pass == 0 else 0
        if self.empty_passes >= EMPTY_PASSES_BEFORE_ERROR:
            shards = self.shards(self.cursor.epoch)
            statuses = dict(sorted(((s, self.statuses.count(s)) for s in set(self.statuses)), key=str))
            raise EmptySourceError(
                f"data source {self.info.name!r} ({self.info.num_shards} shards, e.g. {self.info.urls[0]}) gave no "
                f"usable sample: every shard of canonical stream {self.stream}/{self.num_streams} failed in {self.empty_passes} passes "
                f"in a row ({len(shards)} shard(s) a pass, e.g. {self.info.urls[shards[0]] if shards else '-'}; "
                f"shard ends: {statuses}); check the URLs, the credentials and data.retry")
        self.raw_in_pass = 0

    def draw(self) -> _Ref:
        c = self.cursor
        while True:
            if self.window is None:
                self._open_window()
            if c.taken < len(self.window):
                pos, raw = self.window[c.taken]
                c.taken += 1
                return self._ref(pos, raw)
            c.window, (c.shard_pos, c.index), c.taken = c.window + 1, self._next_start, 0
            self.window = None

    def _ref(self, pos: int, raw: RawSample) -> _Ref:
        epoch = self.cursor.epoch
        shard = self.shards(epoch)[pos]
        if self.spec.mode == "epoch":
            position = sample_position(self.source, epoch, shard, raw.index)
        else:  # a shard may be drawn twice: the draw names the sample
            position = sample_position(self.source, -1 - self.stream, epoch, pos, raw.index)
        return _Ref(self.source, epoch, shard, raw.index, position, raw.key, raw.parts, self.info.urls[shard], raw.skip)


class _Stream:
    """One canonical stream: its sources' sub-streams mixed by seeded draws, decoded, grouped by bucket
    into units of ``spec.batch_size`` samples."""

    def __init__(self, spec: StreamSpec, stream: int, num_streams: int, window: int, cursor: StreamCursor) -> None:
        self.spec, self.stream = spec, stream
        self.events: list[tuple] = []
        self.subs = [_SubStream(spec, i, stream, num_streams, window, cursor.subs[i], self.events)
                     for i in range(len(spec.sources))]
        self.draws = cursor.draws
        self.good = [0] * len(spec.sources)
        self.warned: set[str] = set()  # LABEL_REASONS already logged as a warning
        self._choices: tuple[int, np.ndarray] = (-1, np.zeros(0))
        self.pending: dict[tuple[int, ...], list[dict[str, Any]]] = defaultdict(list)
        for bucket, ids in cursor.pending.items():
            self.pending[bucket] = self._refetch(ids)

    def _source(self, draw: int) -> int:
        if len(self.subs) == 1:
            return 0
        block = draw // SOURCE_BLOCK
        if self._choices[0] != block:
            self._choices = (block, source_choices(self.spec.weights, seed=self.spec.seed, stream=self.stream,
                                                   block=block))
        return int(self._choices[1][draw % SOURCE_BLOCK])

    def next_unit(self) -> tuple[list[dict[str, Any]], list[tuple], dict[str, Any]]:
        """The stream's next unit: its examples, the skip events met since the last unit, the cursor after it."""
        while True:
            source = self._source(self.draws)
            self.draws += 1
            ref = self.subs[source].draw()
            example = self._decode(ref)
            if example is None:
                continue
            group = self.pending[example["bucket"]]
            group.append(example)
            if len(group) == self.spec.batch_size:
                del self.pending[example["bucket"]]
                events, self.events[:] = list(self.events), []
                return group, events, self.cursor().to_state()

    def cursor(self) -> StreamCursor:
        pending = {b: [e["pending"] for e in group] for b, group in self.pending.items() if group}
        return StreamCursor(self.draws, [SubCursor(**vars(s.cursor)) for s in self.subs], pending)

    def _refetch(self, ids: list[tuple]) -> list[dict[str, Any]]:
        """Samples that were waiting in a bucket group at the checkpoint, read again by identity."""
        wanted: dict[tuple[int, int], set[int]] = defaultdict(set)
        for source, _, shard, index, _ in ids:
            wanted[(source, shard)].add(index)
        found: dict[tuple[int, int, int], RawSample] = {}
        for (source, shard), indices in wanted.items():
            url = self.spec.sources[source].urls[shard]
            task = ShardTask(shard, url, hi=max(indices) + 1, holes=frozenset(indices))
            for item in read_shard(task, self.spec.options_for(url), self.spec.retry, limits=self.spec.limits):
                if isinstance(item, RawSample) and item.index in indices:
                    found[(source, shard, item.index)] = item
        out = []
        for source, epoch, shard, index, position in ids:
            raw = found.get((source, shard, index))
            example = None
            if raw is not None:
                url = self.spec.sources[source].urls[shard]
                ref = _Ref(source, epoch, shard, index, position, raw.key, raw.parts, url, raw.skip)
                example = self._decode(ref, quiet=True)
            if example is None:
                log.warning("sample %d of shard %s waited in a bucket group at the checkpoint and could not be read "
                            "again; skipped (this run's data now differs from an uninterrupted run's)", index,
                            self.spec.sources[source].urls[shard])
                continue
            out.append(example)
        return out

    # -- decoding

    def _decode(self, ref: _Ref, quiet: bool = False) -> Optional[dict[str, Any]]:
        spec = self.spec
        sub = self.subs[ref.source]
        try:
            if ref.skip:
                raise BadSample(ref.skip)
            example = self._cached_example(ref) if spec.latents else self._image_example(ref)
        except BadSample as bad:
            if not quiet:
                if bad.reason in LABEL_REASONS and bad.reason not in self.warned:
                    self.warned.add(bad.reason)
                    log.warning("sample %s of %s skipped: %s (further ones are counted as data/skipped_%s)",
                                ref.key, ref.url, bad, bad.reason)
                else:
                    log.debug("sample %s of %s skipped: %s", ref.key, ref.url, bad)
                self.events.append(("skip", bad.reason))
                if self.good[ref.source] == 0 and sub.passes >= EMPTY_PASSES_BEFORE_ERROR:
                    self._fail(ref.source)
            return None
        self.good[ref.source] += 1
        example.update(key=ref.key, id=(ref.source, ref.epoch, ref.shard, ref.index), position=ref.position,
                       pending=(ref.source, ref.epoch, ref.shard, ref.index, ref.position))
        return example

    def _fail(self, source: int) -> None:
        info = self.spec.sources[source]
        raise EmptySourceError(
            f"data source {info.name!r} ({info.num_shards} shards, e.g. {info.urls[0]}) gave no usable sample in "
            f"{self.subs[source].passes} passes over the shards of canonical stream {self.stream}; check the URLs, "
            f"credentials, data.image_keys={list(self.spec.image_keys)}, data.caption_key={self.spec.caption_key!r}"
            f"{label_hint(self.spec.labels)} and the filters")

    def _image_example(self, ref: _Ref) -> dict[str, Any]:
        return image_example(self.spec, ref)

    def _cached_example(self, ref: _Ref) -> dict[str, Any]:
        return cached_example(self.spec, ref)


def image_example(spec: StreamSpec, ref: _Ref) -> dict[str, Any]:
    """An image sample decoded, cropped and flipped by draws keyed by its position (raises BadSample)."""
    rng = np.random.default_rng([spec.seed, ref.position & 0xFFFFFFFF, ref.position >> 32])
    out = decode_sample(ref.parts, image_keys=spec.image_keys, caption_key=spec.caption_key,
                        image_size=spec.image_size, transform=spec.transform, rng=rng,
                        filters=spec.filters, buckets=spec.buckets, max_caption_chars=spec.max_caption_chars,
                        caption_required=spec.caption_required)
    ex = out.example
    label = label_of(ref.parts, spec.labels, metadata_of(ref.parts)) if spec.labels is not None else None
    return {"bucket": (out.bucket,), "image": ex.image, "caption": out.caption, "label": label,
            "original_size": ex.original_size, "crop_top_left": ex.crop_top_left}


def cached_example(spec: StreamSpec, ref: _Ref) -> dict[str, Any]:
    """A latent-cache sample (``data_pipeline.latents``): the posterior instead of pixels."""
    meta = metadata_of(ref.parts) or {}
    caption = caption_of(ref.parts, spec.caption_key, meta, spec.max_caption_chars, spec.caption_required)
    label = label_of(ref.parts, spec.labels, meta) if spec.labels is not None else None
    mean, logvar = decode_sample_parts(ref.parts)
    return {"bucket": tuple(mean.shape), "latent_mean": mean, "latent_logvar": logvar, "caption": caption,
            "label": label, "text_context": decode_text_part(ref.parts), "concat_input": decode_concat_part(ref.parts),
            "original_size": tuple(meta.get("original_size", (0, 0))),
            "crop_top_left": tuple(meta.get("crop_top_left", (0, 0)))}


def _example(spec: StreamSpec, ref: _Ref) -> dict[str, Any]:
    """The decoded sample of ``ref`` (raises BadSample for a skipped one)."""
    if ref.skip:
        raise BadSample(ref.skip)
    return cached_example(spec, ref) if spec.latents else image_example(spec, ref)


class _WholeSource:
    """Every raw sample of a small source (``data.exact_epochs``), read once per reader process in shard
    order and held in memory, each one's usability, and the damaged shards; the streams a reader
    drives share it."""

    def __init__(self, spec: StreamSpec) -> None:
        info = spec.sources[0]
        self.spec, self.info = spec, info
        self.raw: list[tuple[int, RawSample]] = []  # (shard, sample) in shard order, tar order
        self.damaged: list[tuple[int, str, str]] = []  # (shard, status, url) of shards that did not end "ok"
        for shard, url in enumerate(info.urls):
            for item in read_shard(ShardTask(shard, url), spec.options_for(url), spec.retry, limits=spec.limits):
                if isinstance(item, ShardEnd):
                    if item.status == "unreadable":
                        raise RuntimeError(
                            f"shard {url} could not be read after every retry ({item.error}); with data.exact_epochs "
                            f"every reader reads every shard of source {info.name!r}, and a shard that one reader "
                            f"cannot read would make the readers disagree on the order: fix the storage or set "
                            f"data.exact_epochs=false")
                    if item.status != "ok":
                        self.damaged.append((shard, item.status, url))
                    continue
                self.raw.append((shard, item))
                if len(self.raw) > spec.shuffle_buffer:
                    raise ValueError(
                        f"data source {info.name!r} ({info.num_shards} shards) holds more than data.shuffle_buffer="
                        f"{spec.shuffle_buffer} raw samples; data.exact_epochs reads a whole source into each reader's "
                        f"shuffle buffer: raise data.shuffle_buffer to the source's sample count (memory: that many "
                        f"raw samples per reader), or set data.exact_epochs=false and give the source at least as many "
                        f"shards as canonical streams")
        self.bad: list[str] = []  # the skip reason of each raw sample, "" when usable
        for shard, raw in self.raw:
            try:
                _example(spec, self.ref(0, shard, raw))
                self.bad.append("")
            except BadSample as bad:
                if bad.reason in LABEL_REASONS and bad.reason not in self.bad:
                    log.warning("sample %s of %s skipped: %s (further ones are counted as data/skipped_%s)",
                                raw.key, info.urls[shard], bad, bad.reason)
                self.bad.append(bad.reason)
        self.usable = np.asarray([i for i, reason in enumerate(self.bad) if not reason], dtype=np.int64)
        if not len(self.usable):
            raise EmptySourceError(
                f"data source {info.name!r} ({info.num_shards} shards, e.g. {info.urls[0]}) has no usable sample "
                f"among its {len(self.raw)} (skipped: {dict(Counter(self.bad))}); check data.image_keys="
                f"{list(spec.image_keys)}, data.caption_key={spec.caption_key!r}{label_hint(spec.labels)} and the "
                f"filters")
        self._orders: dict[int, np.ndarray] = {}

    def ref(self, epoch: int, shard: int, raw: RawSample) -> _Ref:
        position = sample_position(0, epoch, shard, raw.index)
        return _Ref(0, epoch, shard, raw.index, position, raw.key, raw.parts, self.info.urls[shard], raw.skip)

    def order(self, epoch: int) -> np.ndarray:
        """Raw-sample indices of epoch ``epoch``: one seeded permutation of the usable samples."""
        if epoch not in self._orders:
            perm = np.random.default_rng([self.spec.seed, 0, epoch, 0xE4AC7]).permutation(len(self.usable))
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # a unit spans <= 2 epochs
            self._orders[epoch] = self.usable[perm]
        return self._orders[epoch]

    def events(self) -> list[tuple]:
        """The skip events of one epoch: every bad sample and damaged shard."""
        return ([("shard", status, url) for _, status, url in self.damaged]
                + [("skip", reason) for reason in self.bad if reason])


class _ExactEpochStream:
    """Canonical stream ``stream`` of an exact-epoch source: global units ``u = j * K + stream`` of
    the epochs' permutations of the whole source (position module docstring, "Exact epochs")."""

    def __init__(self, spec: StreamSpec, stream: int, num_streams: int, whole: _WholeSource,
                 cursor: StreamCursor) -> None:
        self.spec, self.stream, self.num_streams, self.whole = spec, stream, num_streams, whole
        self.units = cursor.draws  # units handed out
        self.epoch = cursor.subs[0].epoch if cursor.subs else 0  # of the last sample handed out

    def next_unit(self) -> tuple[list[dict[str, Any]], list[tuple], dict[str, Any]]:
        whole, size = self.whole, self.spec.batch_size
        unit = self.units * self.num_streams + self.stream
        examples, events = [], []
        for g in range(unit * size, (unit + 1) * size):
            epoch, offset = divmod(g, len(whole.usable))
            if offset == 0:  # the unit that opens an epoch reports its skips: once per epoch job-wide
                events += whole.events()
            shard, raw = whole.raw[int(whole.order(epoch)[offset])]
            ref = whole.ref(epoch, shard, raw)
            try:
                example = _example(self.spec, ref)
            except BadSample as bad:  # usable when the source was read: the same bytes decode the same way
                raise RuntimeError(f"sample {ref.key} of {ref.url} decoded when the source was read but not now "
                                   f"({bad}); its decoding is not deterministic") from None
            example.update(key=ref.key, id=(0, epoch, shard, raw.index), position=ref.position,
                           pending=(0, epoch, shard, raw.index, ref.position))
            examples.append(example)
            self.epoch = epoch
        self.units += 1
        return examples, events, self.cursor().to_state()

    def cursor(self) -> StreamCursor:
        return StreamCursor(self.units, [SubCursor(epoch=self.epoch)], {})


def collate(spec: StreamSpec, examples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "captions": [e["caption"] for e in examples], "keys": [e["key"] for e in examples],
        "ids": [e["id"] for e in examples], "positions": [e["position"] for e in examples],
        "original_size": torch.tensor([e["original_size"] for e in examples], dtype=torch.int64),
        "crop_top_left": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.int64)}
    if spec.labels is not None:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.int64)  # (B,)
    if spec.latents:
        batch["latent_mean"] = torch.stack([e["latent_mean"] for e in examples])
        if all(e["latent_logvar"] is not None for e in examples):
            batch["latent_logvar"] = torch.stack([e["latent_logvar"] for e in examples])
        if all(e["text_context"] is not None for e in examples):
            batch["text_context"] = torch.stack([e["text_context"] for e in examples])
        if all(e["concat_input"] is not None for e in examples):
            batch["concat_input"] = torch.stack([e["concat_input"] for e in examples])  # (B, C_concat, h, w)
    else:
        batch["images"] = torch.from_numpy(np.stack([e["image"] for e in examples])).permute(0, 3, 1, 2).contiguous()
    return batch


@dataclass(frozen=True)
class ReaderPlan:
    """Which canonical streams reader ``worker`` of rank ``rank`` drives, and where it starts.

    Rank ``r`` consumes global units ``i = r + m * R`` for ``m = m0, m0 + 1, ...``; unit ``m`` comes
    from worker ``m % W`` and stream ``i % K``, so worker ``w`` drives streams ``r + w * R + n * R * W``
    and hands out one unit of each in turn."""

    num_streams: int
    window: int  # samples per shuffle window
    rank: int
    world_size: int
    workers: int  # readers of the rank (max(num_workers, 1))
    start: int  # m0: units this rank consumed before this session
    exact: bool = False  # whole-source streams (data.exact_epochs)

    def streams(self, worker: int) -> list[int]:
        readers = self.world_size * self.workers
        return list(range(self.rank + worker * self.world_size, self.num_streams, readers))

    def first(self, worker: int) -> int:
        """The m of the first unit ``worker`` hands out."""
        return self.start + (worker - self.start) % self.workers

    def stream_of(self, m: int) -> int:
        return (self.rank + m * self.world_size) % self.num_streams


class ShardStream(torch.utils.data.IterableDataset):
    """The units of one rank: each dataloader worker (or the rank itself without workers) drives its
    canonical streams in turn and yields one unit (a collated micro-batch) at a time."""

    def __init__(self, spec: StreamSpec, plan: ReaderPlan, cursors: list[StreamCursor]) -> None:
        super().__init__()
        self.spec, self.plan, self.cursors = spec, plan, cursors

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        plan = self.plan
        mine = plan.streams(worker)
        if plan.exact:
            whole = _WholeSource(self.spec)
            streams: dict[int, Any] = {k: _ExactEpochStream(self.spec, k, plan.num_streams, whole, self.cursors[k])
                                       for k in mine}
        else:
            streams = {k: _Stream(self.spec, k, plan.num_streams, plan.window, self.cursors[k]) for k in mine}
        m = plan.first(worker)
        while True:
            k = plan.stream_of(m)
            examples, events, cursor = streams[k].next_unit()
            batch = collate(self.spec, examples)
            batch.update(stream=k, m=m, worker=worker, events=events, cursor=cursor)
            yield batch
            m += plan.workers


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


def spec_from_config(data: Any, batch_size: int, caption_required: bool = True,
                     labels: Optional[LabelSpec] = None) -> StreamSpec:
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
        retry=data.retry, latents=bool(data.latent_cache), num_streams=data.num_streams, limits=member_limits(data),
        max_caption_chars=data.max_caption_chars, caption_required=caption_required,
        exact_epochs=data.exact_epochs, labels=labels)


class StreamingBatches:
    """The trainer's view: micro-batches per optimizer step, the position to checkpoint, skip counts.

    Rank ``rank`` takes the global units ``i`` with ``i % world_size == rank`` in order (the
    ``position`` module docstring); the position records the cursor after the last unit handed out per
    stream, so units prefetched by workers but not consumed before a checkpoint are read again after
    a resume. ``stop_requested``, when given, is polled while waiting for data: a stop signal then
    ends the wait with ``StopWaiting`` instead of waiting out slow storage."""

    def __init__(self, spec: StreamSpec, *, rank: int, world_size: int, gradient_accumulation: int = 1,
                 num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
                 stop_requested: Optional[Callable[[], bool]] = None, poll_s: float = 5.0) -> None:
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.gradient_accumulation = gradient_accumulation
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.readers = max(num_workers, 1)
        self.stop_requested, self.poll_s = stop_requested, poll_s
        readers = world_size * self.readers
        k = spec.num_streams or default_streams(readers, min(info.num_shards for info in spec.sources))
        exact = spec.exact_epochs == "true" or (spec.exact_epochs == "auto" and spec.whole_source_possible()
                                                and spec.sources[0].num_shards < k)
        if exact and not spec.num_streams:  # whole-source streams need no shards of their own: room to grow
            k = default_streams(readers, readers * STREAMS_PER_READER[0])
        self.position = Position(spec.sources, seed=spec.seed, mode=spec.mode, num_streams=k,
                                 unit_size=spec.batch_size,
                                 window=window_for(spec.shuffle_buffer, k if spec.num_streams else readers, k))
        self.position.exact_epochs = exact
        # A resume takes the number of streams from its position; a fresh start is checked before its
        # first batch (``_start``), and here when data.num_streams names it.
        if spec.num_streams:
            self._check_layout()
        self._loader = None
        self._iter: Optional[Iterator[dict[str, Any]]] = None
        self._stash: dict[int, deque] = defaultdict(deque)  # units of other workers, received early
        self._m = 0  # this rank's next unit: global unit rank + m * world_size
        self._captions: list[str] = []  # the first distinct captions seen, for sample grids

    @property
    def num_streams(self) -> int:
        return self.position.num_streams

    def _check_layout(self) -> None:
        k, readers = self.num_streams, self.world_size * self.readers
        if k % readers:
            raise ValueError(
                f"the data position has {k} canonical streams, which {self.world_size} rank(s) x {self.readers} "
                f"reader(s) per rank = {readers} readers cannot share evenly (each reader drives whole streams); "
                f"layouts that continue this run's exact order (ranks x data.num_workers, 1 = the rank reads itself): "
                f"{', '.join(layouts_for(k))}")
        if self.spec.mode == "epoch" and not self.position.exact_epochs:
            for info in self.spec.sources:
                if info.num_shards < k:
                    raise ValueError(
                        f"data source {info.name!r} has {info.num_shards} shard(s) but {k} canonical streams need "
                        f"at least one each in every epoch; set data.num_streams (now {self.spec.num_streams}, 0 = "
                        f"ranks x workers) to at most {info.num_shards}, lower data.num_workers, use "
                        f"data.mode=resampled, data.exact_epochs=true (a small source: every reader reads all of "
                        f"it) or split the data into more shards")

    def example_captions(self, n: int) -> list[str]:
        return self._captions[:n]

    def watch_stop(self, requested: Callable[[], bool]) -> None:
        """Poll ``requested`` while waiting for data (dataloader workers only: without them the rank
        itself reads, and a retry's backoff finishes first)."""
        self.stop_requested = requested

    # -- position

    def check_state(self, state: dict[str, Any]) -> None:
        self.position.check_state(state)

    def load_state_dict(self, state: dict[str, Any], *, reset: bool = False) -> None:
        """Continue from a checkpoint's position (before the first batch); ``reset`` starts the data afresh."""
        if self._iter is not None:
            raise RuntimeError("load the data position before the first batch is drawn")
        if reset:
            log.warning("data.reset_position=true: the data starts afresh at epoch 0")
            return
        self.position.load_state(state)
        if self.spec.num_streams and self.spec.num_streams != self.num_streams:
            log.warning("data.num_streams=%d is ignored: the position was started with %d canonical streams, "
                        "which a resumed run keeps", self.spec.num_streams, self.num_streams)
        log.info("data position: %d canonical streams, shuffle windows of %d samples (kept from the first start), "
                 "%d global units consumed", self.num_streams, self.position.window, self.position.units_consumed)
        self._check_layout()
        consumed = self.position.units_consumed
        assert consumed % self.world_size == 0, (consumed, self.world_size)
        self._m = consumed // self.world_size

    def own_streams(self) -> list[int]:
        return list(range(self.rank, self.num_streams, self.world_size))

    def local_state(self) -> dict[str, Any]:
        """This rank's part of the position (its streams' cursors)."""
        self.position.units_consumed = self._m * self.world_size
        return self.position.to_state(self.own_streams())

    def state_dict(self, samples_seen: int | None = None) -> dict[str, Any]:
        """The job-wide position (collective: every rank must call it)."""
        return Position.merged(distributed.all_gather_object(self.local_state()))

    def skip_counts(self, device: torch.device | str = "cpu") -> dict[str, int]:
        """Job-wide skip counts by reason, this run included (collective)."""
        mine = self.position.skipped
        local = torch.tensor([float(mine.get(r, 0)) for r in SKIP_REASONS], dtype=torch.float64)
        total = distributed.all_reduce_sum(local, device)
        base = self.position.base_skipped
        return {r: int(total[i].item()) + int(base.get(r, 0)) for i, r in enumerate(SKIP_REASONS)}

    # -- batches

    def _start(self) -> None:
        self._check_layout()
        plan = ReaderPlan(self.num_streams, self.position.window, self.rank, self.world_size, self.readers, self._m,
                          exact=self.position.exact_epochs)
        dataset = ShardStream(self.spec, plan, self.position.cursors)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "worker_init_fn": _worker_init,
                      "persistent_workers": False}
            if self.stop_requested is not None:
                kwargs["timeout"] = self.poll_s
        self._loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                   pin_memory=self.pin_memory, **kwargs)
        self._iter = iter(self._loader)

    def _receive(self) -> dict[str, Any]:
        while True:
            try:
                return next(self._iter)
            except RuntimeError as e:
                # The loader's timeout is only a poll for stop signals while storage is slow.
                if self.stop_requested is None or "timed out" not in str(e):
                    raise
                if self.stop_requested():
                    raise StopWaiting("a stop signal arrived while waiting for data") from None

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch of this rank (uint8 images), recorded as consumed."""
        if self._iter is None:
            self._start()
        worker = self._m % self.readers
        while not self._stash[worker]:
            unit = self._receive()
            self._stash[unit["worker"]].append(unit)
        batch = self._stash[worker].popleft()
        k = (self.rank + self._m * self.world_size) % self.num_streams
        assert (batch["m"], batch["stream"]) == (self._m, k), (batch["m"], batch["stream"], self._m, k)
        for event in batch.pop("events"):
            self.position.count(event)
        self.position.cursors[k] = StreamCursor.from_state(batch.pop("cursor"))
        self.position.delivered += len(batch["keys"])
        self._m += 1
        for key in ("m", "worker"):
            batch.pop(key)
        batch["unit"] = self.rank + (self._m - 1) * self.world_size  # its index in the global order
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
        self._stash.clear()
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
