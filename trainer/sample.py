"""``python -m trainer.sample checkpoint=<...> prompt="..." out=<dir> [n=4 sampler=ddim steps=50 guidance=7.5 seed=0]``

Text -> images (or, for a class-conditional run, ``classes=3`` / ``classes=[1,5]`` / ``classes=random``;
for an unconditional run, no condition at all) from any checkpoint of a run, on one machine (CPU or one GPU): EMA weights by
default, sharded DeepSpeed checkpoints of any ZeRO stage consolidated on the CPU. Writes one PNG per
image, ``grid.png`` and ``samples.json`` (the settings and seed of every image); image ``i`` (the
file ``{i:05d}.png``; image ``j`` of prompt ``p`` is ``i = p * n + j``) uses seed ``seed + i``, so it
does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from data_pipeline.concat import condition_from
from data_pipeline.sources import S3Options, install_s3_defaults
from trainer.checks import is_int
from trainer.cli import CLI_CONF_DIR, hydra_command, run_cli
from trainer.images import atomic_write_bytes, make_grid, save_png, to_uint8
from trainer.inference import load_for_inference, run_config
from trainer.runtime.device import check_device, select_device
from trainer.sampling.concat import concat_to_image
from trainer.sampling.pipeline import text_to_image
from trainer.sampling.samplers import SAMPLERS

log = logging.getLogger("trainer.sample")


@dataclass
class SampleConfig:
    checkpoint: str = "???"
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None
    # A class-conditional run's classes: one (3), several ([1, 5]) or "random" (each image a class drawn
    # with `seed`). Named `classes`, not `class`: a Python keyword cannot be a config field.
    classes: Optional[Any] = None
    # Concat-conditioned runs: the low-resolution image to super-resolve (model.conditioning.concat=lowres;
    # the output is sr_factor times its size), or the image to complete and its mask (concat=masked_image;
    # a PNG of the image's size, white where the image is to be filled).
    image: Optional[str] = None
    mask: Optional[str] = None
    n: int = 4  # images per prompt (per class; with classes=random, images in all)
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    out: str = "samples"
    batch_size: int = 8
    use_ema: bool = True
    device: str = "cpu"
    overwrite: bool = False
    # s3:// settings (endpoint, profile, anon, region, timeouts) of everything this command reads and
    # writes, as data.s3 in training; credentials only from the AWS environment or a profile.
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.prompt is not None and self.prompts_file is not None:
            raise ValueError("give exactly one of prompt=\"...\" and prompts_file=<path>")
        if self.classes is not None and (self.prompt is not None or self.prompts_file is not None):
            raise ValueError("classes=... asks a class-conditional model, prompt=/prompts_file= a text model: give one")
        if self.classes is not None:
            self.classes = _class_list(self.classes)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is invalid; allowed: {tuple(SAMPLERS)}")
        for key, minimum in (("n", 1), ("steps", 1), ("batch_size", 1), ("seed", 0)):
            if getattr(self, key) < minimum:
                raise ValueError(f"{key}={getattr(self, key)} is invalid; allowed: an int >= {minimum}")
        check_device("device", self.device)
        if not self.guidance >= 1.0:
            raise ValueError(f"guidance={self.guidance} is invalid; allowed: a float >= 1 (1 = no guidance)")


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def _class_list(value: Any) -> Any:
    """``classes``: "random", or a list of class indices (one int is a list of one)."""
    if value == "random":
        return value
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or not all(is_int(v, 0) for v in items):
        raise ValueError(f"classes={value!r} is invalid; allowed: a class index (classes=3), a list of them "
                         f"(classes=[1,5]) or classes=random")
    return [int(v) for v in items]


def read_conditions(cfg: SampleConfig, run_cfg) -> tuple[list[Any], Any]:
    """What each image is conditioned on (``n`` per prompt / class) and the unconditional branch's
    condition, checked against the run's conditioning (``model.conditioning.cross_attn``) before any
    weight is loaded."""
    cond = run_cfg.model.conditioning
    if cond.cross_attn == "class":
        if cfg.prompt is not None or cfg.prompts_file is not None:
            raise ValueError(f"prompt=/prompts_file=: checkpoint={cfg.checkpoint!r} is a class-conditional model "
                             f"(model.conditioning.cross_attn='class', {cond.num_classes} classes); give classes=<0.."
                             f"{cond.num_classes - 1}>, classes=[...] or classes=random")
        if cfg.classes is None:
            raise ValueError(f"classes=... is missing: checkpoint={cfg.checkpoint!r} is a class-conditional model "
                             f"({cond.num_classes} classes); give classes=3, classes=[1,5] or classes=random")
        if cfg.classes == "random":
            rng = np.random.default_rng(cfg.seed)
            return [int(c) for c in rng.integers(0, cond.num_classes, size=cfg.n)], cond.null_class
        bad = [c for c in cfg.classes if c >= cond.num_classes]
        if bad:
            raise ValueError(f"classes={cfg.classes} has {bad}, outside the model's classes 0..{cond.num_classes - 1} "
                             f"(model.conditioning.num_classes={cond.num_classes})")
        return [c for c in cfg.classes for _ in range(cfg.n)], cond.null_class
    if cfg.classes is not None:
        raise ValueError(f"classes={cfg.classes}: checkpoint={cfg.checkpoint!r} is not a class-conditional model "
                         f"(model.conditioning.cross_attn={cond.cross_attn!r}); "
                         + ("give prompt=\"...\" or prompts_file=<path>" if cond.cross_attn == "text" else
                            "an unconditional model takes no condition"))
    if cond.cross_attn == "none":
        if cfg.prompt is not None or cfg.prompts_file is not None:
            raise ValueError(f"prompt=/prompts_file=: checkpoint={cfg.checkpoint!r} is an unconditional model "
                             f"(model.conditioning.cross_attn='none'); it takes no prompt (n=<images>)")
        if cfg.guidance != 1.0:
            log.info("guidance=%s ignored: an unconditional model has no conditional branch", cfg.guidance)
        return [None] * cfg.n, None
    if cfg.prompt is None and cfg.prompts_file is None:
        raise ValueError("give exactly one of prompt=\"...\" and prompts_file=<path>")
    return [p for p in read_prompts(cfg) for _ in range(cfg.n)], cfg.negative_prompt


def _read_rgb(path: str, key: str) -> torch.Tensor:
    """A PNG/JPEG as float (1, 3, H, W) in [-1, 1]."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}={path!r} does not exist")
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1.0


