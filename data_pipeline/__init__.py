"""Streaming LAION-style webdataset shards and the latent cache (issues 4 and 5)."""
