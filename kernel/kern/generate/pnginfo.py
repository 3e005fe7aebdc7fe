"""The settings a generated PNG carries, in the two forms people's tools read, and back.

- ``parameters``: AUTOMATIC1111's text (prompt, ``Negative prompt: ...``, one ``Key: value, ...`` line), read by
  A1111, Forge, Civitai, image browsers, ``sd-parsers``, ComfyUI's drop (it imports it as an A1111 image).
- ``kern``: kern's JSON, everything needed to make the image again (``kern generate --from-png``).

No ``prompt`` chunk: ComfyUI reads that name as its own JSON node graph and shows an error for anything else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from kern.errors import UsageError

KEY = "kern"  # the tEXt / iTXt key of kern's JSON
FORMAT = 1  # version of the JSON's layout, for readers of old images
GUIDANCE_NAMES = {"embedded": "embedded", "cfg": "true CFG", "none": "unused"}  # how CFG scale was used
CHUNK = 16 * 2**20


# ----------------------------------------------------------------------------- hashes


def _stamp(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _sha256(stamp: tuple[str, int, int], skip: int = 0) -> str:
    digest = hashlib.sha256()
    with open(stamp[0], "rb") as f:
        f.seek(skip)
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str | None:
    """SHA-256 of a model file, read in chunks and computed once per file and version (size, mtime) in a
    process: a run of many images, or a training run's previews, hash a multi-GB checkpoint once. None for a
    folder (a diffusers model: A1111's hash is of one file) or a file that cannot be read."""
    try:
        return _sha256(_stamp(path)) if os.path.isfile(path) else None
    except OSError:
        return None


def adapter_hash(path: str) -> str | None:
    """An adapter's hash as A1111 shows it (``Lora hashes``): its ``sshs_model_hash`` metadata, else the same
    "addnet" hash computed: SHA-256 of the file after its header (the tensor data)."""
    from kern.core.io import header_length, read_header

    try:
        _, metadata = read_header(path)
        return metadata.get("sshs_model_hash") or _sha256(_stamp(path), header_length(path))
    except Exception:  # an adapter that cannot be read failed its own checks before any image was made
        return None


def _model_name(spec: str | None, bundle: str | None) -> str | None:
    """A1111's ``Model``: the checkpoint's file name without extension; a diffusers folder's part is named by
    the folder or repo id given with --model (``org/name@rev`` -> ``name``)."""
    if spec and os.path.isfile(spec):
        return Path(spec).stem
    name = bundle or spec
    return re.split(r"[/\\]", name.rstrip("/\\").split("@")[0])[-1] if name else None


# ----------------------------------------------------------------------------- writing


def image_meta(setup: Any, arch: str, variant: Any, im: Any, layer: int | None) -> dict[str, Any]:
    """kern's JSON for one image: the run's models and settings and the image's own values (``Setup``,
    ``Variant`` and ``plan.Image`` of kern.generate); ``layer``: the frame of a layered image (0: composite)."""
    from kern import __version__

    cfg = variant.guidance_mode == "cfg"
    negative = (im.negative if im.negative is not None else variant.negative_prompt) if cfg else (im.negative or "")
    absolute = lambda p: os.path.abspath(p) if p else None  # noqa: E731  (relative to the run's folder)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": __version__,
        "arch": arch,
        "variant": variant.name,
        "model": setup.path,
        "transformer": absolute(setup.transformer),
        "transformer_sha256": file_sha256(setup.transformer) if setup.transformer else None,
        "vae": absolute(setup.vae),
        "text_encoder": absolute(setup.text_encoder),
        "dtype": setup.dtype,
        "fp8_text_encoder": setup.fp8_text_encoder,
        "adapters": [
            {"path": absolute(p), "multiplier": m, "name": Path(p).stem, "hash": adapter_hash(p)}
            for p, m in setup.weights
        ],
        "merge": setup.merge,
        "prompt": im.prompt,
        "negative_prompt": negative,
        "seed": im.seed,
        "steps": im.steps,
        "guidance": im.guidance,
        "guidance_mode": variant.guidance_mode,
        "width": im.width,
        "height": im.height,
        "references": [absolute(p) for p in im.references],
        "reference_sizes": [list(s) for s in im.reference_sizes],
        "options": dict(im.options),
        "source": im.source,
    }
    if im.caption:
        meta["auto_caption"] = im.caption  # the prompt is the text encoder's caption of the reference
    if layer is not None:
        meta["layer"] = layer  # 0: the composite (the input's reconstruction), then the layers
    return meta


