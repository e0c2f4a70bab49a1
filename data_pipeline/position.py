"""The exact data position of a streaming job, independent of its ranks and workers.

The order of samples is a pure function of the data (shard lists, weights, the samples' contents)
and ``data.seed``, through a fixed number ``K`` of *canonical streams* chosen at the first start
and stored in the position (``data.num_streams``; 0 = the first start's ``ranks x workers``):

- **Sub-streams.** Canonical stream ``k`` reads, for each source, the shards ``stream_shards``
  gives it: in epoch ``e`` of ``data.mode=epoch`` every ``K``-th shard of the epoch's seeded shard
  order, starting at ``k`` (so every shard is read by exactly one stream per epoch); in
  ``mode=resampled`` pass ``e`` draws ``ceil(num_shards / K)`` shards with replacement from a
  generator seeded by ``(seed, source, k, e)``.
- **Windowed shuffle.** The raw samples of one pass of a sub-stream (shards in that order, samples
  in tar order) are cut into consecutive windows of ``data.shuffle_buffer`` samples (a window
  never crosses a pass), and window ``w`` is read in the order of a permutation seeded by
  ``(seed, source, k, e, w)``. The shuffle state is therefore four integers - pass, window, where
  the window starts (shard of the pass, sample of the shard) - plus the number of samples drawn
  from it; a resume re-reads that one window and drops what was drawn.
- **Mixing.** Draw ``t`` of stream ``k`` takes its next raw sample from source ``choose_source(t)``
  (a seeded categorical draw with the sources' weights).
- **Units.** Raw samples are decoded; a bad or filtered one yields nothing (that is a function of
  its bytes, so the stream's sequence stays the same). Each good sample is a unit, or - with
  aspect buckets - it waits in its bucket's group and a full group of ``micro_batch_size`` samples
  is one unit. Samples waiting in a group are saved by identity and read again on resume.
- **Interleave.** Unit ``j`` of stream ``k`` is global unit ``j * K + k``. Optimizer step ``b``
  consumes global units ``[b * U, (b + 1) * U)`` (``U`` = global batch / unit size), and rank ``r``
  of ``R`` takes the units ``i`` with ``i % R == r`` - those of its own streams ``{k : k % R == r}``,
  ``U / R`` of them - in increasing ``i``, cut into its micro-batches.
- **Readers.** Reader ``q = k % P`` of ``P = ranks x workers`` drives stream ``k`` (rank ``q % R``,
  worker ``q // R``); ``P`` must divide ``K``. ``StreamingBatches`` refuses other layouts and lists
  the ones that work.

The position is, per canonical stream, the cursor after its last *consumed* unit (what workers
read ahead is read again), plus the number of global units consumed: a few hundred bytes per
stream, whatever the number of shards.

Epochs. Every sample of a source is read exactly once per epoch (a stream's pass over its shards
is that epoch's share of them). Streams do not wait for each other, so the epochs of different
streams meet where their shares' sizes meet: when a source's shards hold equal numbers of usable
samples and their count is a multiple of ``K``, global samples ``[e * N, (e + 1) * N)`` are exactly
epoch ``e``; otherwise a stream with a smaller share starts its next epoch earlier.

Exact epochs (``data.exact_epochs``, for small sources). Exactness across streams needs every
rank's share of each epoch to be the same number of units, which shard-per-stream reading cannot
promise without knowing every shard's usable count. So for a small source every canonical stream
reads the whole of it instead (once per reader process, at most ``data.shuffle_buffer`` raw samples,
in shard order), with each sample's usability; epoch ``e`` is the permutation seeded by
``(seed, source, e)`` of the usable samples, the global sample sequence is epoch 0's, then epoch
1's, ..., and global unit ``u`` is its samples ``[u * B, (u + 1) * B)``, from stream ``u % K`` (the
same interleave and readers as above). A stream's cursor is the number of units it handed out; the
unit holding an epoch's first sample reports that epoch's bad samples and damaged shards, so each is
counted once per epoch job-wide, on any layout. A shard some reader cannot read at all would make
readers disagree on the order, so in this mode it fails the run instead of being skipped.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

STATE_VERSION = 2

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


def stream_shards(num_shards: int, *, seed: int, source: int, stream: int, num_streams: int, epoch: int,
                  mode: str, shuffle: bool) -> list[int]:
    """The shards canonical stream ``stream`` reads, in order, in pass ``epoch`` of ``source``."""
    if mode == "resampled":
        count = math.ceil(num_shards / num_streams)
        rng = np.random.default_rng([seed, source, stream, epoch, 0x5E5])
        return [int(s) for s in rng.integers(num_shards, size=count)]
    return [int(s) for s in shard_order(num_shards, seed, source, epoch, shuffle)[stream::num_streams]]


def window_order(n: int, *, seed: int, source: int, stream: int, epoch: int, window: int) -> list[int]:
    """The order in which the ``n`` raw samples of a shuffle window are drawn."""
    if n <= 1:  # no shuffling (data.shuffle_buffer <= 1), or a pass's last window of one
        return list(range(n))
    return [int(i) for i in np.random.default_rng([seed, source, stream, epoch, window, 0x3F1]).permutation(n)]


SOURCE_BLOCK = 1024  # mixing draws are generated in blocks, so draw t is recomputed from (seed, stream, t)


def source_choices(weights: Sequence[float], *, seed: int, stream: int, block: int) -> np.ndarray:
    """Sources of draws ``[block * SOURCE_BLOCK, (block + 1) * SOURCE_BLOCK)`` of canonical stream ``stream``."""
    p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    return np.random.default_rng([seed, stream, block, 0x313]).choice(len(p), size=SOURCE_BLOCK, p=p)


@dataclass
class SubCursor:
    """Where a sub-stream (one source within one canonical stream) stands: pass ``epoch``, shuffle
    window ``window`` starting at sample ``index`` of the pass's shard number ``shard_pos``, of which
    ``taken`` samples have been drawn."""

    epoch: int = 0
    window: int = 0
    shard_pos: int = 0
    index: int = 0
    taken: int = 0

    def to_state(self) -> list[int]:
        return [self.epoch, self.window, self.shard_pos, self.index, self.taken]

    @classmethod
    def from_state(cls, s: Sequence[int]) -> "SubCursor":
        return cls(*(int(v) for v in s))


# A sample waiting in a bucket's group: (source, epoch, shard, index, position).
Pending = tuple[int, int, int, int, int]


@dataclass
class StreamCursor:
    """Where a canonical stream stands after its last unit: draws made, its sub-streams, the samples
    waiting in bucket groups (bucket -> identities in arrival order)."""

    draws: int = 0
    subs: list[SubCursor] = field(default_factory=list)
    pending: dict[tuple[int, ...], list[Pending]] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"draws": self.draws, "subs": [s.to_state() for s in self.subs]}
        if self.pending:
            out["pending"] = [[list(b), [list(p) for p in ids]] for b, ids in self.pending.items() if ids]
        return out

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "StreamCursor":
        pending = {tuple(int(v) for v in b): [tuple(int(v) for v in p) for p in ids] for b, ids in s.get("pending", [])}
        return cls(int(s["draws"]), [SubCursor.from_state(c) for c in s["subs"]], pending)

    @classmethod
    def fresh(cls, num_sources: int) -> "StreamCursor":
        return cls(0, [SubCursor() for _ in range(num_sources)], {})


STREAMS_PER_READER = (12, 6, 4, 3, 2, 1)  # the default K = readers x the first that fits: room to grow


def default_streams(readers: int, min_shards: int) -> int:
    """``K`` for a first start on ``readers`` readers: a multiple of them with many divisors, so that
    the run can later grow (or shrink) its ranks x workers, and at most the smallest source's shards."""
    for f in STREAMS_PER_READER:
        if readers * f <= min_shards:
            return readers * f
    return readers


