"""The demo job's embedded dataset: coloured handwritten digits with captions, as webdataset shards.

Built from the 1,797 8x8 handwritten digits that ship inside scikit-learn
(``sklearn.datasets.load_digits``, the UCI optical-digits test set; nothing is downloaded). Each
digit is upscaled, drawn in a named colour on a white background and captioned truthfully
("a red handwritten seven on a white background"), then written in img2dataset's webdataset layout
(``{key}.png``, ``{key}.txt``, ``{key}.json`` per sample; 9-digit keys) as ``train-NNNNNN.tar``
and a held-out ``val-NNNNNN.tar``, with a ``manifest.json`` beside them. The build is
deterministic: the same seed gives byte-identical files.

A small digit classifier is trained during the build and saved as JSON (no pickle).
``DigitClassifier.predict`` maps a generated RGB image back to the classifier's 8x8 input space,
so the demo can check that samples prompted with a digit show that digit.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from data_pipeline.writer import ShardWriter
from trainer.images import atomic_write_bytes

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Every stroke colour has one channel at 0, so on a white background 1 - min(R, G, B) recovers
# the ink coverage exactly whatever the colour (see ``to_classifier_input``).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 0, 0),
    "green": (0, 150, 0),
    "blue": (0, 60, 230),
    "yellow": (245, 200, 0),
    "purple": (130, 0, 170),
    "orange": (255, 120, 0),
    "black": (0, 0, 0),
}
BACKGROUND_NAME = "white"
CAPTION_TEMPLATE = "a {color} handwritten {digit} on a {background} background"
BACKGROUND_RGB = (255, 255, 255)
SOURCE = "sklearn.load_digits"
# sklearn's digits are 4x4-block counts of set pixels in a 32x32 bitmap: integers in 0..16.
DIGITS_MAX_VALUE = 16.0
DIGITS_SIZE = 8
KEY_DIGITS = 9  # img2dataset's key width: "000000042"
MANIFEST_NAME = "manifest.json"
CLASSIFIER_NAME = "digit_classifier.json"
MANIFEST_VERSION = 1
CLASSIFIER_FORMAT = "ldm-platform/digit-classifier"
CLASSIFIER_VERSION = 1
_SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")


@dataclass(frozen=True)
class DemoDigitsConfig:
    """Settings of the embedded digits dataset; validated before anything is built."""

    image_size: int = 32
    samples_per_shard: int = 256
    seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or not DIGITS_SIZE <= self.image_size <= 1024:
            raise ValueError(f"image_size={self.image_size!r} must be an integer in "
                             f"[{DIGITS_SIZE}, 1024] (the source digits are {DIGITS_SIZE}x{DIGITS_SIZE})")
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard!r} must be a positive integer")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 0.5)")


@dataclass(frozen=True)
class DigitsDatasetInfo:
    """What a build wrote; ``train_url`` / ``val_url`` are webdataset brace patterns."""

    out_dir: Path
    train_shards: tuple[str, ...]
    val_shards: tuple[str, ...]
    num_train: int
    num_val: int
    image_size: int
    seed: int
    classifier_path: Path
    classifier_accuracy_val_digits: float
    classifier_accuracy_val_rendered: float
    manifest_path: Path

    @property
    def train_url(self) -> str:
        return _brace_url(self.out_dir, "train", len(self.train_shards))

    @property
    def val_url(self) -> str:
        return _brace_url(self.out_dir, "val", len(self.val_shards))


def _brace_url(out_dir: Path, split: str, num_shards: int) -> str:
    if num_shards == 1:
        return str(out_dir / f"{split}-000000.tar")
    return str(out_dir / f"{split}-{{000000..{num_shards - 1:06d}}}.tar")


# ----------------------------------------------------------------------------- image mapping


def caption_for(digit: int, color: str) -> str:
    return CAPTION_TEMPLATE.format(color=color, digit=DIGIT_NAMES[digit], background=BACKGROUND_NAME)


def render_digit(digit_8x8: np.ndarray, color: str, image_size: int) -> np.ndarray:
    """One sklearn digit (8x8, 0..16) -> (image_size, image_size, 3) uint8, stroke in ``color``.

    The ink coverage is upscaled bicubically (PIL, float mode, clipped to [0, 1]) and composited
    over the white background: pixel = (1 - ink) * background + ink * colour.
    """
    ink = np.asarray(digit_8x8, dtype=np.float32) / DIGITS_MAX_VALUE  # (8, 8)
    ink = Image.fromarray(ink).resize((image_size, image_size), Image.Resampling.BICUBIC)
    ink = np.clip(np.asarray(ink, dtype=np.float64), 0.0, 1.0)[..., None]  # (S, S, 1)
    rgb = (1.0 - ink) * np.asarray(BACKGROUND_RGB) + ink * np.asarray(PALETTE[color])
    return np.round(rgb).astype(np.uint8)  # (S, S, 3)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging each output cell's exact share of the input pixels."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _as_channels_last(images: Any, value_range: tuple[float, float] | None) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        # Integer tensors keep their dtype: it decides the default value range below.
        images = images.detach().cpu()
        images = (images.to(torch.float64) if images.is_floating_point() else images).numpy()
    arr = np.asarray(images)
    if value_range is None:
        value_range = (0.0, 255.0) if np.issubdtype(arr.dtype, np.integer) else (0.0, 1.0)
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range={value_range!r} must be (low, high) with high > low")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"images of shape {tuple(np.shape(images))}: expected (B, C, H, W), "
                         "(B, H, W, C), (C, H, W) or (H, W, C) with C = 3 (RGB) or 1 (grey)")
    if arr.shape[1] in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
    elif arr.shape[-1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(np.shape(images))} have neither 1 nor 3 channels "
                         "in dimension 1 or -1")
    arr = (arr.astype(np.float64) - lo) / (hi - lo)
    return np.clip(arr, 0.0, 1.0)  # (B, H, W, C) in [0, 1]


def to_classifier_input(images: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """RGB images on the white background -> (B, 8, 8) in sklearn's 0..16 digit space.

    ``images``: ``np.ndarray`` or ``torch.Tensor``, (B, 3, H, W) or (B, H, W, 3) (or without the
    batch dimension; C may be 1 for greyscale), any H, W. ``value_range``: the pixel range,
    (0, 1) by default for floats, (0, 255) for integer arrays; pass (-1, 1) for diffusion outputs.
    Ink = 1 - min over channels (exact for the palette: every stroke colour has a zero channel),
    area-averaged down to 8x8, then stretched per image to 0..16, so a faint or off-white sample
    is judged by its shape, not its contrast.
    """
    rgb = _as_channels_last(images, value_range)  # (B, H, W, C)
    ink = 1.0 - rgb.min(axis=-1)  # (B, H, W)
    rows = _area_matrix(ink.shape[1], DIGITS_SIZE)  # (8, H)
    cols = _area_matrix(ink.shape[2], DIGITS_SIZE)  # (8, W)
    small = np.einsum("ih,bhw,jw->bij", rows, ink, cols)  # (B, 8, 8)
    return _stretch(small * DIGITS_MAX_VALUE)


def _stretch(digits: np.ndarray) -> np.ndarray:
    """Per-image min-max stretch to 0..16 (sklearn digits already span it, so they barely move)."""
    flat = digits.reshape(len(digits), -1)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((flat - lo) / span * DIGITS_MAX_VALUE).reshape(digits.shape)


# ----------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class DigitClassifier:
    """A one-hidden-layer ReLU MLP on 8x8 digits (0..16), evaluated with numpy alone.

    Trained with scikit-learn's ``MLPClassifier`` during the build; stored as JSON (weights as
    exact float reprs), never pickled.
    """

    hidden_weight: np.ndarray  # (64, hidden)
    hidden_bias: np.ndarray  # (hidden,)
    output_weight: np.ndarray  # (hidden, 10)
    output_bias: np.ndarray  # (10,)

    def __post_init__(self) -> None:
        num_inputs = DIGITS_SIZE * DIGITS_SIZE
        hidden = self.hidden_bias.shape[0] if self.hidden_bias.ndim == 1 else -1
        expected = {"hidden_weight": (num_inputs, hidden), "hidden_bias": (hidden,),
                    "output_weight": (hidden, len(DIGIT_NAMES)), "output_bias": (len(DIGIT_NAMES),)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape or hidden < 1:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}; expected {shape} "
                                 f"(64 inputs, {len(DIGIT_NAMES)} classes)")

    @classmethod
    def fit(cls, digits: np.ndarray, labels: np.ndarray, *, seed: int, hidden: int = 64,
            alpha: float = 0.1) -> DigitClassifier:
        """Fit on (N, 8, 8) digits in 0..16 (stretched like ``to_classifier_input``)."""
        # Imported here: scikit-learn takes seconds to import and only the demo's dataset build needs it.
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits

        x = _stretch(np.asarray(digits, dtype=np.float64)).reshape(len(digits), -1) / DIGITS_MAX_VALUE
        mlp = MLPClassifier(hidden_layer_sizes=(hidden,), solver="lbfgs", alpha=alpha,
                            max_iter=500, random_state=seed)
        # One BLAS thread: multi-threaded reductions change the last bits of the weights between
        # runs, and the build promises byte-identical outputs.
        with threadpool_limits(limits=1):
            mlp.fit(x, np.asarray(labels))
        if list(mlp.classes_) != list(range(len(DIGIT_NAMES))):
            raise ValueError(f"training labels cover {list(mlp.classes_)}, not all digits 0..9")
        # The 1/16 input scale is folded into the first layer so the stored model reads 0..16.
        return cls(hidden_weight=mlp.coefs_[0] / DIGITS_MAX_VALUE, hidden_bias=mlp.intercepts_[0],
                   output_weight=mlp.coefs_[1], output_bias=mlp.intercepts_[1])

    def _hidden(self, digits: np.ndarray) -> np.ndarray:
        """(B, 8, 8) in 0..16 -> (B, hidden) ReLU activations."""
        x = np.asarray(digits, dtype=np.float64).reshape(len(digits), -1)  # (B, 64)
        return np.maximum(x @ self.hidden_weight + self.hidden_bias, 0.0)  # (B, hidden)

    def logits(self, digits: np.ndarray) -> np.ndarray:
        """(B, 8, 8) in 0..16 -> (B, 10) logits."""
        return self._hidden(digits) @ self.output_weight + self.output_bias  # (B, 10)

    def features(self, images: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
        """RGB images (see ``to_classifier_input``) -> (B, hidden) float64 penultimate-layer (ReLU)
        activations: the demo's cheap stand-in for Inception features in FID."""
        return self._hidden(to_classifier_input(images, value_range))

    def predict_digits(self, digits: np.ndarray) -> np.ndarray:
        """(B, 8, 8) sklearn-style digits (0..16) -> (B,) digit ids; stretched like images are."""
        return self.logits(_stretch(np.asarray(digits, dtype=np.float64))).argmax(axis=1)

    def predict(self, images: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
        """RGB images (see ``to_classifier_input`` for layouts and ranges) -> (B,) int64 digit ids."""
        return self.logits(to_classifier_input(images, value_range)).argmax(axis=1)

    def to_json(self) -> str:
        payload = {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION,
                   "input": "8x8 ink in 0..16, min-max stretched per image; see to_classifier_input",
                   "activation": "relu", "classes": list(DIGIT_NAMES),
                   "hidden_weight": self.hidden_weight.tolist(), "hidden_bias": self.hidden_bias.tolist(),
                   "output_weight": self.output_weight.tolist(), "output_bias": self.output_bias.tolist()}
        return json.dumps(payload, sort_keys=True)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> DigitClassifier:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"digit classifier {path} does not exist; build_digits_shards "
                                    f"writes it as {CLASSIFIER_NAME} beside the shards")
        payload = json.loads(path.read_text())
        if payload.get("format") != CLASSIFIER_FORMAT or payload.get("version") != CLASSIFIER_VERSION:
            raise ValueError(f"{path}: format={payload.get('format')!r} version={payload.get('version')!r}; "
                             f"expected {CLASSIFIER_FORMAT!r} version {CLASSIFIER_VERSION}")
        return cls(**{name: np.asarray(payload[name], dtype=np.float64)
                      for name in ("hidden_weight", "hidden_bias", "output_weight", "output_bias")})


