"""Text encoders that turn prompts into the cross-attention context of the UNet.

Two families (Rombach et al., CVPR 2022, Sec. 3.3 and 4.3.1):

* ``LDMTextTransformer``: the paper's text transformer, trained jointly with the UNet. It is the
  CompVis ``BERTEmbedder`` (``ldm/modules/encoders/modules.py``): an x-transformers
  ``TransformerWrapper(num_tokens=30522, max_seq_len=77, attn_layers=Encoder(dim=1280, depth=32))``
  over a bert-base-uncased WordPiece vocabulary, read out per token (``return_embeddings=True``).
* ``FrozenOpenCLIPTextEncoder``: a frozen OpenCLIP text tower read out per token from its last or
  penultimate block, as Stability's ``FrozenOpenCLIPEmbedder`` (Stable Diffusion v2 uses ViT-H/14,
  penultimate).

Tokenizers work offline: ``WordPieceTokenizer`` reads a local ``vocab.txt``; ``CLIPBPETokenizer`` uses
the BPE merges bundled inside open-clip-torch.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tokenizers import BertWordPieceTokenizer
from torch import nn

KINDS = ("ldm_bert", "open_clip")
TOKENIZERS = ("wordpiece", "clip_bpe")
LAYERS = ("last", "penultimate")
# open_clip's SimpleTokenizer: 256 byte tokens, 256 end-of-word byte tokens, 48,894 merges, then
# <start_of_text> = 49406 and <end_of_text> = 49407.
CLIP_BPE_VOCAB_SIZE = 49408
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
# Where a user gets the files these encoders need; named in the FileNotFoundError messages.
BERT_VOCAB_SOURCE = ("the vocab.txt of bert-base-uncased (Hugging Face hub repository "
                     "google-bert/bert-base-uncased), the tokenizer CompVis BERTTokenizer loads")


# ---------------------------------------------------------------------------------------------------
# open_clip's bundled model configs, read without importing open_clip (the import takes seconds and
# configs are validated before anything is built).


def _open_clip_config_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip (package open-clip-torch) is not installed; it provides "
                                  "the OpenCLIP text towers and the CLIP BPE tokenizer.")
    return Path(list(spec.submodule_search_locations)[0]) / "model_configs"


def open_clip_model_config(arch: str) -> Optional[dict]:
    """The model config JSON bundled with open_clip for ``arch`` (e.g. "ViT-H-14"), or None."""
    path = _open_clip_config_dir() / f"{arch}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _check_open_clip_text_cfg(arch: str, model_cfg: dict, key: str) -> None:
    """Only open_clip's own causal ``TextTransformer`` with its bundled BPE is supported: an HF text
    tower or HF tokenizer would need the Hugging Face hub, and CoCa's appended class token changes
    the per-token readout."""
    text_cfg = model_cfg.get("text_cfg", {})
    for unsupported in ("hf_model_name", "hf_tokenizer_name", "embed_cls", "no_causal_mask"):
        if text_cfg.get(unsupported):
            raise ValueError(
                f"{key}={arch!r}: its text tower sets text_cfg.{unsupported}={text_cfg[unsupported]!r}; "
                f"allowed: open_clip archs with the native causal text transformer and the bundled "
                f"CLIP BPE tokenizer (e.g. ViT-L-14, ViT-L-14-quickgelu, ViT-H-14, ViT-bigG-14).")


# ---------------------------------------------------------------------------------------------------
# Config


@dataclass
class TextEncoderConfig:
    """``kind="ldm_bert"``: the paper's trainable transformer (defaults = the 1.45B model's 543M text
    encoder, CompVis txt2img-1p4B-eval.yaml). ``kind="open_clip"``: a frozen OpenCLIP text tower."""

    kind: str = "ldm_bert"
    trainable: bool = True
    max_length: int = 77
    # ldm_bert
    vocab_size: int = 30522
    width: int = 1280
    depth: int = 32
    num_heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    tokenizer: str = "wordpiece"
    vocab_file: Optional[str] = None
    # open_clip
    arch: str = "ViT-H-14"
    checkpoint_path: Optional[str] = None
    layer: str = "penultimate"

    def __post_init__(self) -> None:
        prefix = "model.text_encoder"
        if self.kind not in KINDS:
            raise ValueError(f"{prefix}.kind={self.kind!r} is unknown; allowed: {', '.join(KINDS)}.")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"{prefix}.tokenizer={self.tokenizer!r} is unknown; allowed: "
                             f"{', '.join(TOKENIZERS)}.")
        if self.layer not in LAYERS:
            raise ValueError(f"{prefix}.layer={self.layer!r} is unknown; allowed: {', '.join(LAYERS)}.")
        for key in ("max_length", "vocab_size", "width", "depth", "num_heads", "dim_head", "ff_mult"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{prefix}.{key}={value!r} must be a positive integer.")
        if self.max_length < 2:
            raise ValueError(f"{prefix}.max_length={self.max_length} must be at least 2 (the start "
                             f"and end tokens both tokenizers add).")
        if self.kind == "ldm_bert":
            if self.tokenizer == "clip_bpe" and self.vocab_size != CLIP_BPE_VOCAB_SIZE:
                raise ValueError(f"{prefix}.vocab_size={self.vocab_size} does not fit "
                                 f"{prefix}.tokenizer='clip_bpe'; allowed: {CLIP_BPE_VOCAB_SIZE} "
                                 f"(the size of open_clip's bundled BPE vocabulary).")
        else:
            if self.trainable:
                raise ValueError(f"{prefix}.trainable=True is not supported with {prefix}.kind="
                                 f"'open_clip'; allowed: false (the OpenCLIP tower is used frozen, as in "
                                 f"Stable Diffusion; train the ldm_bert kind instead).")
            model_cfg = open_clip_model_config(self.arch)
            if model_cfg is None:
                raise ValueError(f"{prefix}.arch={self.arch!r} is not a model config bundled with "
                                 f"open_clip ({_open_clip_config_dir()}); allowed: one of its names, "
                                 f"e.g. ViT-L-14, ViT-H-14, ViT-bigG-14.")
            _check_open_clip_text_cfg(self.arch, model_cfg, f"{prefix}.arch")
            context_length = model_cfg["text_cfg"].get("context_length", 77)
            if self.max_length != context_length:
                raise ValueError(f"{prefix}.max_length={self.max_length} does not fit {prefix}.arch="
                                 f"{self.arch!r}; allowed: {context_length} (its context length).")

    @property
    def output_width(self) -> int:
        """Width of the per-token hidden states, i.e. the UNet's ``context_dim``."""
        if self.kind == "ldm_bert":
            return self.width
        return open_clip_model_config(self.arch)["text_cfg"]["width"]


