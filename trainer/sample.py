"""``python -m trainer.sample checkpoint=<...> prompt="..." out=<dir> [n=4 sampler=ddim steps=50 guidance=7.5 seed=0]``

Text -> images from any checkpoint of a run, on one machine (CPU or one GPU): EMA weights by
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
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from data_pipeline.sources import S3Options, install_s3_defaults
from trainer.cli import CLI_CONF_DIR, hydra_command, run_cli
from trainer.images import atomic_write_bytes, make_grid, save_png, to_uint8
from trainer.inference import load_for_inference
from trainer.runtime.device import check_device, select_device
from trainer.sampling.pipeline import text_to_image
from trainer.sampling.samplers import SAMPLERS

log = logging.getLogger("trainer.sample")


@dataclass
class SampleConfig:
    checkpoint: str = "???"
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None
    n: int = 4  # images per prompt
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
        if (self.prompt is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of prompt=\"...\" and prompts_file=<path>")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is invalid; allowed: {tuple(SAMPLERS)}")
        for key, minimum in (("n", 1), ("steps", 1), ("batch_size", 1), ("seed", 0)):
            if getattr(self, key) < minimum:
                raise ValueError(f"{key}={getattr(self, key)} is invalid; allowed: an int >= {minimum}")
        check_device("device", self.device)
        if not self.guidance >= 1.0:
            raise ValueError(f"guidance={self.guidance} is invalid; allowed: a float >= 1 (1 = no guidance)")


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


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
    prompts = read_prompts(cfg)  # bad input fails before the model is loaded
    install_s3_defaults(cfg.s3)
    out = Path(cfg.out)
    if (out / "samples.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"out={cfg.out!r} already holds samples.json; choose another folder or overwrite=true")
    device = select_device(cfg.device, "device")
    model = load_for_inference(cfg.checkpoint, use_ema=cfg.use_ema, device=device)
    all_prompts = [p for p in prompts for _ in range(cfg.n)]
    seeds = [cfg.seed + i for i in range(len(all_prompts))]
    log.info("sampling %d images (%d prompts x %d) from %s (%s, step %d) with %s, %d steps, guidance %s",
             len(all_prompts), len(prompts), cfg.n, model.source["tag"], model.source["weights"],
             model.source["step"], cfg.sampler, cfg.steps, cfg.guidance)
    images = text_to_image(model.unet, model.encode_fn(device), model.first_stage, all_prompts, seeds,
                           schedule=model.schedule, latent_shape=model.latent_shape, sampler=cfg.sampler,
                           num_steps=cfg.steps, guidance_scale=cfg.guidance, negative_prompt=cfg.negative_prompt,
                           batch_size=cfg.batch_size, device=device)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)  # (N, H, W, 3)
    records = []
    for i, (prompt, seed) in enumerate(zip(all_prompts, seeds)):
        name = f"{i:05d}.png"
        save_png(pixels[i], out / name)
        records.append({"file": name, "prompt": prompt, "seed": seed})
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
