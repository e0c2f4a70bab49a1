"""A full-size rehearsal on the CPU: the paper's ``ldm_1p45b`` UNet (872M trained parameters) with its
text transformer frozen, at the smallest latent size, 3 steps of ZeRO-3 on 2 CPU ranks with EMA, a
checkpoint, a resume (1 more step), an export - measured per-rank memory beside ``trainer.plan``'s table,
checkpoint size and save / load / export times.

    python bench/rehearsal.py [--preset full|tiny] [--workdir /tmp/rehearsal]

Needs about 20 GiB of RAM and minutes of both cores for ``full``: run it on an otherwise idle machine.
``--preset tiny`` runs the same sequence on the tiny model in a minute (a smoke test of the script).

The text transformer uses open_clip's bundled BPE vocabulary (``tokenizer=clip_bpe``, vocab 49,408),
since the WordPiece vocab.txt is not shipped; it is frozen, so the trained parameters are the UNet's.
The first stage (KL-f8, random weights: nothing is downloaded) encodes the 64 px digits to 8x8 latents.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {
    "full": ["model=ldm_1p45b", "model.text_encoder.trainable=false", "model.text_encoder.tokenizer=clip_bpe",
             "model.text_encoder.vocab_size=49408", "data.image_size=64", "model.autoencoder.resolution=64"],
    "tiny": ["model=tiny_kl"],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT))
    return env


def _rss_of_tree(pid: int) -> dict[int, int]:
    """Resident bytes of ``pid``'s descendant python processes (the ranks), by pid."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().split()
            status = (proc / "status").read_text()
        except OSError:
            continue
        if int(stat[3]) != pid:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        if match and "trainer.train" in (proc / "cmdline").read_text(errors="replace"):
            out[int(proc.name)] = int(match.group(1)) * 1024
    return out


def _run_ranks(args: list[str], nproc: int) -> tuple[float, dict[int, int], str]:
    """Run trainer.train on ``nproc`` ranks; returns (seconds, peak RSS per rank, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", "29617", "-m", "trainer.train", *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        for pid, rss in _rss_of_tree(proc.pid).items():
            peaks[pid] = max(peaks.get(pid, 0), rss)
        time.sleep(0.5)
    reader.join()
    output = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"trainer.train failed ({proc.returncode}):\n{output[-6000:]}")
    return time.time() - t0, peaks, output


def _seconds(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--workdir", default="/tmp/rehearsal")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    run_dir = work / "run"
    model = PRESETS[args.preset]
    plan = subprocess.run([sys.executable, "-m", "trainer.plan", *[m for m in model if m.startswith("model")],
                           "world_size=2", "precision=fp32", "image_size=64"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True)
    common = ["experiment=tiny", f"run_dir={run_dir}", f"data.root={ROOT / '.cache' / 'data' / 'digits64'}", *model,
              "deepspeed=zero3", "train.global_batch_size=2", "train.micro_batch_size=1", "ema=default",
              "checkpoint.interval_steps=3", "eval=none", "logging.image_interval_steps=0", "logging.interval_steps=1"]
    seconds_train, peaks_train, out_train = _run_ranks([*common, "train.max_steps=3"], 2)
    checkpoint = run_dir / "checkpoints" / "step00000003"
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    seconds_resume, peaks_resume, out_resume = _run_ranks([*common, "train.max_steps=4"], 2)
    resumed = "resumed from checkpoint step00000003" in out_resume
    t0 = time.time()
    export = subprocess.run([sys.executable, "-m", "trainer.export", f"checkpoint={run_dir}", f"out={work / 'export'}",
                             "format=safetensors"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    seconds_export = time.time() - t0
    export_size = sum(p.stat().st_size for p in (work / "export").rglob("*") if p.is_file()) if export.returncode == 0 else 0
    print(plan.stdout)
    print(f"rehearsal ({args.preset}): ZeRO-3, 2 CPU ranks, fp32, EMA, 3 steps + resume to 4 + export")
    print(f"  peak RSS per rank, training: {', '.join(f'{b / 2**30:.2f} GiB' for b in sorted(peaks_train.values()))}")
    print(f"  peak RSS per rank, resume:   {', '.join(f'{b / 2**30:.2f} GiB' for b in sorted(peaks_resume.values()))}")
    print(f"  checkpoint step00000003: {size / 2**30:.2f} GiB; save "
          f"{_seconds(r'saved checkpoint step00000003 in ([0-9.]+)s', out_train)} s")
    print(f"  resume: {'ok' if resumed else 'NOT RESUMED'}; whole resumed job {seconds_resume:.0f} s "
          f"(first run {seconds_train:.0f} s)")
    print(f"  export (safetensors): {'ok' if export.returncode == 0 else 'FAILED'} in {seconds_export:.0f} s, "
          f"{export_size / 2**30:.2f} GiB")
    print(json.dumps({"peaks_train": peaks_train, "checkpoint_bytes": size, "resumed": resumed,
                      "export_ok": export.returncode == 0}))
    if export.returncode != 0:
        print(export.stderr[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main()
