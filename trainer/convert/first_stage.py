"""First-stage (autoencoder) weights from files, whatever project wrote them.

``read_state_dict`` reads safetensors or ``torch.save`` files with weights-only semantics.
``extract_vae_state_dict`` finds the autoencoder in what it read: our own ``autoencoder.safetensors``
and bare CompVis VAE state dicts (same names), full CompVis/Stability LDM checkpoints (under
``first_stage_model.``; a CompVis autoencoder training checkpoint's ``loss.*`` tensors are dropped)
and diffusers-layout VAEs (converted). ``load_first_stage`` builds the configured network and loads
``model.autoencoder.checkpoint_path`` into it, strictly.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from trainer.convert.diffusers_vae import vae_from_diffusers
from trainer.convert.keymap import ConversionReport
from trainer.models.autoencoder import AutoencoderConfig, AutoencoderKL, build_first_stage

CHECKPOINT_KEY = "model.autoencoder.checkpoint_path"
# An LDM checkpoint (CompVis LatentDiffusion) stores the autoencoder under this prefix.
LDM_PREFIX = "first_stage_model."
# A CompVis autoencoder training checkpoint also holds the LPIPS net and the discriminator here.
LOSS_PREFIX = "loss."


def load_first_stage(cfg: AutoencoderConfig) -> nn.Module:
    """The first stage of ``cfg`` with ``cfg.checkpoint_path`` loaded when set (kinds ``kl`` and ``vq``)."""
    model = build_first_stage(cfg)
    if cfg.kind in ("kl", "vq") and cfg.checkpoint_path is not None:
        load_first_stage_weights(model, cfg.checkpoint_path, cfg)
    return model


def read_state_dict(path: str | Path) -> dict:
    """Read a safetensors file or a ``torch.save``d file (``weights_only=True``: tensors and plain
    containers only; pickled objects are refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{CHECKPOINT_KEY}={str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises several types; all mean "cannot read this file"
        raise ValueError(
            f"{CHECKPOINT_KEY}={str(path)!r} cannot be read with torch.load(weights_only=True): {err}. "
            f"Checkpoints holding pickled objects are refused; re-save the state dict as safetensors."
        ) from err


def extract_vae_state_dict(obj: dict, cfg: AutoencoderConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Find the autoencoder weights in a loaded checkpoint, in CompVis layout.

    Accepts ``{"state_dict": ...}`` wrappers, full LDM checkpoints (keys under ``first_stage_model.``),
    bare CompVis VAE state dicts (``loss.*`` training weights are dropped) and diffusers-layout VAE
    state dicts (converted). Returns the state dict and the keys that are not tensors.
    """
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(LDM_PREFIX) for k in sd):
        return {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}, not_tensors
    sd = {k: v for k, v in sd.items() if not k.startswith(LOSS_PREFIX)}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        sd, report = vae_from_diffusers(sd, cfg)
        report.raise_if_incomplete(f"{CHECKPOINT_KEY}: diffusers-layout VAE")
    return sd, not_tensors


def load_first_stage_weights(model: AutoencoderKL, path: str | Path, cfg: AutoencoderConfig) -> None:
    """Load a checkpoint into ``model``; every parameter must be present with the configured shape."""
    load_first_stage_state(model, read_state_dict(path), cfg, f"{CHECKPOINT_KEY}={str(path)!r}")
    _check_stored_scale(Path(path), cfg)


def load_first_stage_state(model: AutoencoderKL, state: dict, cfg: AutoencoderConfig, source: str) -> None:
    """Load a read checkpoint (ours, CompVis or diffusers names) into ``model``, strictly: every
    tensor present with the configured shape. ``source`` names it in the errors."""
    sd, not_tensors = extract_vae_state_dict(state, cfg)
    expected = model.state_dict()
    mismatched = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                        for k, v in sd.items() if k in expected and v.shape != expected[k].shape)
    if mismatched:
        raise ValueError(f"{source} does not fit the model.autoencoder settings "
                         f"(ch, ch_mult, z_channels, embed_dim, ...); {len(mismatched)} tensors differ "
                         f"in shape: " + "; ".join(mismatched[:10]))
    report = ConversionReport(missing=sorted(set(expected) - set(sd)),
                              unexpected=sorted(set(sd) - set(expected)) + not_tensors)
    report.raise_if_incomplete(source)
    model.load_state_dict(sd, strict=True)


def _check_stored_scale(path: Path, cfg: AutoencoderConfig) -> None:
    """An autoencoder trained here stores its latent scale (1 / std of its latents) in the file's
    metadata; warn when the configured one differs, as a diffusion model would see latents of
    another variance than the one the file was measured with."""
    if path.suffix != ".safetensors":
        return
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    stored = meta.get("scale_factor")
    if stored is not None and not math.isclose(float(stored), cfg.scale_factor, rel_tol=1e-5):
        warnings.warn(f"{CHECKPOINT_KEY}={str(path)!r} was measured with latent scale {float(stored):.6g} "
                      f"(1 / std of its latents) but model.autoencoder.scale_factor={cfg.scale_factor}; "
                      f"set model.autoencoder.scale_factor={float(stored):.6g} unless the difference is intended")
