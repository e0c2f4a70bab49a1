"""The training job's typed config: one dataclass per Hydra group of ``conf/train.yaml``.

Every group validates itself in ``__post_init__`` (``OmegaConf.to_object`` runs them), so a wrong
value fails with the key, the value and what is allowed before any model, dataset or process group
is built. Cross-group checks live in ``TrainConfig.__post_init__``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from data_pipeline.sources import RetryPolicy, S3Options
from eval.config import EvalConfig
from trainer.autoencoder_loss import AutoencoderLossConfig
from trainer.diffusion.config import DiffusionConfig
from trainer.models.config import ModelConfig
from trainer.tracking import LoggingConfig

PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
LR_SCHEDULES = ("constant", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("digits", "webdataset")
DATA_MODES = ("epoch", "resampled")
CROPS = ("center", "random")
TASKS = ("diffusion", "autoencoder")
ACTIVATION_CHECKPOINTING = ("none", "res", "transformer", "all")


def _bad(group: str, key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{group}.{key}={value!r} is invalid; allowed: {allowed}")


def _check_int(group: str, key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(group, key, value, f"an int >= {minimum}")


@dataclass
class FilterConfig:
    """Filters on img2dataset metadata; a sample failing one is skipped and counted as filtered_*."""

    min_size: int = 0  # smaller side of the stored image, pixels
    max_aspect_ratio: float = 0.0  # max(w/h, h/w); 0 = off
    min_caption_length: int = 0
    max_caption_length: int = 0  # 0 = off
    min_scores: dict[str, float] = field(default_factory=dict)  # e.g. {similarity: 0.28, aesthetic: 5.0}
    max_scores: dict[str, float] = field(default_factory=dict)  # e.g. {pwatermark: 0.5}

    def __post_init__(self) -> None:
        _check_int("data.filters", "min_size", self.min_size, 0)
        _check_int("data.filters", "min_caption_length", self.min_caption_length, 0)
        _check_int("data.filters", "max_caption_length", self.max_caption_length, 0)
        if self.max_aspect_ratio and self.max_aspect_ratio < 1.0:
            raise _bad("data.filters", "max_aspect_ratio", self.max_aspect_ratio, "0 (off) or a float >= 1")


@dataclass
class BucketConfig:
    """Aspect-ratio bucketing: batches of one bucket each, buckets of about image_size**2 pixels."""

    enabled: bool = False
    step: int = 64  # bucket sides are multiples of this (a multiple of the UNet's total downsampling x 8)
    max_ratio: float = 2.0

    def __post_init__(self) -> None:
        _check_int("data.buckets", "step", self.step, 8)
        if not self.max_ratio >= 1.0:
            raise _bad("data.buckets", "max_ratio", self.max_ratio, "a float >= 1")


@dataclass
class DataConfig:
    """Where training images and captions come from.

    ``digits`` builds the embedded coloured-digits dataset (scikit-learn's handwritten digits) into
    ``root`` on first use and holds it in memory (its order resumes bitwise). ``webdataset`` streams
    the shards ``urls`` names (brace patterns, globs, list files; any fsspec URL) - or several
    ``sources`` ({name, urls, weight}) mixed by weight - with an exact, elastic position.
    """

    kind: str = "digits"
    root: str = ".cache/data/digits"
    urls: list[str] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for non-local URLs
    s3: S3Options = field(default_factory=S3Options)
    image_size: int = 32
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "png", "webp"])
    caption_key: str = "txt"  # or json:<field>
    seed: int = 0
    mode: str = "epoch"  # epoch | resampled (shards drawn with replacement)
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000  # raw samples per reader; 0 = no sample shuffling
    num_workers: int = 2  # dataloader workers per rank
    prefetch_factor: int = 2
    crop: str = "center"  # center | random
    flip_prob: float = 0.0
    max_pixels: int = 8192 * 8192  # larger images are skipped before decoding (decompression bombs)
    draft: bool = True  # JPEG reduced-scale decoding
    buckets: BucketConfig = field(default_factory=BucketConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Start the data afresh on resume instead of refusing a position saved for other data.
    reset_position: bool = False
    # Train from a latent cache made by `python -m data_pipeline.precompute` (its folder or URL)
    # instead of encoding images at every step; its manifest must match this job's autoencoder,
    # resolution and crop policy unless latent_cache_check=false.
    latent_cache: Optional[str] = None
    latent_cache_check: bool = True

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise _bad("data", "kind", self.kind, f"one of {DATA_KINDS}")
        _check_int("data", "image_size", self.image_size, 8)
        if self.kind == "webdataset" and not (self.urls or self.sources or self.latent_cache):
            raise _bad("data", "urls", self.urls, "one or more shard URLs (brace patterns, globs, list files) "
                       "or data.sources when data.kind='webdataset'")
        if self.urls and self.sources:
            raise _bad("data", "sources", "...", "either data.urls or data.sources, not both")
        for i, src in enumerate(self.sources):
            unknown = set(src) - {"name", "urls", "weight"}
            if unknown or not src.get("urls"):
                raise _bad("data", f"sources[{i}]", dict(src), "a mapping with urls (and optional name, weight)")
            if not float(src.get("weight", 1.0)) > 0:
                raise _bad("data", f"sources[{i}].weight", src.get("weight"), "a float > 0")
        if not self.image_keys:
            raise _bad("data", "image_keys", self.image_keys, "at least one image extension")
        if not self.caption_key or self.caption_key == "json:":
            raise _bad("data", "caption_key", self.caption_key, "a part extension (txt) or json:<field>")
        _check_int("data", "seed", self.seed, 0)
        if self.mode not in DATA_MODES:
            raise _bad("data", "mode", self.mode, f"one of {DATA_MODES}")
        _check_int("data", "shuffle_buffer", self.shuffle_buffer, 0)
        _check_int("data", "num_workers", self.num_workers, 0)
        _check_int("data", "prefetch_factor", self.prefetch_factor, 1)
        if self.crop not in CROPS:
            raise _bad("data", "crop", self.crop, f"one of {CROPS}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise _bad("data", "flip_prob", self.flip_prob, "a float in [0, 1]")
        _check_int("data", "max_pixels", self.max_pixels, 1)
        if self.buckets.enabled and self.image_size % self.buckets.step:
            raise _bad("data", "image_size", self.image_size, f"a multiple of data.buckets.step={self.buckets.step} "
                       "when bucketing")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # AdamW decay on matrices and convolution kernels only; norms, biases and embeddings' gains are
    # left undecayed (as torchtitan / nanoGPT group them). CompVis trains with AdamW's default 1e-2.
    weight_decay: float = 1e-2
    schedule: str = "constant"
    warmup_steps: int = 0
    # Floor of the cosine / linear decay, as a fraction of lr.
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise _bad("optim", "lr", self.lr, "a float > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad("optim", "betas", list(self.betas), "two floats in [0, 1)")
        if not self.eps > 0:
            raise _bad("optim", "eps", self.eps, "a float > 0")
        if not self.weight_decay >= 0:
            raise _bad("optim", "weight_decay", self.weight_decay, "a float >= 0")
        if self.schedule not in LR_SCHEDULES:
            raise _bad("optim", "schedule", self.schedule, f"one of {LR_SCHEDULES}")
        _check_int("optim", "warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _bad("optim", "min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: str = "fp32"
    gradient_clipping: float = 1.0
    activation_checkpointing: str = "none"
    # ZeRO-3: parameters below this size stay whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold); 0 partitions every parameter.
    stage3_param_persistence_threshold: int = 0
    # Overlap and bucket sizes only matter on GPUs; DeepSpeed's defaults there.
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    # fp16 dynamic loss scaling (DeepSpeed's initial_scale_power).
    initial_scale_power: int = 16

    def __post_init__(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise _bad("deepspeed", "zero_stage", self.zero_stage, f"one of {ZERO_STAGES}")
        if self.precision not in PRECISIONS:
            raise _bad("deepspeed", "precision", self.precision, f"one of {PRECISIONS}")
        if not self.gradient_clipping >= 0:
            raise _bad("deepspeed", "gradient_clipping", self.gradient_clipping, "a float >= 0 (0 = off)")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise _bad("deepspeed", "activation_checkpointing", self.activation_checkpointing,
                       f"one of {ACTIVATION_CHECKPOINTING}")
        _check_int("deepspeed", "stage3_param_persistence_threshold", self.stage3_param_persistence_threshold, 0)
        _check_int("deepspeed", "reduce_bucket_size", self.reduce_bucket_size, 1)
        _check_int("deepspeed", "allgather_bucket_size", self.allgather_bucket_size, 1)
        _check_int("deepspeed", "initial_scale_power", self.initial_scale_power, 0)


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    # CompVis LitEma: the decay used at update n is min(decay, (1 + n) / (10 + n)), so early
    # averages are not dominated by the random initialisation.
    warmup: bool = True
    update_every: int = 1
    start_step: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.decay < 1.0:
            raise _bad("ema", "decay", self.decay, "a float in (0, 1)")
        _check_int("ema", "update_every", self.update_every, 1)
        _check_int("ema", "start_step", self.start_step, 0)


@dataclass
class CheckpointConfig:
    # Local path or any fsspec URL (s3://bucket/run/checkpoints); default: <run_dir>/checkpoints.
    dir: Optional[str] = None
    interval_steps: int = 1000
    keep_last: int = 3
    # auto: continue from the newest complete checkpoint in ``dir`` if there is one;
    # never: refuse to start over an existing checkpoint; or an explicit checkpoint directory/tag.
    resume: str = "auto"
    # Resuming with a changed model / diffusion config is refused unless this is set.
    allow_config_change: bool = False
    # Scratch space for converting a checkpoint to DeepSpeed's universal format and for staging
    # uploads to a remote ``dir``; default: <run_dir>/.checkpoint_work.
    work_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check_int("checkpoint", "interval_steps", self.interval_steps, 1)
        _check_int("checkpoint", "keep_last", self.keep_last, 1)
        if not self.resume:
            raise _bad("checkpoint", "resume", self.resume, "'auto', 'never' or a checkpoint path")


@dataclass
class TrainLoopConfig:
    max_steps: int = 1000
    # Samples per optimizer step over the whole job; split as
    # micro_batch_size * gradient_accumulation * world_size (accumulation is derived).
    global_batch_size: int = 32
    micro_batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    # This many non-finite losses in a row stop the run (each one alone is skipped and counted).
    max_consecutive_nan_steps: int = 5
    # Steps whose loss is replaced by NaN: rehearses the NaN guard end to end (tests, drills).
    inject_nan_at_steps: list[int] = field(default_factory=list)
    num_threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    # Draw z ~ q(z|x) (CompVis' LatentDiffusion does); false trains on the posterior mean.
    sample_posterior: bool = True

    def __post_init__(self) -> None:
        _check_int("train", "max_steps", self.max_steps, 1)
        _check_int("train", "global_batch_size", self.global_batch_size, 1)
        _check_int("train", "micro_batch_size", self.micro_batch_size, 1)
        _check_int("train", "seed", self.seed, 0)
        if self.device not in DEVICES:
            raise _bad("train", "device", self.device, f"one of {DEVICES}")
        _check_int("train", "max_consecutive_nan_steps", self.max_consecutive_nan_steps, 1)
        _check_int("train", "num_threads", self.num_threads, 0)

    def gradient_accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size} x world_size={world_size}; "
                f"allowed: a multiple of {per_step}")
        return self.global_batch_size // per_step


SIGNALS = ("USR1", "USR2", "TERM")
SLURM_JOBS = ("train", "precompute", "eval")


@dataclass
class SlurmConfig:
    """How ``trainer.submit`` asks SLURM for the job (``slurm/train.sbatch``), and how the running job
    handles the time-limit signal: checkpoint, then requeue itself (up to ``max_requeues`` times)."""

    # "precompute": the latent cache as a job array of array_tasks tasks; "eval": an evaluation
    # watcher beside training (slurm/eval_watch.sbatch: python -m eval.run watch=true on the run's checkpoints)
    job: str = "train"
    array_tasks: int = 8
    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU tasks
    tasks_per_node: Optional[int] = None  # default: one per GPU (1 without GPUs)
    cpus_per_task: int = 8
    mem: Optional[str] = None  # e.g. "0" (all of the node's memory), "200G"
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    job_name: Optional[str] = None  # default: the experiment name
    signal: str = "USR1"  # sent to every task signal_seconds before the time limit
    signal_seconds: int = 90
    max_requeues: int = 100
    log_dir: Optional[str] = None  # default: <run_dir>/slurm
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, venv, ...)
    extra_directives: list[str] = field(default_factory=list)  # e.g. ["--exclusive", "--constraint=h100"]
    python: Optional[str] = None  # interpreter on the nodes; default: the one running trainer.submit
    dry_run: bool = False  # print the sbatch script instead of submitting it

    def __post_init__(self) -> None:
        if self.job not in SLURM_JOBS:
            raise _bad("slurm", "job", self.job, f"one of {SLURM_JOBS}")
        _check_int("slurm", "array_tasks", self.array_tasks, 1)
        _check_int("slurm", "nodes", self.nodes, 1)
        _check_int("slurm", "gpus_per_node", self.gpus_per_node, 0)
        if self.tasks_per_node is not None:
            _check_int("slurm", "tasks_per_node", self.tasks_per_node, 1)
        _check_int("slurm", "cpus_per_task", self.cpus_per_task, 1)
        if self.signal not in SIGNALS:
            raise _bad("slurm", "signal", self.signal, f"one of {SIGNALS}")
        _check_int("slurm", "signal_seconds", self.signal_seconds, 1)
        _check_int("slurm", "max_requeues", self.max_requeues, 0)
        for d in self.extra_directives:
            if not d.startswith("--"):
                raise _bad("slurm", "extra_directives", d, "sbatch options written as --name[=value]")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


@dataclass
class PrecomputeConfig:
    """``python -m data_pipeline.precompute``: encode this experiment's data with its autoencoder."""

    out: Optional[str] = None  # the cache folder or URL (required)
    store: str = "mean_logvar"  # or "mean": only the posterior mean
    dtype: str = "fp16"  # or fp32
    format: str = "safetensors"  # or npy
    batch_size: int = 32
    device: str = "auto"  # auto: the GPU of this rank when there is one

    def __post_init__(self) -> None:
        from data_pipeline.latents import DTYPES, FORMATS, STORES

        for key, allowed in (("store", STORES), ("dtype", DTYPES), ("format", FORMATS), ("device", DEVICES)):
            if getattr(self, key) not in allowed:
                raise _bad("precompute", key, getattr(self, key), f"one of {allowed}")
        _check_int("precompute", "batch_size", self.batch_size, 1)


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
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)  # task=autoencoder

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is invalid; allowed: one of {TASKS}")
        if self.task == "autoencoder":
            self._check_autoencoder_task()
        if not self.run_dir:
            raise _bad("", "run_dir", self.run_dir, "a directory path")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size={self.train.micro_batch_size}")
        if self.eval.kind == "digits" and self.data.kind != "digits":
            raise ValueError(f"eval.kind='digits' scores samples with the digits classifier, which needs "
                             f"data.kind='digits' (got {self.data.kind!r}); allowed: eval.kind='none'")
        if self.deepspeed.precision == "fp16" and self.deepspeed.zero_stage == 0:
            # DeepSpeed's fp16 without ZeRO keeps fp32 masters in its FP16_Optimizer only with its
            # own fused optimizers; a client torch optimizer would step fp16 weights directly.
            raise ValueError("deepspeed.precision='fp16' with deepspeed.zero_stage=0 is not supported; "
                             "allowed: precision bf16/fp32, or zero_stage >= 1")


    def _check_autoencoder_task(self) -> None:
        if self.model.autoencoder.kind != "kl":
            raise ValueError(f"task=autoencoder trains a KL autoencoder; model.autoencoder.kind="
                             f"{self.model.autoencoder.kind!r} (allowed: 'kl', e.g. model=tiny_kl or an autoencoder preset)")
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


def config_fingerprint(config: dict) -> str:
    """sha256 over the identity groups of a resolved config (as plain containers)."""
    payload = {k: config.get(k) for k in IDENTITY_GROUPS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested configs differ (for the resume mismatch message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += config_differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]
