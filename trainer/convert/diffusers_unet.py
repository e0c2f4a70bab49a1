"""Our (CompVis-layout) UNet <-> diffusers ``UNet2DConditionModel`` (conditional) or ``UNet2DModel``
(unconditional, ``context_dim=None``: CompVis ``AttentionBlock`` <-> diffusers ``Attention`` with
``group_norm``, see ``unet2d_to_diffusers``).

The key map is built from the ``UNetConfig`` alone, so it covers every block the config creates; a
key outside it is reported, never dropped. Mapping per level ``L`` (R = num_res_blocks):

- ``input_blocks.0.0`` -> ``conv_in``; ``input_blocks.{1 + L(R+1) + j}`` -> ``down_blocks.L.{resnets,attentions}.j``;
  ``input_blocks.{(L+1)(R+1)}.0.op`` -> ``down_blocks.L.downsamplers.0.conv``
- ``middle_block.{0,1,2}`` -> ``mid_block.{resnets.0, attentions.0, resnets.1}``
- ``output_blocks.{i(R+1) + j}`` -> ``up_blocks.i.{resnets,attentions}.j`` (i = reversed level),
  the Upsample of the last one -> ``up_blocks.i.upsamplers.0.conv``
- ``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``; ``out.{0,2}`` -> ``conv_norm_out``, ``conv_out``

Inside transformers the names already agree (diffusers took them from CompVis); in ResBlocks
``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection`` are diffusers'
``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``. Both sides use the
same tensor shapes (1x1 convs in SD v1, Linear in SD v2), so every row is the identity.
"""

from __future__ import annotations

import torch

from trainer.convert.keymap import CONV1D_TO_LINEAR, ConversionReport, KeyMap
from trainer.models.unet import UNetConfig

_TRANSFORMER_BLOCK_MODULES = (
    ("norm1", ("weight", "bias")), ("attn1.to_q", ("weight",)), ("attn1.to_k", ("weight",)),
    ("attn1.to_v", ("weight",)), ("attn1.to_out.0", ("weight", "bias")),
    ("norm2", ("weight", "bias")), ("attn2.to_q", ("weight",)), ("attn2.to_k", ("weight",)),
    ("attn2.to_v", ("weight",)), ("attn2.to_out.0", ("weight", "bias")),
    ("norm3", ("weight", "bias")), ("ff.net.0.proj", ("weight", "bias")),
    ("ff.net.2", ("weight", "bias")),
)


def _resblock_map(ours: str, theirs: str, has_skip_conv: bool) -> KeyMap:
    km = KeyMap()
    km.add_module(f"{ours}.in_layers.0", f"{theirs}.norm1")
    km.add_module(f"{ours}.in_layers.2", f"{theirs}.conv1")
    km.add_module(f"{ours}.emb_layers.1", f"{theirs}.time_emb_proj")
    km.add_module(f"{ours}.out_layers.0", f"{theirs}.norm2")
    km.add_module(f"{ours}.out_layers.3", f"{theirs}.conv2")
    if has_skip_conv:
        km.add_module(f"{ours}.skip_connection", f"{theirs}.conv_shortcut")
    return km


def _transformer_map(ours: str, theirs: str, depth: int) -> KeyMap:
    km = KeyMap()
    for name in ("norm", "proj_in", "proj_out"):
        km.add_module(f"{ours}.{name}", f"{theirs}.{name}")
    for d in range(depth):
        for name, params in _TRANSFORMER_BLOCK_MODULES:
            km.add_module(f"{ours}.transformer_blocks.{d}.{name}",
                          f"{theirs}.transformer_blocks.{d}.{name}", params)
    return km


def _attention_block_map(ours: str, theirs: str) -> KeyMap:
    """An unconditional UNet's ``AttentionBlock`` but its fused ``qkv`` (split by ``_split_qkv``)."""
    km = KeyMap()
    km.add_module(f"{ours}.norm", f"{theirs}.group_norm")
    km.add_module(f"{ours}.proj_out", f"{theirs}.to_out.0", transform=CONV1D_TO_LINEAR)
    return km


