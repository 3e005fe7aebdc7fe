"""The generation driver: prompts in, PNGs (with their settings in the metadata) out.

Batch mode loads each model once and never holds the text encoder and the transformer together:
encode every prompt, free the text encoder; denoise everything, free the transformer; decode and
save. Interactive mode keeps all three loaded between prompts.

Everything the user gives is checked before any model loads (``Generator.__init__`` and ``plan``), and
images are published under fresh names: nothing already in the output folder is ever replaced.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import attrs
import torch

from kern.errors import AdapterError, KernError, UsageError
from kern.log import get_logger
from kern.core.plugins import KernPluginManager, get_manager
from kern.data.prompts import MAX_SEED, MAX_SIDE, Request, Wildcards, check_value, expand_request
from kern.records import Architecture, Variant
from kern.generate.denoise import euler_denoise, seeded_noise, to_pil

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PART_OPTIONS = {"transformer": "--transformer", "vae": "--vae", "text_encoder": "--text-encoder"}
# The run's defaults, each checked with kern.data.prompts.check_value, and the option that sets it.
SETUP_NUMBERS = {"width": "--width", "height": "--height", "steps": "--steps", "guidance": "--guidance", "seed": "--seed",
                 "count": "--count", "layers": "--layers", "batch_size": "--batch-size"}
NUMBERED = re.compile(r"(\d+)_.*\.png")  # default image names, NNNNN_SEED[_layerF].png: the running index
MAX_NAME_TRIES = 10000


@attrs.define
class Setup:
    """Everything about a generation run except the prompts."""

    arch: str
    variant: str | None = None
    transformer: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    dtype: str = "bfloat16"
    device: str | None = None
    weights: list[tuple[str, float]] = attrs.Factory(list)
    merge: bool = False
    out: Path = Path("outputs")
    wildcards: str | None = None
    grid: bool = False
    batch_size: int = 1
    # defaults for what a prompt line does not set
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    count: int = 1
    negative: str | None = None
    fp8_text_encoder: bool = False
    references: list[str] = attrs.Factory(list)  # reference / control images for every prompt
    layers: int | None = None  # layered variants: output layers besides the composite (default: the plugin's)
    auto_caption: str | None = None  # "en" / "zh": prompts left empty are written by the text encoder from the image
    compile: str = "off"  # "blocks": compile the transformer's repeated blocks (kern.gpu.accel.apply_inference)
    attention: str = "auto"  # the SDPA backend on CUDA (kern.gpu.accel)


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


class Generator:
    """Holds the resolved architecture and whichever models are loaded right now."""

    def __init__(self, setup: Setup, manager: KernPluginManager | None = None) -> None:
        self.setup = setup
        self.manager = manager or get_manager()
        self.hook = self.manager.hook
        arch, variant = self.manager.resolve_arch(setup.arch)
        self.arch: Architecture = arch
        self._check_setup()
        if setup.variant:
            variant = self._variant(setup.variant).name
        if variant is None and setup.transformer:
            variant = self.hook.detect_variant(arch=arch.name, path=setup.transformer)
        self.variant: Variant = self._variant(variant)
        self.dtype = DTYPES[setup.dtype]
        self.device = _device(setup.device)
        self.wildcards = Wildcards(setup.wildcards)
        self.text_encoder = self.transformer = self.vae = None
        self._te_captions = False  # whether the loaded text encoder was loaded able to caption images
        self.counter = 0
        self._number = 0  # the next running index of a default file name (see decode_and_save)
        self._check_adapters()

    # ------------------------------------------------------------------ checks

    def _variant(self, name: str | None) -> Variant:
        try:
            return self.arch.variant(name)
        except KeyError:
            known = ", ".join(v.name for v in self.arch.variants)
            raise UsageError(f"--variant {name}: {self.arch.name} has no such variant; variants: {known}") from None

    def _check_setup(self) -> None:
        """The run's own values: numbers in range, dtype, batch size, and every model file / folder given exists."""
        s = self.setup
        if s.dtype not in DTYPES:
            raise UsageError(f"--dtype {s.dtype}: not one of {', '.join(DTYPES)}")
        for field, option in SETUP_NUMBERS.items():
            value = getattr(s, field)
            if value is not None:
                setattr(s, field, check_value(field, value, option))
        for part, option in PART_OPTIONS.items():
            path = getattr(s, part)
            if path and not os.path.exists(path):
                raise UsageError(f"{option} {path}: no such file or folder")
        if s.wildcards and not os.path.isdir(s.wildcards):
            raise UsageError(f"--wildcards {s.wildcards}: no such folder; give the folder that holds the NAME.txt files")
        for path, multiplier in s.weights:
            if not os.path.isfile(path):
                raise UsageError(f"--weights {path}: no such file")
            if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
                raise UsageError(f"--weights {path}:{multiplier}: the multiplier must be a finite number")

    def require_files(self) -> None:
        """Every model part the architecture needs is given (checked before any work, not when it is loaded)."""
        for part in self.arch.required_files:
            if not getattr(self.setup, part):
                raise UsageError(f"{self.arch.name} needs its {part.replace('_', ' ')} checkpoint: give {PART_OPTIONS.get(part, part)}")

    @contextlib.contextmanager
    def output(self) -> Iterator[Path]:
        """Check that the output folder (``--out``) exists or can be made and takes files, before any model loads;
        if the work inside fails, a folder made here that is still empty is removed again."""
        from kern.core.io import ensure_writable_dir

        made = not os.path.lexists(os.path.expanduser(self.setup.out))
        self.setup.out = ensure_writable_dir(self.setup.out, "--out")
        try:
            yield self.setup.out
        except BaseException:
            if made:
                with contextlib.suppress(OSError):
                    self.setup.out.rmdir()  # only succeeds while empty: nothing written is ever removed
            raise

    def _check_adapters(self) -> None:
        """An adapter trained for another architecture fails here, before any model loads."""
        from kern.core.io import read_header

        for path, _ in self.setup.weights:
            try:
                _, metadata = read_header(path)
            except Exception as exc:
                raise AdapterError(str(exc)) from None
            made_for = metadata.get("kern.arch") or metadata.get("modelspec.architecture", "").split("/")[0]
            if made_for and not _same_arch(made_for, self.arch):
                raise AdapterError(f"{path}: adapter made for {made_for!r}, not for {self.arch.name!r}; pick the matching --arch")

    # ------------------------------------------------------------------ models

    def _load(self, part: str, path: str | None, dtype: torch.dtype, options: dict[str, Any] | None = None) -> Any:
        model = self.hook.load_model(arch=self.arch.name, variant=self.variant.name, part=part, path=path, dtype=dtype,
                                     device=self.device, options=options or {})
        if model is None:
            raise KernError(f"no installed plugin loads the {self.arch.name} {part.replace('_', ' ')} (see `kern plugins`)")
        return model

    def load_text_encoder(self, caption: bool = False) -> None:
        """Load the text encoder; ``caption``: it will also caption images (the plugin then loads what that needs,
        e.g. an image processor, and says so if the files are missing)."""
        if self.text_encoder is not None and (self._te_captions or not caption):
            return
        self.free("text_encoder")
        options = {"fp8": self.setup.fp8_text_encoder, "caption": caption}
        self.text_encoder = self._load("text_encoder", self.setup.text_encoder, self.dtype, options)
        self._te_captions = caption

    def load_transformer(self) -> None:
        if self.transformer is not None:
            return
        model = self._load("transformer", self.setup.transformer, self.dtype)
        model.requires_grad_(False)
        model.eval()
        if self.setup.weights:
            from kern.adapters import weights

            self.network = weights.apply_adapters(model, self.setup.weights, arch=self.arch.name, merge=self.setup.merge)
        from kern.gpu import accel

        accel.apply_inference(model, self.setup.compile, self.setup.attention, self.device)  # after the adapters: traced with them
        self.transformer = model

    def load_vae(self) -> None:
        if self.vae is None:
            self.vae = self._load("vae", self.setup.vae, torch.float32)

    def free(self, *parts: str) -> None:
        for part in parts:
            setattr(self, part, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ steps

    def plan(self, requests: Iterable[Request]) -> list[Image]:
        """Expand requests into images: defaults filled in, one seed per image, wildcards expanded, references
        checked and sized, every number in range. Every error here names the prompt's source, before any model runs."""
        s, v = self.setup, self.variant
        images = []
        sizes_of: dict[str, tuple[int, int]] = {}  # each reference file read once per plan
        for request in requests:
            where = request.source
            count = check_value("count", _first(request.count, s.count), f"{where}: --f/--count")
            base_seed = request.seed if request.seed is not None else s.seed + self.counter
            if not 0 <= base_seed or base_seed + count - 1 > MAX_SEED:
                raise UsageError(f"{where}: seeds {base_seed}..{base_seed + count - 1} leave 0..{MAX_SEED} (--d/--seed);"
                                 " pick a smaller seed")
            references = tuple(request.extra.get("ci", ())) or tuple(s.references)
            self._check_references(references, where)
            for j in range(count):
                seed = base_seed + j
                expanded = expand_request(request, self.wildcards, seed)
                width, height = _first(expanded.width, s.width), _first(expanded.height, s.height)
                sizes = self._reference_sizes(references, (width or v.width, height or v.height), where, sizes_of)
                if sizes and v.references == "required" and width is None and height is None:
                    width, height = sizes[-1]  # the edit pipelines' default: the last control's size
                width, height = _first(width, v.width), _first(height, v.height)
                if width is None or height is None:
                    raise UsageError(f"{where}: {self.arch.name} {v.name} has no default size;"
                                     " give --width and --height (--w / --h on the line)")
                self._check_size(width, height, where)
                caption = s.auto_caption if not expanded.prompt.strip() and s.auto_caption else None
                if caption and not references:
                    raise UsageError(f"{where}: --auto-caption-lang captions the input image, but this prompt has none; give --ref")
                layers = request.extra.get("layers", s.layers)
                if layers is not None:
                    self._check_layers(layers, width, height, where)
                images.append(Image(
                    prompt=expanded.prompt,
                    negative=expanded.negative if expanded.negative is not None else s.negative,
                    width=width, height=height,
                    steps=check_value("steps", _first(expanded.steps, s.steps, v.steps), f"{where}: --s/--steps"),
                    guidance=check_value("guidance", _first(expanded.guidance, s.guidance, v.guidance), f"{where}: --g/--guidance"),
                    seed=seed, source=where, index=self.counter,
                    references=references, reference_sizes=tuple(sizes), caption=caption,
                    options={"layers": layers} if layers is not None else {},
                ))
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
        if self.hook.latent_shape(arch=self.arch.name, variant=self.variant.name, width=width, height=height,
                                  options={"layers": layers}) is None:
            raise UsageError(f"{where}: --layers {layers}: {self.arch.name} {self.variant.name} does not make layers;"
                             " drop --layers or pick a layered variant")

    def _check_references(self, references: tuple[str, ...], source: str) -> None:
        v = self.variant
        if references and v.references == "none":
            raise UsageError(f"{source}: {self.arch.name} {v.name} takes no reference images; drop --ref / --ci or pick an edit variant")
        if not references and v.references == "required":
            what = "the image to split into layers" if v.image_mode == "RGBA" else "its control image(s)"
            raise UsageError(f"{source}: {self.arch.name} {v.name} needs {what}; give --ref IMAGE (or --ci IMAGE on the prompt line)")

    def _reference_sizes(self, references: tuple[str, ...], target: tuple[int, int], source: str,
                         known: dict[str, tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        """The (W, H) each reference is encoded at, from the files' sizes. Each file is decoded here, as the run will
        read it (EXIF orientation applied), so an unreadable or truncated image fails before any model loads."""
        if not references:
            return []
        known = {} if known is None else known
        sizes = []
        for path in references:
            if path not in known:
                known[path] = _picture_size(path, source)
            sizes.append(known[path])
        step = self.arch.resolution_step
        wanted = self.hook.reference_sizes(arch=self.arch.name, variant=self.variant.name, sizes=sizes, target=target) or \
            [(w // step * step, h // step * step) for w, h in sizes]
        wanted = [tuple(size) for size in wanted]
        for path, size, (w, h) in zip(references, sizes, wanted):
            if not (step <= w <= MAX_SIDE and step <= h <= MAX_SIDE):
                raise UsageError(f"{source}: reference image {path} ({size[0]}x{size[1]}) would be encoded at {w}x{h}; "
                                 f"each side must be {step}..{MAX_SIDE}: use a larger image or a less extreme aspect ratio")
        return wanted

    def _text_key(self, prompt: str, im: Image) -> tuple[str, tuple[str, ...]]:
        # A variant whose text encoder reads the controls encodes each prompt once per control set.
        return (prompt, im.references if self.variant.text_images else ())

    def encode(self, images: list[Image]) -> dict[tuple[str, tuple[str, ...]], dict[str, torch.Tensor]]:
        """Text encodings of every distinct prompt and negative prompt (with its control images, for the
        variants that read them), on the CPU. Empty prompts under ``auto_caption`` are captioned first."""
        from kern.data.datasets import open_picture

        self.load_text_encoder(caption=any(im.caption for im in images))
        self._caption(images)
        wanted = {self._text_key(im.prompt, im) for im in images}
        if self.variant.guidance_mode == "cfg":
            wanted |= {self._text_key(self._negative(im), im) for im in images}
        out = {}
        with torch.no_grad():
            for key in sorted(wanted):
                prompt, refs = key
                options = {"images": [[open_picture(p) for p in refs]]} if self.variant.text_images else {}
                enc = self.hook.encode_text(arch=self.arch.name, variant=self.variant.name, encoder=self.text_encoder, prompts=[prompt], options=options)
                out[key] = {k: v.detach().cpu() for k, v in enc.items()}
        return out

    def _caption(self, images: list[Image]) -> None:
        """Replace each empty prompt marked for automatic captioning by the text encoder's caption of its
        (first) input image, sized as the model will see it."""
        from kern.data.datasets import open_picture

        done: dict[tuple, str] = {}
        for im in images:
            if not im.caption:
                continue
            key = (im.references[0], im.reference_sizes[0], im.caption)
            if key not in done:
                picture = open_picture(im.references[0], self.variant.image_mode).resize(im.reference_sizes[0], resample=3)  # Lanczos
                text = self.hook.caption_image(arch=self.arch.name, variant=self.variant.name, encoder=self.text_encoder,
                                               image=picture, language=im.caption)
                if text is None:
                    raise UsageError(f"{im.source}: {self.arch.name} cannot caption images; write the prompt (drop --auto-caption-lang)")
                done[key] = text
                log.info("caption", image=im.references[0], caption=text)
            im.prompt = done[key]

    def encode_references(self, images: list[Image]) -> dict[tuple, list[torch.Tensor]]:
        """Latents of every distinct set of reference images at its sizes (loaded, resized, encoded)."""
        sets = {(im.references, im.reference_sizes) for im in images if im.references}
        if not sets:
            return {}
        from kern.data.datasets import load_image

        self.load_vae()
        out = {}
        for refs, sizes in sorted(sets):
            latents = []
            with torch.no_grad():
                for path, size in zip(refs, sizes):
                    pixels = load_image(path, size, mode=self.variant.image_mode)[None].to(self.device)
                    latents.append(self.hook.encode_latents(arch=self.arch.name, variant=self.variant.name, vae=self.vae, images=pixels).cpu())
            out[(refs, sizes)] = latents
        return out

    def _batch_key(self, im: Image, texts: dict[tuple, dict[str, torch.Tensor]]) -> tuple:
        """Images with equal keys can be denoised in one batch: same size, steps, guidance, references and options,
        and text tensors of the same shapes for the prompt and (true CFG) the negative prompt alike."""
        negative = _shapes(texts[self._text_key(self._negative(im), im)]) if self.variant.guidance_mode == "cfg" else ()
        return (im.width, im.height, im.steps, im.guidance, (im.references, im.reference_sizes), tuple(sorted(im.options.items())),
                _shapes(texts[self._text_key(im.prompt, im)]), negative)

    def denoise(self, images: list[Image], texts: dict[tuple, dict[str, torch.Tensor]], on_image: Callable[[Image], None] | None = None,
                references: dict[tuple, list[torch.Tensor]] | None = None) -> None:
        references = references or {}
        self.load_transformer()
        groups: dict[tuple, list[Image]] = {}
        for im in images:
            groups.setdefault(self._batch_key(im, texts), []).append(im)
        size = max(1, self.setup.batch_size)
        for (width, height, steps, guidance, refs, options, *_), members in groups.items():
            options = dict(options)
            shape = self.hook.latent_shape(arch=self.arch.name, variant=self.variant.name, width=width, height=height, options=options) or \
                (self.arch.latent_channels, height // self.arch.latent_downscale, width // self.arch.latent_downscale)
            for start in range(0, len(members), size):
                batch = members[start : start + size]
                noise = seeded_noise([im.seed for im in batch], tuple(shape))
                text = _collate([texts[self._text_key(im.prompt, im)] for im in batch], self.device)
                negative = _collate([texts[self._text_key(self._negative(im), im)] for im in batch], self.device) \
                    if self.variant.guidance_mode == "cfg" else None
                ref_latents = [r.expand(len(batch), *r.shape[1:]).to(self.device) for r in references[refs]] if refs[0] else None
                latents = euler_denoise(self.hook, self.arch.name, self.variant, self.transformer, text, noise, steps, guidance,
                                        negative_text=negative, references=ref_latents, device=self.device, dtype=self.dtype,
                                        options=options, on_step=_progress(batch, steps))
                for im, lat in zip(batch, latents.cpu()):
                    im.latents = lat
                    if on_image:
                        on_image(im)

    def _negative(self, im: Image) -> str:
        return im.negative if im.negative is not None else self.variant.negative_prompt

    def decode_and_save(self, images: list[Image], name: Callable[[Image, int | None], str] | None = None) -> list[Path]:
        """Decode and save every image; a layered latent gives one PNG per frame (``_layer0`` the composite).

        ``name(image, layer)`` gives the file name without ``.png``; by default ``NNNNN_SEED[_layerF]``, where the
        running index NNNNN starts after the highest index already in the folder. No existing file is replaced: a
        name that is taken gets ``-1``, ``-2`` ... appended (see ``publish``)."""
        self.load_vae()
        self.setup.out.mkdir(parents=True, exist_ok=True)
        if name is None:
            self._number = max(self._number, next_index(self.setup.out))
        paths = []
        with torch.no_grad():
            for im in images:
                pixels = self.hook.decode_latents(arch=self.arch.name, variant=self.variant.name, vae=self.vae,
                                                  latents=im.latents[None].to(self.device))
                if pixels.shape[-2:] != (im.height, im.width):
                    raise KernError(f"{im.source}: decoded {tuple(pixels.shape[-2:])}, expected {(im.height, im.width)}")
                number = self._number
                self._number += 1
                stem = (lambda layer: name(im, layer)) if name else \
                    (lambda layer: f"{number:05d}_{im.seed}" + (f"_layer{layer}" if layer is not None else ""))
                if pixels.ndim == 5:
                    paths.extend(self._save(picture, im, f, stem(f)) for f, picture in enumerate(to_pil(pixels[0])))
                else:
                    paths.append(self._save(to_pil(pixels)[0], im, None, stem(None)))
        return paths

    def _save(self, picture: Any, im: Image, layer: int | None, stem: str) -> Path:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        meta = {
            "prompt": im.prompt, "negative_prompt": self._negative(im) if self.variant.guidance_mode == "cfg" else (im.negative or ""),
            "seed": im.seed, "steps": im.steps,
            "guidance": im.guidance, "width": im.width, "height": im.height, "model": f"{self.arch.name}/{self.variant.name}",
            "transformer": self.setup.transformer or "", "adapters": [f"{p}:{m}" for p, m in self.setup.weights],
            "references": list(im.references),
            "source": im.source,
        }
        if im.caption:
            meta["auto_caption"] = im.caption
        if layer is not None:
            meta["layer"] = layer  # 0: the composite (the input's reconstruction), then the layers
        meta.update({k: v for k, v in im.options.items() if k not in meta})
        for key, value in meta.items():
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        info.add_text("parameters", json.dumps(meta))
        path = publish(self.setup.out, stem, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info))
        log.info("image saved", path=str(path), source=im.source)
        return path


def _first(*values: Any) -> Any:
    """The first value that is not None (0 is a value: ``--s 0`` must be refused, not replaced by the default)."""
    return next((v for v in values if v is not None), None)


def _device(name: str | None) -> torch.device:
    """``--device`` as a torch device, checked to exist here (a typo or a missing GPU fails before any work)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: there are {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise UsageError(f"--device {name}: kern generates on cpu or cuda (or mps / xpu), not {device.type}")
    return device


def _picture_size(path: str, source: str) -> tuple[int, int]:
    """(W, H) of the image file ``path`` as the run will see it (EXIF rotation applied), after decoding it whole."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as pic:
            pic.load()  # a truncated or corrupt file fails here, not halfway through the run
            w, h = pic.size
            rotated = pic.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
    except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError ...)
        raise UsageError(f"{source}: reference image {path}: cannot read it ({type(exc).__name__}: {exc}); give an image file") from None
    return (h, w) if rotated else (w, h)


def _shapes(text: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(text.items()))


def _same_arch(made_for: str, arch: Architecture) -> bool:
    names = {arch.name, *arch.aliases, *(a for v in arch.variants for a in v.aliases)}
    norm = lambda s: s.lower().replace(".", "").replace("-", "").replace("_", "")  # noqa: E731
    made = norm(made_for)
    return any(made == norm(n) or made.startswith(norm(arch.name)) for n in names)


def _collate(texts: list[dict[str, torch.Tensor]], device: Any) -> dict[str, torch.Tensor]:
    return {k: torch.cat([t[k] for t in texts]).to(device) for k in texts[0]}


def _progress(batch: list[Image], steps: int) -> Callable[[int], None]:
    from tqdm import tqdm

    bar = tqdm(total=steps, desc=f"image {batch[0].index}" + (f"+{len(batch) - 1}" if len(batch) > 1 else ""), leave=False, dynamic_ncols=True)

    def on_step(i: int) -> None:
        bar.update(1)
        if i + 1 == steps:
            bar.close()

    return on_step


# --------------------------------------------------------------------------- files


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
    raise KernError(f"{folder}: {stem}{suffix} and {MAX_NAME_TRIES - 1} numbered variants are all taken; choose another --out")


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


@contextlib.contextmanager
def _memory_errors(what: str) -> Iterator[None]:
    """Running out of memory is a clear error with what to lower, not a traceback."""
    try:
        yield
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        raise KernError(f"out of memory {what} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        "lower --batch-size, the image size or --count, or use --fp8-text-encoder / another --device") from None


def run_batch(setup: Setup, requests: list[Request], manager: KernPluginManager | None = None) -> list[Path]:
    """Generate every request: check everything, then encode all, free the text encoder, denoise all, free the
    transformer, decode all. The VAE, the smallest part, loads first: a wrong or missing one fails in seconds."""
    gen = Generator(setup, manager)
    images = gen.plan(requests)
    if not images:
        raise UsageError("nothing to generate: no prompts")
    gen.require_files()
    log.info("generating", images=len(images), arch=gen.arch.name, variant=gen.variant.name)
    with gen.output(), _memory_errors("while generating"):
        gen.load_vae()
        texts = gen.encode(images)
        gen.free("text_encoder")
        references = gen.encode_references(images)
        gen.denoise(images, texts, references=references)
        gen.free("transformer")
        paths = gen.decode_and_save(images)
    if setup.grid and len(paths) > 1:
        paths.append(contact_sheet(paths, setup.out / "grid.png"))
    return paths


def run_interactive(setup: Setup, stream: Iterable[str | bytes], base_prompt: str | None, echo: Callable[[str], None],
                    manager: KernPluginManager | None = None) -> list[Path]:
    """A prompt loop: each line is a prompt with per-line options; models stay loaded between lines.

    The models load before the first line (a bad model file ends the session at once); after that a bad line,
    or any kern error while generating it, is reported in one line and the session goes on."""
    from kern.data.prompts import iter_interactive

    gen = Generator(setup, manager)
    gen.require_files()
    with gen.output(), _memory_errors("while loading the models"):
        gen.load_vae()
        gen.load_text_encoder(caption=bool(setup.auto_caption) and gen.variant.references != "none")
        gen.load_transformer()
    made: list[Path] = []
    echo("kern interactive: a prompt per line (options like --w 512 --d 7), 'exit' or end of input to stop")
    for item in iter_interactive(stream, base_prompt):
        if isinstance(item, UsageError):
            echo(f"error: {item}")
            continue
        try:
            with _memory_errors(f"for {item.source}"):
                images = gen.plan([item])
                texts = gen.encode(images)
                gen.denoise(images, texts, references=gen.encode_references(images))
                paths = gen.decode_and_save(images)
        except KernError as exc:  # a bad line (missing wildcard, bad size, unreadable image) must not end the session
            echo(f"error: {exc}")
            continue
        made.extend(paths)
        for p in paths:
            echo(f"saved {p}")
    return made
