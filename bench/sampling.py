"""DDIM with classifier-free guidance: our ``ddim`` + ``cfg_model_fn`` vs a diffusers pipeline loop.

Both loops drive the SAME UNet (ours, ``trainer.models.unet.UNetModel`` with random weights; or
``--unet diffusers``: diffusers' ``UNet2DConditionModel`` with the same weights converted by
``trainer.convert.diffusers_unet``, wrapped to our ``forward(x, timesteps, context)``) from the same
x_T, so the difference is the sampler's own overhead. The diffusers side is the denoising loop of
``StableDiffusionPipeline``: ``DDIMScheduler`` with SD's config, ``set_timesteps`` / ``step``, the
latents duplicated with ``torch.cat([x, x])`` and the output split with ``chunk(2)`` for guidance.

    python bench/sampling.py [--steps 50] [--guidance 7.5] [--preset null|tiny|sd_small] [--size 32]
                             [--batch 1] [--repeats 5] [--device cpu|cuda] [--threads 2] [--unet ours|diffusers]

Runs are interleaved (ours, diffusers, then diffusers, ours, ...) after one warm-up run of each so
drift in machine load hits both alike; the median of ``--repeats`` is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

from trainer.convert.diffusers_unet import diffusers_unet_config, unet_to_diffusers  # noqa: E402
from trainer.diffusion import NoiseSchedule  # noqa: E402
from trainer.models.unet import UNetConfig, UNetModel  # noqa: E402
from trainer.sampling import cfg_model_fn, ddim  # noqa: E402

# name: (UNetConfig kwargs, latent side, context length). sd_small: SD v1's layout at 1/5 width;
# null: no network at all (NullUNet), i.e. the sampler loops' own overhead at SD's latent size.
PRESETS: dict[str, tuple[dict, int, int]] = {
    "null": (dict(context_dim=768), 64, 77),
    "tiny": (dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1],
                  num_heads=4, context_dim=32, norm_num_groups=8), 16, 8),
    "sd_small": (dict(model_channels=64, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                      attention_resolutions=[4, 2, 1], num_heads=8, context_dim=256), 32, 77),
}
# Stable Diffusion v1's scheduler_config.json (= CompVis v1-inference.yaml + DDIM defaults).
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class DiffusersUNet(torch.nn.Module):
    """``UNet2DConditionModel`` behind our ``forward(x, timesteps, context)``."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


class NullUNet(torch.nn.Module):
    """``--preset null``: a near-free stand-in, so the timings are the samplers' own overhead."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return 0.1 * x


def build_unet(preset: str, which: str, device: torch.device) -> tuple[torch.nn.Module, UNetConfig]:
    cfg = UNetConfig(**PRESETS[preset][0])
    if preset == "null":
        return NullUNet(), cfg
    torch.manual_seed(0)
    ours = UNetModel(cfg)
    with torch.no_grad():
        for p in ours.parameters():  # non-zero everywhere (the output conv starts at zero)
            p.normal_(0.0, 0.02)
    model: torch.nn.Module = ours
    if which == "diffusers":
        theirs = UNet2DConditionModel(**diffusers_unet_config(cfg))
        state, report = unet_to_diffusers(ours.state_dict(), cfg)
        report.raise_if_incomplete("bench conversion")
        theirs.load_state_dict(state, strict=True)
        model = DiffusersUNet(theirs)
    return model.to(device).eval(), cfg


@torch.no_grad()
def run_ours(unet, x_T, context, uncond, schedule, steps: int, guidance: float) -> torch.Tensor:
    return ddim(cfg_model_fn(unet, context, uncond, guidance), x_T, schedule, num_steps=steps)


@torch.no_grad()
def run_diffusers_loop(unet, x_T, context, uncond, scheduler: DDIMScheduler, steps: int, guidance: float
                       ) -> torch.Tensor:
    scheduler.set_timesteps(steps, device=x_T.device)
    embeds = torch.cat([uncond, context])
    latents = x_T
    for t in scheduler.timesteps:
        latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_text = unet(latent_in, t, embeds).chunk(2)
        noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd_small")
    parser.add_argument("--size", type=int, default=None, help="latent side (default: the preset's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unet", choices=("ours", "diffusers"), default="ours")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    unet, cfg = build_unet(args.preset, args.unet, device)
    _, side, length = PRESETS[args.preset]
    side = args.size or side
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(args.batch, cfg.in_channels, side, side, generator=gen).to(device)
    context = torch.randn(args.batch, length, cfg.context_dim, generator=gen).to(device)
    uncond = torch.randn(args.batch, length, cfg.context_dim, generator=gen).to(device)
    schedule = NoiseSchedule(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012, prediction_type="eps").to(device)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    runs = {
        "ours": lambda: run_ours(unet, x_T, context, uncond, schedule, args.steps, args.guidance),
        "diffusers": lambda: run_diffusers_loop(unet, x_T, context, uncond, scheduler, args.steps, args.guidance),
    }

    unet_name = "none" if args.preset == "null" else args.unet
    print(f"UNet {unet_name} ({args.preset}: {PRESETS[args.preset][0]}), latents {args.batch}x{cfg.in_channels}x"
          f"{side}x{side}, context {length} tokens; DDIM {args.steps} steps, guidance {args.guidance}; device "
          f"{args.device}, {args.threads} threads, fp32; median of {args.repeats} interleaved runs after 1 warm-up")
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.repeats):
        for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
            _sync(device)
            start = time.perf_counter()
            runs[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in times.items()}
    fastest = {name: min(v) for name, v in times.items()}
    for name in runs:
        print(f"{name:<10} median {medians[name]:8.3f} s ({medians[name] / args.steps * 1e3:.1f} ms/step), "
              f"min {fastest[name]:8.3f} s; runs: {', '.join(f'{v:.3f}' for v in times[name])}")
    diff = (outputs["ours"] - outputs["diffusers"]).abs().max().item()
    print(f"max abs diff of the samples: {diff:.2e} (max abs value {outputs['diffusers'].abs().max().item():.2f})")
    # On a shared machine load only adds time: the min, and the ratio within each interleaved pair of
    # runs (adjacent in time, so under similar load), are less noisy than the ratio of medians.
    paired = statistics.median(o / d for o, d in zip(times["ours"], times["diffusers"]))
    print(f"ratio ours/diffusers: {medians['ours'] / medians['diffusers']:.3f} "
          f"(min/min {fastest['ours'] / fastest['diffusers']:.3f}, median of paired ratios {paired:.3f})")


if __name__ == "__main__":
    main()