# ----------------------------------------------------------------------------- writing


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _split_indices(labels: np.ndarray, val_fraction: float, rng: np.random.Generator):
    """Stratified split: the same share of every digit goes to validation."""
    val = []
    for digit in range(len(DIGIT_NAMES)):
        idx = np.flatnonzero(labels == digit)
        val.extend(rng.permutation(idx)[:round(val_fraction * len(idx))].tolist())
    val_idx = np.sort(np.asarray(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def build_digits_shards(out_dir: str | os.PathLike, *, image_size: int = 32,
                        samples_per_shard: int = 256, seed: int = 0,
                        val_fraction: float = 0.1) -> DigitsDatasetInfo:
    """Build the coloured-digits dataset and its digit classifier into ``out_dir``.

    Writes ``train-NNNNNN.tar`` (shuffled), ``val-NNNNNN.tar`` (stratified held-out split),
    ``digit_classifier.json`` and ``manifest.json`` (last: its presence marks a complete build).
    Every file is written atomically; shards left from an earlier build with more shards are
    removed. Deterministic: the same arguments give byte-identical files.
    """
    cfg = DemoDigitsConfig(image_size=image_size, samples_per_shard=samples_per_shard, seed=seed,
                           val_fraction=val_fraction)
    from sklearn.datasets import load_digits  # (heavy; only this build needs it)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images = digits.images.astype(np.float64)  # (1797, 8, 8) in 0..16
    labels = digits.target.astype(np.int64)  # (1797,)

    split_rng, color_rng, order_rng = (np.random.default_rng(s)
                                       for s in np.random.SeedSequence(cfg.seed).spawn(3))
    train_idx, val_idx = _split_indices(labels, cfg.val_fraction, split_rng)
    train_idx = order_rng.permutation(train_idx)  # webdataset reads shards in order: pre-shuffle
    color_names = list(PALETTE)
    colors = [color_names[c] for c in color_rng.integers(len(color_names), size=len(labels))]

    rendered: dict[int, np.ndarray] = {}
    written: dict[str, list[str]] = {}
    counts: dict[str, list[int]] = {}
    next_key = 0
    for split, indices in (("train", train_idx), ("val", val_idx)):
        names, sizes = [], []
        for shard_id, start in enumerate(range(0, len(indices), cfg.samples_per_shard)):
            members = []
            for source_index in indices[start:start + cfg.samples_per_shard].tolist():
                key = f"{next_key:0{KEY_DIGITS}d}"
                next_key += 1
                digit, color = int(labels[source_index]), colors[source_index]
                rgb = render_digit(images[source_index], color, cfg.image_size)
                rendered[source_index] = rgb
                meta = {"key": key, "caption": caption_for(digit, color), "width": cfg.image_size,
                        "height": cfg.image_size, "original_width": DIGITS_SIZE,
                        "original_height": DIGITS_SIZE, "digit": digit, "color": color,
                        "color_rgb": list(PALETTE[color]), "background": BACKGROUND_NAME,
                        "source": SOURCE, "source_index": source_index, "split": split}
                members.append((key, {"json": json.dumps(meta, sort_keys=True).encode(), "png": _png_bytes(rgb),
                                      "txt": meta["caption"].encode()}))
            name = f"{split}-{shard_id:06d}.tar"
            with ShardWriter(out / name) as writer:  # deterministic headers, committed atomically
                for key, parts in members:
                    writer.write(key, parts)
            names.append(name)
            sizes.append(len(members))
        written[split], counts[split] = names, sizes

    for stale in sorted(out.iterdir()):
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in written["train"] + written["val"]:
            log.info("removing %s left by an earlier build", stale)
            stale.unlink()

    # Trained on the training digits twice over: as sklearn gives them and as they come back from
    # the rendered images, so the classifier knows the bicubic round trip the demo's samples take.
    train_roundtrip = to_classifier_input(np.stack([rendered[i] for i in train_idx.tolist()]))
    classifier = DigitClassifier.fit(np.concatenate([images[train_idx], train_roundtrip]),
                                     np.concatenate([labels[train_idx], labels[train_idx]]),
                                     seed=cfg.seed)
    classifier.save(out / CLASSIFIER_NAME)
    acc_digits = float((classifier.predict_digits(images[val_idx]) == labels[val_idx]).mean())
    val_rgb = np.stack([rendered[i] for i in val_idx.tolist()])  # (V, S, S, 3)
    acc_rendered = float((classifier.predict(val_rgb) == labels[val_idx]).mean())

    manifest = {
        "version": MANIFEST_VERSION, "source": SOURCE, "image_size": cfg.image_size,
        "seed": cfg.seed, "samples_per_shard": cfg.samples_per_shard,
        "val_fraction": cfg.val_fraction, "background": BACKGROUND_NAME,
        "palette": {k: list(v) for k, v in PALETTE.items()},
        "caption_template": CAPTION_TEMPLATE.replace("{background}", BACKGROUND_NAME),
        "train": {"shards": written["train"], "num_samples": int(sum(counts["train"])),
                  "samples_per_shard": counts["train"]},
        "val": {"shards": written["val"], "num_samples": int(sum(counts["val"])),
                "samples_per_shard": counts["val"]},
        "classifier": {"file": CLASSIFIER_NAME, "accuracy_val_digits": acc_digits,
                       "accuracy_val_rendered": acc_rendered},
    }
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    log.info("digits dataset: %d train / %d val samples in %s; classifier accuracy %.3f (8x8 val), "
             "%.3f (rendered val)", sum(counts["train"]), sum(counts["val"]), out, acc_digits, acc_rendered)
    return read_digits_manifest(out)


def read_digits_manifest(out_dir: str | os.PathLike) -> DigitsDatasetInfo:
    """The ``DigitsDatasetInfo`` of a finished build (``FileNotFoundError`` if there is none)."""
    out = Path(out_dir)
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run build_digits_shards({str(out)!r}) first")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: version={manifest.get('version')!r}; expected {MANIFEST_VERSION}")
    return DigitsDatasetInfo(
        out_dir=out, train_shards=tuple(manifest["train"]["shards"]),
        val_shards=tuple(manifest["val"]["shards"]), num_train=manifest["train"]["num_samples"],
        num_val=manifest["val"]["num_samples"], image_size=manifest["image_size"],
        seed=manifest["seed"], classifier_path=out / manifest["classifier"]["file"],
        classifier_accuracy_val_digits=manifest["classifier"]["accuracy_val_digits"],
        classifier_accuracy_val_rendered=manifest["classifier"]["accuracy_val_rendered"],
        manifest_path=path)


def ensure_digits(root: str | os.PathLike, *, image_size: int, seed: int, rank: int = 0,
                  barrier: Callable[[], None] = lambda: None) -> DigitsDatasetInfo:
    """The digits dataset in ``root``, built by rank 0 when missing or built with another size or
    seed; the other ranks wait at ``barrier`` (the job's, when it has several processes)."""
    if rank == 0:
        try:
            info = read_digits_manifest(root)
            if info.image_size != image_size or info.seed != seed:
                raise FileNotFoundError(root)
        except (FileNotFoundError, ValueError):
            log.info("building the digits dataset in %s", root)
            build_digits_shards(root, image_size=image_size, seed=seed)
    barrier()
    return read_digits_manifest(root)
