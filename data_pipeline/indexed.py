"""A small shard set held in memory, read in a global order that any world size can resume.

For datasets that fit in RAM (the embedded digits demo, tests, small fine-tunes). The order of
samples is a function of ``(seed, epoch)`` only: step ``s`` of the job consumes global positions
``[s * B, (s + 1) * B)`` of the concatenated per-epoch permutations, and rank ``r`` of ``W`` takes
the ``r``-th contiguous slice of those. The whole data position is therefore one integer (samples
seen), and a job resumed on another number of ranks continues with exactly the samples the
uninterrupted job would have used.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from data_pipeline.decode import (LABEL_REASONS, BadSample, LabelSpec, Transform, caption_of, decode_sample, label_hint,
                                  label_of, metadata_of)
from data_pipeline.latents import decode_concat_part, decode_sample_parts, decode_text_part
from data_pipeline.shards import ShardTask, read_samples
from data_pipeline.sources import RetryPolicy, expand_urls

log = logging.getLogger(__name__)


@dataclass
class Samples:
    images: torch.Tensor | None  # (N, 3, S, S) uint8; None for a latent cache
    captions: list[str]
    keys: list[str]
    skipped: Counter = field(default_factory=Counter)
    latents: torch.Tensor | None = None  # (N, C, h, w) posterior means of a latent cache
    text_contexts: torch.Tensor | None = None  # (N, L, D) a frozen text encoder's cached outputs
    concat_inputs: torch.Tensor | None = None  # (N, C_concat, h, w) a concat task's cached concat inputs
    labels: torch.Tensor | None = None  # (N,) int64 class labels (data.label_key), for class conditioning


def _count_skip(skipped: Counter, bad: BadSample, key: str, url: str) -> None:
    """Count a skipped sample; the first of each label reason is a warning naming the sample (see LABEL_REASONS)."""
    if bad.reason in LABEL_REASONS and not skipped[bad.reason]:
        log.warning("sample %s of %s skipped: %s (further ones are counted as data/skipped_%s)", key, url, bad,
                    bad.reason)
    skipped[bad.reason] += 1


def load_latent_cache(urls: list[str], *, caption_key: str = "txt", storage_options: dict | None = None,
                      labels: LabelSpec | None = None) -> Samples:
    """Every sample of a latent cache's shards in memory, in shard order (a mean-only or
    deterministic posterior: the mode is what in-memory training uses); with ``labels``, each
    sample's class (a sample without a valid one is skipped and counted)."""
    means, captions, keys, contexts, concats, classes = [], [], [], [], [], []
    skipped: Counter = Counter()
    tasks = [ShardTask(shard, url) for shard, url in enumerate(urls)]
    for task, item in read_samples(tasks, storage_options or {}, RetryPolicy(max_retries=2), skipped):
        try:
            mean, logvar = decode_sample_parts(item.parts)
            context = decode_text_part(item.parts)
            concat = decode_concat_part(item.parts)
            meta = metadata_of(item.parts)
            caption = caption_of(item.parts, caption_key, meta, required=labels is None)
            if labels is not None:
                classes.append(label_of(item.parts, labels, meta))
        except BadSample as bad:
            _count_skip(skipped, bad, item.key, task.url)
            continue
        if logvar is not None:
            raise ValueError(f"{task.url} stores posterior variances: an in-memory run trains on means only; "
                             f"precompute with precompute.store=mean, or stream it with data.kind=webdataset")
        means.append(mean)
        contexts.append(context)
        concats.append(concat)
        captions.append(caption)
        keys.append(item.key)
    if not means:
        raise ValueError(f"no usable samples in the latent cache {urls[:3]} (skipped: {dict(skipped)})"
                         + (f"; check{label_hint(labels)[1:]}" if labels is not None else ""))
    text = torch.stack(contexts) if all(c is not None for c in contexts) else None
    concat_inputs = torch.stack(concats) if all(c is not None for c in concats) else None
    return Samples(images=None, captions=captions, keys=keys, skipped=skipped, latents=torch.stack(means),
                   text_contexts=text, concat_inputs=concat_inputs,
                   labels=torch.tensor(classes, dtype=torch.int64) if labels is not None else None)


