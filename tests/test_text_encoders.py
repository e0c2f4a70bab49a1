"""Text encoders: the paper's LDM text transformer (parity with diffusers LDMBertModel, conversion,
exact paper size), the frozen OpenCLIP tower (last/penultimate readout against open_clip's own code),
and the offline tokenizers."""

import socket

import pytest
import torch
from omegaconf import OmegaConf

from trainer.convert.diffusers_ldmbert import (diffusers_ldmbert_config, ldmbert_from_diffusers,
                                               ldmbert_keymap, ldmbert_to_diffusers)
from trainer.models.text_encoders import (CHECKPOINT_BLOCKS, CLIPBPETokenizer, FrozenOpenCLIPTextEncoder,
                                          LDMTextTransformer, TextConditioner, TextEncoderConfig,
                                          WordPieceTokenizer, build_text_encoder)

from conftest import ROOT
from trainer.runtime.engine import apply_activation_checkpointing, is_checkpointed

PAPER_TEXT_ENCODER_PARAMS = 542_895_360
LOGITS_HEAD_PARAMS = 1280 * 30522 + 30522  # 39,098,682: built by CompVis and diffusers, never used

TINY = dict(vocab_size=100, width=64, depth=2, num_heads=2, dim_head=32, ff_mult=4, max_length=77)
# Deeper but narrow; heads * dim_head (24) != width (48) and ff_mult 2 exercise every shape.
DEEP_NARROW = dict(vocab_size=50, width=48, depth=6, num_heads=3, dim_head=8, ff_mult=2, max_length=16)


def _ldmbert(cfg):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (LDMBertConfig,
                                                                                LDMBertModel)
    return LDMBertModel(LDMBertConfig(**diffusers_ldmbert_config(cfg)))


# ---------------------------------------------------------------------------------------------------
# LDM text transformer


def test_paper_config_has_exact_parameter_count():
    cfg = TextEncoderConfig()
    with torch.device("meta"):
        model = LDMTextTransformer.from_config(cfg)
        built, tokenizer = build_text_encoder(cfg, build_tokenizer=False)
    assert sum(p.numel() for p in model.parameters()) == PAPER_TEXT_ENCODER_PARAMS
    assert sum(p.numel() for p in built.parameters() if p.requires_grad) == PAPER_TEXT_ENCODER_PARAMS
    assert tokenizer is None
    assert cfg.output_width == 1280


def test_paper_count_plus_logits_head_equals_diffusers_ldmbert():
    with torch.device("meta"):
        theirs = _ldmbert(TextEncoderConfig())
    assert sum(p.numel() for p in theirs.parameters()) == PAPER_TEXT_ENCODER_PARAMS + LOGITS_HEAD_PARAMS


@pytest.mark.parametrize("sizes", [TINY, DEEP_NARROW], ids=["tiny", "deep_narrow"])
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_parity_with_diffusers_ldmbert(sizes, train_mode):
    # train mode too: the exported config must switch off LDMBertConfig's default dropout=0.1.
    cfg = TextEncoderConfig(**sizes)
    torch.manual_seed(0)
    ours = LDMTextTransformer.from_config(cfg).train(train_mode)
    sd, report = ldmbert_to_diffusers(ours.state_dict(), cfg)
    assert report.ok and not report.dropped
    theirs = _ldmbert(cfg).train(train_mode)
    theirs.load_state_dict(sd, strict=True)
    for length in (cfg.max_length, 5):
        tokens = torch.randint(0, cfg.vocab_size, (3, length))
        out = ours(tokens)
        ref = theirs(tokens, return_dict=True).last_hidden_state
        assert out.shape == (3, length, cfg.width)
        assert (out - ref).abs().max().item() <= 1e-5


