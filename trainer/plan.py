"""``python -m trainer.plan model=<preset> [world_size=N] [precision=bf16] [image_size=256] [mfu=0.45]``

Builds every component of a model preset on the meta device (no memory, no weights), prints exact
parameter counts, the model-state memory per GPU for ZeRO stages 0-3, and the training FLOPs per image
with the images/s per GPU they give at ``mfu`` of an A100's, H100's and H200's bf16 peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from trainer.checks import invalid
from trainer.flops import PEAK_TFLOPS, PLAN_DEVICES, diffusion_training_flops, images_per_second
from trainer.models.config import ModelConfig, build_components, count_parameters
from trainer.runtime.engine import ACTIVATION_CHECKPOINTING
from trainer.zero_memory import PRECISIONS, STAGES, bytes_per_parameter, zero_model_state_bytes
from trainer.cli import CONF_DIR, hydra_command


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    world_size: int = 1
    precision: str = "bf16"
    # The FLOP estimate: image side in pixels, the share of peak assumed, the data path and recomputation.
    image_size: int = 256
    mfu: float = 0.45
    cached_latents: bool = True  # a latent cache (data.latent_cache): the first stage does not run
    cached_text: bool = False  # cached text embeddings: a frozen text encoder does not run
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise invalid("image_size", self.image_size, "a positive number of pixels")
        if not 0.0 < self.mfu <= 1.0:
            raise invalid("mfu", self.mfu, "a fraction in (0, 1]")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise invalid("activation_checkpointing", self.activation_checkpointing,
                          f"one of {ACTIVATION_CHECKPOINTING}")
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be a positive number of GPUs")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")


ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:9.2f} GiB"


def render_plan(cfg: PlanConfig) -> str:
    parts = build_components(cfg.model, device="meta")
    rows = [("unet", parts.unet, True)]
    if parts.text_encoder is not None:
        rows.append(("text_encoder", parts.text_encoder, parts.text_encoder_trainable))
    if parts.class_embedder is not None:
        rows.append(("class_embedder", parts.class_embedder, True))
    rows.append(("first_stage", parts.first_stage, False))
    lines = [f"model preset: {cfg.model.name}", "",
             f"{'component':<14}{'parameters':>16}  trainable"]
    num_trainable = num_frozen = 0
    for name, module, trainable in rows:
        n = count_parameters(module)
        lines.append(f"{name:<14}{n:>16,}  {'yes' if trainable else 'no (frozen)'}")
        if trainable:
            num_trainable += n
        else:
            num_frozen += n
    lines += [f"{'total':<14}{num_trainable + num_frozen:>16,}",
              f"{'trainable':<14}{num_trainable:>16,}", ""]
    if cfg.model.uses_text and cfg.model.text_encoder.kind == "ldm_bert":
        # CompVis (x-transformers) and diffusers' LDMBertModel also build a vocab-size logits head that
        # the diffusion model never uses; we do not build it.
        head = cfg.model.text_encoder.width * cfg.model.text_encoder.vocab_size + cfg.model.text_encoder.vocab_size
        lines += [f"not built: the text transformer's unused logits head ({head:,} parameters in "
                  f"CompVis/diffusers).", ""]

    p, g, k = bytes_per_parameter(cfg.precision)
    frozen_bytes = num_frozen * (4 if cfg.precision == "fp32" else 2)
    lines += [f"model-state memory per GPU, world_size={cfg.world_size}, precision={cfg.precision} "
              f"(ZeRO paper: {p}+{g}+{k} bytes per trainable parameter; frozen parts held whole in "
              f"{'fp32' if cfg.precision == 'fp32' else cfg.precision}; activations not included)",
              f"{'stage':<7}{'params':>14}{'grads':>14}{'optimizer':>14}{'frozen':>14}{'total':>14}"]
    for stage in STAGES:
        m = zero_model_state_bytes(num_trainable, cfg.world_size, stage, cfg.precision)
        lines.append(f"{stage:<7}{_gib(m.params):>14}{_gib(m.grads):>14}{_gib(m.optimizer):>14}"
                     f"{_gib(frozen_bytes):>14}{_gib(m.total + frozen_bytes):>14}")
    return "\n".join(lines + [""] + render_flops(cfg))


def render_flops(cfg: PlanConfig) -> list[str]:
    """Training FLOPs per image by component and the images/s per GPU at ``cfg.mfu``."""
    m = cfg.model
    flops = diffusion_training_flops(m.unet, m.text_encoder if m.uses_text else None, m.autoencoder, cfg.image_size,
                                     cached_latents=cfg.cached_latents, cached_text=cfg.cached_text,
                                     checkpointing=cfg.activation_checkpointing)
    h, w = m.latent_shape(cfg.image_size)[1:]
    lines = [f"training FLOPs per image at {cfg.image_size} px (latent {h}x{w}; matmul/conv/attention FLOPs, "
             f"{'latent cache' if cfg.cached_latents else 'images encoded each step'}, activation checkpointing "
             f"{cfg.activation_checkpointing})",
             f"{'component':<14}{'forward':>12}{'backward':>12}{'recompute':>12}{'total':>12}  (TFLOP)"]
    for name, f in (("unet", flops.unet), ("text_encoder", flops.text_encoder), ("first_stage", flops.first_stage),
                    ("total", flops.total)):
        lines.append(f"{name:<14}{f.forward / 1e12:>12.4f}{f.backward / 1e12:>12.4f}{f.recompute / 1e12:>12.4f}"
                     f"{f.hardware / 1e12:>12.4f}")
    model_flops = flops.total.model
    lines += ["", f"images/s per GPU at {cfg.mfu:.0%} MFU (model FLOPs {model_flops / 1e12:.4f} TFLOP per image; "
                  f"dense bf16 peak)"]
    for device in PLAN_DEVICES:
        peak = PEAK_TFLOPS[device]
        lines.append(f"{device:<7}{peak:>6.0f} TFLOP/s  {images_per_second(model_flops, peak, cfg.mfu):>9.1f} img/s")
    return lines


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="plan")
def main(cfg: DictConfig) -> None:
    plan = OmegaConf.to_object(cfg)  # runs every config's validation before anything is built
    print(render_plan(plan))


if __name__ == "__main__":
    hydra_command(main)
