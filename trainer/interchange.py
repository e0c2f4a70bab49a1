"""Weights in and out of the ecosystem's formats, through the converters of ``trainer.convert``.

Import (``model.init_from``): a diffusers pipeline folder (``model_index.json`` with ``unet/``,
``vae/`` or ``vqvae/``, ``bert/`` or ``text_encoder/``) or a CompVis/Stability checkpoint
(``.safetensors``, or ``.ckpt``/``.pt`` read with ``torch.load(weights_only=True)`` so no pickled
object is ever built). Every tensor must land: a missing, unexpected or misshapen key, or a
component config that differs from ours, is an error naming what differs.

Export: a diffusers ``LDMTextToImagePipeline`` folder (the paper's trainable text transformer as
``LDMBertModel``, 77 positions; other lengths as a ``StableDiffusionPipeline`` holding it, see
``ldm_pipeline``) or ``StableDiffusionPipeline`` folder (a frozen OpenCLIP tower as ``CLIPTextModel``);
``StableDiffusionInpaintPipeline`` for text-guided inpainting, ``LDMPipeline`` for an unconditional
model, ``LDMSuperResolutionPipeline`` for super-resolution; all loadable offline with
``from_pretrained`` and imported back by ``model.init_from``. Or one safetensors file per component in
our (CompVis) layout. Folders are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.convert.clip_text import (CLIP_TEXT_ARCH_KEYS, clip_text_config, clip_text_from_transformers,
                                      clip_text_to_transformers)
from trainer.convert.diffusers_ldmbert import diffusers_ldmbert_config, ldmbert_from_diffusers, ldmbert_to_diffusers
from trainer.convert.diffusers_unet import (diffusers_unet2d_config, diffusers_unet_config, unet2d_from_diffusers,
                                            unet2d_to_diffusers, unet_from_diffusers, unet_to_diffusers)
from trainer.convert.diffusers_vae import (diffusers_vae_config, fold_latent_affine, unfold_latent_affine,
                                           vae_from_diffusers, vae_to_diffusers)
from trainer.convert.first_stage import load_first_stage_weights, read_state_dict
from trainer.convert.keymap import ConversionReport, KeyMap
from trainer.convert.tokenizers import export_tokenizer
from trainer.models.config import ModelComponents, ModelConfig, build_components

log = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"  # what the written configs claim; the folders load in diffusers >= 0.20
SAFETENSORS_META = {"format": "pt"}
LDM_PIPELINE_TOKENS = 77  # diffusers' LDMTextToImagePipeline tokenizes to this length, whatever the model
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# ----------------------------------------------------------------------------- shared checks


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load ``sd`` into ``module``: every key present, nothing extra, every shape equal."""
    expected = module.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in sd.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    report = ConversionReport(missing=sorted(set(expected) - set(sd)), unexpected=sorted(set(sd) - set(expected)))
    if mismatched:
        raise ValueError(f"{what} is another architecture than the configured model: {len(mismatched)} tensors "
                         f"differ in shape: " + "; ".join(mismatched[:8]))
    report.raise_if_incomplete(f"{what} (another architecture than the configured model?)")
    with torch.no_grad():
        for k, v in sd.items():
            expected[k].copy_(v)


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file raises several types
        raise ValueError(f"{what}: {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         f"it may be truncated") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} is not a readable JSON file ({e})") from None


