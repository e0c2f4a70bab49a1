"""Frozen OpenCLIP text tower: ours (``trainer.models.text_encoders.FrozenOpenCLIPTextEncoder``, whose
parameters are open_clip's ``TextTransformer`` under ``model.``) <-> transformers ``CLIPTextModel``,
the ``text_encoder`` of a diffusers ``StableDiffusionPipeline`` (Stable Diffusion v2: ViT-H/14).

Their keys are the layout of a ``text_encoder/model.safetensors`` on disk: ``text_model.*``, plus
``text_projection.weight`` for ``CLIPTextModelWithProjection``. transformers 4.x holds ``CLIPTextModel``
under these names in memory; 5.x drops the ``text_model.`` prefix in memory and strips it when
``from_pretrained`` reads a file (``conversion_mapping.py``: ``PrefixChange("text_model")``), so files
written with these keys load in both. Differences the map handles, as diffusers
``convert_open_clip_checkpoint`` (``loaders/single_file_utils.py``):

- names: ``token_embedding`` / ``positional_embedding`` -> ``embeddings.{token,position}_embedding``;
  per block ``ln_1/ln_2`` -> ``layer_norm1/2``, ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``,
  ``attn.out_proj`` -> ``self_attn.out_proj``; ``ln_final`` -> ``final_layer_norm``.
- ``attn.in_proj_weight`` (3D, D) / ``in_proj_bias`` (3D,) of ``nn.MultiheadAttention`` are q, k, v
  stacked in that order; they split into ``self_attn.{q,k,v}_proj``. The map's rows name the thirds
  ``...in_proj_weight#q`` etc.; the converters split and join (``torch.cat`` of the split thirds
  gives the original tensor bit for bit).
- ``text_projection`` (D, E), applied as ``pooled @ P``, is ``nn.Linear(D, E, bias=False).weight =
  P.T`` (row ``model.text_projection#T``). Only ``CLIPTextModelWithProjection`` has it.

Layer readout. ``CLIPTextModel.last_hidden_state`` is ``final_layer_norm`` after all
``num_hidden_layers`` layers, and ``StableDiffusionPipeline`` (no ``clip_skip``) feeds it to the UNet.
Ours is ``ln_final`` after all blocks (``layer="last"``) or after all but the last
(``"penultimate"``, Stability ``FrozenOpenCLIPEmbedder``). So ``"penultimate"`` exports
``num_hidden_layers = layers - 1`` without the last block and keeps ``ln_final`` as
``final_layer_norm``: the Stable Diffusion 2 text_encoder (23 of ViT-H/14's 24 layers; diffusers skips
``resblocks.23`` in ``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``).

What ``CLIPTextModel`` cannot hold, left out on export and listed in ``report.dropped`` (our keys):
the last block under ``"penultimate"`` (never used by that readout), and ``text_projection`` unless
``with_projection=True`` (ours reads tokens, never the pooled projection). On import these keys are
made as zeros, so the result loads strictly into our module, and listed in ``report.filled``. An
all-zero pre-norm block is the identity (LayerNorm with zero gain and bias gives 0, q=k=v=0 and
both output projections give 0, GELU(0)=0), so an imported tower reads out the same under ``"last"``
and ``"penultimate"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from trainer.convert.keymap import ConversionReport, KeyMap
from trainer.models.text_encoders import (CLIP_BPE_VOCAB_SIZE, TextEncoderConfig,
                                          _check_open_clip_text_cfg, open_clip_model_config)

THEIRS = "text_model."
STALE_POSITION_IDS = f"{THEIRS}embeddings.position_ids"
OURS = "model."
# Token ids of our CLIPBPETokenizer (open_clip SimpleTokenizer): <start_of_text>, <end_of_text>, and the
# 0 it pads with. With eos_token_id 49407 (not the legacy 2) CLIPTextModel pools the first
# <end_of_text>, the token open_clip's argmax pooling picks (it is the largest id).
BOS_TOKEN_ID = CLIP_BPE_VOCAB_SIZE - 2
EOS_TOKEN_ID = CLIP_BPE_VOCAB_SIZE - 1
PAD_TOKEN_ID = 0
# The CLIPTextConfig keys that decide ``last_hidden_state``; the others (token ids, projection_dim)
# only touch the pooled output. The SD 2 text_encoder configs on the hub say bos 0, eos 2, pad 1,
# projection_dim 512, so a check of a published config.json should compare these keys only.
CLIP_TEXT_ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_hidden_layers", "max_position_embeddings", "hidden_act", "layer_norm_eps")
_QKV = ("q", "k", "v")
_PART = "#"  # our key + "#q"/"#k"/"#v": a third of in_proj; + "#T": the transposed text projection
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                 "scale_fc")


@dataclass
class CLIPTextConversionReport(ConversionReport):
    """``ConversionReport`` plus ``filled``: our keys an import made as zeros because their layout has
    no place for them (see the module docstring). On export ``dropped`` lists our keys left out."""

    filled: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Tower:
    """The sizes of an open_clip text tower that the conversion needs."""

    vocab_size: int
    context_length: int
    width: int
    heads: int
    layers: int
    mlp_width: int
    embed_dim: int
    quick_gelu: bool
    layer_norm_eps: float
    projection: Optional[str]  # None, "param" ((D, E) nn.Parameter) or "linear_bias" (nn.Linear)
    pool_type: str
    penultimate: bool

    @property
    def num_exported_layers(self) -> int:
        return self.layers - 1 if self.penultimate else self.layers


def _tower(cfg: TextEncoderConfig, model_cfg: Optional[dict]) -> _Tower:
    """Sizes of ``cfg``'s tower (``model_cfg`` replaces the bundled config of ``cfg.arch``, as in
    ``FrozenOpenCLIPTextEncoder``); ValueError for a tower ``CLIPTextModel`` cannot express."""
    if cfg.kind != "open_clip":
        raise ValueError(f"model.text_encoder.kind={cfg.kind!r}: only kind 'open_clip' converts to "
                         f"transformers CLIPTextModel (kind 'ldm_bert' converts to LDMBertModel).")
    where = "model.text_encoder.arch"
    if model_cfg is None:
        model_cfg = open_clip_model_config(cfg.arch)
        if model_cfg is None:
            raise ValueError(f"{where}={cfg.arch!r} is not a model config bundled with open_clip.")
    _check_open_clip_text_cfg(cfg.arch, model_cfg, where)
    text = dict(model_cfg.get("text_cfg", {}))
    unsupported = [f"text_cfg.{k}={text[k]!r}" for k in _CUSTOM_BLOCK if text.get(k)]
    if text.get("block_type") not in (None, "default"):
        unsupported.append(f"text_cfg.block_type={text['block_type']!r}")
    if text.get("ls_init_value") is not None:
        unsupported.append(f"text_cfg.ls_init_value={text['ls_init_value']!r} (LayerScale)")
    if text.get("act_kwargs"):
        unsupported.append(f"text_cfg.act_kwargs={text['act_kwargs']!r}")
    norm_kwargs = dict(text.get("norm_kwargs") or {})
    eps = float(norm_kwargs.pop("eps", 1e-5))  # torch nn.LayerNorm default, as open_clip LayerNorm
    if norm_kwargs:
        unsupported.append(f"text_cfg.norm_kwargs={text['norm_kwargs']!r} (only eps maps)")
    if unsupported:
        raise ValueError(f"{where}={cfg.arch!r}: its text tower sets {', '.join(unsupported)}, which "
                         f"transformers CLIPTextModel cannot express; allowed: the plain pre-norm "
                         f"CLIP text transformer (e.g. ViT-L-14, ViT-H-14, ViT-bigG-14).")
    width = text.get("width", 512)
    embed_dim = model_cfg.get("embed_dim") or 0
    if text.get("proj_type", "linear") == "none" or not embed_dim:
        projection = None
    else:
        projection = "linear_bias" if text.get("proj_bias") else "param"
    layers = text.get("layers", 12)
    penultimate = cfg.layer == "penultimate"
    if penultimate and layers < 2:
        raise ValueError(f"model.text_encoder.layer='penultimate' needs at least 2 blocks; "
                         f"{cfg.arch} has {layers}.")
    return _Tower(vocab_size=text.get("vocab_size", 49408), context_length=text.get("context_length", 77),
                  width=width, heads=text.get("heads", 8), layers=layers,
                  mlp_width=int(width * text.get("mlp_ratio", 4.0)), embed_dim=embed_dim,
                  quick_gelu=bool(model_cfg.get("quick_gelu", False)), layer_norm_eps=eps,
                  projection=projection, pool_type=text.get("pool_type", "argmax"),
                  penultimate=penultimate)


def _check_projection(tower: _Tower, arch: str) -> None:
    """``with_projection=True``: ``CLIPTextModelWithProjection`` has a bias-free projection of the
    first <end_of_text> state."""
    if tower.projection is None:
        raise ValueError(f"with_projection=True: model.text_encoder.arch={arch!r} has no text projection.")
    if tower.projection == "linear_bias":
        raise ValueError(f"with_projection=True: model.text_encoder.arch={arch!r} has a text projection "
                         f"with bias (text_cfg.proj_bias); CLIPTextModelWithProjection's has none.")
    if tower.pool_type != "argmax":
        raise ValueError(f"with_projection=True: model.text_encoder.arch={arch!r} pools with "
                         f"text_cfg.pool_type={tower.pool_type!r}; CLIPTextModelWithProjection pools the "
                         f"first <end_of_text>, which equals open_clip's pool_type 'argmax' only.")


def _projection_keys(tower: _Tower) -> list[str]:
    if tower.projection == "param":
        return [f"{OURS}text_projection"]
    if tower.projection == "linear_bias":
        return [f"{OURS}text_projection.weight", f"{OURS}text_projection.bias"]
    return []


def _block_shapes(tower: _Tower) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one ``ResidualAttentionBlock`` (names relative to the block)."""
    d, m = tower.width, tower.mlp_width
    return {"ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
            "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (m, d), "mlp.c_fc.bias": (m,),
            "mlp.c_proj.weight": (d, m), "mlp.c_proj.bias": (d,)}


