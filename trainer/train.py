"""``python -m trainer.train [experiment=demo|tiny|ldm_1p45b_256] [task=diffusion|autoencoder] [key=value ...]``

Trains a latent diffusion model (or its first stage) with DeepSpeed on one CPU or many GPUs, launched
by nothing (one process), torchrun, the DeepSpeed launcher or srun. A run directory that already
holds a checkpoint is continued (same step, data position, RNG states, EMA and W&B run).

This module is the command and the composition root: it builds the parts from the config and hands
them to the loop (``trainer/loop.py``); it is the one place, with the other commands, that reads
the whole run config.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data_pipeline.batches import build_batches, latent_cache_manifest
from data_pipeline.concat import concat_settings
from data_pipeline.latents import (cache_spec, check_concat_manifest, check_manifest, check_text_manifest, concat_spec,
                                   read_empty_prompt, text_spec)
from data_pipeline.sources import install_s3_defaults
from data_pipeline.stream import buckets_of, options_of
from trainer.config import TrainConfig, check_compatible, config_fingerprint
from trainer.cli import hydra_command
from trainer.images import atomic_write_bytes
from trainer.loop import Cadence, RunInfo, RunPaths, TrainLoop
from trainer.runtime import distributed
from trainer.runtime.checkpoint import CheckpointStore, find_resume_point, needs_universal
from trainer.runtime.device import device_peak_tflops, prepare_process, select_device
from trainer.runtime.ema import EMA
from trainer.runtime.engine import initialize
from trainer.runtime.lifecycle import RunDirLock, exit_with_launcher
from trainer.runtime.tracking import RedactingFilter, RunTracker, new_run_id, redact
from trainer.tasks import TASKS, AutoencoderTask, DiffusionTask, Task, TaskContext

log = logging.getLogger("trainer")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_task(cfg: TrainConfig, ctx: TaskContext, batches, digits) -> Task:
    """The job's task, handed the config groups it reads."""
    if cfg.task == "autoencoder":
        return AutoencoderTask(ctx, autoencoder=cfg.model.autoencoder, loss=cfg.loss)
    return DiffusionTask(ctx, model=cfg.model, diffusion=cfg.diffusion, eval_cfg=cfg.eval,
                         sample_posterior=cfg.train.sample_posterior, image_size=cfg.data.image_size,
                         example_captions=batches.example_captions, digits=digits,
                         reference_storage_options=functools.partial(options_of, cfg.data),
                         check_first_stage=_latent_cache_check(cfg), cached_text=_cached_text(cfg))


def _latent_cache_check(cfg: TrainConfig) -> Callable[[nn.Module], None]:
    """Refuses a latent cache made with another first stage, size, crop or buckets than this job's, or
    for another task (its concat inputs: ``check_concat_manifest``)."""
    def check(first_stage: nn.Module) -> None:
        if not cfg.data.latent_cache:
            return
        manifest = latent_cache_manifest(cfg.data)
        concat = concat_settings(cfg.model.conditioning)
        expected = None if concat is None else concat_spec(concat, cfg.model.conditioning.concat_channels,
                                                           seed=cfg.train.seed, dtype=cfg.precompute.dtype)
        check_concat_manifest(manifest, expected, f"data.latent_cache={cfg.data.latent_cache!r}",
                              strict=cfg.data.latent_cache_check)
        if expected is not None:
            log.info("training from the cached concat inputs (%s) of %s: the first stage does not run", concat.kind,
                     cfg.data.latent_cache)
        if not cfg.data.latent_cache_check:
            return
        spec = cache_spec(first_stage, cfg.model.autoencoder, image_size=cfg.data.image_size, crop=cfg.data.crop,
                          buckets=buckets_of(cfg.data), store=cfg.precompute.store, dtype=cfg.precompute.dtype)
        check_manifest(manifest, spec, f"data.latent_cache={cfg.data.latent_cache!r}")
        log.info("training from the latent cache %s (%d samples; autoencoder %s...)", cfg.data.latent_cache,
                 manifest["samples"], manifest["spec"]["autoencoder_sha256"][:12])
    return check


