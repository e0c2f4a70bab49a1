"""Export this project's text tokenizers as Hugging Face tokenizer folders.

``export_tokenizer(tokenizer, out_dir)`` writes the files ``transformers`` reads offline and returns the
class name a diffusers ``model_index.json`` names for them:

* ``CLIPBPETokenizer`` -> ``CLIPTokenizer``: ``vocab.json`` + ``merges.txt`` generated from the BPE
  merges bundled in open_clip (``bpe_simple_vocab_16e6.txt.gz``), with the ids open_clip's
  ``SimpleTokenizer`` uses. Its special tokens keep their ids (49406, 49407) under the names Hugging
  Face's CLIP tokenizer uses (``<|startoftext|>``, ``<|endoftext|>``). Padding is id 0, the token
  ``"!"``, as in Stable Diffusion 2's tokenizer. transformers registers every special token, the pad
  token included, as an added token that is cut out of the text before BPE, so a plain ``"!"`` pad
  would turn each ``!`` of a prompt into id 0 instead of open_clip's ``!</w>`` (256).
  ``split_special_tokens=True`` stops that: special tokens in the text are tokenized like any text,
  which is also what open_clip does with the Hugging Face names.
* ``WordPieceTokenizer`` -> ``BertTokenizer``: its ``vocab.txt`` copied byte for byte and the BERT
  normalizer settings it runs (lowercase, accent stripping, CJK splitting).

Ids equal ours for ``tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)``
(what diffusers' ``LDMTextToImagePipeline`` calls), with one exception for CLIP. open_clip cleans
each prompt in Python before BPE (``ftfy.fix_text``, ``html.unescape`` twice, ``str.lower``);
transformers' ``CLIPTokenizer`` builds its own normalizer (NFC, whitespace, per-character lowercase)
and ignores any other normalizer in the folder. Prompts that cleaning changes therefore tokenize
differently: curly quotes and apostrophes, ligatures (``ﬁ``, ``ǅ``), full-width forms, HTML entities
(``&amp;``), control characters, mojibake, a final capital sigma (``Σ`` -> ``ς``), and open_clip's
own special-token names ``<start_of_text>``/``<end_of_text>`` written in a prompt. Passing prompts
through ``clip_clean_text`` first gives identical ids for all but the last case.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Optional

from tokenizers.normalizers import BertNormalizer

from trainer.images import atomic_write_bytes
from trainer.models.text_encoders import CLIPBPETokenizer, WordPieceTokenizer

# open_clip SimpleTokenizer name -> Hugging Face CLIPTokenizer name; the ids stay 49406 and 49407.
CLIP_SPECIAL_TOKEN_NAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
# open_clip (after OpenAI CLIP) reads the merges file's lines 1 .. 48,894: 49,152 ids minus 256 byte
# tokens minus the 2 special tokens, each merge adding one id on top of 512 byte tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2
# Files of another tokenizer that transformers would read in preference to, or on top of, ours.
_SHADOWING_FILES = ("tokenizer.json", "added_tokens.json")


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------------
# CLIP BPE


def clip_clean_text(text: str) -> str:
    """open_clip's prompt cleaning (``clean="lower"``): ftfy, HTML unescape, whitespace, lowercase.
    Applied to prompts before an exported ``CLIPTokenizer`` it removes the cleaning differences."""
    # Imported here: open_clip takes seconds to import; only an OpenCLIP tower or tokenizer needs it.
    from open_clip.tokenizer import basic_clean, whitespace_clean

    return whitespace_clean(basic_clean(text)).lower()


def clip_bpe_vocab_and_merges(bpe_path: Optional[str] = None) -> tuple[dict[str, int], list[str]]:
    """``(vocab, merges)`` of open_clip's bundled BPE file (or ``bpe_path``), in open_clip's id order:
    the 256 byte characters, the same with ``</w>``, one token per merge, then the two special tokens
    under their Hugging Face names. ``merges`` are the ``"a b"`` lines of ``merges.txt``."""
    # Imported here: open_clip takes seconds to import; only an OpenCLIP tower or tokenizer needs it.
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(bpe_path or default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:CLIP_NUM_MERGES + 1]  # line 0 is the "#version" header
    pairs = [tuple(m.split()) for m in merges]
    if len(pairs) != CLIP_NUM_MERGES or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{bpe_path or default_bpe()} is not a CLIP BPE merges file: expected "
                         f"{CLIP_NUM_MERGES} merges of two symbols after the header line.")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in pairs]
    tokens += list(CLIP_SPECIAL_TOKEN_NAMES.values())
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "CLIP BPE tokens must be unique"
    return vocab, [" ".join(p) for p in pairs]


def clip_tokenizer_files(tokenizer: CLIPBPETokenizer) -> dict[str, bytes]:
    """The files of a transformers ``CLIPTokenizer`` folder with ``tokenizer``'s ids (name -> bytes)."""
    # Imported here: open_clip takes seconds to import; only an OpenCLIP tower or tokenizer needs it.
    import open_clip
    from open_clip.tokenizer import _clean_lower

    simple = tokenizer._tokenizer
    if type(simple) is not open_clip.SimpleTokenizer or simple.clean_fn is not _clean_lower \
            or simple.reduction_fn is not None:
        raise ValueError("only open_clip's SimpleTokenizer with its default cleaning (clean='lower') "
                         "and truncation (no reduction_mask) can be exported as a CLIPTokenizer; "
                         f"got {type(simple).__name__} with clean_fn={getattr(simple, 'clean_fn', None)}.")
    vocab, merges = clip_bpe_vocab_and_merges()
    theirs = {CLIP_SPECIAL_TOKEN_NAMES.get(t, t): i for t, i in simple.encoder.items()}
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    if theirs != vocab or simple.bpe_ranks != ranks:
        raise ValueError("the tokenizer's vocabulary or merges differ from open_clip's bundled BPE file "
                         f"({len(simple.encoder)} tokens, {len(simple.bpe_ranks)} merges); only the "
                         "bundled vocabulary without additional special tokens can be exported.")
    id_to_token = {i: t for t, i in vocab.items()}
    bos, eos = id_to_token[tokenizer.sot_id], id_to_token[tokenizer.eot_id]
    assert (bos, eos) == tuple(CLIP_SPECIAL_TOKEN_NAMES.values())
    pad = id_to_token[tokenizer.pad_id]  # "!": open_clip pads with zeros
    special = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": pad}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": tokenizer.max_length,
        **special,
        "do_lower_case": True,
        # Keeps "!" (the pad token) and the special-token names in prompts ordinary text; see the
        # module docstring.
        "split_special_tokens": True,
    }
    return {
        "vocab.json": _json_bytes(vocab),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special),
    }