def _check_config(path: Path, ours: dict[str, Any], what: str) -> None:
    """The component's ``config.json`` must describe our architecture."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    theirs = _read_json(path, what)
    diffs = []
    for k, v in ours.items():
        t = theirs.get(k)
        if isinstance(v, tuple):
            v = list(v)
        if k in theirs and t != v:
            diffs.append(f"{k}: file {t!r}, model {v!r}")
    if diffs:
        raise ValueError(f"{what} is another architecture than the configured model:\n  " + "\n  ".join(diffs[:12]))


# ----------------------------------------------------------------------------- CompVis layout


def compvis_ldmbert_keymap(depth: int) -> KeyMap:
    """Ours <-> CompVis ``BERTEmbedder.transformer`` (x-transformers ``TransformerWrapper``)."""
    km = KeyMap()
    km.add("token_embedding.weight", "token_emb.weight")
    km.add("position_embedding.weight", "pos_emb.emb.weight")
    for i in range(depth):
        a, f = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        km.add_module(f"layers.{i}.attn_norm", f"{a}.0")
        for name in ("to_q", "to_k", "to_v"):
            km.add(f"layers.{i}.attn.{name}.weight", f"{a}.1.{name}.weight")
        km.add_module(f"layers.{i}.attn.to_out", f"{a}.1.to_out")
        km.add_module(f"layers.{i}.ff_norm", f"{f}.0")
        km.add_module(f"layers.{i}.ff.fc1", f"{f}.1.net.0.0")
        km.add_module(f"layers.{i}.ff.fc2", f"{f}.1.net.2")
    km.add_module("final_norm", "norm")
    km.add_theirs_only("to_logits.weight", "token_embedding.weight", torch.zeros_like)
    km.add_theirs_only("to_logits.bias", "token_embedding.weight", lambda e: e.new_zeros(e.shape[0]))
    return km


def _load_compvis(parts, path: Path, cfg) -> dict[str, Any]:
    try:
        obj = read_state_dict(path)
    except ValueError as e:
        raise ValueError(f"model.init_from={str(path)!r}: {e}") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    summary: dict[str, Any] = {}

    def take(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    unet = take("model.diffusion_model.")
    if not unet:
        raise ValueError(f"model.init_from={str(path)!r} has no model.diffusion_model.* tensors: not a CompVis "
                         f"latent-diffusion checkpoint")
    used = ["model.diffusion_model.", "first_stage_model."]
    if cfg.init_from_ema:
        unet = _compvis_ema_unet(sd, unet, path)
        used.append("model_ema.")
    load_strict(parts.unet, unet, f"model.init_from={str(path)!r} (UNet{', EMA' if cfg.init_from_ema else ''})")
    summary["unet"] = len(unet)
    summary["unet_weights"] = "model_ema" if cfg.init_from_ema else "model.diffusion_model"
    first = take("first_stage_model.")
    if first and hasattr(parts.first_stage, "encoder"):
        first = {k: v for k, v in first.items() if not k.startswith("loss.")}
        load_strict(parts.first_stage, first, f"model.init_from={str(path)!r} (first stage)")
        summary["first_stage"] = len(first)
    text_prefix = None
    if cfg.text_encoder.kind == "ldm_bert" and take("cond_stage_model.transformer."):
        text_prefix = "cond_stage_model.transformer."
        ours, report = compvis_ldmbert_keymap(cfg.text_encoder.depth).to_ours(take(text_prefix))
    elif take("cond_stage_model.transformer."):  # SD v1: OpenAI CLIP as a transformers CLIPTextModel
        text_prefix = "cond_stage_model.transformer."
        ours, report = clip_text_from_transformers(take(text_prefix), cfg.text_encoder)
    elif take("cond_stage_model.model."):  # SD v2: the OpenCLIP model itself
        text_prefix = "cond_stage_model.model."
        ours = {f"model.{k}": v for k, v in take(text_prefix).items() if not k.startswith(("visual.", "logit_"))}
        report = ConversionReport()
    if text_prefix is not None:
        report.raise_if_incomplete(f"model.init_from={str(path)!r} (text encoder)")
        load_strict(parts.text_encoder, ours, f"model.init_from={str(path)!r} (text encoder)")
        summary["text_encoder"] = len(ours)
        summary["dropped"] = report.dropped
    if text_prefix is not None:
        used.append(text_prefix)
    if parts.class_embedder is not None and take("cond_stage_model."):  # CompVis ClassEmbedder (cin256-v2)
        classes = take("cond_stage_model.")
        load_strict(parts.class_embedder, classes, f"model.init_from={str(path)!r} (class embedder; "
                                                   f"model.conditioning.num_classes + 1 null class rows)")
        summary["class_embedder"] = len(classes)
        used.append("cond_stage_model.")
    ignored = sorted(k for k in sd if not k.startswith(tuple(used)))
    if ignored:  # e.g. model_ema.*, the schedule buffers, a visual tower: reported, not loaded
        summary["ignored"] = len(ignored)
        log.info("model.init_from=%s: %d tensors not used (%s ...)", path, len(ignored), ", ".join(ignored[:5]))
    has_ema = any(k.startswith("model_ema.") for k in sd)
    log.info("model.init_from=%s: UNet weights from %s%s", path, summary["unet_weights"],
             " (the checkpoint also holds model_ema.*: model.init_from_ema=true takes them)"
             if has_ema and not cfg.init_from_ema else "")
    return summary


def _compvis_ema_unet(sd: dict[str, torch.Tensor], unet: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The UNet from a CompVis checkpoint's EMA copy: LitEma keeps ``model.diffusion_model.<name>`` as
    the buffer ``model_ema.diffusion_model<name without dots>`` (``ldm/modules/ema.py``)."""
    ema = {k: sd.get("model_ema.diffusion_model" + k.replace(".", "")) for k in unet}
    missing = sorted(k for k, v in ema.items() if v is None)
    if len(missing) == len(ema):
        raise ValueError(f"model.init_from={str(path)!r} holds no model_ema.* weights of the UNet (not a "
                         f"full-EMA checkpoint); set model.init_from_ema=false to load model.diffusion_model.*")
    if missing:
        raise ValueError(f"model.init_from={str(path)!r}: model_ema.* lacks {len(missing)} of the UNet's "
                         f"{len(ema)} tensors (e.g. {', '.join(missing[:3])}); set model.init_from_ema=false")
    return ema


