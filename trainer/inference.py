"""A trained model back from a checkpoint, on one machine: for sampling, export and evaluation.

A checkpoint is named as a run directory, a checkpoint root (its ``latest`` pointer is followed) or
``<root>/<tag>``, local or any fsspec URL. The networks are rebuilt from the config saved in the
checkpoint exactly as the trainer built them (same seed, same pretrained files, same
``model.init_from``), then the trained weights are loaded: the EMA weights by default (saved whole,
as safetensors), or the live weights consolidated on the CPU from DeepSpeed's shards of any ZeRO
stage. No process group, no GPU needed.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import fsspec
import torch
from omegaconf import OmegaConf
from torch import nn

from trainer.config import TrainConfig
from trainer.diffusion import build_diffusion
from trainer.interchange import build_networks
from trainer.runtime.checkpoint import EMA_FILE, POINTER, STATE_FILE, CheckpointStore, ResumePoint, load_ema
from trainer.runtime.pickles import check_pickles, weights_only_loads
from trainer.tasks.diffusion import load_trained_weights

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    cfg: Any  # TrainConfig of the run
    unet: nn.Module
    text_encoder: Optional[nn.Module]  # text conditioning only
    tokenizer: Any
    first_stage: nn.Module
    schedule: Any  # NoiseSchedule
    source: dict[str, Any]  # checkpoint URL, tag, step, weights
    class_embedder: Optional[nn.Module] = None  # class conditioning only

    @property
    def cross_attn(self) -> str:
        return self.cfg.model.conditioning.cross_attn

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.cfg.model.latent_shape(self.cfg.data.image_size)

    def encode_fn(self, device: torch.device | str = "cpu") -> Callable[[list[Any]], Optional[torch.Tensor]]:
        """Conditions -> the UNet's context: prompts through the text encoder, class labels through
        the class embedder, or None for an unconditional model."""
        if self.class_embedder is not None:
            return lambda labels: self.class_embedder(torch.tensor(labels, dtype=torch.int64, device=device))
        if self.text_encoder is None:
            return lambda conditions: None

        def encode(prompts: list[str]) -> torch.Tensor:
            return self.text_encoder(self.tokenizer(prompts).to(device))

        return encode


def resolve_checkpoint(checkpoint: str, work_dir: str | Path | None = None,
                       files: tuple[str, ...] | None = None) -> ResumePoint:
    """``checkpoint`` (run dir, checkpoint root or ``<root>/<tag>``) -> a locally readable point. From
    remote storage only ``files`` of the tag are downloaded when given (all of it otherwise)."""
    url = checkpoint.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(f"{path}/{STATE_FILE}"):
        root, tag = url.rsplit("/", 1)
    elif fs.exists(f"{path}/{POINTER}"):
        root, tag = url, None
    elif fs.exists(f"{path}/checkpoints/{POINTER}"):
        root, tag = f"{url}/checkpoints", None
    else:
        raise FileNotFoundError(
            f"checkpoint={checkpoint!r} is not a checkpoint: expected <root>/<tag> holding {STATE_FILE}, a "
            f"checkpoint root holding a '{POINTER}' pointer, or a run directory holding checkpoints/{POINTER}")
    store = CheckpointStore(root, Path(work_dir or tempfile.mkdtemp(prefix="ckpt-")), rank=0)
    tag = tag or store.latest_tag()
    if store.is_local or files is None:
        return store.resolve(tag)
    local = store.work_dir / "download" / tag
    local.mkdir(parents=True, exist_ok=True)
    for name in (STATE_FILE, *files):
        if store.fs.exists(store._path(tag, name)):
            store.fs.get(store._path(tag, name), str(local / name))
    return ResumePoint(tag=tag, local_dir=local.parent, state=store.read_state(tag))


def check_text_to_image(point: ResumePoint, checkpoint: str) -> None:
    """Refuse a checkpoint of another kind of job (``task=autoencoder``) before any weight is read:
    sampling, export and evaluation need the text-to-image model."""
    task = (point.state.get("config") or {}).get("task", "diffusion")
    if task != "diffusion":
        raise ValueError(
            f"checkpoint={checkpoint!r} ({point.tag}) is a task={task} run, not a text-to-image checkpoint: "
            f"sample, export and eval.run take a task=diffusion run. An autoencoder run is evaluated with "
            f"python -m eval.reconstruction checkpoint=... and used by a diffusion job through "
            f"$(python -m trainer.autoencoder_overrides {checkpoint})")


def train_config_of(state: dict[str, Any]):
    """The run's ``TrainConfig`` from a checkpoint's saved (redacted) config."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), state["config"]))
    except Exception as e:  # noqa: BLE001 - re-raised with what it is about
        raise ValueError(f"the config saved in the checkpoint does not load into this version's TrainConfig: {e}") \
            from None


def trained_weights(point: ResumePoint, use_ema: bool) -> dict[str, torch.Tensor]:
    """``unet.*`` / ``text_encoder.*`` fp32 tensors of the checkpoint: EMA or consolidated live weights."""
    tag_dir = point.local_dir / point.tag
    if use_ema:
        ema = load_ema(tag_dir)
        if ema is None:
            raise ValueError(f"checkpoint {point.tag} has no EMA weights (trained with ema.enabled=false); "
                             f"use use_ema=false for the trained weights")
        return {k: v.float() for k, v in ema.items()}
    stage = int(point.state["zero_stage"])
    check_pickles(tag_dir)  # DeepSpeed's files, refused before anything is unpickled if not weights only
    if stage == 0:
        with weights_only_loads():
            states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    # Imported here: deepspeed takes seconds to import and only this path (live ZeRO weights) needs it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():  # zero_to_fp32 asks torch.load for weights_only=False
        weights = get_fp32_state_dict_from_zero_checkpoint(str(point.local_dir), tag=point.tag)
    return {k: v.float() for k, v in weights.items()}


def run_config(checkpoint: str) -> TrainConfig:
    """The ``TrainConfig`` of the run a checkpoint belongs to, from its ``trainer_state.json`` only (no
    weight is read): what a command checks its request against before loading the model."""
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        point = resolve_checkpoint(checkpoint, tmp, files=())
        check_text_to_image(point, checkpoint)
    return train_config_of(point.state)


def load_for_inference(checkpoint: str, *, use_ema: bool = True, device: torch.device | str = "cpu",
                       work_dir: str | Path | None = None) -> LoadedModel:
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        point = resolve_checkpoint(checkpoint, work_dir or tmp, files=(EMA_FILE,) if use_ema else None)
        check_text_to_image(point, checkpoint)
        weights = trained_weights(point, use_ema)
    cfg = train_config_of(point.state)
    parts = build_networks(cfg.model, cfg.train.seed)
    load_trained_weights(parts.unet, parts.text_encoder, weights, text_trainable=parts.text_encoder_trainable,
                         what=f"checkpoint {point.tag}", class_embedder=parts.class_embedder)
    for module in (parts.unet, parts.text_encoder, parts.first_stage, parts.class_embedder):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    source = {"checkpoint": checkpoint, "tag": point.tag, "step": int(point.state["step"]),
              "weights": "ema" if use_ema else "trained"}
    return LoadedModel(cfg=cfg, unet=parts.unet, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                       first_stage=parts.first_stage, schedule=build_diffusion(cfg.diffusion).schedule, source=source,
                       class_embedder=parts.class_embedder)
