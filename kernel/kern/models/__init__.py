"""Building blocks for architecture plugins: reading model files, Hugging Face folders, tiled decoding."""