def unet_keymap(cfg: UNetConfig) -> KeyMap:
    """Rows (our key, diffusers key) for every parameter of ``UNetModel(cfg)`` (for an unconditional
    UNet, all but the attention blocks' ``qkv``)."""
    km = KeyMap()
    R = cfg.num_res_blocks
    depth = cfg.transformer_depth
    channels = cfg.level_channels
    num_levels = len(channels)
    km.add_module("time_embed.0", "time_embedding.linear_1")
    km.add_module("time_embed.2", "time_embedding.linear_2")
    km.add_module("input_blocks.0.0", "conv_in")
    def attention_map(ours: str, theirs: str) -> KeyMap:
        if cfg.context_dim is None:
            return _attention_block_map(ours, theirs)
        return _transformer_map(ours, theirs, depth)

    ch = cfg.model_channels
    skip_channels = [ch]
    for level, (out_ch, ds) in enumerate(zip(channels, cfg.downsample_factors)):
        has_attn = ds in cfg.attention_resolutions
        for j in range(R):
            ours = f"input_blocks.{1 + level * (R + 1) + j}"
            theirs = f"down_blocks.{level}"
            km.extend(_resblock_map(f"{ours}.0", f"{theirs}.resnets.{j}", ch != out_ch))
            ch = out_ch
            if has_attn:
                km.extend(attention_map(f"{ours}.1", f"{theirs}.attentions.{j}"))
            skip_channels.append(ch)
        if level != num_levels - 1:
            km.add_module(f"input_blocks.{(level + 1) * (R + 1)}.0.op",
                          f"down_blocks.{level}.downsamplers.0.conv")
            skip_channels.append(ch)

    km.extend(_resblock_map("middle_block.0", "mid_block.resnets.0", False))
    km.extend(attention_map("middle_block.1", "mid_block.attentions.0"))
    km.extend(_resblock_map("middle_block.2", "mid_block.resnets.1", False))

    for i, level in enumerate(reversed(range(num_levels))):
        out_ch, ds = channels[level], cfg.downsample_factors[level]
        has_attn = ds in cfg.attention_resolutions
        for j in range(R + 1):
            ours = f"output_blocks.{i * (R + 1) + j}"
            theirs = f"up_blocks.{i}"
            in_ch = ch + skip_channels.pop()
            km.extend(_resblock_map(f"{ours}.0", f"{theirs}.resnets.{j}", in_ch != out_ch))
            ch = out_ch
            if has_attn:
                km.extend(attention_map(f"{ours}.1", f"{theirs}.attentions.{j}"))
            if level and j == R:
                km.add_module(f"{ours}.{2 if has_attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")

    km.add_module("out.0", "conv_norm_out")
    km.add_module("out.2", "conv_out")
    return km


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """Keyword arguments for ``diffusers.UNet2DConditionModel`` that build the same network.

    diffusers' ``attention_head_dim`` is, for historical reasons, the number of heads
    (huggingface/diffusers#2011): ``num_attention_heads = attention_head_dim`` and each transformer
    uses ``channels // num_attention_heads`` as head width. A fixed ``num_heads`` (SD v1) is passed
    as an int; a fixed ``num_head_channels`` (SD v2) becomes per-level head counts, e.g.
    [5, 10, 20, 20] for 320 x [1, 2, 4, 4] channels at width 64. The middle block uses the last
    entry, as CompVis uses the last level's width.

    Every ``UNetConfig`` that passes validation is expressible: attention is chosen per level
    (``CrossAttn*Block2D`` vs ``*Block2D``), the middle block always has a transformer on both sides,
    and CompVis passes no dropout to its transformers, as diffusers' blocks do not.
    """
    _check_expressible(cfg)
    has_attn = [ds in cfg.attention_resolutions for ds in cfg.downsample_factors]
    if cfg.num_heads > 0:
        heads: int | list[int] = cfg.num_heads
    else:
        # Levels without attention never read their entry (except the last, for the middle block,
        # which validation guarantees is divisible); keep them positive for diffusers' checks.
        heads = [max(1, ch // cfg.num_head_channels) for ch in cfg.level_channels]
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        flip_sin_to_cos=True,  # CompVis timestep_embedding is cat[cos, sin]
        freq_shift=0,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        block_out_channels=tuple(cfg.level_channels),
        layers_per_block=cfg.num_res_blocks,
        downsample_padding=1,
        mid_block_scale_factor=1,
        dropout=cfg.dropout,
        act_fn="silu",
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=1e-5,  # CompVis GroupNorm32 default; transformer norms use 1e-6 on both sides
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=heads,
        use_linear_projection=cfg.use_linear_in_transformer,
        upcast_attention=False,
    )


def _check_expressible(cfg: UNetConfig) -> None:
    if not isinstance(cfg, UNetConfig):
        raise ValueError(f"cfg is a {type(cfg).__name__}; expected a UNetConfig")
    for ch in cfg.level_channels:
        heads, dim_head = cfg.heads_and_dim(ch)
        if ch in _attention_channels(cfg) and heads * dim_head != ch:
            # diffusers derives the head width as channels // heads; CompVis could build a
            # narrower inner width here, which diffusers has no parameter for.
            raise ValueError(f"unet.num_heads={cfg.num_heads} / num_head_channels="
                             f"{cfg.num_head_channels} give {heads} x {dim_head} != {ch} channels; "
                             f"diffusers needs heads x head width == channels")


def _attention_channels(cfg: UNetConfig) -> set[int]:
    return ({ch for ch, ds in zip(cfg.level_channels, cfg.downsample_factors)
             if ds in cfg.attention_resolutions} | {cfg.level_channels[-1]})


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig
                      ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our state dict -> diffusers ``UNet2DConditionModel`` state dict (tensors shared, not copied)."""
    _check_expressible(cfg)
    return unet_keymap(cfg).to_theirs(state_dict)


def unet_from_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig
                        ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """diffusers ``UNet2DConditionModel`` state dict -> ours (tensors shared, not copied)."""
    _check_expressible(cfg)
    return unet_keymap(cfg).to_ours(state_dict)


# ----------------------------------------------------------------------------- unconditional: UNet2DModel


def _check_unconditional(cfg: UNetConfig) -> None:
    if cfg.context_dim is not None:
        raise ValueError(f"unet.context_dim={cfg.context_dim}: UNet2DModel is the unconditional UNet "
                         f"(context_dim=null); a conditional UNet converts to UNet2DConditionModel")
    if cfg.num_head_channels <= 0 and len({ch // cfg.num_heads for ch in _attention_channels(cfg)}) > 1:
        # UNet2DModel takes one head width (attention_head_dim) for every block.
        raise ValueError(f"unet.num_heads={cfg.num_heads} gives a different head width per level "
                         f"{sorted(_attention_channels(cfg))}; UNet2DModel needs one: set unet.num_head_channels")


def _head_width(cfg: UNetConfig) -> int:
    return cfg.heads_and_dim(cfg.level_channels[-1])[1]


def diffusers_unet2d_config(cfg: UNetConfig) -> dict:
    """Keyword arguments for ``diffusers.UNet2DModel`` that build the same unconditional network:
    ``Attn*Block2D`` where CompVis has an ``AttentionBlock`` (``attention_head_dim`` is the head width
    here, unlike UNet2DConditionModel's), positional timesteps as cat[cos, sin]."""
    _check_unconditional(cfg)
    has_attn = [ds in cfg.attention_resolutions for ds in cfg.downsample_factors]
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        block_out_channels=tuple(cfg.level_channels),
        layers_per_block=cfg.num_res_blocks,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type="conv",
        upsample_type="conv",
        dropout=cfg.dropout,
        act_fn="silu",
        attention_head_dim=_head_width(cfg),
        norm_num_groups=cfg.norm_num_groups,
        attn_norm_num_groups=None,
        norm_eps=1e-5,
        resnet_time_scale_shift="default",
        add_attention=True,
    )


def _qkv_keys(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our block prefix, their attention prefix, transform) of every attention block: the prefixes
    the key map gives ``norm`` / ``group_norm``."""
    out = []
    for ours, theirs, transform in unet_keymap(cfg).rows:
        if ours.endswith(".norm.weight") and theirs.endswith(".group_norm.weight"):
            out.append((ours[:-len(".norm.weight")], theirs[:-len(".group_norm.weight")], transform))
    return out


def unet2d_to_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig
                        ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our unconditional UNet's state dict -> diffusers ``UNet2DModel``'s. CompVis' fused ``qkv`` (a
    1x1 conv1d to 3C, head-major: head h's rows are its q, k, v of width D, ``QKVAttentionLegacy``)
    becomes ``to_q`` / ``to_k`` / ``to_v`` Linear layers."""
    _check_unconditional(cfg)
    rest = {k: v for k, v in state_dict.items() if ".qkv." not in k}
    out, report = unet_keymap(cfg).to_theirs(rest)
    dim = _head_width(cfg)
    for ours, theirs, _ in _qkv_keys(cfg):
        for param in ("weight", "bias"):
            key = f"{ours}.qkv.{param}"
            if key not in state_dict:
                report.missing.append(key)
                continue
            t = state_dict[key]  # (3C, C, 1) / (3C,)
            channels = t.shape[0] // 3
            heads = t.reshape(channels // dim, 3, dim, *t.shape[1:2])  # (H, 3, D[, C])
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{theirs}.{name}.{param}"] = heads[:, i].reshape(channels, *t.shape[1:2]).contiguous()
    report.unexpected += sorted(k for k in state_dict if ".qkv." in k and k.rsplit(".qkv.", 1)[0]
                                not in {o for o, _, _ in _qkv_keys(cfg)})
    return out, report


def unet2d_from_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig
                          ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """diffusers ``UNet2DModel`` state dict -> ours (``to_q/k/v`` fused back into ``qkv``)."""
    _check_unconditional(cfg)
    split = (".to_q.", ".to_k.", ".to_v.")
    rest = {k: v for k, v in state_dict.items() if not any(s in k for s in split)}
    out, report = unet_keymap(cfg).to_ours(rest)
    dim = _head_width(cfg)
    for ours, theirs, _ in _qkv_keys(cfg):
        for param in ("weight", "bias"):
            keys = [f"{theirs}.{name}.{param}" for name in ("to_q", "to_k", "to_v")]
            if not all(k in state_dict for k in keys):
                report.missing += [k for k in keys if k not in state_dict]
                continue
            q, k, v = (state_dict[key] for key in keys)  # (C, C) / (C,)
            channels = q.shape[0]
            fused = torch.stack([t.reshape(channels // dim, dim, *t.shape[1:]) for t in (q, k, v)], 1)  # (H, 3, D[, C])
            fused = fused.reshape(3 * channels, *q.shape[1:])
            out[f"{ours}.qkv.{param}"] = fused[..., None].contiguous() if param == "weight" else fused.contiguous()
    known = {f"{t}{s}{p}" for _, t, _ in _qkv_keys(cfg) for s in split for p in ("weight", "bias")}
    report.unexpected += sorted(k for k in state_dict if any(s in k for s in split) and k not in known)
    return out, report