def _cached_text(cfg: TrainConfig) -> Callable[[nn.Module], Optional[torch.Tensor]]:
    """For a frozen text encoder and a latent cache that holds its outputs (``precompute.text=true``): the
    cache checked against the encoder (another encoder is refused, naming it) and the empty prompt's
    cached output returned; None when the encoder is to run at every step."""
    def load(text_encoder: nn.Module) -> Optional[torch.Tensor]:
        if not cfg.data.latent_cache:
            return None
        manifest = latent_cache_manifest(cfg.data)
        if not manifest.get("text"):
            return None
        where = f"data.latent_cache={cfg.data.latent_cache!r}"
        if cfg.data.latent_cache_check:
            check_text_manifest(manifest, text_spec(text_encoder, cfg.model.text_encoder, manifest["text"]["dtype"]),
                                where)
        log.info("training from the cached text embeddings of %s (text encoder %s...): the encoder does not run",
                 where, manifest["text"]["encoder_sha256"][:12])
        return read_empty_prompt(cfg.data.latent_cache, options_of(cfg.data, cfg.data.latent_cache))
    return load


def train(cfg: TrainConfig, config_dict: dict[str, Any], env: distributed.DistEnv, device: torch.device) -> int:
    """Compose the job's parts and run the loop; returns the exit code."""
    run_dir = Path(cfg.run_dir)
    paths = RunPaths(run_dir=run_dir, checkpoint_dir=cfg.checkpoint.dir or str(run_dir / "checkpoints"),
                     work_dir=Path(cfg.checkpoint.work_dir or run_dir / ".checkpoint_work"),
                     metrics_path=run_dir / "metrics.json")
    accum = cfg.train.gradient_accumulation(env.world_size)
    store = CheckpointStore(paths.checkpoint_dir, paths.work_dir, rank=env.rank, local_rank=env.local_rank)
    point = find_resume_point(store, cfg.checkpoint.resume, paths.work_dir, rank=env.rank, local_rank=env.local_rank)
    if point is not None:
        check_compatible(point.state, config_dict, allow_change=cfg.checkpoint.allow_config_change)
    load_universal = point is not None and needs_universal(point.state, env.world_size)
    batches, digits = build_batches(cfg.data, micro_batch_size=cfg.train.micro_batch_size, gradient_accumulation=accum,
                                    rank=env.rank, world_size=env.world_size, pin_memory=device.type == "cuda",
                                    caption_required=TASKS[cfg.task].uses_captions and cfg.model.uses_text,
                                    num_classes=cfg.model.conditioning.num_classes
                                    if cfg.task == "diffusion" and cfg.model.conditioning.cross_attn == "class" else 0)

    def make_engine(module: nn.Module):
        return initialize(module, {"model": module}, ds=cfg.deepspeed, optim=cfg.optim,
                          micro_batch_size=cfg.train.micro_batch_size, gradient_accumulation=accum,
                          world_size=env.world_size, max_steps=cfg.train.max_steps, device=device,
                          load_universal=load_universal, compile_blocks=cfg.train.compile)

    ctx = TaskContext(device=device, dtype=DTYPES[cfg.deepspeed.precision], rank=env.rank, world_size=env.world_size,
                      seed=cfg.train.seed, zero_stage=cfg.deepspeed.zero_stage, make_engine=make_engine,
                      load_universal=load_universal, saved_world_size=point.state["world_size"] if point else None,
                      channels_last=cfg.train.channels_last)
    task = build_task(cfg, ctx, batches, digits)
    ema_module = task.ema_module() if cfg.ema.enabled else None
    ema = (EMA(ema_module, cfg.ema.decay, warmup=cfg.ema.warmup, optimizer=task.main_engine.optimizer)
           if ema_module is not None else None)
    cadence = Cadence(
        max_steps=cfg.train.max_steps, global_batch_size=cfg.train.global_batch_size,
        checkpoint_interval_steps=cfg.checkpoint.interval_steps, keep_last=cfg.checkpoint.keep_last,
        evaluate_every=tuple(n for n in (cfg.eval.interval_steps, cfg.logging.image_interval_steps) if n),
        max_consecutive_nan_steps=cfg.train.max_consecutive_nan_steps,
        inject_nan_at_steps=frozenset(cfg.train.inject_nan_at_steps), ema_start_step=cfg.ema.start_step,
        ema_update_every=cfg.ema.update_every, requeue_signal="SIG" + cfg.slurm.signal,
        max_requeues=cfg.slurm.max_requeues, peak_tflops=device_peak_tflops(device, cfg.train.peak_tflops),
        compiled=cfg.train.compile)
    run = RunInfo(experiment=cfg.experiment, world_size=env.world_size, zero_stage=cfg.deepspeed.zero_stage,
                  precision=cfg.deepspeed.precision, config=redact(config_dict),
                  config_fingerprint=config_fingerprint(config_dict))
    loop = TrainLoop(task, batches=batches, store=store, ema=ema, cadence=cadence, run=run, paths=paths,
                     device=device, rank=env.rank)
    if point is not None:
        loop.restore(point, load_universal=load_universal, reset_data=cfg.data.reset_position)
    loop.run_id = distributed.broadcast_object(loop.run_id or new_run_id())
    if env.rank == 0:
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(run.config)).encode())
    tracker = RunTracker(cfg.logging, run_dir=run_dir, run_id=loop.run_id, config=config_dict, is_main=env.rank == 0,
                         resume_step=loop.step if point is not None else None, max_steps=cfg.train.max_steps)
    log.info("model %s: %s; ZeRO stage %d, %s, %d rank(s), global batch %d = micro %d x accumulation %d x world %d; "
             "device %s", cfg.model.name, task.summary, cfg.deepspeed.zero_stage, cfg.deepspeed.precision,
             env.world_size, cfg.train.global_batch_size, cfg.train.micro_batch_size, accum, env.world_size, device)
    return loop.train(tracker)