def _not_exported(tower: _Tower, with_projection: bool) -> dict[str, tuple[int, ...]]:
    """Our keys (with shapes) that the exported ``CLIPTextModel`` has no place for."""
    out: dict[str, tuple[int, ...]] = {}
    if tower.penultimate:
        last = f"{OURS}transformer.resblocks.{tower.layers - 1}."
        out.update({last + k: s for k, s in _block_shapes(tower).items()})
    if not with_projection:
        d, e = tower.width, tower.embed_dim
        shapes = {"param": [(d, e)], "linear_bias": [(e, d), (e,)]}.get(tower.projection, [])
        out.update(zip(_projection_keys(tower), shapes))
    return out


def clip_text_keymap(cfg: TextEncoderConfig, model_cfg: Optional[dict] = None, *,
                     with_projection: bool = False) -> KeyMap:
    """Rows (our key, transformers key) for every exported parameter of ``cfg``'s tower. Rows over a
    third of ``in_proj`` or the transposed ``text_projection`` name our key with a ``#`` suffix (see the
    module docstring); ``clip_text_to_transformers``/``clip_text_from_transformers`` apply them."""
    tower = _tower(cfg, model_cfg)
    if with_projection:
        _check_projection(tower, cfg.arch)
    km = KeyMap()
    km.add(f"{OURS}token_embedding.weight", f"{THEIRS}embeddings.token_embedding.weight")
    km.add(f"{OURS}positional_embedding", f"{THEIRS}embeddings.position_embedding.weight")
    for i in range(tower.num_exported_layers):
        ours, theirs = f"{OURS}transformer.resblocks.{i}", f"{THEIRS}encoder.layers.{i}"
        km.add_module(f"{ours}.ln_1", f"{theirs}.layer_norm1")
        for p in _QKV:
            km.add(f"{ours}.attn.in_proj_weight{_PART}{p}", f"{theirs}.self_attn.{p}_proj.weight")
            km.add(f"{ours}.attn.in_proj_bias{_PART}{p}", f"{theirs}.self_attn.{p}_proj.bias")
        km.add_module(f"{ours}.attn.out_proj", f"{theirs}.self_attn.out_proj")
        km.add_module(f"{ours}.ln_2", f"{theirs}.layer_norm2")
        km.add_module(f"{ours}.mlp.c_fc", f"{theirs}.mlp.fc1")
        km.add_module(f"{ours}.mlp.c_proj", f"{theirs}.mlp.fc2")
    km.add_module(f"{OURS}ln_final", f"{THEIRS}final_layer_norm")
    if with_projection:
        km.add(f"{OURS}text_projection{_PART}T", "text_projection.weight")
    return km


