"""Training the first stage: the paper's KL-regularised autoencoder (``trainer.train task=autoencoder``).

The CompVis recipe (``ldm/models/autoencoder.py`` + ``LPIPSWithDiscriminator``): L1 + LPIPS
reconstruction under a learned log-variance, a small KL term, and a patch discriminator with hinge
loss from ``loss.disc_start`` on, balanced by the adaptive weight. Two DeepSpeed engines, one per
optimizer (autoencoder + log-variance; discriminator), on the trunk of the diffusion job: the same
data pipeline, checkpoints (the discriminator's engine is saved in ``<tag>/discriminator/``),
resume, signals, W&B. Every checkpoint also holds ``autoencoder.safetensors``: the fp32 weights
with the latent scale estimated from data (paper Sec. 4.3.2: 1 / std of the latents), which a
diffusion job loads with ``model.autoencoder.checkpoint_path=`` (and the printed ``scale_factor``).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import torch
from torch import nn

from trainer import distributed
from trainer.train import Trainer, trainable_parameters

log = logging.getLogger("trainer")

AUTOENCODER_FILE = "autoencoder.safetensors"
AUTOENCODER_FORMAT = "ldm-platform/autoencoder"  # its safetensors metadata "format"
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


class AutoencoderTrainer(Trainer):
    """The trunk's loop with the autoencoder's step (see ``Trainer.train``)."""

    def build(self, load_universal: bool) -> str:
        from trainer.autoencoder_loss import AutoencoderLoss, ConvWeightGrad
        from trainer.models.autoencoder import AutoencoderKL, build_first_stage

        cfg = self.cfg
        if load_universal:
            raise ValueError(f"task=autoencoder resumes on the world size it was saved on "
                             f"({self.resume_point.state['world_size']} ranks) for deepspeed.zero_stage >= 1 "
                             f"or bf16; this job has {self.env.world_size}")
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        autoencoder = build_first_stage(cfg.model.autoencoder)
        if not isinstance(autoencoder, AutoencoderKL):
            raise ValueError("task=autoencoder trains a KL autoencoder; model.autoencoder.kind='identity' has "
                             "nothing to train")
        self.loss = AutoencoderLoss(cfg.loss, generator=torch.Generator().manual_seed(cfg.train.seed + 1))
        self.loss.to(self.device)
        module = AutoencoderTrainModule(autoencoder, self.loss.logvar)
        self.engine, self.optimizer = self._initialize_engine(module, load_universal)
        # The adaptive weight's gradients w.r.t. decoder.conv_out.weight, taken at the layer's output
        # so that ZeRO's reduce hooks on the weight see only the real backward.
        self.last_layer_grad = ConvWeightGrad(self.engine.module.autoencoder.decoder.conv_out)
        self.disc_engine, self.disc_optimizer = self._initialize_engine(self.loss.discriminator, load_universal)
        self.ema = None
        self.first_stage = autoencoder
        self.last_images: Optional[torch.Tensor] = None
        self.latent_scale_factor: Optional[float] = None
        return (f"autoencoder {trainable_parameters(module, cfg.deepspeed.zero_stage):,} + discriminator "
                f"{trainable_parameters(self.loss.discriminator, cfg.deepspeed.zero_stage):,} trainable parameters; "
                f"discriminator from step {cfg.loss.disc_start}")

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict[str, Any]:
        """Per micro-batch, as CompVis' two optimizer passes on the same batch: the autoencoder's
        step, then (from ``disc_start``) the discriminator's on the detached reconstruction."""
        skip_step = False
        step = self.step  # CompVis' global_step: steps done before this one
        disc_on = self.loss.disc_active(step)
        sums: dict[str, torch.Tensor] = {}
        inject = step in set(self.cfg.train.inject_nan_at_steps)
        for batch in self.batches.step_batches(self.samples_seen):
            x = batch["images"].to(self.device)  # (B, 3, H, W) in [-1, 1]
            out = self.engine(x.to(self.dtype))
            recon, posterior = out.reconstruction.float(), out.posterior
            loss, logs = self.loss.generator_loss(x, recon, posterior, step, last_layer=self.last_layer_grad)
            if inject:
                loss = loss * float("nan")
            d_loss, d_logs = self.loss.discriminator_loss(x, recon.detach(), step)
            # One host sync per micro-batch: a non-finite loss on any rank skips both optimizers' step.
            nonfinite = distributed.any_rank(not bool(torch.isfinite(loss + d_loss).item()), self.device)
            skip_step = skip_step or nonfinite
            self.optimizer.skip_next_step = skip_step
            self.engine.backward(loss)
            self.engine.step()
            if disc_on:
                self.disc_optimizer.skip_next_step = skip_step
                self.disc_engine.backward(d_loss)
                self.disc_engine.step()
            for k, v in {**logs, **d_logs}.items():
                sums[k] = sums.get(k, 0.0) + v
            self.last_images = x[:NUM_GRID].detach()
        self.optimizer.skip_next_step = False
        self.disc_optimizer.skip_next_step = False
        means = {k: v / self.accum for k, v in sums.items()}
        return {"loss": means["total"], "skipped": skip_step, "terms": means}

    def step_scalars(self, out: dict[str, Any]) -> dict[str, float]:
        from trainer.autoencoder_loss import logs_to_floats

        names = list(out["terms"])
        # One all-reduce for every term (a logging step only).
        means = distributed.all_reduce_mean(torch.stack([out["terms"][k].reshape(()) for k in names]).to(self.device))
        terms = logs_to_floats(dict(zip(names, means)))
        scalars = {f"loss/{k}": v for k, v in terms.items()}
        scalars["loss"] = terms["total"]
        if self.loss.disc_active(self.step - 1):
            scalars["disc_lr"] = self.disc_engine.get_lr()[0]
        return scalars

    # ------------------------------------------------------------------ checkpoint / samples

    def _estimate_latent_scale(self) -> Optional[float]:
        """1 / std of posterior samples of the last batch, over all ranks (collective)."""
        if self.last_images is None:
            return self.latent_scale_factor
        with torch.no_grad():
            self.engine.module.eval()
            posterior = self.engine.module.autoencoder.encode(self.last_images.to(self.dtype))
            # Its own generator: estimating at a checkpoint must not move the training's RNG stream.
            noise = torch.Generator(self.device).manual_seed(self.cfg.train.seed + self.env.rank)
            z = posterior.sample(noise).float() - self.cfg.model.autoencoder.shift_factor
            self.engine.module.train()
        stats = distributed.all_reduce_sum(torch.tensor([z.sum().item(), z.pow(2).sum().item(), z.numel()],
                                                        dtype=torch.float64), self.device)
        self.latent_scale_factor = latent_scale(float(stats[0]), float(stats[1]), int(stats[2]))
        return self.latent_scale_factor

    def checkpoint_extras(self) -> dict[str, Any]:
        from trainer.engine import full_state_dict

        scale = self._estimate_latent_scale()
        state = full_state_dict(self.engine, self.cfg.deepspeed.zero_stage)
        weights = {k[len("autoencoder."):]: v.float().cpu() for k, v in state.items() if k.startswith("autoencoder.")}
        ae_cfg = self.cfg.model.autoencoder
        meta = {"format": AUTOENCODER_FORMAT, "step": str(self.step),
                "scale_factor": repr(scale if scale is not None else ae_cfg.scale_factor),
                "shift_factor": repr(ae_cfg.shift_factor),
                "config": json.dumps(self.config_dict["model"]["autoencoder"], sort_keys=True)}
        return {"extra_engines": {DISCRIMINATOR_TAG: self.disc_engine},
                "extra_files": {AUTOENCODER_FILE: (weights, meta)}}

    def trainer_state(self) -> dict[str, Any]:
        return {**super().trainer_state(), "latent_scale_factor": self.latent_scale_factor}

    def _load(self, point, load_universal: bool) -> None:
        super()._load(point, load_universal)
        path, _ = self.disc_engine.load_checkpoint(str(point.local_dir / point.tag), tag=DISCRIMINATOR_TAG,
                                                   load_module_strict=True, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the discriminator of checkpoint {point.tag} "
                               f"({point.local_dir / point.tag / DISCRIMINATOR_TAG})")
        self.latent_scale_factor = point.state.get("latent_scale_factor")

    def _setup_eval(self) -> None:
        pass

    def final_evaluation(self) -> bool:
        return True  # the last reconstructions

    def evaluate(self) -> dict[str, Any]:
        """Log (input | reconstruction) pairs of the last training batch; held-out metrics are
        ``python -m eval.reconstruction``'s."""
        if self.last_images is None:
            return {}
        with torch.no_grad():
            self.engine.module.eval()
            recon = self.engine.module(self.last_images.to(self.dtype), sample_posterior=False).reconstruction
            self.engine.module.train()
        pairs = torch.stack([self.last_images.float().cpu(), recon.float().clamp(-1, 1).cpu()], 1).flatten(0, 1)
        captions = [c for i in range(len(self.last_images)) for c in (f"input {i}", f"reconstruction {i}")]
        grid = self.tracker.log_images(self.step, "reconstructions", pairs, captions)
        distributed.barrier()
        out: dict[str, Any] = {"eval/step": self.step}
        if grid is not None:
            out["eval/grid"] = str(grid)
        return out

    def final_report(self) -> list[str]:
        scale = self.latent_scale_factor
        tag = self.store.latest_tag()
        if scale is None or tag is None:
            return []
        return [f"latent scale:    {scale:.5f} (1 / std of the latents; stored in {AUTOENCODER_FILE})",
                f"use it:          model.autoencoder.checkpoint_path={self.paths.checkpoint_dir}/{tag}/{AUTOENCODER_FILE} "
                f"model.autoencoder.scale_factor={scale!r}"]


def autoencoder_overrides(checkpoint: str) -> list[str]:
    """The ``model.autoencoder`` overrides that make a diffusion job (or a latent-cache precompute)
    use the autoencoder of ``checkpoint`` (the file, a tag, a checkpoint root or a run dir; local:
    model.autoencoder.checkpoint_path is read from disk)."""
    from pathlib import Path

    from eval.reconstruction import read_autoencoder_metadata, resolve_autoencoder_file

    url = resolve_autoencoder_file(checkpoint)
    meta = read_autoencoder_metadata(url)
    return [f"model.autoencoder.checkpoint_path={Path(url).resolve()}",
            f"model.autoencoder.scale_factor={float(meta['scale_factor'])!r}"]


def main(argv: list[str]) -> None:
    """``python -m trainer.autoencoder_trainer <run dir | checkpoint root | root/tag>``: print the
    overrides with which a diffusion job uses that autoencoder (e.g. ``$(python -m ... runs/ae)``)."""
    import sys

    if len(argv) != 1:
        print(main.__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        print(" ".join(autoencoder_overrides(argv[0])))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