# ---------------------------------------------------------------------------------------------------
# WordPiece


def bert_tokenizer_files(tokenizer: WordPieceTokenizer) -> dict[str, bytes]:
    """The files of a transformers ``BertTokenizer`` folder with ``tokenizer``'s ids (name -> bytes)."""
    backend = tokenizer._tokenizer  # tokenizers.BertWordPieceTokenizer
    normalizer = backend.normalizer
    assert isinstance(normalizer, BertNormalizer) and normalizer.clean_text
    vocab_bytes = Path(tokenizer.vocab_file).read_bytes()
    vocab = backend.get_vocab()
    # Only tokens the vocabulary has: transformers appends a missing special token as a new id, which
    # would make it a special token ours does not know (BertWordPieceTokenizer skips absent ones).
    special = {key: token for key, token in (("unk_token", "[UNK]"), ("sep_token", "[SEP]"),
                                             ("pad_token", "[PAD]"), ("cls_token", "[CLS]"),
                                             ("mask_token", "[MASK]")) if token in vocab}
    config = {
        "tokenizer_class": "BertTokenizer",
        "model_max_length": tokenizer.max_length,
        "do_lower_case": normalizer.lowercase,
        "strip_accents": normalizer.strip_accents,  # None: follows do_lower_case, as ours
        "tokenize_chinese_chars": normalizer.handle_chinese_chars,
        "do_basic_tokenize": True,
        **special,
        "mask_token": special.get("mask_token"),
    }
    return {
        "vocab.txt": vocab_bytes,
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special),
    }


# ---------------------------------------------------------------------------------------------------


def export_tokenizer(tokenizer, out_dir: Path) -> str:
    """Write ``tokenizer`` (a ``CLIPBPETokenizer`` or ``WordPieceTokenizer``) as a Hugging Face
    tokenizer folder in ``out_dir`` (each file atomically) and return the transformers class name for
    a diffusers ``model_index.json``: ``"CLIPTokenizer"`` or ``"BertTokenizer"``."""
    if isinstance(tokenizer, CLIPBPETokenizer):
        class_name, files = "CLIPTokenizer", clip_tokenizer_files(tokenizer)
    elif isinstance(tokenizer, WordPieceTokenizer):
        class_name, files = "BertTokenizer", bert_tokenizer_files(tokenizer)
    else:
        raise TypeError(f"export_tokenizer takes a CLIPBPETokenizer or WordPieceTokenizer, got "
                        f"{type(tokenizer).__name__}.")
    out_dir = Path(out_dir)
    shadowing = [name for name in _SHADOWING_FILES if (out_dir / name).exists()]
    if shadowing:
        raise ValueError(f"{out_dir} already holds {shadowing}, which transformers would read instead "
                         f"of or on top of the exported {class_name} files; export into an empty "
                         f"folder or remove them.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    return class_name


__all__ = ["CLIP_SPECIAL_TOKEN_NAMES", "bert_tokenizer_files", "clip_bpe_vocab_and_merges",
           "clip_clean_text", "clip_tokenizer_files", "export_tokenizer"]
