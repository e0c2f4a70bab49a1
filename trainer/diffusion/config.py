"""The diffusion objective's typed config (Hydra structured config ``diffusion``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from trainer.checks import check_int, invalid
from trainer.diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES

TIMESTEP_SAMPLINGS = ("uniform",)


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    # CompVis' "linear" (linear in sqrt(beta)); diffusers calls it "scaled_linear".
    beta_schedule: str = "scaled_linear"
    # linear_start / linear_end of CompVis stable-diffusion configs/stable-diffusion/v1-inference.yaml
    # and latent-diffusion configs/latent-diffusion/txt2img-1p4B-eval.yaml.
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed".
    rescale_zero_terminal_snr: bool = False
    prediction_type: str = "eps"
    # Guttenberg 2023, "Diffusion with Offset Noise": noise += offset_noise * randn(B, C, 1, 1).
    offset_noise: float = 0.0
    # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (paper: 5.0).
    min_snr_gamma: Optional[float] = None
    # Ho & Salimans 2022, classifier-free guidance; the caption becomes "" with this probability.
    cond_drop_prob: float = 0.1
    timestep_sampling: str = "uniform"

    def __post_init__(self) -> None:
        check_int("diffusion.num_train_timesteps", self.num_train_timesteps, 2)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise invalid("diffusion.beta_schedule", self.beta_schedule, f"one of {BETA_SCHEDULES}")
        if not 0.0 < self.beta_start < 1.0:
            raise invalid("diffusion.beta_start", self.beta_start, "0 < beta_start < 1")
        if not 0.0 < self.beta_end < 1.0:
            raise invalid("diffusion.beta_end", self.beta_end, "0 < beta_end < 1")
        if self.beta_schedule != "cosine" and self.beta_start > self.beta_end:
            raise ValueError(f"diffusion.beta_start={self.beta_start!r} > diffusion.beta_end={self.beta_end!r}; "
                             f"allowed: beta_start <= beta_end")
        if self.beta_schedule == "cosine" and (self.beta_start, self.beta_end) != (0.00085, 0.012):
            warnings.warn("diffusion.beta_start / beta_end are ignored by beta_schedule='cosine'", stacklevel=2)
        if self.prediction_type not in PREDICTION_TYPES:
            raise invalid("diffusion.prediction_type", self.prediction_type, f"one of {PREDICTION_TYPES}")
        if self.rescale_zero_terminal_snr and self.prediction_type == "eps":
            # At zero terminal SNR x_T carries no signal, so x0 = (x_T - sigma eps) / alpha divides by
            # zero: Lin et al. 2024 (Sec. 3.2) switch to v prediction for this reason.
            raise ValueError("diffusion.rescale_zero_terminal_snr=True with diffusion.prediction_type='eps' "
                             "cannot recover x0 at the terminal step; allowed: prediction_type 'v' or 'x0'")
        if not self.offset_noise >= 0.0:
            raise invalid("diffusion.offset_noise", self.offset_noise, "a float >= 0")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0.0:
            raise invalid("diffusion.min_snr_gamma", self.min_snr_gamma, "null or a float > 0")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise invalid("diffusion.cond_drop_prob", self.cond_drop_prob, "a probability in [0, 1]")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise invalid("diffusion.timestep_sampling", self.timestep_sampling, f"one of {TIMESTEP_SAMPLINGS}")