def _setup_logging(run_dir: Path, rank: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.addFilter(RedactingFilter())
    root.addHandler(console)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(fmt)
        file_handler.addFilter(RedactingFilter())
        root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "urllib3", "PIL", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(cfg: TrainConfig, config_dict: dict[str, Any]) -> int:
    """The process around the job: launcher environment, logging, device, process group."""
    env = distributed.detect_env()
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        # A one-process job still needs a (gloo) group for DeepSpeed; a free port lets several such
        # jobs share a machine.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            env = dataclasses.replace(env, master_port=sock.getsockname()[1])
    exit_with_launcher()
    install_s3_defaults(cfg.data.s3)  # checkpoints and caches on S3 reach the data's store too
    # Before anything is written there (train.log included): one job per run directory.
    lock = RunDirLock(cfg.run_dir).acquire() if env.rank == 0 else None
    _setup_logging(Path(cfg.run_dir), env.rank)
    device = select_device(cfg.train.device, "train.device", env.local_rank)
    cfg.deepspeed.check_device(device)
    prepare_process(device, cfg.train.num_threads)
    # Imported here: deepspeed reads DS_ACCELERATOR (set just above) when it is imported.
    import deepspeed

    if env.world_size > 1 or not torch.distributed.is_initialized():
        distributed.init_process_group(env, timeout_s=cfg.dist.timeout_s, force=True)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
    node = distributed.node_name()
    try:
        layout = distributed.rank_layout(env, node)
        log.info("%d rank(s) on %d node(s): %s; rendezvous %s:%d (%s); collective timeout %g s", env.world_size,
                 len({n for _, _, n in layout}), distributed.format_layout(layout), env.master_addr, env.master_port,
                 env.launcher, cfg.dist.timeout_s)
        return train(cfg, config_dict, env, device)
    except Exception as err:
        if env.world_size > 1:  # every rank says who it is: the first failure names the rank and node that saw it
            log.error("rank %d (local rank %d) on node %s failed: %s: %s", env.rank, env.local_rank, node,
                      type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        raise
    finally:
        distributed.destroy_process_group()
        if lock is not None:
            lock.release()


# An absolute path: the app also runs when trainer.train is imported (a launcher, a test), not only
# as ``python -m trainer.train``, where Hydra would otherwise look for a Python package ``conf``.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(dict_cfg: DictConfig) -> None:
    # Validation of every group runs here, before anything is built.
    cfg: TrainConfig = OmegaConf.to_object(dict_cfg)
    config_dict = OmegaConf.to_container(dict_cfg, resolve=True)
    code = run(cfg, config_dict)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    hydra_command(main)
