"""The latent cache: autoencoder posteriors of a shard set, stored as webdataset shards with a manifest.

Layout of a cache at ``<out>`` (any fsspec URL):

- ``<name>.tar`` per source shard ``<name>.tar`` (same keys): ``{key}.latent.safetensors`` (tensors
  ``mean`` and, unless only means are kept, ``logvar``; fp16 or fp32) or ``{key}.mean.npy`` /
  ``{key}.logvar.npy`` (``np.load(allow_pickle=False)``), ``{key}.txt`` the caption and ``{key}.json``
  the source metadata plus ``original_size``, ``crop_top_left`` and ``latent_shape``;
- ``<name>.tar.json`` beside each finished shard: its sample count and skips by reason (written after
  the tar, so a shard without it is redone);
- ``manifest.json``: what the cache was made from and with (autoencoder checksum and config, scale
  and shift, resolution, crop policy, source shard list with counts, skips, time, version);
- with ``precompute.text=true``, a frozen text encoder's per-token outputs too: ``{key}.text.safetensors``
  (tensor ``context``, (L, D)) per sample, ``empty_prompt.safetensors`` once (the empty prompt's, for
  condition dropout) and the manifest's ``text`` entry (the encoder's checksum and config, dtype);
- for a concat-conditioned task (``model.conditioning.concat``, issue 18), the concat input exactly as
  training makes it: ``{key}.concat.safetensors`` (tensor ``concat``, (C_concat, h, w) at the latent
  size: the degraded image for ``lowres``, the masked image's latent (the first stage's mode, scaled)
  and the mask for ``masked_image``) and the manifest's ``concat`` entry (the settings it was made
  with, its channels and dtype, and how each sample's draw was keyed). The draw is made once per
  sample, from a generator keyed by the seed and the sample's shard and key (``concat_generator``):
  a cache is reproducible, but every visit of a sample sees the same degradation / mask, where
  training from images draws a new one per visit (the cached latent itself keeps its posterior and is
  sampled at each step).

Training from a cache compares the manifest with its own config (``check_manifest``) and refuses a
mismatch, naming the fields, unless ``data.latent_cache_check=false``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import fsspec
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from data_pipeline.decode import BadSample

MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
TEXT_MEMBER = "text.safetensors"
CONCAT_MEMBER = "concat.safetensors"
FORMAT_VERSION = 1
STORES = ("mean_logvar", "mean")
DTYPES = ("fp16", "fp32")
FORMATS = ("safetensors", "npy")


def module_checksum(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """What makes two caches interchangeable; the manifest stores it and training compares it."""

    autoencoder_sha256: str
    autoencoder: dict[str, Any]
    scale_factor: float
    shift_factor: float
    image_size: int
    crop: str
    buckets: list
    store: str
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cache_spec(first_stage: torch.nn.Module, autoencoder: Any, *, image_size: int, crop: str,
               buckets: Sequence[Sequence[int]], store: str, dtype: str) -> CacheSpec:
    """The spec of a cache of ``first_stage`` (built from the config dataclass ``autoencoder``) at
    ``image_size`` with this crop policy and these aspect buckets: what a precompute writes into the
    manifest and what training from the cache expects. The checkpoint path is not part of it (the
    weights' checksum is)."""
    return CacheSpec(autoencoder_sha256=module_checksum(first_stage),
                     autoencoder={k: v for k, v in asdict(autoencoder).items() if k != "checkpoint_path"},
                     scale_factor=autoencoder.scale_factor, shift_factor=autoencoder.shift_factor,
                     image_size=image_size, crop=crop, buckets=[list(b) for b in buckets], store=store, dtype=dtype)


def check_manifest(manifest: dict[str, Any], expected: CacheSpec, where: str) -> None:
    """Refuse a cache made otherwise than this job would make it, naming each differing field."""
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: cache format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
    theirs = manifest.get("spec", {})
    diffs = [f"{k}: cache {theirs.get(k)!r}, this job {v!r}" for k, v in expected.as_dict().items()
             if k not in ("store", "dtype") and theirs.get(k) != v]
    if diffs:
        raise ValueError(f"{where} was made with other settings than this job's:\n  " + "\n  ".join(diffs)
                         + "\nre-run the precompute for this config, or set data.latent_cache_check=false to use it anyway")


def encode_sample_parts(mean: torch.Tensor, logvar: Optional[torch.Tensor], *, dtype: str, fmt: str) -> dict[str, bytes]:
    """Tar members (extension -> bytes) holding one sample's posterior."""
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    tensors = {"mean": mean.to(torch_dtype).contiguous()}
    if logvar is not None:
        tensors["logvar"] = logvar.to(torch_dtype).contiguous()
    if fmt == "safetensors":
        return {"latent.safetensors": save_safetensors(tensors)}
    out = {}
    for name, t in tensors.items():
        buf = io.BytesIO()
        np.save(buf, t.numpy(), allow_pickle=False)
        out[f"{name}.npy"] = buf.getvalue()
    return out


def decode_sample_parts(parts: dict[str, bytes]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mean, logvar or None) as float32 from a cached sample's members; ``BadSample`` if damaged."""
    if "latent.safetensors" not in parts and "mean.npy" not in parts:
        raise BadSample("missing_latent", f"parts {sorted(parts)}")
    try:
        if "latent.safetensors" in parts:
            tensors = load_safetensors(parts["latent.safetensors"])
        else:
            tensors = {name: torch.from_numpy(np.load(io.BytesIO(parts[f"{name}.npy"]), allow_pickle=False))
                       for name in ("mean", "logvar") if f"{name}.npy" in parts}
    except Exception as e:  # noqa: BLE001 - a damaged member raises several types
        raise BadSample("undecodable_latent", f"{type(e).__name__}: {e}") from None
    if "mean" not in tensors:
        raise BadSample("missing_latent", "no mean tensor")
    logvar = tensors.get("logvar")
    return tensors["mean"].float(), (logvar.float() if logvar is not None else None)


def text_spec(encoder: torch.nn.Module, text_encoder: Any, dtype: str) -> dict[str, Any]:
    """The manifest's ``text`` entry for a cache of ``encoder``'s outputs (config dataclass
    ``text_encoder``; local file paths are not part of it, the weights' checksum is)."""
    config = {k: v for k, v in asdict(text_encoder).items() if k not in ("checkpoint_path", "vocab_file")}
    return {"encoder_sha256": module_checksum(encoder), "encoder": config, "dtype": dtype}


def check_text_manifest(manifest: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Refuse cached text embeddings made with another text encoder than this job's, naming it."""
    theirs = manifest.get("text") or {}
    diffs = [f"{k}: cache {theirs.get(k)!r}, this job {v!r}" for k, v in expected.items()
             if k != "dtype" and theirs.get(k) != v]
    if diffs:
        raise ValueError(f"{where}: its text embeddings were made with another text encoder than this job's "
                         f"model.text_encoder (kind={expected['encoder'].get('kind')!r}):\n  " + "\n  ".join(diffs)
                         + "\nre-run the precompute with precompute.text=true for this model, or precompute "
                           "without it (the encoder then runs at every step)")


def encode_text_part(context: torch.Tensor, dtype: str) -> dict[str, bytes]:
    """The tar member holding one sample's text-encoder output (L, D)."""
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    return {TEXT_MEMBER: save_safetensors({"context": context.to(torch_dtype).contiguous()})}


def decode_text_part(parts: dict[str, bytes]) -> Optional[torch.Tensor]:
    """A cached sample's text-encoder output as float32 (L, D), None when the cache holds none."""
    if TEXT_MEMBER not in parts:
        return None
    try:
        return load_safetensors(parts[TEXT_MEMBER])["context"].float()
    except Exception as e:  # noqa: BLE001 - a damaged member raises several types
        raise BadSample("undecodable_text", f"{type(e).__name__}: {e}") from None


# The ConcatSettings fields each concat kind is made from.
CONCAT_KEYS = {"lowres": ("kind", "sr_factor", "degradation"),
               "masked_image": ("kind", "mask", "mask_min_coverage", "mask_max_coverage")}


def concat_generator(seed: int, shard: str, key: str) -> torch.Generator:
    """The generator of one cached sample's concat draw: keyed by ``seed`` and the sample's identity
    (source shard name and key, unique within a cache), so any worker split gives the same draws."""
    digest = hashlib.sha256(f"{seed}/{shard}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def concat_spec(settings: Any, channels: int, *, seed: int, dtype: str) -> dict[str, Any]:
    """The manifest's ``concat`` entry: the ``model.conditioning`` settings (a ``ConcatSettings``) the
    cached concat inputs were made with - those of its kind only (a lowres cache does not depend on
    the mask settings) - their channels, dtype, and how the draws were keyed."""
    used = CONCAT_KEYS[settings.kind]
    return {**{k: v for k, v in asdict(settings).items() if k in used}, "channels": channels, "seed": seed,
            "dtype": dtype, "draw": "once per sample: sha256(seed/shard/key)"}


# Settings that only tell how a cache was made, not what it holds for training: a difference is allowed.
_CONCAT_INFO = ("seed", "dtype", "draw")


def check_concat_manifest(manifest: dict[str, Any], expected: Optional[dict[str, Any]], where: str, *,
                          strict: bool = True) -> None:
    """Refuse cached concat inputs made for another task than this job's (``expected``: its
    ``concat_spec``, None for a job without concat conditioning), naming each differing key with
    both values. A concat job needs them (no images to make them from), so their absence and a
    different kind or channel count are refused even with ``strict=False``
    (``data.latent_cache_check=false``); so is a concat cache under a job without concat, when strict."""
    theirs = manifest.get("concat")
    if expected is None:
        if theirs and strict:
            kind = theirs.get("kind")
            raise ValueError(f"{where} holds concat inputs (model.conditioning.concat={kind!r}), but this job has "
                             f"model.conditioning.concat='none': it was made for another task; train with "
                             f"model.conditioning.concat={kind!r} and its settings, or precompute a cache without "
                             f"concat")
        return
    if not theirs:
        raise ValueError(f"{where} holds no concat inputs, but model.conditioning.concat={expected['kind']!r} needs "
                         f"them (a latent cache holds no images to make them from): re-run the precompute with this "
                         f"job's model.conditioning settings")
    always = ("kind", "channels")
    diffs = [f"model.conditioning.{'concat' if k == 'kind' else k}: cache {theirs.get(k)!r}, this job {v!r}"
             for k, v in expected.items() if k not in _CONCAT_INFO and theirs.get(k) != v and (strict or k in always)]
    if diffs:
        raise ValueError(f"{where}: its concat inputs were made for another task than this job's:\n  "
                         + "\n  ".join(diffs) + "\nre-run the precompute with this job's model.conditioning settings")


def encode_concat_part(concat: torch.Tensor, dtype: str) -> dict[str, bytes]:
    """The tar member holding one sample's concat input (C_concat, h, w)."""
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    return {CONCAT_MEMBER: save_safetensors({"concat": concat.to(torch_dtype).contiguous()})}


def decode_concat_part(parts: dict[str, bytes]) -> Optional[torch.Tensor]:
    """A cached sample's concat input as float32 (C_concat, h, w), None when the cache holds none."""
    if CONCAT_MEMBER not in parts:
        return None
    try:
        return load_safetensors(parts[CONCAT_MEMBER])["concat"].float()
    except Exception as e:  # noqa: BLE001 - a damaged member raises several types
        raise BadSample("undecodable_concat", f"{type(e).__name__}: {e}") from None


def read_empty_prompt(cache: str, storage_options: dict[str, Any]) -> torch.Tensor:
    """The empty prompt's cached text-encoder output (L, D), float32."""
    fs, root = fsspec.core.url_to_fs(cache, **storage_options)
    return load_safetensors(fs.cat_file(f"{root.rstrip('/')}/{EMPTY_PROMPT}"))["context"].float()


def cache_shard_urls(cache: str, storage_options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(manifest, shard URLs) of a complete cache; a missing manifest is a clear error."""
    fs, root = fsspec.core.url_to_fs(cache, **storage_options)
    manifest = read_json(fs, f"{root.rstrip('/')}/{MANIFEST}")
    if manifest is None:
        raise FileNotFoundError(f"data.latent_cache={cache!r} has no {MANIFEST}: the precompute did not finish "
                                f"(rerun `python -m data_pipeline.precompute ... precompute.out={cache}`)")
    return manifest, [f"{cache.rstrip('/')}/{name}" for name in manifest["shards"]]


def read_json(fs, path: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads(fs.cat_file(path).decode())
    except FileNotFoundError:
        return None
