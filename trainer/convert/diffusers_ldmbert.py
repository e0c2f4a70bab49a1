"""The paper's text transformer: ours (``trainer.models.text_encoders.LDMTextTransformer``) <->
diffusers ``LDMBertModel`` (``diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion``), the
text encoder of the ``CompVis/ldm-text2im-large-256`` pipeline.

Differences the map handles:
- diffusers nests the encoder as ``model.`` and names BART-style: ``embed_tokens``,
  ``embed_positions``, ``self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``final_layer_norm``
  (the feed-forward's pre-norm), ``layer_norm`` (the final norm).
- ``to_logits``: ``LDMBertModel`` always builds Linear(width, vocab_size), as CompVis
  ``TransformerWrapper`` does, and neither ever calls it (the pipeline reads the encoder output).
  We do not build it. Export writes it as zeros (shaped like the token embedding) so a
  ``LDMBertModel`` loads strictly and nobody mistakes it for a trained head; import drops it and
  lists it in ``ConversionReport.dropped``, not ``unexpected``.
Both sides compute the same function: pre-norm layers, q/k/v without bias, scale ``dim_head**-0.5``,
exact GELU, no attention mask. ``LDMBertConfig`` defaults to ``dropout=0.1``; the config written
here sets every dropout to 0 as in CompVis BERTEmbedder.
"""

from __future__ import annotations

import torch

from trainer.convert.keymap import ConversionReport, KeyMap
from trainer.models.text_encoders import TextEncoderConfig

_ATTN = (("to_q", "q_proj", ("weight",)), ("to_k", "k_proj", ("weight",)),
         ("to_v", "v_proj", ("weight",)), ("to_out", "out_proj", ("weight", "bias")))


def _check_kind(cfg: TextEncoderConfig) -> None:
    if cfg.kind != "ldm_bert":
        raise ValueError(f"model.text_encoder.kind={cfg.kind!r}: only kind 'ldm_bert' converts to "
                         f"diffusers LDMBertModel")


def ldmbert_keymap(cfg: TextEncoderConfig) -> KeyMap:
    """Rows (our key, diffusers key) for every parameter of ``cfg``'s text transformer."""
    _check_kind(cfg)
    km = KeyMap()
    km.add("token_embedding.weight", "model.embed_tokens.weight")
    km.add("position_embedding.weight", "model.embed_positions.weight")
    for i in range(cfg.depth):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        km.add_module(f"{ours}.attn_norm", f"{theirs}.self_attn_layer_norm")
        for o, t, params in _ATTN:
            km.add_module(f"{ours}.attn.{o}", f"{theirs}.self_attn.{t}", params)
        km.add_module(f"{ours}.ff_norm", f"{theirs}.final_layer_norm")
        km.add_module(f"{ours}.ff.fc1", f"{theirs}.fc1")
        km.add_module(f"{ours}.ff.fc2", f"{theirs}.fc2")
    km.add_module("final_norm", "model.layer_norm")
    # to_logits.weight is (vocab_size, width), the token embedding's shape.
    km.add_theirs_only("to_logits.weight", "token_embedding.weight", torch.zeros_like)
    km.add_theirs_only("to_logits.bias", "token_embedding.weight",
                       lambda emb: emb.new_zeros(emb.shape[0]))
    return km


def diffusers_ldmbert_config(cfg: TextEncoderConfig) -> dict:
    """Keyword arguments of ``LDMBertConfig`` for ``cfg``."""
    _check_kind(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_length,
        encoder_layers=cfg.depth,
        encoder_ffn_dim=cfg.ff_mult * cfg.width,
        encoder_attention_heads=cfg.num_heads,
        head_dim=cfg.dim_head,
        d_model=cfg.width,
        activation_function="gelu",  # transformers' exact (erf) GELU, as nn.GELU() in x-transformers
        encoder_layerdrop=0.0,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        scale_embedding=False,
        pad_token_id=0,  # [PAD] of bert-base-uncased; LDMBertModel masks nothing by it
    )


def ldmbert_to_diffusers(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig
                         ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our state dict -> ``LDMBertModel`` state dict (tensors shared, not copied; ``to_logits`` made
    as zeros)."""
    return ldmbert_keymap(cfg).to_theirs(sd)


def ldmbert_from_diffusers(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig
                           ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """``LDMBertModel`` state dict -> ours (``to_logits`` listed in ``report.dropped``)."""
    return ldmbert_keymap(cfg).to_ours(sd)
