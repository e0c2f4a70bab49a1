"""One EMA update of a UNet's weights: our multi-tensor update (``trainer.runtime.ema.EMA.update``, one
``torch._foreach_lerp_`` over every tensor) vs the per-tensor loop it replaced (``lerp_`` per parameter,
reading the bf16 copies and casting each to fp32 first).

    python bench/ema_update.py [--preset sd_small|sd_v1|...] [--rounds 15] [--device cpu|cuda] [--threads 2]

Both variants update their own fp32 shadow from the same weights; they are interleaved (the order
flipping each round), and the median and the spread (min-max) of ``--rounds`` are printed with the
ratio ours / loop. The baseline reads bf16 weights (what the old EMA did under bf16 training); ours
reads fp32 masters (what it does now), so the comparison is of the two EMAs as they run in training.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.unet_step import PRESETS  # noqa: E402
from trainer.models.unet import UNetConfig, UNetModel  # noqa: E402
from trainer.runtime.ema import EMA  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(preset: str, rounds: int, device: torch.device) -> dict[str, float]:
    model = UNetModel(UNetConfig(**PRESETS[preset][0])).to(device)
    ema = EMA(model, 0.9999, warmup=False)  # fp32 weights: the masters are the parameters
    bf16 = [p.detach().to(torch.bfloat16) for p in model.parameters()]
    fp32 = [p.detach() for p in model.parameters()]
    loop_shadow = [p.detach().float().clone() for p in model.parameters()]
    loop32_shadow = [p.detach().float().clone() for p in model.parameters()]

    def ours() -> None:
        ema.update()

    def loop() -> None:
        with torch.no_grad():
            for shadow, weight in zip(loop_shadow, bf16):
                shadow.lerp_(weight.to(torch.float32), 1.0 - 0.9999)

    def loop32() -> None:  # the same loop over fp32 weights: what foreach alone saves
        with torch.no_grad():
            for shadow, weight in zip(loop32_shadow, fp32):
                shadow.lerp_(weight, 1.0 - 0.9999)

    fns = [("ours", ours), ("loop", loop), ("loop_fp32", loop32)]
    times: dict[str, list[float]] = {name: [] for name, _ in fns}
    for _, fn in fns * 2:  # warm-up
        fn()
    for r in range(rounds):
        order = fns if r % 2 == 0 else fns[::-1]
        for name, fn in order:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    num_params = sum(p.numel() for p in model.parameters())
    out = {"preset": preset, "tensors": len(loop_shadow), "parameters": num_params}
    for name, ts in times.items():
        out[f"{name}_ms"] = statistics.median(ts) * 1e3
        out[f"{name}_spread_ms"] = (max(ts) - min(ts)) * 1e3
    out["ratio"] = out["ours_ms"] / out["loop_ms"]
    out["ratio_fp32"] = out["ours_ms"] / out["loop_fp32_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd_small")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = run(args.preset, args.rounds, torch.device(args.device))
    print(f"EMA update, {r['preset']}: {r['tensors']} tensors, {r['parameters']:,} parameters, {args.device}, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds (spread min-max)")
    print(f"  per-tensor loop (bf16 copies): {r['loop_ms']:8.2f} ms  ({r['loop_spread_ms']:.2f})")
    print(f"  per-tensor loop (fp32):        {r['loop_fp32_ms']:8.2f} ms  ({r['loop_fp32_spread_ms']:.2f})")
    print(f"  foreach (fp32 masters):        {r['ours_ms']:8.2f} ms  ({r['ours_spread_ms']:.2f})")
    print(f"  ours / loop (bf16 copies): {r['ratio']:.3f}   ours / loop (fp32): {r['ratio_fp32']:.3f}")


if __name__ == "__main__":
    main()