# ----------------------------------------------------------------------------- diffusers layout


def _text_converter(cfg):
    """(subfolder, transformers class, to_theirs, from_theirs, config) for the text encoder."""
    tcfg = cfg.text_encoder
    if tcfg.kind == "ldm_bert":
        return ("bert", ("latent_diffusion", "LDMBertModel"), lambda sd: ldmbert_to_diffusers(sd, tcfg),
                lambda sd: ldmbert_from_diffusers(sd, tcfg), {**diffusers_ldmbert_config(tcfg), "model_type": "ldmbert"})
    return ("text_encoder", ("transformers", "CLIPTextModel"), lambda sd: clip_text_to_transformers(sd, tcfg),
            lambda sd: clip_text_from_transformers(sd, tcfg), {**clip_text_config(tcfg), "model_type": "clip_text_model"})


def _text_arch(cfg, text_config: dict[str, Any]) -> dict[str, Any]:
    """The keys of the text encoder's config.json that decide its output (published CLIP configs
    carry other token ids and projection sizes that do not change the UNet's context)."""
    if cfg.text_encoder.kind == "ldm_bert":
        return {k: v for k, v in text_config.items() if k != "model_type"}
    return {k: text_config[k] for k in CLIP_TEXT_ARCH_KEYS if k in text_config}


