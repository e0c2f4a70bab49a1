"""Super-resolution and inpainting metrics as pure functions on tensors (issue 18, item 4).

Images are float (B, 3, H, W) in [-1, 1] (the models' range); masks (B, 1, H, W) in {0, 1} with 1 where
the image was filled. Feature extraction (FID's features) is the caller's: FID here takes the (N, D)
features of ``eval.features`` and goes through ``eval.metrics``.

* Super-resolution (Rombach et al. 2022, Sec. 4.4, Tab. 5): PSNR and SSIM of the model's output against
  the held-out high-resolution image, with the bicubic upsampling of the same low-resolution input as a
  baseline row, and FID of outputs and of the baseline against the high-resolution images.
* Inpainting (Sec. 4.5, Tab. 7): FID of completions against the originals, and LPIPS on the masked
  region: the completion is composited into the original (kept pixels from the original, as an inpainting
  pipeline returns it) so that only the filled region differs, then LPIPS compares it with the original.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, Callable, Optional

import numpy as np
import torch

from data_pipeline.masks import masked_images
from data_pipeline.shards import ShardTask, read_samples
from data_pipeline.sources import RetryPolicy, expand_urls, storage_options_for
from eval.image_metrics import psnr, ssim
from eval.metrics import Features, feature_stats, frechet_distance
from eval.protocol import EvalFailed, GatherFn, batch_plan
from eval.reference import SHARD_IMAGE_KEYS, square_rgb

log = logging.getLogger(__name__)

SIGNED_RANGE = 2.0  # data_range of images in [-1, 1]


def _check_images(reference: torch.Tensor, output: torch.Tensor, what: str) -> None:
    if reference.shape != output.shape or reference.ndim != 4 or not reference.is_floating_point():
        raise ValueError(f"{what}: reference {tuple(reference.shape)} {reference.dtype} and output "
                         f"{tuple(output.shape)} {output.dtype}; expected float (B, C, H, W) of one shape in [-1, 1]")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (the feature extractors' input), -1 -> 0 and 1 -> 255."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def superres_scores(high: torch.Tensor, output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of ``output`` against ``high``: {"psnr": (B,), "ssim": (B,)} float64.
    Computed on the uint8-quantised images, as images are saved and as the paper's numbers are."""
    _check_images(high, output, "superres_scores")
    high_u8, output_u8 = to_uint8(high), to_uint8(output)
    return {"psnr": psnr(high_u8, output_u8), "ssim": ssim(high_u8, output_u8)}


def fid_of(reference_features: Features, output_features: Features) -> float:
    """FID between two (N, D) feature sets (N >= 2 each)."""
    return frechet_distance(feature_stats(reference_features), feature_stats(output_features))


def superres_table(high: torch.Tensor, output: torch.Tensor, baseline: torch.Tensor, *,
                   features: Optional[dict[str, Features]] = None) -> dict[str, dict[str, Any]]:
    """Rows "model" and "bicubic": mean PSNR, mean SSIM and (with ``features`` holding "high", "model" and
    "bicubic" (N, D) features) FID against the high-resolution images; ``num_images`` in each row."""
    rows: dict[str, dict[str, Any]] = {}
    for name, images in (("model", output), ("bicubic", baseline)):
        scores = superres_scores(high, images)
        fid = None if features is None else fid_of(features["high"], features[name])
        rows[name] = {"psnr": float(scores["psnr"].mean()), "ssim": float(scores["ssim"].mean()), "fid": fid,
                      "num_images": int(high.shape[0])}
    return rows


def composite(original: torch.Tensor, completion: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The completion inside the mask, the original outside it: (B, C, H, W)."""
    _check_images(original, completion, "composite")
    if masks.shape != (original.shape[0], 1, *original.shape[-2:]):
        raise ValueError(f"composite: masks of shape {tuple(masks.shape)}; expected (B, 1, H, W) = "
                         f"{(original.shape[0], 1, *original.shape[-2:])}")
    masks = masks.to(original.dtype)
    return completion * masks + original * (1.0 - masks)


def masked_lpips(lpips: torch.nn.Module, original: torch.Tensor, completion: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
    """LPIPS of the composited completion against the original, per image: (B,) float64. Pixels outside
    the mask are the original's, so the distance comes from the filled region only."""
    filled = composite(original, completion, masks)
    device = next(lpips.parameters()).device
    with torch.no_grad():
        distance = lpips(original.float().to(device), filled.float().to(device))  # (B, 1, 1, 1)
    return distance.flatten().to("cpu", torch.float64)


def masked_psnr(original: torch.Tensor, completion: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) over the masked pixels only, per image: (B,) float64 (images with an empty mask: nan)."""
    _check_images(original, completion, "masked_psnr")
    masks = masks.to(torch.float64)
    diff = ((original.to(torch.float64) - completion.to(torch.float64)) ** 2 * masks).sum(dim=(1, 2, 3))
    count = masks.sum(dim=(1, 2, 3)) * original.shape[1]
    mse = diff / count
    return 10.0 * torch.log10(SIGNED_RANGE**2 / mse)


# ----------------------------------------------------------------------------- the held-out protocol


def held_out_images(url: str, *, resolution: int, limit: int, label_field: Optional[str] = "digit",
                    storage_options: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """The first ``limit`` images of the shards at ``url`` (a brace pattern) as float (N, 3, R, R) in
    [-1, 1], in shard order, and their ``label_field`` from each sample's json (None without one)."""
    urls = expand_urls(url)
    tasks = [ShardTask(i, u) for i, u in enumerate(urls)]
    options = storage_options_for(urls[0], None, storage_options)
    images, labels, skipped = [], [], Counter()
    for _, sample in read_samples(tasks, options, RetryPolicy(), skipped):
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample.parts), None)
        if key is None:
            continue
        images.append(square_rgb(sample.parts[key], resolution))
        if label_field is not None:
            labels.append(int(json.loads(sample.parts["json"])[label_field]))
        if len(images) == limit:
            break
    if len(images) < 2:
        raise ValueError(f"{url!r} holds {len(images)} readable images; the restoration protocol needs >= 2")
    chw = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, R, R)
    return chw, (np.asarray(labels) if label_field is not None else None)


