"""Inspect a webdataset dataset (img2dataset layout) before training on it.

    python -m data_pipeline.inspect 's3://bucket/laion/{00000..01023}.tar' --sample-shards 20 --json report.json

Shards are read with the training pipeline's reader and every sample goes through its checks
(missing image, caption, header-only open for the pixel limit; ``--decode`` decodes each image too),
so the skip counts by reason are the ones a training run would report. Size, format, caption and
metadata statistics describe the usable samples; ``parts`` and image formats by extension describe
every sample read. Sizes come from image headers: nothing is decoded without ``--decode``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from data_pipeline.decode import BadSample, Transform, caption_of, decode_sample, metadata_of, open_image
from data_pipeline.position import SKIP_REASONS
from data_pipeline.shards import MemberLimits, RawSample, ShardTask, read_shard
from data_pipeline.sources import RetryPolicy, S3Options, check_unique, expand_urls, filesystem, storage_options_for
from trainer.images import atomic_write_bytes
from trainer.runtime.tracking import redact_text

DEFAULT_MAX_PIXELS = 8192 * 8192  # as data_pipeline.decode.Transform and conf/data/webdataset.yaml
# --decode decodes at full (or JPEG draft) resolution and then resizes to cover this square; small
# keeps the resize cheap, and the decode itself is what the check is about.
DECODE_CHECK_SIZE = 64
ASPECT_EDGES = (0.5, 0.75, 0.95, 1.05, 1.4, 2.0)  # width / height; bins are [lo, hi)
ASPECT_BINS = (f"<{ASPECT_EDGES[0]}",
               *(f"{lo}-{hi}" for lo, hi in zip(ASPECT_EDGES, ASPECT_EDGES[1:])), f">={ASPECT_EDGES[-1]}")
FIVE_POINTS = {"min": 0, "p5": 5, "median": 50, "p95": 95, "max": 100}
FOUR_POINTS = {"min": 0, "median": 50, "p95": 95, "max": 100}
THREE_POINTS = {"min": 0, "median": 50, "max": 100}


def redact(text: str) -> str:
    """``text`` scrubbed by the run's one redaction (``redact_text``), and without query strings: a
    report names shards, never their pre-signed parameters."""
    return re.sub(r"(https?://[^\s?'\"]*)\?[^\s'\"]*", r"\1?***", redact_text(text))


@dataclass
class _Tally:
    """What one shard (or, merged, the dataset) contains."""

    samples: int = 0
    usable: int = 0
    skipped: Counter = field(default_factory=Counter)
    problems: list = field(default_factory=list)  # non-ok shards
    ok_shards: int = 0
    parts: Counter = field(default_factory=Counter)
    by_extension: Counter = field(default_factory=Counter)
    by_pil_format: Counter = field(default_factory=Counter)
    widths: list = field(default_factory=list)
    heights: list = field(default_factory=list)
    aspect: Counter = field(default_factory=Counter)
    caption_chars: list = field(default_factory=list)
    caption_words: list = field(default_factory=list)
    json_samples: int = 0
    json_unparseable: int = 0
    fields: Counter = field(default_factory=Counter)
    numeric: dict = field(default_factory=dict)  # field -> list of values

    def merge(self, other: "_Tally") -> None:
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if isinstance(mine, dict) and not isinstance(mine, Counter):
                for k, v in value.items():
                    mine.setdefault(k, []).extend(v)
            else:
                setattr(self, name, mine + value)


def _check(parts: dict[str, bytes], *, image_keys: Sequence[str], caption_key: str, max_pixels: int,
           decode: bool, rng: np.random.Generator) -> tuple[str, str, Any, dict | None]:
    """(image extension, caption, lazily opened image, metadata) of a usable sample, or ``BadSample``.
    The checks and their order are decode_sample's (without filters): the same sample gets the same
    reason as in training."""
    if decode:
        decode_sample(parts, image_keys=image_keys, caption_key=caption_key, image_size=DECODE_CHECK_SIZE,
                      transform=Transform(max_pixels=max_pixels), rng=rng)
    ext = next((k for k in image_keys if k in parts), None)
    if ext is None:
        raise BadSample("missing_image")
    meta = metadata_of(parts) if caption_key.startswith("json:") else None
    caption = caption_of(parts, caption_key, meta)
    return ext, caption, open_image(parts[ext], max_pixels), meta


def _inspect_shard(shard: int, url: str, *, storage_options: dict[str, Any], retry: RetryPolicy,
                   image_keys: Sequence[str], caption_key: str, max_pixels: int, decode: bool,
                   limits: MemberLimits) -> _Tally:
    t = _Tally()
    rng = np.random.default_rng(0)
    for item in read_shard(ShardTask(shard, url), storage_options, retry, limits=limits):
        if not isinstance(item, RawSample):
            if item.status == "ok":
                t.ok_shards += 1
            else:
                t.skipped[f"{item.status}_shard"] += 1
                t.problems.append({"url": redact(url), "status": item.status, "samples_read": item.count,
                                   "error": redact(item.error)})
            continue
        t.samples += 1
        if item.skip:  # an oversized member (never read) or a repeated key
            t.skipped[item.skip] += 1
            continue
        t.parts.update(item.parts.keys())
        ext = next((k for k in image_keys if k in item.parts), None)
        if ext is not None:
            t.by_extension[ext] += 1
        try:
            ext, caption, img, meta = _check(item.parts, image_keys=image_keys, caption_key=caption_key,
                                             max_pixels=max_pixels, decode=decode, rng=rng)
        except BadSample as bad:
            t.skipped[bad.reason] += 1
            continue
        t.usable += 1
        t.by_pil_format[img.format or "unknown"] += 1
        w, h = img.size
        t.widths.append(w)
        t.heights.append(h)
        t.aspect[ASPECT_BINS[bisect.bisect_right(ASPECT_EDGES, w / h)]] += 1
        t.caption_chars.append(len(caption))
        t.caption_words.append(len(caption.split()))
        if "json" in item.parts:
            t.json_samples += 1
            try:
                meta = meta if meta is not None else metadata_of(item.parts)
            except BadSample:
                t.json_unparseable += 1
                continue
            t.fields.update(meta.keys())
            for k, v in meta.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    t.numeric.setdefault(k, []).append(float(v))
    return t


def _stats(values: Sequence[float], points: dict[str, float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {name: float(np.percentile(a, q)) for name, q in points.items()}


def inspect_shards(urls: Sequence[str], *, image_keys: Sequence[str] = ("jpg", "png", "webp"),
                   caption_key: str = "txt", max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = False,
                   workers: int = 4, s3: S3Options | None = None, storage_options: dict[str, Any] | None = None,
                   retry: RetryPolicy = RetryPolicy(max_retries=3),
                   on_shard: Callable[[int], None] | None = None,
                   limits: MemberLimits | None = None) -> dict[str, Any]:
    """Read every shard of ``urls`` (``workers`` threads) and return the report (JSON-ready; URLs and
    errors redacted). ``on_shard(num_done)`` is called as shards finish."""
    if not urls:
        raise ValueError("no shard URLs to inspect")
    if not image_keys:
        raise ValueError("image_keys is empty: name at least one image extension (e.g. jpg)")
    if workers < 1 or max_pixels < 1:
        raise ValueError(f"workers={workers} and max_pixels={max_pixels} must be >= 1")

    defaults = MemberLimits()
    limits = MemberLimits(image_exts=tuple(image_keys),
                          caption_ext="json" if caption_key.startswith("json:") else caption_key,
                          max_image_bytes=(limits or defaults).max_image_bytes,
                          max_caption_bytes=(limits or defaults).max_caption_bytes,
                          max_member_bytes=(limits or defaults).max_member_bytes)

    def one(args: tuple[int, str]) -> _Tally:
        shard, url = args
        return _inspect_shard(shard, url, storage_options=storage_options_for(url, s3, storage_options), retry=retry,
                              image_keys=tuple(image_keys), caption_key=caption_key, max_pixels=max_pixels,
                              decode=decode, limits=limits)

    total = _Tally()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, t in enumerate(pool.map(one, enumerate(urls)), 1):
            total.merge(t)
            if on_shard is not None:
                on_shard(done)
    status = Counter(p["status"] for p in total.problems)
    return {
        "shards": {"count": len(urls), "ok": total.ok_shards, "truncated": status["truncated"],
                   "unreadable": status["unreadable"], "problems": total.problems},
        "samples": total.samples,
        "usable": total.usable,
        "skipped": {r: total.skipped[r] for r in SKIP_REASONS if total.skipped[r]}
                   | {r: n for r, n in sorted(total.skipped.items()) if r not in SKIP_REASONS},
        "image_formats": {"by_extension": dict(total.by_extension.most_common()),
                          "by_pil_format": dict(total.by_pil_format.most_common())},
        "image_size": {"width": _stats(total.widths, FIVE_POINTS), "height": _stats(total.heights, FIVE_POINTS),
                       "pixels": _stats([w * h for w, h in zip(total.widths, total.heights)], FIVE_POINTS)},
        "aspect_ratio": {b: total.aspect[b] for b in ASPECT_BINS},
        "caption_length": {"chars": _stats(total.caption_chars, FOUR_POINTS),
                           "words": _stats(total.caption_words, FOUR_POINTS)},
        "metadata": {"samples_with_json": total.json_samples, "unparseable": total.json_unparseable,
                     "fields": dict(sorted(total.fields.items())),
                     "numeric": {k: _stats(v, THREE_POINTS) for k, v in sorted(total.numeric.items())}},
        "parts": dict(sorted(total.parts.items())),
        "settings": {"image_keys": list(image_keys), "caption_key": caption_key, "max_pixels": max_pixels,
                     "decode": decode, "max_image_bytes": limits.max_image_bytes,
                     "max_caption_bytes": limits.max_caption_bytes, "max_member_bytes": limits.max_member_bytes},
    }


# ----------------------------------------------------------------------------- shard selection


def _matches_any(urls: list[str], s3: S3Options | None, storage_options: dict[str, Any] | None) -> bool:
    """Whether any of ``urls`` exists: one ``exists`` for the first, else one listing per parent."""
    fs, first = filesystem(urls[0], storage_options_for(urls[0], s3, storage_options))
    try:
        if fs.exists(first):
            return True
        paths = {fs._strip_protocol(u).rstrip("/") for u in urls}
        for parent in sorted({p.rsplit("/", 1)[0] for p in paths}):
            try:
                if paths.intersection(p.rstrip("/") for p in fs.ls(parent, detail=False)):
                    return True
            except (FileNotFoundError, NotADirectoryError):
                continue
        return False
    except (FileNotFoundError, NotADirectoryError):
        return False
    except Exception:  # noqa: BLE001 - cannot tell (permissions, network): reading will report it per shard
        return True


def expand_patterns(patterns: Sequence[str], *, s3: S3Options | None = None,
                    storage_options: dict[str, Any] | None = None) -> list[str]:
    """The shard URLs of ``patterns`` in order; ``FileNotFoundError`` naming a pattern that matches no
    existing shard, ``ValueError`` for a URL listed twice."""
    urls: list[str] = []
    for pattern in patterns:
        try:
            found = expand_urls([pattern], s3=s3, storage_options=storage_options)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"the pattern {pattern!r} matches no shard ({e})") from None
        if not found or not _matches_any(found, s3, storage_options):
            raise FileNotFoundError(f"the pattern {pattern!r} matches no shard ({len(found)} URL(s) "
                                    f"from it, none exists, e.g. {found[0] if found else pattern!r})")
        urls.extend(found)
    return check_unique(urls)


def select_shards(urls: Sequence[str], *, limit: int | None = None, sample: int | None = None,
                  seed: int = 0) -> list[str]:
    """The first ``limit`` shards, or ``sample`` shards drawn with ``seed`` (kept in list order), or all."""
    if limit is not None and sample is not None:
        raise ValueError("--limit-shards and --sample-shards exclude each other: give one")
    for name, n in (("--limit-shards", limit), ("--sample-shards", sample)):
        if n is not None and n < 1:
            raise ValueError(f"{name}={n}: must be >= 1")
    if limit is not None:
        return list(urls[:limit])
    if sample is not None and sample < len(urls):
        picked = np.random.default_rng(seed).choice(len(urls), size=sample, replace=False)
        return [urls[i] for i in sorted(picked)]
    return list(urls)


# ----------------------------------------------------------------------------- text output


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}"


NUMERIC_CELL = re.compile(r"^-?[\d,.]+%?$|^-$|^$")


def _align(rows: list[tuple[str, ...]], label_width: int) -> list[str]:
    """Rows as lines: the label column ``label_width`` wide; a column whose cells (header row aside) are
    all numbers is right-aligned, any other left-aligned."""
    ncols = max(map(len, rows))
    rows = [r + ("",) * (ncols - len(r)) for r in rows]
    widths = [label_width] + [max(len(r[i]) for r in rows) for i in range(1, ncols)]
    right = [i > 0 and all(NUMERIC_CELL.match(r[i]) for r in rows[1:]) for i in range(ncols)]
    return ["  ".join(c.rjust(widths[i]) if right[i] else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()
            for r in rows]


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in c.items()) or "-"


def format_report(r: dict[str, Any]) -> str:
    """The report as aligned text tables, one per section."""
    s, fmt, m = r["shards"], r["image_formats"], r["metadata"]
    total_images = max(sum(r["aspect_ratio"].values()), 1)
    sections = [
        [("shards", f"{s['count']:,}", f"ok {s['ok']:,}, truncated {s['truncated']:,}, "
                                        f"unreadable {s['unreadable']:,}"),
         ("samples", f"{r['samples']:,}", "read"),
         ("usable", f"{r['usable']:,}", f"{100 * r['usable'] / max(r['samples'], 1):.1f}% of the samples read")],
        [("skipped", "samples"), *([(f"  {k}", f"{v:,}") for k, v in r["skipped"].items()] or [("  (none)", "0")])],
        [("parts", _counts(r["parts"])), ("image formats", ""),
         ("  by extension", _counts(fmt["by_extension"])), ("  by PIL format", _counts(fmt["by_pil_format"]))],
        [("image size (header)", *FIVE_POINTS),
         *((f"  {k}", *(_num((st or {}).get(p)) for p in FIVE_POINTS)) for k, st in r["image_size"].items())],
        [("aspect ratio (w/h)", "images", ""),
         *((f"  {b}", f"{n:,}", "#" * round(30 * n / total_images)) for b, n in r["aspect_ratio"].items())],
        [("caption length", *FOUR_POINTS),
         *((f"  {k}", *(_num((st or {}).get(p)) for p in FOUR_POINTS)) for k, st in r["caption_length"].items())],
        [("metadata (.json)", "present", *THREE_POINTS),
         *((f"  {k}", f"{n:,}", *(_num((m["numeric"].get(k) or {}).get(p)) if k in m["numeric"] else ""
                                  for p in THREE_POINTS)) for k, n in m["fields"].items())],
    ]
    label_width = max(len(row[0]) for rows in sections for row in rows)
    out = _align(sections[0], label_width)
    out += [f"  {p['status']}: {p['url']} ({p['samples_read']:,} samples read; {p['error']})" for p in s["problems"]]
    for rows in sections[1:]:
        out += ["", *_align(rows, label_width)]
    out.append(f"  ({m['samples_with_json']:,} usable samples with .json, {m['unparseable']:,} unparseable)")
    return "\n".join(out) + "\n"


def write_json_atomic(path: str, report: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m data_pipeline.inspect``."""
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("patterns", nargs="+", metavar="url-pattern",
                    help="shard URLs: brace patterns, globs, list files (.txt/.list/.lst), any fsspec URL")
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--limit-shards", type=int, metavar="N", help="inspect the first N shards only")
    pick.add_argument("--sample-shards", type=int, metavar="N", help="inspect N shards drawn at random (--seed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample-shards (default 0)")
    ap.add_argument("--image-keys", default="jpg,png,webp", help="image part extensions, first present wins")
    ap.add_argument("--caption-key", default="txt", help="caption part (txt) or json:<field>")
    ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped")
    ap.add_argument("--decode", action="store_true", help="fully decode every image too (slower)")
    defaults = MemberLimits()
    ap.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes,
                    help="larger image members are skipped unread (as data.max_image_bytes)")
    ap.add_argument("--max-caption-bytes", type=int, default=defaults.max_caption_bytes,
                    help="larger caption members are skipped unread (as data.max_caption_bytes)")
    ap.add_argument("--max-member-bytes", type=int, default=defaults.max_member_bytes,
                    help="larger other members are skipped unread (as data.max_member_bytes)")
    ap.add_argument("--workers", type=int, default=4, help="threads reading shards (default 4)")
    ap.add_argument("--s3-endpoint-url", help="endpoint of an S3-compatible store")
    ap.add_argument("--s3-profile", help="AWS profile (~/.aws) for s3:// URLs")
    ap.add_argument("--s3-anon", action="store_true", help="unsigned S3 requests (public buckets)")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s3 = S3Options(endpoint_url=args.s3_endpoint_url, profile=args.s3_profile, anon=args.s3_anon)
    try:
        urls = select_shards(expand_patterns(args.patterns, s3=s3), limit=args.limit_shards,
                             sample=args.sample_shards, seed=args.seed)
        progress = None
        if sys.stderr.isatty():
            def progress(done: int) -> None:
                print(f"\r{done}/{len(urls)} shards", end="" if done < len(urls) else "\n", file=sys.stderr)
        report = inspect_shards(urls, image_keys=[k.strip() for k in args.image_keys.split(",") if k.strip()],
                                caption_key=args.caption_key, max_pixels=args.max_pixels, decode=args.decode,
                                workers=args.workers, s3=s3, on_shard=progress,
                                limits=MemberLimits(max_image_bytes=args.max_image_bytes,
                                                    max_caption_bytes=args.max_caption_bytes,
                                                    max_member_bytes=args.max_member_bytes))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    sys.stdout.write(format_report(report))
    if args.json:
        write_json_atomic(args.json, report)
    shards = report["shards"]
    if shards["ok"] == 0 and report["samples"] == 0:
        print(f"error: none of the {shards['count']} shards could be read (see the problems above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