# ---------------------------------------------------------------------------------------------------
# Tokenizers: list[str] -> LongTensor (B, max_length)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of str (use [\"\"] for the unconditional prompt), "
                        f"got {type(prompts).__name__}.")
    return list(prompts)


class WordPieceTokenizer:
    """BERT-uncased WordPiece tokenization as CompVis ``BERTTokenizer`` (``BertTokenizerFast`` with
    ``truncation=True, max_length=77, padding="max_length"``): ``[CLS] tokens [SEP]`` then ``[PAD]``
    up to ``max_length``; longer prompts are cut so that ``[SEP]`` stays last. Built from a local
    ``vocab.txt`` with the ``tokenizers`` package, the same Rust pipeline ``BertTokenizerFast`` runs
    (BERT normalizer: clean text, split CJK, lowercase and strip accents; BERT pre-tokenizer)."""

    def __init__(self, vocab_file: Optional[str], max_length: int = 77, lowercase: bool = True):
        if vocab_file is None or not Path(vocab_file).is_file():
            what = "is not set" if vocab_file is None else f"{str(vocab_file)!r} does not exist"
            raise FileNotFoundError(f"WordPiece vocabulary: model.text_encoder.vocab_file {what}. "
                                    f"Set it to a local copy of {BERT_VOCAB_SOURCE}.")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 ([CLS] and [SEP]).")
        self.vocab_file = str(vocab_file)
        self.max_length = max_length
        entries = set(Path(vocab_file).read_text(encoding="utf-8").splitlines())
        absent = [t for t in BERT_SPECIAL_TOKENS if t not in entries]
        if absent:
            raise ValueError(f"model.text_encoder.vocab_file={self.vocab_file!r} lacks the special "
                             f"tokens {absent}; a BERT vocab.txt has {list(BERT_SPECIAL_TOKENS)}.")
        self._tokenizer = BertWordPieceTokenizer(self.vocab_file, lowercase=lowercase)
        vocab = self._tokenizer.get_vocab()
        self.pad_id = vocab["[PAD]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.vocab_size = self._tokenizer.get_vocab_size()
        # Truncation counts the [CLS]/[SEP] the post-processor adds, as BertTokenizerFast does.
        self._tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        encodings = self._tokenizer.encode_batch(prompts)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(len(prompts),
                                                                                 self.max_length)


class CLIPBPETokenizer:
    """open_clip's ``SimpleTokenizer`` (byte-level BPE of OpenAI CLIP, merges bundled in the package):
    ``<start_of_text> tokens <end_of_text>`` then 0 up to ``max_length``; longer prompts are cut and
    end in ``<end_of_text>``. With ``arch`` it is ``open_clip.get_tokenizer(arch)``, checked to be
    this bundled tokenizer so it never reaches for the Hugging Face hub."""

    def __init__(self, max_length: int = 77, arch: Optional[str] = None):
        # Imported here: open_clip takes seconds to import; only an OpenCLIP tower or tokenizer needs it.
        import open_clip

        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (start and end tokens).")
        if arch is None:
            tokenizer = open_clip.SimpleTokenizer(context_length=max_length)
        else:
            tokenizer = open_clip.get_tokenizer(arch, context_length=max_length)
            if not isinstance(tokenizer, open_clip.SimpleTokenizer):
                raise ValueError(f"arch={arch!r} uses {type(tokenizer).__name__}, not open_clip's "
                                 f"bundled BPE SimpleTokenizer; allowed: archs without an HF tokenizer.")
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = tokenizer.vocab_size
        self.sot_id = tokenizer.sot_token_id
        self.eot_id = tokenizer.eot_token_id
        self.pad_id = 0

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        if not prompts:
            return torch.zeros(0, self.max_length, dtype=torch.long)
        return self._tokenizer(prompts, context_length=self.max_length)


# ---------------------------------------------------------------------------------------------------
# The paper's text transformer
#
# Parameter names and their CompVis counterparts (prefix ``cond_stage_model.transformer.`` in an LDM
# .ckpt; x-transformers ``Encoder`` interleaves blocks as ``attn_layers.layers.{2i}`` = attention and
# ``attn_layers.layers.{2i+1}`` = feed-forward, each a ModuleList [norm, block, residual]):
#
#   token_embedding.weight          token_emb.weight
#   position_embedding.weight       pos_emb.emb.weight
#   layers.{i}.attn_norm.*          attn_layers.layers.{2i}.0.*
#   layers.{i}.attn.to_q.weight     attn_layers.layers.{2i}.1.to_q.weight      (to_k, to_v alike)
#   layers.{i}.attn.to_out.*        attn_layers.layers.{2i}.1.to_out.*
#   layers.{i}.ff_norm.*            attn_layers.layers.{2i+1}.0.*
#   layers.{i}.ff.fc1.*             attn_layers.layers.{2i+1}.1.net.0.0.*
#   layers.{i}.ff.fc2.*             attn_layers.layers.{2i+1}.1.net.2.*
#   final_norm.*                    norm.*
#   (none)                          to_logits.*
#
# ``to_logits`` (Linear(1280, 30522), 39,098,682 parameters) is built by CompVis ``TransformerWrapper``
# and diffusers ``LDMBertModel`` but never used: BERTEmbedder calls the wrapper with
# ``return_embeddings=True`` and LDMBertModel.forward returns the encoder output. It gets no gradient
# in training, so its weights stay at initialisation; we do not build it.


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention (x-transformers ``Attention``: q/k/v without bias,
    output projection with bias, softmax scale ``dim_head ** -0.5``)."""

    def __init__(self, width: int, num_heads: int, dim_head: int):
        super().__init__()
        self.num_heads = num_heads
        self.dim_head = dim_head
        inner = num_heads * dim_head
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_k = nn.Linear(width, inner, bias=False)
        self.to_v = nn.Linear(width, inner, bias=False)
        self.to_out = nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape  # (B, L, D)
        q, k, v = (proj(x).view(batch, length, self.num_heads, self.dim_head).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # (B, H, L, Dh) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh); no mask: CompVis passes none
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.dim_head)
        return self.to_out(out)  # (B, L, D)


class FeedForward(nn.Module):
    """x-transformers ``FeedForward`` without GLU: Linear -> exact GELU -> Linear."""

    def __init__(self, width: int, ff_mult: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width * ff_mult)
        self.fc2 = nn.Linear(width * ff_mult, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (B, L, D)


class TransformerLayer(nn.Module):
    """One pre-norm encoder layer: attention block then feed-forward block, each residual."""

    def __init__(self, width: int, num_heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = SelfAttention(width, num_heads, dim_head)
        self.ff_norm = nn.LayerNorm(width)
        self.ff = FeedForward(width, ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # (B, L, D)
        return x + self.ff(self.ff_norm(x))  # (B, L, D)


# The blocks activation checkpointing can recompute (``trainer.runtime.engine.apply_activation_checkpointing``).
CHECKPOINT_BLOCKS = {"layer": TransformerLayer}


class LDMTextTransformer(nn.Module):
    """The paper's text encoder tau_theta (Sec. 3.3): token + learned absolute position embedding,
    ``depth`` pre-norm transformer layers, final LayerNorm. Returns all ``L`` hidden states as the
    cross-attention context ``(B, L, width)``. No dropout: BERTEmbedder's defaults are all 0."""

    def __init__(self, vocab_size: int = 30522, max_length: int = 77, width: int = 1280,
                 depth: int = 32, num_heads: int = 8, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        sizes = dict(vocab_size=vocab_size, max_length=max_length, width=width, depth=depth,
                     num_heads=num_heads, dim_head=dim_head, ff_mult=ff_mult)
        for key, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LDMTextTransformer {key}={value!r} must be a positive integer.")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.width = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_length, width)
        self.layers = nn.ModuleList(
            TransformerLayer(width, num_heads, dim_head, ff_mult) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        # x-transformers initialises both embeddings N(0, 0.02) and leaves Linear/LayerNorm at the
        # PyTorch defaults.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig) -> "LDMTextTransformer":
        return cls(vocab_size=cfg.vocab_size, max_length=cfg.max_length, width=cfg.width,
                   depth=cfg.depth, num_heads=cfg.num_heads, dim_head=cfg.dim_head,
                   ff_mult=cfg.ff_mult)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise ValueError(f"tokens must be (B, L) with L <= max_length={self.max_length}, "
                             f"got shape {tuple(tokens.shape)}.")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, L, D)
        for layer in self.layers:
            x = layer(x)  # (B, L, D)
        return self.final_norm(x)  # (B, L, D)


# ---------------------------------------------------------------------------------------------------
# Frozen OpenCLIP text tower


class FrozenOpenCLIPTextEncoder(nn.Module):
    """A frozen OpenCLIP text tower read out per token (Stability ``FrozenOpenCLIPEmbedder``).

    ``layer="last"`` runs every residual block; ``"penultimate"`` (SD v2) stops one block early.
    Either way ``ln_final`` follows, and the causal mask of CLIP's text transformer applies.

    Only the text tower is built (open_clip ``_build_text_tower``, the function ``CLIP.__init__``
    calls), never the visual one: ViT-H/14's image tower alone is 632M parameters. Weights come from
    a local open_clip checkpoint (the file ``open_clip.create_model(arch, pretrained=path)`` reads,
    loaded by open_clip's own ``load_state_dict``); its ``visual.*`` and ``logit_*`` entries are
    skipped. ``self.model`` holds the tower, so parameter names are Stability's
    ``cond_stage_model.model.*`` without the prefix.

    ``model_cfg`` replaces the bundled config of ``arch`` (tests build tiny towers with it).
    """

    def __init__(self, arch: str = "ViT-H-14", checkpoint_path: Optional[str] = None,
                 layer: str = "penultimate", *, allow_random_init: bool = False,
                 model_cfg: Optional[dict] = None):
        super().__init__()
        # Imported here: open_clip takes seconds to import; only an OpenCLIP tower or tokenizer needs it.
        from open_clip.model import _build_text_tower
        from open_clip.transformer import TextTransformer

        if layer not in LAYERS:
            raise ValueError(f"layer={layer!r} is unknown; allowed: {', '.join(LAYERS)}.")
        if model_cfg is None:
            model_cfg = open_clip_model_config(arch)
            if model_cfg is None:
                raise ValueError(f"model.text_encoder.arch={arch!r} is not a model config bundled "
                                 f"with open_clip; allowed: e.g. ViT-L-14, ViT-H-14, ViT-bigG-14.")
        _check_open_clip_text_cfg(arch, model_cfg, "model.text_encoder.arch")
        if checkpoint_path is None and not allow_random_init:
            raise FileNotFoundError(
                f"OpenCLIP {arch}: model.text_encoder.checkpoint_path is not set. "
                f"{_open_clip_weights_hint(arch)}")
        if checkpoint_path is not None and not Path(checkpoint_path).is_file():
            raise FileNotFoundError(
                f"OpenCLIP {arch}: model.text_encoder.checkpoint_path={str(checkpoint_path)!r} does not "
                f"exist. {_open_clip_weights_hint(arch)}")

        self.arch = arch
        self.layer = layer
        self.model = _build_text_tower(model_cfg["embed_dim"], model_cfg["text_cfg"],
                                       quick_gelu=model_cfg.get("quick_gelu", False))
        assert isinstance(self.model, TextTransformer) and self.model.cls_emb is None
        self.max_length = self.model.context_length
        if layer == "penultimate" and len(self.model.transformer.resblocks) < 2:
            raise ValueError(f"layer='penultimate' needs at least 2 blocks; {arch} has "
                             f"{len(self.model.transformer.resblocks)}.")
        # A meta-device build (parameter counting) has nothing to load weights into.
        if checkpoint_path is not None and not self.model.token_embedding.weight.is_meta:
            self._load(str(checkpoint_path))
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.model.width

    def _load(self, path: str) -> None:
        # Imported here: open_clip takes seconds to import; only an OpenCLIP tower or tokenizer needs it.
        from open_clip.factory import load_state_dict

        state = load_state_dict(path)  # safetensors or torch.load(weights_only=True)
        text_state = {k: v for k, v in state.items()
                      if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
        result = self.model.load_state_dict(text_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"model.text_encoder.checkpoint_path={path!r} does not hold an open_clip {self.arch} "
                f"text tower: missing {result.missing_keys[:8]}, unexpected "
                f"{result.unexpected_keys[:8]}.")

    def train(self, mode: bool = True) -> "FrozenOpenCLIPTextEncoder":
        # Frozen: a trainer's model.train() must not switch this tower out of eval mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise ValueError(f"tokens must be (B, L) with L <= {self.max_length}, "
                             f"got shape {tuple(tokens.shape)}.")
        text = self.model
        length = tokens.shape[1]
        x = text.token_embedding(tokens) + text.positional_embedding[:length]  # (B, L, D)
        attn_mask = text.attn_mask[:length, :length]  # (L, L) additive causal mask
        transformer = text.transformer
        blocks = transformer.resblocks if self.layer == "last" else transformer.resblocks[:-1]
        # Older open_clip builds its blocks sequence-first (L, B, D); 3.x batch-first (B, L, D).
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=attn_mask)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        return text.ln_final(x)  # (B, L, D)


def _open_clip_weights_hint(arch: str) -> str:
    """Where to get weights for ``arch``, from open_clip's own (offline) list of pretrained tags."""
    # Imported here: open_clip takes seconds to import; only an OpenCLIP tower or tokenizer needs it.
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    sources = []
    for tag in tags:
        hub = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "")
        sources.append(f"{tag} (Hugging Face hub {hub.rstrip('/')})" if hub else tag)
    listed = "; ".join(sources) if sources else "none listed by open_clip for this arch"
    return (f"Point it to a local open_clip checkpoint file (open_clip_pytorch_model.bin or "
            f"open_clip_model.safetensors); open_clip's pretrained tags for {arch}: {listed}. "
            f"Stable Diffusion v2 uses ViT-H-14 laion2b_s32b_b79k.")


