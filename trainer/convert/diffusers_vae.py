"""KL autoencoder: CompVis layout (``trainer.models.autoencoder``) <-> ``diffusers.AutoencoderKL``.

Differences the map handles:
- diffusers names: ``down_blocks/resnets/attentions/downsamplers.0``, ``mid_block.resnets.{0,1}``,
  ``conv_norm_out``, ``conv_shortcut`` for CompVis ``nin_shortcut``, attention ``group_norm``,
  ``to_q/to_k/to_v/to_out.0`` for ``norm/q/k/v/proj_out``.
- attention projections are ``nn.Linear`` in diffusers and 1x1 convs in CompVis (CONV1X1_TO_LINEAR).
- decoder order: diffusers ``up_blocks[0]`` is the lowest resolution, CompVis ``up[0]`` the highest,
  so ``up.{i}`` <-> ``up_blocks.{L-1-i}``.
diffusers ties ``z_channels`` and ``embed_dim`` into one ``latent_channels``, so only configs with
``z_channels == embed_dim`` can be exported.
"""

from __future__ import annotations

import math
import warnings

import torch

from trainer.convert.keymap import CONV1X1_TO_LINEAR, ConversionReport, KeyMap
from trainer.models.autoencoder import AutoencoderConfig

_ATTN = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
         ("proj_out", "to_out.0"))


def _add_resnet(km: KeyMap, ours: str, theirs: str, has_shortcut: bool) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        km.add_module(f"{ours}.{name}", f"{theirs}.{name}")
    if has_shortcut:
        km.add_module(f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut")


def _add_attn(km: KeyMap, ours: str, theirs: str) -> None:
    for o, t in _ATTN:
        if o == "norm":
            km.add_module(f"{ours}.{o}", f"{theirs}.{t}")
        else:
            km.add(f"{ours}.{o}.weight", f"{theirs}.{t}.weight", CONV1X1_TO_LINEAR)
            km.add(f"{ours}.{o}.bias", f"{theirs}.{t}.bias")


def _add_mid(km: KeyMap, ours: str, theirs: str) -> None:
    _add_resnet(km, f"{ours}.block_1", f"{theirs}.resnets.0", False)
    _add_attn(km, f"{ours}.attn_1", f"{theirs}.attentions.0")
    _add_resnet(km, f"{ours}.block_2", f"{theirs}.resnets.1", False)


def _level_has_attn(cfg: AutoencoderConfig) -> list[bool]:
    return [r in cfg.attn_resolutions for r in cfg.level_resolutions]


def vae_keymap(cfg: AutoencoderConfig) -> KeyMap:
    """Rows (CompVis key, diffusers key, transform) for every parameter of ``cfg``'s autoencoder."""
    if cfg.kind not in ("kl", "vq"):
        raise ValueError(f"model.autoencoder.kind={cfg.kind!r}: only kinds 'kl' and 'vq' have weights to convert")
    km = KeyMap()
    widths = [cfg.ch * m for m in cfg.ch_mult]
    attn = _level_has_attn(cfg)
    num_levels = len(widths)

    km.add_module("encoder.conv_in", "encoder.conv_in")
    block_in = cfg.ch
    for i, width in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            _add_resnet(km, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                        has_shortcut=block_in != width)
            block_in = width
            if attn[i]:
                _add_attn(km, f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}")
        if i != num_levels - 1:
            km.add_module(f"encoder.down.{i}.downsample.conv",
                          f"encoder.down_blocks.{i}.downsamplers.0.conv")
    _add_mid(km, "encoder.mid", "encoder.mid_block")
    km.add_module("encoder.norm_out", "encoder.conv_norm_out")
    km.add_module("encoder.conv_out", "encoder.conv_out")

    km.add_module("decoder.conv_in", "decoder.conv_in")
    _add_mid(km, "decoder.mid", "decoder.mid_block")
    block_in = widths[-1]
    for i in reversed(range(num_levels)):
        k = num_levels - 1 - i
        for j in range(cfg.num_res_blocks + 1):
            _add_resnet(km, f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}",
                        has_shortcut=block_in != widths[i])
            block_in = widths[i]
            if attn[i]:
                _add_attn(km, f"decoder.up.{i}.attn.{j}", f"decoder.up_blocks.{k}.attentions.{j}")
        if i != 0:
            km.add_module(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    km.add_module("decoder.norm_out", "decoder.conv_norm_out")
    km.add_module("decoder.conv_out", "decoder.conv_out")

    km.add_module("quant_conv", "quant_conv")
    km.add_module("post_quant_conv", "post_quant_conv")
    if cfg.kind == "vq":
        km.add("quantize.embedding.weight", "quantize.embedding.weight")
    return km


def _check_representable(cfg: AutoencoderConfig) -> None:
    if cfg.kind == "vq":
        return  # diffusers.VQModel has latent_channels (z_channels) and vq_embed_dim apart
    if cfg.kind != "kl":
        raise ValueError(f"model.autoencoder.kind={cfg.kind!r}: only kinds 'kl' and 'vq' map to "
                         f"diffusers.AutoencoderKL / VQModel")
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError(
            f"model.autoencoder.z_channels={cfg.z_channels} and embed_dim={cfg.embed_dim} differ; "
            f"diffusers.AutoencoderKL has one latent_channels for both, so only z_channels == embed_dim "
            f"converts")


def diffusers_vae_config(cfg: AutoencoderConfig) -> dict:
    """Keyword arguments for ``diffusers.AutoencoderKL`` (kind ``vq``: ``diffusers.VQModel``) with the
    architecture of ``cfg``.

    Levels whose resolution is in ``attn_resolutions`` become ``AttnDownEncoderBlock2D`` /
    ``AttnUpDecoderBlock2D`` (one single-head attention after each resnet, as CompVis).
    """
    _check_representable(cfg)
    if cfg.dropout > 0:
        warnings.warn(f"model.autoencoder.dropout={cfg.dropout} is not representable in "
                      f"diffusers.AutoencoderKL (always 0); the exported model is for inference")
    attn = _level_has_attn(cfg)
    if cfg.kind == "vq":
        return dict(
            in_channels=cfg.in_channels, out_channels=cfg.out_ch,
            down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
            up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)),
            block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
            act_fn="silu", latent_channels=cfg.z_channels, num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim,
            norm_num_groups=32, sample_size=cfg.resolution, scaling_factor=cfg.scale_factor, norm_type="group",
            lookup_from_codebook=False, force_upcast=False)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.embed_dim,
        norm_num_groups=32,
        sample_size=cfg.resolution,
        scaling_factor=cfg.scale_factor,
        # Stock SD VAE configs carry shift_factor None; diffusers pipelines treat None as no shift.
        shift_factor=cfg.shift_factor if cfg.shift_factor != 0.0 else None,
    )