def _load_diffusers(parts, root: Path, cfg) -> dict[str, Any]:
    where = f"model.init_from={str(root)!r}"
    if cfg.init_from_ema:
        raise ValueError(f"model.init_from_ema=true takes the model_ema.* weights of a CompVis checkpoint; {where} is "
                         f"a diffusers folder, which holds one UNet: set model.init_from_ema=false")
    summary: dict[str, Any] = {}
    pipeline = _read_json(root / "model_index.json", where).get("_class_name")
    # LDMSuperResolutionPipeline decodes latents as they are: its VAE holds our latent scale folded in.
    folded = pipeline == "LDMSuperResolutionPipeline"
    uncond = cfg.unet.context_dim is None  # an LDMPipeline's / LDMSuperResolutionPipeline's UNet2DModel
    unet_config = diffusers_unet2d_config(cfg.unet) if uncond else diffusers_unet_config(cfg.unet)
    _check_config(root / "unet" / "config.json", unet_config, f"{where} (unet/config.json)")
    sd = _read_safetensors(root / "unet" / "diffusion_pytorch_model.safetensors", f"{where} (unet)")
    ours, report = (unet2d_from_diffusers if uncond else unet_from_diffusers)(sd, cfg.unet)
    report.raise_if_incomplete(f"{where} (unet)")
    load_strict(parts.unet, ours, f"{where} (unet)")
    summary["unet"] = len(ours)
    vae_dir = next((root / d for d in ("vqvae", "vae") if (root / d).is_dir()), None)
    if vae_dir is not None and hasattr(parts.first_stage, "encoder"):
        vae_config = diffusers_vae_config(cfg.autoencoder)
        if folded:
            vae_config.update(_unit_scale(vae_config))
        _check_config(vae_dir / "config.json", vae_config, f"{where} ({vae_dir.name}/config.json)")
        sd = _read_safetensors(vae_dir / "diffusion_pytorch_model.safetensors", f"{where} ({vae_dir.name})")
        ours, report = vae_from_diffusers(sd, cfg.autoencoder)
        report.raise_if_incomplete(f"{where} ({vae_dir.name})")
        if folded:  # back to the posterior z that our scale_factor / shift_factor map to the same latent
            ours = unfold_latent_affine(ours, cfg.autoencoder)
        load_strict(parts.first_stage, ours, f"{where} ({vae_dir.name})")
        summary["first_stage"] = len(ours)
    sub, _, _, from_theirs, text_config = _text_converter(cfg)
    if not (root / sub).is_dir() and (root / "text_encoder").is_dir():
        sub = "text_encoder"  # our StableDiffusionPipeline export of a paper's text transformer
    if (root / sub).is_dir():
        _check_config(root / sub / "config.json", _text_arch(cfg, text_config), f"{where} ({sub}/config.json)")
        sd = _read_safetensors(root / sub / "model.safetensors", f"{where} ({sub})")
        ours, report = from_theirs(sd)
        report.raise_if_incomplete(f"{where} ({sub})")
        load_strict(parts.text_encoder, ours, f"{where} ({sub})")
        summary["text_encoder"] = len(ours)
        summary["dropped"] = report.dropped
    return summary


def load_pretrained(parts, path: str, cfg) -> dict[str, Any]:
    """Load published weights into ``parts`` (a ``ModelComponents`` of ``cfg``); returns what was loaded."""
    p = Path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(f"model.init_from={path!r} is a folder without model_index.json: not a "
                                    f"diffusers pipeline folder")
        return _load_diffusers(parts, p, cfg)
    if not p.is_file():
        raise FileNotFoundError(f"model.init_from={path!r} does not exist (a diffusers folder, or a CompVis "
                                f".ckpt / .safetensors file)")
    return _load_compvis(parts, p, cfg)


def build_networks(cfg: ModelConfig, seed: int) -> ModelComponents:
    """The networks of ``cfg`` as every job builds them: seeded random initialisation (identical on
    every rank and on every reload), the first stage's pretrained file (``model.autoencoder.
    checkpoint_path``), then ``model.init_from`` (published weights, through the converters)."""
    torch.manual_seed(seed)
    # A frozen OpenCLIP tower without its own file (model.text_encoder.checkpoint_path) may take its
    # weights from model.init_from (a full SD checkpoint holds them): built at random, then required
    # to be loaded from there.
    text_from_init = (cfg.init_from is not None and cfg.text_encoder.kind == "open_clip"
                      and cfg.text_encoder.checkpoint_path is None)
    if text_from_init:
        if not Path(cfg.init_from).exists():
            raise FileNotFoundError(f"model.init_from={cfg.init_from!r} does not exist (a diffusers folder, or a "
                                    f"CompVis .ckpt / .safetensors file)")
    parts = build_components(cfg, device="cpu", allow_random_init=text_from_init)
    if cfg.autoencoder.kind in ("kl", "vq") and cfg.autoencoder.checkpoint_path is not None:
        load_first_stage_weights(parts.first_stage, cfg.autoencoder.checkpoint_path, cfg.autoencoder)
    if cfg.init_from:
        report = load_pretrained(parts, cfg.init_from, cfg)
        log.info("model.init_from=%s: %s", cfg.init_from, report)
        if text_from_init and "text_encoder" not in report:
            raise FileNotFoundError(
                f"model.text_encoder.checkpoint_path is not set and model.init_from={cfg.init_from!r} holds no "
                f"text encoder weights: give the OpenCLIP {cfg.text_encoder.arch} weights file in "
                f"model.text_encoder.checkpoint_path")
    return parts


