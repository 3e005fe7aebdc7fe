"""Images in every Pillow mode load as the right 8-bit RGB / RGBA values.

Each case builds its pixels in numpy, writes them with Pillow (or by hand, for 16-bit colour PNGs that Pillow
cannot write), and states the expected 8-bit RGBA from its own formula; kern's ``load_image`` / ``open_picture``
must agree within ±1 level, in RGB (transparency composited on white) and in RGBA (Qwen-Image-Layered) output.
"""

from __future__ import annotations

import colorsys
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from kern.data.dataset_config import load_dataset_config
from kern.data.images import load_image, open_picture, to_mode
from kern.data.images import probe as _probe
from kern.data.items import scan_items
from kern.errors import DatasetError
from PIL import Image

W, H = 32, 16  # multiples of the resolution step: loaded at their own size, so never resampled
rng = np.random.default_rng(1234)


def _u8(shape) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _grey_rgba(v: np.ndarray, a: np.ndarray | None = None) -> np.ndarray:
    a = np.full(v.shape, 255, np.uint8) if a is None else a
    return np.stack([v, v, v, a], -1)


def _png16(path: Path, values: np.ndarray, color_type: int, trns: bytes | None = None) -> Path:
    """A 16-bit PNG written by hand (color type 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA)."""
    h, w = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    extra = chunk(b"tRNS", trns) if trns is not None else b""
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (Pillow's 8-bit encoding: L·255/100, a and b offset by 128; D50 white) to sRGB, Bradford-adapted to D65."""
    L, a, b = lab[..., 0] / 255 * 100, lab[..., 1].astype(float) - 128, lab[..., 2].astype(float) - 128
    fy = (L + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200])
    xyz = (
        np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.96422, 1.0, 0.82521])[:, None, None]
    )
    bradford = np.array(
        [[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077], [0.0122982, -0.0204830, 1.3299098]]
    )
    to_rgb = np.array(
        [[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560], [0.0556434, -0.2040259, 1.0572252]]
    )
    lin = np.clip(np.tensordot(to_rgb @ bradford, xyz, 1), 0, 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.rint(np.moveaxis(srgb, 0, -1) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- cases: (source, expected RGBA)


def case_i16_png(tmp):  # the brief's gradient: 0 → 65535
    g = np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)
    Image.fromarray(g).save(tmp / "g.png")
    return tmp / "g.png", _grey_rgba((g >> 8).astype(np.uint8))


def case_i16_png_by_hand(tmp):
    g = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    return _png16(tmp / "g.png", g, 0), _grey_rgba((g >> 8).astype(np.uint8))


def case_i16_png_trns(tmp):  # a 16-bit grey PNG whose tRNS grey value marks transparent pixels
    g = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    g[::3, ::2] = 4660
    alpha = np.where(g == 4660, 0, 255).astype(np.uint8)
    return _png16(tmp / "g.png", g, 0, trns=struct.pack(">H", 4660)), _grey_rgba((g >> 8).astype(np.uint8), alpha)


def case_i16b_tiff(tmp):
    g = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.frombytes("I;16B", (W, H), g.astype(">u2").tobytes()).save(tmp / "g.tif")
    assert Image.open(tmp / "g.tif").mode == "I;16B"
    return tmp / "g.tif", _grey_rgba((g >> 8).astype(np.uint8))


def case_i16l_tiff(tmp):
    g = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.frombytes("I;16L", (W, H), g.astype("<u2").tobytes()).save(tmp / "g.tif")
    return tmp / "g.tif", _grey_rgba((g >> 8).astype(np.uint8))


def case_i32_tiff(tmp):  # 32-bit ints are read as 16-bit values; out of range clips
    v = rng.integers(0, 65536, (H, W)).astype(np.int32)
    v[0, :4] = (-5, 70000, 2**31 - 1, -(2**31))
    Image.fromarray(v).save(tmp / "i.tif")
    assert Image.open(tmp / "i.tif").mode == "I"
    return tmp / "i.tif", _grey_rgba((np.clip(v, 0, 65535) >> 8).astype(np.uint8))


def case_float_tiff(tmp):  # float images are 0.0 .. 1.0
    f = rng.random((H, W), dtype=np.float32)
    f[0, :5] = (np.nan, np.inf, -np.inf, 1.5, -0.25)
    Image.fromarray(f).save(tmp / "f.tif")
    assert Image.open(tmp / "f.tif").mode == "F"
    expected = np.rint(np.clip(np.nan_to_num(f.astype(np.float64), nan=0, posinf=1, neginf=0), 0, 1) * 255).astype(
        np.uint8
    )
    return tmp / "f.tif", _grey_rgba(expected)


def case_1bit(tmp):
    bits = rng.integers(0, 2, (H, W)).astype(bool)
    Image.fromarray(bits).save(tmp / "b.png")
    assert Image.open(tmp / "b.png").mode == "1"
    return tmp / "b.png", _grey_rgba(np.where(bits, 255, 0).astype(np.uint8))


def case_l(tmp):
    v = _u8((H, W))
    Image.fromarray(v, "L").save(tmp / "l.png")
    return tmp / "l.png", _grey_rgba(v)


def case_l_trns(tmp):  # an 8-bit grey PNG with a transparent grey value
    v = _u8((H, W))
    v[1::2, ::3] = 77
    Image.fromarray(v, "L").save(tmp / "l.png", transparency=77)
    return tmp / "l.png", _grey_rgba(v, np.where(v == 77, 0, 255).astype(np.uint8))


def case_la(tmp):
    v, a = _u8((H, W)), _u8((H, W))
    Image.fromarray(np.stack([v, a], -1), "LA").save(tmp / "la.png")
    return tmp / "la.png", _grey_rgba(v, a)


def case_la_16bit_png(tmp):  # 16-bit grey + alpha: Pillow keeps the high bytes
    va = rng.integers(0, 65536, (H, W, 2), dtype=np.uint16)
    return _png16(tmp / "la.png", va, 4), _grey_rgba(
        (va[..., 0] >> 8).astype(np.uint8), (va[..., 1] >> 8).astype(np.uint8)
    )


def _palette():
    return _u8((256, 3))


def case_p(tmp):
    pal, idx = _palette(), _u8((H, W))
    img = Image.fromarray(idx, "P")
    img.putpalette(pal.tobytes())
    img.save(tmp / "p.png")
    rgb = pal[idx]
    return tmp / "p.png", np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], -1)


