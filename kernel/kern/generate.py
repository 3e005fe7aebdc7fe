"""The generation driver: prompts in, PNGs (with their settings in the metadata) out.

Batch mode loads each model once and never holds the text encoder and the transformer together:
encode every prompt, free the text encoder; denoise everything, free the transformer; decode and
save. Interactive mode keeps all three loaded between prompts.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs
import torch

from kern.errors import AdapterError, KernError, UsageError
from kern.log import get_logger
from kern.plugins import KernPluginManager, get_manager
from kern.prompts import Request, Wildcards, expand_request
from kern.records import Architecture, Variant
from kern.sampling import euler_denoise, seeded_noise, to_pil

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    compile: str = "off"  # "blocks": compile the transformer's repeated blocks (kern.accel.apply_inference)
    attention: str = "auto"  # the SDPA backend on CUDA (kern.accel)


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
        if setup.variant:
            variant = arch.variant(setup.variant).name
        if variant is None and setup.transformer:
            variant = self.hook.detect_variant(arch=arch.name, path=setup.transformer)
        self.variant: Variant = arch.variant(variant)
        self.dtype = DTYPES[setup.dtype]
        self.device = torch.device(setup.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.wildcards = Wildcards(setup.wildcards)
        self.text_encoder = self.transformer = self.vae = None
        self.counter = 0
        self._check_adapters()

    # ------------------------------------------------------------------ models

    def _load(self, part: str, path: str | None, dtype: torch.dtype) -> Any:
        options = {"fp8": self.setup.fp8_text_encoder} if part == "text_encoder" else {}
        model = self.hook.load_model(arch=self.arch.name, variant=self.variant.name, part=part, path=path, dtype=dtype,
                                     device=self.device, options=options)
        if model is None:
            raise KernError(f"no installed plugin loads the {self.arch.name} {part.replace('_', ' ')} (see `kern plugins`)")
        return model

    def load_text_encoder(self) -> None:
        if self.text_encoder is None:
            self.text_encoder = self._load("text_encoder", self.setup.text_encoder, self.dtype)

    def load_transformer(self) -> None:
        if self.transformer is not None:
            return
        model = self._load("transformer", self.setup.transformer, self.dtype)
        model.requires_grad_(False)
        model.eval()
        if self.setup.weights:
            from kern import weights

            self.network = weights.apply_adapters(model, self.setup.weights, arch=self.arch.name, merge=self.setup.merge)
        from kern import accel

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

    def _check_adapters(self) -> None:
        """An adapter trained for another architecture fails here, before any model loads."""
        from kern.io import read_header

        for path, _ in self.setup.weights:
            try:
                _, metadata = read_header(path)
            except Exception as exc:
                raise AdapterError(str(exc)) from None
            made_for = metadata.get("kern.arch") or metadata.get("modelspec.architecture", "").split("/")[0]
            if made_for and not _same_arch(made_for, self.arch):
                raise AdapterError(f"{path}: adapter made for {made_for!r}, not for {self.arch.name!r}; pick the matching --arch")

    # ------------------------------------------------------------------ steps

    def plan(self, requests: Iterable[Request]) -> list[Image]:
        """Expand requests into images: defaults filled in, one seed per image, wildcards expanded, references
        checked and sized. Every error here names the prompt's source, before any model runs."""
        s, v = self.setup, self.variant
        images = []
        for request in requests:
            base_seed = request.seed if request.seed is not None else s.seed + self.counter
            for j in range(request.count or s.count):
                seed = base_seed + j
                expanded = expand_request(request, self.wildcards, seed)
                references = tuple(request.extra.get("ci", ())) or tuple(s.references)
                self._check_references(references, request.source)
                width = expanded.width or s.width
                height = expanded.height or s.height
                sizes = self._reference_sizes(references, (width or v.width, height or v.height), request.source)
                if sizes and v.references == "required" and not (width or height):
                    width, height = sizes[-1]  # the edit pipelines' default: the last control's size
                width, height = width or v.width, height or v.height
                step = self.arch.resolution_step
                if width % step or height % step:
                    raise UsageError(f"{request.source}: size {width}x{height} is not a multiple of {step} for {self.arch.name}")
                caption = s.auto_caption if not expanded.prompt.strip() and s.auto_caption else None
                if caption and not references:
                    raise UsageError(f"{request.source}: --auto-caption-lang captions the input image, but this prompt has none; give --ref")
                layers = request.extra.get("layers", s.layers)
                images.append(Image(
                    prompt=expanded.prompt,
                    negative=expanded.negative if expanded.negative is not None else s.negative,
                    width=width, height=height,
                    steps=expanded.steps or s.steps or v.steps,
                    guidance=expanded.guidance if expanded.guidance is not None else (s.guidance if s.guidance is not None else v.guidance),
                    seed=seed, source=request.source, index=self.counter,
                    references=references, reference_sizes=tuple(sizes), caption=caption,
                    options={"layers": layers} if layers is not None else {},
                ))
                self.counter += 1
        return images

    def _check_references(self, references: tuple[str, ...], source: str) -> None:
        v = self.variant
        if references and v.references == "none":
            raise UsageError(f"{source}: {self.arch.name} {v.name} takes no reference images; drop --ref / --ci or pick an edit variant")
        if not references and v.references == "required":
            what = "the image to split into layers" if v.image_mode == "RGBA" else "its control image(s)"
            raise UsageError(f"{source}: {self.arch.name} {v.name} needs {what}; give --ref IMAGE (or --ci IMAGE on the prompt line)")

    def _reference_sizes(self, references: tuple[str, ...], target: tuple[int, int], source: str) -> list[tuple[int, int]]:
        """The (W, H) each reference is encoded at, from the files' sizes (read here, so a bad path fails early)."""
        if not references:
            return []
        from PIL import Image as PILImage

        sizes = []
        for path in references:
            try:
                with PILImage.open(path) as pic:
                    sizes.append(pic.size)
            except (OSError, ValueError) as exc:
                raise UsageError(f"{source}: reference image {path}: cannot read it ({exc})") from None
        step = self.arch.resolution_step
        wanted = self.hook.reference_sizes(arch=self.arch.name, variant=self.variant.name, sizes=sizes, target=target) or \
            [(w // step * step, h // step * step) for w, h in sizes]
        return [tuple(size) for size in wanted]

    def _text_key(self, prompt: str, im: Image) -> tuple[str, tuple[str, ...]]:
        # A variant whose text encoder reads the controls encodes each prompt once per control set.
        return (prompt, im.references if self.variant.text_images else ())

    def encode(self, images: list[Image]) -> dict[tuple[str, tuple[str, ...]], dict[str, torch.Tensor]]:
        """Text encodings of every distinct prompt and negative prompt (with its control images, for the
        variants that read them), on the CPU. Empty prompts under ``auto_caption`` are captioned first."""
        from kern.data import open_picture

        self.load_text_encoder()
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
        from kern.data import open_picture

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
        from kern.data import load_image

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

    def denoise(self, images: list[Image], texts: dict[tuple, dict[str, torch.Tensor]], on_image: Callable[[Image], None] | None = None,
                references: dict[tuple, list[torch.Tensor]] | None = None) -> None:
        references = references or {}
        self.load_transformer()
        # Batches: same size, steps, guidance, references and options, text tensors of the same shapes, up to batch_size.
        groups: dict[tuple, list[Image]] = {}
        for im in images:
            shapes = tuple((k, tuple(v.shape)) for k, v in texts[self._text_key(im.prompt, im)].items())
            options = tuple(sorted(im.options.items()))
            groups.setdefault((im.width, im.height, im.steps, im.guidance, shapes, (im.references, im.reference_sizes), options), []).append(im)
        for (width, height, steps, guidance, _, refs, options), members in groups.items():
            options = dict(options)
            shape = self.hook.latent_shape(arch=self.arch.name, variant=self.variant.name, width=width, height=height, options=options) or \
                (self.arch.latent_channels, height // self.arch.latent_downscale, width // self.arch.latent_downscale)
            for start in range(0, len(members), max(1, self.setup.batch_size)):
                batch = members[start : start + max(1, self.setup.batch_size)]
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
        ``name(image, layer)`` gives the file name without ``.png`` (default ``NNNNN_SEED[_layerF]``)."""
        self.load_vae()
        self.setup.out.mkdir(parents=True, exist_ok=True)
        paths = []
        with torch.no_grad():
            for im in images:
                pixels = self.hook.decode_latents(arch=self.arch.name, variant=self.variant.name, vae=self.vae,
                                                  latents=im.latents[None].to(self.device))
                if pixels.shape[-2:] != (im.height, im.width):
                    raise UsageError(f"{im.source}: decoded {tuple(pixels.shape[-2:])}, expected {(im.height, im.width)}")
                if pixels.ndim == 5:
                    paths.extend(self._save(picture, im, f, name) for f, picture in enumerate(to_pil(pixels[0])))
                else:
                    paths.append(self._save(to_pil(pixels)[0], im, None, name))
        return paths

    def _save(self, picture: Any, im: Image, layer: int | None, name: Callable[[Image, int | None], str] | None) -> Path:
        from PIL.PngImagePlugin import PngInfo

        from kern.io import atomic_path

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
        stem = name(im, layer) if name else f"{im.index:05d}_{im.seed}" + (f"_layer{layer}" if layer is not None else "")
        path = self.setup.out / f"{stem}.png"
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG", pnginfo=info)
        log.info("image saved", path=str(path), source=im.source)
        return path


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


def contact_sheet(paths: list[Path], out: Path, columns: int | None = None) -> Path:
    """All images in one grid PNG, each cell the size of the largest image."""
    from PIL import Image as PILImage

    from kern.io import atomic_path

    pictures = [PILImage.open(p).convert("RGB") for p in paths]
    columns = columns or max(1, int(len(pictures) ** 0.5 + 0.999))
    rows = (len(pictures) + columns - 1) // columns
    cw, ch = max(p.width for p in pictures), max(p.height for p in pictures)
    sheet = PILImage.new("RGB", (columns * cw, rows * ch), "white")
    for i, p in enumerate(pictures):
        sheet.paste(p, ((i % columns) * cw, (i // columns) * ch))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def run_batch(setup: Setup, requests: list[Request], manager: KernPluginManager | None = None) -> list[Path]:
    """Generate every request: encode all, free the text encoder, denoise all, free the transformer, decode all."""
    gen = Generator(setup, manager)
    images = gen.plan(requests)
    log.info("generating", images=len(images), arch=gen.arch.name, variant=gen.variant.name)
    texts = gen.encode(images)
    gen.free("text_encoder")
    references = gen.encode_references(images)
    gen.denoise(images, texts, references=references)
    gen.free("transformer")
    paths = gen.decode_and_save(images)
    if setup.grid and len(paths) > 1:
        paths.append(contact_sheet(paths, setup.out / "grid.png"))
    return paths


def run_interactive(setup: Setup, stream: Iterable[str], base_prompt: str | None, echo: Callable[[str], None],
                    manager: KernPluginManager | None = None) -> list[Path]:
    """A prompt loop: each line is a prompt with per-line options; models stay loaded between lines."""
    from kern.prompts import iter_interactive

    gen = Generator(setup, manager)
    made: list[Path] = []
    echo("kern interactive: a prompt per line (options like --w 512 --d 7), 'exit' or end of input to stop")
    for item in iter_interactive(stream, base_prompt):
        if isinstance(item, UsageError):
            echo(f"error: {item}")
            continue
        try:
            images = gen.plan([item])
            texts = gen.encode(images)
            gen.denoise(images, texts, references=gen.encode_references(images))
            paths = gen.decode_and_save(images)
        except UsageError as exc:  # a bad line (missing wildcard, bad size) must not end the session
            echo(f"error: {exc}")
            continue
        made.extend(paths)
        for p in paths:
            echo(f"saved {p}")
    return made