# ----------------------------------------------------------------------------- export


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=SAFETENSORS_META)


def scheduler_config(dcfg) -> dict[str, Any]:
    """``DDIMScheduler`` config of our noise schedule and DDIM defaults (leading spacing, offset 1)."""
    beta = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}[dcfg.beta_schedule]
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": dcfg.num_train_timesteps, "beta_start": dcfg.beta_start, "beta_end": dcfg.beta_end,
            "beta_schedule": beta, "prediction_type": DIFFUSERS_PREDICTION[dcfg.prediction_type],
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
            "rescale_betas_zero_snr": dcfg.rescale_zero_terminal_snr, "trained_betas": None}


def _commit_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"out={str(out)!r} exists; choose another folder or set overwrite=true")
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def ldm_pipeline(cfg: ModelConfig) -> bool:
    """Whether the export is an ``LDMTextToImagePipeline``: the paper's text transformer with the
    77 positions that pipeline pads every prompt to (``max_length=77`` is fixed in its ``__call__``).
    Any other text encoder length (the demo's 16) exports as a ``StableDiffusionPipeline`` holding the
    same ``LDMBertModel``: it pads to the tokenizer's ``model_max_length`` (= the model's positions)
    and sizes latents by the VAE's own factor. diffusers warns that it expected a CLIPTextModel there;
    the pipeline only calls the encoder on token ids and reads its last hidden state."""
    return cfg.text_encoder.kind == "ldm_bert" and cfg.text_encoder.max_length == LDM_PIPELINE_TOKENS


def _write_first_stage(model, folder: Path, *, fold_latent: bool = False) -> None:
    """The first stage as a diffusers ``AutoencoderKL`` (or ``VQModel``) in ``folder`` (weights and config).
    ``fold_latent``: its own latent is our diffusion latent (``fold_latent_affine``; config scaling_factor 1, no shift),
    for a pipeline that decodes latents as they are."""
    cfg = model.cfg.model.autoencoder
    ours = model.first_stage.state_dict()
    vae_sd, report = vae_to_diffusers(fold_latent_affine(ours, cfg) if fold_latent else ours, cfg)
    report.raise_if_incomplete("export (first stage)")
    _save(vae_sd, folder / "diffusion_pytorch_model.safetensors")
    config = diffusers_vae_config(cfg)
    if fold_latent:
        config.update(_unit_scale(config))
    _write_json(folder / "config.json", {"_class_name": first_stage_class(cfg), "_diffusers_version": DIFFUSERS_VERSION,
                                         **config})


def first_stage_class(cfg) -> str:
    """The diffusers class of a first stage config (``model.autoencoder``)."""
    return "VQModel" if cfg.kind == "vq" else "AutoencoderKL"


def _unit_scale(vae_config: dict[str, Any]) -> dict[str, Any]:
    """The config keys of a first stage whose latent scale and shift are folded into its weights."""
    return {"scaling_factor": 1.0, **({"shift_factor": None} if "shift_factor" in vae_config else {})}


def _write_unet2d(model, folder: Path) -> None:
    """The UNet of a model without cross-attention as a diffusers ``UNet2DModel``."""
    cfg = model.cfg.model
    unet_sd, report = unet2d_to_diffusers(model.unet.state_dict(), cfg.unet)
    report.raise_if_incomplete("export (unet)")
    _save(unet_sd, folder / "diffusion_pytorch_model.safetensors")
    _write_json(folder / "config.json", {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
                                         "sample_size": model.latent_shape[1], **diffusers_unet2d_config(cfg.unet)})


