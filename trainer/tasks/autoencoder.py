"""Training the first stage: the paper's KL-regularised autoencoder (``trainer.train task=autoencoder``).

The CompVis recipe (``ldm/models/autoencoder.py`` + ``LPIPSWithDiscriminator``): L1 + LPIPS
reconstruction under a learned log-variance, a small KL term, and a patch discriminator with hinge
loss from ``loss.disc_start`` on, balanced by the adaptive weight. Two DeepSpeed engines, one per
optimizer (autoencoder + log-variance; discriminator): per micro-batch the generator's loss and,
from ``disc_start``, the discriminator's on the detached reconstruction - CompVis' two optimizer
passes on the same batch. Every checkpoint also holds ``autoencoder.safetensors``: the fp32 weights
with the latent scale estimated from data (paper Sec. 4.3.2: 1 / std of the latents), which a
diffusion job loads with ``model.autoencoder.checkpoint_path=`` (and the printed ``scale_factor``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Optional

import torch
from torch import nn

from trainer.autoencoder_loss import AutoencoderLoss, AutoencoderLossConfig, ConvWeightGrad
from trainer.convert.first_stage import load_first_stage
from trainer.models.autoencoder import AutoencoderConfig, AutoencoderKL
from trainer.runtime import distributed
from trainer.runtime.checkpoint import AUTOENCODER_FILE, ResumePoint, autoencoder_file_metadata
from trainer.runtime.ema import EMA
from trainer.runtime.engine import full_state_dict, trainable_parameters
from trainer.runtime.tracking import RunTracker
from trainer.tasks.base import CheckpointExtras, MicroBatch, Task, TaskContext

log = logging.getLogger("trainer")

DISCRIMINATOR_TAG = "discriminator"
NUM_GRID = 8  # input | reconstruction pairs in the logged grid


class AutoencoderOutput:
    """The train module's output. A plain object, not a tensor or tuple: DeepSpeed hooks the tensors a
    module returns to start its backward bookkeeping, and the adaptive weight differentiates through
    the reconstruction twice before the real backward (``engine.backward`` does that bookkeeping)."""

    def __init__(self, reconstruction: torch.Tensor, posterior) -> None:
        self.reconstruction = reconstruction  # (B, C, H, W)
        self.posterior = posterior


class AutoencoderTrainModule(nn.Module):
    """What the generator's engine wraps: the autoencoder and the loss's log-variance (CompVis trains
    ``loss.logvar`` with the autoencoder's optimizer)."""

    def __init__(self, autoencoder: nn.Module, logvar: nn.Parameter) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = logvar

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> AutoencoderOutput:
        posterior = self.autoencoder.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return AutoencoderOutput(self.autoencoder.decode(z), posterior)


def latent_scale(latents_sum: float, latents_sq_sum: float, count: int) -> float:
    """1 / std of latent values from their sum, sum of squares and count (paper Sec. 4.3.2 /
    CompVis ``scale_by_std``: the diffusion model sees unit-variance latents)."""
    mean = latents_sum / count
    var = latents_sq_sum / count - mean * mean
    if not var > 0:
        raise ValueError(f"latent variance {var} over {count} values; the autoencoder's latents are constant")
    return float(1.0 / var ** 0.5)


class AutoencoderTask(Task):
    evaluates_at_end = True  # the last reconstructions
    uses_captions = False  # images only: an empty or missing caption does not cost the sample

    def __init__(self, ctx: TaskContext, *, autoencoder: AutoencoderConfig, loss: AutoencoderLossConfig) -> None:
        if ctx.load_universal:
            raise ValueError(f"task=autoencoder resumes on the world size it was saved on "
                             f"({ctx.saved_world_size} ranks) for deepspeed.zero_stage >= 1 "
                             f"or bf16; this job has {ctx.world_size}")
        self.ctx, self.ae_cfg = ctx, autoencoder
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        network = load_first_stage(autoencoder)
        if not isinstance(network, AutoencoderKL):
            raise ValueError("task=autoencoder trains a KL autoencoder; model.autoencoder.kind='identity' has "
                             "nothing to train")
        self.loss = AutoencoderLoss(loss, generator=torch.Generator().manual_seed(ctx.seed + 1))
        self.loss.to(ctx.device)
        module = AutoencoderTrainModule(network, self.loss.logvar)
        self.engine, self.optimizer = ctx.make_engine(module)
        # The adaptive weight's gradients w.r.t. decoder.conv_out.weight, taken at the layer's output
        # so that ZeRO's reduce hooks on the weight see only the real backward.
        self.last_layer_grad = ConvWeightGrad(self.engine.module.autoencoder.decoder.conv_out)
        self.disc_engine, self.disc_optimizer = ctx.make_engine(self.loss.discriminator)
        self.engines = {"autoencoder": (self.engine, self.optimizer),
                        DISCRIMINATOR_TAG: (self.disc_engine, self.disc_optimizer)}
        self.last_images: Optional[torch.Tensor] = None
        self.latent_scale_factor: Optional[float] = None
        self.summary = (f"autoencoder {trainable_parameters(module, ctx.zero_stage):,} + discriminator "
                        f"{trainable_parameters(self.loss.discriminator, ctx.zero_stage):,} trainable parameters; "
                        f"discriminator from step {loss.disc_start}")

    # ------------------------------------------------------------------ one micro-batch

    def micro_batch(self, batch: dict[str, Any], step: int) -> MicroBatch:
        """The generator's loss and, from ``disc_start``, the discriminator's on the detached
        reconstruction (``step`` is CompVis' global_step: steps done before this one)."""
        x = batch["images"].to(self.ctx.device)  # (B, 3, H, W) in [-1, 1]
        out = self.engine(x.to(self.ctx.dtype))
        recon, posterior = out.reconstruction.float(), out.posterior
        loss, logs = self.loss.generator_loss(x, recon, posterior, step, last_layer=self.last_layer_grad)
        d_loss, d_logs = self.loss.discriminator_loss(x, recon.detach(), step)
        self.last_images = x[:NUM_GRID].detach()
        backward = {"autoencoder": loss}
        if self.loss.disc_active(step):
            backward[DISCRIMINATOR_TAG] = d_loss
        return MicroBatch(loss=loss, backward=backward, terms={**logs, **d_logs})

    def log_scalars(self, loss: float, terms: dict[str, float], step: int) -> dict[str, float]:
        scalars = {f"loss/{k}": v for k, v in terms.items()}
        scalars["loss"] = terms["total"]
        if self.loss.disc_active(step - 1):
            scalars["disc_lr"] = self.disc_engine.get_lr()[0]
        return scalars

    # ------------------------------------------------------------------ checkpoint

    def _estimate_latent_scale(self) -> Optional[float]:
        """1 / std of posterior samples of the last batch, over all ranks (collective)."""
        if self.last_images is None:
            return self.latent_scale_factor
        with torch.no_grad():
            self.engine.module.eval()
            posterior = self.engine.module.autoencoder.encode(self.last_images.to(self.ctx.dtype))
            # Its own generator: estimating at a checkpoint must not move the training's RNG stream.
            noise = torch.Generator(self.ctx.device).manual_seed(self.ctx.seed + self.ctx.rank)
            z = posterior.sample(noise).float() - self.ae_cfg.shift_factor
            self.engine.module.train()
        # A checkpoint's deliberate host sync: three numbers per rank, summed over ranks.
        sums = torch.stack([z.sum(), z.pow(2).sum()]).double().cpu()
        local = torch.cat([sums, torch.tensor([float(z.numel())], dtype=torch.float64)])
        stats = distributed.all_reduce_sum(local, self.ctx.device).tolist()
        self.latent_scale_factor = latent_scale(stats[0], stats[1], int(stats[2]))
        return self.latent_scale_factor

    def checkpoint_extras(self, step: int) -> CheckpointExtras:
        scale = self._estimate_latent_scale()
        state = full_state_dict(self.engine, self.ctx.zero_stage)
        weights = {k[len("autoencoder."):]: v.float().cpu() for k, v in state.items() if k.startswith("autoencoder.")}
        meta = autoencoder_file_metadata(step=step, scale_factor=scale if scale is not None else self.ae_cfg.scale_factor,
                                         shift_factor=self.ae_cfg.shift_factor, config=asdict(self.ae_cfg))
        return CheckpointExtras(engines={DISCRIMINATOR_TAG: self.disc_engine},
                                files={AUTOENCODER_FILE: (weights, meta)},
                                state={"latent_scale_factor": self.latent_scale_factor})

    def load_extras(self, point: ResumePoint) -> None:
        path, _ = self.disc_engine.load_checkpoint(str(point.local_dir / point.tag), tag=DISCRIMINATOR_TAG,
                                                   load_module_strict=True, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the discriminator of checkpoint {point.tag} "
                               f"({point.local_dir / point.tag / DISCRIMINATOR_TAG})")
        self.latent_scale_factor = point.state.get("latent_scale_factor")

    # ------------------------------------------------------------------ evaluation, report

    def evaluate(self, step: int, *, tracker: RunTracker, ema: Optional[EMA], checkpoint_dir: str,
                 run_id: str) -> dict[str, Any]:
        """Log (input | reconstruction) pairs of the last training batch; held-out metrics are
        ``python -m eval.reconstruction``'s."""
        if self.last_images is None:
            return {}
        with torch.no_grad():
            self.engine.module.eval()
            recon = self.engine.module(self.last_images.to(self.ctx.dtype), sample_posterior=False).reconstruction
            self.engine.module.train()
        pairs = torch.stack([self.last_images.float().cpu(), recon.float().clamp(-1, 1).cpu()], 1).flatten(0, 1)
        captions = [c for i in range(len(self.last_images)) for c in (f"input {i}", f"reconstruction {i}")]
        grid = tracker.log_images(step, "reconstructions", pairs, captions)
        distributed.barrier()
        out: dict[str, Any] = {"eval/step": step}
        if grid is not None:
            out["eval/grid"] = str(grid)
        return out

    def final_report(self, last_eval: dict[str, Any], checkpoint_dir: str, latest_tag: Optional[str]) -> list[str]:
        scale = self.latent_scale_factor
        if scale is None or latest_tag is None:
            return []
        return [f"latent scale:    {scale:.5f} (1 / std of the latents; stored in {AUTOENCODER_FILE})",
                f"use it:          model.autoencoder.checkpoint_path={checkpoint_dir}/{latest_tag}/{AUTOENCODER_FILE} "
                f"model.autoencoder.scale_factor={scale!r}"]