def test_conversion_round_trips_bitwise():
    cfg = TextEncoderConfig(**DEEP_NARROW)
    torch.manual_seed(1)
    ours = LDMTextTransformer.from_config(cfg).state_dict()
    theirs, report = ldmbert_to_diffusers(ours, cfg)
    assert report.ok
    # The unused head is exported as zeros shaped like the token embedding.
    assert torch.equal(theirs["to_logits.weight"], torch.zeros(cfg.vocab_size, cfg.width))
    assert torch.equal(theirs["to_logits.bias"], torch.zeros(cfg.vocab_size))
    back, report = ldmbert_from_diffusers(theirs, cfg)
    assert report.ok and report.dropped == ["to_logits.bias", "to_logits.weight"]
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)

    # diffusers -> ours -> diffusers: everything but the (unused) head comes back bitwise.
    torch.manual_seed(2)
    ref = _ldmbert(cfg).state_dict()
    mine, report = ldmbert_from_diffusers(ref, cfg)
    assert report.ok and not report.unexpected and report.dropped == ["to_logits.bias", "to_logits.weight"]
    model = LDMTextTransformer.from_config(cfg)
    model.load_state_dict(mine, strict=True)
    again, _ = ldmbert_to_diffusers(mine, cfg)
    assert again.keys() == ref.keys()
    assert all(torch.equal(again[k], ref[k]) for k in ref if not k.startswith("to_logits."))


def test_conversion_reports_missing_and_unexpected_keys():
    cfg = TextEncoderConfig(**TINY)
    sd = LDMTextTransformer.from_config(cfg).state_dict()
    assert len(ldmbert_keymap(cfg).rows) == len(sd)
    sd.pop("layers.1.ff.fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    _, report = ldmbert_to_diffusers(sd, cfg)
    assert report.missing == ["layers.1.ff.fc2.bias"] and report.unexpected == ["extra.weight"]
    assert not report.ok


def test_conversion_rejects_open_clip_kind():
    cfg = TextEncoderConfig(kind="open_clip", trainable=False)
    with pytest.raises(ValueError, match="model.text_encoder.kind='open_clip'"):
        diffusers_ldmbert_config(cfg)


def test_activation_checkpointing_gives_identical_grads():
    cfg = TextEncoderConfig(**DEEP_NARROW)
    torch.manual_seed(0)
    model = LDMTextTransformer.from_config(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_length))

    def grads(enabled):
        model.zero_grad()
        apply_activation_checkpointing(model, enabled, CHECKPOINT_BLOCKS)
        out = model(tokens)
        (out.square().mean() + out[:, 0].sum()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, plain = grads(False)
    out_ckpt, ckpt = grads(True)
    assert all(is_checkpointed(layer) for layer in model.layers)
    assert torch.equal(out_plain, out_ckpt)
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name
    assert plain["token_embedding.weight"].abs().sum() > 0


def test_transformer_rejects_bad_sizes_and_inputs():
    with pytest.raises(ValueError, match="depth=0"):
        LDMTextTransformer(**{**TINY, "depth": 0})
    model = LDMTextTransformer(**DEEP_NARROW)
    with pytest.raises(ValueError, match="max_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(17, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("overrides, words", [
    (dict(kind="bert"), ["model.text_encoder.kind", "'bert'", "ldm_bert, open_clip"]),
    (dict(tokenizer="bpe"), ["model.text_encoder.tokenizer", "'bpe'", "wordpiece, clip_bpe"]),
    (dict(layer="middle"), ["model.text_encoder.layer", "'middle'", "last, penultimate"]),
    (dict(width=0), ["model.text_encoder.width", "0", "positive"]),
    (dict(depth=-1), ["model.text_encoder.depth", "-1", "positive"]),
    (dict(max_length=1), ["model.text_encoder.max_length", "1", "at least 2"]),
    (dict(tokenizer="clip_bpe"), ["model.text_encoder.vocab_size", "30522", "49408"]),
    (dict(kind="open_clip"), ["model.text_encoder.trainable", "open_clip", "false"]),
    (dict(kind="open_clip", trainable=False, arch="ViT-Q-99"), ["model.text_encoder.arch", "ViT-Q-99", "ViT-H-14"]),
    (dict(kind="open_clip", trainable=False, arch="ViT-B-16-SigLIP-256"),
     ["model.text_encoder.arch", "hf_tokenizer_name", "ViT-H-14"]),
    (dict(kind="open_clip", trainable=False, arch="coca_ViT-B-32"), ["model.text_encoder.arch", "embed_cls"]),
    (dict(kind="open_clip", trainable=False, arch="PE-Core-B-16"),
     ["model.text_encoder.max_length", "77", "32"]),
])
def test_config_rejects_bad_settings(overrides, words):
    with pytest.raises(ValueError) as err:
        TextEncoderConfig(**overrides)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("arch, width", [("ViT-L-14", 768), ("ViT-L-14-quickgelu", 768),
                                         ("ViT-H-14", 1024), ("ViT-bigG-14", 1280)])
