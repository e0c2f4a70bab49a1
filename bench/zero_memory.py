"""Per-rank model-state memory of DeepSpeed ZeRO stages 0-3, measured on the live engine, beside the
ZeRO paper's formula (Rajbhandari et al. 2020, Sec. 3 / Fig. 1; ``trainer/zero_memory.py``), and the
step time of each stage relative to stage 0 in the same run.

    python bench/zero_memory.py [--preset tiny|small] [--precisions bf16,fp32] [--stages 0,1,2,3]
                                [--steps 6] [--warmup 1] [--batch 2] [--nproc 2] [--out results.json]

Started without a launcher (no ``RANK`` in the environment) it re-runs itself under
``torch.distributed.run`` with ``--nproc`` CPU ranks (gloo, ``DS_ACCELERATOR=cpu``, one OpenMP thread
per rank). Only rank 0 prints; ``--out`` also writes every per-rank number as JSON.

What is counted. Every tensor reachable from the engine (its attributes, DeepSpeed's optimizer
wrapper, the client AdamW and its ``.state``, each tensor's ``.grad``) and from the module's
parameters (``.data``, ``.grad``, ``.grad_accum``, ZeRO-3's ``.ds_tensor``) is collected with the
attribute path it was reached by. Tensors are grouped by storage (``untyped_storage().data_ptr()``), so
a parameter that is a view into a flat buffer and the buffer itself count once, with the storage's
full size: the bytes the rank actually holds, padding included. Each storage gets the category of the
most specific path that reaches it (``_CATEGORY_RULES``, first match wins):

- buffers: ``ipg_buckets`` (the reduce bucket, ``reduce_bucket_size`` elements, sized by the config
  and not by the model; the paper's "constant size buffers", a residual state). Gradients sitting in a
  bucket count as gradients by the byte span of their views, the rest of the bucket as buffer.
- grads: ``.grad`` / ``.grad_accum``; ZeRO-1/2 ``averaged_gradients`` (views into
  ``grads_in_partition``, which holds every parameter that overlaps this rank's partition *whole*, so a
  parameter straddling the partition boundary is held in full); ZeRO-3
  ``__param_id_to_grad_partition`` / ``grad_partitions_flat_buffer``.
- master: the fp32 copies the optimizer steps on: whatever the client AdamW's ``param_groups`` hold
  that is not a module parameter's storage (stage 0 bf16: DeepSpeed's FP16_UnfusedOptimizer copies;
  ZeRO-1/2 ``single_partition_of_fp32_groups``; ZeRO-3 ``fp32_partitioned_groups_flat``). The paper counts the fp32 master in the optimizer state
  (K = 12 = 4 master + 4 momentum + 4 variance), so it is added to the optimizer column for the
  comparison and also shown on its own. DeepSpeed 0.19 keeps it in fp32 mode too (a clone of the
  fp32 partition), which the 4 + 4 + 8 fp32 formula has no room for.
- optimizer: AdamW's ``state`` (``exp_avg``, ``exp_avg_sq``, the ``step`` scalar).
- params: every storage behind a ``param.data`` / ``param.ds_tensor`` (whatever else reaches it), and
  DeepSpeed's flat low-precision groups
  (``bit16_groups_flat``, ``fp16_partitioned_groups_flat``, ``lp_param_buffer``).
- other: anything else; printed so that nothing held is hidden.

Two moments are measured on one step after the timed ones: ``backward_end``, inside
``engine.backward`` just before DeepSpeed reduces the gradients (``engine.allreduce_gradients``), where
ZeRO-0/1 still hold every parameter's full gradient; and ``before_step``, after ``backward`` returns and
before ``engine.step()``: what the rank holds between backward and step (the table's columns).
ZeRO-3 parameters are counted partitioned: at both moments the gathered full weights are released.

Step time: forward + backward + step of all stages interleaved (stage order reversed every round) so
drift in machine load hits all alike; per step the slowest rank's time; median of ``--steps``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.runtime.engine import DeepSpeedConfig, OptimConfig  # noqa: E402
from trainer.models.unet import UNetConfig, UNetModel  # noqa: E402
from trainer.zero_memory import STAGES, zero_model_state_bytes  # noqa: E402

# name: (UNetConfig kwargs, latent side, context length)
PRESETS: dict[str, tuple[dict, int, int]] = {
    "tiny": (dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1],
                  num_heads=4, context_dim=32, norm_num_groups=8), 16, 8),
    "small": (dict(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[2, 4],
                   num_heads=4, context_dim=64, norm_num_groups=16), 16, 8),
}
CATEGORIES = ("params", "grads", "master", "optimizer", "buffers", "other")
TOLERANCE = 0.05

# (category, pattern on the attribute path); the first rule that matches any path of a storage wins,
# except that the storage of a module parameter (``.data`` / ZeRO-3 ``.ds_tensor``) is always "params".
# What an optimizer's ``param_groups`` hold and is not a module parameter is the copy it steps on.
_CATEGORY_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("buffers", re.compile(r"ipg_buckets")),
    ("grads", re.compile(r"\.grad$|\.grad_accum$|grad_partition|averaged_gradients|grads_in_partition"
                         r"|all_grad_tensors|gradients")),
    ("master", re.compile(r"single_partition_of_fp32_groups|fp32_partitioned_groups_flat|fp32_groups"
                          r"|param_groups\[\d+\]\['params'\]")),
    ("optimizer", re.compile(r"\.state\[")),
    ("params", re.compile(r"bit16_groups|fp16_partitioned_groups|fp16_groups|lp_param_buffer"
                          r"|params_in_partition|params_not_in_partition|param_dict")),
)
_PARAMS_RULE = len(_CATEGORY_RULES) - 1


@dataclass
class BenchConfig:
    preset: str = "small"
    precisions: list[str] = field(default_factory=lambda: ["bf16", "fp32"])
    stages: list[int] = field(default_factory=lambda: list(STAGES))
    steps: int = 6
    warmup: int = 1
    batch: int = 2
    nproc: int = 2

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}; allowed: {', '.join(PRESETS)}")
        for precision in self.precisions:
            if precision not in ("bf16", "fp32"):
                raise ValueError(f"precisions contains {precision!r}; allowed: bf16, fp32 (fp16 needs a GPU)")
        for stage in self.stages:
            if stage not in STAGES:
                raise ValueError(f"stages contains {stage}; allowed: {STAGES}")
        if 0 not in self.stages:
            raise ValueError(f"stages={self.stages} must include 0, the baseline of the step-time overhead")
        for key, minimum in (("steps", 1), ("warmup", 1), ("batch", 1), ("nproc", 2)):
            if getattr(self, key) < minimum:
                raise ValueError(f"{key}={getattr(self, key)} must be an integer >= {minimum}"
                                 + (" (optimizer state exists only after a step)" if key == "warmup" else ""))


class EpsLoss(nn.Module):
    """MSE between the UNet's output and a target: the LDM training objective's shape (Rombach et al.
    2022, Eq. 2) without a noise schedule, which has no parameters and so no model state."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.unet(x, timesteps, context).float(), target)  # x, target: (B, C, H, W)


