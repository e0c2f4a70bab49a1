"""Feature extractors for FID / KID: uint8 images (B, 3, H, W) -> float64 features (B, D).

Each extractor is a callable with ``name``, ``dim`` and ``describe()`` (what a result must record
to be reproducible: the network, its weights file and sha256, the resize policy). The metrics
themselves live in ``eval.metrics`` and never see images.

* ``InceptionFeatures``: the FID Inception-v3 (TF 2015-12-05 graph, pool3, 2048-d) as
  torch-fidelity implements it, with the same weights pytorch-fid uses. torch-fidelity reads a
  weights file with ``torch.load(weights_only=False)``; here the file is read with
  ``weights_only=True`` and copied into torch-fidelity's module instead, so nothing is unpickled.
* ``DigitFeatures``: the demo's digit classifier, penultimate layer; a cheap, weights-free stand-in
  for the digits demo.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Protocol
from unittest import mock

import numpy as np
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image

from data_pipeline.demo_digits import DigitClassifier

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity's release of the same file (pytorch-fid ships it as INCEPTION_WEIGHTS_FILE).
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
# torch.hub's convention: the hex digits in the file name start the file's sha256.
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_SIZE = 299  # the TF graph's input resolution
INCEPTION_DIM = 2048  # pool3
RESIZE_POLICIES = ("torch_bilinear", "pil_bicubic")


class FeatureExtractor(Protocol):
    name: str
    dim: int

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_uint8_images(images: Any) -> torch.Tensor:
    """``images`` (a tensor or numpy array) as a uint8 tensor (B, 3, H, W), or ``ValueError``."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise ValueError(f"feature extractors take uint8 image tensors (B, 3, H, W); got "
                         f"{type(images).__name__} of dtype {getattr(images, 'dtype', None)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (B, 3, H, W)")
    return images


# ----------------------------------------------------------------------------- Inception


