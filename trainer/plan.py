"""``python -m trainer.plan model=<preset> [world_size=N] [precision=bf16]``

Builds every component of a model preset on the meta device (no memory, no weights), prints exact
parameter counts and the model-state memory per GPU for ZeRO stages 0-3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from trainer.models.config import ModelConfig, build_components, count_parameters
from trainer.zero_memory import PRECISIONS, STAGES, bytes_per_parameter, zero_model_state_bytes
from trainer.cli import CONF_DIR, hydra_command


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    world_size: int = 1
    precision: str = "bf16"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be a positive number of GPUs")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")


ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:9.2f} GiB"


def render_plan(cfg: PlanConfig) -> str:
    parts = build_components(cfg.model, device="meta")
    rows = [("unet", parts.unet, True),
            ("text_encoder", parts.text_encoder, parts.text_encoder_trainable),
            ("first_stage", parts.first_stage, False)]
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
    if cfg.model.text_encoder.kind == "ldm_bert":
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
    return "\n".join(lines)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="plan")
def main(cfg: DictConfig) -> None:
    plan = OmegaConf.to_object(cfg)  # runs every config's validation before anything is built
    print(render_plan(plan))


if __name__ == "__main__":
    hydra_command(main)
