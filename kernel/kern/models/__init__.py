"""Building blocks for architecture plugins: reading model files, Hugging Face folders, tiled decoding, and tiny
random models in the real formats for tests and demos."""
