"""Where each model part comes from: resolved once, at start, before any work.

A part is named by its own option (``model.transformer``, ``model.vae``, ``model.text_encoder``) or taken from the
bundle ``model.path`` (``--model``), which names, as a local folder or a Hugging Face repo id:

* a diffusers layout: ``transformer/``, ``vae/``, ``text_encoder/`` (+ ``tokenizer/``, ``processor/``);
* a ComfyUI ``models/`` folder (or the ComfyUI folder above it): ``diffusion_models/`` (or ``unet/``),
  ``vae/``, ``text_encoders/`` (or ``clip/``) holding single files; each part's file is picked by its keys
  (``kern.models.identify``), so other models' files may sit beside it;
* a single checkpoint file: the transformer.

A part's own option overrides the bundle. Every spec goes through ``kern.models.hub.resolve`` (a local path that
exists wins over a repo id of the same spelling) and every resolved file is identified by its keys: one given
for the wrong part or architecture is refused here, naming what it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kern.core.repo_ids import named
from kern.errors import ConfigError
from kern.log import get_logger
from kern.models import hub, identify

log = get_logger(__name__)

PARTS = identify.PARTS
SIBLINGS = {"text_encoder": ("tokenizer", "processor")}  # fetched with a text encoder subfolder of a repo
COMFY_FOLDERS = {
    "transformer": ("diffusion_models", "unet", "checkpoints"),
    "vae": ("vae",),
    "text_encoder": ("text_encoders", "clip"),
}


def resolve_parts(
    given: Mapping[str, str | None],
    bundle: str | None,
    needed: Iterable[str],
    *,
    arch: str,
    variant: str | None,
    hook: Any,
    options: Mapping[str, str],
) -> dict[str, str | None]:
    """The local path of every part in ``needed`` (None where neither its option nor the bundle names one).

    ``given``: each part's own spec; ``options``: the option that sets each part (and ``"path"``: the bundle's),
    for messages. Companion files the identified files need (``ModelFile.needs``: tokenizers) are fetched too."""
    needed = [p for p in PARTS if p in set(needed)]
    out: dict[str, str | None] = {}
    root = _bundle_root(bundle, options["path"]) if bundle else None
    for part in needed:
        spec = given.get(part)
        if spec:
            path = hub.resolve(spec, option=options[part], siblings=SIBLINGS.get(part, ()))
            option = options[part]
        elif bundle:
            path = _from_bundle(bundle, root, part, arch, variant, hook, options["path"])
            option = options["path"]
            spec = bundle
        else:
            out[part] = None
            continue
        if path is None:
            out[part] = None
            continue
        found = identify.check_part(path, option, arch, part, variant, hook)
        for need in found.needs if found else ():
            hub.resolve(need, option=f"{option} (what {found.what} needs: {need})")
        out[part] = str(path)
        if str(path) != spec:
            log.info("model part", part=part, spec=spec, path=str(path))
    return out


def _bundle_root(bundle: str, option: str) -> Path | None:
    """The bundle as a local file or folder; None for a repo id (its parts are fetched one by one)."""
    if hub.is_local(bundle):
        return Path(bundle).expanduser()
    if hub.parse(bundle) is None:
        raise ConfigError(
            f"{named(option, bundle)}: no such file or folder (and not a Hugging Face repo id: org/name[@revision])"
        )
    return None


def _from_bundle(
    bundle: str, root: Path | None, part: str, arch: str, variant: str | None, hook: Any, option: str
) -> Path | None:
    if root is None:  # a repo: its diffusers subfolder for this part
        ref = hub.parse(bundle)
        assert ref is not None
        if ref.is_file:
            return hub.resolve(bundle, option=option) if part == "transformer" else None
        sub = f"{ref.path}/{part}" if ref.path else part
        spec = str(hub.RepoRef(ref.repo_id, ref.revision, sub))
        return hub.resolve(spec, option=f"{option} ({part})", siblings=SIBLINGS.get(part, ()))
    if root.is_file():
        return root if part == "transformer" else None
    comfy = _comfy_models(root)  # first: a ComfyUI folder has a vae/ of single files, no diffusers vae/ folder
    if comfy is None and (root / part).is_dir():
        return root / part
    if comfy is None and ((root / "model_index.json").is_file() or any((root / p).is_dir() for p in PARTS)):
        raise ConfigError(
            f"{named(option, root)}: this diffusers folder has no {part}/ folder; name the {part.replace('_', ' ')} "
            f"with model.{part}"
        )
    if comfy is None:
        raise ConfigError(
            f"{named(option, root)}: neither a diffusers folder (transformer/, vae/, text_encoder/) nor a ComfyUI "
            "models folder (diffusion_models/, vae/, text_encoders/); name the parts with model.transformer, "
            "model.vae and model.text_encoder"
        )
    candidates = [f for name in COMFY_FOLDERS[part] for f in sorted((comfy / name).glob("*.safetensors"))]
    return identify.pick(candidates, arch, part, variant, hook, root, option)


def _comfy_models(root: Path) -> Path | None:
    for folder in (root, root / "models"):
        if any((folder / name).is_dir() for names in COMFY_FOLDERS.values() for name in names if name != "vae"):
            return folder
    return None