def test_open_clip_output_width_from_bundled_config(arch, width):
    assert TextEncoderConfig(kind="open_clip", trainable=False, arch=arch).output_width == width


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf/model/text_encoder").glob("*.yaml")))
def test_presets_are_valid_configs(preset):
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/model/text_encoder/{preset}.yaml"))
    cfg = TextEncoderConfig(**raw)
    expected = {"ldm_bert_1p45b": 1280, "tiny": 64, "clip_vit_l14": 768, "openclip_vit_h14": 1024}
    assert cfg.output_width == expected[preset]


# ---------------------------------------------------------------------------------------------------
# WordPiece


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "an", "astronaut",
         "riding", "horse", "on", "mars", "the", "cat", "##s", ".", ",", "ete", "!"]


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path


def test_wordpiece_known_ids(vocab_file):
    tok = WordPieceTokenizer(str(vocab_file), max_length=12)
    ids = tok(["A Photo of an Astronaut riding a horse on Mars.", "", "Cats, ÉTÉ! zebra"])
    assert ids.dtype == torch.long and ids.shape == (3, 12)
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 9, 10, 5, 11, 12, 13, 3]  # ends exactly at [SEP]
    assert ids[1].tolist() == [2, 3] + [0] * 10  # empty prompt: [CLS] [SEP] [PAD]...
    # lowercased, accents stripped (as bert-base-uncased), "cats" -> cat ##s, unknown -> [UNK]
    assert ids[2].tolist() == [2, 15, 16, 18, 19, 20, 1, 3, 0, 0, 0, 0]
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.vocab_size) == (2, 3, 0, len(VOCAB))


def test_wordpiece_truncates_to_max_length_keeping_sep(vocab_file):
    tok = WordPieceTokenizer(str(vocab_file), max_length=6)
    ids = tok(["cat " * 40])
    assert ids.tolist() == [[2, 15, 15, 15, 15, 3]]
    assert tok([]).shape == (0, 6)


def test_wordpiece_matches_transformers_bert_tokenizers(vocab_file):
    # CompVis BERTTokenizer: BertTokenizerFast(...)(text, truncation=True, max_length=77,
    # padding="max_length"). transformers 5 names the fast one BertTokenizer (it takes ``vocab``;
    # a ``vocab_file`` keyword is silently ignored) and keeps the pure-Python one as BertTokenizerLegacy.
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    prompts = ["A Photo of an Astronaut riding a horse on Mars.", "", "the cats, the cat!",
               "ÉTÉ on MARS", "an astronaut " * 30, "  a\tphoto\nof  ", "中 cat"]
    ours = WordPieceTokenizer(str(vocab_file), max_length=10)(prompts)
    for ref_tok in (BertTokenizer(vocab=str(vocab_file), do_lower_case=True),
                    BertTokenizerLegacy(vocab_file=str(vocab_file), do_lower_case=True)):
        ref = ref_tok(prompts, truncation=True, max_length=10, padding="max_length",
                      return_tensors="pt")["input_ids"]
        assert torch.equal(ours, ref), type(ref_tok).__name__


def test_wordpiece_missing_vocab_file_names_path_and_key(tmp_path):
    missing = tmp_path / "nowhere" / "vocab.txt"
    with pytest.raises(FileNotFoundError) as err:
        WordPieceTokenizer(str(missing))
    assert str(missing) in str(err.value) and "model.text_encoder.vocab_file" in str(err.value)
    assert "bert-base-uncased" in str(err.value)
    with pytest.raises(FileNotFoundError, match="model.text_encoder.vocab_file is not set"):
        build_text_encoder(TextEncoderConfig(**TINY))


