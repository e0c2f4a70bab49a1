"""The networks of latent diffusion: KL autoencoder, cross-attention UNet, text encoders."""
