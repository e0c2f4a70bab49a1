"""``python -m data_pipeline.precompute <trainer.train overrides> precompute.out=<folder or URL>``

Encodes an experiment's training shards with its autoencoder (the one ``trainer.train`` would build:
same config, seed, pretrained files, ``model.init_from``) into a latent cache (``data_pipeline.latents``),
one output shard per input shard with the same keys. Samples are read and decoded by the training
pipeline's own reader and decoder (same crops, same bad-data skips, counted per reason).

Parallel and resumable: shard ``i`` belongs to worker ``i % count``, where the workers are the tasks
of a SLURM array (``SLURM_ARRAY_TASK_ID``), of ``srun``, or the ranks of ``torchrun`` / the DeepSpeed
launcher; no process group is needed. A finished shard (its tar and ``.tar.json`` sidecar) is
skipped on rerun, so a killed job redoes only what is missing; the worker that finds every shard
done writes ``manifest.json``.

A concat-conditioned task (``model.conditioning.concat``, issue 18) gets its concat input cached too,
drawn once per sample from a generator keyed by ``train.seed`` and the sample's shard and key
(``data_pipeline.latents.concat_generator``), so that training needs no first-stage encode.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import fsspec
import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from data_pipeline.batches import digits_dataset
from data_pipeline.concat import ConcatSettings, concat_settings, make_condition
from data_pipeline.config import DataConfig, PrecomputeConfig
from data_pipeline.decode import BadSample, Transform, decode_sample, metadata_of
from data_pipeline.latents import (EMPTY_PROMPT, FORMAT_VERSION, MANIFEST, TEXT_MEMBER, cache_spec, concat_generator,
                                   concat_spec, encode_concat_part, encode_sample_parts, encode_text_part, read_json,
                                   text_spec)
from data_pipeline.shards import ShardTask, read_samples
from data_pipeline.sources import expand_urls, install_s3_defaults
from data_pipeline.stream import buckets_of, member_limits, options_of, spec_from_config
from data_pipeline.writer import ShardWriter
from trainer.cli import hydra_command, run_cli
from trainer.config import TrainConfig  # registers the train_schema of conf/train.yaml
from trainer.interchange import build_networks
from trainer.runtime.device import select_device
from trainer.runtime.distributed import detect_env

log = logging.getLogger("data_pipeline.precompute")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def worker_slot(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(index, count) of this worker: a SLURM array task, else a torchrun / srun rank."""
    if "SLURM_ARRAY_TASK_ID" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"])
    env = detect_env(environ)
    return env.rank, env.world_size


def source_urls(data: DataConfig, rank: int) -> list[str]:
    """The raw shards of ``data`` (the digits demo is built first when needed)."""
    if data.kind == "digits":
        return expand_urls([digits_dataset(data, rank).train_url])
    spec = spec_from_config(data, 1)
    if len(spec.sources) != 1:
        raise ValueError(f"precompute one data source at a time; data.sources has {len(spec.sources)}")
    return list(spec.sources[0].urls)


def _names(urls: list[str]) -> list[str]:
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in urls]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"source shards share file names {dupes[:5]}: one cache folder cannot hold them apart")
    return names


