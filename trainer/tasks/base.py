"""What a kind of training job is to the loop (``trainer/loop.py``): the interface every task implements.

A task builds its networks and DeepSpeed engines from the config groups it is handed, computes the
loss of one micro-batch, and says what else a checkpoint holds, what it evaluates and what it reports.
The loop owns everything else - the micro-batch / accumulation / optimizer-step cadence, the NaN
policy, EMA updates, logging, checkpoints, signals and requeue - so a new kind of job costs one file.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from trainer.runtime.checkpoint import ResumePoint
from trainer.runtime.ema import EMA
from trainer.runtime.tracking import RunTracker


@dataclass(frozen=True)
class TaskContext:
    """What the composition root hands every task: where it runs and how it gets an engine."""

    device: torch.device
    dtype: torch.dtype  # the engines' compute dtype (deepspeed.precision)
    rank: int
    world_size: int
    seed: int  # train.seed: identical initial weights on every rank, per-sample draws
    zero_stage: int
    # ``make_engine(module) -> (engine, optimizer)``: DeepSpeed over the module's trainable parameters,
    # with its own AdamW whose ``skip_next_step`` drops a step (``trainer.runtime.engine.initialize``).
    make_engine: Callable[[nn.Module], tuple[Any, Any]]
    # The checkpoint to resume was written by another number of ranks and is loaded through DeepSpeed's
    # universal format (``saved_world_size`` ranks then); a task that cannot be resumed so refuses.
    load_universal: bool = False
    saved_world_size: Optional[int] = None
    channels_last: bool = False  # train.channels_last: NHWC inputs, and NHWC weights outside the engine


@dataclass
class MicroBatch:
    """One micro-batch's result. ``loss`` is what the loop logs as ``loss``; ``backward`` maps an engine's
    name to the loss it backpropagates (an engine that sits this micro-batch out is absent); ``terms``
    are more scalars to log (detached, 0-dim). A non-finite ``loss`` or term on any rank skips the step.
    ``flops``: the micro-batch's model FLOPs on this rank (``trainer.flops``; 0 when the task does not count
    them), a host-side number computed from shapes, so throughput costs no sync."""

    loss: torch.Tensor
    backward: dict[str, torch.Tensor]
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    flops: int = 0


@dataclass
class CheckpointExtras:
    """What a task adds to a checkpoint: more engines (saved in ``<tag>/<name>/``), safetensors files
    (``{name: (tensors, metadata)}``) and entries of ``trainer_state.json``."""

    engines: dict[str, Any] = field(default_factory=dict)
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """One kind of training job. ``engines`` maps names to ``(engine, optimizer)`` in the order the loop
    steps them; the first is the main engine: saved at the checkpoint's root, its learning rate and
    gradient norm logged."""

    engines: dict[str, tuple[Any, Any]]
    summary: str = ""  # a line for the log: what is trained
    evaluates_at_end: bool = False  # evaluate once more after the last step
    uses_captions: bool = True  # False: samples without a caption are kept (the data skips them otherwise)

    @property
    def main_engine(self):
        return next(iter(self.engines.values()))[0]

    @abc.abstractmethod
    def micro_batch(self, batch: dict[str, Any], step: int) -> MicroBatch:
        """The losses of one micro-batch of optimizer step ``step`` (steps done before it)."""

    def ema_module(self) -> Optional[nn.Module]:
        """The module whose trained weights the EMA averages (None: the task keeps no EMA)."""
        return None

    def log_scalars(self, loss: float, terms: dict[str, float], step: int) -> dict[str, float]:
        """The scalars of a logging step from the step's mean loss and terms (means over micro-batches
        and ranks)."""
        return {"loss": loss}

    def evaluate(self, step: int, *, tracker: RunTracker, ema: Optional[EMA], checkpoint_dir: str,
                 run_id: str) -> dict[str, Any]:
        """Evaluate at ``step`` on every rank (collective); returns what the run's summary records."""
        return {}

    def checkpoint_extras(self, step: int) -> CheckpointExtras:
        """What the checkpoint of ``step`` holds beyond the main engine, the EMA and the loop's state
        (collective)."""
        return CheckpointExtras()

    def load_extras(self, point: ResumePoint) -> None:
        """Restore what ``checkpoint_extras`` saved."""

    def final_report(self, last_eval: dict[str, Any], checkpoint_dir: str, latest_tag: Optional[str]) -> list[str]:
        """Lines the job prints at its end, after where its outputs are."""
        return []
