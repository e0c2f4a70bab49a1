"""The training job's typed config: it composes the config dataclass each component owns.

Every group validates itself in ``__post_init__`` (``OmegaConf.to_object`` runs them), so a wrong
value fails with the key, the value and what is allowed before any model, dataset or process group
is built. Checks that span groups live in ``TrainConfig.__post_init__``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from data_pipeline.config import DataConfig, PrecomputeConfig
from data_pipeline.decode import read_label_map
from data_pipeline.demo_digits import DIGIT_NAMES
from eval.config import EvalConfig
from trainer.autoencoder_loss import AutoencoderLossConfig
from trainer.checks import invalid
from trainer.diffusion.config import DiffusionConfig
from trainer.loop import TrainLoopConfig
from trainer.models.autoencoder import AutoencoderConfig
from trainer.models.conditioning import ConditioningConfig
from trainer.models.config import ModelConfig
from trainer.runtime.checkpoint import CheckpointConfig
from trainer.runtime.distributed import DistConfig
from trainer.runtime.ema import EMAConfig
from trainer.runtime.engine import DeepSpeedConfig, OptimConfig
from trainer.runtime.lifecycle import SlurmConfig
from trainer.runtime.tracking import LoggingConfig
from trainer.tasks import TASKS


@dataclass
class TrainConfig:
    experiment: str = "demo"
    run_dir: str = "runs/demo"
    # diffusion: the text-to-image model; autoencoder: its first stage (model.autoencoder, with `loss`)
    task: str = "diffusion"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)  # task=autoencoder

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is invalid; allowed: one of {tuple(TASKS)}")
        if self.task == "autoencoder":
            self._check_autoencoder_task()
        else:
            self._check_image_sizes()
        if not self.run_dir:
            raise invalid("run_dir", self.run_dir, "a directory path")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size={self.train.micro_batch_size}")
        if self.task == "diffusion":
            self._check_conditioning()
        if self.eval.kind == "digits" and self.data.kind != "digits":
            raise ValueError(f"eval.kind='digits' scores samples with the digits classifier, which needs "
                             f"data.kind='digits' (got {self.data.kind!r}); allowed: eval.kind='none'")
        if self.deepspeed.precision == "fp16" and self.deepspeed.zero_stage == 0:
            # DeepSpeed's fp16 without ZeRO keeps fp32 masters in its FP16_Optimizer only with its
            # own fused optimizers; a client torch optimizer would step fp16 weights directly.
            raise ValueError("deepspeed.precision='fp16' with deepspeed.zero_stage=0 is not supported; "
                             "allowed: precision bf16/fp32, or zero_stage >= 1")


    def _check_image_sizes(self) -> None:
        """Every image side the job draws or trains on must survive the first stage and the UNet's
        downsampling exactly (else the UNet's skip connections fail tens of seconds into the job)."""
        self.model.check_image_size("data.image_size", self.data.image_size)
        if self.eval.resolution:  # the sample grids of eval.kind=none too
            self.model.check_image_size("eval.resolution", self.eval.resolution)
        multiple = self.model.image_size_multiple()
        if self.data.buckets.enabled and self.data.buckets.step % multiple:
            raise invalid("data.buckets.step", self.data.buckets.step,
                          f"a multiple of {multiple} (every bucket side must be a multiple of the first stage's "
                          f"factor times the UNet's downsampling, see data.image_size)")

    def _check_conditioning(self) -> None:
        """What a class-conditional or unconditional job needs from the data and the eval protocol."""
        cond = self.model.conditioning
        if cond.cross_attn == "class":
            if self.data.label_key is None:
                raise invalid("data.label_key", None, "where each sample's class is (a part such as cls, or "
                              "json:<field>, e.g. json:digit for the digits) when model.conditioning.cross_attn='class'")
            if self.data.label_map:
                read_label_map(self.data.label_map, cond.num_classes)  # a class outside the range fails here
            if self.eval.kind == "digits" and cond.num_classes != len(DIGIT_NAMES):
                raise ValueError(f"eval.kind='digits' asks for each digit: model.conditioning.num_classes="
                                 f"{cond.num_classes} must be {len(DIGIT_NAMES)} (one class per digit)")
        if cond.cross_attn != "text" and self.eval.clip_weights:
            raise invalid("eval.clip_weights", self.eval.clip_weights,
                          f"null: the CLIP score compares images with prompts, and model.conditioning.cross_attn="
                          f"{cond.cross_attn!r} has none")
        if cond.cross_attn == "none" and any(g != 1.0 for g in self.eval.guidance_scales):
            raise invalid("eval.guidance_scales", list(self.eval.guidance_scales),
                          "[1.0]: an unconditional model (model.conditioning.cross_attn='none') has nothing to guide by")

    def _check_autoencoder_task(self) -> None:
        if self.model.autoencoder.kind != "kl":
            raise ValueError(f"task=autoencoder trains a KL autoencoder; model.autoencoder.kind="
                             f"{self.model.autoencoder.kind!r} (allowed: 'kl', e.g. model=tiny_kl or an autoencoder preset)")
        factor = self.model.autoencoder.downsample_factor
        if self.data.image_size % factor:
            raise invalid("data.image_size", self.data.image_size,
                          f"a multiple of the autoencoder's downsampling factor {factor} (model.autoencoder.ch_mult="
                          f"{self.model.autoencoder.ch_mult})")
        self.loss.check_lpips_source()
        if self.data.latent_cache:
            raise ValueError("task=autoencoder trains on images; data.latent_cache must be unset")
        if self.deepspeed.zero_stage == 3:
            raise ValueError("task=autoencoder: deepspeed.zero_stage=3 is not supported (the adaptive weight needs "
                             "the decoder's last layer whole); allowed: 0, 1, 2 (the 84M-parameter KL-f8 fits without it)")
        if self.eval.kind == "digits":
            raise ValueError("task=autoencoder: eval.kind='digits' scores text-to-image samples; allowed: eval=none "
                             "(the job logs reconstructions; held-out metrics: python -m eval.reconstruction)")


ConfigStore.instance().store(name="train_schema", node=TrainConfig)

# Groups whose change makes a checkpoint a different model: resuming across such a change is refused.
IDENTITY_GROUPS = ("model", "diffusion")
# Keys of those groups that only choose the weights a run starts from; a resume loads its checkpoint's.
START_ONLY_KEYS = ("model.init_from", "model.init_from_ema")


# Keys added to the identity groups after runs existed, with the value those runs had: left out of the
# fingerprint while they hold it, so the checkpoints of those runs still resume (and keep their hash).
ADDED_IDENTITY_DEFAULTS = {("model", "conditioning"): asdict(ConditioningConfig()),
                           ("model", "autoencoder", "n_embed"): AutoencoderConfig().n_embed}


def _section(payload: dict, path: tuple[str, ...]) -> Any:
    """The dict holding ``path[-1]`` in ``payload`` (None where the path is not there)."""
    section: Any = payload
    for name in path[:-1]:
        section = section.get(name) if isinstance(section, dict) else None
    return section if isinstance(section, dict) else None


def _copy_path(payload: dict, path: tuple[str, ...]) -> dict:
    """``payload`` with the dicts along ``path[:-1]`` copied, so editing that section leaves the config as it is."""
    out = dict(payload)
    node = out
    for name in path[:-1]:
        node[name] = dict(node[name])
        node = node[name]
    return out


def _identity_payload(config: dict) -> dict:
    payload = {k: config.get(k) for k in IDENTITY_GROUPS}
    for path, default in ADDED_IDENTITY_DEFAULTS.items():
        section = _section(payload, path)
        if section is not None and section.get(path[-1]) == default:
            payload = _copy_path(payload, path)
            del _section(payload, path)[path[-1]]
    return payload


def _with_added_defaults(config: dict) -> dict:
    """The identity groups with the keys added since a run was saved filled in with the value it had."""
    payload = {k: config.get(k) for k in IDENTITY_GROUPS}
    for path, default in ADDED_IDENTITY_DEFAULTS.items():
        section = _section(payload, path)
        if section is not None and path[-1] not in section:
            payload = _copy_path(payload, path)
            _section(payload, path)[path[-1]] = default
    return payload


def config_fingerprint(config: dict) -> str:
    """sha256 over the identity groups of a resolved config (as plain containers)."""
    payload = _identity_payload(config)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested configs differ (for the resume mismatch message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += config_differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_compatible(state: dict[str, Any], config: dict, *, allow_change: bool) -> None:
    """Refuse to resume a checkpoint (its ``trainer_state.json`` ``state``) trained with another model or
    diffusion config than ``config`` (resolved), naming the differences, unless ``allow_change``."""
    if state.get("config_fingerprint") == config_fingerprint(config) or allow_change:
        return
    diffs = []
    old, new = _with_added_defaults(state["config"]), _with_added_defaults(config)
    for group in IDENTITY_GROUPS:
        diffs += config_differences(old.get(group), new.get(group), group)
    diffs = [d for d in diffs if d.partition(":")[0] not in START_ONLY_KEYS]
    if not diffs:  # only keys that choose the starting weights differ (or were added since): same model
        return
    raise ValueError("the checkpoint to resume was trained with another model/diffusion config:\n  "
                     + "\n  ".join(diffs[:20]) + "\nset checkpoint.allow_config_change=true to load it anyway")
