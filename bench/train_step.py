"""The trainer's full optimizer step vs the bare forward + backward + optimizer step of the same engine.

    python bench/train_step.py [--rounds 7] [--warmup 2] [--threads 2] [--batch 4] [--compile] [-- key=value ...]

The job is composed by the real entry point (``trainer.train``: config, DeepSpeed engine, task, EMA,
tracker, loop) on a pixel-space model with the SD-shaped ``sd_small`` UNet of ``bench/unet_step.py``
(64 channels, mult 1-2-4-4, attention at 4-2-1, 8 heads) at 32x32, fp32, one CPU process, data
already in memory (the digits). Only the loop's ``train`` is replaced by this measurement:

- full: ``TrainLoop.train_step`` - data, caption dropout, tokenizer and text encoder, noise and
  timesteps from the per-sample generators, the objective, forward + backward, the step's all-reduce,
  clip + AdamW, the EMA update and, every ``logging.interval_steps`` (10), the logging step;
- bare: the same engine's forward on pre-computed inputs of the same shapes, an MSE loss, backward
  and ``engine.step()`` (clip + AdamW).

Rounds interleave the two (the order flipping each round); each round times ``--steps`` steps of
each; the median and spread (min-max) of the per-step time and the ratio full / bare are printed.
``--compile`` also times the full step with ``train.compile=true`` in a second process (compile time
excluded by the warm-up) and prints compiled / eager.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD_SMALL = ["model=tiny", "model.unet.model_channels=64", "model.unet.channel_mult=[1,2,4,4]",
            "model.unet.num_res_blocks=2", "model.unet.attention_resolutions=[4,2,1]", "model.unet.num_heads=8",
            "model.unet.norm_num_groups=32", "data.image_size=32"]


def _child(args: argparse.Namespace) -> None:
    """Runs inside ``trainer.train``'s process (the loop's ``train`` replaced); prints one JSON line."""
    import torch
    import torch.nn.functional as F

    from trainer import loop as loop_module
    from trainer.diffusion import SampleGenerators
    from trainer.runtime.lifecycle import StopRequest

    def measure(self, tracker) -> int:
        self.tracker = tracker
        task, stop = self.task, StopRequest(self.cadence.stop_signals)
        engine = task.main_engine
        batch = self.batches.step_batches(0)[0]
        x0 = task._latents(batch, SampleGenerators(0, batch["positions"]))
        cond = task._condition(batch["captions"])
        gen = torch.Generator().manual_seed(0)
        x_t, target = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)

        def bare() -> None:
            loss = F.mse_loss(engine(x_t, t, cond).float(), target)
            engine.backward(loss)
            engine.step()

        def full() -> None:
            self.train_step(stop)

        fns = [("full", full), ("bare", bare)] if args.mode == "both" else [("full", full)]
        times: dict[str, list[float]] = {name: [] for name, _ in fns}
        for _ in range(args.warmup):
            for _, fn in fns:
                fn()
        for r in range(args.rounds):
            for name, fn in (fns if r % 2 == 0 else fns[::-1]):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.steps)
        stop.restore()
        print("BENCH " + json.dumps(times), flush=True)
        return 0

    loop_module.TrainLoop.train = measure
    from trainer.train import main

    sys.argv = ["trainer.train", *args.overrides]
    main()


def _run(args: argparse.Namespace, mode: str, extra: list[str]) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["experiment=tiny", f"run_dir={tmp}/run", f"data.root={ROOT / '.cache' / 'data' / 'digits16'}",
                     *SD_SMALL, f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
                     f"train.num_threads={args.threads}", "train.max_steps=100000", "logging.interval_steps=10",
                     "checkpoint.interval_steps=1000000", "eval=none", "logging.image_interval_steps=0",
                     "logging.wandb_mode=disabled", "deepspeed=zero0", *extra, *args.overrides]
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--rounds", str(args.rounds), "--warmup",
               str(args.warmup), "--steps", str(args.steps), "--", *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"the measured run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(line[len("BENCH "):])


def _stats(ts: list[float]) -> str:
    return f"{statistics.median(ts) * 1e3:9.1f} ms  (spread {(max(ts) - min(ts)) * 1e3:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="both", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more trainer.train overrides (after --)")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    times = _run(args, "both", [])
    full, bare = statistics.median(times["full"]), statistics.median(times["bare"])
    print(f"train step, sd_small UNet at 32x32, batch {args.batch}, fp32, CPU, {args.threads} threads; median of "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    print(f"  bare fwd+bwd+opt step: {_stats(times['bare'])}")
    print(f"  full trainer step:     {_stats(times['full'])}")
    print(f"  overhead ratio full / bare: {full / bare:.3f}")
    if args.compile:
        compiled = _run(args, "full", ["train.compile=true"])
        print(f"  full step, compiled:   {_stats(compiled['full'])}  (separate process, after {args.warmup} warm-up steps)")
        print(f"  compiled / eager (full step): {statistics.median(compiled['full']) / full:.3f}")


if __name__ == "__main__":
    main()