# ---------------------------------------------------------------------------------------------------
# Building


class TextConditioner(nn.Module):
    """Tokenizer + encoder: ``encode(prompts, device)`` gives the UNet's context ``(B, L, D)``."""

    def __init__(self, encoder: nn.Module, tokenizer):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer

    def encode(self, prompts: Sequence[str], device: torch.device | str) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(device)  # (B, L)
        return self.encoder(tokens)  # (B, L, D)


def build_text_tokenizer(cfg: TextEncoderConfig):
    if cfg.kind == "open_clip":
        return CLIPBPETokenizer(max_length=cfg.max_length, arch=cfg.arch)
    if cfg.tokenizer == "clip_bpe":
        return CLIPBPETokenizer(max_length=cfg.max_length)
    tokenizer = WordPieceTokenizer(cfg.vocab_file, max_length=cfg.max_length)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"model.text_encoder.vocab_size={cfg.vocab_size} is smaller than the "
                         f"{tokenizer.vocab_size} entries of model.text_encoder.vocab_file="
                         f"{cfg.vocab_file!r}; allowed: >= {tokenizer.vocab_size}.")
    return tokenizer


def build_text_encoder(cfg: TextEncoderConfig, allow_random_init: bool = False,
                       build_tokenizer: bool = True) -> tuple[nn.Module, object]:
    """``(encoder, tokenizer)`` for ``cfg``; the tokenizer is None with ``build_tokenizer=False``
    (parameter counting on the meta device). ``allow_random_init`` lets an OpenCLIP tower without
    ``checkpoint_path`` start from random weights: tests only."""
    if cfg.kind == "ldm_bert":
        encoder: nn.Module = LDMTextTransformer.from_config(cfg)
        if not cfg.trainable:
            encoder.requires_grad_(False)
    else:
        encoder = FrozenOpenCLIPTextEncoder(cfg.arch, cfg.checkpoint_path, cfg.layer,
                                            allow_random_init=allow_random_init)
    tokenizer = build_text_tokenizer(cfg) if build_tokenizer else None
    return encoder, tokenizer