def _write_ldm_folder(model, out: Path, pipeline: str, overwrite: bool, *, fold_latent: bool) -> Path:
    """``UNet2DModel`` + ``AutoencoderKL`` as ``vqvae`` + ``DDIMScheduler``: diffusers' ``LDMPipeline``
    and ``LDMSuperResolutionPipeline`` hold these three."""
    tmp = _staging(out)
    try:
        _write_unet2d(model, tmp / "unet")
        _write_first_stage(model, tmp / "vqvae", fold_latent=fold_latent)
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(model.cfg.diffusion))
        _write_json(tmp / "model_index.json", {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
                                               "unet": ["diffusers", "UNet2DModel"],
                                               "vqvae": ["diffusers", first_stage_class(model.cfg.model.autoencoder)],
                                               "scheduler": ["diffusers", "DDIMScheduler"]})
        _write_json(tmp / "ldm_platform.json", {"source": model.source, "image_size": model.cfg.data.image_size})
        _commit_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_ldm_uncond(model, out: Path, *, overwrite: bool = False) -> Path:
    """A diffusers ``LDMPipeline`` folder for an unconditional model: the pipeline divides latents by the
    first stage's ``scaling_factor`` and decodes them, so a first stage with a shift has no exact export."""
    cfg = model.cfg.model
    if cfg.autoencoder.shift_factor != 0.0:
        raise ValueError(f"format=diffusers: LDMPipeline decodes latents / scaling_factor with no shift; "
                         f"model.autoencoder.shift_factor={cfg.autoencoder.shift_factor} has no exact export")
    return _write_ldm_folder(model, out, "LDMPipeline", overwrite, fold_latent=False)


def export_ldm_superres(model, out: Path, *, overwrite: bool = False) -> Path:
    """A diffusers ``LDMSuperResolutionPipeline`` folder for a ``concat: lowres`` model. That pipeline
    concatenates the low-resolution image (in [-1, 1], at the latent size) to latents of half the UNet's
    input channels and decodes the result with no ``scaling_factor``: the first stage is written with our
    latent scale and shift folded into its 1x1 quant convs (``fold_latent_affine``), so the folder samples
    what ``trainer.sample`` does. Exact only where the low-resolution image is the latent's size
    (``sr_factor`` = the first stage's factor) and has the latent's channel count."""
    cfg = model.cfg.model
    factor, latent_ch = cfg.autoencoder.downsample_factor, cfg.unet.out_channels
    if cfg.conditioning.sr_factor != factor:
        raise ValueError(f"format=diffusers: LDMSuperResolutionPipeline takes the low-resolution image at the latent "
                         f"size; model.conditioning.sr_factor={cfg.conditioning.sr_factor} differs from the first "
                         f"stage's factor {factor}: use format=safetensors")
    if cfg.unet.in_channels != 2 * latent_ch or cfg.conditioning.concat_channels != latent_ch:
        raise ValueError(f"format=diffusers: LDMSuperResolutionPipeline sizes its latents as half the UNet's input "
                         f"channels; model.unet.in_channels={cfg.unet.in_channels} with "
                         f"model.conditioning.concat_channels={cfg.conditioning.concat_channels} and "
                         f"{latent_ch} latent channels is not that layout: use format=safetensors")
    return _write_ldm_folder(model, out, "LDMSuperResolutionPipeline", overwrite, fold_latent=True)


