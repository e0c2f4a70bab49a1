"""One training step (forward + backward) of our UNet vs diffusers ``UNet2DConditionModel``.

Both models get the same config (``diffusers_unet_config``) and the same weights (converted with
``unet_to_diffusers``); inputs are identical. Default: CPU fp32, 2 threads, an SD-shaped UNet with
reduced width (``--preset sd_small``).

    python bench/unet_step.py [--preset tiny|sd_small|sd_small_v2|sd_v1|sd_v2] [--steps 10]
                              [--warmup 2] [--device cpu|cuda] [--threads 2] [--batch N] [--compile]

``--compile`` adds a row: our UNet with regional compilation (``train.compile``: each ResBlock and
SpatialTransformer compiled on its own by inductor) against diffusers eager, interleaved with the
other two; its warm-up steps include the compilation, which is not timed.

Time: both models live in one process and their steps are interleaved (ours, diffusers, ours, ...,
the order flipping each round) after ``--warmup`` rounds, so drift in machine load hits both alike;
the median of ``--steps`` is reported. On a machine shared with other jobs use ``--threads 1``:
with more OpenMP threads than idle cores the workers spin-wait on each other, steps get up to 10x
slower and the ratio is noise. ``sd_v1``/``sd_v2`` hold both full-size models and their grads at
once (about 15 GB on CPU).

Peak memory of a step, above what is resident before it (weights, inputs, allocator caches); it
includes the parameter gradients, which the step allocates:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  memory allocated before the step; exact for tensor memory.
- CPU: torch has no CPU allocator statistics and ``tracemalloc`` does not see its allocations, so
  each model is measured in a fresh subprocess from the kernel's resident-set high-water mark:
  after a warm-up step (oneDNN primitive caches, thread pools) the grads are dropped, the mark is
  reset (``/proc/self/clear_refs`` = 5), the resident size is read, a step is run and ``VmHWM`` is
  read. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every large tensor with
  its own mmap and returns it on free; otherwise freed blocks linger in the heap and a later
  allocation reuses them without raising the mark. The median of three such steps is reported.
  (Linux only: it reads ``/proc``.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.convert.diffusers_unet import diffusers_unet_config, unet_to_diffusers  # noqa: E402
from trainer.models.unet import UNetConfig, UNetModel  # noqa: E402
from trainer.runtime.engine import apply_regional_compile  # noqa: E402

# name: (UNetConfig kwargs, latent side, context length, default batch)
PRESETS: dict[str, tuple[dict, int, int, int]] = {
    "tiny": (dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1],
                  num_heads=4, context_dim=32, norm_num_groups=8), 16, 8, 2),
    "sd_small": (dict(model_channels=64, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                      attention_resolutions=[4, 2, 1], num_heads=8, context_dim=256), 32, 77, 2),
    "sd_small_v2": (dict(model_channels=64, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                         attention_resolutions=[4, 2, 1], num_heads=-1, num_head_channels=32,
                         use_linear_in_transformer=True, context_dim=256), 32, 77, 2),
    "sd_v1": (dict(), 64, 77, 1),
    "sd_v2": (dict(num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
                   context_dim=1024), 64, 77, 1),
}


def build(preset: str, which: str, device: torch.device, batch: int | None, seed: int = 0):
    kwargs, side, length, default_batch = PRESETS[preset]
    batch = batch or default_batch
    cfg = UNetConfig(**kwargs)
    torch.manual_seed(seed)
    ours = UNetModel(cfg)
    # Random non-zero weights everywhere (zero-initialised output convs would make grads trivial).
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    if which == "ours":
        model = ours
    else:
        from diffusers import UNet2DConditionModel
        model = UNet2DConditionModel(**diffusers_unet_config(cfg))
        state, report = unet_to_diffusers(ours.state_dict(), cfg)
        report.raise_if_incomplete("bench conversion")
        model.load_state_dict(state, strict=True)
        del ours
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    context = torch.randn(batch, length, cfg.context_dim, generator=gen).to(device)
    return model, (x, t, context)


def step(model, which: str, inputs) -> None:
    x, t, context = inputs
    out = model(x, t, context).sample if which == "diffusers" else model(x, t, context)
    out.square().mean().backward()


def drop_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_both(args, device: torch.device) -> dict[str, float]:
    models = {w: build(args.preset, w, device, args.batch) for w in ("ours", "diffusers")}
    if args.compile:
        compiled, inputs = build(args.preset, "ours", device, args.batch)
        apply_regional_compile(compiled)
        models["ours_compiled"] = (compiled, inputs)
    times: dict[str, list[float]] = {w: [] for w in models}
    names = list(models)
    for i in range(args.warmup + args.steps):
        order = names if i % 2 == 0 else names[::-1]
        for which in order:
            model, inputs = models[which]
            drop_grads(model)
            _sync(device)
            start = time.perf_counter()
            step(model, which, inputs)
            _sync(device)
            if i >= args.warmup:
                times[which].append(time.perf_counter() - start)
    return {w: statistics.median(v) for w, v in times.items()}


def _proc_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def peak_memory_child(args, which: str, device: torch.device) -> float:
    """Peak memory (MiB) of one step above the resident baseline; runs inside a fresh process."""
    model, inputs = build(args.preset, which, device, args.batch)
    step(model, which, inputs)
    peaks = []
    for _ in range(3):
        drop_grads(model)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(model, which, inputs)
            torch.cuda.synchronize(device)
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            base = _proc_kib("VmRSS")
            step(model, which, inputs)
            peaks.append((_proc_kib("VmHWM") - base) / 1024)
    return statistics.median(peaks)


def peak_memory(args, which: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--preset", args.preset, "--device", args.device,
           "--threads", str(args.threads), "--_memory-child", which]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd_small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add our regionally compiled UNet")
    parser.add_argument("--_memory-child", dest="memory_child", choices=("ours", "diffusers"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.memory_child:
        print(json.dumps({"peak_mib": peak_memory_child(args, args.memory_child, device)}))
        return

    kwargs, side, length, batch = PRESETS[args.preset]
    print(f"preset {args.preset}: {kwargs or 'UNetConfig defaults (SD v1)'}")
    print(f"latents {args.batch or batch}x4x{side}x{side}, context {length} tokens, device "
          f"{args.device}, {args.threads} threads, fp32, median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    times = time_both(args, device)
    mems = {which: peak_memory(args, which) for which in ("ours", "diffusers")}
    print(f"{'model':<12}{'step time (ms)':>16}{'peak memory (MiB)':>20}")
    for which in ("ours", "diffusers"):
        print(f"{which:<12}{times[which] * 1e3:>16.1f}{mems[which]:>20.1f}")
    print(f"ratio ours/diffusers: time {times['ours'] / times['diffusers']:.3f}, "
          f"memory {mems['ours'] / mems['diffusers']:.3f}")
    if "ours_compiled" in times:
        print(f"{'ours_compiled':<12}{times['ours_compiled'] * 1e3:>16.1f}{'':>20}")
        print(f"ratio ours compiled/diffusers eager: time {times['ours_compiled'] / times['diffusers']:.3f}")


if __name__ == "__main__":
    main()
