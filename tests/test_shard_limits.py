"""Bounded members (issue 19, item 2): a member over its size bound is skipped from its tar header,
unread, also inside a gzip stream; the rest of the shard goes on; a key repeated in a shard is a
skip reason; whole .tar.gz shards read as whole; captions are cut before any cleaning."""

from __future__ import annotations

import gzip
import io
import json
import logging
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.decode import caption_of
from data_pipeline.position import SKIP_REASONS, SourceInfo
from data_pipeline.shards import MemberLimits, RawSample, ShardEnd, ShardTask, read_samples, read_shard
from data_pipeline.sources import RetryPolicy
from data_pipeline.stream import StreamingBatches, StreamSpec

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _write(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> str:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _sample(key: str, seed: int, caption: bytes = b"a caption") -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _jpeg(seed)), (f"{key}.txt", caption)]


def _read(url: str, limits: MemberLimits = MemberLimits()) -> tuple[list[RawSample], ShardEnd]:
    items = list(read_shard(ShardTask(0, url), {}, RetryPolicy(max_retries=0), limits=limits))
    return [i for i in items if isinstance(i, RawSample)], items[-1]


LIMITS = MemberLimits(max_image_bytes=4000, max_caption_bytes=100, max_member_bytes=50)


@pytest.mark.parametrize("mode, suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_oversized_members_are_skipped_unread_and_the_shard_goes_on(tmp_path: Path, mode: str, suffix: str) -> None:
    members = [*_sample("000", 0), *_sample("001", 1, b"x" * 101),           # caption over the bound
               ("002.jpg", b"\xff" * 4001), ("002.txt", b"big image"),      # image over the bound
               *_sample("003", 3), ("003.json", json.dumps({"pad": "y" * 60}).encode()),  # other member
               *_sample("004", 4)]
    url = _write(tmp_path / f"s{suffix}", members, mode)
    samples, end = _read(url, LIMITS)
    assert end.status == "ok" and end.count == 5
    assert [(s.key, s.skip) for s in samples] == [("000", ""), ("001", "oversized_caption"),
                                                  ("002", "oversized_image_file"), ("003", "oversized_member"),
                                                  ("004", "")]
    assert all(s.parts == {} for s in samples if s.skip)
    assert samples[-1].parts["txt"] == b"a caption"
    skipped: Counter = Counter()
    keys = [item.key for _, item in read_samples([ShardTask(0, url)], {}, RetryPolicy(), skipped, LIMITS)]
    assert keys == ["000", "004"]
    assert skipped == Counter(oversized_caption=1, oversized_image_file=1, oversized_member=1)
    assert {"oversized_caption", "oversized_image_file", "oversized_member", "duplicate_key"} <= set(SKIP_REASONS)


def test_a_whole_tar_gz_is_whole_and_a_cut_one_is_truncated(tmp_path: Path) -> None:
    url = _write(tmp_path / "whole.tar.gz", [*_sample("000", 0), *_sample("001", 1)], "w:gz")
    samples, end = _read(url)
    assert (end.status, end.count, len(samples)) == ("ok", 2, 2)
    data = Path(url).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) - 40])
    _, end = _read(str(cut))
    assert end.status == "truncated"


def test_a_repeated_key_is_a_skip_reason_not_a_silent_merge(tmp_path: Path) -> None:
    members = [*_sample("000", 0), *_sample("001", 1), *_sample("000", 2),   # key 000 again, later
               ("002.jpg", _jpeg(3)), ("002.txt", b"first"), ("002.txt", b"second"),  # one extension twice
               *_sample("003", 4)]
    samples, end = _read(_write(tmp_path / "dup.tar", members))
    assert end.status == "ok"
    assert [(s.key, s.skip) for s in samples] == [("000", ""), ("001", ""), ("000", "duplicate_key"),
                                                  ("002", "duplicate_key"), ("003", "")]


def test_skips_are_counted_by_the_stream(tmp_path: Path) -> None:
    urls = [_write(tmp_path / f"{i}.tar", [*_sample(f"{i}00", 0), *_sample(f"{i}01", 1, b"x" * 101),
                                           *_sample(f"{i}00", 2), *_sample(f"{i}02", 3)]) for i in range(2)]
    spec = StreamSpec(sources=(SourceInfo("default", tuple(urls)),), weights=(1.0,), image_size=16, batch_size=1,
                      shuffle_buffer=0, shuffle_shards=False, limits=MemberLimits(max_caption_bytes=100))
    batches = StreamingBatches(spec, rank=0, world_size=1, num_workers=0)
    try:
        keys = [batches.next_batch()["keys"][0] for _ in range(4)]
        counts = batches.skip_counts()
    finally:
        batches.close()
    # The global order interleaves the canonical streams (data_pipeline.position); the skips decide which keys.
    assert sorted(keys) == ["000", "002", "100", "102"]
    assert counts["oversized_caption"] >= 2 and counts["duplicate_key"] >= 2