def window_for(shuffle_buffer: int, readers: int, num_streams: int) -> int:
    """Samples per shuffle window: ``data.shuffle_buffer`` per reader of the first start, shared by the
    streams each drives (so a reader holds about one buffer of raw samples). With ``data.num_streams``
    set, ``readers`` is ``num_streams``: the buffer is per stream and the order is the same whatever
    layout starts the run."""
    return max(1, -(-shuffle_buffer * readers // num_streams)) if shuffle_buffer > 1 else 1


def layouts_for(num_streams: int, max_readers: int = 64) -> list[str]:
    """``ranks x workers`` layouts whose readers divide ``num_streams`` (workers 0 = the rank itself)."""
    out = []
    for ranks in range(1, num_streams + 1):
        if num_streams % ranks:
            continue
        workers = [w for w in range(1, num_streams // ranks + 1) if (num_streams // ranks) % w == 0]
        out.append(f"{ranks}x{{{','.join(str(w) for w in workers if ranks * w <= max_readers)}}}")
    return out


class Position:
    """A job's data position: the canonical streams' cursors, the global units consumed and the skip
    counts. JSON in checkpoints; every rank holds the cursors of its own streams up to date."""

    def __init__(self, sources: Sequence[SourceInfo], *, seed: int, mode: str, num_streams: int,
                 unit_size: int, window: int = 1) -> None:
        self.sources = list(sources)
        self.seed, self.mode = seed, mode
        self.num_streams, self.unit_size, self.window = num_streams, unit_size, window
        self.exact_epochs = False  # whole-source streams (see "Exact epochs" above), fixed at the first start
        self.units_consumed = 0  # global units [0, units_consumed) are consumed job-wide
        self.cursors = [StreamCursor.fresh(len(self.sources)) for _ in range(num_streams)]
        self.base_skipped: Counter = Counter()  # counted before this session (from the checkpoint)
        self.skipped: Counter = Counter()  # counted in this session, on this rank
        self.base_delivered = 0
        self.delivered = 0

    # -- recording (main process)

    def count(self, event: tuple) -> None:
        """A skip event a worker sent with a unit: ("skip", reason) or ("shard", status, url)."""
        if event[0] == "skip":
            self.skipped[event[1]] += 1
        else:
            self.skipped[f"{event[1]}_shard"] += 1

    def total_skipped(self) -> Counter:
        return self.base_skipped + self.skipped

    # -- state

    def to_state(self, owned: Iterable[int] | None = None) -> dict[str, Any]:
        """The position; ``owned`` limits the cursors to those streams (a rank's own)."""
        streams = range(self.num_streams) if owned is None else owned
        return {"kind": "stream", "version": STATE_VERSION, "mode": self.mode, "seed": self.seed,
                "num_streams": self.num_streams, "unit_size": self.unit_size, "window": self.window,
                "units_consumed": self.units_consumed, **({"exact_epochs": True} if self.exact_epochs else {}),
                "sources": {info.name: {"num_shards": info.num_shards, "urls_sha256": info.fingerprint}
                            for info in self.sources},
                "cursors": {str(k): self.cursors[k].to_state() for k in streams},
                "skipped": dict(sorted(self.total_skipped().items())),
                "session_skipped": dict(self.skipped), "delivered": self.base_delivered + self.delivered,
                "session_delivered": self.delivered}

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse a position saved for other data: names what differs."""
        problems = []
        if state.get("kind") != "stream":
            problems.append(f"it is a {state.get('kind')!r} position, this job streams shards")
        elif state.get("version") != STATE_VERSION:
            problems.append(f"state version {state.get('version')} (this code reads {STATE_VERSION}: a position "
                            "of the layout-dependent streams before issue 20)")
        else:
            for key, mine in (("mode", self.mode), ("seed", self.seed), ("unit_size", self.unit_size)):
                if state.get(key) != mine:
                    name = "micro-batch size of aspect-bucket batches" if key == "unit_size" else f"data.{key}"
                    problems.append(f"{name}: saved {state.get(key)!r}, now {mine!r}")
            saved = state.get("sources", {})
            names = [s.name for s in self.sources]
            if list(saved) != names:
                problems.append(f"sources: saved {list(saved)}, now {names}")
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
        self.num_streams, self.window = int(state["num_streams"]), int(state["window"])
        self.exact_epochs = bool(state.get("exact_epochs", False))
        self.units_consumed = int(state["units_consumed"])
        self.cursors = [StreamCursor.from_state(state["cursors"][str(k)]) for k in range(self.num_streams)]
        self.base_skipped = Counter(state["skipped"])
        self.base_delivered = int(state["delivered"])
        self.skipped, self.delivered = Counter(), 0

    @classmethod
    def merged(cls, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One job-wide state from every rank's (each holds its own streams' cursors; they consumed the
        same number of global units), with this session's counts summed."""
        first = states[0]
        consumed = {int(s["units_consumed"]) for s in states}
        assert len(consumed) == 1, f"ranks disagree on the global units consumed: {sorted(consumed)}"
        cursors: dict[str, Any] = {}
        for s in states:
            cursors.update(s["cursors"])
        assert sorted(cursors, key=int) == [str(k) for k in range(first["num_streams"])], sorted(cursors)
        skipped = Counter(first["skipped"]) - Counter(first["session_skipped"])
        delivered = first["delivered"] - first["session_delivered"]
        for s in states:
            skipped.update(s["session_skipped"])
            delivered += s["session_delivered"]
        # The merged state is a checkpoint's: everything in it is "before" the next session.
        return {**first, "cursors": {k: cursors[k] for k in sorted(cursors, key=int)},
                "skipped": dict(sorted(skipped.items())), "session_skipped": {}, "delivered": delivered,
                "session_delivered": 0}
