"""Exported tokenizer folders load offline in transformers and give exactly our token ids.

The reference call is diffusers' ``LDMTextToImagePipeline``: ``tokenizer(prompts, padding="max_length",
max_length=..., truncation=True, return_tensors="pt").input_ids``; classes are resolved by name from
``transformers`` as diffusers does for a ``model_index.json`` entry."""

import json
import socket

import pytest
import torch

from trainer.convert.tokenizers import (CLIP_NUM_MERGES, clip_bpe_vocab_and_merges, clip_clean_text,
                                        export_tokenizer)
from trainer.models.text_encoders import CLIPBPETokenizer, WordPieceTokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def hf_ids(hf_tokenizer, prompts, max_length):
    return hf_tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids


def hf_loaders(class_name):
    """The classes a user may load the folder with: the one named in model_index.json, AutoTokenizer,
    and for BERT the pure-Python BertTokenizerLegacy (transformers 5 has no Python CLIP tokenizer;
    its CLIPTokenizerFast is an alias of CLIPTokenizer)."""
    loaders = [getattr(transformers, class_name), transformers.AutoTokenizer]
    if class_name == "BertTokenizer":
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
        loaders.append(BertTokenizerLegacy)
    return loaders


def assert_same_ids(ours, theirs, prompts, who):
    assert ours.shape == theirs.shape, who
    bad = [p for p, a, b in zip(prompts, ours, theirs) if not torch.equal(a, b)]
    assert not bad, f"{who}: ids differ for {bad!r}"


# ---------------------------------------------------------------------------------------------------
# CLIP BPE

LONG = "a photo of an astronaut riding a horse on mars, highly detailed " * 8  # > 77 tokens
CLIP_SAME = [
    "a photo of a cat",
    "hello! world!!", "!!!", "a, b; c: d? (e) [f] {g} -- x/y \\ z_q", "it's they're we'll I'd",
    "café crème brûlée", "naïve Zoë", "İstanbul", "ß Straße", "東京タワー at night", "emoji 🐱🚀",
    "a\u00a0b", "zero\u200bwidth",
    "1234567.89 3rd 2nd 100%",
    "  leading\tand\ntrailing  ",
    "<|startoftext|> x <|endoftext|>",  # HF's special-token names are plain text to open_clip too
    LONG,
    "",
]
# open_clip cleans prompts with ftfy.fix_text, html.unescape and Python's str.lower; transformers'
# CLIPTokenizer only normalizes NFC, whitespace and per-character lowercase.
CLIP_CLEANING_DIFFERS = [
    "“quoted” text", "don’t",  # ftfy uncurls quotes
    "ﬁne ﬀ", "ǅ",  # ftfy splits ligatures
    "ＦＵＬＬ width",  # ftfy maps full-width forms to ASCII
    "A&B &lt;tag&gt; &amp;",  # HTML entities
    "x\x1cy",  # ftfy drops control characters
    "cafÃ©",  # ftfy repairs mojibake
    "ΟΔΟΣ",  # Python lowercases a final capital sigma to ς, tokenizers to σ
]
# open_clip's own special-token names written in a prompt become 49406/49407 in open_clip only.
CLIP_OPEN_CLIP_SPECIAL = "<start_of_text> x <end_of_text>"


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_tokenizer")
    ours = CLIPBPETokenizer(max_length=77)
    class_name = export_tokenizer(ours, out)
    loaded = {cls.__name__: cls.from_pretrained(out) for cls in hf_loaders(class_name)}
    return ours, out, class_name, loaded


def test_clip_bpe_vocab_has_open_clip_ids():
    import open_clip

    vocab, merges = clip_bpe_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == CLIP_NUM_MERGES == 48894
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == \
           (0, 256, 49406, 49407)
    assert vocab["".join(merges[0].split())] == 512 and vocab["a</w>"] == 320
    simple = open_clip.SimpleTokenizer()
    renamed = {{"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(t, t): i
               for t, i in simple.encoder.items()}
    assert renamed == vocab
    assert {tuple(m.split()): i for i, m in enumerate(merges)} == simple.bpe_ranks


def test_clip_export_files(clip_export):
    ours, out, class_name, _ = clip_export
    assert class_name == "CLIPTokenizer"
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "special_tokens_map.json",
                                                     "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == clip_bpe_vocab_and_merges()[0]
    lines = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    assert config["pad_token"] == "!" and config["split_special_tokens"] is True
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "!"}