def held_out_captions(url: str, count: int, storage_options: Optional[dict[str, Any]] = None) -> list[str]:
    """The captions (``txt`` parts) of the first ``count`` samples of the shards at ``url``, in the order
    of ``held_out_images``."""
    urls = expand_urls(url)
    tasks = [ShardTask(i, u) for i, u in enumerate(urls)]
    captions: list[str] = []
    for _, sample in read_samples(tasks, storage_options_for(urls[0], None, storage_options), RetryPolicy(), Counter()):
        if any(k in sample.parts for k in SHARD_IMAGE_KEYS):
            captions.append(sample.parts["txt"].decode("utf-8").strip() if "txt" in sample.parts else "")
        if len(captions) == count:
            break
    if len(captions) != count or not all(captions):
        raise ValueError(f"{url!r}: {sum(map(bool, captions))} captions (txt parts) for {count} held-out images; a "
                         f"text-conditioned restoration model is evaluated with each image's caption")
    return captions


RestoreFn = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


def restore_all(restore: RestoreFn, images: torch.Tensor, drawn: torch.Tensor, *, batch_size: int, seed: int,
                rank: int = 0, world_size: int = 1, gather: GatherFn = lambda x: [x]) -> torch.Tensor:
    """Every image restored, (N, 3, H, W) float on CPU in [-1, 1], on every rank. As the text protocol
    shares its samples (``eval.protocol.batch_plan``), global batch ``j`` of ``batch_size`` images (seeds
    ``seed + i``) is restored by rank ``j % world_size`` and the shares are gathered, so the outputs are
    one rank's whatever the world size; a failure on any rank raises ``EvalFailed`` on every rank."""
    share: dict[str, Any] = {"batches": [], "error": None}
    try:
        for start, end in batch_plan(len(images), batch_size, rank, world_size):
            out = restore(images[start:end], drawn[start:end], list(range(seed + start, seed + end)))
            share["batches"].append((start, out.float().cpu()))
    except Exception as e:  # noqa: BLE001 - reported on every rank below, never a hang in the gather
        log.exception("restoration failed on rank %d", rank)
        share = {"batches": [], "error": f"rank {rank}: {type(e).__name__}: {e}"}
    shares = gather(share)
    errors = [s["error"] for s in shares if s["error"]]
    if errors:
        raise EvalFailed("; ".join(errors))
    batches = sorted((b for s in shares for b in s["batches"]), key=lambda b: b[0])
    return torch.cat([out for _, out in batches]).clamp(-1, 1)


def restoration_protocol(kind: str, restore: RestoreFn, images: torch.Tensor, drawn: torch.Tensor, *,
                         labels: Optional[np.ndarray] = None, classifier: Any = None, extractor: Any = None,
                         lpips: Optional[torch.nn.Module] = None, baseline: Optional[torch.Tensor] = None,
                         batch_size: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1,
                         gather: GatherFn = lambda x: [x]) -> dict[str, Any]:
    """Restore every held-out image (this rank its share, ``restore_all``) and score it (on every rank:
    the gathered outputs are the same everywhere).

    ``restore(images, drawn, seeds)`` returns the outputs (B, 3, H, W) in [-1, 1] for a batch: ``drawn``
    is the low-resolution image (``lowres``) or the mask (``masked_image``). Super-resolution gives the
    model and ``baseline`` (bicubic) rows of ``superres_table``; inpainting the mean masked-region LPIPS
    (with ``lpips``), masked PSNR and, with ``classifier`` and ``labels``, the fraction of completions
    recognised as the original's label. FID (with ``extractor``) is against the held-out images.
    """
    outputs = restore_all(restore, images, drawn, batch_size=batch_size, seed=seed, rank=rank,
                          world_size=world_size, gather=gather)
    features = None
    if extractor is not None:
        features = {"high": extractor(to_uint8(images)), "model": extractor(to_uint8(outputs))}
    record: dict[str, Any] = {"kind": kind, "num_images": int(len(images))}
    if kind == "lowres":
        if baseline is None:
            raise ValueError("the super-resolution protocol needs the bicubic baseline images")
        if features is not None:
            features["bicubic"] = extractor(to_uint8(baseline))
        record["rows"] = superres_table(images, outputs, baseline, features=features)
        record["psnr_gain_db"] = record["rows"]["model"]["psnr"] - record["rows"]["bicubic"]["psnr"]
    else:
        filled = composite(images, outputs, drawn)
        record["masked_psnr"] = float(masked_psnr(images, outputs, drawn).mean())
        record["lpips_masked"] = None if lpips is None else float(masked_lpips(lpips, images, outputs, drawn).mean())
        record["fid"] = None if features is None else fid_of(features["high"], extractor(to_uint8(filled)))
        if classifier is not None and labels is not None:
            predicted = classifier.predict(to_uint8(filled).permute(0, 2, 3, 1).numpy())
            record["digit_accuracy"] = float((np.asarray(predicted) == np.asarray(labels)).mean())
            corrupted = classifier.predict(to_uint8(masked_images(images, drawn)).permute(0, 2, 3, 1).numpy())
            record["digit_accuracy_masked_input"] = float((np.asarray(corrupted) == np.asarray(labels)).mean())
    record["outputs"] = outputs
    return record
