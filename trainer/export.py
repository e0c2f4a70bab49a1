"""``python -m trainer.export checkpoint=<...> out=<dir> format=diffusers|safetensors [use_ema=true]``

``diffusers``: a pipeline folder that ``diffusers`` loads offline with ``from_pretrained`` -
``LDMTextToImagePipeline`` for the paper's trainable text transformer (``LDMBertModel``) with 77
positions, ``StableDiffusionPipeline`` holding it for any other length, and for a frozen OpenCLIP
tower (``CLIPTextModel``). ``safetensors``: one
file per component in our (CompVis) layout plus the model config. Either is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from data_pipeline.sources import S3Options, install_s3_defaults
from trainer.cli import CLI_CONF_DIR, hydra_command, run_cli
from trainer.inference import load_for_inference
from trainer.interchange import export_diffusers, export_safetensors

FORMATS = ("diffusers", "safetensors")


@dataclass
class ExportConfig:
    checkpoint: str = "???"
    out: str = "???"
    format: str = "diffusers"
    use_ema: bool = True
    overwrite: bool = False
    # s3:// settings (endpoint, profile, anon, region, timeouts) of everything this command reads and
    # writes, as data.s3 in training; credentials only from the AWS environment or a profile.
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r} is invalid; allowed: {FORMATS}")


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def export(cfg: ExportConfig):
    install_s3_defaults(cfg.s3)
    model = load_for_inference(cfg.checkpoint, use_ema=cfg.use_ema)
    write = export_diffusers if cfg.format == "diffusers" else export_safetensors
    return write(model, cfg.out, overwrite=cfg.overwrite)


@hydra.main(version_base=None, config_path=CLI_CONF_DIR, config_name="export")
def main(dict_cfg: DictConfig) -> None:
    print(f"wrote {run_cli(export, dict_cfg)}")


if __name__ == "__main__":
    hydra_command(main)
