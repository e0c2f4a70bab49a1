"""Samples/s per core of the streaming data pipeline (``data_pipeline.stream``) against a plain
webdataset + PIL pipeline doing the same work, on the same shards of realistic JPEGs, read from
local disk and from a local S3 server (moto).

    python bench/loader.py [--samples 384] [--sizes 256,512] [--rounds 3] [--no-s3] [--json PATH]
                           [--data-dir .cache/bench/loader_shards] [--data-samples 400] [--data-shards 4]

The work, per sample, for both pipelines: read the tar member bytes, decode the JPEG, convert to
RGB, resize with bicubic filtering so the shorter side is the target size S (aspect kept), center
crop S x S, decode the UTF-8 caption, and stack 32 samples into a ``(B, 3, S, S)`` uint8 tensor.

- ours: ``StreamingBatches(StreamSpec(...), num_workers=0)``, ``Transform(crop="center", draft=True)``,
  one canonical stream, no shuffle buffer and shards in order (so both pipelines see the same samples
  in the same order).
- baseline: ``webdataset.WebDataset(urls, shardshuffle=False).repeat().map(...).batched(32)``; the map
  decodes ``.jpg`` with PIL in full and ``.txt`` by hand (webdataset's ``.decode()`` is not used: its
  default handlers include pickle ones).

Both run in this one process with one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``,
no dataloader workers), so samples/s is samples/s per core. The table also gives samples per CPU
second of the process (``time.process_time``: all its threads, s3fs's I/O thread included), which
machine load from other processes does not dilute.

S3. Both read ``s3://`` URLs through the same fsspec/s3fs client with the same options
(``StreamSpec.options_for``): our pipeline opens shards with ``fsspec.open``; for webdataset an
``s3`` handler is put in ``webdataset.gopen_schemes`` for the run that returns
``fsspec.open(url, "rb", **options).open()``. webdataset's usual ``pipe:aws s3 cp ... -`` was not
used: the copy would run in a second process, on another core, outside a single-core figure, and
would measure a different S3 client than ours.

Timing. Each measurement builds a fresh pipeline, draws one batch untimed (imports, first shard
open, connection set-up), then times ``--samples`` samples (rounded up to whole batches); streams
wrap around the dataset like epochs do. The two pipelines alternate within each (source, size)
cell, order reversed every round, so drift in machine load hits both alike; the median over
``--rounds`` rounds is reported.

Same output. Before timing, the first two batches of both pipelines are compared key by key at
every size: same shape and dtype (else the bench stops), and the mean absolute pixel difference
(0-255), which is not zero because our pipeline decodes large JPEGs at reduced DCT scale
(``Image.draft``) before the resize.

Data. ``--data-samples`` JPEGs (quality 90, seeded) in ``--data-shards`` img2dataset-layout shards
(``.jpg``, ``.txt``, ``.json``), built once into ``--data-dir`` with ``ShardWriter`` and reused while
``manifest.json`` matches the parameters and every shard's sha256. Images are random crops of
scikit-image's bundled photographs (``PHOTOS``), rescaled (Lanczos) to a longer side drawn from
300-1500 px and an aspect ratio from 1:2 to 2:1, with Gaussian grain (sigma ``GRAIN_SIGMA``) so that
upscaled crops carry the high-frequency detail, and thus the JPEG bit rate, of camera photos.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.decode import Transform  # noqa: E402
from data_pipeline.position import SourceInfo  # noqa: E402
from data_pipeline.sources import S3Options  # noqa: E402
from data_pipeline.stream import StreamingBatches, StreamSpec  # noqa: E402
from data_pipeline.writer import ShardWriter  # noqa: E402

DEFAULT_DATA_DIR = ROOT / ".cache" / "bench" / "loader_shards"
GOAL_RATIO = 1.5  # ours / baseline samples/s the pipeline is meant to reach
# Mean absolute pixel difference (0-255) above which the two outputs are flagged as not the same work.
PIXEL_TOLERANCE = 4.0
MANIFEST = "manifest.json"
DATASET_VERSION = 2  # bump when the generator below changes what it writes
JPEG_QUALITY = 90
MIN_SIDE, MAX_SIDE = 300, 1500
MAX_ASPECT = 2.0
GRAIN_SIGMA = 2.5
# scikit-image photographs bundled in the package (no download): name -> caption subject.
PHOTOS: dict[str, str] = {
    "astronaut": "an astronaut in a white spacesuit in front of a flag",
    "chelsea": "a tabby cat looking to the side",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on the launch pad",
    "hubble_deep_field": "a deep field of distant galaxies",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "retina": "a fundus photograph of a human retina",
    "stereo_motorcycle": "a motorcycle in a studio",
}
_STYLES = ("a photo of", "a close-up of", "a high resolution photograph of", "stock photo:", "a picture of",
           "an image showing")
_EXTRAS = ("", ", detailed", ", natural light", ", 4k", ", award winning", ", on a dark background",
           ", shallow depth of field")
PIPELINES = ("baseline", "ours")
S3_BUCKET = "bench-loader"


@dataclass
class BenchConfig:
    samples: int = 384
    sizes: list[int] = field(default_factory=lambda: [256, 512])
    rounds: int = 3
    batch_size: int = 32
    s3: bool = True
    data_dir: str = str(DEFAULT_DATA_DIR)
    data_samples: int = 400
    data_shards: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for key, minimum in (("samples", 1), ("rounds", 1), ("batch_size", 1), ("data_shards", 1)):
            if getattr(self, key) < minimum:
                raise ValueError(f"{key}={getattr(self, key)} must be an integer >= {minimum}")
        if self.data_samples < self.data_shards:
            raise ValueError(f"data_samples={self.data_samples} must be >= data_shards={self.data_shards} "
                             "(every shard needs a sample)")
        if not self.sizes or any(s < 8 for s in self.sizes):
            raise ValueError(f"sizes={self.sizes} must be a non-empty list of integers >= 8")

    @property
    def num_batches(self) -> int:
        return -(-self.samples // self.batch_size)


# ----------------------------------------------------------------------------- dataset


def _photos() -> dict[str, np.ndarray]:
    """The bundled photographs as (H, W, 3) uint8; photographs this scikit-image lacks are left out."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except (AttributeError, ModuleNotFoundError, OSError, ValueError):
            continue  # not bundled in this scikit-image (fetching it would need the network)
        image = image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            out[name] = image
    if not out:
        raise FileNotFoundError(f"none of the scikit-image photographs {list(PHOTOS)} is available offline; "
                                "install scikit-image==0.26.0 (pip install -e '.[test]')")
    return out