def clip_text_config(cfg: TextEncoderConfig, model_cfg: Optional[dict] = None) -> dict:
    """Keyword arguments of ``transformers.CLIPTextConfig`` for ``cfg``'s tower as exported:
    ``num_hidden_layers`` is one less than the tower's blocks under ``layer="penultimate"``."""
    tower = _tower(cfg, model_cfg)
    return dict(
        vocab_size=tower.vocab_size,
        hidden_size=tower.width,
        intermediate_size=tower.mlp_width,
        num_attention_heads=tower.heads,
        num_hidden_layers=tower.num_exported_layers,
        max_position_embeddings=tower.context_length,
        # open_clip builds nn.GELU() (exact erf) unless the arch sets quick_gelu (OpenAI's weights:
        # x * sigmoid(1.702 x)); transformers' "gelu" and "quick_gelu" are these two.
        hidden_act="quick_gelu" if tower.quick_gelu else "gelu",
        layer_norm_eps=tower.layer_norm_eps,
        projection_dim=tower.embed_dim or tower.width,
        attention_dropout=0.0,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def _split(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the keymap's row names: ``in_proj`` split in thirds, projection transposed.
    The thirds are copies: safetensors refuses to save tensors that share memory."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            for p, third in zip(_QKV, tensor.chunk(3, dim=0)):
                out[f"{key}{_PART}{p}"] = third.clone()
        elif key == f"{OURS}text_projection" and tensor.ndim == 2:
            out[f"{key}{_PART}T"] = tensor.t().contiguous()  # (D, E) -> (E, D)
        else:
            out[key] = tensor
    return out


def _join(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``_split``. An ``in_proj`` whose thirds are not all there is left out (the absent
    transformers keys are already in the report's ``missing``)."""
    out: dict[str, torch.Tensor] = {}
    thirds: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        base, sep, tag = key.partition(_PART)
        if not sep:
            out[key] = tensor
        elif tag == "T":
            out[base] = tensor.t().contiguous()  # (E, D) -> (D, E)
        else:
            thirds.setdefault(base, {})[tag] = tensor
    for base, parts in thirds.items():
        if set(parts) == set(_QKV):
            out[base] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def clip_text_to_transformers(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig,
                              model_cfg: Optional[dict] = None, *, with_projection: bool = False
                              ) -> tuple[dict[str, torch.Tensor], CLIPTextConversionReport]:
    """Our state dict (``FrozenOpenCLIPTextEncoder.state_dict()``) -> ``CLIPTextModel`` state dict in
    file layout (``CLIPTextModelWithProjection`` with ``with_projection=True``). ``report.dropped``
    lists our keys it has no place for; ``report.missing`` names our keys, ``unexpected`` too."""
    tower = _tower(cfg, model_cfg)
    km = clip_text_keymap(cfg, model_cfg, with_projection=with_projection)
    left_out = _not_exported(tower, with_projection)
    theirs, base = km.to_theirs(_split({k: v for k, v in sd.items() if k not in left_out}))
    missing = sorted({k.partition(_PART)[0] for k in base.missing})
    report = CLIPTextConversionReport(missing=missing, unexpected=base.unexpected,
                                      dropped=sorted(k for k in sd if k in left_out))
    return theirs, report


def clip_text_from_transformers(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig,
                                model_cfg: Optional[dict] = None, *, with_projection: bool = False
                                ) -> tuple[dict[str, torch.Tensor], CLIPTextConversionReport]:
    """``CLIPTextModel`` state dict (file layout ``text_model.*``; with ``with_projection=True`` a
    ``CLIPTextModelWithProjection`` one) -> ours. Keys of ours that it cannot hold are made as zeros
    and listed in ``report.filled``, so the result loads strictly into ``FrozenOpenCLIPTextEncoder``."""
    tower = _tower(cfg, model_cfg)
    km = clip_text_keymap(cfg, model_cfg, with_projection=with_projection)
    # transformers < 4.31 saved the position ids (arange, not a weight) as a persistent buffer; real
    # SD v1 checkpoints carry it. transformers itself ignores it on load; so do we.
    sd = {k: v for k, v in sd.items() if k != STALE_POSITION_IDS}
    rows, base = km.to_ours(sd)
    ours = _join(rows)
    report = CLIPTextConversionReport(missing=base.missing, unexpected=base.unexpected,
                                      dropped=base.dropped)
    reference = sd.get(f"{THEIRS}embeddings.token_embedding.weight")
    like = dict(dtype=reference.dtype, device=reference.device) if reference is not None else {}
    for key, shape in _not_exported(tower, with_projection).items():
        ours[key] = torch.zeros(shape, **like)
        report.filled.append(key)
    report.filled.sort()
    return ours, report
