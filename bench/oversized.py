"""Steady step time with oversized members (issue 19, item 2): samples/s of the streaming pipeline on
shards where some samples carry a member far over its bound, against the same shards without them.

    python bench/oversized.py [--caption-mib 50] [--every 25] [--samples 400] [--rounds 3] [--json PATH]

The clean shards are ``bench/loader.py``'s (realistic JPEGs at 256 px, one canonical stream, no
shuffle, shards in order). Each variant is the same samples with, after every ``--every``-th one,
an extra sample whose caption is ``--caption-mib`` MiB (over ``data.max_caption_bytes``, 64 KiB by
default), written as a plain ``.tar`` and as a ``.tar.gz`` (the caption compresses to almost
nothing: a decompression bomb). The bound skips such a member from its tar header without reading
it into memory (a seek in a plain tar; inflating through it in a gzip stream, which cannot seek).
Before the bound, a 50 MiB caption made each batch holding it about 90x slower.

Reported per compression: the median samples/s over ``--rounds`` of clean vs bombed (usable samples
only: the bombed sample is skipped and counted), their ratio, and the skip counts. The two sides
alternate within each round, order reversed every round. One process, one thread.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import statistics
import sys
import tarfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loader  # noqa: E402  (bench/loader.py: the shards and our pipeline's spec)

from data_pipeline.stream import StreamingBatches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
SIZE = 256


def _members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def write_variant(clean: list[Path], out_dir: Path, *, compressed: bool, bomb_bytes: int, every: int) -> list[str]:
    """The clean shards' members, re-written with a bomb sample after every ``every``-th sample
    (``bomb_bytes == 0``: no bombs, the same members), plain or gzip-compressed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in clean:
        path = out_dir / (shard.stem + (".tar.gz" if compressed else ".tar"))
        urls.append(str(path))
        if path.is_file():
            continue
        tmp = path.with_name(path.name + ".tmp")
        raw = gzip.open(tmp, "wb", compresslevel=1) if compressed else open(tmp, "wb")
        with raw, tarfile.open(fileobj=raw, mode="w|") as tar:
            keys_seen = 0
            last_key = None
            for name, data in _members(shard):
                key = name.split(".", 1)[0]
                if key != last_key:
                    if last_key is not None:
                        keys_seen += 1
                        if bomb_bytes and keys_seen % every == 0:
                            _add_bomb(tar, f"{last_key}x", bomb_bytes)
                    last_key = key
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    return urls


def _add_bomb(tar: tarfile.TarFile, key: str, size: int) -> None:
    info = tarfile.TarInfo(f"{key}.txt")
    info.size = size
    tar.addfile(info, io.BufferedReader(_Zeros(size), 1 << 20))
    jpg = tarfile.TarInfo(f"{key}.jpg")
    jpg.size = 0
    tar.addfile(jpg, io.BytesIO(b""))


def measure(urls: list[str], num_batches: int) -> tuple[float, dict[str, int]]:
    """Samples/s of ``num_batches`` batches after one untimed batch, and the skip counts."""
    import time

    batches = StreamingBatches(loader.ours_spec(urls, SIZE, BATCH), rank=0, world_size=1, num_workers=0)
    try:
        batches.next_batch()
        start = time.perf_counter()
        for _ in range(num_batches):
            batches.next_batch()
        elapsed = time.perf_counter() - start
        skipped = {k: v for k, v in batches.skip_counts().items() if v}
    finally:
        batches.close()
    return num_batches * BATCH / elapsed, skipped


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caption-mib", type=float, default=50.0)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default=str(ROOT / ".cache" / "bench" / "loader_shards"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    manifest = loader.build_dataset(args.data_dir, 400, 4)
    clean = [Path(args.data_dir) / s["name"] for s in manifest["shards"]]
    bomb = int(args.caption_mib * (1 << 20))
    work = Path(args.data_dir).parent / f"oversized_{args.caption_mib:g}mib_every{args.every}"
    num_batches = -(-args.samples // BATCH)
    rows = []
    for compressed in (False, True):
        sides = {"clean": write_variant(clean, work / ("clean_gz" if compressed else "clean"), compressed=compressed,
                                        bomb_bytes=0, every=args.every),
                 "bombed": write_variant(clean, work / ("bombed_gz" if compressed else "bombed"),
                                         compressed=compressed, bomb_bytes=bomb, every=args.every)}
        rates: dict[str, list[float]] = {"clean": [], "bombed": []}
        skips: dict[str, dict[str, int]] = {}
        for r in range(args.rounds):
            for side in (("clean", "bombed") if r % 2 == 0 else ("bombed", "clean")):
                rate, skips[side] = measure(sides[side], num_batches)
                rates[side].append(rate)
        med = {s: statistics.median(v) for s, v in rates.items()}
        rows.append({"compression": "gzip" if compressed else "none", "clean_samples_per_s": med["clean"],
                     "bombed_samples_per_s": med["bombed"], "ratio_bombed_over_clean": med["bombed"] / med["clean"],
                     "spread": {s: [min(v), max(v)] for s, v in rates.items()}, "skipped": skips.get("bombed", {})})
    print(f"{args.caption_mib:g} MiB caption after every {args.every}th sample; {num_batches * BATCH} samples of "
          f"{SIZE} px per measurement, median of {args.rounds} rounds (one thread)")
    print(f"{'shards':>8} {'clean/s':>9} {'bombed/s':>9} {'ratio':>6}  spread clean | bombed    skipped")
    for row in rows:
        sc, sb = row["spread"]["clean"], row["spread"]["bombed"]
        print(f"{row['compression']:>8} {row['clean_samples_per_s']:9.1f} {row['bombed_samples_per_s']:9.1f} "
              f"{row['ratio_bombed_over_clean']:6.3f}  {sc[0]:.0f}-{sc[1]:.0f} | {sb[0]:.0f}-{sb[1]:.0f}    "
              f"{row['skipped']}")
    result = {"caption_mib": args.caption_mib, "every": args.every, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