def vae_to_diffusers(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig
                     ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """CompVis-layout state dict -> ``diffusers.AutoencoderKL`` state dict."""
    _check_representable(cfg)
    return vae_keymap(cfg).to_theirs(sd)


def vae_from_diffusers(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig
                       ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """``diffusers.AutoencoderKL`` state dict -> CompVis-layout state dict."""
    _check_representable(cfg)
    return vae_keymap(cfg).to_ours(sd)


def fold_latent_affine(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """CompVis-layout weights whose own latent is this model's diffusion latent ``(z - shift) * scale``:
    the affine map is folded into the 1x1 ``quant_conv`` (kind ``kl``: the posterior mean scaled and
    shifted, the log-variance raised by ``2 ln scale``; kind ``vq``: the latent and the codebook alike,
    which keeps every nearest code) and ``post_quant_conv`` (input divided by ``scale``, the shift moved
    into the bias). For pipelines that decode a latent as it is, with no ``scaling_factor`` (diffusers'
    ``LDMSuperResolutionPipeline``); exact up to float rounding. ``unfold_latent_affine`` inverts it."""
    return _affine(sd, cfg, inverse=False)


def unfold_latent_affine(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``fold_latent_affine``: weights whose latent is the diffusion latent -> weights of
    the posterior ``z`` that this model's ``scale_factor``/``shift_factor`` map to that latent. Exact for
    any configured scale and shift (up to float rounding): the composed model computes the same latent."""
    return _affine(sd, cfg, inverse=True)


def _affine(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig, *, inverse: bool) -> dict[str, torch.Tensor]:
    scale, shift, e = float(cfg.scale_factor), float(cfg.shift_factor), cfg.embed_dim
    out = dict(sd)
    new: dict[str, torch.Tensor] = {}
    qw, qb = sd["quant_conv.weight"].double().clone(), sd["quant_conv.bias"].double().clone()  # (E or 2E, C, 1, 1)
    if inverse:  # latent = (z - shift) * scale  ->  z = latent / scale + shift
        qw[:e] /= scale
        qb[:e] = qb[:e] / scale + shift
        qb[e:] -= 2.0 * math.log(scale)  # kl's log-variance rows; none for vq
    else:
        qw[:e] *= scale
        qb[:e] = (qb[:e] - shift) * scale
        qb[e:] += 2.0 * math.log(scale)
    new["quant_conv.weight"], new["quant_conv.bias"] = qw, qb
    if "quantize.embedding.weight" in sd:  # (K, E): the codes move with the latent
        codes = sd["quantize.embedding.weight"].double()
        new["quantize.embedding.weight"] = codes / scale + shift if inverse else (codes - shift) * scale
    # The folded post_quant_conv on a latent equals ours on latent / scale + shift:
    # W' = W / scale, b' = b + shift * sum_in(W).
    pw, pb = sd["post_quant_conv.weight"].double(), sd["post_quant_conv.bias"].double()  # (Z, E, 1, 1), (Z,)
    ours_w = pw * scale if inverse else pw  # W
    new["post_quant_conv.weight"] = ours_w if inverse else ours_w / scale
    shift_term = shift * ours_w[:, :, 0, 0].sum(dim=1)
    new["post_quant_conv.bias"] = pb - shift_term if inverse else pb + shift_term
    out.update({k: v.to(sd[k].dtype) for k, v in new.items()})
    return out
