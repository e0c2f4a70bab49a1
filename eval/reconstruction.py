"""``python -m eval.reconstruction checkpoint=<autoencoder.safetensors | root/tag | root | run dir>
data=<held-out shards>``

How well a trained KL autoencoder (``trainer.train task=autoencoder``) reconstructs held-out images:
PSNR, SSIM, LPIPS and rFID, written as JSON (default: ``reconstruction.json`` beside the checkpoint's
``autoencoder.safetensors``) and summarised on stdout.

Every image is decoded from the webdataset shards of ``data`` (brace pattern, glob, list file; any
fsspec URL), center-cropped and resized to ``resolution`` with PIL bicubic (``eval.reference.square_rgb``,
as the FID reference statistics), encoded, and decoded from the posterior's mode (CompVis
``AutoencoderKL.forward(sample_posterior=False)``). The reconstruction is quantised to uint8 as a saved
image would be, and every metric compares the two uint8 images:

* PSNR and SSIM per image (data range 255; ``eval.image_metrics``, scikit-image parity), averaged over
  images. A bit-exact reconstruction has PSNR +inf: the mean is then +inf, which JSON cannot hold, so
  ``psnr`` is reported as ``null`` and ``num_exact`` counts those images.
* LPIPS (VGG, v0.1; ``trainer.autoencoder_loss.build_lpips``) on the quantised images mapped to
  [-1, 1], averaged over images; ``null`` when neither ``lpips_backbone`` nor ``lpips_random_backbone``
  is given. The random backbone is drawn from seed ``LPIPS_RANDOM_SEED``, so its numbers repeat.
* rFID: the Frechet distance between the features (``features=inception|digits``) of the inputs and
  of their reconstructions (``null`` with ``features=none``); needs at least 2 images.

Samples that cannot be decoded (and samples without an image, and damaged shards) are skipped and
counted in ``num_skipped``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import fsspec
import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from safetensors.torch import load as load_bytes

from data_pipeline.sources import (RetryPolicy, S3Options, check_readable, expand_urls, install_s3_defaults, protocol_of,
                                   storage_options_for)
from eval.features import build_feature_extractor, sha256_file
from eval.image_metrics import psnr, ssim
from eval.metrics import frechet_distance
from eval.reference import RunningStats, decoded_images, shard_images
from trainer.autoencoder_loss import build_lpips
from trainer.checks import invalid
from trainer.cli import CLI_CONF_DIR, hydra_command, run_cli
from trainer.convert.first_stage import load_first_stage_state
from trainer.images import put_bytes, to_uint8
from trainer.models.autoencoder import AutoencoderConfig, AutoencoderKL
from trainer.runtime.checkpoint import read_autoencoder_metadata, resolve_autoencoder_file
from trainer.runtime.device import check_device, select_device

log = logging.getLogger("eval.reconstruction")

FORMAT = "ldm-platform/reconstruction"
OUT_NAME = "reconstruction.json"
FEATURES = ("inception", "digits", "none")
RESIZE_POLICIES = ("torch_bilinear", "pil_bicubic")
LPIPS_RANDOM_SEED = 0  # torch seed of lpips_random_backbone's VGG16, so that its numbers repeat
MIN_SSIM_SIZE = 11  # eval.image_metrics.ssim's Gaussian window (11 taps)


@dataclass
class ReconstructionConfig:
    # autoencoder.safetensors, a checkpoint tag holding it, a checkpoint root (its `latest` pointer is
    # followed) or a run directory holding checkpoints/latest; local or any fsspec URL.
    checkpoint: str = "???"
    data: str = "???"  # held-out webdataset shards: brace pattern, glob, .txt/.list file, URL
    num_images: int = 0  # the first num_images readable images of data; 0 = all
    batch_size: int = 32
    resolution: int = 0  # image side; 0 = the autoencoder's config resolution
    features: str = "inception"  # rFID features: inception | digits | none
    inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth
    digit_classifier: Optional[str] = None  # the digits demo's digit_classifier.json
    resize: str = "torch_bilinear"  # how images reach Inception's 299 px (eval.features)
    lpips_backbone: Optional[str] = None  # torchvision's vgg16-397923af.pth
    lpips_random_backbone: bool = False  # a random VGG16 (tests and demos only)
    out: Optional[str] = None  # the JSON; default <tag>/reconstruction.json beside the checkpoint file
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    overwrite: bool = False
    # s3:// settings (endpoint, profile, anon, region, timeouts) of everything this command reads and
    # writes, as data.s3 in training; credentials only from the AWS environment or a profile.
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        for key in ("checkpoint", "data"):
            value = getattr(self, key)
            if not isinstance(value, str) or value in ("", "???"):
                raise invalid(key, value, "a path or URL (required)")
        for key, minimum, note in (("num_images", 0, " (0 = all)"), ("batch_size", 1, ""),
                                   ("resolution", 0, " (0 = the autoencoder's resolution)")):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise invalid(key, value, f"an int >= {minimum}{note}")
        if self.features not in FEATURES:
            raise invalid("features", self.features, ", ".join(FEATURES))
        if self.features == "inception" and not self.inception_weights:
            raise invalid("inception_weights", self.inception_weights,
                       "the path of pt_inception-2015-12-05-6726825d.pth when features=inception "
                       "(or features=digits|none)")
        if self.features == "digits" and not self.digit_classifier:
            raise invalid("digit_classifier", self.digit_classifier,
                       "the path of the digits demo's digit_classifier.json when features=digits")
        if self.features != "none" and self.num_images == 1:
            raise invalid("num_images", self.num_images, f"0 or >= 2 with features={self.features} (rFID needs "
                       "a covariance), or features=none")
        if self.resize not in RESIZE_POLICIES:
            raise invalid("resize", self.resize, ", ".join(RESIZE_POLICIES))
        if self.lpips_backbone is not None and self.lpips_random_backbone:
            raise ValueError(f"lpips_backbone={self.lpips_backbone!r} and lpips_random_backbone=true: "
                             "expected at most one of them")
        if self.lpips_backbone == "":
            raise invalid("lpips_backbone", self.lpips_backbone, "null or the path of vgg16-397923af.pth")
        check_device("device", self.device)


ConfigStore.instance().store(name="reconstruction_schema", node=ReconstructionConfig)


# ----------------------------------------------------------------------------- metrics (pure)


def _check_pair(inputs: torch.Tensor, recons: torch.Tensor) -> None:
    for name, images in (("inputs", inputs), ("recons", recons)):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                or images.shape[1] != 3:
            raise ValueError(f"reconstruction_metrics: {name} must be a uint8 tensor (B, 3, H, W); got "
                             f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                             f"{tuple(getattr(images, 'shape', ()))}")
    if inputs.shape != recons.shape:
        raise ValueError(f"reconstruction_metrics: inputs {tuple(inputs.shape)} and recons "
                         f"{tuple(recons.shape)} differ in shape")


def to_signed_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1] (0 -> -1, 255 -> 1), the autoencoder's and LPIPS' range."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def reconstruction_metrics(inputs: torch.Tensor, recons: torch.Tensor, *, lpips: Optional[torch.nn.Module] = None,
                           extractor: Any = None) -> dict[str, Any]:
    """Per-image parts of the metrics of one batch; aggregate them with ``MetricTotals``.

    ``inputs``, ``recons``: uint8 (B, 3, H, W). Returns ``psnr`` and ``ssim`` (B,) float64 (data range
    255; PSNR is +inf where the images are identical), ``lpips`` (B,) float64 or None, and
    ``features_inputs`` / ``features_recons`` (B, D) float64 arrays of ``extractor`` or None.
    """
    _check_pair(inputs, recons)
    inputs, recons = inputs.cpu(), recons.cpu()
    parts: dict[str, Any] = {"psnr": psnr(inputs, recons), "ssim": ssim(inputs, recons),
                             "lpips": None, "features_inputs": None, "features_recons": None}
    if lpips is not None:
        device = next(lpips.parameters()).device
        distance = lpips(to_signed_float(inputs).to(device), to_signed_float(recons).to(device))  # (B, 1, 1, 1)
        parts["lpips"] = distance.flatten().to("cpu", torch.float64)
    if extractor is not None:
        parts["features_inputs"] = np.asarray(extractor(inputs), dtype=np.float64)
        parts["features_recons"] = np.asarray(extractor(recons), dtype=np.float64)
    return parts


class MetricTotals:
    """Running means of the parts of ``reconstruction_metrics`` over batches, and the running feature
    statistics of inputs and reconstructions for rFID (features are not kept)."""

    def __init__(self) -> None:
        self.num_images = 0
        self.num_exact = 0
        self.psnr_sum = 0.0  # over images with finite PSNR
        self.ssim_sum = 0.0
        self.lpips_sum: Optional[float] = None
        self.stats_inputs: Any = None  # eval.reference.RunningStats
        self.stats_recons: Any = None

    def update(self, parts: dict[str, Any]) -> None:
        psnr = parts["psnr"].to(torch.float64)
        batch = int(psnr.shape[0])
        exact = torch.isinf(psnr)
        assert not (psnr[exact] < 0).any(), "PSNR is -inf only for an infinite error"
        self.num_images += batch
        self.num_exact += int(exact.sum())
        self.psnr_sum += float(psnr[~exact].sum())
        self.ssim_sum += float(parts["ssim"].to(torch.float64).sum())
        if parts["lpips"] is not None:
            self.lpips_sum = (self.lpips_sum or 0.0) + float(parts["lpips"].to(torch.float64).sum())
        if parts["features_inputs"] is not None:
            if self.stats_inputs is None:
                dim = parts["features_inputs"].shape[1]
                self.stats_inputs, self.stats_recons = RunningStats(dim), RunningStats(dim)
            self.stats_inputs.update(parts["features_inputs"])
            self.stats_recons.update(parts["features_recons"])

    def result(self) -> dict[str, Any]:
        """``num_images``, ``num_exact``, ``psnr`` (None when any image is exact: the mean is +inf),
        ``ssim``, ``lpips`` (None without LPIPS) and ``rfid`` (None without features)."""
        if self.num_images == 0:
            raise ValueError("no images to average over")
        rfid = None
        if self.stats_inputs is not None:
            rfid = frechet_distance(self.stats_inputs.stats(), self.stats_recons.stats())
        return {"num_images": self.num_images, "num_exact": self.num_exact,
                "psnr": None if self.num_exact else self.psnr_sum / self.num_images,
                "ssim": self.ssim_sum / self.num_images,
                "lpips": None if self.lpips_sum is None else self.lpips_sum / self.num_images,
                "rfid": rfid}


def summarize_metrics(batches: Any) -> dict[str, Any]:
    """``MetricTotals.result()`` of an iterable of ``reconstruction_metrics`` parts."""
    totals = MetricTotals()
    for parts in batches:
        totals.update(parts)
    return totals.result()


# ----------------------------------------------------------------------------- checkpoint


def autoencoder_config(meta: dict[str, str], url: str) -> tuple[Any, dict[str, Any]]:
    """``AutoencoderConfig`` of the metadata's ``config`` (weights come from the file itself, so its
    ``checkpoint_path`` is dropped), and the config as recorded."""
    try:
        recorded = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {url!r}: metadata config is not JSON ({e})") from None
    known = {f.name for f in fields(AutoencoderConfig)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise ValueError(f"checkpoint {url!r}: metadata config has keys {unknown} that AutoencoderConfig "
                         f"does not know; allowed: {sorted(known)}")
    cfg = AutoencoderConfig(**{**recorded, "checkpoint_path": None})
    if cfg.kind != "kl":
        raise ValueError(f"checkpoint {url!r}: model.autoencoder.kind={cfg.kind!r}; a reconstruction needs 'kl'")
    return cfg, recorded


def load_autoencoder(url: str, cfg: Any, device: torch.device) -> torch.nn.Module:
    """The AutoencoderKL of ``cfg`` with the weights of ``url`` (every tensor, of the right shape)."""
    fs, path = fsspec.core.url_to_fs(url)
    model = AutoencoderKL(cfg)
    load_first_stage_state(model, load_bytes(fs.cat_file(path)), cfg, f"checkpoint {url!r} (with its metadata config)")
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- data


def shard_urls(data: str, s3: Optional[S3Options] = None) -> list[str]:
    """The shard URLs of ``data``; each must exist (local) or the first must be readable (remote)."""
    try:
        urls = expand_urls(data, s3=s3)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"data={data!r}: {e}") from None
    if not urls:
        raise FileNotFoundError(f"data={data!r} names no shard")
    if protocol_of(urls[0]) == "file":
        missing = [u for u in urls if not fsspec.core.url_to_fs(u)[0].exists(u)]
        if missing:
            raise FileNotFoundError(f"data={data!r}: {len(missing)} of {len(urls)} shards do not exist: "
                                    f"{missing[:3]}")
    else:
        try:
            check_readable(urls[0], storage_options_for(urls[0], s3, None), RetryPolicy(), f"data={data!r}")
        except (PermissionError, RuntimeError) as e:
            raise ValueError(str(e)) from None
    return urls


def iter_images(urls: list[str], resolution: int, skipped: Counter) -> Iterator[np.ndarray]:
    """(resolution, resolution, 3) uint8 images of the shards in order; samples without an image or
    with bytes PIL cannot decode, and damaged shards, are counted in ``skipped`` and logged."""
    return decoded_images(shard_images(urls, None, skipped), resolution, skipped)


def batches(images: Iterator[np.ndarray], batch_size: int, limit: int) -> Iterator[torch.Tensor]:
    """uint8 (b, 3, R, R) batches of at most ``limit`` images in all (0 = no limit)."""
    batch: list[np.ndarray] = []
    seen = 0
    for image in images:
        batch.append(image)
        seen += 1
        if len(batch) == batch_size or seen == limit:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
            batch = []
        if seen == limit:
            return
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- the job


@torch.no_grad()
def reconstruct(autoencoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 reconstructions decode(posterior.mode()), quantised as
    ``trainer.images.to_uint8`` quantises saved samples."""
    device = next(autoencoder.parameters()).device
    recon = autoencoder.decode(autoencoder.encode(to_signed_float(images).to(device)).mode())  # (B, 3, H, W)
    return torch.from_numpy(to_uint8(recon.float())).permute(0, 3, 1, 2).contiguous()


