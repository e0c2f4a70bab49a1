"""Tests for ``python -m data_pipeline.inspect``: counts, statistics and the command line, on the
planted corpora of tests/corpus.py (their expected outcome is written down by the corpus builder)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corpus import TRUNCATED_AT, TRUNCATED_SHARD, TRUNCATED_SHARD_INDEX, build_clean_corpus, build_corrupt_corpus
from data_pipeline.inspect import inspect_shards, main, redact, select_shards
from data_pipeline.sources import RetryPolicy
from data_pipeline.writer import ShardWriter

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((64, 48), (40, 64), (96, 96))  # (width, height), build_clean_corpus's default


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return build_clean_corpus(out, n_shards=3, per_shard=5, sizes=SIZES)


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    return build_corrupt_corpus(tmp_path_factory.mktemp("corrupt"))


def _pct(values, q):
    return pytest.approx(float(np.percentile(np.asarray(values, dtype=float), q)))


def test_clean_corpus_counts_and_header_sizes(clean):
    n = 15
    r = inspect_shards(clean, workers=2)
    assert r["shards"] == {"count": 3, "ok": 3, "truncated": 0, "unreadable": 0, "problems": []}
    assert (r["samples"], r["usable"], r["skipped"]) == (n, n, {})
    assert r["parts"] == {"jpg": n, "json": n, "txt": n}
    assert r["image_formats"] == {"by_extension": {"jpg": n}, "by_pil_format": {"JPEG": n}}
    widths = [SIZES[i % 3][0] for i in range(n)]
    heights = [SIZES[i % 3][1] for i in range(n)]
    for name, values in (("width", widths), ("height", heights),
                         ("pixels", [w * h for w, h in zip(widths, heights)])):
        stats = r["image_size"][name]
        assert (stats["min"], stats["max"]) == (min(values), max(values))
        for point, q in (("p5", 5), ("median", 50), ("p95", 95)):
            assert stats[point] == _pct(values, q), (name, point)
    assert r["image_size"]["width"]["median"] == 64 and r["image_size"]["pixels"]["max"] == 96 * 96
    # 64x48 is 4:3, 40x64 is 0.625, 96x96 square; 5 of each in 15 samples
    assert r["aspect_ratio"] == {"<0.5": 0, "0.5-0.75": 5, "0.75-0.95": 0, "0.95-1.05": 5, "1.05-1.4": 5,
                                 "1.4-2.0": 0, ">=2.0": 0}
    chars = [len(f"a photo number {i}") for i in range(n)]
    assert r["caption_length"]["chars"] == {"min": 16, "median": _pct(chars, 50), "p95": _pct(chars, 95), "max": 17}
    assert r["caption_length"]["words"] == {"min": 4, "median": 4, "p95": 4, "max": 4}
    m = r["metadata"]
    assert (m["samples_with_json"], m["unparseable"]) == (n, 0)
    assert set(m["fields"]) >= {"key", "caption", "url", "width", "height", "similarity", "aesthetic", "pwatermark"}
    assert set(m["fields"].values()) == {n}
    assert m["numeric"]["width"] == {"min": 40, "median": 64, "max": 96}
    assert "key" not in m["numeric"] and "caption" not in m["numeric"]
    sim = m["numeric"]["similarity"]
    assert 0.25 <= sim["min"] <= sim["median"] <= sim["max"] <= 0.45 and sim["min"] < sim["max"]


def test_corrupt_corpus_counts_by_reason_match_the_plan(corrupt):
    expected_samples = len(corrupt["good_keys"]) + sum(
        v for k, v in corrupt["skipped"].items() if k != TRUNCATED_SHARD)
    for decode in (False, True):
        r = inspect_shards(corrupt["urls"], workers=3, decode=decode)
        assert r["skipped"] == dict(corrupt["skipped"]), decode
        assert r["usable"] == len(corrupt["good_keys"])
        assert r["samples"] == expected_samples
        assert (r["shards"]["ok"], r["shards"]["truncated"], r["shards"]["unreadable"]) == (3, 1, 0)
        [problem] = r["shards"]["problems"]
        assert (problem["url"], problem["status"], problem["samples_read"]) == (
            corrupt["urls"][TRUNCATED_SHARD_INDEX], "truncated", TRUNCATED_AT)
    assert r["image_formats"]["by_extension"] == {"jpg": expected_samples - 4, "png": 2}
    assert r["image_formats"]["by_pil_format"] == {"JPEG": len(corrupt["good_keys"])}


def test_settings_change_what_is_usable(clean, corrupt):
    assert inspect_shards(clean, caption_key="json:caption")["usable"] == 15
    assert inspect_shards(clean, caption_key="json:nope")["skipped"] == {"missing_caption": 15}
    assert inspect_shards(clean, image_keys=("png", "webp"))["skipped"] == {"missing_image": 15}
    assert inspect_shards(clean, max_pixels=64 * 64)["skipped"] == {"oversized_image": 5}  # the 96x96 ones
    with pytest.raises(ValueError, match="image_keys"):
        inspect_shards(clean, image_keys=())


def test_decode_finds_images_whose_header_is_fine_but_data_is_cut(tmp_path):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    whole = buf.getvalue()
    url = str(tmp_path / "00000.tar")
    with ShardWriter(url) as w:
        w.write("000000000", {"jpg": whole, "txt": b"whole"})
        w.write("000000001", {"jpg": whole[: len(whole) // 2], "txt": b"cut"})
    header_only = inspect_shards([url])
    assert (header_only["usable"], header_only["skipped"]) == (2, {})
    decoded = inspect_shards([url], decode=True)
    assert (decoded["usable"], decoded["skipped"]) == (1, {"undecodable_image": 1})


def test_select_shards():
    urls = [f"s{i}" for i in range(10)]
    assert select_shards(urls) == urls and select_shards(urls, limit=3) == ["s0", "s1", "s2"]
    picked = select_shards(urls, sample=4, seed=1)
    assert len(set(picked)) == 4 and picked == sorted(picked, key=urls.index)
    assert picked == select_shards(urls, sample=4, seed=1) != select_shards(urls, sample=4, seed=2)
    assert select_shards(urls, sample=20) == urls
    for kwargs in ({"limit": 0}, {"sample": 0}, {"limit": 1, "sample": 1}):
        with pytest.raises(ValueError):
            select_shards(urls, **kwargs)


def test_unreadable_shard_is_counted_and_secrets_are_not_shown():
    # Nothing listens on port 1 of loopback (and fsspec takes the "?" for a glob): unreadable, no retry.
    url = "http://user:hunter2@127.0.0.1:1/shards/00000.tar?X-Amz-Signature=deadbeef"
    r = inspect_shards([url], retry=RetryPolicy(max_retries=0))
    assert r["shards"]["unreadable"] == 1 and r["skipped"] == {"unreadable_shard": 1}
    assert r["shards"]["problems"][0]["url"] == "http://***REDACTED***@127.0.0.1:1/shards/00000.tar?***"
    text = json.dumps(r)
    assert "hunter2" not in text and "deadbeef" not in text
    assert redact("s3://bucket/a.tar") == "s3://bucket/a.tar"


def test_cli_prints_table_and_writes_json(corrupt, tmp_path, capsys):
    out = tmp_path / "report.json"
    pattern = str(Path(corrupt["urls"][0]).parent / "{00000..00003}.tar")
    assert main([pattern, "--workers", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(inspect_shards(corrupt["urls"])))
    assert report["skipped"] == dict(corrupt["skipped"])
    assert [p for p in os.listdir(tmp_path) if p != "report.json"] == []  # no temporary file left
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["shards", "4"]
    assert ["usable", str(len(corrupt["good_keys"]))] == lines[2].split()[:2]
    assert f"truncated: {corrupt['urls'][TRUNCATED_SHARD_INDEX]}" in text
    for reason, count in corrupt["skipped"].items():
        assert f"  {reason} " in text and any(ln.split() == [reason, str(count)] for ln in lines)
    # numbers are right-aligned: the counts of the skipped section end in the same column
    skipped_rows = [ln for ln in lines if ln.split()[:1] and ln.split()[0] in corrupt["skipped"]]
    assert len({len(ln) for ln in skipped_rows}) == 1

    assert main([pattern, "--limit-shards", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["shards"]["count"] == 1


def test_cli_pattern_matching_nothing_exits_2(tmp_path, capsys):
    build_clean_corpus(tmp_path, n_shards=1, per_shard=1)
    missing = str(tmp_path / "{00005..00007}.tar")
    assert main([str(tmp_path / "00000.tar"), missing]) == 2
    assert missing in capsys.readouterr().err
    glob = str(tmp_path / "nope-*.tar")
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.inspect", glob], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert glob in proc.stderr and proc.stdout == ""


def test_cli_reads_s3_with_endpoint_option(s3_server, tmp_path, capsys):
    from s3_server import TEST_SECRET_KEY, make_bucket, s3_storage_options, upload_tree

    bucket = f"inspect-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_server.endpoint_url, bucket)
    build_clean_corpus(tmp_path / "local", n_shards=2, per_shard=3)
    upload_tree(tmp_path / "local", f"s3://{bucket}/shards/", s3_storage_options(s3_server.endpoint_url))
    out = tmp_path / "r.json"
    assert main([f"s3://{bucket}/shards/*.tar", "--s3-endpoint-url", s3_server.endpoint_url,
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["shards"]["ok"], r["samples"], r["usable"]) == (2, 6, 6)
    printed = capsys.readouterr()
    assert TEST_SECRET_KEY not in printed.out + printed.err + out.read_text()
    assert main([f"s3://{bucket}/shards/{{00003..00004}}.tar", "--s3-endpoint-url", s3_server.endpoint_url]) == 2
    assert "00003..00004" in capsys.readouterr().err
