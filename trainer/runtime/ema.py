"""Exponential moving average of the trained weights, under every ZeRO stage.

Stages 0-2 keep whole parameters on every rank, so each rank averages whole tensors (the same
numbers everywhere). Under ZeRO-3 a rank only holds its flat partition of each parameter
(``param.ds_tensor``); the average is kept for that partition alone, so EMA memory is sharded
exactly like the weights. ``state_dict`` gathers the partitions into whole fp32 tensors on rank 0
(the checkpoint's ``ema.safetensors`` is therefore independent of the world size) and
``load_state_dict`` cuts each rank's partition back out of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from trainer.checks import check_int, invalid
from trainer.runtime import distributed


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
            raise invalid("ema.decay", self.decay, "a float in (0, 1)")
        check_int("ema.update_every", self.update_every, 1)
        check_int("ema.start_step", self.start_step, 0)




def _is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_numel")


def _local(param: nn.Parameter) -> torch.Tensor:
    """The part of ``param`` this rank holds: its ZeRO-3 partition (flat, zero-padded at the end of
    the last rank) or the whole tensor."""
    return param.ds_tensor if _is_partitioned(param) else param.data


class EMA:
    def __init__(self, module: nn.Module, decay: float, *, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay={decay!r} is invalid; allowed: a float in (0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.params: dict[str, nn.Parameter] = {n: p for n, p in module.named_parameters() if p.requires_grad}
        # fp32 whatever the training dtype: decay 0.9999 moves the average by 1e-4 of the gap, below
        # bf16's resolution.
        self.shadow: dict[str, torch.Tensor] = {
            n: _local(p).detach().to(torch.float32).clone() for n, p in self.params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        # CompVis ldm/modules/ema.py (LitEma): min(decay, (1 + n) / (10 + n)).
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        for name, param in self.params.items():
            self.shadow[name].lerp_(_local(param).to(torch.float32), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 EMA tensors (names as in the module). Collective under ZeRO-3: every rank
        must call it; the gathered tensors are returned on every rank."""
        out: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            local = self.shadow[name]
            if _is_partitioned(param):
                flat = distributed.all_gather_flat(local, group=param.ds_process_group)
                out[name] = flat[: param.ds_numel].view(param.ds_shape).cpu().clone()
            else:
                out[name] = local.cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the trained parameters: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        for name, param in self.params.items():
            whole = state[name].to(torch.float32)
            if _is_partitioned(param):
                if tuple(whole.shape) != tuple(param.ds_shape):
                    raise ValueError(f"EMA tensor {name}: shape {tuple(whole.shape)}, expected {tuple(param.ds_shape)}")
                size = param.ds_tensor.numel()
                rank = distributed.group_rank(param.ds_process_group)
                flat = whole.flatten()
                part = torch.zeros(size, dtype=torch.float32)
                chunk = flat[rank * size: (rank + 1) * size]
                part[: chunk.numel()] = chunk
                self.shadow[name].copy_(part)
            else:
                if whole.shape != param.shape:
                    raise ValueError(f"EMA tensor {name}: shape {tuple(whole.shape)}, expected {tuple(param.shape)}")
                self.shadow[name].copy_(whole)
        self.num_updates = num_updates


def copy_into(module: nn.Module, state: dict[str, torch.Tensor], prefix: Optional[str] = None) -> None:
    """Load EMA tensors (optionally those under ``prefix.``) into a plain, unpartitioned module."""
    if prefix:
        state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    own = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in own:
                raise KeyError(f"EMA tensor {name!r} has no parameter in {type(module).__name__}")
            own[name].copy_(tensor)
