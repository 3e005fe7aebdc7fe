"""What a checkpoint is, from its keys: the architecture plugins' answers (``identify_model_file``), the adapter
plugins' (``detect_weights``) and the kernel's own list of files people mistake for model parts (text encoders,
UNets and VAEs of other model families).

Used before any model loads: a file given for the wrong part or architecture is refused with a message naming
what it is and where it belongs, and each part's file in a ComfyUI ``models/`` folder is picked by its keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kern.core.io import read_header
from kern.core.repo_ids import named
from kern.errors import ConfigError, KernError
from kern.records import ModelFile

Shapes = Mapping[str, tuple[int, ...]]

# Where each part's files live in a diffusers folder or repo.
PARTS = ("transformer", "vae", "text_encoder")
PART_WORDS = {"transformer": "transformer", "vae": "VAE", "text_encoder": "text encoder"}


def read_shapes(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and metadata from the safetensors header(s) of a file or of the ``*.safetensors`` of a folder, with
    fp8 scale and marker keys left out (``kern.models.files.read_shapes``: a file in a quantisation kern cannot
    read is refused here, naming the layer). Empty when there are no safetensors or one is unreadable: such a file
    is its loader's to judge (a plugin may read other formats). Nothing but headers is read."""
    from kern.models.files import read_shapes as header_shapes

    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors")) if p.is_dir() else []
    try:
        for f in files:
            read_header(f)
    except KernError:
        return {}, {}
    return header_shapes(files) if files else ({}, {})


def _any(shapes: Shapes, pattern: str) -> str | None:
    rx = re.compile(pattern)
    return next((k for k in shapes if rx.search(k)), None)


def foreign(shapes: Shapes) -> ModelFile | None:
    """Files of other model families that users pass by mistake, told by a key each always has."""
    if key := _any(shapes, r"(^|\.)text_model\.encoder\.layers\.0\.self_attn\.q_proj\.weight$"):
        width = shapes[key][0]
        name = {768: "CLIP-L", 1280: "CLIP-G", 1024: "OpenCLIP-H"}.get(width, f"CLIP ({width} wide)")
        return ModelFile(what=f"a {name} text encoder")
    if key := _any(shapes, r"(^|\.)encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$"):
        width = shapes[key][1]
        name = {4096: "T5-XXL", 1024: "T5-Large", 768: "T5-Base"}.get(width, f"T5 ({width} wide)")
        return ModelFile(what=f"a {name} text encoder")
    if _any(shapes, r"(^|\.)input_blocks\.0\.0\.weight$"):
        xl = _any(shapes, r"(^|\.)label_emb\.0\.0\.weight$") or _any(shapes, r"^conditioner\.embedders\.1\.")
        kind = "Stable Diffusion XL" if xl else "Stable Diffusion 1.x / 2.x"
        whole = _any(shapes, r"^first_stage_model\.") or _any(shapes, r"^(cond_stage_model|conditioner)\.")
        return ModelFile(what=f"a {kind} {'checkpoint' if whole else 'UNet'}")
    if _any(shapes, r"(^|\.)joint_blocks\.0\.x_block\.attn\.qkv\.weight$"):
        return ModelFile(what="a Stable Diffusion 3 transformer")
    if (key := _any(shapes, r"^(first_stage_model\.|vae\.)?quant_conv\.weight$")) and shapes[key][0] == 8:
        return ModelFile(what="a Stable Diffusion VAE (4 latent channels)")
    return None


def identify_parts(arch: str, path: str, shapes: Shapes, transformer: Any, vae: Any, te_files: Any) -> ModelFile | None:
    """An architecture plugin's ``identify_model_file`` from its pieces: ``transformer(shapes)`` and ``vae(shapes)``
    see the keys without ComfyUI's prefixes (``model.diffusion_model.``; ``vae.``, ``first_stage_model.``), the
    text encoder comes from the plugin's ``te_files`` module (:func:`text_encoder_file`)."""
    from kern.models.files import strip_prefixes

    return (
        transformer(strip_prefixes(dict(shapes)))
        or vae(strip_prefixes(dict(shapes), ("vae.", "first_stage_model.")))
        or text_encoder_file(arch, te_files, path, shapes)
    )


