"""Frozen OpenCLIP text tower <-> transformers CLIPTextModel (trainer.convert.clip_text): the exported
``text_encoder`` computes the UNet context our tower computes (last and penultimate readout), loaded
as ``StableDiffusionPipeline`` loads it (``from_pretrained`` of a folder) and strictly; the round trip
is bitwise; towers CLIPTextModel cannot express are refused."""

import pytest
import torch
from safetensors.torch import save_file

from trainer.convert.clip_text import (BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, clip_text_config,
                                       clip_text_from_transformers, clip_text_keymap,
                                       clip_text_to_transformers)
from trainer.models.text_encoders import (FrozenOpenCLIPTextEncoder, TextEncoderConfig,
                                          build_text_encoder)

# The smallest open_clip arch with the plain CLIP text tower: width 256, 4 heads, 10 blocks (20.6M).
ARCH = "ViT-S-16-alt"
NUM_BLOCKS = 10
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "a red cube " * 40]  # last one truncated
# A tiny tower with OpenAI's QuickGELU (their ViT-L/14 weights), as a model_cfg override.
TINY_QUICKGELU = {
    "embed_dim": 24, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


def _cfg(layer: str, arch: str = ARCH) -> TextEncoderConfig:
    return TextEncoderConfig(kind="open_clip", trainable=False, arch=arch, layer=layer)


@pytest.fixture(scope="module")
def towers():
    """{layer: encoder} sharing one set of random weights, and the tokens of PROMPTS."""
    torch.manual_seed(0)
    last, tok = build_text_encoder(_cfg("last"), allow_random_init=True)
    pen, _ = build_text_encoder(_cfg("penultimate"), allow_random_init=True, build_tokenizer=False)
    pen.load_state_dict(last.state_dict())
    return {"last": last, "penultimate": pen}, tok, tok(PROMPTS)


def _in_memory(model: torch.nn.Module, sd: dict) -> dict:
    """File layout -> the module's own names: transformers 5 holds CLIPTextModel without the
    ``text_model.`` prefix (and strips it in from_pretrained); 4.x keeps it."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _clip_text_model(cfg, sd, model_cfg=None, hidden_act=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    kwargs = clip_text_config(cfg, model_cfg)
    if hidden_act is not None:
        kwargs["hidden_act"] = hidden_act
    model = CLIPTextModel(CLIPTextConfig(**kwargs)).eval()
    model.load_state_dict(_in_memory(model, sd), strict=True)
    return model


# ---------------------------------------------------------------------------------------------------
# Config


def test_sd2_vit_h_config_drops_one_layer_for_penultimate():
    pen = clip_text_config(_cfg("penultimate", "ViT-H-14"))
    assert pen == dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                       num_hidden_layers=23, max_position_embeddings=77, hidden_act="gelu",
                       layer_norm_eps=1e-5, projection_dim=1024, attention_dropout=0.0,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    assert clip_text_config(_cfg("last", "ViT-H-14"))["num_hidden_layers"] == 24
    # SD 2's text_encoder: 2 embeddings + 23 layers x 16 tensors + final_layer_norm (2).
    assert len(clip_text_keymap(_cfg("penultimate", "ViT-H-14")).rows) == 2 + 23 * 16 + 2
    openai = clip_text_config(_cfg("last", "ViT-L-14-quickgelu"))
    assert (openai["hidden_act"], openai["hidden_size"], openai["num_attention_heads"],
            openai["num_hidden_layers"], openai["projection_dim"]) == ("quick_gelu", 768, 12, 12, 768)
    assert clip_text_config(_cfg("last", "ViT-L-14"))["hidden_act"] == "gelu"


def test_token_ids_are_our_tokenizers(towers):
    _, tok, tokens = towers
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID)
    assert tokens[1, :3].tolist() == [BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID]
    assert tokens[2, -1].item() == EOS_TOKEN_ID  # the truncated prompt ends in <end_of_text>


# ---------------------------------------------------------------------------------------------------
# The UNet context


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_exported_text_encoder_gives_our_context(towers, layer, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    encoders, _, tokens = towers
    cfg = _cfg(layer)
    theirs, report = clip_text_to_transformers(encoders[layer].state_dict(), cfg)
    assert report.ok
    dropped = ["model.text_projection"]
    if layer == "penultimate":
        dropped += [k for k in encoders[layer].state_dict() if k.startswith("model.transformer.resblocks.9.")]
    assert report.dropped == sorted(dropped)
    num_layers = NUM_BLOCKS - (layer == "penultimate")
    assert all(k.startswith("text_model.") for k in theirs)
    assert f"text_model.encoder.layers.{num_layers - 1}.mlp.fc2.bias" in theirs
    assert f"text_model.encoder.layers.{num_layers}.mlp.fc2.bias" not in theirs

    ours = encoders[layer](tokens)  # (B, L, D)
    strict = _clip_text_model(cfg, theirs)
    # As StableDiffusionPipeline loads its text_encoder: config.json + model.safetensors.
    CLIPTextConfig(**clip_text_config(cfg)).save_pretrained(tmp_path)
    save_file(theirs, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = CLIPTextModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.num_hidden_layers == num_layers
    with torch.no_grad():
        for model in (strict, loaded.eval()):
            context = model(tokens).last_hidden_state  # (B, L, D): what the pipeline feeds the UNet
            assert context.shape == ours.shape == (3, 77, 256)
            assert torch.allclose(context, ours, atol=1e-5, rtol=0)
    # The two readouts differ, so matching one is not matching both.
    assert (encoders["last"](tokens) - encoders["penultimate"](tokens)).abs().max() > 1e-2


def test_projection_and_pooled_features_match_open_clip(towers):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    encoders, _, tokens = towers
    enc, cfg = encoders["last"], _cfg("last")
    theirs, report = clip_text_to_transformers(enc.state_dict(), cfg, with_projection=True)
    assert report.ok and report.dropped == []
    assert torch.equal(theirs["text_projection.weight"], enc.model.text_projection.t())
    model = CLIPTextModelWithProjection(CLIPTextConfig(**clip_text_config(cfg))).eval()
    model.load_state_dict(theirs, strict=True)
    with torch.no_grad():
        out = model(tokens)
        pooled = enc.model(tokens)  # open_clip's text features: argmax pooling, then @ text_projection
    assert torch.allclose(out.last_hidden_state, enc(tokens), atol=1e-5, rtol=0)
    assert torch.allclose(out.text_embeds, pooled, atol=1e-5, rtol=0)


def test_quick_gelu_tower_exports_quick_gelu():
    torch.manual_seed(1)
    cfg = _cfg("penultimate")
    enc = FrozenOpenCLIPTextEncoder("tiny", None, "penultimate", allow_random_init=True,
                                    model_cfg=TINY_QUICKGELU)
    assert clip_text_config(cfg, TINY_QUICKGELU)["hidden_act"] == "quick_gelu"
    theirs, report = clip_text_to_transformers(enc.state_dict(), cfg, TINY_QUICKGELU)
    assert report.ok
    tokens = torch.randint(0, 49406, (2, 77))
    tokens[:, 0], tokens[:, 20] = BOS_TOKEN_ID, EOS_TOKEN_ID
    with torch.no_grad():
        ours = enc(tokens)
        context = _clip_text_model(cfg, theirs, TINY_QUICKGELU)(tokens).last_hidden_state
        exact_gelu = _clip_text_model(cfg, theirs, TINY_QUICKGELU, hidden_act="gelu")(tokens).last_hidden_state
    assert torch.allclose(context, ours, atol=1e-5, rtol=0)
    assert (exact_gelu - ours).abs().max() > 1e-4  # the activation is checked, not incidental


# ---------------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_round_trip_is_bitwise(towers, layer, with_projection):
    encoders, _, _ = towers
    cfg = _cfg(layer)
    sd = encoders[layer].state_dict()
    theirs, out_report = clip_text_to_transformers(sd, cfg, with_projection=with_projection)
    back, in_report = clip_text_from_transformers(theirs, cfg, with_projection=with_projection)
    assert out_report.ok and in_report.ok and in_report.dropped == []
    assert in_report.filled == out_report.dropped  # what export leaves out, import makes
    assert set(back) == set(sd)
    for key, tensor in sd.items():
        if key in in_report.filled:
            assert back[key].shape == tensor.shape and back[key].abs().max() == 0, key
        else:
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    if layer == "last" and with_projection:
        assert in_report.filled == []  # nothing left out: the whole tower survives bit for bit
    again, _ = clip_text_to_transformers(back, cfg, with_projection=with_projection)
    assert set(again) == set(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_imported_penultimate_tower_loads_strictly_and_reads_out_the_same(towers):
    encoders, _, tokens = towers
    cfg = _cfg("penultimate")
    theirs, _ = clip_text_to_transformers(encoders["penultimate"].state_dict(), cfg)
    back, report = clip_text_from_transformers(theirs, cfg)
    assert "model.transformer.resblocks.9.mlp.c_fc.weight" in report.filled
    imported = {}
    for layer in ("penultimate", "last"):
        enc, _ = build_text_encoder(_cfg(layer), allow_random_init=True, build_tokenizer=False)
        enc.load_state_dict(back, strict=True)
        imported[layer] = enc(tokens)
    assert torch.equal(imported["penultimate"], encoders["penultimate"](tokens))
    # The zero-filled last block is the identity, so "last" reads out the penultimate state too.
    assert torch.allclose(imported["last"], imported["penultimate"], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Reports and refusals


def test_reports_name_missing_and_unexpected_keys(towers):
    encoders, _, _ = towers
    cfg = _cfg("last")
    sd = dict(encoders["last"].state_dict())
    del sd["model.transformer.resblocks.3.attn.in_proj_weight"]
    sd["model.extra"] = torch.zeros(1)
    theirs, report = clip_text_to_transformers(sd, cfg)
    assert report.missing == ["model.transformer.resblocks.3.attn.in_proj_weight"]
    assert report.unexpected == ["model.extra"]
    with pytest.raises(ValueError, match="in_proj_weight"):
        report.raise_if_incomplete("export")

    theirs, _ = clip_text_to_transformers(encoders["last"].state_dict(), cfg)
    del theirs["text_model.encoder.layers.2.self_attn.v_proj.weight"]
    back, report = clip_text_from_transformers(theirs, cfg)
    assert report.missing == ["text_model.encoder.layers.2.self_attn.v_proj.weight"]
    assert "model.transformer.resblocks.2.attn.in_proj_weight" not in back  # never a partial tensor
    # A full-depth export read as a penultimate tower: its last layer has no place.
    full, _ = clip_text_to_transformers(encoders["last"].state_dict(), cfg)
    _, report = clip_text_from_transformers(full, _cfg("penultimate"))
    assert report.unexpected and all(k.startswith("text_model.encoder.layers.9.") for k in report.unexpected)


@pytest.mark.parametrize("text_cfg, with_projection, words", [
    ({"ls_init_value": 1e-4}, False, ["text_cfg.ls_init_value", "LayerScale"]),
    ({"qk_norm": True}, False, ["text_cfg.qk_norm"]),
    ({"act_kwargs": {"approximate": "tanh"}}, False, ["text_cfg.act_kwargs"]),
    ({"norm_kwargs": {"elementwise_affine": False}}, False, ["text_cfg.norm_kwargs"]),
    ({"proj_bias": True}, True, ["with_projection=True", "proj_bias"]),
    ({"pool_type": "last"}, True, ["with_projection=True", "pool_type='last'"]),
])
def test_rejects_what_clip_text_model_cannot_express(text_cfg, with_projection, words):
    model_cfg = {**TINY_QUICKGELU, "text_cfg": {**TINY_QUICKGELU["text_cfg"], **text_cfg}}
    with pytest.raises(ValueError) as err:
        clip_text_keymap(_cfg("last"), model_cfg, with_projection=with_projection)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_layer_norm_eps_and_kind():
    model_cfg = {**TINY_QUICKGELU, "text_cfg": {**TINY_QUICKGELU["text_cfg"], "norm_kwargs": {"eps": 1e-6}}}
    assert clip_text_config(_cfg("last"), model_cfg)["layer_norm_eps"] == 1e-6
    with pytest.raises(ValueError, match="kind='ldm_bert'"):
        clip_text_config(TextEncoderConfig())
