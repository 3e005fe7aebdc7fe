"""Prompt requests expanded into the images of a generation run, every value checked before any model runs.

A :class:`Request` (a prompt line or option set) becomes one :class:`Image` per seed: the run's defaults and the
variant's filled in, wildcards expanded, reference images read and sized, sizes / steps / guidance / layers in
range. Every error names the prompt's source.
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs
import torch

from kern.data.prompts import MAX_SEED, MAX_SIDE, Request, Wildcards, check_value, expand_request
from kern.errors import UsageError
from kern.records import Architecture, Variant


@attrs.define
class Image:
    """One image to make: a request expanded for one seed."""

    prompt: str
    negative: str | None
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    source: str
    index: int  # position in the run, for file names
    references: tuple[str, ...] = ()
    reference_sizes: tuple[tuple[int, int], ...] = ()  # (W, H) each reference is encoded at
    options: dict[str, Any] = attrs.Factory(dict)  # architecture options of the denoising calls, e.g. layers
    caption: str | None = None  # language of the automatic caption that replaced an empty prompt
    latents: torch.Tensor | None = None


class Planner:
    """Expands requests into images for one architecture variant. ``counter`` is the number of images planned so
    far in the run: it numbers them and, for requests without a seed, offsets the run's seed (so every image of a
    run, interactive ones too, gets its own seed)."""

    def __init__(self, setup: Any, arch: Architecture, variant: Variant, hook: Any, wildcards: Wildcards) -> None:
        self.setup, self.arch, self.variant, self.hook, self.wildcards = setup, arch, variant, hook, wildcards
        self.counter = 0

    def plan(self, requests: Iterable[Request]) -> list[Image]:
        """Expand requests into images: defaults filled in, one seed per image, wildcards expanded, references
        checked and sized, every number in range. Every error here names the prompt's source, before any model runs."""
        s, v = self.setup, self.variant
        images = []
        sizes_of: dict[str, tuple[int, int]] = {}  # each reference file read once per plan
        for request in requests:
            where = request.source
            count = check_value("count", first(request.count, s.count), f"{where}: --f/--count")
            base_seed = request.seed if request.seed is not None else s.seed + self.counter
            if not 0 <= base_seed or base_seed + count - 1 > MAX_SEED:
                raise UsageError(
                    f"{where}: seeds {base_seed}..{base_seed + count - 1} leave 0..{MAX_SEED} (--d/--seed);"
                    " pick a smaller seed"
                )
            references = tuple(request.extra.get("ci", ())) or tuple(s.references)
            self._check_references(references, where)
            for j in range(count):
                seed = base_seed + j
                expanded = expand_request(request, self.wildcards, seed)
                width, height = first(expanded.width, s.width), first(expanded.height, s.height)
                sizes = self._reference_sizes(references, (width or v.width, height or v.height), where, sizes_of)
                if sizes and (v.references == "required" or v.text_images) and width is None and height is None:
                    width, height = sizes[-1]  # the edit pipelines' default: the last control's size
                width, height = first(width, v.width), first(height, v.height)
                if width is None or height is None:
                    raise UsageError(
                        f"{where}: {self.arch.name} {v.name} has no default size;"
                        " give --width and --height (--w / --h on the line)"
                    )
                self._check_size(width, height, where)
                caption = s.auto_caption if not expanded.prompt.strip() and s.auto_caption else None
                if caption and not references:
                    raise UsageError(
                        f"{where}: --auto-caption-lang captions the input image, but this prompt has none; give --ref"
                    )
                layers = request.extra.get("layers", s.layers)
                if layers is not None:
                    self._check_layers(layers, width, height, where)
                images.append(
                    Image(
                        prompt=expanded.prompt,
                        negative=expanded.negative if expanded.negative is not None else s.negative,
                        width=width,
                        height=height,
                        steps=check_value("steps", first(expanded.steps, s.steps, v.steps), f"{where}: --s/--steps"),
                        guidance=check_value(
                            "guidance", first(expanded.guidance, s.guidance, v.guidance), f"{where}: --g/--guidance"
                        ),
                        seed=seed,
                        source=where,
                        index=self.counter,
                        references=references,
                        reference_sizes=tuple(sizes),
                        caption=caption,
                        options={"layers": layers} if layers is not None else {},
                    )
                )
                self.counter += 1
        return images

    def _check_size(self, width: int, height: int, where: str) -> None:
        step, name = self.arch.resolution_step, self.arch.name
        check_value("width", width, f"{where}: width (--w/--width)")
        check_value("height", height, f"{where}: height (--h/--height)")
        if width % step or height % step:  # with the minimum of 1, also: each side at least one step
            raise UsageError(f"{where}: size {width}x{height} is not a multiple of {step} for {name}")

    def _check_layers(self, layers: int, width: int, height: int, where: str) -> None:
        check_value("layers", layers, f"{where}: --layers")
        # Only a variant whose latents have frames (its plugin sizes them from the options) makes layers.
        if (
            self.hook.latent_shape(
                arch=self.arch.name, variant=self.variant.name, width=width, height=height, options={"layers": layers}
            )
            is None
        ):
            raise UsageError(
                f"{where}: --layers {layers}: {self.arch.name} {self.variant.name} does not make layers;"
                " drop --layers or pick a layered variant"
            )

    def _check_references(self, references: tuple[str, ...], source: str) -> None:
        v = self.variant
        if references and v.references == "none":
            raise UsageError(
                f"{source}: {self.arch.name} {v.name} takes no reference images; drop --ref / --ci or pick an edit variant"
            )
        if not references and v.references == "required":
            what = "the image to split into layers" if v.image_mode == "RGBA" else "its control image(s)"
            raise UsageError(
                f"{source}: {self.arch.name} {v.name} needs {what}; give --ref IMAGE (or --ci IMAGE on the prompt line)"
            )

    def _reference_sizes(
        self,
        references: tuple[str, ...],
        target: tuple[int, int],
        source: str,
        known: dict[str, tuple[int, int]] | None = None,
    ) -> list[tuple[int, int]]:
        """The (W, H) each reference is encoded at, from the files' sizes. Each file is decoded here, as the run will
        read it (EXIF orientation applied), so an unreadable or truncated image fails before any model loads."""
        if not references:
            return []
        known = {} if known is None else known
        sizes = []
        for path in references:
            if path not in known:
                known[path] = picture_size(path, source)
            sizes.append(known[path])
        step = self.arch.resolution_step
        wanted = self.hook.reference_sizes(
            arch=self.arch.name, variant=self.variant.name, sizes=sizes, target=target
        ) or [(w // step * step, h // step * step) for w, h in sizes]
        wanted = [tuple(size) for size in wanted]
        for path, size, (w, h) in zip(references, sizes, wanted):
            if not (step <= w <= MAX_SIDE and step <= h <= MAX_SIDE):
                raise UsageError(
                    f"{source}: reference image {path} ({size[0]}x{size[1]}) would be encoded at {w}x{h}; "
                    f"each side must be {step}..{MAX_SIDE}: use a larger image or a less extreme aspect ratio"
                )
        return wanted


def first(*values: Any) -> Any:
    """The first value that is not None (0 is a value: ``--s 0`` must be refused, not replaced by the default)."""
    return next((v for v in values if v is not None), None)


def picture_size(path: str, source: str) -> tuple[int, int]:
    """(W, H) of the image file ``path`` as the run will see it (EXIF rotation applied), after decoding it whole."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as pic:
            pic.load()  # a truncated or corrupt file fails here, not halfway through the run
            w, h = pic.size
            rotated = pic.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
    except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError ...)
        raise UsageError(
            f"{source}: reference image {path}: cannot read it ({type(exc).__name__}: {exc}); give an image file"
        ) from None
    return (h, w) if rotated else (w, h)


def text_shapes(text: dict[str, torch.Tensor]) -> tuple:
    """What must match for two prompts' encodings to share a batch: keys, shapes and dtypes."""
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(text.items()))


def collate_texts(texts: list[dict[str, torch.Tensor]], device: Any) -> dict[str, torch.Tensor]:
    return {k: torch.cat([t[k] for t in texts]).to(device) for k in texts[0]}
