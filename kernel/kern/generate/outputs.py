"""The files of a generation run: PNGs published under fresh names (nothing in the output folder is ever
replaced), with the image's settings in their text chunks (``kern.generate.pnginfo``), and the contact sheet of
``--grid``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from kern.data.prompts import MAX_SIDE
from kern.errors import KernError

NUMBERED = re.compile(r"(\d+)_.*\.png")  # default image names, NNNNN_SEED[_layerF].png: the running index
MAX_NAME_TRIES = 10000


def save_png(picture: Any, folder: Path, stem: str, text: Mapping[str, str]) -> Path:
    """Publish ``picture`` as a new ``folder/STEM.png`` (see :func:`publish`) with ``text`` in its text chunks
    (tEXt, or iTXt for text Latin-1 cannot hold): ``kern.generate.pnginfo.png_text`` makes them."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return publish(folder, stem, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info))


def next_index(folder: Path) -> int:
    """One past the highest running index of the ``NNNNN_*.png`` files in ``folder`` (0 when there are none)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    return max((int(m.group(1)) + 1 for n in names if (m := NUMBERED.fullmatch(n))), default=0)


def publish(folder: Path, stem: str, write: Callable[[Path], None], suffix: str = ".png") -> Path:
    """Write a new file ``folder/STEM.png`` with ``write(temporary_path)`` and return its path, never replacing a file:
    a taken name becomes ``STEM-1.png``, ``STEM-2.png`` ... The file appears complete or not at all."""
    from kern.core.io import atomic_path

    if not stem or stem in (".", "..") or any(c in stem for c in ("/", "\\", "\x00")) or stem.startswith("."):
        raise KernError(f"output name {stem!r} is not a plain file name; it would leave {folder}")
    for n in range(MAX_NAME_TRIES):
        path = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        if os.path.lexists(path):
            continue
        try:
            with atomic_path(path, overwrite=False) as tmp:
                write(tmp)
        except FileExistsError:
            if not folder.is_dir():
                raise KernError(f"{folder}: the output folder is gone or was replaced by a file") from None
            continue  # taken meanwhile (another run writing here): the next name
        except KernError:
            raise  # kern.core.io already said what the disk or folder refused
        except OSError as exc:
            raise KernError(f"{path}: cannot write the image ({exc.strerror or exc})") from None
        return path
    raise KernError(
        f"{folder}: {stem}{suffix} and {MAX_NAME_TRIES - 1} numbered variants are all taken; choose another --out"
    )


def contact_sheet(paths: list[Path], out: Path, columns: int | None = None) -> Path:
    """All images in one grid PNG, each cell the size of the largest image (scaled so the sheet stays within
    ``MAX_SIDE`` px a side). ``out`` is the wished name; a taken one gets ``-1``, ``-2`` ... (``publish``)."""
    from PIL import Image as PILImage

    pictures = []
    for p in paths:
        with PILImage.open(p) as pic:
            pictures.append(pic.convert("RGB"))
    columns = columns or max(1, int(len(pictures) ** 0.5 + 0.999))
    rows = (len(pictures) + columns - 1) // columns
    cw, ch = max(p.width for p in pictures), max(p.height for p in pictures)
    scale = min(1.0, MAX_SIDE / (columns * cw), MAX_SIDE / (rows * ch))
    if scale < 1.0:
        cw, ch = max(1, int(cw * scale)), max(1, int(ch * scale))
        pictures = [p.resize((max(1, int(p.width * scale)), max(1, int(p.height * scale)))) for p in pictures]
    sheet = PILImage.new("RGB", (columns * cw, rows * ch), "white")
    for i, p in enumerate(pictures):
        sheet.paste(p, ((i % columns) * cw, (i // columns) * ch))
    return publish(out.parent, out.stem, lambda tmp: sheet.save(tmp, format="PNG"), suffix=out.suffix or ".png")
