"""Qwen-Image transformer hyper-parameters (diffusers' config, which is Qwen-Image's own) and the real configurations."""

from __future__ import annotations

import attrs

__all__ = ["QWEN_IMAGE", "QWEN_IMAGE_EDIT_2511", "QWEN_IMAGE_LAYERED", "QwenImageParams", "tiny_params"]


@attrs.frozen(kw_only=True)
class QwenImageParams:
    num_layers: int = 60  # double-stream blocks; there are no single-stream ones
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 16  # latent channels: proj_out emits patch_size**2 of them per token
    patch_size: int = 2
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    axes_dim: tuple[int, ...] = attrs.field(default=(16, 56, 56), converter=tuple)  # RoPE dims of (frame, h, w)
    theta: int = 10000
    eps: float = 1e-6
    mlp_ratio: float = 4.0
    zero_cond_t: bool = False  # Edit-2511: reference tokens are modulated with t = 0
    use_additional_t_cond: bool = False  # Layered: a learnt 2-entry embedding (is_rgb) added to the time embedding
    use_layer3d_rope: bool = False  # Layered: the last image (the condition) sits at frame -1

    def __attrs_post_init__(self) -> None:
        if len(self.axes_dim) != 3 or sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be three even sizes summing to head_dim {self.head_dim}")
        if self.in_channels != self.patch_size**2 * self.out_channels:
            raise ValueError(f"in_channels {self.in_channels} != patch_size**2 * out_channels {self.out_channels}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return round(self.hidden_size * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        """proj_out's width: the packed channels of one token."""
        return self.patch_size**2 * self.out_channels


QWEN_IMAGE = QwenImageParams()  # T2I (2508, 2512), Edit 2508, Edit-Plus 2509
QWEN_IMAGE_EDIT_2511 = QwenImageParams(zero_cond_t=True)
QWEN_IMAGE_LAYERED = QwenImageParams(use_additional_t_cond=True, use_layer3d_rope=True)


def tiny_params(**overrides) -> QwenImageParams:
    """A small Qwen-Image with the real token interface (64 packed channels, 3-axis RoPE); flags pass through."""
    base = {"num_layers": 2, "num_heads": 2, "head_dim": 32, "axes_dim": (8, 12, 12), "joint_attention_dim": 40}
    return QwenImageParams(**{**base, **overrides})
