"""Samplers (pure functions sharing one signature) and classifier-free guidance."""

from trainer.sampling.samplers import (SAMPLERS, cfg_model_fn, ddim, ddpm, dpm_solver_pp_2m, get_sampler,
                                       inference_timesteps, plms)

__all__ = ["SAMPLERS", "cfg_model_fn", "ddim", "ddpm", "dpm_solver_pp_2m", "get_sampler", "inference_timesteps",
           "plms"]
