"""Training, sampling and planning for text-to-image latent diffusion models."""

__version__ = "0.1.0"
