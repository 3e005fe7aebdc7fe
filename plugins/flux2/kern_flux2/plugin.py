"""Entry point of the FLUX.2 plugin: the hook implementations kern calls for ``arch == "flux2"``."""

from __future__ import annotations

import kern

ARCH = "flux2"

# Every Linear of the double and single blocks (160 modules on dev, 112 on klein 9B, 80 on klein 4B).
# The three shared modulations, embedders and final layer live outside the blocks and stay frozen.
DEFAULT_TARGETS = (
    r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)",
    r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)",
    r"single_blocks\.\d+\.linear(1|2)",
)

VARIANTS = (
    kern.Variant(name="dev", aliases=("flux2-dev",), description="FLUX.2 [dev] 32B, guidance-distilled",
                 steps=50, guidance=4.0, guidance_mode="embedded"),
    kern.Variant(name="klein-4b", aliases=("flux2-klein-4b",), description="FLUX.2 [klein] 4B, step-distilled",
                 steps=4, guidance=1.0, guidance_mode="none"),
    kern.Variant(name="klein-9b", aliases=("flux2-klein-9b",), description="FLUX.2 [klein] 9B, step-distilled",
                 steps=4, guidance=1.0, guidance_mode="none"),
    kern.Variant(name="klein-base-4b", aliases=("flux2-klein-base-4b",), description="FLUX.2 [klein] base 4B, undistilled",
                 steps=50, guidance=4.0, guidance_mode="cfg"),
    kern.Variant(name="klein-base-9b", aliases=("flux2-klein-base-9b",), description="FLUX.2 [klein] base 9B, undistilled",
                 steps=50, guidance=4.0, guidance_mode="cfg"),
)


@kern.hookimpl
def register_architectures(register):
    register(
        kern.Architecture(
            name=ARCH,
            aliases=("flux.2", "flux-2"),
            description="FLUX.2 by Black Forest Labs: dev and klein 4B/9B, base and distilled",
            variants=VARIANTS,
            default_variant="dev",
            resolution_step=16,
            latent_channels=128,
            latent_downscale=16,  # 8x VAE, then 2x2 patchify into channels
            default_targets=DEFAULT_TARGETS,
            timestep_method="flux2_shift",
        )
    )
