"""The GPU suite runs on the CPU at reduced sizes (so CI keeps it working): one table, every row measured,
FLOPs from trainer.flops, our UNet's step beside diffusers' on the same config and weights."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_suite  # noqa: E402


def test_gpu_suite_small_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    table = gpu_suite.main(["--small", "--device", "cpu", "--steps", "1", "--warmup", "1", "--no-compile",
                            "--threads", "1", "--out", str(out)])
    assert out.read_text().strip() == table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "(small)" in line]
    assert len(rows) == 6  # 2 cases x (ours, ours unet, diffusers)
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        step_ms, img_s, tflops = float(cells[3]), float(cells[4]), float(cells[5])
        assert step_ms > 0 and img_s > 0 and tflops > 0
        assert cells[6] == "-"  # no MFU without a known peak (the CPU)
    versus = [line for line in rows if "ours unet" in line]
    assert all(float(line.strip("|").split("|")[-1]) > 0 for line in versus)
    # The jointly trained text encoder is in the full row's parameters and FLOPs, not in the UNet row's.
    ldm = {line.split("|")[2].strip(): line for line in rows if "ldm_1p45b" in line}
    params = {row: int(line.split("|")[8].strip().replace(",", "")) for row, line in ldm.items()}
    assert params["ours"] > params["ours unet"] == params["diffusers"]