def case_p_one_transparent_index(tmp):
    pal, idx = _palette(), _u8((H, W))
    img = Image.fromarray(idx, "P")
    img.putpalette(pal.tobytes())
    img.save(tmp / "p.png", transparency=int(idx[0, 0]))
    alpha = np.where(idx == idx[0, 0], 0, 255).astype(np.uint8)
    return tmp / "p.png", np.concatenate([pal[idx], alpha[..., None]], -1)


def case_p_alpha_per_entry(tmp):
    pal, palpha, idx = _palette(), _u8(256), _u8((H, W))
    img = Image.fromarray(idx, "P")
    img.putpalette(pal.tobytes())
    img.save(tmp / "p.png", transparency=palpha.tobytes())
    return tmp / "p.png", np.concatenate([pal[idx], palpha[idx][..., None]], -1)


def case_pa_tiff(tmp):
    pal, idx, a = _palette(), _u8((H, W)), _u8((H, W))
    img = Image.fromarray(np.stack([idx, a], -1), "LA")
    img = Image.merge("PA", img.split())
    img.putpalette(pal.tobytes())
    img.save(tmp / "pa.tif")
    assert Image.open(tmp / "pa.tif").mode == "PA"
    return tmp / "pa.tif", np.concatenate([pal[idx], a[..., None]], -1)


def case_rgb_trns(tmp):  # an RGB PNG with a transparent colour key
    rgb = _u8((H, W, 3))
    rgb[::2, ::2] = (1, 2, 3)
    Image.fromarray(rgb, "RGB").save(tmp / "rgb.png", transparency=(1, 2, 3))
    alpha = np.where((rgb == (1, 2, 3)).all(-1), 0, 255).astype(np.uint8)
    return tmp / "rgb.png", np.concatenate([rgb, alpha[..., None]], -1)


def case_rgba(tmp):
    rgba = _u8((H, W, 4))
    Image.fromarray(rgba, "RGBA").save(tmp / "rgba.png")
    return tmp / "rgba.png", rgba


