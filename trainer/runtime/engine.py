"""The DeepSpeed engine of a training job: its JSON config, the optimizer, the LR schedule, and what
is applied to the networks from outside before they are wrapped (activation checkpointing).

Everything DeepSpeed-specific that is not checkpointing lives here, so the loop only calls
``engine(...)``, ``engine.backward`` and ``engine.step``. The models know nothing of it (STYLE.md
rule 2; torchtitan's ``parallelize``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.checks import check_int, invalid
from trainer.models.text_encoders import CHECKPOINT_BLOCKS as TEXT_CHECKPOINT_BLOCKS
from trainer.models.unet import CHECKPOINT_BLOCKS as UNET_CHECKPOINT_BLOCKS

log = logging.getLogger(__name__)


PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
LR_SCHEDULES = ("constant", "cosine", "linear")
ACTIVATION_CHECKPOINTING = ("none", "res", "transformer", "all")


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
            raise invalid("optim.lr", self.lr, "a float > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise invalid("optim.betas", list(self.betas), "two floats in [0, 1)")
        if not self.eps > 0:
            raise invalid("optim.eps", self.eps, "a float > 0")
        if not self.weight_decay >= 0:
            raise invalid("optim.weight_decay", self.weight_decay, "a float >= 0")
        if self.schedule not in LR_SCHEDULES:
            raise invalid("optim.schedule", self.schedule, f"one of {LR_SCHEDULES}")
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise invalid("optim.min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")




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
            raise invalid("deepspeed.zero_stage", self.zero_stage, f"one of {ZERO_STAGES}")
        if self.precision not in PRECISIONS:
            raise invalid("deepspeed.precision", self.precision, f"one of {PRECISIONS}")
        if not self.gradient_clipping >= 0:
            raise invalid("deepspeed.gradient_clipping", self.gradient_clipping, "a float >= 0 (0 = off)")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise invalid("deepspeed.activation_checkpointing", self.activation_checkpointing,
                       f"one of {ACTIVATION_CHECKPOINTING}")
        check_int("deepspeed.stage3_param_persistence_threshold", self.stage3_param_persistence_threshold, 0)
        check_int("deepspeed.reduce_bucket_size", self.reduce_bucket_size, 1)
        check_int("deepspeed.allgather_bucket_size", self.allgather_bucket_size, 1)
        check_int("deepspeed.initial_scale_power", self.initial_scale_power, 0)

    def check_device(self, device: torch.device) -> None:
        """``precision`` on ``device``, before the engine (and the data, the models) are built."""
        if self.precision == "fp16" and device.type == "cpu":
            # DeepSpeed's fp16 training (loss scaler, FP16 optimizer wrappers) needs CUDA; on its CPU
            # accelerator it fails at the first step.
            raise invalid("deepspeed.precision", self.precision,
                          "fp32 or bf16 on the CPU (DeepSpeed trains fp16 on GPUs only; train.device chose cpu)")
        if self.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise invalid("deepspeed.precision", self.precision,
                          f"fp16 or fp32 on {torch.cuda.get_device_name(device)}, which has no bf16 (Ampere or newer has)")




_CHECKPOINTED: dict[type, type] = {}


def _checkpointed(cls: type) -> type:
    """A subclass of ``cls`` whose forward is recomputed in backward while training with grad enabled
    (non-reentrant ``torch.utils.checkpoint``: RNG states are restored, so dropout masks repeat)."""
    if cls not in _CHECKPOINTED:
        def forward(self, *args, **kwargs):
            parent = super(sub, self).forward
            if self.training and torch.is_grad_enabled():
                return checkpoint(parent, *args, use_reentrant=False, **kwargs)
            return parent(*args, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__doc__": cls.__doc__})
        _CHECKPOINTED[cls] = sub
    return _CHECKPOINTED[cls]


def is_checkpointed(module: nn.Module) -> bool:
    return type(module) in _CHECKPOINTED.values()


def apply_activation_checkpointing(model: nn.Module, enabled: Union[bool, Sequence[str]],
                                   blocks: Mapping[str, type]) -> int:
    """Recompute the activations of ``model``'s blocks in backward instead of storing them.

    ``blocks`` maps block kinds to classes (a model's ``CHECKPOINT_BLOCKS``); ``enabled`` is True (every
    kind), False (none) or a sequence of kinds. Each block is checkpointed on its own. The block's
    class is swapped for a subclass with a checkpointed forward, so parameter names - and with them
    checkpoints, the EMA and ZeRO's partitions - stay what they were; ``enabled=False`` swaps back.
    Returns the number of blocks checkpointed.
    """
    if isinstance(enabled, bool):
        kinds = set(blocks) if enabled else set()
    elif isinstance(enabled, str):
        raise ValueError(f"activation checkpointing={enabled!r}: pass a list of block kinds, "
                         f"e.g. [{enabled!r}]; allowed kinds: {list(blocks)}")
    else:
        kinds = set(enabled)
        unknown = sorted(kinds - set(blocks))
        if unknown:
            raise ValueError(f"activation checkpointing kinds {unknown} are unknown; allowed: "
                             f"True, False or a subset of {list(blocks)}")
    count = 0
    for module in model.modules():
        base = type(module).__mro__[1] if is_checkpointed(module) else type(module)
        for kind, cls in blocks.items():
            if issubclass(base, cls):
                module.__class__ = _checkpointed(base) if kind in kinds else base
                count += kind in kinds
    return count


# The regions compiled one by one: the UNet's ResBlocks and SpatialTransformers, the text transformer's layers.
COMPILE_BLOCKS = (*UNET_CHECKPOINT_BLOCKS.values(), *TEXT_CHECKPOINT_BLOCKS.values())


def apply_regional_compile(model: nn.Module, blocks: Sequence[type] = COMPILE_BLOCKS, *,
                           max_graphs_per_block: int = 64) -> int:
    """Compile each block of ``model`` on its own (torchtitan's regional compilation), in place.

    ``nn.Module.compile`` compiles the block's call without wrapping it, so parameter names - checkpoints,
    the EMA, ZeRO's partitions, exports - carry no ``_orig_mod.``. Blocks of one kind and shape share
    their compiled code (a UNet has a handful of distinct block shapes, so compiling it costs a handful
    of graphs, not one per block), and an activation-checkpointed block is compiled with its
    recomputation. Shapes are static (``dynamic=False``: inductor's symbolic-shape path fails on these
    blocks, and static graphs are the fast ones): each distinct (block shape, input size) is one graph,
    so the count is bounded by the UNet's distinct block shapes times the aspect-ratio buckets;
    ``max_graphs_per_block`` lifts dynamo's per-code limit (8) to that bound, past which a block runs
    eagerly. ``compiled_graph_count`` reports the graphs (recompiles included). Returns the number of
    blocks compiled.
    """
    # torch._dynamo loads on first attribute access (seconds): only a run that compiles pays for it.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, max_graphs_per_block)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                    4 * max_graphs_per_block)
    count = 0
    for module in model.modules():
        if isinstance(module, tuple(blocks)):
            module.compile(dynamic=False)
            count += 1
    return count


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    # torch._dynamo loads on first attribute access: only a run that compiles calls this.
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def apply_channels_last(module: nn.Module) -> nn.Module:
    """Convolution weights in NHWC (``torch.channels_last``), in place; returns ``module``. For networks
    outside DeepSpeed (the frozen first stage).

    cuDNN's tensor-core convolutions run natively in NHWC; an NCHW network pays a transpose around each
    (NeMo's SD recipe gains from it). A convolution runs NHWC when its input or its weight is
    (``cudnn_conv_suggest_memory_format``) and its output keeps the format, so for the engine's network
    NHWC inputs are enough: DeepSpeed needs contiguous parameters (it broadcasts and flattens them).
    """
    return module.to(memory_format=torch.channels_last)


def deepspeed_config(cfg: DeepSpeedConfig, *, micro_batch_size: int, gradient_accumulation: int,
                     world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The ``ds_config`` dict for ``deepspeed.initialize``."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(overlap_comm=cfg.overlap_comm, reduce_bucket_size=cfg.reduce_bucket_size,
                    allgather_bucket_size=cfg.allgather_bucket_size, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=cfg.stage3_param_persistence_threshold,
                    # The whole model's weights can be gathered for sampling and export.
                    stage3_gather_16bit_weights_on_model_save=False)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation,
        "train_batch_size": micro_batch_size * gradient_accumulation * world_size,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": cfg.initial_scale_power,
                 "loss_scale": 0},
        # Our own console line replaces DeepSpeed's.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
        # DeepSpeed vets optimizers by class; ours is torch's AdamW (fused on CUDA) with a skip switch.
        "zero_allow_untested_optimizer": True,
    }
    return config


def parameter_groups(modules: dict[str, nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters of ``modules``: decay for >= 2-D tensors only."""
    decay, no_decay = [], []
    for module in modules.values():
        for param in module.parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class _SkippableStep:
    """Mixin: ``step()`` does nothing while ``skip_next_step`` is set.

    DeepSpeed (ZeRO 1-3 and BF16_Optimizer) calls the client optimizer's ``step`` on its fp32 master
    partitions and copies the result back into the model; a skipped step leaves masters, moments and
    the weights untouched. This is how a step whose loss was non-finite on some rank is dropped
    under every stage and precision (DeepSpeed itself only skips fp16 overflows).
    """

    skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            return None
        return super().step(closure)


class SkippableAdamW(_SkippableStep, torch.optim.AdamW):
    pass


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device, *,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """torch's AdamW, handed to DeepSpeed as a client optimizer (it steps DeepSpeed's fp32 masters).

    ``fused`` (default: on CUDA) is torch's single-kernel AdamW (``fused=True``): shipped compiled with
    torch, so nothing is JIT-built at start (DeepSpeed's FusedAdam needs a CUDA toolkit on the node and
    compiles for a minute). Otherwise the per-tensor loop (``foreach=False``): the update order and
    rounding of the reference loop on every stage, which the CPU parity tests rely on.
    """
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    use_fused = device.type == "cuda" if fused is None else fused
    if use_fused:
        return SkippableAdamW(groups, fused=True, **kwargs)
    return SkippableAdamW(groups, foreach=False, **kwargs)


class WarmupDecay:
    """lr multiplier at step s: linear warm-up over ``warmup_steps``, then constant, cosine or linear
    decay to ``min_lr_ratio`` at ``max_steps``. A callable object, so ``LambdaLR`` checkpoints it."""

    def __init__(self, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> None:
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                       max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(cfg.schedule, cfg.warmup_steps, max_steps, cfg.min_lr_ratio))


def initialize(module: nn.Module, trainable: dict[str, nn.Module], *, ds: DeepSpeedConfig, optim: OptimConfig,
               micro_batch_size: int, gradient_accumulation: int, world_size: int, max_steps: int,
               device: torch.device, load_universal: bool = False, fused_optimizer: bool | None = None,
               compile_blocks: bool = False):
    """``deepspeed.initialize`` over ``module`` with only ``trainable``'s parameters optimized, after
    ``ds.activation_checkpointing`` is applied to the UNet blocks ``module`` holds, and with
    ``compile_blocks`` its blocks are compiled one by one (``apply_regional_compile``).

    Returns ``(engine, optimizer)``: ``optimizer`` is the client AdamW (``skip_next_step`` lives on
    it); ``engine.optimizer`` is DeepSpeed's wrapper around it.
    """
    # Imported here: deepspeed reads DS_ACCELERATOR when imported, which the caller sets first
    # (trainer.runtime.device.prepare_process), and takes seconds to import.
    import deepspeed

    if ds.activation_checkpointing != "none":
        kinds = True if ds.activation_checkpointing == "all" else [ds.activation_checkpointing]
        apply_activation_checkpointing(module, kinds, UNET_CHECKPOINT_BLOCKS)
    if compile_blocks:
        num_blocks = apply_regional_compile(module)
        log.info("compiling %d blocks one by one (train.compile)", num_blocks)
    config = deepspeed_config(ds, micro_batch_size=micro_batch_size, gradient_accumulation=gradient_accumulation,
                              world_size=world_size, load_universal=load_universal)
    optimizer = build_optimizer(parameter_groups(trainable, optim.weight_decay), optim, device, fused=fused_optimizer)
    scheduler = build_lr_scheduler(optimizer, optim, max_steps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    return engine, optimizer


def trainable_parameters(module: nn.Module, zero_stage: int) -> int:
    """Trainable parameter count (under ZeRO-3 a rank holds only a partition: ``ds_numel`` is the whole)."""
    return sum(getattr(p, "ds_numel", p.numel()) if zero_stage == 3 else p.numel()
               for p in module.parameters() if p.requires_grad)


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The engine's module as whole fp32 tensors on the CPU, on every rank (collective under ZeRO-3).

    Parameters come from the optimizer's fp32 masters where DeepSpeed keeps them (ZeRO 1-3, bf16),
    through ``safe_get_full_fp32_param``, so a bf16 run's export is not rounded to bf16.
    """
    # Imported here: deepspeed reads DS_ACCELERATOR at import and takes seconds to import.
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if (zero_stage > 0 or param.dtype != torch.float32) else None
        out[name] = (full if full is not None else param.detach()).float().cpu().clone()
    for name, buf in engine.module.named_buffers():
        out[name] = buf.detach().float().cpu().clone()
    return out
