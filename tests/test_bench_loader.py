"""bench/loader.py on a tiny dataset: the report's fields, the dataset cache, and that the baseline does
the same work as our pipeline (pixel-identical without draft decoding). No assertion on timings."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage", reason="scikit-image is not installed (pip install -e '.[test]')")
pytest.importorskip("webdataset")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "loader.py"
NUM_SAMPLES, NUM_SHARDS, SIZE, BATCH = 40, 4, 64, 16


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_loader", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("loader_shards")
    manifest = bench.build_dataset(data_dir, NUM_SAMPLES, NUM_SHARDS, seed=0)
    return data_dir, manifest, [str(data_dir / s["name"]) for s in manifest["shards"]]


def _draw(batches, num_batches):
    out = [next(batches) for _ in range(num_batches)]
    bench._close(batches)
    return out


def test_dataset_is_realistic_and_cached(dataset, tmp_path):
    data_dir, manifest, urls = dataset
    assert not manifest["reused"]
    assert [s["num_samples"] for s in manifest["shards"]] == [10, 10, 10, 10]
    stats = manifest["stats"]
    assert bench.MIN_SIDE <= stats["min_side"] and stats["max_side"] <= bench.MAX_SIDE
    assert stats["max_side"] - stats["min_side"] > 500  # varied sizes, not one
    assert set(stats["photos_used"]) <= set(bench.PHOTOS) and len(stats["photos_used"]) >= 4

    again = bench.build_dataset(data_dir, NUM_SAMPLES, NUM_SHARDS, seed=0)
    assert again["reused"] and again["shards"] == manifest["shards"]

    # Seeded: a build elsewhere gives the same bytes; a damaged shard is noticed and rebuilt.
    other = bench.build_dataset(tmp_path, NUM_SAMPLES, NUM_SHARDS, seed=0)
    assert [s["sha256"] for s in other["shards"]] == [s["sha256"] for s in manifest["shards"]]
    shard = tmp_path / other["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    rebuilt = bench.build_dataset(tmp_path, NUM_SAMPLES, NUM_SHARDS, seed=0)
    assert not rebuilt["reused"] and rebuilt["shards"] == manifest["shards"]
    assert not bench.build_dataset(tmp_path, NUM_SAMPLES, NUM_SHARDS, seed=1)["reused"]


def test_baseline_is_the_same_work_as_ours_without_draft(dataset):
    """Without JPEG draft decoding our pipeline and the baseline do the same work, in order: the same
    antialiased bicubic filter (ours runs torch's uint8 kernel: within 2 levels of Pillow's)."""
    _, _, urls = dataset
    for size in (SIZE, 512):  # 512: some images are upscaled, some downscaled
        ours = _draw(bench.ours_batches(bench.ours_spec(urls, size, BATCH, draft=False)), 3)
        base = _draw(bench.baseline_batches(urls, size, BATCH), 3)
        for o, b in zip(ours, base):
            assert o["keys"] == b["keys"]
            assert o["captions"] == b["captions"]
            assert o["images"].shape == b["images"].shape == (BATCH, 3, size, size)
            assert o["images"].dtype == b["images"].dtype
            diff = (o["images"].int() - b["images"].int()).abs()
            assert int(diff.max()) <= 2 and float(diff.float().mean()) < 0.05
    keys = [k for b in base for k in b["keys"]]
    assert len(keys) == 3 * BATCH and len(set(keys)) == NUM_SAMPLES  # the stream wrapped around the epoch


def test_draft_decoding_differs_little(dataset):
    _, _, urls = dataset
    out = bench.compare_outputs(bench.baseline_batches(urls, SIZE, BATCH),
                                bench.ours_batches(bench.ours_spec(urls, SIZE, BATCH)), 3, SIZE, BATCH)
    assert out["num_compared"] == NUM_SAMPLES and out["shape"] == [3, SIZE, SIZE]
    # Every image is >= 300 px and the target 64 px, so draft mode reduces every decode.
    assert 0.0 < out["mean_abs_diff"] < bench.PIXEL_TOLERANCE and out["within_tolerance"]
    assert out["identical_images"] < NUM_SAMPLES
    assert abs(out["mean_signed_diff"]) < 1.0  # no brightness shift, only resampling differences


def test_s3_reads_give_the_local_samples(dataset, s3_server):
    from s3_server import make_bucket, s3_storage_options, upload_tree

    data_dir, manifest, local_urls = dataset
    bucket = "test-bench-loader"
    make_bucket(s3_server.endpoint_url, bucket)
    upload_tree(data_dir, f"s3://{bucket}/shards", s3_storage_options(s3_server.endpoint_url))
    urls = [f"s3://{bucket}/shards/{s['name']}" for s in manifest["shards"]]
    extra = {k: v for k, v in s3_storage_options(s3_server.endpoint_url).items() if k != "endpoint_url"}
    spec = bench.ours_spec(urls, SIZE, BATCH, s3=bench.S3Options(endpoint_url=s3_server.endpoint_url),
                           storage_options=extra)
    local = _draw(bench.baseline_batches(local_urls, SIZE, BATCH), 2)
    with bench.webdataset_s3_opener(spec.options_for):
        base = _draw(bench.baseline_batches(urls, SIZE, BATCH), 2)
    import webdataset

    assert "s3" not in webdataset.gopen_schemes  # the handler is removed after the block
    ours = _draw(bench.ours_batches(spec), 2)
    for lo, b, o in zip(local, base, ours):
        assert lo["keys"] == b["keys"] == o["keys"]
        assert bool((lo["images"] == b["images"]).all())


def test_tiny_run_prints_table_and_writes_json(dataset, tmp_path):
    data_dir, _, _ = dataset
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--samples", "64", "--sizes", str(SIZE), "--no-s3", "--rounds", "1",
         "--data-dir", str(data_dir), "--data-samples", str(NUM_SAMPLES), "--data-shards", str(NUM_SHARDS),
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    header = next(ln for ln in lines if ln.lstrip().startswith("source |"))
    for column in ("baseline/s", "ours/s", "ours/baseline", "goal", "per CPU-s"):
        assert column in header
    rows = [ln for ln in lines if ln.lstrip().startswith("local |")]
    assert len(rows) == 1 and f"| {SIZE:>4} |" in rows[0] and ">=1.5x" in rows[0]
    assert "(reused)" in proc.stdout and "mean abs diff" in proc.stdout

    result = json.loads(out.read_text())
    assert result["config"]["sizes"] == [SIZE] and result["config"]["s3"] is False
    assert result["dataset"]["reused"] is True
    [row] = result["rows"]
    assert (row["source"], row["size"], row["samples"], row["goal"]) == ("local", SIZE, 64, 1.5)
    for name in ("baseline", "ours"):
        assert row[name]["samples_per_s"] > 0 and row[name]["samples_per_cpu_s"] > 0
        [timing] = row[name]["rounds"]
        assert timing["samples"] == 64
        assert math.isclose(row[name]["samples_per_s"], timing["samples"] / timing["wall_s"])
    assert math.isclose(row["ratio"], row["ours"]["samples_per_s"] / row["baseline"]["samples_per_s"])
    assert row["meets_goal"] == (row["ratio"] >= 1.5)
    [check] = result["verification"]
    assert check["size"] == SIZE and check["shape"] == [3, SIZE, SIZE] and check["num_compared"] == NUM_SAMPLES
    assert np.isfinite(check["mean_abs_diff"])
    assert check["dataset_draft_fraction"] == 1.0  # every image is >= 300 px, twice the 64 px target


@pytest.mark.parametrize("argv, match", [
    (["--samples", "0"], "samples=0"),
    (["--sizes", "64,x"], "sizes="),
    (["--sizes", "4"], "sizes="),
    (["--data-samples", "2", "--data-shards", "4"], "data_samples=2"),
])
def test_bad_arguments_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_args(argv)