def _default_out(file_url: str) -> str:
    return f"{file_url.rsplit('/', 1)[0]}/{OUT_NAME}" if "/" in file_url else OUT_NAME


def _check_file(key: str, value: Optional[str]) -> None:
    if value is not None and not Path(value).expanduser().is_file():
        raise FileNotFoundError(f"{key}={value!r}: no such file")


def evaluate(cfg: ReconstructionConfig) -> dict[str, Any]:
    """Run the evaluation of ``cfg``, write the JSON and return it (with ``out`` added)."""
    install_s3_defaults(cfg.s3)
    # Everything a user can get wrong is checked before the networks are built.
    file_url = resolve_autoencoder_file(cfg.checkpoint)
    meta = read_autoencoder_metadata(file_url)
    ae_cfg, recorded = autoencoder_config(meta, file_url)
    resolution = cfg.resolution or ae_cfg.resolution
    if resolution % ae_cfg.downsample_factor or resolution < MIN_SSIM_SIZE:
        raise invalid("resolution", cfg.resolution, f"a multiple of the autoencoder's downsample factor "
                   f"{ae_cfg.downsample_factor}, >= {MIN_SSIM_SIZE} (SSIM's window), or 0 for the autoencoder's "
                   f"{ae_cfg.resolution}")
    urls = shard_urls(cfg.data, cfg.s3)
    used_files = {"inception_weights": cfg.features == "inception", "digit_classifier": cfg.features == "digits",
                  "lpips_backbone": True}
    for key, used in used_files.items():
        if used:
            _check_file(key, getattr(cfg, key))
    out = cfg.out or _default_out(file_url)
    out_fs, out_path = fsspec.core.url_to_fs(out)
    if out_fs.exists(out_path) and not cfg.overwrite:
        raise FileExistsError(f"out={out!r} exists; choose another path or overwrite=true")
    device = select_device(cfg.device, "device")
    if cfg.lpips_backbone is None and not cfg.lpips_random_backbone:
        log.warning("neither lpips_backbone=<vgg16-397923af.pth> nor lpips_random_backbone=true is given: "
                    "LPIPS is not computed (reported as null)")

    log.info("loading autoencoder %s (step %s) onto %s", file_url, meta["step"], device)
    autoencoder = load_autoencoder(file_url, ae_cfg, device)
    lpips, lpips_record = _build_lpips(cfg, device)
    extractor = None
    if cfg.features != "none":
        extractor = build_feature_extractor(cfg.features, inception_weights=cfg.inception_weights,
                                            digit_classifier=cfg.digit_classifier, resize=cfg.resize, device=device)

    skipped: Counter = Counter()
    totals = MetricTotals()
    for images in batches(iter_images(urls, resolution, skipped), cfg.batch_size, cfg.num_images):
        totals.update(reconstruction_metrics(images, reconstruct(autoencoder, images), lpips=lpips,
                                             extractor=extractor))
        log.info("%d images", totals.num_images)
    num_skipped = int(sum(skipped.values()))
    needed = max(cfg.num_images, 1 if extractor is None else 2)  # rFID needs a covariance
    if totals.num_images < needed:
        raise ValueError(f"data={cfg.data!r} holds {totals.num_images} readable images ({num_skipped} samples "
                         f"skipped: {dict(skipped)}); num_images={cfg.num_images} with features={cfg.features} "
                         f"needs {needed}")
    if num_skipped:
        log.warning("%d samples skipped: %s", num_skipped, dict(skipped))
    metrics = totals.result()
    record = {"format": FORMAT, "checkpoint": file_url, "step": int(meta["step"]), "autoencoder": recorded,
              "latent_scale_factor": float(meta["scale_factor"]), "latent_shift_factor": float(meta["shift_factor"]),
              "data": cfg.data, "num_images": metrics["num_images"], "num_skipped": num_skipped,
              "skipped": dict(skipped), "resolution": resolution,
              "psnr": metrics["psnr"], "num_exact": metrics["num_exact"], "ssim": metrics["ssim"],
              "lpips": metrics["lpips"], "rfid": metrics["rfid"],
              "features": extractor.describe() if extractor is not None else None,
              "lpips_backbone": lpips_record,
              "settings": {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite")}}
    # allow_nan=False: a NaN or inf that slipped through fails here instead of writing invalid JSON.
    put_bytes(out, (json.dumps(record, indent=2, allow_nan=False) + "\n").encode())
    return {**record, "out": out}


def _build_lpips(cfg: ReconstructionConfig, device: torch.device) -> tuple[Optional[torch.nn.Module], Any]:
    if cfg.lpips_backbone is None and not cfg.lpips_random_backbone:
        return None, None
    if cfg.lpips_random_backbone:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(LPIPS_RANDOM_SEED)
            model = build_lpips(random_backbone=True)
        record = {"random": True, "seed": LPIPS_RANDOM_SEED}
    else:
        model = build_lpips(cfg.lpips_backbone)
        path = Path(cfg.lpips_backbone).expanduser()
        record = {"random": False, "file": path.name, "sha256": sha256_file(path)}
    return model.to(device), {"net": "vgg", "version": "0.1", **record}


def _fmt(value: Optional[float], spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def summary(record: dict[str, Any]) -> str:
    psnr = _fmt(record["psnr"], ".3f", none=f"inf ({record['num_exact']} exact)")
    return (f"{record['num_images']} images at {record['resolution']} px ({record['num_skipped']} skipped), "
            f"step {record['step']}: psnr {psnr} dB, ssim {_fmt(record['ssim'], '.4f')}, "
            f"lpips {_fmt(record['lpips'], '.4f')}, rfid {_fmt(record['rfid'], '.4f')}\nwrote {record['out']}")


@hydra.main(version_base=None, config_path=CLI_CONF_DIR, config_name="reconstruction")
def main(dict_cfg: DictConfig) -> None:
    print(summary(run_cli(evaluate, dict_cfg)))


if __name__ == "__main__":
    hydra_command(main)