def encode_shard(index: int, url: str, out_url: str, data: DataConfig, pre: PrecomputeConfig,
                 first_stage: torch.nn.Module, device: torch.device, storage_options: dict[str, Any],
                 encode_text: Optional[Callable[[list[str]], torch.Tensor]] = None,
                 concat: Optional[ConcatSettings] = None, concat_seed: int = 0) -> dict[str, Any]:
    """Encode one source shard into ``out_url`` with the decoding of ``data`` and the storage of
    ``pre`` (and, with ``encode_text``, the captions' text-encoder outputs; with ``concat``, each
    sample's concat input as training makes it, drawn from ``concat_generator(concat_seed, ...)``);
    returns its sidecar record."""
    shard = url.rstrip("/").rsplit("/", 1)[-1]
    transform = Transform(crop=data.crop, flip_prob=0.0, max_pixels=data.max_pixels, draft=data.draft)
    buckets = buckets_of(data)
    skipped: Counter = Counter()
    samples: list[tuple[str, dict[str, Any], np.ndarray, dict[str, bytes]]] = []
    for _, item in read_samples([ShardTask(index, url)], storage_options, data.retry, skipped, member_limits(data)):
        rng = np.random.default_rng([data.seed, index, item.index])
        try:
            out = decode_sample(item.parts, image_keys=data.image_keys, caption_key=data.caption_key,
                                image_size=data.image_size, transform=transform, rng=rng, buckets=buckets,
                                max_caption_chars=data.max_caption_chars)
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        try:
            meta = metadata_of(item.parts) or {}
        except BadSample:  # unreadable metadata does not make the image unusable (as in training)
            meta = {}
        meta.update(original_size=list(out.example.original_size), crop_top_left=list(out.example.crop_top_left))
        kept = {"txt": out.caption.encode()}
        label_part = data.label_key if data.label_key and not data.label_key.startswith("json:") else None
        if label_part in item.parts:  # a class label stored as its own member (cls) travels with the latent
            kept[label_part] = item.parts[label_part]
        samples.append((item.key, meta, out.example.image, kept))
    # Encode in batches of one shape (buckets), then write in the shard's order.
    latents: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    concats: dict[int, dict[str, bytes]] = {}
    by_shape: dict[tuple, list[int]] = {}
    for i, (_, _, image, _) in enumerate(samples):
        by_shape.setdefault(image.shape, []).append(i)
    with torch.no_grad():
        for idx in by_shape.values():
            for start in range(0, len(idx), pre.batch_size):
                chunk = idx[start:start + pre.batch_size]
                x = torch.from_numpy(np.stack([samples[i][2] for i in chunk])).permute(0, 3, 1, 2).float()
                x = (x / 127.5 - 1.0).to(device)
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
                with autocast:
                    posterior = first_stage.encode(x)
                mean = posterior.mean.float().cpu()
                logvar = posterior.logvar.float().cpu() if pre.store == "mean_logvar" and not posterior.deterministic \
                    else None
                for j, i in enumerate(chunk):
                    latents[i] = (mean[j], logvar[j] if logvar is not None else None)
                if concat is not None:  # in fp32 as at train time (no autocast): the cache holds what training makes
                    generators = [concat_generator(concat_seed, shard, samples[i][0]) for i in chunk]
                    made = make_condition(first_stage, x.float(), generators, concat,
                                          tuple(mean.shape[-2:])).float().cpu()  # (B, C_concat, h, w)
                    for j, i in enumerate(chunk):
                        concats[i] = encode_concat_part(made[j], pre.dtype)
    texts: list[dict[str, bytes]] = [{} for _ in samples]
    if encode_text is not None:
        with torch.no_grad():
            for start in range(0, len(samples), pre.batch_size):
                captions = [samples[i][3]["txt"].decode() for i in range(start, min(start + pre.batch_size, len(samples)))]
                for j, context in enumerate(encode_text(captions)):
                    texts[start + j] = encode_text_part(context, pre.dtype)
    with ShardWriter(out_url, storage_options) as writer:
        for i, (key, meta, _, parts) in enumerate(samples):
            mean, logvar = latents[i]
            meta["latent_shape"] = list(mean.shape)
            writer.write(key, {**parts, "json": json.dumps(meta, sort_keys=True).encode(),
                               **encode_sample_parts(mean, logvar, dtype=pre.dtype, fmt=pre.format), **texts[i],
                               **concats.get(i, {})})
    return {"source": url, "samples": len(samples), "skipped": dict(sorted(skipped.items()))}