def export_diffusers(model, out: str | Path, *, overwrite: bool = False) -> Path:
    """A diffusers pipeline folder for ``model`` (a ``trainer.inference.LoadedModel``): text-to-image
    (``LDMTextToImagePipeline`` / ``StableDiffusionPipeline``), text-guided inpainting
    (``StableDiffusionInpaintPipeline``: the UNet's input is noisy latent, mask, masked-image latent, the
    order that pipeline concatenates), ``LDMPipeline`` for an unconditional model and
    ``LDMSuperResolutionPipeline`` for 4x super-resolution."""
    cfg = model.cfg.model
    if cfg.autoencoder.kind == "identity":
        raise ValueError(f"format=diffusers needs a latent model: model.autoencoder.kind={cfg.autoencoder.kind!r} "
                         f"(pixel space) has no diffusers text-to-image pipeline; use format=safetensors")
    if cfg.conditioning.cross_attn == "class":
        raise ValueError("format=diffusers: diffusers has no pipeline for a class-conditional LDM "
                         "(model.conditioning.cross_attn='class'); use format=safetensors")
    out = Path(out)
    concat = cfg.conditioning.concat
    if cfg.conditioning.cross_attn == "none":
        if concat == "lowres":
            return export_ldm_superres(model, out, overwrite=overwrite)
        if concat != "none":
            raise ValueError(f"format=diffusers: diffusers' inpainting pipeline (StableDiffusionInpaintPipeline) "
                             f"needs text cross-attention; model.conditioning.concat={concat!r} with cross_attn "
                             f"'none' has no diffusers pipeline: use format=safetensors")
        return export_ldm_uncond(model, out, overwrite=overwrite)
    if concat == "lowres":
        raise ValueError("format=diffusers: LDMSuperResolutionPipeline has no text cross-attention; "
                         "model.conditioning.concat='lowres' with cross_attn 'text' has no diffusers pipeline: "
                         "use format=safetensors")
    tmp = _staging(out)
    try:
        unet_sd, report = unet_to_diffusers(model.unet.state_dict(), cfg.unet)
        report.raise_if_incomplete("export (unet)")
        _save(unet_sd, tmp / "unet" / "diffusion_pytorch_model.safetensors")
        _write_json(tmp / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                   "_diffusers_version": DIFFUSERS_VERSION,
                                                   "sample_size": model.latent_shape[1],
                                                   **diffusers_unet_config(cfg.unet)})
        ldm = ldm_pipeline(cfg) and concat == "none"  # inpainting: StableDiffusionInpaintPipeline, whatever the encoder
        if cfg.autoencoder.kind == "vq" and not ldm:
            raise ValueError("format=diffusers: StableDiffusion pipelines take an AutoencoderKL; a VQ first stage "
                             "(model.autoencoder.kind='vq') exports in LDMTextToImagePipeline (the paper's text "
                             "transformer with 77 positions), LDMPipeline and LDMSuperResolutionPipeline only: "
                             "use format=safetensors")
        vae_dir = "vqvae" if ldm else "vae"
        _write_first_stage(model, tmp / vae_dir)
        sub, cls, to_theirs, _, text_config = _text_converter(cfg)
        sub = sub if ldm else "text_encoder"  # StableDiffusionPipeline's name, whatever the encoder
        text_sd, report = to_theirs(model.text_encoder.state_dict())
        report.raise_if_incomplete(f"export ({sub})")
        _save(text_sd, tmp / sub / "model.safetensors")
        _write_json(tmp / sub / "config.json", {"architectures": [cls[1]], **text_config})
        tokenizer_class = export_tokenizer(model.tokenizer, tmp / "tokenizer")
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(model.cfg.diffusion))
        index: dict[str, Any] = {"_diffusers_version": DIFFUSERS_VERSION, "unet": ["diffusers", "UNet2DConditionModel"],
                                 vae_dir: ["diffusers", first_stage_class(cfg.autoencoder)], sub: list(cls),
                                 "tokenizer": ["transformers", tokenizer_class], "scheduler": ["diffusers", "DDIMScheduler"]}
        if ldm:
            index["_class_name"] = "LDMTextToImagePipeline"
        else:
            index.update({"_class_name": "StableDiffusionInpaintPipeline" if concat == "masked_image" else
                          "StableDiffusionPipeline", "safety_checker": [None, None],
                          "feature_extractor": [None, None], "requires_safety_checker": False})
        _write_json(tmp / "model_index.json", index)
        _write_json(tmp / "ldm_platform.json", {"source": model.source, "image_size": model.cfg.data.image_size})
        _commit_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_safetensors(model, out: str | Path, *, overwrite: bool = False) -> Path:
    """One safetensors file per component, in our (CompVis) layout, plus the model config."""
    out = Path(out)
    tmp = _staging(out)
    try:
        _save(model.unet.state_dict(), tmp / "unet.safetensors")
        if hasattr(model.first_stage, "encoder"):
            _save(model.first_stage.state_dict(), tmp / "first_stage.safetensors")
        if model.text_encoder is not None:
            _save(model.text_encoder.state_dict(), tmp / "text_encoder.safetensors")
        if model.class_embedder is not None:
            _save(model.class_embedder.state_dict(), tmp / "class_embedder.safetensors")
        _write_json(tmp / "model_config.json", {"model": asdict(model.cfg.model), "diffusion": asdict(model.cfg.diffusion),
                                                "image_size": model.cfg.data.image_size, "source": model.source})
        _commit_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
