"""The latent cache: same losses as encoding on the fly, resumable after kill -9, the same shards from
any number of workers, and a manifest that refuses a cache made otherwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import ROOT, losses, run, train_env

DIGITS = ROOT / ".cache" / "data" / "digits16"
BASE = ["experiment=tiny", "model=tiny_kl", f"data.root={DIGITS}"]


def _precompute(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.precompute", *BASE, f"precompute.out={out}", *extra],
                          cwd=ROOT, env=env or train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("*.tar"))}


def _sidecars(cache: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(cache.glob("*.tar.json"))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "cache"
    run(out.parent / "warm", [*BASE[1:], "train.max_steps=1"])  # builds the digits shards once
    _precompute(out, "precompute.dtype=fp32", "precompute.batch_size=7")
    return out


def test_manifest_describes_the_cache(cache: Path) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["samples"] == sum(s["samples"] for s in manifest["sources"]) > 1000
    assert manifest["shards"] == sorted(_shard_bytes(cache)) and len(manifest["sources"]) == 7
    spec = manifest["spec"]
    assert spec["image_size"] == 16 and spec["crop"] == "center" and spec["dtype"] == "fp32"
    assert len(spec["autoencoder_sha256"]) == 64 and spec["autoencoder"]["ch"] == 32
    assert manifest["skipped"] == {} and manifest["software"].startswith("ldm-platform ")


def test_training_from_the_cache_matches_encoding_on_the_fly(cache: Path, tmp_path: Path) -> None:
    urls = sorted(str(p) for p in DIGITS.glob("train-*.tar"))
    common = ["train.max_steps=4", "train.sample_posterior=false", "data.num_workers=1", "data.shuffle_buffer=64",
              "checkpoint.interval_steps=100"]
    run(tmp_path / "raw", [*BASE[1:], *common, "data.kind=webdataset", "data.urls=[" + ",".join(urls) + "]"])
    run(tmp_path / "cached", [*BASE[1:], *common, "data.kind=webdataset", f"data.latent_cache={cache}"])
    raw, cached = losses(tmp_path / "raw"), losses(tmp_path / "cached")
    assert sorted(raw) == sorted(cached) == [1, 2, 3, 4]
    assert all(abs(raw[s] - cached[s]) <= 1e-5 * abs(raw[s]) for s in raw), (raw, cached)


def test_a_cache_made_otherwise_is_refused(cache: Path, tmp_path: Path) -> None:
    stream = ["data.kind=webdataset", f"data.latent_cache={cache}"]
    proc = run(tmp_path / "other", [*BASE[1:], "train.max_steps=1", "train.seed=1", *stream], expect=None)
    assert proc.returncode != 0 and "autoencoder_sha256: cache" in proc.stderr + proc.stdout
    run(tmp_path / "forced", [*BASE[1:], "train.max_steps=1", "train.seed=1", *stream, "data.latent_cache_check=false"])


def test_two_workers_write_the_same_cache_as_one(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache2"
    for task in ("0", "1"):  # two tasks of a SLURM array, one after the other
        env = {**train_env(), "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
        proc = _precompute(out, "precompute.dtype=fp32", "precompute.batch_size=7", env=env)
        assert f"worker {task}/2: {4 if task == '0' else 3} of its" in proc.stderr
    assert _shard_bytes(out) == _shard_bytes(cache) and _sidecars(out) == _sidecars(cache)
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, cache))
    assert {k: v for k, v in ours.items() if k != "created"} == {k: v for k, v in theirs.items() if k != "created"}


def test_killed_precompute_redoes_only_unfinished_shards(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache3"
    cmd = [sys.executable, "-m", "data_pipeline.precompute", *BASE, f"precompute.out={out}", "precompute.dtype=fp32",
           "precompute.batch_size=7"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("*.tar.json")):
        assert time.time() < deadline and proc.poll() is None, "precompute ended before a shard was done"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.tar.json")))
    assert 1 <= done < 7 and not (out / "manifest.json").exists()
    log = _precompute(out, "precompute.dtype=fp32", "precompute.batch_size=7").stderr
    assert f"worker 0/1: {7 - done} of its 7 shards to encode" in log
    assert _shard_bytes(out) == _shard_bytes(cache) and _sidecars(out) == _sidecars(cache)
    assert not list(out.glob("*.tmp-*"))


def test_a_small_cache_is_held_in_memory_in_the_raw_order(cache: Path, tmp_path: Path) -> None:
    """data.kind=digits + a cache of posterior means: the in-memory order of the raw digits, so the
    losses match encoding the images at every step (the demo's path)."""
    out = tmp_path / "means"
    _precompute(out, "precompute.store=mean", "precompute.dtype=fp32")
    common = ["train.max_steps=3", "train.sample_posterior=false", "checkpoint.interval_steps=100"]
    run(tmp_path / "raw", [*BASE[1:], *common])
    run(tmp_path / "cached", [*BASE[1:], *common, f"data.latent_cache={out}"])
    raw, cached = losses(tmp_path / "raw"), losses(tmp_path / "cached")
    assert all(abs(raw[s] - cached[s]) <= 1e-5 * abs(raw[s]) for s in raw) and len(raw) == 3
    # A cache with variances cannot be trained in memory (means only there): said, not ignored.
    proc = run(tmp_path / "variances", [*BASE[1:], "train.max_steps=1", f"data.latent_cache={cache}"], expect=None)
    assert proc.returncode != 0 and "stores posterior variances" in proc.stderr + proc.stdout


FROZEN_TEXT = ["model.text_encoder.trainable=false"]


@pytest.fixture(scope="module")
def text_cache(cache: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "cache"
    _precompute(out, *FROZEN_TEXT, "precompute.text=true", "precompute.store=mean", "precompute.dtype=fp32")
    return out


@pytest.mark.slow
def test_cached_text_embeddings_give_the_on_the_fly_losses(text_cache: Path, tmp_path: Path) -> None:
    """A frozen text encoder's cached outputs (with the empty prompt's for the dropped captions:
    diffusion.cond_drop_prob=0.5) train to the losses of running the encoder at every step."""
    manifest = json.loads((text_cache / "manifest.json").read_text())
    assert len(manifest["text"]["encoder_sha256"]) == 64 and manifest["text"]["encoder"]["depth"] == 2
    assert (text_cache / "empty_prompt.safetensors").is_file()
    means = tmp_path / "means"
    _precompute(means, "precompute.store=mean", "precompute.dtype=fp32")  # the same latents, no text
    common = [*BASE[1:], *FROZEN_TEXT, "train.max_steps=3", "train.sample_posterior=false",
              "checkpoint.interval_steps=100", "diffusion.cond_drop_prob=0.5"]
    run(tmp_path / "live", [*common, f"data.latent_cache={means}"])
    proc = run(tmp_path / "cached", [*common, f"data.latent_cache={text_cache}"])
    assert "training from the cached text embeddings" in proc.stderr
    live, cached = losses(tmp_path / "live"), losses(tmp_path / "cached")
    assert sorted(live) == sorted(cached) == [1, 2, 3]
    assert all(abs(live[s] - cached[s]) <= 1e-5 * abs(live[s]) for s in live), (live, cached)


@pytest.mark.slow
def test_cached_text_of_another_encoder_is_refused(text_cache: Path, tmp_path: Path) -> None:
    proc = run(tmp_path / "other", [*BASE[1:], *FROZEN_TEXT, "model.text_encoder.depth=1", "train.max_steps=1",
                                    f"data.latent_cache={text_cache}"], expect=None)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "another text encoder" in out and "encoder_sha256: cache" in out


def test_precompute_text_needs_a_frozen_encoder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.precompute", *BASE, f"precompute.out={tmp_path / 'c'}",
                           "precompute.text=true"], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "precompute.text=true caches a frozen text encoder" in proc.stderr
