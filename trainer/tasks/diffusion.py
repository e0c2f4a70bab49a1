"""The latent diffusion job (``task=diffusion``, the default): the paper's LDM, conditioned as
``model.conditioning`` says - on text (the default), on a class label, or on nothing.

The UNet (with the paper's 1.45B model's jointly trained text transformer, or a class embedder) is
the one DeepSpeed engine; the first stage and a frozen text encoder stay outside it. Each
micro-batch: condition dropout (captions -> "", class labels -> the null class), the latents (cached posteriors or encoded images; a posterior sample), then the objective's timesteps
and noise - every draw from the sample's own generator, keyed by its global position in the data,
so a resumed run on any world size sees the same numbers. Evaluation samples the eval protocol with
the EMA (or live) weights on every rank.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from data_pipeline.concat import concat_settings, make_condition
from data_pipeline.demo_digits import DigitsDatasetInfo
from eval.config import EvalConfig
from eval.protocol import (EvalFailed, build_scorers, load_reference, protocol_conditions, results_record,
                           run_protocol, sampler_fn, scalar_logs, write_record)
from trainer.diffusion import DiffusionConfig, SampleGenerators, build_diffusion, drop_conditions, drop_labels
from trainer.flops import diffusion_training_flops
from trainer.interchange import build_networks
from trainer.models.autoencoder import DiagonalGaussianDistribution
from trainer.models.conditioning import ClassEmbedder
from trainer.models.config import ModelConfig
from trainer.models.text_encoders import build_text_encoder
from trainer.models.unet import UNetModel
from trainer.runtime import distributed
from trainer.runtime.checkpoint import tag_for
from trainer.runtime.ema import EMA, copy_into
from trainer.runtime.engine import apply_channels_last, trainable_parameters
from trainer.runtime.tracking import RunTracker
from trainer.tasks.base import MicroBatch, Task, TaskContext
from trainer.tasks.restoration_eval import evaluate_restoration, grid_of, held_out_set, json_record, scalars_of

log = logging.getLogger("trainer")


class DiffusionTrainModule(nn.Module):
    """What DeepSpeed wraps: the UNet and what is trained with it - the text transformer when it is
    trained jointly (the paper's 1.45B model; ``cond`` is token ids then), or the class embedder
    (``cond`` is class labels (B,)). Otherwise ``cond`` is precomputed hidden states, or None for an
    unconditional UNet. Its attribute names are the ``unet.`` / ``text_encoder.`` / ``class_embedder.``
    prefixes of the saved weights."""

    def __init__(self, unet: nn.Module, text_encoder: Optional[nn.Module],
                 class_embedder: Optional[ClassEmbedder] = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        if class_embedder is not None:  # not even a None attribute otherwise: text models' names unchanged
            self.class_embedder = class_embedder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        if hasattr(self, "class_embedder"):
            context = self.class_embedder(cond)  # (B, 1, D)
        elif self.text_encoder is not None:
            context = self.text_encoder(cond)  # (B, L, D)
        else:
            context = cond  # (B, L, D) hidden states, or None (unconditional)
        return self.unet(x_t, t, None if context is None else context.to(x_t.dtype))  # (B, C, h, w)


def load_trained_weights(unet: nn.Module, text_encoder: Optional[nn.Module], weights: dict[str, torch.Tensor], *,
                         text_trainable: bool, what: str, class_embedder: Optional[nn.Module] = None) -> None:
    """Copy the ``unet.*`` / ``text_encoder.*`` / ``class_embedder.*`` tensors of ``weights`` (names of
    ``DiffusionTrainModule``: EMA or consolidated live weights) into whole, unpartitioned networks."""
    copy_into(unet, {k: v.float() for k, v in weights.items() if k.startswith("unet.")}, prefix="unet")
    text = {k: v.float() for k, v in weights.items() if k.startswith("text_encoder.")}
    if text and text_encoder is not None:
        copy_into(text_encoder, text, prefix="text_encoder")
    elif text_trainable:
        raise ValueError(f"{what} has no text_encoder.* weights but model.text_encoder is trainable")
    if class_embedder is not None:
        classes = {k: v.float() for k, v in weights.items() if k.startswith("class_embedder.")}
        if not classes:
            raise ValueError(f"{what} has no class_embedder.* weights but model.conditioning.cross_attn='class'")
        copy_into(class_embedder, classes, prefix="class_embedder")


def describe_condition(condition: Any) -> str:
    """A sample's caption in grids: its prompt, ``class <n>``, or ``unconditional``."""
    if condition is None:
        return "unconditional"
    return condition if isinstance(condition, str) else f"class {int(condition)}"


class DiffusionTask(Task):
    def __init__(self, ctx: TaskContext, *, model: ModelConfig, diffusion: DiffusionConfig, eval_cfg: EvalConfig,
                 sample_posterior: bool, image_size: int, example_captions: Callable[[int], list[str]],
                 digits: Optional[DigitsDatasetInfo] = None,
                 reference_storage_options: Callable[[str], dict[str, Any]] = lambda url: {},
                 check_first_stage: Callable[[nn.Module], None] = lambda first_stage: None,
                 cached_text: Callable[[nn.Module], Optional[torch.Tensor]] = lambda text_encoder: None) -> None:
        """``check_first_stage`` runs on the built first stage before any engine is built (training from
        a latent cache checks the cache's manifest against it); ``cached_text`` on a frozen text encoder
        returns the empty prompt's cached output when the batches carry the encoder's cached outputs
        (``text_context``), which are then used instead of running it."""
        self.ctx, self.model_cfg, self.eval_cfg = ctx, model, eval_cfg
        self.sample_posterior = sample_posterior
        self.cond_drop_prob = diffusion.cond_drop_prob
        self.cross_attn = model.conditioning.cross_attn
        self.null_class = model.conditioning.null_class
        self.concat = concat_settings(model.conditioning)  # ConcatSettings, or None (no concat conditioning)
        self._flops_cache: dict[tuple[int, int, bool, bool], int] = {}
        parts = build_networks(model, ctx.seed)  # seeded: identical initial weights on every rank
        self.tokenizer = parts.tokenizer
        self.diffusion = build_diffusion(diffusion)
        self.text_trainable = parts.text_encoder_trainable
        module = DiffusionTrainModule(parts.unet, parts.text_encoder if self.text_trainable else None,
                                      parts.class_embedder)
        frozen = parts.text_encoder is not None and not self.text_trainable
        self.frozen_text = parts.text_encoder.to(ctx.device).eval() if frozen else None
        self.first_stage = parts.first_stage.to(ctx.device).eval()
        if ctx.channels_last:
            apply_channels_last(self.first_stage)
        self._memory_format = torch.channels_last if ctx.channels_last else torch.preserve_format
        check_first_stage(self.first_stage)
        self.empty_context = None if self.frozen_text is None else cached_text(self.frozen_text)  # (L, D) or None
        self.engine, self.optimizer = ctx.make_engine(module)
        self.engines = {"model": (self.engine, self.optimizer)}
        with_unet = " + text encoder" if self.text_trainable else " + class embedder" if self.cross_attn == "class" else ""
        self.summary = f"{trainable_parameters(module, ctx.zero_stage):,} trainable parameters (unet{with_unet})"
        self.evaluates_at_end = eval_cfg.kind != "none" or bool(eval_cfg.prompts)
        self.eval_resolution = eval_cfg.resolution or image_size
        self._setup_eval(example_captions, digits, reference_storage_options)

    def ema_module(self) -> nn.Module:
        return self.engine.module

    # ------------------------------------------------------------------ one micro-batch

    def micro_batch(self, batch: dict[str, Any], step: int) -> MicroBatch:
        gens = SampleGenerators(self.ctx.seed, batch["positions"])
        # Condition dropout draws first, then the latents', as for every kind of conditioning.
        if self.cross_attn == "text":
            captions = drop_conditions(batch["captions"], self.cond_drop_prob, gens)
        elif self.cross_attn == "class":
            labels = drop_labels(batch["labels"], self.null_class, self.cond_drop_prob, gens)  # (B,)
        with torch.no_grad():
            x0 = self._latents(batch, gens)  # (B, C, h, w)
        if self.cross_attn == "text":
            cond = self._condition(captions, batch.get("text_context"))
        else:  # class labels for the embedder inside the engine; nothing for an unconditional UNet
            cond = labels.to(self.ctx.device) if self.cross_attn == "class" else None
        model_fn = self._model_fn
        # Drawn after the latents', before the timesteps and noise (nothing drawn from a cache); never dropped.
        if self.concat is not None:
            concat = self._concat_input(batch, gens, tuple(x0.shape[-2:]))  # (B, C_concat, h, w)
            model_fn = lambda x_t, t, c: self._model_fn(torch.cat([x_t, concat.to(x_t)], dim=1), t, c)  # noqa: E731
        losses = self.diffusion.training_losses(model_fn, x0, cond, generator=gens)
        loss = losses["loss"].mean()
        cached_text = self.empty_context is not None and "text_context" in batch
        flops = x0.shape[0] * self._flops_per_sample(*x0.shape[-2:], cached_latents="latent_mean" in batch,
                                                     cached_text=cached_text)
        return MicroBatch(loss=loss, backward={"model": loss}, flops=flops)

    def _concat_input(self, batch: dict[str, Any], gens: SampleGenerators, latent_size: tuple[int, int]) -> torch.Tensor:
        """The concat condition: the latent cache's (``concat_input``, drawn once per sample at precompute;
        trainer.train checked the cache was made for this task), else made from the batch's
        high-resolution images with each sample's generator (data_pipeline.concat)."""
        if "concat_input" in batch:
            return batch["concat_input"].to(self.ctx.device).float()  # (B, C_concat, h, w)
        assert "images" in batch, "a latent cache without concat inputs is refused before the first step"
        images = batch["images"].to(self.ctx.device)  # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            return make_condition(self.first_stage, images, gens.generators, self.concat, latent_size).float()

    def _flops_per_sample(self, height: int, width: int, *, cached_latents: bool, cached_text: bool) -> int:
        """Model FLOPs of one sample at this latent size (one entry per aspect bucket); recomputation by
        activation checkpointing is not model FLOPs (MFU, PaLM App. B)."""
        key = (height, width, cached_latents, cached_text)
        if key not in self._flops_cache:
            m, f = self.model_cfg, self.model_cfg.autoencoder.downsample_factor
            self._flops_cache[key] = diffusion_training_flops(
                m.unet, m.text_encoder if m.uses_text else None, m.autoencoder, height * f, width * f, cached_latents=cached_latents,
                cached_text=cached_text).total.model
        return self._flops_cache[key]

    def _latents(self, batch: dict[str, Any], gens: SampleGenerators) -> torch.Tensor:
        """Diffusion latents of the batch: q(z|x) from the latent cache or by encoding the images, a
        posterior sample (``train.sample_posterior``), then the first stage's scale and shift."""
        device = self.ctx.device
        if "latent_mean" not in batch:
            images = batch["images"].to(device, memory_format=self._memory_format)  # (B, 3, H, W) in [-1, 1]
            posterior = self.first_stage.encode(images)
        else:
            mean = batch["latent_mean"].to(device)
            logvar = batch.get("latent_logvar")
            if logvar is None:  # a cache of means only: the posterior's mode
                posterior = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], 1),
                                                         deterministic=True)
            else:
                posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar.to(device)], 1))
        z = posterior.mean
        if not posterior.deterministic and self.sample_posterior:
            z = z + posterior.std * gens.randn(tuple(z.shape[1:])).to(z)
        return self.first_stage.to_latent(z).float()

    def _condition(self, captions: list[str], cached: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token ids for a jointly trained text encoder, else the frozen encoder's hidden states: from the
        latent cache when it holds them (``cached``, (B, L, D); a caption dropped for classifier-free
        guidance - now "" - gets the empty prompt's), else by running the encoder."""
        if cached is not None and self.empty_context is not None:
            device = self.ctx.device
            dropped = torch.tensor([c == "" for c in captions], device=device)[:, None, None]  # (B, 1, 1)
            context = torch.where(dropped, self.empty_context.to(device), cached.to(device))
            return context.to(self.ctx.dtype)  # (B, L, D)
        tokens = self.tokenizer(captions).to(self.ctx.device)  # (B, L)
        if self.text_trainable:
            return tokens
        with torch.no_grad():
            return self.frozen_text(tokens).to(self.ctx.dtype)  # (B, L, D)

    def _model_fn(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.engine(x_t.to(self.ctx.dtype, memory_format=self._memory_format), t, cond)

    # ------------------------------------------------------------------ evaluation

    def _setup_eval(self, example_captions: Callable[[int], list[str]], digits: Optional[DigitsDatasetInfo],
                    reference_storage_options: Callable[[str], dict[str, Any]]) -> None:
        """The protocol's prompts, scorers (weights from local paths) and, on rank 0, the reference
        statistics: built before training, so a missing file fails before the first step."""
        cfg = self.eval_cfg
        if self.concat is not None:
            self._setup_restoration_eval(digits, reference_storage_options)
            return
        self.eval_prompts, self.eval_labels = protocol_conditions(
            cfg, self.cross_attn, self.model_cfg.conditioning.num_classes, example_captions)
        classifier = str(digits.classifier_path) if digits is not None else None
        self.scorers = build_scorers(cfg, digit_classifier_path=classifier, device=self.ctx.device)
        self.reference, self.reference_info = None, None
        if self.ctx.rank == 0 and self.scorers.extractor is not None:
            default = digits.val_url if digits is not None else None
            source = cfg.reference or default
            self.reference, self.reference_info = load_reference(
                cfg, self.scorers.extractor, resolution=self.eval_resolution, default=default,
                storage_options=reference_storage_options(source) if source else None)
            if self.reference is not None:
                log.info("eval reference statistics: %s", self.reference_info)

    def _setup_restoration_eval(self, digits: Optional[DigitsDatasetInfo],
                                reference_storage_options: Callable[[str], dict[str, Any]]) -> None:
        """Concat models are scored on the held-out images (eval.reference, else the digits' held-out
        split): read before training, so a missing source fails before the first step."""
        cfg = self.eval_cfg
        self.eval_prompts, self.eval_labels = [], None
        classifier = str(digits.classifier_path) if digits is not None else None
        self.scorers = build_scorers(cfg, digit_classifier_path=classifier, device=self.ctx.device)
        self.reference, self.reference_info, self.held_out = None, None, None
        source = cfg.reference or (digits.val_url if digits is not None else None)
        if cfg.kind == "none" or not source:
            return
        self.held_out = held_out_set(source, resolution=self.eval_resolution, with_captions=self.cross_attn == "text",
                                     storage_options=reference_storage_options(source))
        self.eval_prompts = [None] * len(self.held_out["images"])
        log.info("restoration eval: %d held-out images from %s", len(self.eval_prompts), source)

    def _evaluate_restoration(self, step: int, tracker: RunTracker, ema: Optional[EMA], checkpoint_dir: str,
                              run_id: str) -> dict[str, Any]:
        cfg = self.eval_cfg
        unet, encode, negative = self._sampling_networks(ema)
        weights = "ema" if (ema is not None and cfg.use_ema) else "live"
        head: dict[str, Any] = {"eval/step": step, "eval/sampler": cfg.sampler, "eval/num_steps": cfg.num_steps,
                                "eval/weights": weights}
        # Each rank restores its share and every rank scores the gathered outputs: a failure while restoring
        # is every rank's (EvalFailed), one while scoring (no collective after the gather) is caught per rank.
        try:
            record = evaluate_restoration(self.concat, self.held_out, unet=unet, encode=encode, uncond=negative,
                                          first_stage=self.first_stage, schedule=self.diffusion.schedule,
                                          latent_channels=self.model_cfg.autoencoder.latent_channels, cfg=cfg,
                                          scorers=self.scorers, lpips=None, device=self.ctx.device,
                                          rank=self.ctx.rank, world_size=self.ctx.world_size,
                                          gather=distributed.all_gather_object)
        except Exception as e:  # noqa: BLE001 - as for the text protocol: logged, recorded, training goes on
            log.error("evaluation at step %d failed; training continues: %s: %s", step, type(e).__name__, e)
            tracker.log_scalars(step, {"eval/failed": 1})
            distributed.barrier()
            return {**head, "eval/error": f"rank {self.ctx.rank}: {type(e).__name__}: {e}"}
        out: dict[str, Any] = {**head, **scalars_of(record)}
        if self.ctx.rank == 0:
            tracker.log_scalars(step, {k: v for k, v in out.items() if isinstance(v, float)})
            shown = min(cfg.num_grid, record["num_images"])
            path = tracker.log_images(step, "restorations", grid_of(record, shown),
                                      [f"{name} {i}" for i in range(shown) for name in ("input", "output", "original")])
            out["eval/grid"] = str(path)
            source = {"checkpoint": checkpoint_dir, "tag": tag_for(step), "step": step, "weights": weights,
                      "run_id": run_id}
            payload = {"protocol": "restoration", "concat": self.concat.kind, "source": source,
                       "settings": {"sampler": cfg.sampler, "num_steps": cfg.num_steps, "seed": cfg.seed},
                       "result": json_record(record)}
            out["eval/json"] = write_record(payload, f"{checkpoint_dir.rstrip('/')}/eval/{tag_for(step)}.json")
        distributed.barrier()
        return out

    def _sampling_networks(self, ema: Optional[EMA]) -> tuple[nn.Module, Callable[[list[Any]], Optional[torch.Tensor]], Any]:
        """A whole, unpartitioned copy of the UNet holding the EMA (default) or the live weights, on this
        rank (collective under ZeRO-3); the conditions -> context function (text encoder, class
        embedder or none) of those weights, and the unconditional branch's condition."""
        if ema is not None and self.eval_cfg.use_ema:
            weights = ema.state_dict()
        elif self.ctx.zero_stage == 3:
            weights = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            weights = {k: v.detach().float().cpu() for k, v in self.engine.module.state_dict().items()}
        cond = self.model_cfg.conditioning
        unet = UNetModel(self.model_cfg.unet)
        text = (build_text_encoder(self.model_cfg.text_encoder, build_tokenizer=False)[0] if self.text_trainable
                else self.frozen_text)
        embedder = ClassEmbedder(cond.num_classes, cond.embed_dim) if self.cross_attn == "class" else None
        load_trained_weights(unet, text, weights, text_trainable=self.text_trainable, what="the trained weights",
                             class_embedder=embedder)
        device = self.ctx.device
        if embedder is not None:
            embedder = embedder.to(device).eval()
            return (unet.to(device).eval(), lambda labels: embedder(torch.tensor(labels, device=device)),
                    cond.null_class)
        if text is None:
            return unet.to(device).eval(), lambda conditions: None, None
        text = text.to(device).eval()
        return unet.to(device).eval(), lambda prompts: text(self.tokenizer(prompts).to(device)), ""

    def evaluate(self, step: int, *, tracker: RunTracker, ema: Optional[EMA], checkpoint_dir: str,
                 run_id: str) -> dict[str, Any]:
        """Run the eval protocol on every rank (each samples its share with the EMA weights), log the
        metrics and a grid per guidance scale, and write the results JSON beside the checkpoints.
        A failure is logged and reported in the results; training goes on."""
        cfg = self.eval_cfg
        if self.concat is not None:
            return self._evaluate_restoration(step, tracker, ema, checkpoint_dir, run_id)
        unet, encode, negative = self._sampling_networks(ema)
        generate = sampler_fn(unet, encode, self.first_stage, self.diffusion.schedule,
                              latent_shape=self.model_cfg.latent_shape(self.eval_resolution),
                              sampler=cfg.sampler, num_steps=cfg.num_steps, device=self.ctx.device,
                              negative=negative)
        weights = "ema" if (ema is not None and cfg.use_ema) else "live"
        head: dict[str, Any] = {"eval/step": step, "eval/sampler": cfg.sampler, "eval/num_steps": cfg.num_steps,
                                "eval/guidance_scales": cfg.guidance_scales, "eval/weights": weights,
                                "eval/num_samples": len(self.eval_prompts)}
        try:
            result = run_protocol(cfg, generate, self.eval_prompts, scorers=self.scorers,
                                  reference_stats=self.reference, labels=self.eval_labels, rank=self.ctx.rank,
                                  world_size=self.ctx.world_size, gather=distributed.all_gather_object)
        except EvalFailed as e:  # raised on every rank together
            log.error("evaluation at step %d failed; training continues: %s", step, e)
            tracker.log_scalars(step, {"eval/failed": 1})
            return {**head, "eval/error": str(e)}
        out = dict(head)
        if self.ctx.rank == 0:
            source = {"checkpoint": checkpoint_dir, "tag": tag_for(step), "step": step, "weights": weights,
                      "run_id": run_id}
            try:
                out.update(self._report(result, step, tracker, source, checkpoint_dir))
            except Exception as e:  # noqa: BLE001 - a broken report (disk, W&B) never stops training
                log.exception("writing the evaluation of step %d failed; training continues", step)
                out["eval/error"] = f"{type(e).__name__}: {e}"
        distributed.barrier()
        return out

    def _report(self, result: dict[str, Any], step: int, tracker: RunTracker, source: dict[str, Any],
                checkpoint_dir: str) -> dict[str, Any]:
        scalars = scalar_logs(result)
        tracker.log_scalars(step, scalars)
        out: dict[str, Any] = dict(scalars)
        shown = [describe_condition(c) for c in result["prompts_shown"]]
        for i, (scale, grid) in enumerate(result["grids"].items()):
            key = "samples" if len(result["grids"]) == 1 else f"samples_g{scale:g}"
            path = tracker.log_images(step, key, torch.from_numpy(grid).float(), shown[:len(grid)],
                                      value_range=(0.0, 255.0))
            if i == 0:
                out["eval/grid"] = str(path)
        record = results_record(self.eval_cfg, result, scorers=self.scorers, reference_info=self.reference_info,
                                source=source, resolution=self.eval_resolution)
        out["eval/json"] = write_record(record, f"{checkpoint_dir.rstrip('/')}/eval/{tag_for(step)}.json")
        return out

    def final_report(self, last_eval: dict[str, Any], checkpoint_dir: str, latest_tag: Optional[str]) -> list[str]:
        lines = []
        if "eval/psnr_gain_db" in last_eval:
            lines.append(f"super-resolution: PSNR {last_eval['eval/psnr']:.2f} dB (bicubic {last_eval['eval/psnr_bicubic']:.2f} "
                         f"dB, {last_eval['eval/psnr_gain_db']:+.2f} dB), SSIM {last_eval['eval/ssim']:.3f} (bicubic "
                         f"{last_eval['eval/ssim_bicubic']:.3f}) on {int(last_eval['eval/num_samples'])} held-out images; "
                         f"all results: {last_eval.get('eval/json')}")
            if "eval/fid" in last_eval:
                lines.append(f"super-resolution FID: {last_eval['eval/fid']:.3f} (bicubic "
                             f"{last_eval.get('eval/fid_bicubic', float('nan')):.3f}; {self.eval_cfg.feature_kind} features)")
            return lines
        if "eval/digit_accuracy_masked_input" in last_eval:
            lines.append(f"inpainting: {last_eval['eval/digit_accuracy']:.1%} of completions recognised as the original "
                         f"digit (the masked inputs: {last_eval['eval/digit_accuracy_masked_input']:.1%}), masked-region "
                         f"PSNR {last_eval['eval/masked_psnr']:.2f} dB on {int(last_eval['eval/num_samples'])} held-out "
                         f"images; all results: {last_eval.get('eval/json')}")
            return lines
        if "eval/fid" in last_eval:
            lines.append(f"FID:             {last_eval['eval/fid']:.3f} ({self.eval_cfg.feature_kind} features, "
                         f"{last_eval['eval/num_samples']} samples, guidance {self.eval_cfg.guidance_scales[0]:g}; "
                         f"all results: {last_eval.get('eval/json')})")
        if "eval/digit_accuracy" in last_eval:
            lines.append(f"digit accuracy:  {last_eval['eval/digit_accuracy']:.1%} of samples recognised as "
                         f"the {'prompted' if self.cross_attn == 'text' else 'requested'} digit (chance 10%)")
        return lines

