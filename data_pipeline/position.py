"""The exact data position of a streaming job: which samples of which epoch have been delivered.

Every sample has an identity ``(source, epoch, shard, index)`` - ``index`` numbers the samples of a
shard in tar order. The trainer records the identity of each sample it consumes (and of each one
the workers skipped as bad), so the position is what was *used*, not what workers have read ahead.
Per open epoch the state keeps a bitmap of finished shards and, for shards under way, the highest
index reached plus the holes below it (samples still in a shuffle buffer or a worker's prefetch
queue when the checkpoint was taken; their number is bounded by the buffer sizes).

Resuming hands the remaining work of each epoch - partial shards first, then untouched ones, in
the epoch's seeded shard order - round-robin to the new job's ``ranks x workers`` slots. Each
remaining sample therefore goes to exactly one slot whatever the new layout, which is what makes a
resumed epoch deliver every sample exactly once.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from data_pipeline.shards import ShardTask

STATE_VERSION = 1

# Reasons a sample or shard is skipped; each is counted, logged and sent to W&B as data/skipped_<reason>.
SKIP_REASONS = (
    "truncated_shard", "unreadable_shard",
    "missing_image", "missing_caption", "empty_caption", "caption_not_utf8",
    "empty_image", "undecodable_image", "oversized_image", "bad_metadata",
    "filtered_min_size", "filtered_aspect_ratio", "filtered_caption_length", "filtered_score",
    "missing_latent", "undecodable_latent",
    "oversized_image_file", "oversized_caption", "oversized_member", "duplicate_key",  # data_pipeline.shards
)


@dataclass(frozen=True)
class SourceInfo:
    name: str
    urls: tuple[str, ...]

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16]


def shard_order(num_shards: int, seed: int, source: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, source, epoch, 0x5A4D]).permutation(num_shards)


@dataclass
class ShardProgress:
    accounted: set[int] = field(default_factory=set)  # delivered or skipped as bad
    total: int | None = None  # known once the shard has been read to its end

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.accounted) >= self.total

    def to_state(self) -> dict[str, Any]:
        hi = max(self.accounted) + 1 if self.accounted else 0
        holes = [i for i in range(hi) if i not in self.accounted]
        return {"hi": hi, "holes": holes, "total": self.total}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "ShardProgress":
        holes = set(s["holes"])
        return cls(accounted={i for i in range(s["hi"]) if i not in holes}, total=s["total"])


@dataclass
class EpochProgress:
    num_shards: int
    done: np.ndarray = None  # (num_shards,) bool
    partial: dict[int, ShardProgress] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.done is None:
            self.done = np.zeros(self.num_shards, dtype=bool)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def account(self, shard: int, index: int) -> None:
        if self.done[shard]:
            return
        p = self.partial.setdefault(shard, ShardProgress())
        p.accounted.add(index)
        self._maybe_finish(shard, p)

    def end_shard(self, shard: int, count: int) -> None:
        if self.done[shard]:
            return
        p = self.partial.setdefault(shard, ShardProgress())
        p.total = count
        self._maybe_finish(shard, p)

    def _maybe_finish(self, shard: int, p: ShardProgress) -> None:
        if p.complete:
            self.done[shard] = True
            del self.partial[shard]

    def to_state(self) -> dict[str, Any]:
        return {"done": base64.b64encode(np.packbits(self.done).tobytes()).decode(),
                "partial": {str(k): v.to_state() for k, v in sorted(self.partial.items())}}

    @classmethod
    def from_state(cls, s: dict[str, Any], num_shards: int) -> "EpochProgress":
        bits = np.unpackbits(np.frombuffer(base64.b64decode(s["done"]), dtype=np.uint8))[:num_shards]
        return cls(num_shards, done=bits.astype(bool),
                   partial={int(k): ShardProgress.from_state(v) for k, v in s["partial"].items()})

    def merge(self, other: "EpochProgress") -> None:
        self.done |= other.done
        for shard, p in other.partial.items():
            if self.done[shard]:
                continue
            mine = self.partial.setdefault(shard, ShardProgress())
            mine.accounted |= p.accounted
            mine.total = mine.total if mine.total is not None else p.total
        for shard in [s for s in self.partial if self.done[s]]:
            del self.partial[shard]
        for shard in list(self.partial):
            self._maybe_finish(shard, self.partial[shard])


class Progress:
    """What a job has consumed, per source and epoch, plus skip counts. JSON in checkpoints."""

    def __init__(self, sources: Sequence[SourceInfo], *, seed: int, mode: str, generation: int = 0) -> None:
        self.sources = list(sources)
        self.seed, self.mode, self.generation = seed, mode, generation
        self.first_open = [0] * len(self.sources)
        self.epochs: dict[tuple[int, int], EpochProgress] = {}
        self.base_skipped: Counter = Counter()  # counted before this session (from the checkpoint)
        self.skipped: Counter = Counter()  # counted in this session, on this rank
        self.base_delivered = 0
        self.delivered = 0

    # -- recording (main process)

    def epoch(self, source: int, epoch: int) -> EpochProgress:
        key = (source, epoch)
        if key not in self.epochs:
            self.epochs[key] = EpochProgress(self.sources[source].num_shards)
        return self.epochs[key]

    def is_done(self, source: int, epoch: int) -> bool:
        return epoch < self.first_open[source]

    def account(self, source: int, epoch: int, shard: int, index: int, reason: str | None = None) -> None:
        if reason is None:
            self.delivered += 1
        else:
            self.skipped[reason] += 1
        if self.mode == "epoch" and not self.is_done(source, epoch):
            self.epoch(source, epoch).account(shard, index)
            self._close(source)

    def end_shard(self, source: int, epoch: int, shard: int, count: int, status: str) -> None:
        if status != "ok":
            self.skipped[f"{status}_shard"] += 1
        if self.mode == "epoch" and not self.is_done(source, epoch):
            self.epoch(source, epoch).end_shard(shard, count)
            self._close(source)

    def _close(self, source: int) -> None:
        while (source, self.first_open[source]) in self.epochs and self.epochs[(source, self.first_open[source])].complete:
            del self.epochs[(source, self.first_open[source])]
            self.first_open[source] += 1

    def total_skipped(self) -> Counter:
        return self.base_skipped + self.skipped

    # -- planning (workers)

    def tasks(self, source: int, epoch: int, slot: int, num_slots: int, shuffle_shards: bool) -> list[ShardTask]:
        """The shards slot ``slot`` of ``num_slots`` reads in ``epoch``: what remains of it, partial shards
        first, dealt round-robin."""
        info = self.sources[source]
        if self.is_done(source, epoch):
            return []
        order = shard_order(info.num_shards, self.seed, source, epoch, shuffle_shards)
        ep = self.epochs.get((source, epoch))
        if ep is None:
            remaining, partial = list(order), {}
        else:
            remaining = [int(i) for i in order if not ep.done[i]]
            partial = ep.partial
        remaining = [i for i in remaining if i in partial] + [i for i in remaining if i not in partial]
        tasks = []
        for shard in remaining[slot::num_slots]:
            shard = int(shard)
            p = partial.get(shard)
            if p is None:
                tasks.append(ShardTask(shard, info.urls[shard]))
            else:
                s = p.to_state()
                tasks.append(ShardTask(shard, info.urls[shard], hi=s["hi"], holes=frozenset(s["holes"])))
        return tasks

    # -- state

    def to_state(self) -> dict[str, Any]:
        sources = {}
        for i, info in enumerate(self.sources):
            sources[info.name] = {
                "num_shards": info.num_shards, "urls_sha256": info.fingerprint, "first_open_epoch": self.first_open[i],
                "epochs": {str(e): ep.to_state() for (s, e), ep in sorted(self.epochs.items()) if s == i}}
        return {"kind": "stream", "version": STATE_VERSION, "mode": self.mode, "seed": self.seed,
                "generation": self.generation, "sources": sources,
                "skipped": dict(sorted(self.total_skipped().items())),
                "session_skipped": dict(self.skipped), "delivered": self.base_delivered + self.delivered,
                "session_delivered": self.delivered}

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse a position saved for other data: names what differs."""
        problems = []
        if state.get("kind") != "stream":
            problems.append(f"it is a {state.get('kind')!r} position, this job streams shards")
        else:
            if state.get("version") != STATE_VERSION:
                problems.append(f"state version {state.get('version')} (this code reads {STATE_VERSION})")
            for key, mine in (("mode", self.mode), ("seed", self.seed)):
                if state.get(key) != mine:
                    problems.append(f"data.{key}: saved {state.get(key)!r}, now {mine!r}")
            saved = state.get("sources", {})
            names = [s.name for s in self.sources]
            if sorted(saved) != sorted(names):
                problems.append(f"sources: saved {sorted(saved)}, now {sorted(names)}")
            for info in self.sources:
                s = saved.get(info.name)
                if s is not None and (s["num_shards"], s["urls_sha256"]) != (info.num_shards, info.fingerprint):
                    problems.append(f"source {info.name!r}: saved {s['num_shards']} shards (list sha256 "
                                    f"{s['urls_sha256']}), now {info.num_shards} (list sha256 {info.fingerprint})")
        if problems:
            raise ValueError("the checkpoint's data position does not match this job's data:\n  "
                             + "\n  ".join(problems)
                             + "\nset data.reset_position=true to start the data afresh (the model state is kept)")

    def load_state(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.generation = int(state["generation"]) + 1
        self.base_skipped = Counter(state["skipped"])
        self.base_delivered = int(state["delivered"])
        self.skipped, self.delivered = Counter(), 0
        self.epochs.clear()
        for i, info in enumerate(self.sources):
            s = state["sources"][info.name]
            self.first_open[i] = int(s["first_open_epoch"])
            for e, ep in s["epochs"].items():
                self.epochs[(i, int(e))] = EpochProgress.from_state(ep, info.num_shards)

    @classmethod
    def merged(cls, states: Iterable[dict[str, Any]], sources: Sequence[SourceInfo]) -> dict[str, Any]:
        """One job-wide state from every rank's: the union of their progress (they started from the same
        checkpoint and consumed disjoint samples since), with this session's counts summed."""
        states = list(states)
        first = states[0]
        out = cls(sources, seed=first["seed"], mode=first["mode"], generation=first["generation"])
        out.base_skipped = Counter(first["skipped"]) - Counter(first["session_skipped"])
        out.base_delivered = first["delivered"] - first["session_delivered"]
        for st in states:
            out.skipped.update(st["session_skipped"])
            out.delivered += st["session_delivered"]
            for i, info in enumerate(sources):
                s = st["sources"][info.name]
                out.first_open[i] = max(out.first_open[i], int(s["first_open_epoch"]))
                for e, ep in s["epochs"].items():
                    out.epoch(i, int(e)).merge(EpochProgress.from_state(ep, info.num_shards))
        for key in [k for k in out.epochs if out.is_done(*k)]:
            del out.epochs[key]
        for i in range(len(sources)):
            out._close(i)
        state = out.to_state()
        state["session_skipped"], state["session_delivered"] = {}, 0
        # The merged state is a checkpoint's: everything in it is "before" the next session.
        return state
