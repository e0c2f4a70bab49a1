"""Reading one webdataset tar shard as numbered samples, resumable at any sample and robust to damage.

Members are grouped into samples the webdataset way (consecutive members sharing the part of the
name before the first dot). Samples are numbered in the order they appear in the tar; a
``ShardTask`` says which numbers are still wanted, so a resumed job reads exactly what is missing.

Only bytes leave this module: no decoder runs here, and nothing is ever unpickled. A member larger
than its ``MemberLimits`` bound is never read (its size is in the tar header, also inside a gzip
stream); its sample comes out with ``skip`` set (``oversized_image_file`` / ``oversized_caption`` /
``oversized_member``) and no parts, and so does a sample whose key was already seen in the shard or
that holds one extension twice (``duplicate_key``): webdataset would silently keep the last member.
"""

from __future__ import annotations

import gzip
import logging
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import fsspec

from data_pipeline.sources import RetryPolicy, is_transient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """Shard ``shard`` (its index in the source's URL list) at ``url``: samples numbered ``< hi`` are
    already done except those in ``holes``."""

    shard: int
    url: str
    hi: int = 0
    holes: frozenset[int] = field(default_factory=frozenset)

    def wants(self, index: int) -> bool:
        return index >= self.hi or index in self.holes


@dataclass(frozen=True)
class MemberLimits:
    """The largest member read, by kind (``data.max_image_bytes`` / ``max_caption_bytes`` /
    ``max_member_bytes``). The defaults are far above any real LAION sample (img2dataset's largest
    images are a few MiB, captions a few KiB) and bound what one sample can cost in memory and time."""

    image_exts: tuple[str, ...] = ("jpg", "png", "webp")
    caption_ext: str = "txt"
    max_image_bytes: int = 64 << 20
    max_caption_bytes: int = 64 << 10
    max_member_bytes: int = 16 << 20  # any other member (json, latents, ...)

    def exceeded(self, ext: str, size: int) -> str:
        """The skip reason when a member ``ext`` of ``size`` bytes is too large, else ``""``."""
        if ext in self.image_exts:
            return "oversized_image_file" if size > self.max_image_bytes else ""
        if ext == self.caption_ext:
            return "oversized_caption" if size > self.max_caption_bytes else ""
        return "oversized_member" if size > self.max_member_bytes else ""


@dataclass
class RawSample:
    index: int
    key: str
    parts: dict[str, bytes]
    skip: str = ""  # a reason the sample is not usable (its parts are then empty)


@dataclass
class ShardEnd:
    """The shard has ``count`` samples as far as it could be read; ``status`` is ``ok``, ``truncated``
    (the archive is damaged: what came before the damage was read) or ``unreadable`` (storage errors
    persisted through every retry)."""

    count: int
    status: str
    error: str = ""


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); ``a.b.json`` -> (``a``, ``b.json``)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _size(f: Any) -> int | None:
    try:
        if isinstance(f, fsspec.spec.AbstractBufferedFile):  # remote files know their size once open
            return int(f.size)
        return int(f.fs.size(f.path))  # (LocalFileOpener.size is not the file's size)
    except Exception:  # noqa: BLE001 - the size only sharpens the damage check
        return None


