"""A checkpoint that cannot be written (issue 19, item 4): a real write failure (a file size limit,
RLIMIT_FSIZE, in a child process: what a full disk or a quota does to the writer) names the path, the
step and the OS reason; the partial step folder is removed; the previous checkpoint and ``latest``
stay intact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from trainer.runtime.checkpoint import CheckpointStore, CheckpointWriteError

class Engine:
    # What DeepSpeed's save_checkpoint does with its files: torch.save into <dir>/<tag>/.
    def __init__(self, numel):
        self.state = {"module": {"w": torch.ones(numel)}}
    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save(self.state, Path(save_dir, tag, "mp_rank_00_model_states.pt"))

root = Path(sys.argv[1])
store = CheckpointStore(str(root), root / "work", rank=0)
store.save(Engine(16), {"w": torch.ones(16)}, {"step": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    store.save(Engine(1 << 20), {"w": torch.ones(16)}, {"step": 2})  # a 4 MiB file
except CheckpointWriteError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"error": None}))
"""


def test_a_failed_write_names_path_step_and_reason_and_keeps_the_previous(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error is not None
    assert "step00000002" in error and "step 2" in error and str(root) in error
    assert "File too large" in error  # the OS's reason (EFBIG), not torch's "unexpected pos"
    assert not (root / "step00000002").exists()
    assert (root / "latest").read_text().strip() == "step00000001"
    assert json.loads((root / "step00000001" / "trainer_state.json").read_text())["step"] == 1
    assert (root / "step00000001" / "mp_rank_00_model_states.pt").stat().st_size > 0


def test_a_damaged_safetensors_file_is_named(tmp_path: Path) -> None:
    import pytest
    import torch

    from trainer.runtime.checkpoint import EMA_FILE, atomic_save_safetensors, load_ema, read_safetensors

    path = tmp_path / EMA_FILE
    atomic_save_safetensors({"unet.w": torch.ones(64), "unet.b": torch.zeros(8)}, path, {"k": "v"})
    tensors, meta = read_safetensors(path)
    assert meta == {"k": "v"} and torch.equal(tensors["unet.w"], torch.ones(64))
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    with pytest.raises(ValueError, match=rf"{path} is not a readable safetensors file"):
        load_ema(tmp_path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match=str(path)):
        load_ema(tmp_path)