def test_clip_export_loads_with_our_special_ids(clip_export, no_network):
    _, _, _, loaded = clip_export
    for name, hf in loaded.items():
        assert type(hf).__name__ == "CLIPTokenizer", name
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.model_max_length) == \
               (49406, 49407, 0, 77), name
        assert len(hf) == 49408, name  # no token added on top of the vocabulary


def test_clip_export_gives_our_ids(clip_export):
    ours, _, _, loaded = clip_export
    expected = ours(CLIP_SAME)
    assert expected[CLIP_SAME.index("hello! world!!"), :6].tolist() == [49406, 3306, 256, 1002, 748, 49407]
    long_row = expected[CLIP_SAME.index(LONG)]
    assert long_row[-1] == 49407 and (long_row != 0).all()  # truncated, ends in <end_of_text>
    for name, hf in loaded.items():
        assert_same_ids(expected, hf_ids(hf, CLIP_SAME, 77), CLIP_SAME, name)


def test_clip_cleaning_differences_are_exactly_open_clips_cleaning(clip_export):
    ours, _, _, loaded = clip_export
    hf = loaded["CLIPTokenizer"]
    expected = ours(CLIP_CLEANING_DIFFERS)
    raw = hf_ids(hf, CLIP_CLEANING_DIFFERS, 77)
    # If one of these starts to match, transformers changed its normalizer: update the docstring.
    assert all(not torch.equal(a, b) for a, b in zip(expected, raw))
    cleaned = [clip_clean_text(p) for p in CLIP_CLEANING_DIFFERS + CLIP_SAME]
    assert_same_ids(ours(CLIP_CLEANING_DIFFERS + CLIP_SAME), hf_ids(hf, cleaned, 77), cleaned,
                    "CLIPTokenizer on clip_clean_text(prompt)")
    special = ours([CLIP_OPEN_CLIP_SPECIAL])[0]
    assert special[:5].tolist() == [49406, 49406, 343, 49407, 49407]
    assert hf_ids(hf, [clip_clean_text(CLIP_OPEN_CLIP_SPECIAL)], 77)[0, 1] != 49406


def test_clip_export_short_max_length_truncates_alike(tmp_path):
    ours = CLIPBPETokenizer(max_length=8)
    class_name = export_tokenizer(ours, tmp_path)
    prompts = ["a photo of a cat on mars with a hat!", "a cat", ""]
    expected = ours(prompts)
    assert expected[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 525, 49407]
    for cls in hf_loaders(class_name):
        hf = cls.from_pretrained(tmp_path)
        assert hf.model_max_length == 8
        assert_same_ids(expected, hf_ids(hf, prompts, 8), prompts, cls.__name__)


def test_clip_export_of_sd2_arch_tokenizer_is_the_same_folder(clip_export, tmp_path, no_network):
    _, out, _, _ = clip_export
    assert export_tokenizer(CLIPBPETokenizer(max_length=77, arch="ViT-H-14"), tmp_path) == "CLIPTokenizer"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == \
           {p.name: p.read_bytes() for p in out.iterdir()}


def test_clip_export_rejects_other_cleaning(tmp_path):
    import open_clip

    ours = CLIPBPETokenizer(max_length=77)
    ours._tokenizer = open_clip.SimpleTokenizer(clean="canonicalize")
    with pytest.raises(ValueError, match="clean='lower'"):
        export_tokenizer(ours, tmp_path)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# WordPiece

WORDS = """a an the of on in at to with and or for from by is are was be this that it its as
photo picture painting drawing image portrait landscape city street house room garden forest river
lake sea ocean mountain sky cloud sun moon star night day morning evening light dark shadow color
red green blue yellow black white orange purple pink brown gray gold silver
cat dog horse bird fish cow sheep lion tiger bear fox wolf rabbit mouse
man woman child boy girl people person astronaut robot king queen knight wizard
riding running jumping sitting standing walking flying swimming eating reading
big small old new young tall short long round square beautiful ugly happy sad
mars earth space planet rocket car bike train boat plane road bridge tower castle
cafe creme brulee ete naive tokyo
style art oil water digital detailed highly realistic cartoon anime sketch
one two three four five six seven eight nine ten hundred
mask cls sep""".split()
PIECES = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + [
    "##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##ness", "##ful", "##less", "##able",
    "##tion", "##ment", "##al", "##ic", "##ous", "##ive", "##ize", "##0", "##1", "##2", "##5"]
