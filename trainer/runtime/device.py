"""The one place that decides which device a process computes on, and prepares the process for it.

Every command with a ``device`` setting (training's ``train.device``, ``precompute.device``,
``eval.run``'s and ``eval.reconstruction``'s ``device``, ``trainer.sample``'s) resolves it here, so
``auto`` means the same everywhere: this rank's GPU (``cuda:<local rank>``) when CUDA is available,
else the CPU.
"""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import torch

from trainer.checks import invalid
from trainer.flops import peak_tflops_for

DEVICES = ("auto", "cpu", "cuda")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(key: str, value: str) -> None:
    """Validation for config dataclasses: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (no hardware check)."""
    if not isinstance(value, str) or not _DEVICE_RE.fullmatch(value):
        raise invalid(key, value, "auto, cpu, cuda or cuda:N")


def select_device(requested: str, key: str, local_rank: int = 0) -> torch.device:
    """The device ``requested`` names (``key`` is the setting, for the error): ``auto`` is
    ``cuda:<local_rank>`` when CUDA is available, else the CPU; ``cuda`` is ``cuda:<local_rank>``."""
    check_device(key, requested)
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise invalid(key, requested, "'cpu' or 'auto' here: CUDA is not available on this machine")
    index = int(requested.split(":", 1)[1]) if ":" in requested else local_rank
    if index >= torch.cuda.device_count():
        raise invalid(key, requested, f"a CUDA device index below {torch.cuda.device_count()} (the visible devices)")
    return torch.device("cuda", index)


def prepare_process(device: torch.device, num_threads: int = 0) -> None:
    """What DeepSpeed reads at import and at its first op: which accelerator (``DS_ACCELERATOR``:
    without it DeepSpeed probes for CUDA and fails on a CPU-only machine) and where its compiled ops
    are cached (``TORCH_EXTENSIONS_DIR``: a kept cache skips a minute of compiling at every start);
    and torch's intra-op threads on the CPU (0 keeps torch's default)."""
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))
    if num_threads:
        torch.set_num_threads(num_threads)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated on the GPU, or the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def device_peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The dense bf16 peak MFU is measured against: ``override`` (``train.peak_tflops``) when set, else
    the table entry for this GPU's name; None on the CPU or an unlisted GPU (MFU is then not logged)."""
    if override > 0:
        return float(override)
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))
