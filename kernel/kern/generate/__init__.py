"""The generation driver (``driver``), its request planning (``plan``), denoising loop (``denoise``) and output
files (``outputs``)."""
