"""Noise schedules, parameterisations and the training objective of latent diffusion."""

from trainer.diffusion.config import DiffusionConfig
from trainer.diffusion.objective import (GaussianDiffusion, SampleGenerators, build_diffusion, drop_conditions,
                                         drop_context, drop_labels)
from trainer.diffusion.schedule import NoiseSchedule, enforce_zero_terminal_snr, make_betas

__all__ = ["DiffusionConfig", "GaussianDiffusion", "NoiseSchedule", "SampleGenerators", "build_diffusion", "drop_conditions",
           "drop_context", "drop_labels", "enforce_zero_terminal_snr", "make_betas"]