def load_tensor_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` state dict from ``path`` via ``torch.load(weights_only=True)``; anything
    else (random bytes, a pickled model object) is a ``ValueError`` naming the file."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse means "not a state dict file"
        raise ValueError(f"{what} {path} cannot be read as a tensor state dict with "
                         f"torch.load(weights_only=True): {type(e).__name__}: {str(e)[:300]}") from None
    if not isinstance(loaded, Mapping) or not loaded or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise ValueError(f"{what} {path} holds a {type(loaded).__name__}, not a non-empty "
                         "{name: tensor} state dict")
    return dict(loaded)


def state_dict_mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                          limit: int = 5) -> list[str]:
    """Human-readable differences in keys and shapes (at most ``limit`` of each kind).

    BatchNorm's ``num_batches_tracked`` may be absent: ``BatchNorm._load_from_state_dict`` fills
    it in for old checkpoints, and FID never reads it."""
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: {tuple(given[k].shape)} in the file, {tuple(v.shape)} expected"
              for k, v in expected.items() if k in given and given[k].shape != v.shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{len(items)} {label}: {items[:limit]}{more}")
    return problems


_NO_WEIGHTS = object()  # what build_inception_v3 hands the constructor's loading step


class _InceptionV3(tf_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's module; its constructor's own loading step is skipped (see build_inception_v3)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ANN001 - nn.Module's
        if state_dict is _NO_WEIGHTS:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _no_download(url: str, **_: Any) -> object:
    assert url == tf_inception.URL_INCEPTION_V3, url
    return _NO_WEIGHTS


def build_inception_v3() -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])`` at PyTorch's
    default initialisation, in eval mode without gradients; copy weights in with ``load_state_dict``.

    Its constructor either downloads the weights (``load_state_dict_from_url``) or unpickles a file
    with ``torch.load(weights_only=False)``; neither is acceptable here (offline, no pickle), so the
    download function is replaced, for the duration of the constructor only, by one that hands
    back a marker, on which the subclass skips loading.
    """
    with mock.patch.object(tf_inception, "load_state_dict_from_url", _no_download):
        return _InceptionV3("inception-v3-compat", [str(INCEPTION_DIM)])


def resize_pil_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's resize (Parmar et al. 2022), on uint8: each (3, H, W) image to size x size with
    PIL's antialiased BICUBIC. (clean-fid resizes float channels and skips the rounding; the
    torch-fidelity network takes uint8, so the result is rounded back to uint8 here.)"""
    out = []
    for image in images.cpu():
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        pil = pil.resize((size, size), Image.Resampling.BICUBIC)  # a copy when already size x size
        out.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
    return torch.stack(out)  # (B, 3, size, size) uint8


def check_resize(resize: str) -> str:
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"eval.resize={resize!r} is invalid; allowed: {', '.join(RESIZE_POLICIES)} "
                         "(torch_bilinear: torch-fidelity's TF1-compatible bilinear resize to 299; "
                         "pil_bicubic: clean-fid's PIL bicubic resize to 299)")
    return resize


class InceptionFeatures:
    """FID Inception-v3 pool3 features (2048-d) of uint8 images (B, 3, H, W), any H, W.

    ``resize``: ``"torch_bilinear"`` hands the images at their own size to torch-fidelity, which
    resizes to 299 with TF1's bilinear (no antialiasing; the original FID protocol and
    torch-fidelity's / torchmetrics' default); ``"pil_bicubic"`` resizes each image to 299 with
    PIL bicubic first, as clean-fid does (torch-fidelity's own resize is then the identity).
    """

    def __init__(self, weights_path: str | os.PathLike, *, resize: str = "torch_bilinear",
                 device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.resize = check_resize(resize)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {path} do not exist. FID needs the TF 2015-12-05 Inception-v3 "
                f"weights in PyTorch format, {INCEPTION_WEIGHTS_FILE} (pytorch-fid's name; the same "
                f"file as {INCEPTION_WEIGHTS_URL}); download it on a machine with internet access "
                "and set eval.inception_weights to its path")
        state_dict = load_tensor_state_dict(path, "Inception weights")
        module = build_inception_v3()
        problems = state_dict_mismatches(module.state_dict(), state_dict)
        if problems:
            raise ValueError(f"Inception weights {path} do not match torch-fidelity's FID Inception-v3 "
                             f"({'; '.join(problems)}); expected {INCEPTION_WEIGHTS_FILE} from "
                             f"{INCEPTION_WEIGHTS_URL} (eval.inception_weights)")
        module.load_state_dict(state_dict)
        self.module = module.to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights_path = path
        self.weights_sha256 = sha256_file(path)
        self.official_weights = self.weights_sha256.startswith(INCEPTION_SHA256_PREFIX)
        if not self.official_weights:
            log.warning("Inception weights %s (sha256 %s...) are not %s (sha256 %s...): FID values will "
                        "not be comparable with published ones", path, self.weights_sha256[:8],
                        INCEPTION_WEIGHTS_FILE, INCEPTION_SHA256_PREFIX)
        self.name = "inception-v3-compat-pool3"
        self.dim = INCEPTION_DIM

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        images = check_uint8_images(images)
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start:start + self.batch_size]  # (b, 3, H, W) uint8
            if self.resize == "pil_bicubic":
                batch = resize_pil_bicubic(batch, INCEPTION_SIZE)
            (features,) = self.module(batch.to(self.device))  # (b, 2048) float32
            out.append(features.to("cpu", torch.float64).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "implementation": f"torch-fidelity=={torch_fidelity.__version__}",
                "weights_file": self.weights_path.name, "weights_sha256": self.weights_sha256,
                "official_weights": self.official_weights, "resize": self.resize,
                "input_size": INCEPTION_SIZE}


# ----------------------------------------------------------------------------- digits demo


class DigitFeatures:
    """The demo digit classifier's hidden ReLU activations of uint8 images (B, 3, H, W)."""

    def __init__(self, classifier_path: str | os.PathLike) -> None:

        self.classifier_path = Path(classifier_path)
        self.classifier = DigitClassifier.load(self.classifier_path)
        self.classifier_sha256 = sha256_file(self.classifier_path)
        self.name = "digit-classifier-hidden"
        self.dim = int(self.classifier.hidden_bias.shape[0])

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        images = check_uint8_images(images)
        return self.classifier.features(images, value_range=(0.0, 255.0))  # (B, hidden) float64

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "weights_file": self.classifier_path.name,
                "weights_sha256": self.classifier_sha256,
                "resize": "area average to 8x8 (data_pipeline.demo_digits.to_classifier_input)"}


FEATURE_KINDS = ("inception", "digits")


def build_feature_extractor(kind: str, *, inception_weights: str | None = None,
                            digit_classifier: str | None = None, resize: str = "torch_bilinear",
                            device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor for ``kind`` (``"inception"`` or ``"digits"``). ``resize`` applies to
    Inception only (the digit classifier has its own fixed 8x8 mapping) but is validated always."""
    check_resize(resize)
    if kind == "inception":
        if not inception_weights:
            raise ValueError(f"eval.inception_weights is not set; FID with Inception needs the path of "
                             f"{INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL})")
        return InceptionFeatures(inception_weights, resize=resize, device=device)
    if kind == "digits":
        if not digit_classifier:
            raise ValueError("feature extractor 'digits' needs digit_classifier: the path of the "
                             "demo's digit_classifier.json (written by build_digits_shards)")
        return DigitFeatures(digit_classifier)
    raise ValueError(f"feature extractor kind={kind!r} is invalid; allowed: {', '.join(FEATURE_KINDS)}")
