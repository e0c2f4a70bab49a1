"""One host sync per optimizer step (issue 15): a 2-rank gloo run with gradient accumulation 2 under the real
torchrun, with torch.distributed's collectives and the Tensor methods that read a value to the host wrapped,
counting the calls the project's code makes (DeepSpeed's own gradient reduction is not counted)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import train_helpers as th

PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist

    OURS = ("trainer.", "data_pipeline.", "eval.")
    STEP_CODE = ("trainer.loop", "trainer.tasks", "trainer.runtime")  # the loop, the task and the runtime
    counts = {"collectives": [], "host_reads": []}

    def wrap(owner, name, kind, prefixes):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(prefixes):
                counts[kind].append(f"{name} from {caller}")
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
                 "reduce_scatter", "all_to_all", "gather", "reduce"):
        wrap(dist, name, "collectives", OURS)
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        wrap(torch.Tensor, name, "host_reads", STEP_CODE)

    from trainer import loop

    original_step = loop.TrainLoop.train_step
    steps = []

    def train_step(self, stop):
        before = {k: len(v) for k, v in counts.items()}
        result = original_step(self, stop)
        steps.append({"step": self.step, "log_step": self.tracker.is_log_step(self.step),
                      **{k: v[before[k]:] for k, v in counts.items()}})
        return result

    loop.TrainLoop.train_step = train_step
    from trainer.train import main

    run_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("run_dir="))
    sys.argv = ["trainer.train", *sys.argv[1:]]
    try:
        main()
    finally:
        with open(os.path.join(run_dir, f"syncs_rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(steps, f)
""")


def test_one_collective_and_one_host_read_per_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    args = th.train_command(run_dir, ["train.max_steps=4", "train.global_batch_size=16", "train.micro_batch_size=4",
                                      "logging.interval_steps=3", "checkpoint.interval_steps=100", "eval=none",
                                      "logging.image_interval_steps=0", "deepspeed=zero2"], nproc=2)
    launcher = args[:args.index("-m", 3)]  # python -m torch.distributed.run ... (the second -m is trainer.train)
    train_args = args[args.index("-m", 3) + 2:]
    proc = subprocess.run([*launcher, str(script), *train_args], cwd=th.ROOT, env=th.train_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "accumulation 2" in (run_dir / "train.log").read_text()
    for rank in (0, 1):
        steps = json.loads((run_dir / f"syncs_rank{rank}.json").read_text())
        assert [s["step"] for s in steps] == [1, 2, 3, 4]
        quiet = [s for s in steps if not s["log_step"]]
        assert [s["step"] for s in quiet] == [1, 2]
        for s in quiet:  # a step that neither logs nor checkpoints
            assert s["collectives"] == ["all_reduce from trainer.runtime.distributed"], s
            assert s["host_reads"] == ["tolist from trainer.loop"], s
        logged = [s for s in steps if s["log_step"]]
        # The probe sees what a logging step adds (the gradient norm read to the host): it can tell them apart.
        assert all("__float__ from trainer.loop" in s["host_reads"] for s in logged), logged