def read_concat_inputs(cfg: SampleConfig, run_cfg) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(image, drawn) for a concat-conditioned run - the low-resolution image twice for super-resolution,
    the image and its mask (1, 1, H, W) in {0, 1} for inpainting - checked before any weight is loaded;
    None for other runs."""
    cond = run_cfg.model.conditioning
    if cond.concat == "none":
        for key in ("image", "mask"):
            if getattr(cfg, key) is not None:
                raise ValueError(f"{key}={getattr(cfg, key)!r}: checkpoint={cfg.checkpoint!r} has no concat conditioning "
                                 f"(model.conditioning.concat='none'); image=/mask= are for super-resolution and "
                                 f"inpainting runs")
        return None
    if cfg.image is None:
        what = "the low-resolution image" if cond.concat == "lowres" else "the image to complete (and mask=<png>)"
        raise ValueError(f"image=<path> is missing: checkpoint={cfg.checkpoint!r} is conditioned on {what} "
                         f"(model.conditioning.concat={cond.concat!r})")
    image = _read_rgb(cfg.image, "image")
    multiple = run_cfg.model.image_size_multiple()
    if cond.concat == "lowres":
        if cfg.mask is not None:
            raise ValueError(f"mask={cfg.mask!r}: a super-resolution model (concat='lowres') takes no mask")
        height, width = (side * cond.sr_factor for side in image.shape[-2:])
        if height % multiple or width % multiple:
            raise ValueError(f"image={cfg.image!r} is {image.shape[-1]}x{image.shape[-2]} px: x{cond.sr_factor} gives "
                             f"{width}x{height}, and both sides must be multiples of {multiple}")
        return image, image
    if cfg.mask is None:
        raise ValueError(f"mask=<path> is missing: an inpainting model (concat='masked_image') needs the mask "
                         f"(white where image={cfg.image!r} is to be filled)")
    mask = _read_rgb(cfg.mask, "mask")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask={cfg.mask!r} is {mask.shape[-1]}x{mask.shape[-2]} px; expected the size of "
                         f"image={cfg.image!r}, {image.shape[-1]}x{image.shape[-2]}")
    if image.shape[-2] % multiple or image.shape[-1] % multiple:
        raise ValueError(f"image={cfg.image!r} is {image.shape[-1]}x{image.shape[-2]} px; both sides must be "
                         f"multiples of {multiple}")
    return image, (mask.mean(dim=1, keepdim=True) >= 0.0).float()  # (1, 1, H, W): white (>= 128) is filled


def read_prompts(cfg: SampleConfig) -> list[str]:
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise ValueError("prompt is empty; give the text to draw (\"\" is the unconditional prompt only "
                             "through negative_prompt)")
        return [cfg.prompt]
    path = Path(cfg.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts_file={cfg.prompts_file!r} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():  # a trailing newline is not a prompt
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise ValueError(f"prompts_file={cfg.prompts_file!r} has empty lines {empty[:10]}; one prompt per line, "
                         f"no blank lines")
    if not lines:
        raise ValueError(f"prompts_file={cfg.prompts_file!r} holds no prompt")
    return [line.strip() for line in lines]


def sample(cfg: SampleConfig) -> Path:
    """Draw the images and write them; returns the output folder."""
    if cfg.prompts_file is not None or cfg.prompt is not None:
        read_prompts(cfg)  # bad input fails before the checkpoint is read
    install_s3_defaults(cfg.s3)
    out = Path(cfg.out)
    if (out / "samples.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"out={cfg.out!r} already holds samples.json; choose another folder or overwrite=true")
    all_prompts, negative = read_conditions(cfg, run_config(cfg.checkpoint))  # before any weight is loaded
    guidance = 1.0 if all(p is None for p in all_prompts) else cfg.guidance
    concat_inputs = read_concat_inputs(cfg, run_config(cfg.checkpoint))
    device = select_device(cfg.device, "device")
    model = load_for_inference(cfg.checkpoint, use_ema=cfg.use_ema, device=device)
    seeds = [cfg.seed + i for i in range(len(all_prompts))]
    log.info("sampling %d images from %s (%s, step %d) with %s, %d steps, guidance %s",
             len(all_prompts), model.source["tag"], model.source["weights"],
             model.source["step"], cfg.sampler, cfg.steps, guidance)
    if concat_inputs is None:
        images = text_to_image(model.unet, model.encode_fn(device), model.first_stage, all_prompts, seeds,
                               schedule=model.schedule, latent_shape=model.latent_shape, sampler=cfg.sampler,
                               num_steps=cfg.steps, guidance_scale=guidance, negative_prompt=negative,
                               batch_size=cfg.batch_size, device=device)
    else:
        cond = model.cfg.model.conditioning
        image, drawn = concat_inputs
        f = model.cfg.model.autoencoder.downsample_factor
        size = [side * (cond.sr_factor if cond.concat == "lowres" else 1) // f for side in image.shape[-2:]]
        with torch.no_grad():
            concat = condition_from(cond.concat, model.first_stage, image.to(device), drawn.to(device), tuple(size))
        images = concat_to_image(model.unet, model.encode_fn(device), model.first_stage, all_prompts, seeds,
                                 concat.expand(len(seeds), *concat.shape[1:]), schedule=model.schedule,
                                 latent_channels=model.cfg.model.autoencoder.latent_channels, sampler=cfg.sampler,
                                 num_steps=cfg.steps, guidance_scale=guidance, negative_prompt=negative,
                                 batch_size=cfg.batch_size, device=device)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)  # (N, H, W, 3)
    records = []
    for i, (prompt, seed) in enumerate(zip(all_prompts, seeds)):
        name = f"{i:05d}.png"
        save_png(pixels[i], out / name)
        key = "prompt" if isinstance(prompt, str) or prompt is None else "class"
        records.append({"file": name, key: prompt, "seed": seed})
    save_png(make_grid(images, nrow=cfg.n), out / "grid.png")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite")}
    meta = {"settings": settings, "model": model.source, "image_size": model.cfg.data.image_size, "images": records}
    atomic_write_bytes(out / "samples.json", (json.dumps(meta, indent=2) + "\n").encode())  # written last
    return out


@hydra.main(version_base=None, config_path=CLI_CONF_DIR, config_name="sample")
def main(dict_cfg: DictConfig) -> None:
    print(f"wrote {run_cli(sample, dict_cfg)}/ (images, grid.png, samples.json)")


if __name__ == "__main__":
    hydra_command(main)
