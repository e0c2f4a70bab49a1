"""The evaluation protocol as a typed config (the ``eval`` group of training and of ``eval.run``).

One protocol, pinned by its config: which prompts (a captions file and a seed for the choice), how
many samples, which sampler, steps and guidance scales, at which resolution, which feature extractor
(and weights file) against which reference statistics, and how images are resized for it. Every
value is recorded beside the results, so two numbers are comparable exactly when their protocols are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from trainer.checks import check_int, invalid
from trainer.sampling.samplers import SAMPLERS

# none: only a sample grid of ``prompts``; digits: the embedded demo (one prompt per digit, scored by
# the digit classifier; FID on its features against the held-out digits); text2img: the field's
# protocol (captions file -> FID with the Inception extractor, CLIP score with an OpenCLIP model).
EVAL_KINDS = ("none", "digits", "text2img")
FEATURES = ("auto", "inception", "digits")
RESIZE_POLICIES = ("torch_bilinear", "pil_bicubic")


@dataclass
class EvalConfig:
    """Sampling and scoring, every ``interval_steps`` during training and by ``python -m eval.run``.

    Sample ``i`` of the protocol is drawn from seed ``seed + i`` with prompt ``i``, in global batches
    of ``batch_size`` dealt round-robin to the ranks, so the samples and the metrics do not depend on
    the number of ranks.
    """

    kind: str = "digits"
    interval_steps: int = 0  # 0: only at the end of training
    # kind=none: what the sample grid shows (default: captions from the data); kind=text2img: the
    # prompts when no captions_file is given.
    prompts: list[str] = field(default_factory=list)
    samples_per_prompt: int = 10  # kind=digits/none: samples of each prompt
    # kind=text2img: COCO captions JSON (annotations[].caption, one caption per image chosen with
    # caption_seed) or a text file with one caption per line.
    captions_file: Optional[str] = None
    num_samples: int = 0  # kind=text2img: how many (caption, seed) pairs; 30000 / 10000 for the paper's tables
    caption_seed: int = 0
    sampler: str = "ddim"
    num_steps: int = 50
    guidance_scales: list[float] = field(default_factory=lambda: [3.0])  # a sweep: one set of metrics per scale
    resolution: int = 0  # sampled image side; 0: data.image_size of the run
    # Feature extractor for FID/KID: auto = digits for kind=digits, inception for text2img.
    features: str = "auto"
    # pt_inception-2015-12-05-6726825d.pth (the weights of pytorch-fid / torch-fidelity), a local path.
    inception_weights: Optional[str] = None
    resize: str = "torch_bilinear"  # how samples and reference images reach 299 px (Inception only)
    # Reference statistics: an image directory, webdataset shards (pattern / list) or a .npz with
    # mu/sigma; kind=digits defaults to the held-out digits shards.
    reference: Optional[str] = None
    reference_cache: str = ".cache/eval_reference"
    clip_model: str = "ViT-L-14"
    clip_weights: Optional[str] = None  # local OpenCLIP checkpoint; unset: no CLIP score
    kid: bool = False
    kid_subset_size: int = 1000
    num_grid: int = 16  # samples per guidance scale shown in the logged grid
    seed: int = 0
    use_ema: bool = True
    batch_size: int = 50
    device: str = "auto"  # eval.run only; training evaluates on its own device

    def __post_init__(self) -> None:
        self.prompts = list(self.prompts)
        self.guidance_scales = [float(g) for g in self.guidance_scales]
        if self.kind not in EVAL_KINDS:
            raise invalid("eval.kind", self.kind, f"one of {EVAL_KINDS}")
        for key, minimum in (("interval_steps", 0), ("samples_per_prompt", 1), ("num_samples", 0),
                             ("caption_seed", 0), ("num_steps", 1), ("resolution", 0), ("kid_subset_size", 2),
                             ("num_grid", 0), ("seed", 0), ("batch_size", 1)):
            check_int(f"eval.{key}", getattr(self, key), minimum)
        if self.sampler not in SAMPLERS:
            raise invalid("eval.sampler", self.sampler, f"one of {sorted(SAMPLERS)}")
        if not self.guidance_scales or not all(g >= 1.0 for g in self.guidance_scales):
            raise invalid("eval.guidance_scales", self.guidance_scales, "a non-empty list of floats >= 1 (1 = no guidance)")
        if self.features not in FEATURES:
            raise invalid("eval.features", self.features, f"one of {FEATURES}")
        if self.resize not in RESIZE_POLICIES:
            raise invalid("eval.resize", self.resize, f"one of {RESIZE_POLICIES}")
        if self.kind == "text2img":
            if not self.captions_file and not self.prompts:
                raise invalid("eval.captions_file", self.captions_file,
                           "a COCO captions JSON or a text file of captions (or eval.prompts) for kind=text2img")
            if self.num_samples < 1:
                raise invalid("eval.num_samples", self.num_samples, "an int >= 1 for kind=text2img (e.g. 30000, 10000, 500)")
            if self.feature_kind == "inception" and not self.inception_weights:
                raise invalid("eval.inception_weights", self.inception_weights,
                           "the local path of pt_inception-2015-12-05-6726825d.pth (FID's Inception-v3 weights, "
                           "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                           "weights-inception-2015-12-05-6726825d.pth)")
            if not self.reference:
                raise invalid("eval.reference", self.reference,
                           "reference images for FID: a directory, webdataset shards or a .npz of mu/sigma")

    @property
    def feature_kind(self) -> str:
        if self.features != "auto":
            return self.features
        return "digits" if self.kind == "digits" else "inception"

    def protocol(self) -> dict[str, Any]:
        """What makes two evaluations comparable (recorded with every result)."""
        keys = ("kind", "captions_file", "num_samples", "caption_seed", "samples_per_prompt", "sampler",
                "num_steps", "guidance_scales", "resolution", "resize", "reference", "clip_model", "seed",
                "use_ema", "kid")
        return {k: getattr(self, k) for k in keys} | {"features": self.feature_kind}
