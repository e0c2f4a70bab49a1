"""The GPU suite (``make bench-gpu``): training-step throughput, MFU and peak memory of the real presets.

    python bench/gpu_suite.py [--steps 10] [--warmup 3] [--no-compile] [--no-diffusers] [--out bench/RESULTS.md]
    python bench/gpu_suite.py --small        # reduced sizes, any device (CI runs it on the CPU)

Cases (bf16 autocast over fp32 weights, torch's fused AdamW on CUDA; synthetic cached latents, so neither
the first stage nor a frozen text encoder runs - the throughput of a run with latent and text caches):

- ``ldm_1p45b`` at 256 px (latents 32x32): the UNet and the 32-layer text transformer trained jointly
  from token ids, the paper's 1.45B model;
- ``sd_v1`` UNet at 512 px (latents 64x64), the context (B, 77, 768) given (cached CLIP outputs).

Rows per case: ours eager, ours with regional compilation (``train.compile``: each ResBlock,
SpatialTransformer and text layer compiled on its own), our UNet alone and diffusers'
``UNet2DConditionModel`` (SDPA attention processor) with the same config and weights, both eager and
fed the same context. Each row: median step time over ``--steps`` steps after ``--warmup`` (compile time
excluded), img/s, achieved TFLOP/s and MFU from ``trainer.flops`` (model FLOPs; the device's dense bf16
peak from ``trainer.flops.PEAK_TFLOPS``), peak memory (CUDA allocator; resident set on the CPU) beside
``trainer.plan``'s model-state prediction (16 bytes per trained parameter: fp32 weights, grads and two
Adam moments - what DeepSpeed's bf16 mixed precision also holds; activations not predicted).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.convert.diffusers_unet import diffusers_unet_config, unet_to_diffusers  # noqa: E402
from trainer.flops import diffusion_training_flops, unet_flops  # noqa: E402
from trainer.models.autoencoder import AutoencoderConfig  # noqa: E402
from trainer.models.text_encoders import LDMTextTransformer, TextEncoderConfig  # noqa: E402
from trainer.models.unet import UNetConfig, UNetModel  # noqa: E402
from trainer.runtime.device import device_peak_tflops, peak_memory_gb  # noqa: E402
from trainer.runtime.engine import apply_regional_compile, build_optimizer, OptimConfig  # noqa: E402
from trainer.tasks.diffusion import DiffusionTrainModule  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    unet: UNetConfig
    text: TextEncoderConfig | None  # trained jointly from tokens; None: the context is given
    image_size: int
    batch: int


def cases(small: bool) -> list[Case]:
    if small:  # the same code paths at a size any CPU runs in seconds
        unet = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2], num_heads=4,
                    norm_num_groups=8)
        text = TextEncoderConfig(kind="ldm_bert", width=64, depth=2, num_heads=2, dim_head=32, vocab_size=1000,
                                 max_length=16)
        return [Case("ldm_1p45b (small)", UNetConfig(context_dim=64, **unet), text, 64, 2),
                Case("sd_v1 (small)", UNetConfig(context_dim=64, **unet), None, 64, 2)]
    return [Case("ldm_1p45b 256px", UNetConfig(context_dim=1280), TextEncoderConfig(), 256, 32),
            Case("sd_v1 512px", UNetConfig(context_dim=768), None, 512, 8)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _inputs(case: Case, device: torch.device, context_len: int, context_dim: int):
    gen = torch.Generator().manual_seed(0)
    side = case.image_size // 8
    x = torch.randn(case.batch, 4, side, side, generator=gen).to(device)
    t = torch.randint(0, 1000, (case.batch,), generator=gen).to(device)
    target = torch.randn(x.shape, generator=gen).to(device)
    context = torch.randn(case.batch, context_len, context_dim, generator=gen).to(device)
    tokens = torch.randint(0, case.text.vocab_size if case.text else 2, (case.batch, context_len), generator=gen).to(device)
    return x, t, target, context, tokens


def measure(case: Case, row: str, device: torch.device, steps: int, warmup: int) -> dict:
    """One row: build, warm up, time ``steps`` optimizer steps."""
    _reset_memory(device)
    torch.manual_seed(0)
    unet = UNetModel(case.unet)
    text = LDMTextTransformer.from_config(case.text) if case.text is not None and row in ("ours", "ours compiled") else None
    context_len = case.text.max_length if case.text is not None else 77
    x, t, target, context, tokens = _inputs(case, device, context_len, case.unet.context_dim)
    if row == "diffusers":
        from diffusers import UNet2DConditionModel  # imported here: optional, and it takes seconds
        model = UNet2DConditionModel(**diffusers_unet_config(case.unet))
        state, report = unet_to_diffusers(unet.state_dict(), case.unet)
        report.raise_if_incomplete("gpu suite conversion")
        model.load_state_dict(state, strict=True)
        forward = lambda: model(x, t, context).sample  # noqa: E731
    else:
        model = DiffusionTrainModule(unet, text)
        if row == "ours compiled":
            apply_regional_compile(model)
        cond = tokens if text is not None else context
        forward = lambda: model(x, t, cond)  # noqa: E731
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params, "weight_decay": 0.0}], OptimConfig(lr=1e-5), device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(forward().float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    text_cfg = case.text if text is not None else TextEncoderConfig(kind="ldm_bert", trainable=False,
                                                                    max_length=context_len, width=case.unet.context_dim)
    if row in ("ours", "ours compiled"):
        flops = diffusion_training_flops(case.unet, text_cfg, AutoencoderConfig(), case.image_size,
                                         cached_latents=True, cached_text=True).total.model
    else:
        side = case.image_size // 8
        flops = unet_flops(case.unet, side, side, context_len).model
    seconds = statistics.median(times)
    num_params = sum(p.numel() for p in params)
    result = {"case": case.name, "row": row, "batch": case.batch, "step_s": seconds, "img_s": case.batch / seconds,
              "tflops": flops * case.batch / seconds / 1e12, "params": num_params,
              "peak_gb": peak_memory_gb(device), "plan_gb": 16 * num_params / 2**30,
              "spread_s": max(times) - min(times)}
    del model, optimizer, unet, text
    return result


def render(results: list[dict], device: torch.device, peak: float | None, note: str) -> str:
    lines = [f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
             f"dense bf16 peak {peak if peak else '-'} TFLOP/s; {time.strftime('%Y-%m-%d')}; {note}", "",
             "| case | row | batch | step ms | img/s | TFLOP/s | MFU | trained params | peak mem GiB | "
             "plan model states GiB | step vs diffusers |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_case: dict[str, dict[str, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["row"]] = r
    for r in results:
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "-"
        rows = by_case[r["case"]]
        versus = (f"{r['step_s'] / rows['diffusers']['step_s']:.3f}" if r["row"] == "ours unet" and "diffusers" in rows
                  else "")
        lines.append(f"| {r['case']} | {r['row']} | {r['batch']} | {r['step_s'] * 1e3:.1f} | {r['img_s']:.2f} | "
                     f"{r['tflops']:.3g} | {mfu} | {r['params']:,} | {r['peak_gb']:.2f} | {r['plan_gb']:.2f} | {versus} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="reduced sizes (CPU, CI)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = ["ours"] + ([] if args.no_compile else ["ours compiled"]) + ["ours unet"] + \
        ([] if args.no_diffusers else ["diffusers"])
    results = []
    for case in cases(args.small):
        for row in rows:
            t0 = time.time()
            results.append(measure(case, row, device, args.steps, args.warmup))
            print(f"  {case.name} / {row}: {results[-1]['step_s'] * 1e3:.1f} ms per step "
                  f"({time.time() - t0:.0f} s with build and warm-up)", file=sys.stderr, flush=True)
    peak = device_peak_tflops(device)
    table = render(results, device, peak, f"{'reduced sizes' if args.small else 'full presets'}, bf16 autocast, "
                                          f"median of {args.steps} steps after {args.warmup}")
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