def test_wordpiece_rejects_vocab_without_special_tokens_and_bad_prompts(tmp_path, vocab_file):
    path = tmp_path / "bad.txt"
    path.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        WordPieceTokenizer(str(path))
    tok = WordPieceTokenizer(str(vocab_file))
    with pytest.raises(TypeError, match="list of str"):
        tok("a photo")
    with pytest.raises(TypeError, match="list of str"):
        tok(["a", 3])


def test_vocab_larger_than_embedding_is_rejected(vocab_file):
    cfg = TextEncoderConfig(**{**TINY, "vocab_size": 10}, vocab_file=str(vocab_file))
    with pytest.raises(ValueError, match="model.text_encoder.vocab_size=10"):
        build_text_encoder(cfg)


# ---------------------------------------------------------------------------------------------------
# CLIP BPE


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_clip_bpe_known_ids_and_truncation(no_network):
    tok = CLIPBPETokenizer(max_length=77)
    ids = tok(["a photo of a cat", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert ids[1, :3].tolist() == [49406, 49407, 0] and ids[1, 3:].abs().sum() == 0
    assert tok.vocab_size == 49408
    short = CLIPBPETokenizer(max_length=5)(["a photo of a cat on mars"])
    assert short.tolist() == [[49406, 320, 1125, 539, 49407]]


@pytest.mark.parametrize("arch", ["ViT-L-14", "ViT-H-14", "ViT-bigG-14"])
def test_clip_bpe_for_sd_archs_is_the_bundled_tokenizer(arch, no_network):
    import open_clip
    tok = CLIPBPETokenizer(max_length=77, arch=arch)
    assert type(tok._tokenizer) is open_clip.SimpleTokenizer
    assert tok(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


# ---------------------------------------------------------------------------------------------------
# Frozen OpenCLIP


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


def _tiny_open_clip(layer="penultimate", checkpoint_path=None):
    return FrozenOpenCLIPTextEncoder("tiny", checkpoint_path, layer, allow_random_init=True,
                                     model_cfg=TINY_CLIP)


def _tokens():
    return CLIPBPETokenizer()(["a photo of an astronaut riding a horse on mars", "", "a cat"])


def test_open_clip_last_and_penultimate_match_open_clip():
    torch.manual_seed(0)
    enc = _tiny_open_clip("penultimate")
    last = _tiny_open_clip("last")
    last.load_state_dict(enc.state_dict())
    tokens = _tokens()
    pen_out, last_out = enc(tokens), last(tokens)
    assert pen_out.shape == last_out.shape == (3, 77, 32)
    assert (pen_out - last_out).abs().max() > 1e-2

    text = enc.model
    # open_clip's own readouts: intermediates of block L-2 through ln_final, and the token output.
    ref_pen = text.forward_intermediates(tokens, indices=[1], normalize_intermediates=True,
                                         intermediates_only=True, output_fmt="NLC")["text_intermediates"][0]
    text.output_tokens = True
    _, ref_last = text(tokens)
    text.output_tokens = False
    assert torch.allclose(pen_out, ref_pen, atol=1e-5, rtol=0)
    assert torch.allclose(last_out, ref_last, atol=1e-5, rtol=0)

    # Manual computation as Stability's FrozenOpenCLIPEmbedder (sequence-first blocks, stop one early).
    with torch.no_grad():
        x = text.token_embedding(tokens) + text.positional_embedding
        for block in text.transformer.resblocks[:-1]:
            x = block(x, attn_mask=text.attn_mask)
        manual = text.ln_final(x)
    assert torch.allclose(pen_out, manual, atol=1e-5, rtol=0)


def test_open_clip_sequence_first_blocks_give_same_output():
    from open_clip.transformer import Transformer
    torch.manual_seed(0)
    enc = _tiny_open_clip("penultimate")
    tokens = _tokens()
    ref = enc(tokens)
    cfg = TINY_CLIP["text_cfg"]
    seq_first = Transformer(cfg["width"], cfg["layers"], cfg["heads"], batch_first=False)
    seq_first.load_state_dict(enc.model.transformer.state_dict())
    enc.model.transformer = seq_first
    assert torch.allclose(enc(tokens), ref, atol=1e-5, rtol=0)


def test_open_clip_is_frozen():
    enc = _tiny_open_clip()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    out = enc(_tokens())
    assert not out.requires_grad
    assert enc.width == 32 and enc.max_length == 77


def test_open_clip_loads_text_tower_from_full_checkpoint(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(3)
    clip = open_clip.model.CLIP(**TINY_CLIP)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    enc = _tiny_open_clip("last", checkpoint_path=str(path))
    tokens = _tokens()
    with torch.no_grad():
        ref = clip.ln_final(clip.transformer(clip.token_embedding(tokens) + clip.positional_embedding,
                                             attn_mask=clip.attn_mask))
    assert torch.allclose(enc(tokens), ref, atol=1e-5, rtol=0)
    assert not any(k.startswith("model.visual") for k in enc.state_dict())

    other = open_clip.model.CLIP(**{**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "layers": 2}})
    bad = tmp_path / "other.pt"
    torch.save(other.state_dict(), bad)
    with pytest.raises(ValueError, match="does not hold an open_clip"):
        _tiny_open_clip("last", checkpoint_path=str(bad))


def test_open_clip_missing_checkpoint_names_path_and_key(tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError) as err:
        FrozenOpenCLIPTextEncoder("ViT-H-14", str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "model.text_encoder.checkpoint_path" in msg
    assert "laion2b_s32b_b79k" in msg  # where to get it, from open_clip's offline tag list
    cfg = TextEncoderConfig(kind="open_clip", trainable=False)
    with pytest.raises(FileNotFoundError, match="model.text_encoder.checkpoint_path is not set"):
        build_text_encoder(cfg)


def test_open_clip_meta_build_counts_vit_h_text_tower():
    import open_clip
    cfg = TextEncoderConfig(kind="open_clip", trainable=False, arch="ViT-H-14")
    with torch.device("meta"):
        enc, tok = build_text_encoder(cfg, allow_random_init=True, build_tokenizer=False)
        full = open_clip.model.CLIP(**open_clip.get_model_config("ViT-H-14"))
    text_params = sum(p.numel() for n, p in full.named_parameters()
                      if not n.startswith("visual.") and n != "logit_scale")
    assert sum(p.numel() for p in enc.parameters()) == text_params == 354_032_640
    assert enc.width == cfg.output_width == 1024 and tok is None


def test_open_clip_rejects_bad_layer():
    with pytest.raises(ValueError, match="layer='first'"):
        FrozenOpenCLIPTextEncoder("tiny", None, "first", allow_random_init=True, model_cfg=TINY_CLIP)


# ---------------------------------------------------------------------------------------------------
# Building


def test_build_tiny_preset_and_encode():
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/text_encoder/tiny.yaml"))
    cfg = TextEncoderConfig(**raw)
    torch.manual_seed(0)
    encoder, tokenizer = build_text_encoder(cfg)
    assert isinstance(encoder, LDMTextTransformer) and isinstance(tokenizer, CLIPBPETokenizer)
    conditioner = TextConditioner(encoder, tokenizer)
    context = conditioner.encode(["a photo of a cat", ""], device="cpu")
    assert context.shape == (2, 77, 64)
    assert torch.allclose(context, encoder(tokenizer(["a photo of a cat", ""])))
    assert all(p.requires_grad for p in encoder.parameters())

    frozen, _ = build_text_encoder(TextEncoderConfig(**{**raw, "trainable": False}), build_tokenizer=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_build_wordpiece_ldm_bert(vocab_file):
    cfg = TextEncoderConfig(**{**TINY, "max_length": 8}, vocab_file=str(vocab_file))
    encoder, tokenizer = build_text_encoder(cfg)
    assert isinstance(tokenizer, WordPieceTokenizer)
    assert TextConditioner(encoder, tokenizer).encode(["the cat"], "cpu").shape == (1, 8, 64)
