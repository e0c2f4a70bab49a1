"""The evaluation protocol: prompts -> samples on every rank -> features and scores -> metrics.

The three steps are separate (STYLE 4): ``generate_and_score`` draws this rank's share of the
samples and turns each batch into features / CLIP scores / digit predictions at once (images are
never gathered, only what is computed from them and the few shown in the grid), ``gather`` (given by
the caller: ``trainer.runtime.distributed.all_gather_object`` or the identity) brings the shares to every
rank, and ``compute_metrics`` is a pure function of the gathered arrays.

Rank invariance: sample ``i`` uses prompt ``i`` and seed ``seed + i``; the protocol is cut into
global batches of ``batch_size`` and batch ``j`` is drawn by rank ``j % world_size``. A batch holds
the same samples whatever the number of ranks, so the images, the features and the metrics are
identical on 1, 2 or N ranks (bitwise on one kind of device).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import fsspec
import numpy as np
import torch

from data_pipeline.demo_digits import DIGIT_NAMES, PALETTE, DigitClassifier, caption_for
from eval.clip_score import ClipScorer
from eval.config import EvalConfig
from eval.features import build_feature_extractor
from eval.metrics import feature_stats, frechet_distance
from eval.metrics import kid as kid_fn
from eval.reference import reference_stats
from trainer.images import put_bytes, to_uint8
from trainer.sampling.pipeline import text_to_image

log = logging.getLogger(__name__)

# (prompts, seeds, guidance_scale) -> uint8 images (B, 3, H, W)
GenerateFn = Callable[[list[str], list[int], float], torch.Tensor]
GatherFn = Callable[[Any], list]


class EvalFailed(RuntimeError):
    """Some rank failed while sampling or scoring; every rank raises it together (no rank is left
    waiting in a collective)."""


# ----------------------------------------------------------------------------- prompts


def read_captions(path: str, *, num_samples: int, seed: int) -> list[str]:
    """``num_samples`` captions from a COCO captions JSON or a text file, chosen with ``seed``.

    COCO (``captions_val2014.json`` / ``captions_val2017.json``): one caption per image, chosen
    uniformly for each image (images in ``image_id`` order), then ``num_samples`` distinct images
    (FID-30k on COCO-2014 val draws 30,000 of its 40,504 images). A text file: one caption per line,
    ``num_samples`` distinct lines. The same file and seed give the same list on every machine.
    """

    with fsspec.open(path, "rb") as f:
        raw = f.read()
    rng = np.random.default_rng(seed)
    if path.endswith(".json"):
        try:
            data = json.loads(raw)
            annotations = data["annotations"]
            by_image: dict[int, list[str]] = {}
            for a in annotations:
                by_image.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"eval.captions_file={path!r} is not a COCO captions JSON "
                             f"(annotations[].image_id / caption): {e}") from None
        pool = [caps[int(rng.integers(len(caps)))] for _, caps in sorted(by_image.items())]
        what = "images with captions"
    else:
        pool = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
        what = "non-empty lines"
    if num_samples > len(pool):
        raise ValueError(f"eval.num_samples={num_samples} but eval.captions_file={path!r} has only {len(pool)} "
                         f"{what}; allowed: eval.num_samples <= {len(pool)}")
    if not pool:
        raise ValueError(f"eval.captions_file={path!r} holds no caption")
    chosen = rng.choice(len(pool), size=num_samples, replace=False)
    return [pool[int(i)] for i in chosen]


def digit_prompts(samples_per_prompt: int) -> tuple[list[str], list[int]]:
    """The demo's prompts: each digit ``samples_per_prompt`` times, in the palette's colours."""

    colors = list(PALETTE)
    prompts, labels = [], []
    for d in range(len(DIGIT_NAMES)):
        for k in range(samples_per_prompt):
            prompts.append(caption_for(d, colors[(d + k) % len(colors)]))
            labels.append(d)
    return prompts, labels


def protocol_prompts(cfg: EvalConfig, example_captions: Callable[[int], list[str]] | None = None
                     ) -> tuple[list[str], Optional[list[int]]]:
    """The prompts of the protocol (and the digit labels for kind=digits)."""
    if cfg.kind == "digits":
        return digit_prompts(cfg.samples_per_prompt)
    if cfg.kind == "text2img":
        if cfg.captions_file:
            return read_captions(cfg.captions_file, num_samples=cfg.num_samples, seed=cfg.caption_seed), None
        return [cfg.prompts[i % len(cfg.prompts)] for i in range(cfg.num_samples)], None
    base = list(cfg.prompts) or (example_captions(8) if example_captions else [])
    if not base:
        raise ValueError("eval.kind='none' with no eval.prompts and no captions from the data to show")
    return [p for p in base for _ in range(cfg.samples_per_prompt)], None


def protocol_conditions(cfg: EvalConfig, cross_attn: str, num_classes: int = 0,
                        example_captions: Callable[[int], list[str]] | None = None) -> tuple[list[Any], Optional[list[int]]]:
    """What each sample of the protocol is conditioned on, and its digit labels (for scoring).

    Text: ``protocol_prompts``. Class: class-balanced - every class equally often, in class order
    (kind=digits and none: ``samples_per_prompt`` per class; text2img: ``num_samples``, a multiple of
    the class count); the labels are the classes. Unconditional: None per sample (as many samples as
    the text protocol of the same kind), no labels.
    """
    if cross_attn == "text":
        return protocol_prompts(cfg, example_captions)
    if cfg.kind == "text2img":
        num = cfg.num_samples
    else:
        num = cfg.samples_per_prompt * (num_classes if cross_attn == "class" else len(DIGIT_NAMES))
    if cross_attn == "none":
        return [None] * num, None
    if num % num_classes:
        raise ValueError(f"eval.num_samples={num} is not a multiple of model.conditioning.num_classes="
                         f"{num_classes}: class-balanced sampling draws every class equally often")
    per_class = num // num_classes
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    return labels, labels


# ----------------------------------------------------------------------------- scorers


@dataclass
class Scorers:
    """What turns a batch of uint8 samples into numbers; ``None`` members are skipped."""

    extractor: Any = None  # uint8 (B, 3, H, W) -> float64 (B, D)  (eval.features)
    clip: Any = None  # eval.clip_score.ClipScorer
    classifier: Any = None  # data_pipeline.demo_digits.DigitClassifier

    def describe(self) -> dict[str, Any]:
        return {"features": self.extractor.describe() if self.extractor is not None else None,
                "clip": self.clip.describe() if self.clip is not None else None}


def build_scorers(cfg: EvalConfig, *, digit_classifier_path: Optional[str], device: torch.device | str) -> Scorers:
    """The extractor, CLIP model and digit classifier the protocol needs (weights from local paths;
    a missing file fails here, naming it, before any sample is drawn)."""
    if cfg.kind == "none":
        return Scorers()
    if cfg.feature_kind == "digits" and not digit_classifier_path:
        raise ValueError("eval.features='digits' needs the digits dataset's classifier (data.kind='digits')")
    extractor = build_feature_extractor(cfg.feature_kind, inception_weights=cfg.inception_weights,
                                        digit_classifier=digit_classifier_path, resize=cfg.resize, device=device)
    clip = None
    if cfg.clip_weights:
        clip = ClipScorer(cfg.clip_model, cfg.clip_weights, device=device)
    classifier = None
    if cfg.kind == "digits":
        classifier = DigitClassifier.load(digit_classifier_path)
    return Scorers(extractor=extractor, clip=clip, classifier=classifier)


def load_reference(cfg: EvalConfig, extractor, *, resolution: int, default: Optional[str] = None,
                   storage_options: Optional[dict] = None):
    """Reference statistics for FID (computed once per source/extractor/resolution, then cached)."""

    source = cfg.reference or default
    if extractor is None or not source:
        return None, None
    return reference_stats(source, extractor, resolution=resolution, cache_dir=cfg.reference_cache,
                           batch_size=cfg.batch_size, storage_options=storage_options)


# ----------------------------------------------------------------------------- sampling


def sampler_fn(unet, encode: Callable[[list[Any]], Optional[torch.Tensor]], first_stage, schedule, *,
               latent_shape: tuple[int, int, int], sampler: str, num_steps: int,
               device: torch.device | str, negative: Any = "") -> GenerateFn:
    """``(conditions, seeds, guidance) -> uint8 (B, 3, H, W)`` around ``text_to_image`` (one batch per
    call); ``negative`` is the unconditional branch's condition ("" or the null class)."""

    def generate(prompts: list[Any], seeds: list[int], guidance_scale: float) -> torch.Tensor:
        images = text_to_image(unet, encode, first_stage, prompts, seeds, schedule=schedule,
                               latent_shape=latent_shape, sampler=sampler, num_steps=num_steps,
                               guidance_scale=guidance_scale, negative_prompt=negative, batch_size=len(prompts),
                               device=device)
        return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)

    return generate


