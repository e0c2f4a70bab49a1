"""CLIP score with an OpenCLIP model loaded from a local weights file (issue 7).

``ClipScorer`` embeds uint8 images and captions; the score itself is ``eval.metrics.clip_score``
(100 * max(cos, 0) per pair). Weights come only from a local file, read by open_clip with
``torch.load(weights_only=True)``; the BPE tokenizer ships inside open_clip, so nothing is
downloaded.

With a weights file (rather than an open_clip pretrained tag) open_clip takes the architecture,
including QuickGELU, from the model name alone: OpenAI's CLIP weights need the ``-quickgelu``
variant of the name (``ViT-L-14-quickgelu``), LAION's the plain one (``ViT-L-14``). Preprocessing
is open_clip's default for a file (OpenAI mean/std, bicubic, shortest-side resize + center crop),
which is what both ViT-L-14 releases were trained with.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from eval.features import check_uint8_images, sha256_file
from eval.metrics import clip_score


class ClipScorer:
    """An OpenCLIP model and its tokenizer in eval mode, for CLIP scores of (image, caption) pairs."""

    def __init__(self, model_name: str, weights_path: str | os.PathLike, *,
                 device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        # Imported here: open_clip takes seconds to import and only a CLIP score needs it.
        import open_clip

        available = open_clip.list_models()
        if model_name not in available:
            near = difflib.get_close_matches(model_name, available, n=8, cutoff=0.5) or available[:8]
            raise ValueError(f"eval.clip_model={model_name!r} is not an open_clip model config; "
                             f"available include {near} (open_clip.list_models() has {len(available)})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"CLIP weights {path} for open_clip model {model_name!r} do not exist. CLIP score needs a "
                "local weights file of that architecture, e.g. ViT-L-14 weights: open_clip_pytorch_model.bin "
                "from laion/CLIP-ViT-L-14-laion2B-s32B-b82K, or OpenAI's ViT-L-14 weights with model "
                "ViT-L-14-quickgelu, as a state dict (e.g. open_clip_pytorch_model.bin from "
                "timm/vit_large_patch14_clip_224.openai; OpenAI's ViT-L-14.pt is a TorchScript archive, "
                "which torch.load(weights_only=True) refuses). Download it on a machine with internet "
                "access and set eval.clip_weights to its path")
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), device=device, pretrained_image=False,
                pretrained_text=False, require_pretrained=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - reported with its cause; the name and file were checked above
            raise ValueError(f"CLIP weights {path} cannot be loaded into open_clip model {model_name!r} "
                             f"(eval.clip_weights / eval.clip_model): {type(e).__name__}: {str(e)[:500]}") from e
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        self.model_name = model_name
        self.weights_path = path
        self.weights_sha256 = sha256_file(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = f"open_clip:{model_name}"
        self.dim = int(open_clip.get_model_config(model_name)["embed_dim"])
        self.transform = transform  # open_clip's eval transform (preprocess_val), on PIL images
        self.implementation = f"open_clip_torch=={open_clip.__version__}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalised float (B, 3, S, S) with open_clip's own eval transform
        (PIL resize with the model's interpolation, center crop, the model's mean / std).

        Each image goes through PIL, as in open_clip and in published CLIP scores: torchvision's
        tensor bicubic differs from PIL's by up to ~18/255 per pixel at non-integer scale factors."""
        images = check_uint8_images(images).cpu()
        return torch.stack([self.transform(Image.fromarray(image.permute(1, 2, 0).numpy()))
                            for image in images])

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, E) float image embeddings (not normalised), on CPU."""
        images = check_uint8_images(images)
        out = [self.model.encode_image(self.preprocess(images[i:i + self.batch_size]).to(self.device)).float().cpu()
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """B captions -> (B, E) float text embeddings (not normalised), on CPU. Captions longer than
        the context (77 tokens for CLIP) are truncated by the tokenizer, as in training."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("embed_texts takes a list of strings")
        texts = list(texts)
        out = [self.model.encode_text(self.tokenizer(texts[i:i + self.batch_size]).to(self.device)).float().cpu()
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(B,) CLIP scores 100 * max(cos, 0) of each image with its caption."""
        if len(images) != len(texts):
            raise ValueError(f"score: {len(images)} images but {len(texts)} captions; pass one caption per image")
        return clip_score(self.embed_images(images), self.embed_texts(texts))

    def describe(self) -> dict[str, Any]:
        cfg = self.preprocess_cfg
        return {"name": self.name, "dim": self.dim, "implementation": self.implementation,
                "weights_file": self.weights_path.name, "weights_sha256": self.weights_sha256,
                "preprocess": {key: list(value) if isinstance(value, tuple) else value
                               for key, value in sorted(cfg.items())},
                "score": "100 * max(cos(image, text), 0)"}
