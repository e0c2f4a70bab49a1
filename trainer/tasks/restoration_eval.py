"""In-training evaluation of a concat-conditioned model (issue 18, item 4): super-resolve or complete the
held-out images and score them with ``eval.restoration``.

The held-out inputs are drawn as in training (the degradation, or the mask of ``model.conditioning.mask``)
from generators keyed by the held-out image's index and ``eval.seed``, and each image is sampled from
seed ``eval.seed + index``, so the numbers repeat across runs and world sizes. Each rank restores its
share of the held-out set (``eval.restoration.restore_all``: global batch ``j`` on rank ``j % world_size``,
as the text protocol shares its samples), the outputs are gathered and every rank scores them (the set is
small: capped at ``MAX_IMAGES``); rank 0 reports.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from data_pipeline.concat import ConcatSettings, condition_from, draw_inputs
from data_pipeline.degrade import bicubic_upsample
from eval.config import EvalConfig
from eval.protocol import GatherFn
from eval.restoration import held_out_captions, held_out_images, restoration_protocol
from trainer.diffusion import SampleGenerators
from trainer.diffusion.schedule import NoiseSchedule
from trainer.sampling.concat import concat_to_image

MAX_IMAGES = 1000  # held-out images scored at most (the demo's digits have 179)


def held_out_set(source: str, *, resolution: int, with_captions: bool,
                 storage_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The held-out images (N, 3, R, R) in [-1, 1], their digit labels (None without a ``digit`` field)
    and their captions (for a text-conditioned model)."""
    try:
        images, labels = held_out_images(source, resolution=resolution, limit=MAX_IMAGES,
                                         storage_options=storage_options)
    except KeyError:  # shards without a digit label: no recognition score
        images, labels = held_out_images(source, resolution=resolution, limit=MAX_IMAGES, label_field=None,
                                         storage_options=storage_options)
    captions = None
    if with_captions:
        captions = held_out_captions(source, len(images), storage_options)
    return {"images": images, "labels": labels, "captions": captions}


def evaluate_restoration(settings: ConcatSettings, held_out: dict[str, Any], *, unet: nn.Module,
                         encode: Callable[[list[Any]], Optional[torch.Tensor]], uncond: Any, first_stage: nn.Module,
                         schedule: NoiseSchedule, latent_channels: int, cfg: EvalConfig, scorers: Any,
                         lpips: Optional[nn.Module], device: torch.device, rank: int = 0, world_size: int = 1,
                         gather: GatherFn = lambda x: [x]) -> dict[str, Any]:
    """The protocol record (``eval.restoration.restoration_protocol``) at the first guidance scale of
    ``eval.guidance_scales`` (guidance applies to text only; concat inputs are never dropped), the same
    on every rank; ``gather`` is ``trainer.runtime.distributed.all_gather_object`` (or the identity)."""
    images = held_out["images"]
    count = images.shape[0]
    gens = SampleGenerators(cfg.seed, list(range(count)))
    drawn = draw_inputs(images, gens.generators, settings)  # (N, 3, H/f, W/f) or masks (N, 1, H, W)
    factor = int(getattr(first_stage, "downsample_factor", 1))
    latent_size = (images.shape[-2] // factor, images.shape[-1] // factor)
    captions = held_out["captions"]
    guidance = cfg.guidance_scales[0] if captions is not None else 1.0

    def restore(x: torch.Tensor, d: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        concat = condition_from(settings.kind, first_stage, x.to(device), d.to(device), latent_size)
        index = [s - cfg.seed for s in seeds]
        conditions = [captions[i] for i in index] if captions is not None else [None] * len(seeds)
        return concat_to_image(unet, encode, first_stage, conditions, seeds, concat, schedule=schedule,
                               latent_channels=latent_channels, sampler=cfg.sampler, num_steps=cfg.num_steps,
                               guidance_scale=guidance, negative_prompt=uncond, batch_size=len(seeds),
                               device=device)

    baseline = bicubic_upsample(drawn, settings.sr_factor) if settings.kind == "lowres" else None
    record = restoration_protocol(settings.kind, restore, images, drawn, labels=held_out["labels"],
                                  classifier=scorers.classifier, extractor=scorers.extractor, lpips=lpips,
                                  baseline=baseline, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                                  world_size=world_size, gather=gather)
    record["guidance_scale"] = guidance
    record["inputs"] = baseline if baseline is not None else images * (1.0 - drawn)
    record["originals"] = images
    return record


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as ``eval/...`` scalars (None and tensors left out)."""
    out: dict[str, float] = {"eval/num_samples": float(record["num_images"])}
    if record["kind"] == "lowres":
        for row, suffix in (("model", ""), ("bicubic", "_bicubic")):
            for metric in ("psnr", "ssim", "fid"):
                value = record["rows"][row][metric]
                if value is not None:
                    out[f"eval/{metric}{suffix}"] = float(value)
        out["eval/psnr_gain_db"] = float(record["psnr_gain_db"])
    else:
        for metric in ("digit_accuracy", "digit_accuracy_masked_input", "masked_psnr", "lpips_masked", "fid"):
            value = record.get(metric)
            if value is not None:
                out[f"eval/{metric}"] = float(value)
    return out


def json_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its image tensors, for the results JSON."""
    return {k: v for k, v in record.items() if not isinstance(v, (torch.Tensor, np.ndarray))}


def grid_of(record: dict[str, Any], count: int) -> torch.Tensor:
    """Input, output and original of the first ``count`` images, in rows of three: (3 * count, 3, H, W)."""
    rows = [torch.stack([record["inputs"][i], record["outputs"][i], record["originals"][i]])
            for i in range(min(count, record["num_images"]))]
    return torch.cat(rows)