def _write_json(fs, path: str, obj: dict[str, Any]) -> None:
    """Atomic for local folders (temp + rename); a single PUT on object stores."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    tmp = f"{path}.tmp-{os.getpid()}"
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    except NotImplementedError:
        fs.pipe_file(path, data)
        fs.rm_file(tmp)


def run_precompute(cfg: TrainConfig) -> dict[str, Any] | None:
    """This worker's share of the cache; returns the manifest when this worker completed it."""
    pre = cfg.precompute
    if not pre.out:
        raise ValueError("precompute.out is not set: give the cache folder or URL (precompute.out=<...>)")
    install_s3_defaults(cfg.data.s3)  # the first stage's checkpoint and the cache reach the data's store too
    index, count = worker_slot()
    urls = source_urls(cfg.data, detect_env().rank)
    names = _names(urls)
    fs, root = fsspec.core.url_to_fs(pre.out, **options_of(cfg.data, pre.out))
    fs.makedirs(root, exist_ok=True)
    device = select_device(pre.device, "precompute.device", local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    parts = build_networks(cfg.model, cfg.train.seed)
    first_stage = parts.first_stage.to(device).eval()
    spec = cache_spec(first_stage, cfg.model.autoencoder, image_size=cfg.data.image_size, crop=cfg.data.crop,
                      buckets=buckets_of(cfg.data), store=pre.store, dtype=pre.dtype)
    encode_text, text = None, None
    if pre.text:
        if parts.text_encoder is None:
            raise ValueError(f"precompute.text=true caches the text encoder's outputs, but model.conditioning.cross_attn="
                             f"{cfg.model.conditioning.cross_attn!r} builds none; allowed: precompute.text=false")
        if parts.text_encoder_trainable:
            raise ValueError("precompute.text=true caches a frozen text encoder's outputs, but model.text_encoder is "
                             "trained with the UNet (trainable=true); allowed: a frozen encoder (e.g. model=sd_v1, or "
                             "model.text_encoder.trainable=false), or precompute.text=false")
        encoder, tokenizer = parts.text_encoder.to(device).eval(), parts.tokenizer
        text = text_spec(encoder, cfg.model.text_encoder, pre.dtype)

        def encode_text(captions: list[str]) -> torch.Tensor:
            return encoder(tokenizer(captions).to(device)).float().cpu()  # (B, L, D)
    concat = concat_settings(cfg.model.conditioning)  # None without concat conditioning
    concat_entry = None if concat is None else concat_spec(concat, cfg.model.conditioning.concat_channels,
                                                           seed=cfg.train.seed, dtype=pre.dtype)
    mine = [i for i in range(len(urls)) if i % count == index]
    todo = [i for i in mine if read_json(fs, f"{root}/{names[i]}.json") is None or not fs.exists(f"{root}/{names[i]}")]
    log.info("worker %d/%d: %d of its %d shards to encode (of %d) into %s", index, count, len(todo), len(mine),
             len(urls), pre.out)
    t0, done_samples = time.time(), 0
    for n, i in enumerate(todo):
        for stale in fs.glob(f"{root}/{names[i]}.tmp-*"):  # a killed run's partial output
            fs.rm_file(stale)
        record = encode_shard(i, urls[i], f"{pre.out.rstrip('/')}/{names[i]}", cfg.data, pre, first_stage, device,
                              options_of(cfg.data, urls[i]), encode_text, concat, cfg.train.seed)
        _write_json(fs, f"{root}/{names[i]}.json", record)  # the shard counts as done from here
        done_samples += record["samples"]
        if index == 0:  # progress: a live line on a terminal, a log line per shard otherwise
            rate = done_samples / max(time.time() - t0, 1e-9)
            eta = (time.time() - t0) / (n + 1) * (len(todo) - n - 1)
            line = f"{n + 1}/{len(todo)} shards, {done_samples} samples, {rate:.1f} samples/s, ETA {eta:.0f}s"
            if sys.stderr.isatty():
                print(f"\r[precompute] {line}", end="" if n + 1 < len(todo) else "\n", file=sys.stderr, flush=True)
            else:
                log.info("%s", line)
    records = [read_json(fs, f"{root}/{name}.json") for name in names]
    if any(r is None for r in records):
        log.info("worker %d/%d done; %d shards are still being encoded by other workers", index, count,
                 sum(r is None for r in records))
        return None
    if not sum(r["samples"] for r in records):
        raise ValueError(f"no usable sample in the {len(urls)} source shards (e.g. {urls[0]}); see the log above")
    skipped: Counter = Counter()
    for r in records:
        skipped.update(r["skipped"])
    if encode_text is not None:  # the empty prompt's, once: what condition dropout feeds the UNet
        with torch.no_grad():
            fs.pipe_file(f"{root}/{EMPTY_PROMPT}", encode_text_part(encode_text([""])[0], pre.dtype)[TEXT_MEMBER])
    manifest = {"format_version": FORMAT_VERSION, "spec": spec.as_dict(), "shards": names, "text": text,
                "concat": concat_entry,
                "sources": [{"url": r["source"], "samples": r["samples"]} for r in records],
                "samples": sum(r["samples"] for r in records), "skipped": dict(sorted(skipped.items())),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "software": f"ldm-platform {version('ldm-platform')}"}
    _write_json(fs, f"{root}/{MANIFEST}", manifest)
    log.info("cache complete: %d samples in %d shards at %s (skipped: %s)", manifest["samples"], len(names),
             pre.out, manifest["skipped"])
    return manifest


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(dict_cfg: DictConfig) -> None:
    run_cli(run_precompute, dict_cfg)


if __name__ == "__main__":
    hydra_command(main)
