"""bench/zero_memory.py end to end: 2 gloo ranks through torchrun, tiny UNet, fp32, ZeRO-0 and ZeRO-3."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_zero_memory_bench_counts_model_states(tmp_path):
    out = tmp_path / "zero.json"
    cmd = [sys.executable, str(ROOT / "bench" / "zero_memory.py"), "--preset", "tiny", "--precisions", "fp32",
           "--stages", "0,3", "--steps", "1", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    num_params = rows[0]["num_params"]
    assert num_params == 792_964

    stage0 = rows[0]
    assert stage0["measured"]["params"] == 4 * num_params
    assert stage0["measured"]["grads"] == 4 * num_params
    # exp_avg + exp_avg_sq in fp32, plus AdamW's 4-byte ``step`` scalar per parameter tensor.
    assert 8 * num_params < stage0["measured"]["optimizer"] < 8 * num_params + 4096
    assert stage0["master"] == 0 and stage0["buffers"] == 0

    stage3 = rows[3]
    # Each parameter is split in two (rounded up), so a rank holds half the weights and gradients.
    for key in ("params", "grads"):
        assert 2 * num_params <= stage3["measured"][key] <= 2 * num_params + 4 * 256
        assert stage3["within_5pct"][key]
    # DeepSpeed keeps an fp32 master partition even in fp32: 4 + 8 bytes per parameter over 2 ranks.
    assert stage3["master"] == stage3["measured"]["params"]
    assert stage3["ratio"]["optimizer"] == pytest.approx(1.5, rel=0.01)
    # During backward the reduce bucket holds every gradient on top of this rank's partition.
    assert stage3["grads_backward_end"] == stage3["measured"]["grads"] + 4 * num_params
    assert stage3["step_ms"] > 0 and stage0["overhead_vs_stage0"] == 1.0
