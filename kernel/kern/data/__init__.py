"""Data: dataset configs and items, latent and text caches, prompt lines."""