def _number(value: float | int) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _quote(value: Any) -> str:
    """A1111's ``quote``: a value holding ``,`` ``:`` or a newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _plain_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def a1111_parameters(meta: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text of an image's kern JSON: the prompt, ``Negative prompt: ...`` when one was
    used, then ``Key: value`` pairs in A1111's order (Steps, Sampler, CFG scale, Seed, Size, Model hash, Model,
    VAE), kern's extras, ``Version``. ``CFG scale`` is the guidance whatever the model does with it; ``Guidance``
    says how it was used (embedded in the model, true CFG with the negative prompt, or none)."""
    adapters = meta.get("adapters") or []
    sha = meta.get("transformer_sha256")
    fields: dict[str, Any] = {
        "Steps": meta["steps"],
        "Sampler": "Euler",  # Euler steps on the flow ODE, over the architecture's own (shifted) sigma schedule
        "CFG scale": _number(meta["guidance"]),
        "Seed": meta["seed"],
        "Size": f"{meta['width']}x{meta['height']}",
        "Model hash": sha[:10] if sha else None,
        "Model": _model_name(meta.get("transformer"), meta.get("model")),
        "VAE": _model_name(meta.get("vae"), None) if meta.get("vae") and os.path.isfile(meta["vae"]) else None,
        "Guidance": GUIDANCE_NAMES.get(meta.get("guidance_mode"), meta.get("guidance_mode")),
        "Architecture": f"{meta['arch']} {meta['variant']}",
        "Lora hashes": ", ".join(f"{_plain_name(a['name'])}: {(a['hash'] or '')[:12]}" for a in adapters) or None,
        "Lora weights": ", ".join(f"{_plain_name(a['name'])}: {_number(a['multiplier'])}" for a in adapters) or None,
        "References": ", ".join(Path(p).name for p in meta.get("references") or []) or None,
        "Layers": (meta.get("options") or {}).get("layers"),
        "Layer": meta.get("layer"),
        "Auto caption": meta.get("auto_caption"),
        "Version": f"kern {meta['version']}",
    }
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    negative = (meta.get("negative_prompt") or "") if meta.get("guidance_mode") == "cfg" else ""
    text = meta["prompt"] + (f"\nNegative prompt: {negative}" if negative.strip() else "")
    return f"{text}\n{line}".strip()


def png_text(meta: Mapping[str, Any]) -> dict[str, str]:
    """The text chunks of an image: ``parameters`` (A1111) and ``kern`` (JSON)."""
    return {"parameters": a1111_parameters(meta), KEY: json.dumps(meta, ensure_ascii=False)}


# ----------------------------------------------------------------------------- reading back


def read_meta(path: str | os.PathLike, option: str = "--from-png") -> dict[str, Any]:
    """The kern JSON of an image kern made; ``UsageError`` naming the file when it has none or cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            text = dict(getattr(picture, "text", None) or {})
    except Exception as exc:  # Pillow raises many kinds (OSError, SyntaxError, ValueError ...)
        raise UsageError(f"{option} {path}: cannot read it as an image ({type(exc).__name__}: {exc})") from None
    if KEY not in text:
        raise UsageError(
            f"{option} {path}: the image has no kern metadata (a '{KEY}' text chunk); only PNGs made by kern "
            "generate can be made again"
        )
    try:
        meta = json.loads(text[KEY])
    except json.JSONDecodeError:
        meta = None
    missing = [
        k
        for k in ("arch", "variant", "prompt", "seed", "steps", "guidance", "width", "height")
        if not isinstance(meta, dict) or k not in meta
    ]
    if missing:
        raise UsageError(f"{option} {path}: its '{KEY}' metadata is not kern's JSON (missing {', '.join(missing)})")
    return meta


def rerun_settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Setup`` fields (and ``prompt``) that make the image of ``meta`` again. Model parts whose files are
    gone are left out; then the ``--model`` the run was given (a repo id, a folder) supplies them."""
    parts = {p: meta.get(p) for p in ("transformer", "vae", "text_encoder")}
    gone = [p for p, path in parts.items() if path and not os.path.exists(path)]
    out = {
        "arch": meta["arch"],
        "variant": meta["variant"],
        "path": meta.get("model") if gone else None,
        **{p: None if p in gone else path for p, path in parts.items()},
        "dtype": meta.get("dtype") or "bfloat16",
        "fp8_text_encoder": bool(meta.get("fp8_text_encoder")),
        "weights": [(a["path"], float(a["multiplier"])) for a in meta.get("adapters") or []],
        "merge": bool(meta.get("merge")),
        "prompt": meta["prompt"],
        "negative": meta.get("negative_prompt"),
        "seed": meta["seed"],
        "steps": meta["steps"],
        "guidance": meta["guidance"],
        "width": meta["width"],
        "height": meta["height"],
        "references": list(meta.get("references") or []),
        "layers": (meta.get("options") or {}).get("layers"),
    }
    return out
