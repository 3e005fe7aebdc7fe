"""FLUX.2 transformer hyper-parameters (BFL's names) and the real configurations of each variant."""

from __future__ import annotations

import attrs

__all__ = ["FLUX2_DEV", "FLUX2_KLEIN_4B", "FLUX2_KLEIN_9B", "PARAMS_BY_VARIANT", "Flux2Params", "tiny_params"]


@attrs.frozen(kw_only=True)
class Flux2Params:
    hidden_size: int
    num_heads: int
    depth: int  # double-stream blocks
    depth_single: int  # single-stream blocks
    context_in_dim: int  # 3 x the text encoder's hidden size (three stacked layers)
    guidance_embed: bool  # dev only: guidance-distilled, takes the guidance scale as an input
    mlp_ratio: float = 3.0
    in_channels: int = 128  # 32 VAE channels x 2x2 patch
    axes_dim: tuple[int, ...] = attrs.field(default=(32, 32, 32, 32), converter=tuple)  # RoPE dims of (t, h, w, l)
    theta: int = 2000
    eps: float = 1e-6

    def __attrs_post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be even and sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def diffusers_config(self) -> dict:
        """The same model as diffusers' ``Flux2Transformer2DModel(**config)`` names it (conformance tests, benchmarks)."""
        return dict(
            patch_size=1,
            in_channels=self.in_channels,
            num_layers=self.depth,
            num_single_layers=self.depth_single,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_in_dim,
            timestep_guidance_channels=256,
            mlp_ratio=self.mlp_ratio,
            axes_dims_rope=self.axes_dim,
            rope_theta=self.theta,
            eps=self.eps,
            guidance_embeds=self.guidance_embed,
        )

    @property
    def mlp_hidden(self) -> int:
        # round, not int: ratios read back from checkpoint shapes (M / D) may be a hair below the integer product
        return round(self.hidden_size * self.mlp_ratio)


FLUX2_DEV = Flux2Params(
    hidden_size=6144, num_heads=48, depth=8, depth_single=48, context_in_dim=15360, guidance_embed=True
)
FLUX2_KLEIN_9B = Flux2Params(
    hidden_size=4096, num_heads=32, depth=8, depth_single=24, context_in_dim=12288, guidance_embed=False
)
FLUX2_KLEIN_4B = Flux2Params(
    hidden_size=3072, num_heads=24, depth=5, depth_single=20, context_in_dim=7680, guidance_embed=False
)

# Base (undistilled) klein shares every shape with the distilled one; only sampling differs.
PARAMS_BY_VARIANT: dict[str, Flux2Params] = {
    "dev": FLUX2_DEV,
    "klein-9b": FLUX2_KLEIN_9B,
    "klein-4b": FLUX2_KLEIN_4B,
    "klein-base-9b": FLUX2_KLEIN_9B,
    "klein-base-4b": FLUX2_KLEIN_4B,
}


def tiny_params(guidance_embed: bool, depth: int = 2, depth_single: int = 2) -> Flux2Params:
    """A few-hundred-thousand-parameter FLUX.2 with the real token interface (128 channels, 4-axis RoPE)."""
    return Flux2Params(
        hidden_size=64,
        num_heads=2,
        depth=depth,
        depth_single=depth_single,
        context_in_dim=48,
        guidance_embed=guidance_embed,
        axes_dim=(8, 8, 8, 8),
    )
