"""Plain records that plugins hand to the kernel and the kernel hands to hooks.

Frozen attrs classes: a plugin declares what it brings with these, and the kernel never
needs to import a plugin's own types.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

OPTION_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


@attrs.frozen
class Option:
    """One named option of a network type or an architecture (``rank``, ``alpha``, ``ref_images`` ...).

    Numbers are checked when a job is read: floats must be finite, and ``minimum`` / ``maximum`` (inclusive) bound
    ints and floats, so a bad value is an error naming the option before any work, never a silent default.
    """

    name: str
    type: str = attrs.field(validator=attrs.validators.in_(tuple(OPTION_TYPES) + ("list",)))
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    check: Any = attrs.field(default=None, eq=False)  # optional callable(value): raises ValueError for a bad value

    def coerce(self, value: Any, where: str) -> Any:
        """Return ``value`` as this option's type; raise ``ValueError`` naming ``where`` if it is not one."""
        if value is None:
            return None
        if self.type == "list":
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where}: option {self.name!r} wants a list, got {value!r}")
            value = tuple(value)
            self._check(value, where)
            return value
        py = OPTION_TYPES[self.type]
        if py is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                out = value.lower() in ("1", "true", "yes", "on")
            else:
                raise ValueError(f"{where}: option {self.name!r} wants true or false, got {value!r}")
        else:
            try:
                if py is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError
                if py in (int, float) and isinstance(value, bool):
                    raise ValueError
                out = py(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: option {self.name!r} wants {self.type}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise ValueError(f"{where}: option {self.name!r} must be one of {list(self.choices)}, got {out!r}")
        if py in (int, float):
            self._check_range(out, where)
        self._check(out, where)
        return out

    def _check(self, value: Any, where: str) -> None:
        if self.check is not None:
            try:
                self.check(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: option {self.name!r}: {exc}") from None

    def _check_range(self, value: float, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: option {self.name!r} must be a finite number, got {value!r}")
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f"between {low} and {high}"
                if low is not None and high is not None
                else (f"at least {low}" if low is not None else f"at most {high}")
            )
            raise ValueError(f"{where}: option {self.name!r} must be {bounds}, got {value!r}")


def resolve_options(schema: tuple[Option, ...], given: dict[str, Any], where: str) -> dict[str, Any]:
    """Defaults of ``schema`` overlaid with ``given``; unknown names and bad values raise ``ValueError``."""
    known = {o.name: o for o in schema}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
    out = {o.name: o.default for o in schema}
    for name, value in given.items():
        out[name] = known[name].coerce(value, where)
    return out


@attrs.frozen
class TextCacheKey:
    """How one output of ``encode_text`` is named in the text cache files (``CacheLayout.text``).

    ``name``: the output's name, as ``encode_text`` returns it and ``predict_velocity`` reads it (``"ctx"``).
    ``key``: its name in the file, before the ``_<dtype>`` suffix (``"ctx_vec"``).
    ``mask``: for a variable-length output (B, L, ...), the name of the (B, L) output whose ones mark each row's
    tokens. The file then holds the row's marked tokens only, as ``varlen_<key>_<dtype>``, and no mask; loading
    right-pads a batch's rows with zeros to the longest and rebuilds the mask (int64, ones then zeros).
    """

    name: str
    key: str
    mask: str = ""


@attrs.frozen
class CacheLayout:
    """How an architecture's cache files name and shape their tensors (``Architecture.cache_layout``), so that they
    are another trainer's (musubi-tuner's) files and that trainer's files are kern's; see docs/datasets.md §4.

    ``text``: the text-encoder outputs stored under another name or without padding; an output not listed is
    stored as ``<name>_<dtype>``. A cache file that kern did not write (no kern fingerprint) is reused only when
    the layout lists the outputs: it must hold each of them. ``latent_frames``: latents are stored with a frame
    axis after the channels, (C, F, h, w) under ``latents_<F>x<h>x<w>_<dtype>``, F = 1 for an image; loading
    gives (C, h, w) again (or (F, C, h, w) for several frames).
    """

    text: tuple[TextCacheKey, ...] = ()
    latent_frames: bool = False


@attrs.frozen
class Variant:
    """One variant of an architecture (``base``, ``large``, ``edit`` ...) with its generation defaults.

    ``guidance_mode`` says how ``guidance`` is used at generation: ``"embedded"`` (fed to the model,
    one forward per step), ``"cfg"`` (true classifier-free guidance, two forwards per step) or
    ``"none"`` (distilled, guidance ignored).

    ``references`` says whether generation takes reference/control images: ``"optional"`` (a model that can
    also condition on references), ``"required"`` (an edit model needs its control images, an image-to-layers
    model the image it splits) or ``"none"``.
    ``text_images``: the text encoder reads the control images too (a vision-language encoder of an edit model),
    so the kernel passes each prompt's images to ``encode_text`` as ``options["images"]`` and keys text caches on them.
    ``image_mode`` is the pixel format the VAE takes: ``"RGB"`` or ``"RGBA"`` (layers with alpha).
    ``multiple_targets``: the variant trains on items with several target images (musubi-tuner's
    ``multiple_target`` datasets: the captioned image first, then its numbered siblings). They are cached as the
    frames of one latent, (F, C, h, w), denoised together at one timestep, and the first target is also given
    clean, as the one reference the model conditions on. Only such datasets train it, and only it trains on them.
    """

    name: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    steps: int = 50
    guidance: float = 4.0
    guidance_mode: str = attrs.field(default="embedded", validator=attrs.validators.in_(("embedded", "cfg", "none")))
    width: int = 1024
    height: int = 1024
    cache_id: str = ""  # id in cache file names; variants that share latents and text share it (musubi's f2k4b ...)
    cache_name: str = ""  # "architecture" in cache files' metadata (musubi's full name); default: cache_id
    modelspec: str = ""  # modelspec.architecture name in adapter metadata, e.g. "Toy-DiT-large"
    base_model_version: str = ""  # ss_base_model_version in adapter metadata (musubi's name); default: cache_name
    negative_prompt: str = ""  # the unconditional prompt of true CFG when the user gives none
    references: str = attrs.field(default="optional", validator=attrs.validators.in_(("none", "optional", "required")))
    text_images: bool = False
    image_mode: str = attrs.field(default="RGB", validator=attrs.validators.in_(("RGB", "RGBA")))
    multiple_targets: bool = False
    untrainable: str = ""  # why kern cannot train this variant yet ("" = it can); `kern train` refuses it at start
    musubi_version: str = ""  # musubi-tuner's --model_version for this variant (`kern import musubi`); default: name


@attrs.frozen
class Architecture:
    """What an architecture plugin brings, declared through ``register_architectures``.

    ``required_files`` names the parts (``"transformer"``, ``"vae"``, ``"text_encoder"``) whose checkpoint the
    user must give (``model.transformer`` ...); the drivers check they are set and exist before any work.

    ``default_targets`` and ``default_excludes`` are regular expressions matched with
    ``re.fullmatch`` against dotted module paths from the model root (``blocks.0.attn.qkv``);
    network plugins wrap the ``nn.Linear`` (and ``Conv2d``) modules they select.

    ``keep_high_precision``: regular expressions searched (``re.search``) in those module paths; the Linears they
    match stay in the model dtype when ``train.base_precision = "fp8"`` stores the frozen base in float8
    (typically the embedders, modulation and final layer: small, and an error there shifts every token).

    ``timestep_method`` is the training timestep method a job gets when it sets none: one of the kernel's
    (``kern.maths.timesteps.METHODS``) or one the plugin's ``sample_timesteps`` adds.
    """

    name: str
    variants: tuple[Variant, ...]
    aliases: tuple[str, ...] = ()
    description: str = ""
    default_variant: str | None = None
    resolution_step: int = 16  # image sides are multiples of this many pixels
    latent_channels: int = 16  # channels of encode_latents' output
    latent_downscale: int = 8  # pixels per latent cell of encode_latents' output
    default_targets: tuple[str, ...] = (".*",)
    default_excludes: tuple[str, ...] = ()
    keep_high_precision: tuple[str, ...] = ()
    timestep_method: str = "uniform"
    required_files: tuple[str, ...] = ()
    implementation: str = ""  # modelspec.implementation: where the reference implementation lives
    options: tuple[Option, ...] = ()
    cache_layout: CacheLayout = attrs.field(factory=CacheLayout)  # names and shapes in the cache files
    # musubi-tuner's LoRA training script for it, without ".py" (`kern import musubi`); its default --model_version is
    # default_variant's
    musubi_script: str = ""

    def variant(self, name: str | None) -> Variant:
        """The variant called ``name`` (or one of its aliases); the default one when ``name`` is None."""
        name = name or self.default_variant or self.variants[0].name
        for v in self.variants:
            if name == v.name or name in v.aliases:
                return v
        raise KeyError(
            f"architecture {self.name!r} has no variant {name!r}; variants: {[v.name for v in self.variants]}"
        )


@attrs.frozen
class NetworkType:
    """What a network (adapter) plugin brings, declared through ``register_networks``."""

    name: str
    options: tuple[Option, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""


@attrs.frozen
class TargetSpec:
    """Which modules of a model an adapter wraps: regexes fullmatched on dotted module paths.

    A module is wrapped if it matches ``targets`` and not ``exclude``, unless it also matches
    ``include`` (include overrides exclude, as in musubi-tuner).
    """

    targets: tuple[str, ...] = (".*",)
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()


@attrs.frozen
class WeightsClaim:
    """A network plugin's answer to ``detect_weights``: this file is mine, in this layout.

    ``layout`` is one of ``"kohya"`` (``lora_unet_*``), ``"peft"`` (``lora_A``/``lora_B``, maybe with a
    ``transformer.`` prefix), ``"comfyui"`` (``diffusion_model.`` prefix) or ``"lycoris"``;
    ``modules`` maps each adapted module's name as written in the file to the file's keys for it.
    """

    network_type: str
    layout: str
    modules: dict[str, tuple[str, ...]] = attrs.field(factory=dict, eq=False)
    note: str = ""


@attrs.frozen
class ModelFile:
    """An architecture plugin's answer to ``identify_model_file``: what a checkpoint is, told by its keys.

    ``arch`` and ``part`` (``"transformer"``, ``"vae"``, ``"text_encoder"``) say where it belongs; ``arch`` is
    ``None`` for a file no installed architecture uses (a plugin may name its predecessors' files so users hear
    what they gave). ``variants``: the variants it fits, when the keys tell (empty: any, or unknown). ``what``: a
    phrase for messages, e.g. ``"a 4B text encoder (ComfyUI single file)"``. ``needs``: other files the
    loader will fetch for it (repo specs, e.g. a tokenizer), resolved at start with the model files.
    """

    what: str
    arch: str | None = None
    part: str | None = None
    variants: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