def text_encoder_file(arch: str, te_files: Any, path: str, shapes: Shapes) -> ModelFile | None:
    """An architecture plugin's text-encoder answer from its ``te_files`` module: ``te_files.identify(shapes)`` (an
    object with ``kind``, ``what``, ``variants``, ``layout``, or None) and ``te_files.companion_specs(found, path,
    shapes)`` (the repo specs its loader will fetch for this file: none when a tokenizer is beside it)."""
    found = te_files.identify(shapes)
    if found is None:
        return None
    needs = tuple(te_files.companion_specs(found, Path(path), shapes))
    return ModelFile(what=found.what, arch=arch, part="text_encoder", variants=tuple(found.variants), needs=needs)


def identify(
    path: str | Path,
    hook: Any,
    shapes_and_metadata: tuple[Shapes, Mapping[str, str]] | None = None,
) -> ModelFile | None:
    """What the checkpoint at ``path`` is, or None when nobody recognises it (then its loader judges it)."""
    shapes, metadata = shapes_and_metadata or read_shapes(path)
    if not shapes:
        return None
    answers = [a for a in hook.identify_model_file(path=str(path), shapes=shapes, metadata=metadata) if a is not None]
    known = [a for a in answers if a.arch is not None]
    if known or answers:
        return (known or answers)[0]
    if (found := foreign(shapes)) is not None:
        return found
    claims = [c for c in hook.detect_weights(keys=frozenset(shapes), metadata=metadata) if c is not None]
    if claims:
        return ModelFile(what=f"a {claims[0].network_type} adapter ({claims[0].layout} layout)", part="adapter")
    return None


def mismatch(found: ModelFile, arch: str, part: str, variant: str | None) -> str | None:
    """Why ``found`` cannot be ``arch``'s ``part`` (for ``variant``), with where it belongs; None if it fits."""
    if found.arch == arch and found.part == part:
        if variant and found.variants and variant not in found.variants:
            return f"it is {found.what}, which fits {arch} {' / '.join(found.variants)}, not {variant}"
        return None
    wanted = f"the {arch} {PART_WORDS.get(part, part)}"
    if found.part == "adapter":
        return f"it is {found.what}, not {wanted}: give adapters with --weights (kern generate, kern merge)"
    if found.arch is None:
        return f"it is {found.what}, which kern does not use: this option wants {wanted}"
    where = f"model.{found.part} (--{found.part.replace('_', '-')})" if found.part in PARTS else found.part
    whose = "" if found.arch == arch else f" with --arch {found.arch}"
    return f"it is {found.what}, not {wanted}: give it as {where}{whose}"


def check_part(path: str | Path, option: str, arch: str, part: str, variant: str | None, hook: Any) -> ModelFile | None:
    """Refuse ``path`` (set by ``option``) with a ``ConfigError`` when its keys say it is not ``arch``'s ``part``.
    Returns what it was identified as (None: not recognised; its loader will judge it)."""
    found = identify(path, hook)
    why = found and mismatch(found, arch, part, variant)
    if why:
        raise ConfigError(f"{named(option, path)}: {why}")
    return found


def pick(
    candidates: list[Path], arch: str, part: str, variant: str | None, hook: Any, folder: Path, option: str
) -> Path | None:
    """The one file among ``candidates`` (a ComfyUI folder's) whose keys say it is ``arch``'s ``part``."""
    fits: list[Path] = []
    for f in candidates:
        found = identify(f, hook)
        if found is not None and mismatch(found, arch, part, variant) is None:
            fits.append(f)
    if len(fits) > 1:
        names = ", ".join(f.name for f in fits)
        raise ConfigError(
            f"{named(option, folder)}: several files fit the {arch} {PART_WORDS[part]} ({names}); "
            f"name one with model.{part}"
        )
    return fits[0] if fits else None
