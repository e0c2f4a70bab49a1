"""The DeepSpeed engine of a training job: its JSON config, the optimizer, the LR schedule.

Everything DeepSpeed-specific that is not checkpointing lives here, so the loop in ``trainer/train.py``
only calls ``engine(...)``, ``engine.backward`` and ``engine.step``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from trainer.config import DeepSpeedConfig, OptimConfig

log = logging.getLogger(__name__)


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
        # DeepSpeed vets optimizers by class; ours is torch's AdamW / its FusedAdam with a skip switch.
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


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's fused kernel on CUDA, torch's on CPU (DeepSpeed's CPU Adam would compile
    an extension for a minute at every fresh start)."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if device.type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        class SkippableFusedAdam(_SkippableStep, FusedAdam):
            pass

        return SkippableFusedAdam(groups, adam_w_mode=True, **kwargs)
    # foreach=False: the same update order and rounding as the reference loop on every stage.
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
               device: torch.device, load_universal: bool = False):
    """``deepspeed.initialize`` over ``module`` with only ``trainable``'s parameters optimized.

    Returns ``(engine, optimizer)``: ``optimizer`` is the client AdamW (``skip_next_step`` lives on
    it); ``engine.optimizer`` is DeepSpeed's wrapper around it.
    """
    import deepspeed

    config = deepspeed_config(ds, micro_batch_size=micro_batch_size, gradient_accumulation=gradient_accumulation,
                              world_size=world_size, load_universal=load_universal)
    optimizer = build_optimizer(parameter_groups(trainable, optim.weight_decay), optim, device)
    scheduler = build_lr_scheduler(optimizer, optim, max_steps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    return engine, optimizer


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The engine's module as whole fp32 tensors on the CPU, on every rank (collective under ZeRO-3).

    Parameters come from the optimizer's fp32 masters where DeepSpeed keeps them (ZeRO 1-3, bf16),
    through ``safe_get_full_fp32_param``, so a bf16 run's export is not rounded to bf16.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if (zero_stage > 0 or param.dtype != torch.float32) else None
        out[name] = (full if full is not None else param.detach()).float().cpu().clone()
    for name, buf in engine.module.named_buffers():
        out[name] = buf.detach().float().cpu().clone()
    return out