def case_rgb_16bit_png(tmp):
    v = rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    return _png16(tmp / "rgb16.png", v, 2), np.concatenate(
        [(v >> 8).astype(np.uint8), np.full((H, W, 1), 255, np.uint8)], -1
    )


def case_rgba_16bit_png(tmp):
    v = rng.integers(0, 65536, (H, W, 4), dtype=np.uint16)
    return _png16(tmp / "rgba16.png", v, 6), (v >> 8).astype(np.uint8)


def _cmyk(tmp, name, **save):
    # 8x8 blocks of one colour: JPEG then stores them exactly at quality 100
    cmyk = np.repeat(np.repeat(_u8((H // 8, W // 8, 4)), 8, 0), 8, 1)
    Image.fromarray(cmyk, "CMYK").save(tmp / name, **save)
    assert Image.open(tmp / name).mode == "CMYK"
    c, m, y, k = (cmyk[..., i].astype(float) for i in range(4))
    rgb = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255
    return tmp / name, np.concatenate([np.rint(rgb).astype(np.uint8), np.full((H, W, 1), 255, np.uint8)], -1)


def case_cmyk_jpeg(tmp):
    return _cmyk(tmp, "c.jpg", quality=100, subsampling=0)


def case_cmyk_tiff(tmp):
    return _cmyk(tmp, "c.tif")


def case_ycbcr_tiff(tmp):
    ycc = _u8((H, W, 3))
    Image.fromarray(ycc, "YCbCr").save(tmp / "y.tif")
    assert Image.open(tmp / "y.tif").mode == "YCbCr"
    Y, Cb, Cr = (ycc[..., i].astype(float) for i in range(3))
    rgb = np.stack(
        [Y + 1.402 * (Cr - 128), Y - 0.344136 * (Cb - 128) - 0.714136 * (Cr - 128), Y + 1.772 * (Cb - 128)], -1
    )
    return tmp / "y.tif", np.concatenate(
        [np.clip(np.rint(rgb), 0, 255).astype(np.uint8), np.full((H, W, 1), 255, np.uint8)], -1
    )


def case_lab_tiff(tmp):
    lab = _u8((H, W, 3))
    lab[0, :3] = ((255, 128, 128), (0, 128, 128), (128, 128, 128))  # white, black, mid grey
    Image.merge("LAB", [Image.fromarray(np.ascontiguousarray(lab[..., i]), "L") for i in range(3)]).save(
        tmp / "lab.tif"
    )
    assert Image.open(tmp / "lab.tif").mode == "LAB"
    return tmp / "lab.tif", np.concatenate([_lab_to_srgb(lab), np.full((H, W, 1), 255, np.uint8)], -1)


FILE_CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


# In-memory only: no format Pillow writes keeps these modes, but a picture handed over in-process may have them.
def mem_hsv():
    hsv = _u8((H, W, 3))
    rgb = np.array([[colorsys.hsv_to_rgb(*(hsv[y, x] / 255)) for x in range(W)] for y in range(H)]) * 255
    return Image.fromarray(hsv, "HSV"), np.concatenate(
        [np.rint(rgb).astype(np.uint8), np.full((H, W, 1), 255, np.uint8)], -1
    )


def _premultiplied(channels: int):
    a = _u8((H, W))
    colour = (_u8((H, W, channels)).astype(np.uint16) * a[..., None] // 255).astype(np.uint8)  # valid: colour ≤ alpha
    straight = np.where(
        a[..., None] > 0, np.minimum(255, np.rint(colour * 255.0 / np.maximum(a[..., None], 1))), 0
    ).astype(np.uint8)
    return colour, a, straight


def mem_rgba_premultiplied():
    colour, a, straight = _premultiplied(3)
    return Image.fromarray(np.concatenate([colour, a[..., None]], -1), "RGBa"), np.concatenate(
        [straight, a[..., None]], -1
    )


def mem_la_premultiplied():
    colour, a, straight = _premultiplied(1)
    return Image.merge("La", [Image.fromarray(colour[..., 0], "L"), Image.fromarray(a, "L")]), _grey_rgba(
        straight[..., 0], a
    )


def mem_i16_native():
    g = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    return Image.frombytes("I;16N", (W, H), g.tobytes()), _grey_rgba((g >> 8).astype(np.uint8))


MEMORY_CASES = {name[4:]: fn for name, fn in globals().items() if name.startswith("mem_")}


# --------------------------------------------------------------------------- comparisons


def _on_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:].astype(float) / 255
    return np.rint(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)


def _close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1, f"{what}: {int((diff > 1).sum())} values off by more than 1 (max {diff.max()})"


def _expect(expected_rgba: np.ndarray, mode: str) -> np.ndarray:
    if mode == "RGB":
        return _on_white(expected_rgba)
    rgba = expected_rgba.copy()
    rgba[rgba[..., 3] == 0, :3] = 0  # the colour under a fully transparent pixel is arbitrary: not compared
    return rgba


def _masked(got: np.ndarray, expected_rgba: np.ndarray, mode: str) -> np.ndarray:
    if mode == "RGBA":
        got = got.copy()
        got[expected_rgba[..., 3] == 0, :3] = 0
    return got


def _pixels(tensor: torch.Tensor) -> np.ndarray:
    return ((tensor + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_every_image_mode_loads_as_its_8_bit_values(tmp_path, case, mode):
    path, expected_rgba = FILE_CASES[case](tmp_path)
    expected = _expect(expected_rgba, mode)
    assert _probe(path) == (W, H)  # scanning accepts it, with its size
    picture = open_picture(path, mode)
    assert picture.mode == mode and picture.size == (W, H)
    _close(_masked(np.asarray(picture), expected_rgba, mode), expected, f"open_picture {case} {mode}")
    tensor = load_image(path, (W, H), mode=mode)
    assert tensor.shape == (len(mode), H, W) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    _close(_masked(_pixels(tensor), expected_rgba, mode), expected, f"load_image {case} {mode}")


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_in_memory_modes_convert_to_their_8_bit_values(case, mode):
    img, expected_rgba = MEMORY_CASES[case]()
    out = to_mode(img, mode)
    assert out.mode == mode and out.size == (W, H)
    _close(_masked(np.asarray(out), expected_rgba, mode), _expect(expected_rgba, mode), f"{case} {mode}")


def test_a_16_bit_gradient_is_a_gradient_not_white(tmp_path):
    path, _ = case_i16_png(tmp_path)
    pixels = _pixels(load_image(path, (W, H)))
    white = float((pixels == 255).all(-1).mean())
    assert white < 0.01, f"{white:.1%} of a 0→65535 gradient loaded white"
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[-1, -1].tolist() == [255, 255, 255]
    assert len(np.unique(pixels[..., 0])) == 256  # every 8-bit level appears: scaled, not clipped


def test_a_16_bit_png_in_a_dataset_is_scanned_and_loaded_scaled(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    g = np.full((H, W), 32768, np.uint16)  # mid grey in 16 bits
    Image.fromarray(g).save(folder / "a.png")
    (folder / "a.txt").write_text("grey")
    cfg = tmp_path / "d.toml"
    cfg.write_text(
        f'[general]\nresolution = [{W}, {H}]\ncaption_extension = ".txt"\n[[datasets]]\nimage_directory = "images"\n'
    )
    (item,) = scan_items(load_dataset_config(cfg), 16)
    assert item.size == (W, H)
    assert set(_pixels(load_image(item.image_path, item.bucket)).ravel().tolist()) == {128}


def test_exif_rotation_applies_to_16_bit_images(tmp_path):
    g = np.linspace(0, 65535, 16 * 32).astype(np.uint16).reshape(16, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(g).save(tmp_path / "r.png", exif=exif)
    assert _probe(tmp_path / "r.png") == (16, 32)
    assert load_image(tmp_path / "r.png", (16, 32)).shape == (3, 32, 16)


def test_to_mode_refuses_other_output_modes():
    with pytest.raises(ValueError, match="'RGB' or 'RGBA'"):
        to_mode(Image.new("RGB", (4, 4)), "L")


def test_unreadable_image_is_a_dataset_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="bad.png: cannot read image"):
        open_picture(bad)
    assert "Error" in _probe(bad)
