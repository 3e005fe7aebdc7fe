"""The FLUX.2 autoencoder, laid out like BFL's ``ae.safetensors``, and the latent normalisation FLUX.2 trains on.

Latents are ``z = BN_eval(patchify_2x2(mean(E(x))))``: images in [-1, 1] of shape (B, 3, H, W) become
(B, 128, H/16, W/16); ``decode`` undoes the three steps in reverse order. There is no scaling or shift factor:
the normalisation lives entirely in the ``bn.running_mean`` / ``bn.running_var`` buffers of the checkpoint.

``state_dict()`` keys are exactly BFL's (attention projections are 1x1 convolutions, decoder level 0 is the
full-resolution one), so ``ae.safetensors`` loads as is; ``kern_flux2.vae_keys`` converts diffusers files.
The model can be built on the meta device and filled with ``load_state_dict(sd, assign=True)``.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from kern.models.tiling import decode_tiled, wants_tiles
from torch import nn

__all__ = [
    "FLUX2_AE",
    "AutoEncoder",
    "AutoEncoderParams",
    "tiny_ae_params",
]

GROUPS = 32  # GroupNorm groups everywhere, so every feature width must be a multiple of 32
NORM_EPS = 1e-6
PATCH = 2  # latents are patchified 2x2 after the encoder: 32 channels at H/8 -> 128 at H/16

# Tiled decoding, in latent cells (16 px each with the real model): 1024 px tiles cross-faded over 256 px.
TILE = 64
OVERLAP = 16
AUTO_TILE_ABOVE = 96 * 96  # decode(tiled=None) tiles latents with more cells than this (beyond ~1536^2 px)


def _multiples_of_groups(instance, attribute, widths) -> None:
    bad = [w for w in widths if w % GROUPS]
    if bad:
        raise ValueError(
            f"AutoEncoderParams.{attribute.name}: widths {bad} are not multiples of {GROUPS} (GroupNorm groups)"
        )


@attrs.frozen
class AutoEncoderParams:
    """Hyper-parameters of the autoencoder (BFL's names). ``decoder_channels`` overrides the decoder's per-level
    widths (diffusers' "small decoder"); ``None`` means the encoder's ``ch * ch_mult``."""

    resolution: int = 256  # informational, as in BFL: nothing depends on it
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = attrs.field(default=(1, 2, 4, 4), converter=tuple)
    num_res_blocks: int = 2
    z_channels: int = 32
    decoder_num_res_blocks: int = attrs.field(default=attrs.Factory(lambda p: p.num_res_blocks + 1, takes_self=True))
    decoder_channels: tuple[int, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    bn_eps: float = 1e-4

    def __attrs_post_init__(self) -> None:
        _multiples_of_groups(self, attrs.fields(AutoEncoderParams).ch_mult, self.encoder_widths)
        if self.decoder_channels is not None:
            _multiples_of_groups(self, attrs.fields(AutoEncoderParams).decoder_channels, self.decoder_channels)
            if len(self.decoder_channels) != len(self.ch_mult):
                raise ValueError("AutoEncoderParams.decoder_channels: needs one width per level of ch_mult")

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        return self.decoder_channels or self.encoder_widths

    @property
    def latent_channels(self) -> int:
        """Channels of the normalised, patchified latents (128 for FLUX.2)."""
        return self.z_channels * PATCH * PATCH

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side (16 for FLUX.2); image sides must be multiples of it."""
        return 2 ** (len(self.ch_mult) - 1) * PATCH


FLUX2_AE = AutoEncoderParams()


def tiny_ae_params() -> AutoEncoderParams:
    """A few-thousand-parameter autoencoder for tests: 2 levels, 1 res block, 8 latent channels (32 packed)."""
    return AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, c, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # BFL only has the 1x1 projection where the width changes; Identity keeps the key set identical.
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; projections are 1x1 convs as in the checkpoint."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, HW, C): one head spanning all channels
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric zero pad (right and bottom only): the trained weights expect this exact alignment.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``n_blocks`` res blocks, then optionally a down- or upsample (BFL attribute names)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, *, downsample: bool = False, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(n_blocks))
        # Absent resamplers are plain None attributes, so they add no keys.
        self.downsample = Downsample(c_out) if downsample else None
        self.upsample = Upsample(c_out) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Image (B, in, H, W) -> moments (B, 2*z, H/8, W/8): posterior mean then log-variance."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = p.encoder_widths
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        c_in = (p.ch,) + widths[:-1]
        last = len(widths) - 1
        self.down = nn.ModuleList(
            Level(c_in[i], widths[i], p.num_res_blocks, downsample=i < last) for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, out, 8h, 8w). ``up[0]`` is the full-resolution level, run last."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = p.decoder_widths
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, 1)
        self.conv_in = nn.Conv2d(p.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        c_in = widths[1:] + widths[-1:]  # each level takes the width of the coarser level below it
        self.up = nn.ModuleList(
            Level(c_in[i], widths[i], p.decoder_num_res_blocks, upsample=i > 0) for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], p.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LatentNorm(nn.Module):
    """FLUX.2's ``BatchNorm2d(affine=False)`` reduced to what it is used for: fixed running statistics.

    Always eval semantics (the statistics never update, also under ``train()``), computed in fp32.
    """

    def __init__(self, c: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.running_mean.float().view(1, -1, 1, 1)
        std = (self.running_var.float() + self.eps).sqrt().view(1, -1, 1, 1)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats()
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats()
        return (z.float() * std + mean).to(z.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        super()._load_from_state_dict(state_dict, prefix, *args)
        unexpected_keys = args[-2]  # (local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # A saved BatchNorm2d also carries its step counter, which eval-mode normalisation never reads.
        if prefix + "num_batches_tracked" in unexpected_keys:
            unexpected_keys.remove(prefix + "num_batches_tracked")


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams = FLUX2_AE):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.bn = LatentNorm(params.latent_channels, params.bn_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W), H and W multiples of ``params.downscale`` (16) -> normalised latents
        (B, 128, H/16, W/16) in the model's dtype. Deterministic: the posterior mean, never a sample."""
        s = self.params.downscale
        if images.ndim != 4 or images.shape[-2] % s or images.shape[-1] % s:
            raise ValueError(
                f"AutoEncoder.encode: want (B, C, H, W), H and W multiples of {s}; got {tuple(images.shape)}"
            )
        moments = self.encoder(images.to(self.dtype))
        mean = moments[:, : self.params.z_channels]  # the log-variance half is unused: FLUX.2 never samples
        return self.bn.normalize(F.pixel_unshuffle(mean, PATCH))  # channel c*4 + pi*2 + pj, as BFL's rearrange

    def decode(
        self, latents: torch.Tensor, tiled: bool | None = None, tile: int = TILE, overlap: int = OVERLAP
    ) -> torch.Tensor:
        """Normalised latents (B, 128, h, w) -> images (B, 3, 16h, 16w), nominally in [-1, 1] (not clamped).

        ``tiled=None`` decodes in tiles only when the latent has more than ``AUTO_TILE_ABOVE`` cells."""
        if wants_tiles(latents, tiled, AUTO_TILE_ABOVE):
            return self.decode_tiled(latents, tile=tile, overlap=overlap)
        z = F.pixel_shuffle(self.bn.denormalize(latents), PATCH)
        return self.decoder(z.to(self.dtype))

    @torch.no_grad()
    def decode_tiled(self, latents: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP) -> torch.Tensor:
        """Decode overlapping ``tile`` x ``tile`` latent windows and cross-fade them (``kern.models.tiling``), so activation
        memory is bounded by the tile. Not bit-equal to ``decode``: each tile normalises with its own GroupNorm
        statistics, attends only within itself in the mid block, and sees zero padding at its borders."""
        return decode_tiled(
            lambda z: self.decode(z, tiled=False),
            latents,
            self.params.downscale,
            tile,
            overlap,
            where="AutoEncoder.decode_tiled",
        ).to(self.dtype)
