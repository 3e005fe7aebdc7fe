"""The Qwen-Image VAE (Wan-2.1 style, diffusers' ``AutoencoderKLQwenImage``) for single images, and the latent
normalisation Qwen-Image trains on.

Latents are ``z = (mean(E(x)) - latents_mean) / latents_std`` per channel: images in [-1, 1] of shape (B, C, H, W)
(C = 3, or 4 = RGBA for the Layered VAE) become (B, 16, H/8, W/8); ``decode`` undoes it and clamps to [-1, 1]
as diffusers does. The statistics are config values, not weights, so they live in the params.

The network is a video VAE built from causal 3-D convolutions. kern only ever feeds it one frame, and for one
frame each causal conv reduces exactly to a 2-D conv with the kernel's last temporal slice (the causal padding
puts only zero frames in front of it), the temporal down/upsamplers are skipped (diffusers' first chunk never
runs ``time_conv``) and attention is per frame. So every layer here works on (B, C, H, W) and equals diffusers on
a 1-frame input (up to float summation order), while parameters keep their 3-D shapes (5-D conv weights, 4-D
norm gains) so checkpoints load as they are. Frames of a video, or Layered's layers, are separate images.

``state_dict()`` keys are exactly diffusers' (kern's naming for Qwen-Image); ``kern_qwen_image.vae_keys`` converts
ComfyUI / original Wan files. The model can be built on the meta device and filled with
``load_state_dict(sd, assign=True)``.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from kern.models.tiling import decode_tiled, wants_tiles
from torch import nn

__all__ = [
    "QWEN_IMAGE_LAYERED_VAE",
    "QWEN_IMAGE_VAE",
    "QwenImageVAE",
    "QwenImageVAEParams",
    "tiny_vae_params",
]

# diffusers' AutoencoderKLQwenImage defaults, which are the Qwen/Qwen-Image vae/config.json values.
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Tiled decoding, in latent cells (8 px each): 1024 px tiles cross-faded over 256 px.
TILE = 128
OVERLAP = 32
AUTO_TILE_ABOVE = 192 * 192  # decode(tiled=None) tiles latents with more cells than this (beyond ~1536^2 px)


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@attrs.frozen(kw_only=True)
class QwenImageVAEParams:
    """diffusers' ``AutoencoderKLQwenImage`` config (its names, including the "temperal" spelling)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = attrs.field(default=(1, 2, 4, 4), converter=tuple)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = attrs.field(default=(), converter=_floats)  # must stay empty, see below
    temperal_downsample: tuple[bool, ...] = attrs.field(default=(False, True, True), converter=tuple)
    dropout: float = 0.0
    input_channels: int = 3  # 4 (RGBA) for the Layered VAE; the decoder emits as many
    latents_mean: tuple[float, ...] = attrs.field(default=LATENTS_MEAN, converter=_floats)
    latents_std: tuple[float, ...] = attrs.field(default=LATENTS_STD, converter=_floats)

    def __attrs_post_init__(self) -> None:
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} flags (one per downsample)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim = {self.z_dim} values each")
        if self.attn_scales:
            # Encoder attention between res blocks: no released checkpoint has it, and diffusers' encoder (like
            # Wan's) cannot run it (its frame cache passes arguments the attention block does not take).
            raise ValueError("attn_scales must be empty: attention exists only in the mid blocks")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_dim * m for m in self.dim_mult)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side (8); image sides must be multiples of it."""
        return 2 ** (len(self.dim_mult) - 1)


QWEN_IMAGE_VAE = QwenImageVAEParams()
QWEN_IMAGE_LAYERED_VAE = QwenImageVAEParams(input_channels=4)  # same statistics assumed: not stated separately


def tiny_vae_params(**overrides) -> QwenImageVAEParams:
    """A small VAE for tests with the real interface: 8x downscale, 16 latent channels, the real statistics."""
    return QwenImageVAEParams(**{"base_dim": 8, "num_res_blocks": 1, **overrides})


class CausalConv3d(nn.Conv3d):
    """A causal 3-D conv run on one frame (B, C, H, W). Causal padding puts ``kt - 1`` zero frames before the
    frame, so only the last temporal tap ever sees data: a 2-D conv with ``weight[:, :, -1]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.kernel_size[-1] // 2)


