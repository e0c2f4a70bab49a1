"""Model-state memory per GPU under ZeRO stages 0-3.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
Sec. 3 and Fig. 1: with mixed-precision Adam every trainable parameter costs 2 bytes of half
parameters, 2 bytes of half gradients and K = 12 bytes of optimizer state (fp32 master copy,
momentum, variance). Stage 1 partitions the optimizer state over the N data-parallel ranks, stage 2
also the gradients, stage 3 also the parameters. In fp32 the same 16 bytes split as 4 + 4 + 8
(Adam's two moments, no master copy).

Activations, temporary buffers and fragmentation are not model states and are not counted here.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("bf16", "fp16", "fp32")
STAGES = (0, 1, 2, 3)


def bytes_per_parameter(precision: str) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes per trainable parameter."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    return (4, 4, 8) if precision == "fp32" else (2, 2, 12)


@dataclass(frozen=True)
class ZeroMemory:
    stage: int
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def zero_model_state_bytes(num_trainable: int, world_size: int, stage: int,
                           precision: str = "bf16") -> ZeroMemory:
    """Bytes per rank of parameters, gradients and optimizer state of the trainable parameters."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage} is not a ZeRO stage; allowed: {STAGES}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    p, g, k = bytes_per_parameter(precision)
    n = float(world_size)
    params = num_trainable * p / (n if stage >= 3 else 1)
    grads = num_trainable * g / (n if stage >= 2 else 1)
    optimizer = num_trainable * k / (n if stage >= 1 else 1)
    return ZeroMemory(stage=stage, params=params, grads=grads, optimizer=optimizer)
