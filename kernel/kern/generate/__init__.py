"""The generation driver and its denoising loop."""