def read_shard(task: ShardTask, storage_options: dict[str, Any], policy: RetryPolicy,
               sleep: Callable[[float], None] = time.sleep,
               limits: MemberLimits = MemberLimits()) -> Iterator[RawSample | ShardEnd]:
    """The wanted samples of ``task`` in tar order, then one ``ShardEnd``. A storage error mid-shard
    reopens the shard after a backoff and carries on after the last sample handled, so nothing is
    lost or repeated; a damaged archive ends the shard (what came before the damage counts)."""
    done_upto = 0  # samples [0, done_upto) are handled (yielded, or not wanted)
    delays = iter(policy.delays())
    while True:
        index, key, parts, skip = -1, None, {}, ""
        seen: set[str] = set()  # keys of the samples so far (every pass reads the shard from its start)
        whole = True  # False while a member's data is being read
        try:
            with fsspec.open(task.url, "rb", **storage_options) as f:
                size = _size(f)
                try:
                    tar = tarfile.open(fileobj=f, mode="r|*")
                    for member in tar:
                        if not member.isfile():
                            continue
                        member_key, ext = split_member_name(member.name)
                        if member_key != key:
                            if key is not None and index >= done_upto:
                                if task.wants(index):
                                    yield RawSample(index, key, {} if skip else parts, skip)
                                done_upto = index + 1
                            index, key, parts = index + 1, member_key, {}
                            skip = "duplicate_key" if member_key in seen else ""
                            seen.add(member_key)
                        if index >= done_upto and task.wants(index) and not skip:
                            # Checked from the header: an oversized member is skipped over unread
                            # (tarfile reads past it in blocks), never held in memory.
                            skip = "duplicate_key" if ext in parts else limits.exceeded(ext, member.size)
                            if skip:
                                parts = {}
                                continue
                            whole = False
                            parts[ext] = tar.extractfile(member).read()
                            whole = True
                    # tarfile ends quietly at a header cut short; a whole archive still has its
                    # end-of-archive blocks after the last member. A compressed one is whole when its
                    # compressed stream ends (tarfile's decompressor stops quietly where the data does).
                    decompressor = getattr(tar.fileobj, "cmp", None)
                    if decompressor is not None:
                        while tar.fileobj.read(1 << 16):  # the record padding after the end blocks
                            pass
                        if not decompressor.eof:
                            raise tarfile.ReadError("the compressed stream ends before its end marker")
                    elif size is not None and size < tar.offset + 2 * tarfile.BLOCKSIZE:
                        raise tarfile.ReadError(f"{size} bytes end before the end-of-archive blocks")
                except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
                    # Damage at the end of the object is the archive's; damage before it is a short
                    # read from storage (a reset connection), which a retry can fix.
                    if size is None or f.tell() >= size:
                        # The sample before the damage is used when all of its members were read.
                        if key is not None and index >= done_upto and whole:
                            if task.wants(index):
                                yield RawSample(index, key, {} if skip else parts, skip)
                            done_upto = index + 1
                        yield ShardEnd(done_upto, "truncated", f"{type(e).__name__}: {e}")
                        return
                    raise ConnectionError(f"short read at byte {f.tell()} of {size}: {e}") from e
            if key is not None and index >= done_upto:
                if task.wants(index):
                    yield RawSample(index, key, {} if skip else parts, skip)
                done_upto = index + 1
            yield ShardEnd(done_upto, "ok")
            return
        except Exception as e:  # noqa: BLE001 - storage errors are classified by is_transient
            error: Exception = e
        delay = next(delays, None) if is_transient(error) else None
        if delay is None:
            yield ShardEnd(done_upto, "unreadable", f"{type(error).__name__}: {error}")
            return
        log.warning("reading shard %s failed after %d samples (%s: %s); retrying in %.1fs",
                    task.url, done_upto, type(error).__name__, error, delay)
        sleep(delay)


def read_samples(tasks: Iterable[ShardTask], storage_options: dict[str, Any], policy: RetryPolicy,
                 skipped: Counter, limits: MemberLimits = MemberLimits()) -> Iterator[tuple[ShardTask, RawSample]]:
    """Every readable sample of ``tasks``, in order, for one-pass readers (in-memory loading, the
    latent precompute). A damaged or unreadable shard is counted once in ``skipped``
    (``truncated_shard`` / ``unreadable_shard``) and logged with its URL; a sample ``read_shard``
    marks (``oversized_*``, ``duplicate_key``) is counted by its reason."""
    for task in tasks:
        for item in read_shard(task, storage_options, policy, limits=limits):
            if isinstance(item, RawSample):
                if item.skip:
                    skipped[item.skip] += 1
                    log.debug("sample %s of %s skipped: %s", item.key, task.url, item.skip)
                    continue
                yield task, item
            elif item.status != "ok":
                skipped[f"{item.status}_shard"] += 1
                log.warning("shard %s is %s (%s); the %d samples before the damage are used",
                            task.url, item.status, item.error, item.count)