def make_image(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A (H, W, 3) uint8 crop of ``photo`` rescaled to a longer side in [MIN_SIDE, MAX_SIDE] and an
    aspect ratio within MAX_ASPECT both ways, flipped at random, with Gaussian grain."""
    longer = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    aspect = float(np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT))))  # width / height
    width, height = (longer, round(longer / aspect)) if aspect >= 1 else (round(longer * aspect), longer)
    width, height = max(width, MIN_SIDE), max(height, MIN_SIDE)
    ph, pw = photo.shape[:2]
    # The largest crop of the photo with the target's aspect, shrunk by a random factor.
    crop_w = min(pw, ph * width / height) * rng.uniform(0.5, 1.0)
    crop_h = crop_w * height / width
    left = rng.uniform(0, pw - crop_w)
    top = rng.uniform(0, ph - crop_h)
    img = Image.fromarray(photo).resize((width, height), Image.LANCZOS, box=(left, top, left + crop_w, top + crop_h))
    arr = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr + rng.normal(0.0, GRAIN_SIGMA, arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dataset_params(num_samples: int, num_shards: int, seed: int) -> dict[str, Any]:
    return {"version": DATASET_VERSION, "num_samples": num_samples, "num_shards": num_shards, "seed": seed,
            "jpeg_quality": JPEG_QUALITY, "sides": [MIN_SIDE, MAX_SIDE], "max_aspect": MAX_ASPECT,
            "grain_sigma": GRAIN_SIGMA, "photos": list(PHOTOS)}


def _manifest_ok(data_dir: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest when it matches ``params`` and every shard it lists (size and sha256), else None."""
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if manifest.get("params") != params:
        return None
    for shard in manifest.get("shards", []):
        path = data_dir / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"] or _sha256(path) != shard["sha256"]:
            return None
    return manifest if manifest.get("shards") else None


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_dataset(data_dir: str | os.PathLike[str], num_samples: int, num_shards: int,
                  seed: int = 0) -> dict[str, Any]:
    """Write (or reuse) the bench shards in ``data_dir``; returns the manifest: ``params``, ``shards``
    (name, bytes, sha256, num_samples, in URL order), ``stats`` (image sizes and JPEG bit rate) and
    ``reused``. Everything is a function of the arguments; a shard set whose manifest does not match
    them, or whose bytes do not match the manifest, is rebuilt."""
    data_dir = Path(data_dir)
    params = _dataset_params(num_samples, num_shards, seed)
    manifest = _manifest_ok(data_dir, params)
    if manifest is not None:
        return {**manifest, "reused": True}
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MANIFEST).unlink(missing_ok=True)  # a build cut short leaves no manifest behind
    photos = _photos()
    names = sorted(photos)
    per_shard = np.array_split(np.arange(num_samples), num_shards)
    shards, widths, heights, jpeg_bytes = [], [], [], []
    for shard, indices in enumerate(per_shard):
        name = f"{shard:05d}.tar"
        with ShardWriter(data_dir / name) as writer:
            for index_in_shard, i in enumerate(indices):
                rng = np.random.default_rng([seed, int(i)])
                photo_name = names[int(rng.integers(len(names)))]
                image = make_image(photos[photo_name], rng)
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
                jpg = buf.getvalue()
                caption = (f"{_STYLES[int(rng.integers(len(_STYLES)))]} {PHOTOS[photo_name]}"
                           f"{_EXTRAS[int(rng.integers(len(_EXTRAS)))]}")
                key = f"{shard:05d}{index_in_shard:04d}"
                height, width = image.shape[:2]
                meta = {"key": key, "caption": caption, "url": f"https://images.example.invalid/{key}.jpg",
                        "width": width, "height": height, "original_width": width, "original_height": height,
                        "status": "success", "error_message": None, "sha256": hashlib.sha256(jpg).hexdigest(),
                        "similarity": round(float(rng.uniform(0.25, 0.4)), 4),
                        "aesthetic": round(float(rng.uniform(4.5, 7.0)), 4),
                        "pwatermark": round(float(rng.uniform(0.0, 0.3)), 4)}
                writer.write(key, {"jpg": jpg, "txt": caption.encode(), "json": json.dumps(meta).encode()})
                widths.append(width)
                heights.append(height)
                jpeg_bytes.append(len(jpg))
        path = data_dir / name
        shards.append({"name": name, "bytes": path.stat().st_size, "sha256": _sha256(path),
                       "num_samples": len(indices)})
    pixels = np.asarray(widths, dtype=np.float64) * np.asarray(heights, dtype=np.float64)
    stats = {"photos_used": names, "min_side": int(min(min(w, h) for w, h in zip(widths, heights))),
             "max_side": int(max(max(w, h) for w, h in zip(widths, heights))),
             "mean_megapixels": float(pixels.mean() / 1e6),
             "mean_jpeg_kib": float(np.mean(jpeg_bytes) / 1024),
             "bits_per_pixel": float(8 * np.sum(jpeg_bytes) / pixels.sum()),
             "short_sides": [int(min(w, h)) for w, h in zip(widths, heights)]}
    manifest = {"params": params, "shards": shards, "stats": stats}
    _write_json_atomic(data_dir / MANIFEST, manifest)
    return {**manifest, "reused": False}