def batch_plan(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """This rank's global batches ``[start, end)``: batch ``j`` goes to rank ``j % world_size``."""
    starts = range(0, num_samples, batch_size)
    return [(s, min(s + batch_size, num_samples)) for j, s in enumerate(starts) if j % world_size == rank]


def generate_and_score(generate: GenerateFn, prompts: Sequence[str], *, guidance_scale: float, seed: int,
                       batch_size: int, scorers: Scorers, num_grid: int, rank: int, world_size: int,
                       gather: GatherFn) -> dict[str, Any]:
    """Draw and score this rank's batches, gather every rank's share; returns, on every rank,
    arrays in protocol order: ``features`` (N, D), ``clip`` (N,), ``digits`` (N,), ``grid`` uint8
    images of the first ``num_grid`` samples, and ``seconds`` (the slowest rank's)."""
    share: dict[str, Any] = {"batches": [], "error": None}
    t0 = time.perf_counter()
    try:
        for start, end in batch_plan(len(prompts), batch_size, rank, world_size):
            batch_prompts = list(prompts[start:end])
            images = generate(batch_prompts, [seed + i for i in range(start, end)], guidance_scale)
            out: dict[str, Any] = {"start": start}
            if scorers.extractor is not None:
                out["features"] = np.asarray(scorers.extractor(images), dtype=np.float64)
            if scorers.clip is not None:
                out["clip"] = scorers.clip.score(images, batch_prompts).double().cpu().numpy()
            if scorers.classifier is not None:
                out["digits"] = scorers.classifier.predict(images.permute(0, 2, 3, 1).numpy())
            if start < num_grid:
                out["grid"] = images[:num_grid - start].numpy()
            share["batches"].append(out)
    except Exception as e:  # noqa: BLE001 - reported on every rank below, never a hang in the gather
        log.exception("evaluation failed on rank %d", rank)
        share = {"batches": [], "error": f"rank {rank}: {type(e).__name__}: {e}"}
    share["seconds"] = time.perf_counter() - t0
    shares = gather(share)
    errors = [s["error"] for s in shares if s["error"]]
    if errors:
        raise EvalFailed("; ".join(errors))
    batches = sorted((b for s in shares for b in s["batches"]), key=lambda b: b["start"])
    result: dict[str, Any] = {"seconds": max(s["seconds"] for s in shares), "num_samples": len(prompts)}
    for key in ("features", "clip", "digits", "grid"):
        parts = [b[key] for b in batches if key in b]
        if parts:
            result[key] = np.concatenate(parts)
    return result


# ----------------------------------------------------------------------------- metrics


def compute_metrics(outputs: dict[str, Any], *, reference_stats=None, reference_features=None,
                    labels: Optional[Sequence[int]] = None, kid: bool = False, kid_subset_size: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """Pure: the gathered arrays of one guidance scale -> FID against ``reference_stats`` (a
    ``FeatureStats``), KID against ``reference_features`` (KID needs features, not statistics),
    the mean CLIP score, the digit accuracy."""

    metrics: dict[str, float] = {}
    features = outputs.get("features")
    if features is not None and reference_stats is not None:
        metrics["fid"] = float(frechet_distance(feature_stats(features), reference_stats))
    if features is not None and kid and reference_features is not None:

        size = min(kid_subset_size, len(features), len(reference_features))
        metrics["kid"], metrics["kid_std"] = kid_fn(features, reference_features, subset_size=size, seed=seed)
    if "clip" in outputs:
        metrics["clip_score"] = float(np.mean(outputs["clip"]))
    if "digits" in outputs and labels is not None:
        correct = np.asarray(outputs["digits"]) == np.asarray(labels)
        metrics["digit_accuracy"] = float(correct.mean())
        for d in sorted(set(int(x) for x in labels)):
            metrics[f"digit_accuracy/{d}"] = float(correct[np.asarray(labels) == d].mean())
    return metrics


def run_protocol(cfg: EvalConfig, generate: GenerateFn, prompts: list[str], *, scorers: Scorers,
                 reference_stats=None, reference_features=None, labels: Optional[list[int]] = None,
                 rank: int = 0, world_size: int = 1, gather: GatherFn = lambda x: [x]) -> dict[str, Any]:
    """Every guidance scale of the sweep; returns ``{"scales": [{guidance_scale, metrics...}],
    "grids": {scale: uint8 (n, 3, H, W)}, "prompts_shown": [...], "seconds", "images_per_second"}``
    (metrics on every rank: the gathered arrays are the same everywhere)."""
    scales, grids = [], {}
    t0 = time.perf_counter()
    for g in cfg.guidance_scales:
        out = generate_and_score(generate, prompts, guidance_scale=g, seed=cfg.seed, batch_size=cfg.batch_size,
                                 scorers=scorers, num_grid=cfg.num_grid, rank=rank, world_size=world_size,
                                 gather=gather)
        metrics = compute_metrics(out, reference_stats=reference_stats, reference_features=reference_features,
                                  labels=labels, kid=cfg.kid,
                                  kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)
        scales.append({"guidance_scale": g, **metrics, "num_samples": out["num_samples"],
                       "sample_seconds": out["seconds"]})
        if "grid" in out:
            grids[g] = out["grid"]
        log.info("eval guidance %.2f: %s (%d samples, %.1fs)", g,
                 ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k), len(prompts), out["seconds"])
    seconds = time.perf_counter() - t0
    total = len(prompts) * len(cfg.guidance_scales)
    return {"scales": scales, "grids": grids, "prompts_shown": list(prompts[:cfg.num_grid]), "seconds": seconds,
            "images_per_second": total / seconds if seconds > 0 else math.nan, "world_size": world_size}


def results_record(cfg: EvalConfig, result: dict[str, Any], *, scorers: Scorers, reference_info, source: dict,
                   resolution: int) -> dict[str, Any]:
    """The JSON written beside the checkpoint: protocol, what was measured with, and the numbers."""
    return {"format": "ldm-platform/eval", "version": 1, "checkpoint": source,
            "protocol": cfg.protocol() | {"resolution": resolution}, "scorers": scorers.describe(),
            "reference": reference_info, "results": result["scales"], "seconds": result["seconds"],
            "images_per_second": result["images_per_second"], "world_size": result["world_size"],
            "time": time.time()}


def scalar_logs(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """W&B / metrics.jsonl keys: ``eval/<metric>`` for the first scale of the sweep, and
    ``eval/g<scale>/<metric>`` for every scale."""
    logs: dict[str, float] = {}
    for i, row in enumerate(result["scales"]):
        for key, value in row.items():
            if key == "guidance_scale" or not isinstance(value, (int, float)):
                continue
            logs[f"{prefix}/g{row['guidance_scale']:g}/{key}"] = value
            if i == 0:
                logs[f"{prefix}/{key}"] = value
    logs[f"{prefix}/images_per_second"] = result["images_per_second"]
    return logs


def format_table(record: dict[str, Any]) -> str:
    """The results as a fixed-width table (one row per guidance scale)."""
    rows = record["results"]
    keys = [k for k in ("fid", "kid", "clip_score", "digit_accuracy") if any(k in r for r in rows)]
    head = f"{'guidance':>8}  " + "  ".join(f"{k:>14}" for k in keys) + f"  {'samples':>8}"
    lines = [f"checkpoint {record['checkpoint'].get('tag')} (step {record['checkpoint'].get('step')}, "
             f"{record['checkpoint'].get('weights')} weights)", head]
    for r in rows:
        cells = "  ".join(f"{r[k]:>14.4f}" if k in r else f"{'-':>14}" for k in keys)
        lines.append(f"{r['guidance_scale']:>8g}  {cells}  {r['num_samples']:>8d}")
    return "\n".join(lines)


def write_record(record: dict[str, Any], url: str) -> str:
    """Write ``record`` as JSON to a local path (atomically) or an fsspec URL (one PUT)."""

    return put_bytes(url, (json.dumps(record, indent=2, default=_json_default) + "\n").encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
