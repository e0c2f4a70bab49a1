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


def trainable_parameters(module: nn.Module, zero_stage: int) -> int:
    """Trainable parameter count (under ZeRO-3 a rank holds only a partition: ``ds_numel`` is the whole)."""
    return sum(getattr(p, "ds_numel", p.numel()) if zero_stage == 3 else p.numel()
               for p in module.parameters() if p.requires_grad)


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

        cfg, env = self.cfg, self.env
        self.store = ckpt.CheckpointStore(self.paths.checkpoint_dir, self.paths.work_dir, rank=env.rank,
                                          local_rank=env.local_rank)
        self.resume_point = self._find_resume()
        self.batches, self.digits_info = build_batches(cfg, env, self.accum, self.device)
        load_universal = False
        if self.resume_point is not None and ckpt.needs_universal(self.resume_point.state, env.world_size):
            load_universal = True
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.deepspeed.precision]
        description = self.build(load_universal)

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
        log.info("model %s: %s; ZeRO stage %d, %s, %d rank(s), global batch %d = micro %d x accumulation %d x "
                 "world %d; device %s", cfg.model.name, description, cfg.deepspeed.zero_stage, cfg.deepspeed.precision,
                 env.world_size, cfg.train.global_batch_size, cfg.train.micro_batch_size, self.accum, env.world_size,
                 self.device)

    def _initialize_engine(self, module: nn.Module, load_universal: bool):
        from trainer import engine as engine_lib

        cfg = self.cfg
        return engine_lib.initialize(
            module, {"model": module}, ds=cfg.deepspeed, optim=cfg.optim,
            micro_batch_size=cfg.train.micro_batch_size, gradient_accumulation=self.accum,
            world_size=self.env.world_size, max_steps=cfg.train.max_steps, device=self.device,
            load_universal=load_universal)

    def build(self, load_universal: bool) -> str:
        """The networks, the DeepSpeed engine, EMA and the eval protocol; returns a one-line summary."""
        from trainer.diffusion import build_diffusion
        from trainer.ema import EMA
        from trainer.inference import build_model

        cfg = self.cfg
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
        self.engine, self.optimizer = self._initialize_engine(module, load_universal)
        self.ema = EMA(self.engine.module, cfg.ema.decay, warmup=cfg.ema.warmup) if cfg.ema.enabled else None
        self._setup_eval()
        return (f"{trainable_parameters(module, cfg.deepspeed.zero_stage):,} trainable parameters "
                f"(unet{' + text encoder' if self.text_trainable else ''})")

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
        extras = self.checkpoint_extras()  # first: it may add to the trainer state (the latent scale)
        tag = self.store.save(self.engine, ema_state, self.trainer_state(), **extras)
        removed = self.store.prune(self.cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s in %.1fs%s", tag, time.time() - t0,
                 f" (removed {', '.join(removed)})" if removed else "")
        return tag

    def final_evaluation(self) -> bool:
        """Whether the finished job evaluates once more at its last step."""
        return self.cfg.eval.kind != "none" or bool(self.cfg.eval.prompts)

    def step_scalars(self, out: dict[str, Any]) -> dict[str, float]:
        """The loss terms logged on a logging step."""
        return {"loss": out["loss"]}

    def final_report(self) -> list[str]:
        """Lines the job prints at its end, after where its outputs are."""
        return []

    def checkpoint_extras(self) -> dict[str, Any]:
        """More engines / files a checkpoint holds (the autoencoder's discriminator, ...)."""
        return {}

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

    # ------------------------------------------------------------------ evaluation

    @property
    def eval_resolution(self) -> int:
        return self.cfg.eval.resolution or self.cfg.data.image_size

    def _setup_eval(self) -> None:
        """The protocol's prompts, scorers (weights from local paths) and, on rank 0, the reference
        statistics: built before training, so a missing file fails before the first step."""
        from eval.protocol import build_scorers, load_reference, protocol_prompts

        cfg = self.cfg
        self.eval_prompts, self.eval_labels = protocol_prompts(cfg.eval, self.batches.example_captions)
        classifier = str(self.digits_info.classifier_path) if self.digits_info is not None else None
        self.eval_scorers = build_scorers(cfg.eval, digit_classifier_path=classifier, device=self.device)
        self.eval_reference, self.eval_reference_info = None, None
        if self.env.rank == 0 and self.eval_scorers.extractor is not None:
            from data_pipeline.stream import options_of

            default = self.digits_info.val_url if self.digits_info is not None else None
            source = cfg.eval.reference or default
            self.eval_reference, self.eval_reference_info = load_reference(
                cfg.eval, self.eval_scorers.extractor, resolution=self.eval_resolution, default=default,
                storage_options=options_of(cfg.data, source) if source else None)
            if self.eval_reference is not None:
                log.info("eval reference statistics: %s", self.eval_reference_info)

    def evaluate(self) -> dict[str, Any]:
        """Run the eval protocol on every rank (each samples its share with the EMA weights), log the
        metrics and a grid per guidance scale, and write the results JSON beside the checkpoints.
        A failure is logged and reported in the results; training goes on."""
        from eval.protocol import EvalFailed, run_protocol, sampler_fn

        cfg = self.cfg
        unet, text = self._sampling_modules()
        tokenizer = self.parts.tokenizer
        f = getattr(self.first_stage, "downsample_factor", 1)
        res = self.eval_resolution

        def encode(p: list[str]) -> torch.Tensor:
            return text(tokenizer(p).to(self.device))

        generate = sampler_fn(unet, encode, self.first_stage, self.diffusion.schedule,
                              latent_shape=(cfg.model.unet.in_channels, res // f, res // f),
                              sampler=cfg.eval.sampler, num_steps=cfg.eval.num_steps, device=self.device)
        head: dict[str, Any] = {"eval/step": self.step, "eval/sampler": cfg.eval.sampler,
                                "eval/num_steps": cfg.eval.num_steps, "eval/guidance_scales": cfg.eval.guidance_scales,
                                "eval/weights": "ema" if (self.ema is not None and cfg.eval.use_ema) else "live",
                                "eval/num_samples": len(self.eval_prompts)}
        try:
            result = run_protocol(cfg.eval, generate, self.eval_prompts, scorers=self.eval_scorers,
                                  reference_stats=self.eval_reference, labels=self.eval_labels,
                                  rank=self.env.rank, world_size=self.env.world_size,
                                  gather=distributed.all_gather_object)
        except EvalFailed as e:  # raised on every rank together
            log.error("evaluation at step %d failed; training continues: %s", self.step, e)
            self.tracker.log_scalars(self.step, {"eval/failed": 1})
            return {**head, "eval/error": str(e)}
        out = dict(head)
        if self.env.rank == 0:
            try:
                out.update(self._report_eval(result))
            except Exception as e:  # noqa: BLE001 - a broken report (disk, W&B) never stops training
                log.exception("writing the evaluation of step %d failed; training continues", self.step)
                out["eval/error"] = f"{type(e).__name__}: {e}"
        distributed.barrier()
        return out

    def _report_eval(self, result: dict[str, Any]) -> dict[str, Any]:
        from eval.protocol import results_record, scalar_logs, write_record
        from trainer.checkpoint import tag_for

        cfg = self.cfg
        scalars = scalar_logs(result)
        self.tracker.log_scalars(self.step, scalars)
        out: dict[str, Any] = dict(scalars)
        shown = result["prompts_shown"]
        for i, (scale, grid) in enumerate(result["grids"].items()):
            key = "samples" if len(result["grids"]) == 1 else f"samples_g{scale:g}"
            path = self.tracker.log_images(self.step, key, torch.from_numpy(grid).float(), shown[:len(grid)],
                                           value_range=(0.0, 255.0))
            if i == 0:
                out["eval/grid"] = str(path)
        source = {"checkpoint": self.paths.checkpoint_dir, "tag": tag_for(self.step), "step": self.step,
                  "weights": "ema" if (self.ema is not None and cfg.eval.use_ema) else "live", "run_id": self.run_id}
        record = results_record(cfg.eval, result, scorers=self.eval_scorers, reference_info=self.eval_reference_info,
                                source=source, resolution=self.eval_resolution)
        out["eval/json"] = write_record(record, f"{self.paths.checkpoint_dir.rstrip('/')}/eval/{tag_for(self.step)}.json")
        return out

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
                scalars = {**self.step_scalars(out), "lr": self.engine.get_lr()[0], "step_time_s": step_time,
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
            if self.final_evaluation():
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
        if "eval/fid" in last_eval:
            lines.append(f"FID:             {last_eval['eval/fid']:.3f} ({self.cfg.eval.feature_kind} features, "
                         f"{last_eval['eval/num_samples']} samples, guidance {self.cfg.eval.guidance_scales[0]:g}; "
                         f"all results: {last_eval.get('eval/json')})")
        if "eval/digit_accuracy" in last_eval:
            lines.append(f"digit accuracy:  {last_eval['eval/digit_accuracy']:.1%} of samples recognised as "
                         f"the prompted digit (chance 10%)")
        lines += self.final_report()
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
    if cfg.task == "autoencoder":
        from trainer.autoencoder_trainer import AutoencoderTrainer

        trainer: Trainer = AutoencoderTrainer(cfg, config_dict, env)
    else:
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
