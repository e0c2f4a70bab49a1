"""``python -m trainer.train [experiment=demo|tiny|ldm_1p45b_256] [key=value ...]``

Trains a text-to-image latent diffusion model with DeepSpeed on one CPU or many GPUs, launched by
nothing (one process), torchrun, the DeepSpeed launcher or srun. A run directory that already holds
a checkpoint is continued (same step, data position, RNG states, EMA and W&B run).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainer import distributed
from trainer.config import TrainConfig, config_differences, config_fingerprint
from trainer.tracking import RunTracker, new_run_id, redact

log = logging.getLogger("trainer")

EXIT_NAN = 3


class DiffusionTrainModule(nn.Module):
    """What DeepSpeed wraps: the UNet and, when it is trained jointly (the paper's 1.45B model),
    the text transformer. ``cond`` is token ids then, else precomputed hidden states."""

    def __init__(self, unet: nn.Module, text_encoder: Optional[nn.Module]) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        context = self.text_encoder(cond) if self.text_encoder is not None else cond  # (B, L, D)
        return self.unet(x_t, t, context.to(x_t.dtype))  # (B, C, h, w)


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the sample at global ``position``: its timestep, noise, posterior sample and
    caption dropout depend on nothing else, so any world size or accumulation draws the same."""
    return torch.Generator().manual_seed((seed * 2**40 + position) % 2**63)


@dataclass
class RunPaths:
    run_dir: Path
    checkpoint_dir: str
    work_dir: Path
    samples_dir: Path
    metrics_path: Path


def _setup_logging(run_dir: Path, rank: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "urllib3", "PIL", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _prepare_process_env(cfg: TrainConfig) -> torch.device:
    """Environment DeepSpeed reads at import: which accelerator, where compiled ops are cached."""
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but CUDA is not available; allowed here: 'cpu' or 'auto'")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def ensure_digits(cfg: TrainConfig, env: distributed.DistEnv):
    """The digits demo dataset, built by rank 0 on first use (the others wait); its manifest."""
    from data_pipeline.demo_digits import build_digits_shards, read_digits_manifest

    root = Path(cfg.data.root)
    if env.rank == 0:
        try:
            info = read_digits_manifest(root)
            if info.image_size != cfg.data.image_size or info.seed != cfg.data.seed:
                raise FileNotFoundError
        except (FileNotFoundError, ValueError):
            log.info("building the digits dataset in %s", root)
            build_digits_shards(root, image_size=cfg.data.image_size, seed=cfg.data.seed)
    distributed.barrier()
    return read_digits_manifest(root)


def build_batches(cfg: TrainConfig, env: distributed.DistEnv, accum: int, device: torch.device):
    """The trainer's batch source: the in-memory digits (or their latent cache, also held in memory,
    in the same order), or streamed webdataset shards / latent caches. Returns (batches, digits_info)."""
    if cfg.data.kind == "digits":
        from data_pipeline.indexed import InMemoryBatches, load_latent_cache, load_shards

        digits_info = ensure_digits(cfg, env)
        if cfg.data.latent_cache:
            from data_pipeline.latents import cache_shard_urls
            from data_pipeline.stream import options_of

            urls = cache_shard_urls(cfg.data.latent_cache, options_of(cfg.data, cfg.data.latent_cache))[1]
            samples = load_latent_cache(urls, caption_key=cfg.data.caption_key,
                                        storage_options=options_of(cfg.data, urls[0]))
            log.info("training data: %d cached latents %s from %s", len(samples.captions),
                     tuple(samples.latents.shape[1:]), cfg.data.latent_cache)
        else:
            samples = load_shards([digits_info.train_url], image_size=cfg.data.image_size,
                                  image_keys=list(cfg.data.image_keys), caption_key=cfg.data.caption_key)
            log.info("training data: %d samples from %s", len(samples.captions), digits_info.train_url)
        return InMemoryBatches(samples, cfg.data.seed, rank=env.rank, world_size=env.world_size,
                               micro_batch_size=cfg.train.micro_batch_size, gradient_accumulation=accum), digits_info
    from data_pipeline.stream import StreamingBatches, spec_from_config

    digits_info = None
    spec = spec_from_config(cfg.data, cfg.train.micro_batch_size)
    log.info("streaming %s", ", ".join(f"{s.name}: {s.num_shards} shards" for s in spec.sources))
    return StreamingBatches(spec, rank=env.rank, world_size=env.world_size, gradient_accumulation=accum,
                            num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                            pin_memory=device.type == "cuda"), digits_info


class Trainer:
    def __init__(self, cfg: TrainConfig, config_dict: dict[str, Any], env: distributed.DistEnv) -> None:
        self.cfg, self.config_dict, self.env = cfg, config_dict, env
        self.device = _prepare_process_env(cfg)
        run_dir = Path(cfg.run_dir)
        self.paths = RunPaths(
            run_dir=run_dir, checkpoint_dir=cfg.checkpoint.dir or str(run_dir / "checkpoints"),
            work_dir=Path(cfg.checkpoint.work_dir or run_dir / ".checkpoint_work"),
            samples_dir=run_dir / "samples", metrics_path=run_dir / "metrics.json")
        self.accum = cfg.train.gradient_accumulation(env.world_size)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from trainer import checkpoint as ckpt
        from trainer import engine as engine_lib
        from trainer.diffusion import build_diffusion
        from trainer.ema import EMA
        from trainer.inference import build_model

        cfg, env = self.cfg, self.env
        self.store = ckpt.CheckpointStore(self.paths.checkpoint_dir, self.paths.work_dir, rank=env.rank,
                                          local_rank=env.local_rank)
        self.resume_point = self._find_resume()
        self.batches, self.digits_info = build_batches(cfg, env, self.accum, self.device)

        parts = build_model(cfg)  # seeded: identical initial weights on every rank; then model.init_from
        self.parts = parts
        if cfg.deepspeed.activation_checkpointing != "none":
            kinds = True if cfg.deepspeed.activation_checkpointing == "all" else [cfg.deepspeed.activation_checkpointing]
            parts.unet.set_activation_checkpointing(kinds)
        self.diffusion = build_diffusion(cfg.diffusion)
        self.text_trainable = parts.text_encoder_trainable
        module = DiffusionTrainModule(parts.unet, parts.text_encoder if self.text_trainable else None)
        self.frozen_text = None if self.text_trainable else parts.text_encoder.to(self.device).eval()
        self.first_stage = parts.first_stage.to(self.device).eval()
        if cfg.data.latent_cache and cfg.data.latent_cache_check:
            self._check_latent_cache()
        load_universal = False
        if self.resume_point is not None and ckpt.needs_universal(self.resume_point.state, env.world_size):
            load_universal = True
        self.engine, self.optimizer = engine_lib.initialize(
            module, {"model": module}, ds=cfg.deepspeed, optim=cfg.optim,
            micro_batch_size=cfg.train.micro_batch_size, gradient_accumulation=self.accum,
            world_size=env.world_size, max_steps=cfg.train.max_steps, device=self.device,
            load_universal=load_universal)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.deepspeed.precision]
        self.ema = EMA(self.engine.module, cfg.ema.decay, warmup=cfg.ema.warmup) if cfg.ema.enabled else None

        self.step = 0
        self.samples_seen = 0
        self.nan_steps = 0
        self.run_id: Optional[str] = None
        if self.resume_point is not None:
            self._load(self.resume_point, load_universal)
        self.run_id = distributed.broadcast_object(self.run_id or new_run_id())
        if env.rank == 0:
            self._save_config()
        self.tracker = RunTracker(cfg.logging, run_dir=self.paths.run_dir, run_id=self.run_id,
                                  config=self.config_dict, is_main=env.rank == 0,
                                  resume_step=self.step if self.resume_point is not None else None,
                                  max_steps=cfg.train.max_steps)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad) if cfg.deepspeed.zero_stage < 3 \
            else sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
        log.info("model %s: %s trainable parameters (unet%s); ZeRO stage %d, %s, %d rank(s), "
                 "global batch %d = micro %d x accumulation %d x world %d; device %s",
                 cfg.model.name, f"{trainable:,}", " + text encoder" if self.text_trainable else "",
                 cfg.deepspeed.zero_stage, cfg.deepspeed.precision, env.world_size, cfg.train.global_batch_size,
                 cfg.train.micro_batch_size, self.accum, env.world_size, self.device)

    def _check_latent_cache(self) -> None:
        from data_pipeline.latents import cache_shard_urls, check_manifest
        from data_pipeline.precompute import cache_spec
        from data_pipeline.stream import options_of

        cfg = self.cfg
        manifest, _ = cache_shard_urls(cfg.data.latent_cache, options_of(cfg.data, cfg.data.latent_cache))
        check_manifest(manifest, cache_spec(cfg, self.first_stage), f"data.latent_cache={cfg.data.latent_cache!r}")
        log.info("training from the latent cache %s (%d samples; autoencoder %s...)", cfg.data.latent_cache,
                 manifest["samples"], manifest["spec"]["autoencoder_sha256"][:12])

    def _find_resume(self):
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            if self.store.latest_tag() is not None:
                raise ValueError(f"checkpoint.resume='never' but {self.paths.checkpoint_dir} holds checkpoint "
                                 f"{self.store.latest_tag()}; choose another run_dir or checkpoint.resume=auto")
            return None
        if resume == "auto":
            tag = self.store.latest_tag()
        else:
            # An explicit checkpoint: <root>/<tag>.
            from trainer.checkpoint import CheckpointStore

            root, _, tag = resume.rstrip("/").rpartition("/")
            point = CheckpointStore(root, self.paths.work_dir, rank=self.env.rank,
                                    local_rank=self.env.local_rank).resolve(tag)
            self._check_compatible(point.state)
            return point
        if tag is None:
            return None
        point = self.store.resolve(tag)
        self._check_compatible(point.state)
        return point

    def _check_compatible(self, state: dict[str, Any]) -> None:
        if state.get("config_fingerprint") == config_fingerprint(self.config_dict) or self.cfg.checkpoint.allow_config_change:
            return
        diffs = []
        for group in ("model", "diffusion"):
            diffs += config_differences(state["config"].get(group), self.config_dict.get(group), group)
        raise ValueError("the checkpoint to resume was trained with another model/diffusion config:\n  "
                         + "\n  ".join(diffs[:20]) + "\nset checkpoint.allow_config_change=true to load it anyway")

    def _load(self, point, load_universal: bool) -> None:
        from trainer import checkpoint as ckpt

        load_dir, tag = point.local_dir, point.tag
        if load_universal:
            load_dir, tag = ckpt.convert_to_universal(point, self.paths.work_dir, rank=self.env.rank,
                                                      world_size=self.env.world_size)
            log.info("resuming %s saved on %s ranks on %d ranks through its universal conversion",
                     point.tag, point.state["world_size"], self.env.world_size)
        path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {load_dir}")
        state = point.state
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.nan_steps = int(state.get("nan_steps", 0))
        self.run_id = state.get("wandb_run_id")
        self.batches.load_state_dict(state["data"], reset=self.cfg.data.reset_position)
        ckpt.load_rng(point.local_dir / point.tag, self.env.rank)
        if self.ema is not None:
            ema_state = ckpt.load_ema(point.local_dir / point.tag)
            if ema_state is None:
                log.warning("checkpoint %s has no EMA weights; EMA restarts from the current weights", point.tag)
            else:
                self.ema.load_state_dict(ema_state, int(state.get("ema_updates", 0)))
        log.info("resumed from checkpoint %s: step %d, %d samples seen, W&B run %s",
                 point.tag, self.step, self.samples_seen, self.run_id)

    def _save_config(self) -> None:
        from trainer.checkpoint import atomic_write_bytes

        text = OmegaConf.to_yaml(OmegaConf.create(redact(self.config_dict)))
        atomic_write_bytes(self.paths.run_dir / "config.yaml", text.encode())

    # ------------------------------------------------------------------ one step

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        tokens = self.parts.tokenizer(captions).to(self.device)  # (B, L)
        if self.text_trainable:
            return tokens
        with torch.no_grad():
            return self.frozen_text(tokens)  # (B, L, D)

    def _posterior(self, batch: dict):
        """q(z|x) of the batch: from the latent cache, or by encoding the images."""
        from trainer.models.autoencoder import DiagonalGaussianDistribution

        if "latent_mean" not in batch:
            return self.first_stage.encode(batch["images"].to(self.device))  # images (B, 3, H, W) in [-1, 1]
        mean = batch["latent_mean"].to(self.device)
        logvar = batch.get("latent_logvar")
        if logvar is None:  # a cache of means only: the posterior's mode
            return DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], 1), deterministic=True)
        return DiagonalGaussianDistribution(torch.cat([mean, logvar.to(self.device)], 1))

    def _micro_batch_loss(self, batch: dict) -> torch.Tensor:
        cfg = self.cfg
        gens = [sample_generator(cfg.train.seed, p) for p in batch["positions"]]
        drop = [bool(torch.rand((), generator=g) < cfg.diffusion.cond_drop_prob) for g in gens]
        captions = ["" if d else c for c, d in zip(batch["captions"], drop)]
        with torch.no_grad():
            posterior = self._posterior(batch)
            z = posterior.mean
            if not posterior.deterministic and cfg.train.sample_posterior:
                eps = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]).to(z)
                z = z + posterior.std * eps
            x0 = self.first_stage.to_latent(z).float()  # (B, C, h, w)
        t = torch.cat([self.diffusion.sample_timesteps(1, torch.device("cpu"), g) for g in gens]).to(self.device)
        noise = torch.cat([self.diffusion.sample_noise(x0[i:i + 1].cpu(), g) for i, g in enumerate(gens)]).to(self.device)
        cond = self._encode_text(captions)
        if not self.text_trainable:
            cond = cond.to(self.dtype)

        def model_fn(x_t: torch.Tensor, tt: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self.engine(x_t.to(self.dtype), tt, c)

        losses = self.diffusion.training_losses(model_fn, x0, cond, t=t, noise=noise)
        return losses["loss"].mean()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``accum`` micro-batches; a non-finite loss anywhere skips it."""
        skip_step = False
        loss_sum = 0.0
        inject = self.step in set(self.cfg.train.inject_nan_at_steps)
        for batch in self.batches.step_batches(self.samples_seen):
            loss = self._micro_batch_loss(batch)
            if inject:
                loss = loss * float("nan")
            nonfinite = distributed.any_rank(not bool(torch.isfinite(loss).item()), self.device)
            skip_step = skip_step or nonfinite
            self.optimizer.skip_next_step = skip_step
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += float(loss.detach())
        self.optimizer.skip_next_step = False
        loss_mean = float(distributed.all_reduce_mean(torch.tensor([loss_sum / self.accum], device=self.device)).item())
        return {"loss": loss_mean, "skipped": skip_step}

    # ------------------------------------------------------------------ checkpoint / samples

    def trainer_state(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"step": self.step, "samples_seen": self.samples_seen, "nan_steps": self.nan_steps,
                "data": self.batches.state_dict(self.samples_seen), "wandb_run_id": self.run_id,
                "world_size": self.env.world_size, "zero_stage": cfg.deepspeed.zero_stage,
                "precision": cfg.deepspeed.precision, "global_batch_size": cfg.train.global_batch_size,
                "ema_updates": self.ema.num_updates if self.ema is not None else 0,
                "config_fingerprint": config_fingerprint(self.config_dict), "config": redact(self.config_dict),
                "time": time.time()}

    def save_checkpoint(self) -> str:
        t0 = time.time()
        ema_state = self.ema.state_dict() if self.ema is not None else None
        tag = self.store.save(self.engine, ema_state, self.trainer_state())
        removed = self.store.prune(self.cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s in %.1fs%s", tag, time.time() - t0,
                 f" (removed {', '.join(removed)})" if removed else "")
        return tag

    def _sampling_modules(self) -> tuple[nn.Module, nn.Module]:
        """Whole, unpartitioned copies of the UNet and text encoder holding the EMA (default) or the
        live weights, on this rank (collective under ZeRO-3)."""
        from trainer.ema import copy_into
        from trainer.models.text_encoders import build_text_encoder
        from trainer.models.unet import UNetModel

        cfg = self.cfg
        if self.ema is not None and cfg.eval.use_ema:
            state = self.ema.state_dict()
        elif cfg.deepspeed.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = {k: v.detach().float().cpu() for k, v in self.engine.module.state_dict().items()}
        unet = UNetModel(cfg.model.unet)
        copy_into(unet, {k: v.float() for k, v in state.items() if k.startswith("unet.")}, prefix="unet")
        if self.text_trainable:
            text, _ = build_text_encoder(cfg.model.text_encoder, build_tokenizer=False)
            copy_into(text, {k: v.float() for k, v in state.items() if k.startswith("text_encoder.")},
                      prefix="text_encoder")
        else:
            text = self.frozen_text
        return unet.to(self.device).eval(), text.to(self.device).eval()

    def prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.eval.kind == "digits":
            from data_pipeline.demo_digits import DIGIT_NAMES, caption_for, PALETTE

            colors = list(PALETTE)
            return [caption_for(d, colors[(d + k) % len(colors)])
                    for d in range(len(DIGIT_NAMES)) for k in range(cfg.eval.samples_per_prompt)]
        base = list(cfg.eval.prompts) or self.batches.example_captions(8)
        return [p for p in base for _ in range(cfg.eval.samples_per_prompt)]

    def evaluate(self) -> dict[str, Any]:
        """Sample the eval prompts (rank 0), log a grid, and score digits when asked."""
        from trainer.sampling.pipeline import text_to_image

        cfg = self.cfg
        unet, text = self._sampling_modules()
        if self.env.rank != 0:
            distributed.barrier()
            return {}
        t0 = time.time()
        prompts = self.prompts()
        f = getattr(self.first_stage, "downsample_factor", 1)
        shape = (cfg.model.unet.in_channels, cfg.data.image_size // f, cfg.data.image_size // f)
        tokenizer = self.parts.tokenizer

        def encode(p: list[str]) -> torch.Tensor:
            return text(tokenizer(p).to(self.device))

        images = text_to_image(unet, encode, self.first_stage, prompts, [cfg.eval.seed + i for i in range(len(prompts))],
                               schedule=self.diffusion.schedule, latent_shape=shape, sampler=cfg.eval.sampler,
                               num_steps=cfg.eval.num_steps, guidance_scale=cfg.eval.guidance_scale,
                               batch_size=cfg.eval.batch_size, device=self.device)
        result: dict[str, Any] = {"eval/step": self.step, "eval/sampler": cfg.eval.sampler,
                                  "eval/num_steps": cfg.eval.num_steps, "eval/guidance_scale": cfg.eval.guidance_scale,
                                  "eval/weights": "ema" if (self.ema is not None and cfg.eval.use_ema) else "live",
                                  "eval/num_samples": len(prompts), "eval/seconds": None}
        if cfg.eval.kind == "digits":
            from data_pipeline.demo_digits import DigitClassifier

            classifier = DigitClassifier.load(self.digits_info.classifier_path)
            predicted = classifier.predict(images, value_range=(-1.0, 1.0))
            wanted = [d for d in range(10) for _ in range(cfg.eval.samples_per_prompt)]
            correct = [int(p == w) for p, w in zip(predicted.tolist(), wanted)]
            result["eval/digit_accuracy"] = sum(correct) / len(correct)
            for d in range(10):
                sel = correct[d * cfg.eval.samples_per_prompt:(d + 1) * cfg.eval.samples_per_prompt]
                result[f"eval/digit_accuracy/{d}"] = sum(sel) / len(sel)
        result["eval/seconds"] = time.time() - t0
        grid = self.tracker.log_images(self.step, "samples", images, prompts)
        result["eval/grid"] = str(grid)
        self.tracker.log_scalars(self.step, {k: v for k, v in result.items() if isinstance(v, (int, float))})
        distributed.barrier()
        return result

    # ------------------------------------------------------------------ loop

    def train(self) -> int:
        """Runs to ``train.max_steps`` or a stop signal; returns the process exit code."""
        from trainer.lifecycle import StopRequest, requeue_slurm_job

        cfg = self.cfg
        stop = StopRequest(("SIGTERM", "SIG" + cfg.slurm.signal))
        consecutive_nan = 0
        last_eval: dict[str, Any] = {}
        start_step = self.step
        t_start = time.time()
        exit_code = 0
        while self.step < cfg.train.max_steps:
            t0 = time.time()
            out = self.train_step()
            step_time = time.time() - t0
            self.step += 1
            self.samples_seen += cfg.train.global_batch_size
            if out["skipped"]:
                self.nan_steps += 1
                consecutive_nan += 1
                log.warning("step %d: non-finite loss on some rank; optimizer step and EMA update skipped "
                            "(%d skipped so far, %d in a row)", self.step, self.nan_steps, consecutive_nan)
            else:
                consecutive_nan = 0
                if self.ema is not None and self.step > cfg.ema.start_step and self.step % cfg.ema.update_every == 0:
                    self.ema.update()
            if self.tracker.is_log_step(self.step):
                scalars = {"loss": out["loss"], "lr": self.engine.get_lr()[0], "step_time_s": step_time,
                           "samples_per_s": cfg.train.global_batch_size / step_time,
                           "samples_seen": self.samples_seen, "nan_steps": self.nan_steps,
                           "mem_gb": _memory_gb(self.device)}
                skipped = self.batches.skip_counts(self.device)
                scalars.update({f"data/skipped_{r}": n for r, n in skipped.items() if n})
                norm = self.engine.get_global_grad_norm()
                if norm is not None and not out["skipped"]:
                    scalars["grad_norm"] = float(norm)
                self.tracker.log_scalars(self.step, scalars)
            if consecutive_nan >= cfg.train.max_consecutive_nan_steps:
                log.error("stopping: %d consecutive steps had a non-finite loss (train.max_consecutive_nan_steps=%d); "
                          "the last checkpoint is the one to resume from after lowering optim.lr or checking the data",
                          consecutive_nan, cfg.train.max_consecutive_nan_steps)
                exit_code = EXIT_NAN
                break
            stopping = distributed.any_rank(stop.requested, self.device)
            if self.step % cfg.checkpoint.interval_steps == 0 or stopping:
                self.save_checkpoint()
            if stopping:
                log.warning("stopped by %s after step %d with a checkpoint; run the same command to resume",
                            stop.received or "a signal on another rank", self.step)
                # The time-limit signal (not scancel's SIGTERM): the job goes back in the queue.
                requeue = distributed.any_rank(stop.received == "SIG" + cfg.slurm.signal, self.device)
                if requeue and self.env.rank == 0:
                    requeue_slurm_job(cfg.slurm.max_requeues)
                break
            scheduled = [n for n in (cfg.eval.interval_steps, cfg.logging.image_interval_steps) if n]
            if any(self.step % n == 0 for n in scheduled) and self.step < cfg.train.max_steps:
                last_eval = self.evaluate()
        stop.restore()
        finished = self.step >= cfg.train.max_steps and exit_code == 0
        if finished:
            if self.store.latest_tag() != f"step{self.step:08d}":
                self.save_checkpoint()
            if cfg.eval.kind != "none" or cfg.eval.prompts:
                last_eval = self.evaluate() or last_eval
        elapsed = time.time() - t_start
        skipped = {r: n for r, n in self.batches.skip_counts(self.device).items() if n}
        if skipped:
            log.warning("data samples skipped so far, by reason: %s", skipped)
        if self.env.rank == 0:
            self._write_metrics(start_step, elapsed, finished, {**last_eval, "data_skipped": skipped})
        self.batches.close()
        self.tracker.finish(exit_code)
        return exit_code

    def _write_metrics(self, start_step: int, elapsed: float, finished: bool, last_eval: dict[str, Any]) -> None:
        import json

        from trainer.checkpoint import atomic_write_bytes

        steps = self.step - start_step
        metrics = {"experiment": self.cfg.experiment, "finished": finished, "step": self.step,
                   "samples_seen": self.samples_seen, "nan_steps": self.nan_steps,
                   "steps_this_session": steps, "seconds_this_session": elapsed,
                   "samples_per_second": steps * self.cfg.train.global_batch_size / elapsed if elapsed > 0 else None,
                   "wandb_run_id": self.run_id, "wandb_mode": self.tracker.wandb_mode,
                   "world_size": self.env.world_size, "zero_stage": self.cfg.deepspeed.zero_stage,
                   **{k.replace("eval/", "eval_"): v for k, v in last_eval.items()}}
        atomic_write_bytes(self.paths.metrics_path, (json.dumps(metrics, indent=2) + "\n").encode())
        self.tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        lines = [f"run directory:   {self.paths.run_dir}",
                 f"checkpoints:     {self.paths.checkpoint_dir} (latest: {self.store.latest_tag()})",
                 f"metrics:         {self.paths.metrics_path}"]
        if "eval/grid" in last_eval:
            lines.append(f"samples grid:    {last_eval['eval/grid']}")
        if "eval/digit_accuracy" in last_eval:
            lines.append(f"digit accuracy:  {last_eval['eval/digit_accuracy']:.1%} of samples recognised as "
                         f"the prompted digit (chance 10%)")
        if self.tracker.wandb_run_dir is not None:
            lines.append(f"W&B ({self.tracker.wandb_mode}): {self.tracker.wandb_run_dir}"
                         + (f"  (upload: wandb sync {self.tracker.wandb_run_dir})"
                            if self.tracker.wandb_mode == "offline" else ""))
        print("\n".join(lines), flush=True)


def run(cfg: TrainConfig, config_dict: dict[str, Any]) -> int:
    env = distributed.detect_env()
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        # A one-process job still needs a (gloo) group for DeepSpeed; a free port lets several such
        # jobs share a machine.
        import dataclasses
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            env = dataclasses.replace(env, master_port=sock.getsockname()[1])
    _setup_logging(Path(cfg.run_dir), env.rank)
    trainer = Trainer(cfg, config_dict, env)
    import deepspeed

    if env.world_size > 1 or not torch.distributed.is_initialized():
        distributed.init_process_group(env, force=True)
    deepspeed.init_distributed(dist_backend="nccl" if trainer.device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        distributed.destroy_process_group()


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
    main()
