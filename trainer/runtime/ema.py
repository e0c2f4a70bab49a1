"""Exponential moving average of the trained weights, under every ZeRO stage and precision.

The average is taken of the optimizer's fp32 master weights, not of the bf16/fp16 copies the model
computes with: a decay of 0.9999 moves the average by 1e-4 of the gap to the weights, below bf16's
resolution (2^-8 relative), and the bf16 copy is itself a rounding of the master. Each rank averages
exactly the part of the masters it holds, so EMA memory is sharded like the optimizer state:

* ZeRO-3: the flat fp32 partition of each parameter (DeepSpeed's ``safe_get_local_fp32_param``);
* ZeRO-1/2, and DeepSpeed's bf16 optimizer at stage 0: the fragment of each parameter inside this
  rank's flat fp32 partition (``param._hp_mapping``: where it sits in the parameter, possibly none);
* whole masters (DeepSpeed's unfused bf16/fp16 optimizer at stage 0): the fp32 copy of the parameter
  the optimizer steps (``fp32_groups``, found through ``optimizer``);
* no master (fp32 at stage 0): the parameter itself.

The update is one multi-tensor ``torch._foreach_lerp_`` over all of them (NVIDIA's profile of SD
training puts a per-tensor EMA loop at 8.6% of the step). ``state_dict`` assembles whole fp32 tensors
on every rank (the checkpoint's ``ema.safetensors`` is therefore independent of the world size) and
``load_state_dict`` cuts each rank's part back out of them.
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




_WHOLE, _PARTITION, _FRAGMENT = "whole", "partition", "fragment"


@dataclass
class _Part:
    """Where this rank's share of one parameter's fp32 master lives."""

    layout: str  # _WHOLE: the parameter; _PARTITION: a ZeRO-3 flat partition; _FRAGMENT: a slice of it
    start: int = 0  # _FRAGMENT: offset of the fragment in the flattened parameter
    numel: int = 0  # _PARTITION / _FRAGMENT: elements held here


def _part_of(param: nn.Parameter) -> _Part:
    if hasattr(param, "ds_id"):
        return _Part(_PARTITION, 0, param.ds_tensor.numel())
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        if mapping is None:  # this rank's partition holds none of the parameter
            return _Part(_FRAGMENT, 0, 0)
        return _Part(_FRAGMENT, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
    return _Part(_WHOLE)


def _whole_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(low-precision parameter) -> its whole fp32 master, for an optimizer wrapper that keeps them
    unpartitioned side by side (DeepSpeed's FP16_UnfusedOptimizer: ``fp16_groups`` / ``fp32_groups``)."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not (isinstance(low, list) and isinstance(high, list)):
        return {}
    out = {}
    for low_group, high_group in zip(low, high):
        if isinstance(low_group, list) and isinstance(high_group, list):
            for p, master in zip(low_group, high_group):
                if master.shape == p.shape:
                    out[id(p)] = master
    return out


def _master(param: nn.Parameter, part: _Part, whole_masters: dict[int, torch.Tensor]) -> torch.Tensor:
    """A view of this rank's fp32 master of ``param`` (a new empty tensor when it holds none)."""
    if part.layout == _PARTITION:
        # Imported here: deepspeed reads DS_ACCELERATOR at import (the engine is built by now).
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param)
    if part.layout == _FRAGMENT:
        if param._hp_mapping is None:
            return torch.empty(0, dtype=torch.float32, device=param.device)
        return param._hp_mapping.get_hp_fragment()
    return whole_masters.get(id(param), param.data)


class EMA:
    """``optimizer``: the engine's optimizer (DeepSpeed's wrapper), where whole fp32 masters are found
    when DeepSpeed keeps them unpartitioned; partitioned masters are found from the parameters."""

    def __init__(self, module: nn.Module, decay: float, *, warmup: bool = True, optimizer=None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay={decay!r} is invalid; allowed: a float in (0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.params: dict[str, nn.Parameter] = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.parts = {n: _part_of(p) for n, p in self.params.items()}
        self._optimizer = optimizer
        whole = _whole_masters(optimizer)
        # fp32 whatever the training dtype (see the module docstring).
        self.shadow: dict[str, torch.Tensor] = {
            n: _master(p, self.parts[n], whole).detach().to(torch.float32).clone() for n, p in self.params.items()}
        self._masters: list[torch.Tensor] | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        # CompVis ldm/modules/ema.py (LitEma): min(decay, (1 + n) / (10 + n)).
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def _sources(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadows, masters) of the non-empty parts. The master views are looked up once, at the first
        update (after any checkpoint was loaded: DeepSpeed loads masters in place, so the views stay valid)."""
        if self._masters is None:
            whole = _whole_masters(self._optimizer)
            self._masters = [_master(p, self.parts[n], whole) for n, p in self.params.items()]
        pairs = [(self.shadow[n], m) for n, m in zip(self.params, self._masters) if m.numel()]
        return [s for s, _ in pairs], [m if m.dtype == torch.float32 else m.float() for _, m in pairs]

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        shadows, masters = self._sources()
        if shadows:
            torch._foreach_lerp_(shadows, masters, 1.0 - decay)  # shadow += (1 - decay) (master - shadow)
        self.num_updates += 1

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole fp32 EMA tensors (names as in the module). Collective under ZeRO (every rank must call
        it); the assembled tensors are returned on every rank."""
        out: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            local, part = self.shadow[name], self.parts[name]
            if part.layout == _PARTITION:
                flat = distributed.all_gather_flat(local, group=param.ds_process_group)
                out[name] = flat[: param.ds_numel].view(param.ds_shape).cpu().clone()
            elif part.layout == _FRAGMENT:
                # Fragments of the ranks are disjoint: summing zero-padded copies assembles the tensor
                # (DeepSpeed's get_full_hp_param does the same for the masters).
                whole = torch.zeros(param.numel(), dtype=torch.float32, device=local.device)
                whole.narrow(0, part.start, part.numel).copy_(local)
                distributed.all_reduce_sum_(whole, group=param._dp_group)
                out[name] = whole.view(param.shape).cpu()
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
            part = self.parts[name]
            shape = tuple(param.ds_shape) if part.layout == _PARTITION else tuple(param.shape)
            if tuple(whole.shape) != shape:
                raise ValueError(f"EMA tensor {name}: shape {tuple(whole.shape)}, expected {shape}")
            flat = whole.flatten()
            if part.layout == _PARTITION:
                rank = distributed.group_rank(param.ds_process_group)
                piece = torch.zeros(part.numel, dtype=torch.float32)
                chunk = flat[rank * part.numel: (rank + 1) * part.numel]
                piece[: chunk.numel()] = chunk
                self.shadow[name].copy_(piece)
            elif part.layout == _FRAGMENT:
                self.shadow[name].copy_(flat.narrow(0, part.start, part.numel))
            else:
                self.shadow[name].copy_(whole)
        self.num_updates = num_updates
        self._masters = None  # looked up again: the engine's checkpoint was loaded just before


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