# ----------------------------------------------------------------------------- measuring


def _walk(obj: Any, path: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(attribute path, tensor) for every tensor reachable through containers and DeepSpeed/optimizer
    objects. Modules are not entered: their parameters are visited by ``_model_tensors``."""
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        yield path, obj
        grad = obj.grad if obj.is_leaf else None
        if grad is not None:
            yield path + ".grad", grad
        return
    if isinstance(obj, nn.Module) or isinstance(obj, type) or id(obj) in seen:
        return
    if isinstance(obj, dict):
        seen.add(id(obj))
        for key, value in obj.items():
            name = "T" if isinstance(key, torch.Tensor) else key
            yield from _walk(value, f"{path}[{name!r}]", seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        seen.add(id(obj))
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]", seen, depth + 1)
    elif (isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed")) \
            and hasattr(obj, "__dict__"):
        seen.add(id(obj))
        for key, value in vars(obj).items():
            yield from _walk(value, f"{path}.{key}", seen, depth + 1)


def _model_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for param in module.parameters():
        for attr in ("data", "ds_tensor", "grad", "grad_accum"):
            value = getattr(param, attr, None)
            if isinstance(value, torch.Tensor):
                yield f"param.{attr}", value


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _category(path: str) -> int:
    return next((i for i, (_, pattern) in enumerate(_CATEGORY_RULES) if pattern.search(path)),
                len(_CATEGORY_RULES))


def _union_bytes(spans: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def measure(engine, module: nn.Module) -> dict[str, int]:
    """Bytes per category held by this rank now (see the module docstring for the rules)."""
    engine_attrs = {k: v for k, v in vars(engine).items() if k not in ("_modules", "_parameters", "_buffers")}
    weights = {_storage_key(t) for path, t in _model_tensors(module) if path in ("param.data", "param.ds_tensor")}
    storages: dict[int, dict[str, Any]] = {}
    for path, tensor in [*_walk(engine_attrs, "engine", set()), *_model_tensors(module)]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            continue
        entry = storages.setdefault(storage.data_ptr(), {"nbytes": storage.nbytes(), "rule": len(_CATEGORY_RULES),
                                                         "grad_spans": []})
        rule = _PARAMS_RULE if storage.data_ptr() in weights else _category(path)
        entry["rule"] = min(entry["rule"], rule)
        if rule < len(_CATEGORY_RULES) and _CATEGORY_RULES[rule][0] == "grads":
            start = tensor.storage_offset() * tensor.element_size()
            entry["grad_spans"].append((start, start + tensor.numel() * tensor.element_size()))
    out = dict.fromkeys(CATEGORIES, 0)
    for entry in storages.values():
        name = _CATEGORY_RULES[entry["rule"]][0] if entry["rule"] < len(_CATEGORY_RULES) else "other"
        if name == "buffers":
            in_use = _union_bytes(entry["grad_spans"])
            out["grads"] += in_use
            out["buffers"] += entry["nbytes"] - in_use
        else:
            out[name] += entry["nbytes"]
    return out


# ----------------------------------------------------------------------------- engines


def _batch(preset: str, batch: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    kwargs, side, length = PRESETS[preset]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, side, side, generator=gen).to(dtype)  # (B, 4, H, W)
    timesteps = torch.randint(0, 1000, (batch,), generator=gen)  # (B,)
    context = torch.randn(batch, length, kwargs["context_dim"], generator=gen).to(dtype)  # (B, L, D)
    target = torch.randn(batch, 4, side, side, generator=gen)  # (B, 4, H, W)
    return x, timesteps, context, target


def _fresh_module(preset: str) -> EpsLoss:
    torch.manual_seed(0)
    return EpsLoss(UNetModel(UNetConfig(**PRESETS[preset][0])))


def build_engine(cfg: BenchConfig, stage: int, precision: str):
    """(engine, module, note). bf16 stage 0 falls back to DeepSpeed's default bf16 gradient dtype when
    ``trainer.runtime.engine.initialize`` is refused, and says so in ``note``."""
    import deepspeed

    from trainer.runtime.engine import build_optimizer, deepspeed_config, initialize, parameter_groups

    ds = DeepSpeedConfig(zero_stage=stage, precision=precision)
    optim = OptimConfig(lr=1e-4)
    device = torch.device("cpu")
    module = _fresh_module(cfg.preset)
    try:
        engine, _ = initialize(module, {"model": module}, ds=ds, optim=optim, micro_batch_size=cfg.batch,
                               gradient_accumulation=1, world_size=cfg.nproc, max_steps=10**6, device=device)
        return engine, module, ""
    except NotImplementedError as err:
        if (stage, precision) != (0, "bf16"):
            raise
        reason = str(err)
    # DeepSpeed 0.19 accepts bf16 weights with fp32 gradient accumulation only under ZeRO-1
    # (BF16_Optimizer). Without data_types, stage 0 wraps AdamW in its FP16_UnfusedOptimizer: bf16
    # weights and grads, fp32 master weights and moments (the paper's mixed precision).
    config = deepspeed_config(ds, micro_batch_size=cfg.batch, gradient_accumulation=1, world_size=cfg.nproc)
    config.pop("data_types", None)
    module = _fresh_module(cfg.preset)
    optimizer = build_optimizer(parameter_groups({"model": module}, optim.weight_decay), optim, device)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine, module, (f"trainer.runtime.engine.initialize refused bf16 stage 0 ({reason}); measured stage 0 "
                            f"without data_types instead: {type(engine.optimizer).__name__}, bf16 grads")


def _train_step(engine, batch: tuple[torch.Tensor, ...]) -> None:
    loss = engine(*batch)
    engine.backward(loss)
    engine.step()


def _snapshot_step(engine, module: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, dict[str, int]]:
    snapshots: dict[str, dict[str, int]] = {}
    reduce_gradients: Callable = engine.allreduce_gradients

    def measured_reduce(*args, **kwargs):
        snapshots["backward_end"] = measure(engine, module)
        return reduce_gradients(*args, **kwargs)

    # An instance attribute shadows the method for this one backward; ``del`` restores the class's.
    engine.allreduce_gradients = measured_reduce
    try:
        loss = engine(*batch)
        engine.backward(loss)
    finally:
        del engine.allreduce_gradients
    snapshots["before_step"] = measure(engine, module)
    engine.step()
    return snapshots


def run_precision(cfg: BenchConfig, precision: str, rank: int) -> list[dict[str, Any]]:
    import torch.distributed as dist

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    num_params = sum(p.numel() for p in _fresh_module(cfg.preset).parameters() if p.requires_grad)
    batch = _batch(cfg.preset, cfg.batch, dtype, seed=1000 + rank)
    engines = {stage: build_engine(cfg, stage, precision) for stage in cfg.stages}
    for _ in range(cfg.warmup):
        for stage in cfg.stages:
            _train_step(engines[stage][0], batch)
    times: dict[int, list[float]] = {stage: [] for stage in cfg.stages}
    for i in range(cfg.steps):
        for stage in (cfg.stages if i % 2 == 0 else cfg.stages[::-1]):
            start = time.perf_counter()
            _train_step(engines[stage][0], batch)
            times[stage].append(time.perf_counter() - start)
    snapshots = {stage: _snapshot_step(engines[stage][0], engines[stage][1], batch) for stage in cfg.stages}

    # One gather after all timing: per stage and rank the step times and both snapshots.
    local = {stage: {"times": times[stage], "snapshots": snapshots[stage]} for stage in cfg.stages}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    notes = {stage: engines[stage][2] for stage in cfg.stages}
    del engines
    gc.collect()

    rows = []
    for stage in cfg.stages:
        per_rank = [g[stage]["snapshots"] for g in gathered]
        step_s = [max(g[stage]["times"][i] for g in gathered) for i in range(cfg.steps)]
        formula = asdict(zero_model_state_bytes(num_params, cfg.nproc, stage, precision))
        formula.pop("stage")
        held = {c: max(r["before_step"][c] for r in per_rank) for c in CATEGORIES}
        measured = {"params": held["params"], "grads": held["grads"], "optimizer": held["optimizer"] + held["master"]}
        ratio = {k: measured[k] / formula[k] for k in measured}
        ratio["total"] = sum(measured.values()) / sum(formula.values())
        rows.append({
            "precision": precision, "stage": stage, "num_params": num_params, "world_size": cfg.nproc,
            "note": notes[stage], "formula": formula, "measured": measured,
            "master": held["master"], "buffers": held["buffers"], "other": held["other"],
            "grads_backward_end": max(r["backward_end"]["grads"] for r in per_rank),
            "ratio": ratio, "within_5pct": {k: abs(v - 1.0) <= TOLERANCE for k, v in ratio.items()},
            "step_ms": 1000.0 * statistics.median(step_s), "step_ms_all": [1000.0 * s for s in step_s],
            "per_rank": per_rank,
        })
    base = next(r["step_ms"] for r in rows if r["stage"] == 0)
    for row in rows:
        row["overhead_vs_stage0"] = row["step_ms"] / base
    return rows


# ----------------------------------------------------------------------------- report


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _cell(row: dict[str, Any], key: str) -> str:
    flag = "" if row["within_5pct"][key] else "!"
    return f"{_mib(row['measured'][key])}/{_mib(row['formula'][key])} {row['ratio'][key]:.3f}{flag}"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        part = [r for r in rows if r["precision"] == precision]
        lines.append(f"\nprecision={precision}  trainable params={part[0]['num_params']:,}  "
                     f"ranks={part[0]['world_size']}  MiB per rank (max over ranks), measured/formula ratio; "
                     f"! = outside {TOLERANCE:.0%}")
        header = (f"{'stage':>5} | {'params':>22} | {'grads':>22} | {'optimizer (incl. master)':>24} | "
                  f"{'master':>6} | {'total':>5} | {'grads@bwd':>9} | {'buffers':>7} | {'other':>6} | "
                  f"{'step ms':>7} | {'vs 0':>5}")
        lines += [header, "-" * len(header)]
        for r in part:
            lines.append(
                f"{r['stage']:>5} | {_cell(r, 'params'):>22} | {_cell(r, 'grads'):>22} | "
                f"{_cell(r, 'optimizer'):>24} | {_mib(r['master']):>6} | {r['ratio']['total']:>5.2f} | "
                f"{_mib(r['grads_backward_end']):>9} | {_mib(r['buffers']):>7} | {_mib(r['other']):>6} | "
                f"{r['step_ms']:>7.1f} | {r['overhead_vs_stage0']:>5.2f}")
        lines += [f"  stage {r['stage']}: {r['note']}" for r in part if r["note"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points


def worker(cfg: BenchConfig, out: str | None) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from trainer.runtime.distributed import destroy_process_group, detect_env, init_process_group

    ds_logger.setLevel(logging.WARNING)
    env = detect_env()
    if env.world_size != cfg.nproc:
        raise ValueError(f"nproc={cfg.nproc} but the launcher started WORLD_SIZE={env.world_size} ranks")
    init_process_group(env, backend="gloo", force=True)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    start = time.perf_counter()
    rows = [row for precision in cfg.precisions for row in run_precision(cfg, precision, env.rank)]
    if env.rank == 0:
        print(format_table(rows))
        print(f"\nmeasured in {time.perf_counter() - start:.0f} s")
        if out:
            Path(out).write_text(json.dumps({"config": asdict(cfg), "rows": rows,
                                             "runtime_s": time.perf_counter() - start}, indent=1))
    destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(cfg: BenchConfig, argv: list[str]) -> int:
    """Re-run this script under torchrun with ``cfg.nproc`` CPU ranks; its exit status."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo",
               PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()), *argv]
    return subprocess.call(cmd, env=env)


def parse_args(argv: list[str]) -> tuple[BenchConfig, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help=f"one of {', '.join(PRESETS)}")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        raise ValueError(f"stages={args.stages!r} must be comma-separated integers from {STAGES}") from None
    cfg = BenchConfig(preset=args.preset, precisions=args.precisions.split(","), stages=stages,
                      steps=args.steps, warmup=args.warmup, batch=args.batch, nproc=args.nproc)
    return cfg, args.out


def main(argv: list[str]) -> int:
    cfg, out = parse_args(argv)
    if "RANK" not in os.environ:
        return relaunch(cfg, argv)
    worker(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