# ----------------------------------------------------------------------------- the two pipelines


def baseline_transform(jpg: bytes, size: int) -> np.ndarray:
    """(size, size, 3) uint8: full PIL decode, RGB, bicubic resize of the shorter side to ``size``
    (the same rounding as ``data_pipeline.decode.decode_to``), center crop."""
    img = Image.open(io.BytesIO(jpg)).convert("RGB")
    w, h = img.size
    scale = max(size / h, size / w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _baseline_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).contiguous()
    return {"images": images, "captions": [s["caption"] for s in samples], "keys": [s["key"] for s in samples]}


@contextmanager
def webdataset_s3_opener(options_for: Callable[[str], dict[str, Any]]) -> Iterator[None]:
    """Let webdataset open ``s3://`` URLs with fsspec/s3fs and ``options_for(url)``, for the block."""
    import fsspec
    import webdataset

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
        return fsspec.open(url, mode, **options_for(url)).open()

    previous = webdataset.gopen_schemes.get("s3")
    webdataset.gopen_schemes["s3"] = gopen_s3
    try:
        yield
    finally:
        if previous is None:
            webdataset.gopen_schemes.pop("s3", None)
        else:
            webdataset.gopen_schemes["s3"] = previous


def baseline_batches(urls: list[str], size: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """Endless batches from plain webdataset + PIL: {"images": (B, 3, S, S) uint8, "captions", "keys"}."""
    import webdataset as wds

    def decode(sample: dict[str, Any]) -> dict[str, Any]:
        return {"image": baseline_transform(sample["jpg"], size), "caption": sample["txt"].decode("utf-8").strip(),
                "key": sample["__key__"]}

    # The sample stream repeats (epochs), not the batched pipeline: ``.repeat()`` on the whole
    # pipeline would restart batching every epoch and drop each epoch's last partial batch.
    samples = wds.WebDataset(urls, shardshuffle=False).repeat()
    return iter(wds.DataPipeline(samples, wds.map(decode),
                                 wds.batched(batch_size, collation_fn=_baseline_collate, partial=False)))


def ours_spec(urls: list[str], size: int, batch_size: int, *, draft: bool = True, s3: S3Options = S3Options(),
              storage_options: dict[str, Any] | None = None) -> StreamSpec:
    return StreamSpec(sources=(SourceInfo("bench", tuple(urls)),), weights=(1.0,), image_size=size,
                      batch_size=batch_size, shuffle_shards=False, shuffle_buffer=0, num_streams=1,
                      transform=Transform(crop="center", draft=draft), s3=s3,
                      storage_options=tuple(sorted((storage_options or {}).items())))


def ours_batches(spec: StreamSpec) -> Iterator[dict[str, Any]]:
    """Endless batches from ``StreamingBatches`` (one process, no workers)."""
    batches = StreamingBatches(spec, rank=0, world_size=1, num_workers=0)
    try:
        while True:
            yield batches.next_batch()
    finally:
        batches.close()


# ----------------------------------------------------------------------------- measuring


@dataclass
class Timing:
    samples: int
    wall_s: float
    cpu_s: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s

    @property
    def samples_per_cpu_s(self) -> float:
        return self.samples / self.cpu_s


def _check_batch(batch: dict[str, Any], size: int, batch_size: int, what: str) -> None:
    images = batch["images"]
    if tuple(images.shape) != (batch_size, 3, size, size) or images.dtype != torch.uint8:
        raise ValueError(f"{what}: batch images are {tuple(images.shape)} {images.dtype}; expected "
                         f"({batch_size}, 3, {size}, {size}) torch.uint8")


def _close(batches: Iterator[Any]) -> None:
    close = getattr(batches, "close", None)  # generators: runs their ``finally`` (closes the shard files)
    if close is not None:
        close()


def time_batches(make: Callable[[], Iterator[dict[str, Any]]], num_batches: int, size: int, batch_size: int,
                 what: str) -> Timing:
    """Time ``num_batches`` batches of a fresh pipeline after one untimed batch."""
    batches = make()
    try:
        _check_batch(next(batches), size, batch_size, what)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(num_batches):
            batch = next(batches)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        _check_batch(batch, size, batch_size, what)
    finally:
        _close(batches)
    return Timing(num_batches * batch_size, wall, cpu)


def compare_outputs(baseline: Iterator[dict[str, Any]], ours: Iterator[dict[str, Any]], num_batches: int,
                    size: int, batch_size: int) -> dict[str, Any]:
    """Draw ``num_batches`` from both; the images of the keys both produced, compared pixel by pixel."""
    got: dict[str, dict[str, np.ndarray]] = {"baseline": {}, "ours": {}}
    for name, batches in (("baseline", baseline), ("ours", ours)):
        for _ in range(num_batches):
            batch = next(batches)
            _check_batch(batch, size, batch_size, name)
            for key, image in zip(batch["keys"], batch["images"].numpy()):
                got[name][key] = image
        _close(batches)
    keys = sorted(set(got["baseline"]) & set(got["ours"]))
    if not keys:
        raise ValueError(f"size {size}: the pipelines produced no common key "
                         f"(baseline {sorted(got['baseline'])[:3]}, ours {sorted(got['ours'])[:3]})")
    diffs = np.array([np.abs(got["ours"][k].astype(np.int16) - got["baseline"][k].astype(np.int16)).mean()
                      for k in keys])
    signed = np.array([(got["ours"][k].astype(np.float64) - got["baseline"][k]).mean() for k in keys])
    return {"size": size, "num_compared": len(keys), "shape": list(got["ours"][keys[0]].shape),
            "mean_abs_diff": float(diffs.mean()), "max_image_mean_abs_diff": float(diffs.max()),
            "mean_signed_diff": float(signed.mean()), "identical_images": int((diffs == 0).sum()),
            "within_tolerance": bool(diffs.mean() <= PIXEL_TOLERANCE)}


def measure_cell(cfg: BenchConfig, source: str, size: int, make: dict[str, Callable[[], Iterator]]) -> dict[str, Any]:
    """Both pipelines at one (source, size), alternating, ``cfg.rounds`` rounds; medians and ratios."""
    timings: dict[str, list[Timing]] = {name: [] for name in PIPELINES}
    for r in range(cfg.rounds):
        for name in (PIPELINES if r % 2 == 0 else PIPELINES[::-1]):
            timings[name].append(time_batches(make[name], cfg.num_batches, size, cfg.batch_size,
                                              f"{name} {source} {size}"))
    row: dict[str, Any] = {"source": source, "size": size, "samples": cfg.num_batches * cfg.batch_size}
    for name in PIPELINES:
        row[name] = {"samples_per_s": statistics.median(t.samples_per_s for t in timings[name]),
                     "samples_per_cpu_s": statistics.median(t.samples_per_cpu_s for t in timings[name]),
                     "rounds": [asdict(t) for t in timings[name]]}
    row["ratio"] = row["ours"]["samples_per_s"] / row["baseline"]["samples_per_s"]
    row["ratio_cpu"] = row["ours"]["samples_per_cpu_s"] / row["baseline"]["samples_per_cpu_s"]
    row["goal"] = GOAL_RATIO
    row["meets_goal"] = row["ratio"] >= GOAL_RATIO
    return row


def _makers(urls: list[str], size: int, batch_size: int, **spec_kwargs: Any) -> dict[str, Callable[[], Iterator]]:
    spec = ours_spec(urls, size, batch_size, **spec_kwargs)
    return {"baseline": lambda: baseline_batches(urls, size, batch_size), "ours": lambda: ours_batches(spec)}


@contextmanager
def s3_copy(data_dir: Path, shard_names: list[str], log_dir: Path) -> Iterator[tuple[list[str], S3Options, dict]]:
    """A moto S3 server on 127.0.0.1 holding the shards: (shard URLs, S3Options, extra storage options).
    The server is stopped (its process group, by id) when the block ends."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import MotoServer, make_bucket, s3_storage_options, upload_tree

    log_dir.mkdir(parents=True, exist_ok=True)
    with MotoServer(log_dir=log_dir) as server:
        options = s3_storage_options(server.endpoint_url)
        make_bucket(server.endpoint_url, S3_BUCKET)
        uploaded = set(upload_tree(data_dir, f"s3://{S3_BUCKET}/shards", options))
        urls = [f"s3://{S3_BUCKET}/shards/{name}" for name in shard_names]
        missing = [u for u in urls if u not in uploaded]
        if missing:
            raise FileNotFoundError(f"shards not uploaded to the S3 server: {missing}")
        extra = {k: v for k, v in options.items() if k != "endpoint_url"}  # credentials, region
        yield urls, S3Options(endpoint_url=server.endpoint_url), extra


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Build or reuse the data, check both pipelines give the same images, time every cell."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    data_dir = Path(cfg.data_dir)
    manifest = build_dataset(data_dir, cfg.data_samples, cfg.data_shards, cfg.seed)
    names = [s["name"] for s in manifest["shards"]]
    local_urls = [str(data_dir / n) for n in names]
    verify_batches = 2
    verification = []
    for size in cfg.sizes:
        make = _makers(local_urls, size, cfg.batch_size)
        check = compare_outputs(make["baseline"](), make["ours"](), verify_batches, size, cfg.batch_size)
        # JPEG draft mode decodes at 1/2 scale or less only where the shorter side is >= 2 * size.
        check["dataset_draft_fraction"] = float(np.mean([s >= 2 * size for s in manifest["stats"]["short_sides"]]))
        verification.append(check)
    rows = [measure_cell(cfg, "local", size, _makers(local_urls, size, cfg.batch_size)) for size in cfg.sizes]
    if cfg.s3:
        with s3_copy(data_dir, names, ROOT / ".cache" / "bench" / "moto_logs") as (urls, s3, extra):
            options_for = ours_spec(urls, cfg.sizes[0], cfg.batch_size, s3=s3, storage_options=extra).options_for
            with webdataset_s3_opener(options_for):
                rows += [measure_cell(cfg, "s3", size, _makers(urls, size, cfg.batch_size, s3=s3,
                                                                   storage_options=extra))
                         for size in cfg.sizes]
    import webdataset

    return {"config": asdict(cfg), "dataset": {k: manifest[k] for k in ("params", "stats", "reused")},
            "verification": verification, "rows": rows, "goal_ratio": GOAL_RATIO,
            "versions": {"torch": torch.__version__, "webdataset": webdataset.__version__,
                         "pillow": Image.__version__},
            "runtime_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------- report


def format_report(result: dict[str, Any]) -> str:
    cfg, stats = result["config"], result["dataset"]["stats"]
    lines = [f"data: {cfg['data_samples']} JPEGs (q{JPEG_QUALITY}) in {cfg['data_shards']} shards, sides "
             f"{stats['min_side']}-{stats['max_side']} px, mean {stats['mean_megapixels']:.2f} Mpx, "
             f"{stats['mean_jpeg_kib']:.0f} KiB, {stats['bits_per_pixel']:.2f} bit/px"
             f"{' (reused)' if result['dataset']['reused'] else ''}; photos: {', '.join(stats['photos_used'])}"]
    lines.append(f"same output (first {result['verification'][0]['num_compared']} keys, local): mean |ours - "
                 f"baseline| in 0-255 units; ! = above {PIXEL_TOLERANCE}")
    for v in result["verification"]:
        flag = "" if v["within_tolerance"] else " !"
        lines.append(f"  size {v['size']:>4}: shape {tuple(v['shape'])} both, mean abs diff {v['mean_abs_diff']:.3f}"
                     f" (worst image {v['max_image_mean_abs_diff']:.3f}, signed {v['mean_signed_diff']:+.3f}), "
                     f"{v['identical_images']}/{v['num_compared']} images identical{flag}; "
                     f"{v['dataset_draft_fraction']:.0%} of the dataset is decoded at reduced scale")
    lines.append(f"\nsamples/s, one process, one thread (= per core), median of {cfg['rounds']} rounds of "
                 f"{result['rows'][0]['samples']} samples, batch {cfg['batch_size']}; baseline = webdataset "
                 f"{result['versions']['webdataset']} + PIL full decode")
    header = (f"{'source':>6} | {'size':>4} | {'baseline/s':>10} | {'ours/s':>8} | {'ours/baseline':>13} | "
              f"{'goal':>9} | {'per CPU-s: baseline':>19} | {'ours':>7} | {'ratio':>5}")
    lines += [header, "-" * len(header)]
    for r in result["rows"]:
        goal = f">={r['goal']:.1f}x {'ok' if r['meets_goal'] else 'no'}"
        lines.append(f"{r['source']:>6} | {r['size']:>4} | {r['baseline']['samples_per_s']:>10.1f} | "
                     f"{r['ours']['samples_per_s']:>8.1f} | {r['ratio']:>12.2f}x | {goal:>9} | "
                     f"{r['baseline']['samples_per_cpu_s']:>19.1f} | {r['ours']['samples_per_cpu_s']:>7.1f} | "
                     f"{r['ratio_cpu']:>4.2f}x")
    lines.append(f"\nmeasured in {result['runtime_s']:.0f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str]) -> tuple[BenchConfig, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=384, help="timed samples per measurement (whole batches)")
    parser.add_argument("--sizes", default="256,512", help="target sizes S, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per pipeline and cell (median)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-s3", action="store_true", help="skip the measurements over a local S3 server")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="where the shards are built or reused")
    parser.add_argument("--data-samples", type=int, default=400)
    parser.add_argument("--data-shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise ValueError(f"sizes={args.sizes!r} must be comma-separated integers") from None
    cfg = BenchConfig(samples=args.samples, sizes=sizes, rounds=args.rounds, batch_size=args.batch_size,
                      s3=not args.no_s3, data_dir=args.data_dir, data_samples=args.data_samples,
                      data_shards=args.data_shards, seed=args.seed)
    return cfg, args.json


def main(argv: list[str]) -> int:
    cfg, json_path = parse_args(argv)
    result = run(cfg)
    print(format_report(result), flush=True)
    if json_path:
        _write_json_atomic(Path(json_path), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
