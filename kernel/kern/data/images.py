"""Images: opening a picture file whatever its Pillow mode, and loading it as a tensor at a bucket size.

``open_picture`` reads a file with its EXIF orientation applied, as 8-bit RGB (transparency on white) or RGBA;
``to_mode`` does the conversion (16-bit and float greyscale, LAB, premultiplied alpha ...). ``load_image`` scales and
crops a picture to a size, as a tensor in [-1, 1]. ``probe`` checks a file when a dataset is scanned and gives its
size. See ``docs/datasets.md`` §2.3.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without LittleCMS: LAB images are then unsupported
    ImageCms = None

from kern.errors import DatasetError

# musubi's list; AVIF and JPEG XL only where this Pillow can read them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp") + tuple(
    e for e in (".avif", ".jxl") if e in Image.registered_extensions()
)
# Pillow modes kern reads (docs/datasets.md §2.3); anything else is skipped when scanning, as unreadable.
WIDE_GREY_MODES = (
    "I;16",
    "I;16L",
    "I;16B",
    "I;16N",
    "I",
)  # 16-bit greyscale (a 16-bit PNG opens as one of these) and 32-bit ints
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
IMAGE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "F", *WIDE_GREY_MODES, *ALPHA_MODES)


def open_picture(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """``path`` as a Pillow image, EXIF orientation applied, in ``mode`` (``"RGB"`` or ``"RGBA"``), converted by
    ``to_mode``. Unreadable files raise ``DatasetError`` naming the file."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return to_mode(img, mode)
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); fix or remove it") from None


def load_image(
    path: str | os.PathLike, size: tuple[int, int], *, crop_below: int = 0, mode: str = "RGB"
) -> torch.Tensor:
    """``path`` (read by ``open_picture``) as a (3, H, W) float32 tensor in [-1, 1] at ``size`` = (W, H);
    (4, H, W) with ``mode="RGBA"``.

    The image is scaled (Lanczos) to cover ``size`` and centre-cropped. When it already covers ``size`` and exceeds it by
    less than ``crop_below`` pixels on each side, it is only cropped: resampling by 0.99 just blurs.
    """
    img = _cover_crop(open_picture(path, mode), size, crop_below)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size[1], size[0], len(mode)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def probe(path: Path) -> tuple[int, int] | str:
    """The (W, H) of ``path`` after EXIF orientation, decoding it fully so that a truncated file is caught; a str
    says why the file cannot be used (unreadable, or a mode kern does not read)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            swap = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that rotate by 90°
            if img.format == "JPEG":
                img.draft("RGB", (1, 1))  # decode at 1/8 scale: still reads all the data, far faster
            img.load()
            if img.mode not in IMAGE_MODES or (img.mode == "LAB" and ImageCms is None):
                return f"unsupported image mode {img.mode!r}; convert the image to RGB or RGBA"
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return f"{type(exc).__name__}: {exc}"
    return (h, w) if swap else (w, h)


def to_mode(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """``img`` as 8-bit ``RGB`` or ``RGBA``, whatever its Pillow mode.

    16-bit and 32-bit integer greyscale keep their high byte (``value >> 8``, values clipped to 0..65535) instead
    of Pillow's clipping at 255, which turns a 16-bit image white; float (``F``) images are taken as 0.0..1.0 (NaN
    → 0); LAB goes to sRGB through LittleCMS without its lossy 8-bit shortcut; premultiplied ``RGBa`` / ``La`` are
    un-premultiplied. RGB composites transparent pixels on white (a transparent PNG shows as on a white page, not
    the arbitrary colour hidden under alpha); RGBA keeps the alpha.
    """
    if mode not in ("RGB", "RGBA"):
        raise ValueError(f"mode must be 'RGB' or 'RGBA', got {mode!r}")
    img = _to_8_bits(img)
    if mode == "RGBA":
        return img.convert("RGBA")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _has_alpha(img: Image.Image) -> bool:
    palette_alpha = img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    return img.mode in ALPHA_MODES or "transparency" in img.info or palette_alpha


def _to_8_bits(img: Image.Image) -> Image.Image:
    """Modes whose ``convert`` would lose or garble the picture, as an equivalent 8-bit image; others unchanged."""
    import numpy as np

    if img.mode in WIDE_GREY_MODES:
        values = np.asarray(img).astype(np.int64)
        out = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
        key = img.info.get("transparency")  # a PNG tRNS grey value: those pixels are transparent
        if isinstance(key, int):
            alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
            out = Image.merge("LA", (out, alpha))
        return out
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), "L")
    if img.mode == "La":  # Pillow converts La only to LA
        return img.convert("LA")
    if img.mode == "LAB" and ImageCms is not None:
        return _lab_to_srgb().apply(img)
    return img


@functools.cache
def _lab_to_srgb() -> Any:
    # NOOPTIMIZE: LittleCMS's default 8-bit lookup table is off by up to ~36 levels on saturated colours.
    return ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB", flags=ImageCms.Flags.NOOPTIMIZE
    )


def _cover_crop(img: Image.Image, size: tuple[int, int], crop_below: int) -> Image.Image:
    W, H = size
    w, h = img.size
    small_trim = 0 <= w - W < max(crop_below, 1) and 0 <= h - H < max(crop_below, 1)
    if (w, h) != (W, H) and not small_trim:
        scale = max(W / w, H / h)
        w, h = max(W, int(w * scale + 0.5)), max(H, int(h * scale + 0.5))
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - W) // 2, (h - H) // 2
    return img.crop((left, top, left + W, top + H)) if (w, h) != (W, H) else img