def load_shards(urls: list[str] | str, *, image_size: int, image_keys: list[str], caption_key: str,
                storage_options: dict | None = None, caption_required: bool = True,
                labels: LabelSpec | None = None) -> Samples:
    """Read every sample of the shards into memory (center crops); bad samples are skipped and counted
    by reason, with the same reader and decoder as the streaming pipeline. With ``labels``, each
    sample's class too (a missing or invalid label is a bad sample)."""
    images, captions, keys, classes = [], [], [], []
    skipped: Counter = Counter()
    transform = Transform(crop="center")
    rng = np.random.default_rng(0)  # unused by center crops without flips
    tasks = [ShardTask(shard, url) for shard, url in enumerate(expand_urls(urls, storage_options=storage_options))]
    for task, item in read_samples(tasks, storage_options or {}, RetryPolicy(max_retries=2), skipped):
        try:
            out = decode_sample(item.parts, image_keys=image_keys, caption_key=caption_key,
                                image_size=image_size, transform=transform, rng=rng,
                                caption_required=caption_required)
            label = label_of(item.parts, labels, metadata_of(item.parts)) if labels is not None else None
        except BadSample as bad:
            _count_skip(skipped, bad, item.key, task.url)
            continue
        if label is not None:
            classes.append(label)
        images.append(torch.from_numpy(out.example.image).permute(2, 0, 1))  # (3, S, S)
        captions.append(out.caption)
        keys.append(item.key)
    if not images:
        raise ValueError(f"no usable samples in {urls!r} (skipped: {dict(skipped)})"
                         + (f"; check{label_hint(labels)[1:]}" if labels is not None else ""))
    if skipped:
        log.warning("skipped samples: %s", dict(skipped))
    return Samples(images=torch.stack(images), captions=captions, keys=keys, skipped=skipped,
                   labels=torch.tensor(classes, dtype=torch.int64) if labels is not None else None)


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
            batch = {"captions": [self.samples.captions[i] for i in idx.tolist()],
                     "positions": list(range(first, first + self.micro_batch_size))}
            if self.samples.labels is not None:
                batch["labels"] = self.samples.labels[torch.from_numpy(idx)]  # (B,) int64
            if self.samples.latents is not None:
                batch["latent_mean"] = self.samples.latents[torch.from_numpy(idx)]
                if self.samples.text_contexts is not None:
                    batch["text_context"] = self.samples.text_contexts[torch.from_numpy(idx)]
                if self.samples.concat_inputs is not None:
                    batch["concat_input"] = self.samples.concat_inputs[torch.from_numpy(idx)]  # (B, C_concat, h, w)
            else:
                batch["images"] = self.samples.images[torch.from_numpy(idx)].float() / 127.5 - 1.0
            out.append(batch)
        return out

    def state_dict(self, samples_seen: int) -> dict:
        return {"kind": "in_memory", "samples_seen": samples_seen, "seed": self.seed,
                "num_samples": len(self.samples.captions),
                "epoch": samples_seen // len(self.samples.captions)}

    def skip_counts(self, device=None) -> dict[str, int]:
        """Samples skipped when the shards were read (the same on every rank)."""
        return dict(self.samples.skipped)

    def close(self) -> None:
        pass

    def example_captions(self, n: int) -> list[str]:
        return sorted(set(self.samples.captions))[:n]

    def watch_stop(self, requested) -> None:
        """In-memory data never waits: nothing to poll."""

    def load_state_dict(self, state: dict, *, reset: bool = False) -> None:
        """The in-memory order is a function of ``samples_seen``: only check it was saved for this data."""
        if not reset:
            self.check_state(state)

    def check_state(self, state: dict) -> None:
        if state.get("kind") != "in_memory":
            return
        mine = {"seed": self.seed, "num_samples": len(self.samples.captions)}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            raise ValueError(f"the checkpoint's data position was saved for {theirs}, this job reads {mine}; "
                             f"set data.reset_position=true to restart the data order")
