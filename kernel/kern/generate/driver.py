"""The generation driver: prompts in, PNGs (with their settings in the metadata) out.

Batch mode loads each model once and never holds the text encoder and the transformer together:
encode every prompt, free the text encoder; denoise everything, free the transformer; decode and
save. Interactive mode keeps all three loaded between prompts.

Everything the user gives is checked before any model loads (``Generator.__init__``, and ``plan``: requests
expanded into images by ``kern.generate.plan``), and images are published under fresh names with their settings
(``kern.generate.outputs``): nothing already in the output folder is ever replaced.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from kern.core.plugins import KernPluginManager, get_manager
from kern.data.prompts import Request, Wildcards, check_value
from kern.errors import AdapterError, KernError, UsageError
from kern.generate import pnginfo
from kern.generate.denoise import euler_denoise, seeded_noise, to_pil
from kern.generate.outputs import contact_sheet, next_index, save_png
from kern.generate.plan import Image, Planner, collate_texts, text_shapes
from kern.generate.setup import DTYPES, PART_OPTIONS, SETUP_NUMBERS, Setup, _device, resolve_files
from kern.log import get_logger
from kern.records import Architecture, Variant

log = get_logger(__name__)


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
        resolve_files(setup, arch.name, variant, self.hook)  # paths, repo ids, bundles: local files, checked
        if variant is None and setup.transformer:
            variant = self.hook.detect_variant(arch=arch.name, path=setup.transformer)
        self.variant: Variant = self._variant(variant)
        self.dtype = DTYPES[setup.dtype]
        self.device = _device(setup.device)
        self.wildcards = Wildcards(setup.wildcards)
        self.planner = Planner(setup, arch, self.variant, self.hook, self.wildcards)
        self.text_encoder = self.transformer = self.vae = None
        self._te_captions = False  # whether the loaded text encoder was loaded able to caption images
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
        if s.wildcards and not os.path.isdir(s.wildcards):
            raise UsageError(
                f"--wildcards {s.wildcards}: no such folder; give the folder that holds the NAME.txt files"
            )
        for path, multiplier in s.weights:
            if not os.path.isfile(path):
                raise UsageError(f"--weights {path}: no such file")
            if (
                isinstance(multiplier, bool)
                or not isinstance(multiplier, (int, float))
                or not math.isfinite(multiplier)
            ):
                raise UsageError(f"--weights {path}:{multiplier}: the multiplier must be a finite number")

    def require_files(self) -> None:
        """Every model part the architecture needs is given (checked before any work, not when it is loaded)."""
        for part in self.arch.required_files:
            if not getattr(self.setup, part):
                raise UsageError(
                    f"{self.arch.name} needs its {part.replace('_', ' ')} checkpoint: give {PART_OPTIONS.get(part, part)} "
                    "(or --model with a diffusers or ComfyUI folder or a repo id holding it)"
                )

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
        from kern.adapters.network.metadata import is_for, made_for
        from kern.core.io import read_header

        for path, _ in self.setup.weights:
            try:
                _, metadata = read_header(path)
            except Exception as exc:
                raise AdapterError(str(exc)) from None
            made = made_for(metadata)
            if made and not is_for(made, self.arch):
                raise AdapterError(
                    f"{path}: adapter made for {made!r}, not for {self.arch.name!r}; pick the matching --arch"
                )

    # ------------------------------------------------------------------ models

    def _load(self, part: str, path: str | None, dtype: torch.dtype, options: dict[str, Any] | None = None) -> Any:
        model = self.hook.load_model(
            arch=self.arch.name,
            variant=self.variant.name,
            part=part,
            path=path,
            dtype=dtype,
            device=self.device,
            options=options or {},
        )
        if model is None:
            raise KernError(
                f"no installed plugin loads the {self.arch.name} {part.replace('_', ' ')} (see `kern plugins`)"
            )
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

            self.network = weights.apply_adapters(
                model, self.setup.weights, arch=self.arch.name, merge=self.setup.merge
            )
        from kern.gpu import accel

        accel.apply_inference(
            model, self.setup.compile, self.setup.attention, self.device
        )  # after the adapters: traced with them
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
        """Expand requests into images, every value checked before any model runs (``kern.generate.plan``)."""
        return self.planner.plan(requests)

    def _text_key(self, prompt: str, im: Image) -> tuple[str, tuple[str, ...]]:
        # A variant whose text encoder reads the controls encodes each prompt once per control set.
        return (prompt, im.references if self.variant.text_images else ())

    def encode(self, images: list[Image]) -> dict[tuple[str, tuple[str, ...]], dict[str, torch.Tensor]]:
        """Text encodings of every distinct prompt and negative prompt (with its control images, for the
        variants that read them), on the CPU. Empty prompts under ``auto_caption`` are captioned first."""
        from kern.data.images import open_picture

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
                enc = self.hook.encode_text(
                    arch=self.arch.name,
                    variant=self.variant.name,
                    encoder=self.text_encoder,
                    prompts=[prompt],
                    options=options,
                )
                out[key] = {k: v.detach().cpu() for k, v in enc.items()}
        return out

    def _caption(self, images: list[Image]) -> None:
        """Replace each empty prompt marked for automatic captioning by the text encoder's caption of its
        (first) input image, sized as the model will see it."""
        from kern.data.images import open_picture

        done: dict[tuple, str] = {}
        for im in images:
            if not im.caption:
                continue
            key = (im.references[0], im.reference_sizes[0], im.caption)
            if key not in done:
                picture = open_picture(im.references[0], self.variant.image_mode).resize(
                    im.reference_sizes[0], resample=3
                )  # Lanczos
                text = self.hook.caption_image(
                    arch=self.arch.name,
                    variant=self.variant.name,
                    encoder=self.text_encoder,
                    image=picture,
                    language=im.caption,
                )
                if text is None:
                    raise UsageError(
                        f"{im.source}: {self.arch.name} cannot caption images; write the prompt (drop --auto-caption-lang)"
                    )
                done[key] = text
                log.info("caption", image=im.references[0], caption=text)
            im.prompt = done[key]

    def encode_references(self, images: list[Image]) -> dict[tuple, list[torch.Tensor]]:
        """Latents of every distinct set of reference images at its sizes (loaded, resized, encoded)."""
        sets = {(im.references, im.reference_sizes) for im in images if im.references}
        if not sets:
            return {}
        from kern.data.images import load_image

        self.load_vae()
        out = {}
        for refs, sizes in sorted(sets):
            latents = []
            with torch.no_grad():
                for path, size in zip(refs, sizes):
                    pixels = load_image(path, size, mode=self.variant.image_mode)[None].to(self.device)
                    latents.append(
                        self.hook.encode_latents(
                            arch=self.arch.name, variant=self.variant.name, vae=self.vae, images=pixels
                        ).cpu()
                    )
            out[(refs, sizes)] = latents
        return out

    def _batch_key(self, im: Image, texts: dict[tuple, dict[str, torch.Tensor]]) -> tuple:
        """Images with equal keys can be denoised in one batch: same size, steps, guidance, references and options,
        and text tensors of the same shapes for the prompt and (true CFG) the negative prompt alike."""
        negative = (
            text_shapes(texts[self._text_key(self._negative(im), im)]) if self.variant.guidance_mode == "cfg" else ()
        )
        return (
            im.width,
            im.height,
            im.steps,
            im.guidance,
            (im.references, im.reference_sizes),
            tuple(sorted(im.options.items())),
            text_shapes(texts[self._text_key(im.prompt, im)]),
            negative,
        )

    def denoise(
        self,
        images: list[Image],
        texts: dict[tuple, dict[str, torch.Tensor]],
        on_image: Callable[[Image], None] | None = None,
        references: dict[tuple, list[torch.Tensor]] | None = None,
    ) -> None:
        references = references or {}
        self.load_transformer()
        groups: dict[tuple, list[Image]] = {}
        for im in images:
            groups.setdefault(self._batch_key(im, texts), []).append(im)
        size = max(1, self.setup.batch_size)
        for (width, height, steps, guidance, refs, options, *_), members in groups.items():
            options = dict(options)
            shape = self.hook.latent_shape(
                arch=self.arch.name, variant=self.variant.name, width=width, height=height, options=options
            ) or (self.arch.latent_channels, height // self.arch.latent_downscale, width // self.arch.latent_downscale)
            for start in range(0, len(members), size):
                batch = members[start : start + size]
                noise = seeded_noise([im.seed for im in batch], tuple(shape))
                text = collate_texts([texts[self._text_key(im.prompt, im)] for im in batch], self.device)
                negative = (
                    collate_texts([texts[self._text_key(self._negative(im), im)] for im in batch], self.device)
                    if self.variant.guidance_mode == "cfg"
                    else None
                )
                ref_latents = (
                    [r.expand(len(batch), *r.shape[1:]).to(self.device) for r in references[refs]] if refs[0] else None
                )
                latents = euler_denoise(
                    self.hook,
                    self.arch.name,
                    self.variant,
                    self.transformer,
                    text,
                    noise,
                    steps,
                    guidance,
                    negative_text=negative,
                    references=ref_latents,
                    device=self.device,
                    dtype=self.dtype,
                    options=options,
                    on_step=_progress(batch, steps),
                )
                for im, lat in zip(batch, latents.cpu()):
                    im.latents = lat
                    if on_image:
                        on_image(im)

    def _negative(self, im: Image) -> str:
        return im.negative if im.negative is not None else self.variant.negative_prompt

    def decode_and_save(
        self, images: list[Image], name: Callable[[Image, int | None], str] | None = None
    ) -> list[Path]:
        """Decode and save every image; a layered latent gives one PNG per frame (``_layer0`` the composite).

        ``name(image, layer)`` gives the file name without ``.png``; by default ``NNNNN_SEED[_layerF]``, where the
        running index NNNNN starts after the highest index already in the folder. No existing file is replaced: a
        name that is taken gets ``-1``, ``-2`` ... appended (see ``kern.generate.outputs.publish``)."""
        self.load_vae()
        self.setup.out.mkdir(parents=True, exist_ok=True)
        if name is None:
            self._number = max(self._number, next_index(self.setup.out))
        paths = []
        with torch.no_grad():
            for im in images:
                pixels = self.hook.decode_latents(
                    arch=self.arch.name,
                    variant=self.variant.name,
                    vae=self.vae,
                    latents=im.latents[None].to(self.device),
                )
                if pixels.shape[-2:] != (im.height, im.width):
                    raise KernError(
                        f"{im.source}: decoded {tuple(pixels.shape[-2:])}, expected {(im.height, im.width)}"
                    )
                number = self._number
                self._number += 1
                stem = (
                    (lambda layer: name(im, layer))
                    if name
                    else (lambda layer: f"{number:05d}_{im.seed}" + (f"_layer{layer}" if layer is not None else ""))
                )
                if pixels.ndim == 5:
                    paths.extend(self._save(picture, im, f, stem(f)) for f, picture in enumerate(to_pil(pixels[0])))
                else:
                    paths.append(self._save(to_pil(pixels)[0], im, None, stem(None)))
        return paths

    def _save(self, picture: Any, im: Image, layer: int | None, stem: str) -> Path:
        meta = pnginfo.image_meta(self.setup, self.arch.name, self.variant, im, layer)
        path = save_png(picture, self.setup.out, stem, pnginfo.png_text(meta))
        log.info("image saved", path=str(path), source=im.source)
        return path


def _progress(batch: list[Image], steps: int) -> Callable[[int], None]:
    from tqdm import tqdm

    bar = tqdm(
        total=steps,
        desc=f"image {batch[0].index}" + (f"+{len(batch) - 1}" if len(batch) > 1 else ""),
        leave=False,
        dynamic_ncols=True,
    )

    def on_step(i: int) -> None:
        bar.update(1)
        if i + 1 == steps:
            bar.close()

    return on_step


@contextlib.contextmanager
def _memory_errors(what: str) -> Iterator[None]:
    """Running out of memory is a clear error with what to lower, not a traceback."""
    try:
        yield
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        raise KernError(
            f"out of memory {what} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "lower --batch-size, the image size or --count, or use --fp8-text-encoder / another --device"
        ) from None


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


def run_interactive(
    setup: Setup,
    stream: Iterable[str | bytes],
    base_prompt: str | None,
    echo: Callable[[str], None],
    manager: KernPluginManager | None = None,
) -> list[Path]:
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