CHARS = (list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?;:'\"-()[]{}/\\&%$#@*+=_~")
         + ["東", "京", "中"])
SPECIAL_WITH_MASK = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

BERT_PROMPTS = [
    "A Photo of an Astronaut riding a Horse on Mars",
    "hello, world! (big) [red] {cat}; 'quoted' \"double\" - x/y",
    "Café Crème Brûlée, ÉTÉ, naïve, Zoë, ß",
    "東京 tower at night 中",
    "1234567.89 3rd 2nd 100% $5",
    "  leading\tand\ntrailing  ",
    "[MASK] the [mask] cat [CLS]",
    "x\x1cy\u200bz \u00a0 w",
    "unbelievably detailed paintings",
    "a painting of a beautiful city " * 20,  # > 77 tokens
    "",
]


def _write_vocab(path, with_mask: bool):
    special = SPECIAL_WITH_MASK if with_mask else SPECIAL_WITH_MASK[:4]
    path.write_text("\n".join(special + CHARS + WORDS + PIECES) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("with_mask,lowercase", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("max_length", [77, 10])
def test_wordpiece_export_gives_our_ids(tmp_path, no_network, with_mask, lowercase, max_length):
    vocab_file = _write_vocab(tmp_path / "vocab.txt", with_mask)
    assert len(vocab_file.read_text().splitlines()) > 250
    ours = WordPieceTokenizer(str(vocab_file), max_length=max_length, lowercase=lowercase)
    out = tmp_path / "tokenizer"
    class_name = export_tokenizer(ours, out)
    assert class_name == "BertTokenizer"
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer_config.json",
                                                     "vocab.txt"]
    assert (out / "vocab.txt").read_bytes() == vocab_file.read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is lowercase and config["model_max_length"] == max_length
    assert config["mask_token"] == ("[MASK]" if with_mask else None)

    expected = ours(BERT_PROMPTS)
    assert expected[-1, :3].tolist() == [2, 3, 0]  # "" -> [CLS] [SEP] [PAD]
    long_row = expected[BERT_PROMPTS.index("a painting of a beautiful city " * 20)]
    assert long_row[-1] == 3 and (long_row != 0).all()  # truncated, [SEP] last
    if lowercase:
        assert (expected == 1).sum() < 10  # the lowercase vocabulary covers the prompts: few [UNK]
    for cls in hf_loaders(class_name):
        hf = cls.from_pretrained(out)
        assert len(hf) == ours.vocab_size, cls.__name__  # no special token appended
        assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id) == (2, 3, 0), cls.__name__
        assert_same_ids(expected, hf_ids(hf, BERT_PROMPTS, max_length), BERT_PROMPTS, cls.__name__)


def test_wordpiece_lowercase_setting_is_exported(tmp_path):
    # Both settings tokenize the accented prompt differently, so the exported flag is what matches.
    vocab_file = _write_vocab(tmp_path / "vocab.txt", with_mask=True)
    prompt = ["Café ÉTÉ"]
    cased = WordPieceTokenizer(str(vocab_file), max_length=12, lowercase=False)
    uncased = WordPieceTokenizer(str(vocab_file), max_length=12, lowercase=True)
    assert not torch.equal(cased(prompt), uncased(prompt))
    export_tokenizer(cased, tmp_path / "cased")
    hf = transformers.BertTokenizer.from_pretrained(tmp_path / "cased")
    assert torch.equal(hf_ids(hf, prompt, 12), cased(prompt))


# ---------------------------------------------------------------------------------------------------
# Writing


def test_export_rewrites_in_place_without_temp_files(tmp_path):
    vocab_file = _write_vocab(tmp_path / "vocab.txt", with_mask=True)
    out = tmp_path / "tok"
    export_tokenizer(WordPieceTokenizer(str(vocab_file), max_length=77), out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    export_tokenizer(WordPieceTokenizer(str(vocab_file), max_length=16), out)
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(second) == sorted(first)  # no .tmp-* left behind
    assert second["vocab.txt"] == first["vocab.txt"]
    assert json.loads(second["tokenizer_config.json"])["model_max_length"] == 16


def test_export_refuses_folder_with_shadowing_tokenizer_json(tmp_path):
    vocab_file = _write_vocab(tmp_path / "vocab.txt", with_mask=True)
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        export_tokenizer(WordPieceTokenizer(str(vocab_file)), out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]


def test_export_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="CLIPBPETokenizer or WordPieceTokenizer"):
        export_tokenizer(object(), tmp_path)