class RMSNorm(nn.Module):
    """``normalize(x) * sqrt(C) * gamma`` over channels. ``spatial_dims`` only shapes ``gamma`` as the checkpoint
    stores it (3 in the 3-D blocks, 2 in attention)."""

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32, as diffusers does for half precision.
        y = F.normalize(x.float(), dim=1).to(x.dtype)
        return y * self.scale * self.gamma.view(-1, 1, 1)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(c_in)
        self.conv1 = CausalConv3d(c_in, c_out, 3)
        self.norm2 = RMSNorm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(c_out, c_out, 3)
        self.conv_shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.conv_shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a frame; fused qkv as a 1x1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = RMSNorm(c, spatial_dims=2)
        self.to_qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, 3 * c, h * w).transpose(-1, -2)  # (B, 1, HW, 3C)
        y = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))
        return x + self.proj(y.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int, temporal: bool):
        super().__init__()
        # Asymmetric zero pad (right and bottom only), as trained; index 1 is the conv, as in the checkpoint.
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))
        # Halves time from the second frame on; a lone frame never reaches it. Kept so the weights load.
        self.time_conv = CausalConv3d(c, c, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class Upsample(nn.Module):
    """2x nearest upsample, then a conv that halves the width (the next level takes ``c // 2`` channels)."""

    def __init__(self, c: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(c, c // 2, 3, padding=1)
        )
        # Doubles time from the second frame on; the first frame is passed through as is. Kept so the weights load.
        self.time_conv = CausalConv3d(c, 2 * c, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, c: int, dropout: float):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(c)])
        self.resnets = nn.ModuleList([ResidualBlock(c, c, dropout), ResidualBlock(c, c, dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """Image (B, C, H, W) -> moments before ``quant_conv`` (B, 2*z, H/8, W/8). ``down_blocks`` is one flat list
    (the res blocks of a level, then a downsample after every level but the last), as diffusers numbers it."""

    def __init__(self, p: QwenImageVAEParams):
        super().__init__()
        widths = p.widths
        self.conv_in = CausalConv3d(p.input_channels, p.base_dim, 3)
        self.down_blocks = nn.ModuleList()
        c = p.base_dim
        for i, w in enumerate(widths):
            for _ in range(p.num_res_blocks):
                self.down_blocks.append(ResidualBlock(c, w, p.dropout))
                c = w
            if i < len(widths) - 1:
                self.down_blocks.append(Downsample(w, p.temperal_downsample[i]))
        self.mid_block = MidBlock(c, p.dropout)
        self.norm_out = RMSNorm(c)
        self.conv_out = CausalConv3d(c, 2 * p.z_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for layer in self.down_blocks:
            x = layer(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_blocks: int, dropout: float, upsample: bool | None):
        """``upsample``: None for none, else whether the checkpoint has a temporal upsampler here."""
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(c_in if j == 0 else c_out, c_out, dropout) for j in range(n_blocks))
        self.upsamplers = None if upsample is None else nn.ModuleList([Upsample(c_out, upsample)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    """Latent after ``post_quant_conv`` (B, z, h, w) -> image (B, C, 8h, 8w). ``up_blocks[0]`` is the coarsest
    level; each has ``num_res_blocks + 1`` res blocks."""

    def __init__(self, p: QwenImageVAEParams):
        super().__init__()
        widths = p.widths[::-1]
        temporal = p.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(p.z_dim, widths[0], 3)
        self.mid_block = MidBlock(widths[0], p.dropout)
        self.up_blocks = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            up = temporal[i] if i < len(widths) - 1 else None
            self.up_blocks.append(UpBlock(c, w, p.num_res_blocks + 1, p.dropout, up))
            c = w // 2 if up is not None else w  # the upsampler's conv halves the width
        self.norm_out = RMSNorm(c)
        self.conv_out = CausalConv3d(c, p.input_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class QwenImageVAE(nn.Module):
    def __init__(self, params: QwenImageVAEParams = QWEN_IMAGE_VAE):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.quant_conv = CausalConv3d(2 * params.z_dim, 2 * params.z_dim, 1)
        self.post_quant_conv = CausalConv3d(params.z_dim, params.z_dim, 1)
        self.decoder = Decoder(params)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.params.latents_mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.params.latents_std, device=device).view(1, -1, 1, 1)
        return mean, std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W), C = ``params.input_channels``, H and W multiples of 8 -> normalised
        latents (B, 16, H/8, W/8) in the model's dtype. Deterministic: the posterior mean (diffusers' "argmax")."""
        p = self.params
        s = p.downscale
        if images.ndim != 4 or images.shape[1] != p.input_channels or images.shape[-2] % s or images.shape[-1] % s:
            raise ValueError(
                f"QwenImageVAE.encode: want (B, {p.input_channels}, H, W), H and W multiples of {s}; "
                f"got {tuple(images.shape)}"
            )
        moments = self.quant_conv(self.encoder(images.to(self.dtype)))
        mean, std = self._stats(images.device)
        # As the Edit / Layered pipelines' _encode_vae_image: (z - mean) / std (img2img multiplies by 1 / std,
        # which differs in the last bit). Done in fp32; diffusers does it in the VAE's dtype.
        return ((moments[:, : p.z_dim].float() - mean) / std).to(self.dtype)

    def decode(
        self, latents: torch.Tensor, tiled: bool | None = None, tile: int = TILE, overlap: int = OVERLAP
    ) -> torch.Tensor:
        """Normalised latents (B, 16, h, w) -> images (B, C, 8h, 8w) clamped to [-1, 1] (as diffusers' decode).

        ``tiled=None`` decodes in tiles only when the latent has more than ``AUTO_TILE_ABOVE`` cells."""
        if wants_tiles(latents, tiled, AUTO_TILE_ABOVE):
            return self.decode_tiled(latents, tile=tile, overlap=overlap)
        mean, std = self._stats(latents.device)
        # The pipelines' exact steps: they hold 1 / std and divide by it.
        z = latents.float() / (1.0 / std) + mean
        image = self.decoder(self.post_quant_conv(z.to(self.dtype)))
        return image.clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode_tiled(self, latents: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
        """Decode overlapping ``tile`` x ``tile`` latent windows and cross-fade them (``kern.models.tiling``), so activation
        memory is bounded by the tile. Not bit-equal to ``decode``: the RMS norms are per pixel, but each tile's
        mid-block attention sees only that tile and its convolutions see zero padding at its borders."""
        return decode_tiled(
            lambda z: self.decode(z, tiled=False),
            latents,
            self.params.downscale,
            tile=tile,
            overlap=overlap,
            where="QwenImageVAE.decode_tiled",
        ).to(self.dtype)