def test_captions_are_cut_before_cleaning() -> None:
    assert caption_of({"txt": b"  " + b"a" * 10 + b" tail"}, "txt", None, max_chars=8) == "aaaaaa"
    assert caption_of({"txt": b"short  "}, "txt", None, max_chars=8) == "short"
    assert caption_of({"txt": b"no cut"}, "txt", None) == "no cut"


# A child reads the shards so that its peak RSS is its own: VmHWM, the high-water mark of its address
# space (ru_maxrss would carry over the forking parent's peak across exec).
CHILD = """
import json, sys
from collections import Counter
from data_pipeline.shards import ShardTask, read_samples
from data_pipeline.sources import RetryPolicy
skipped = Counter()
keys = [s.key for _, s in read_samples([ShardTask(i, u) for i, u in enumerate(sys.argv[1:])], {}, RetryPolicy(), skipped)]
hwm_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps([len(keys), dict(skipped), hwm_kib // 1024]))
"""


def _bomb(path: Path, size: int, *, compressed: bool) -> str:
    """A shard whose middle sample has a caption of ``size`` bytes; as .tar.gz it is a few hundred KiB."""
    head = _sample("000", 0)
    tail = _sample("002", 2)
    opener = gzip.open(path, "wb", compresslevel=1) if compressed else open(path, "wb")
    with opener as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
        for name, data in head:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("001.txt")
        info.size = size

        class Zeros(io.RawIOBase):
            left = size

            def readable(self) -> bool:
                return True

            def readinto(self, b) -> int:
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
        tar.addfile(tarfile.TarInfo("001.jpg"), io.BytesIO(b""))
        for name, data in tail:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_peak_memory_stays_small_with_huge_members(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.tar.gz", 768 << 20, compressed=True)  # inflates to 768 MiB
    big = _bomb(tmp_path / "big.tar", 200 << 20, compressed=False)
    assert Path(bomb).stat().st_size < 8 << 20
    proc = subprocess.run([sys.executable, "-c", CHILD, bomb, big], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    num_samples, skipped, peak_mib = json.loads(proc.stdout.strip().splitlines()[-1])
    assert num_samples == 4  # 000 and 002 of both shards
    assert skipped == {"oversized_caption": 2}
    assert peak_mib < 200, f"peak RSS {peak_mib} MiB"


def test_inspect_exits_non_zero_when_no_shard_could_be_read(tmp_path: Path, capsys) -> None:
    from data_pipeline.inspect import main

    for i in range(2):
        (tmp_path / f"bad{i}.tar").write_bytes(b"not a tar archive" * 64)
    assert main([str(tmp_path / "bad{0..1}.tar"), "--workers", "1"]) == 1
    assert "none of the 2 shards could be read" in capsys.readouterr().err
    good = _write(tmp_path / "good.tar", _sample("000", 0))
    assert main([good, "--workers", "1"]) == 0
    big = _write(tmp_path / "big.tar", [*_sample("000", 0, b"y" * 200), *_sample("001", 1)])
    assert main([big, "--workers", "1", "--max-caption-bytes", "100", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["skipped"] == {"oversized_caption": 1}


def test_captions_are_required_only_by_jobs_that_read_them(tmp_path: Path) -> None:
    url = _write(tmp_path / "c.tar", [*_sample("000", 0), *_sample("001", 1, b"   "), ("002.jpg", _jpeg(2)),
                                      *_sample("003", 3)])
    keys = {}
    for required in (True, False):
        spec = StreamSpec(sources=(SourceInfo("default", (url,)),), weights=(1.0,), image_size=16, batch_size=1,
                          shuffle_buffer=0, shuffle_shards=False, caption_required=required)
        batches = StreamingBatches(spec, rank=0, world_size=1, num_workers=0)
        try:
            keys[required] = [batches.next_batch()["keys"][0] for _ in range(4)]
        finally:
            batches.close()
    assert keys[True] == ["000", "003", "000", "003"]  # empty and missing captions skipped
    assert keys[False] == ["000", "001", "002", "003"]  # an autoencoder job keeps them
    from trainer.tasks import TASKS

    assert TASKS["autoencoder"].uses_captions is False and TASKS["diffusion"].uses_captions is True


def test_bucket_layout_is_logged_and_a_single_bucket_warned(tmp_path: Path, caplog) -> None:
    from data_pipeline.batches import build_batches
    from data_pipeline.config import BucketConfig, DataConfig

    url = _write(tmp_path / "b.tar", [*_sample("000", 0), *_sample("001", 1)])
    for size, step, single in ((64, 64, True), (128, 32, False)):
        caplog.clear()
        data = DataConfig(kind="webdataset", urls=[url], image_size=size, num_workers=0,
                          buckets=BucketConfig(enabled=True, step=step))
        with caplog.at_level(logging.INFO, logger="data_pipeline.batches"):
            batches, _ = build_batches(data, micro_batch_size=1, gradient_accumulation=1, rank=0, world_size=1)
            batches.close()
        assert "aspect buckets (height x width): " in caplog.text
        assert ("gives a single bucket 64x64" in caplog.text) is single
