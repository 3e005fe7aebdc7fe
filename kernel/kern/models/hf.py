"""Loading Hugging Face ``transformers`` models (the architectures' text encoders) from model folders, and from single
files (a model built on the meta device from a known config, then filled): the pieces every architecture plugin needs
the same way. Errors name the folder or file and say what is wrong."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from kern.errors import ModelFileError
from kern.log import get_logger

log = get_logger(__name__)


def read_config(folder: Path) -> dict:
    """The folder's ``config.json`` as a dict."""
    cfg = Path(folder) / "config.json"
    try:
        return json.loads(cfg.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{cfg}: not found; a text encoder folder needs config.json and safetensors") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{cfg}: unreadable ({e})") from None


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "LOAD REPORT" not in msg and "were not used when initializing" not in msg


@contextlib.contextmanager
def quiet_load_report(active: bool = True) -> Iterator[None]:
    """Silence transformers' report of unused / missing weights while loading: ``check_loading_info`` replaces it
    (it raises on missing or mis-shaped weights and logs the unused ones that matter)."""
    if not active:
        yield
        return
    target = logging.getLogger("transformers.modeling_utils")
    f = _DropLoadReport()
    target.addFilter(f)
    try:
        yield
    finally:
        target.removeFilter(f)


def check_loading_info(info: dict, path: Path, what: str, expected_unused: Callable[[str], bool] | None = None) -> None:
    """``from_pretrained(..., output_loading_info=True)``'s report: missing or mis-shaped weights are an error naming
    ``path`` and ``what`` the checkpoint should be; unused keys (other than ``expected_unused`` ones) a warning."""
    missing = list(info.get("missing_keys") or ())
    misshaped = [k[0] if isinstance(k, tuple) else k for k in (info.get("mismatched_keys") or ())]
    if missing or misshaped:
        raise ModelFileError(
            f"{path}: checkpoint does not fit {what}: {len(missing)} missing weights {sorted(missing)[:5]}, "
            f"{len(misshaped)} mis-shaped {misshaped[:5]}"
        )
    unexpected = [k for k in (info.get("unexpected_keys") or ()) if not (expected_unused and expected_unused(k))]
    if unexpected:
        log.warning(
            "text encoder checkpoint has unused keys", path=str(path), keys=unexpected[:10], count=len(unexpected)
        )


def layers_from(n: int | None) -> Callable[[str], bool] | None:
    """``expected_unused`` for a model loaded with only its first ``n`` decoder layers: the weights of the rest."""
    if n is None:
        return None
    pattern = re.compile(r"layers\.(\d+)\.")
    return lambda key: bool((m := pattern.search(key)) and int(m.group(1)) >= n)


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def tokenizer_dir(path: Path, given: str | Path | None = None) -> Path:
    """Where the tokenizer of the model folder ``path`` is: ``given``, else ``path`` itself, else the sibling
    ``tokenizer/`` folder of a diffusers-style repository."""
    if given is not None:
        return Path(given)
    for cand in (path, path.parent / "tokenizer"):
        if has_tokenizer(cand):
            return cand
    raise ModelFileError(
        f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path} or {path.parent / 'tokenizer'}; "
        "pass tokenizer_path"
    )


def load_pretrained(
    model_cls,
    path: Path,
    dtype,
    label: str,
    fits: str,
    *,
    config=None,
    first_layers: int | None = None,
    quiet: bool = True,
):
    """``model_cls.from_pretrained`` on the local folder ``path``, safetensors only (a pytorch_model.bin is a pickle).

    A folder that does not load is a ``ModelFileError`` saying it cannot load the ``label``; missing or mis-shaped
    weights one saying the checkpoint does not fit ``fits`` (``check_loading_info``). ``first_layers``: the config
    keeps only that many decoder layers, so the weights of the rest are unused on purpose. ``quiet`` silences
    transformers' own load report."""
    try:
        with quiet_load_report(quiet):
            model, info = model_cls.from_pretrained(
                path, config=config, dtype=dtype, local_files_only=True, output_loading_info=True, use_safetensors=True
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: cannot load the {label} ({e})") from e
    check_loading_info(info, path, fits, layers_from(first_layers))
    return model


# ---- single files: a transformers model built from a known config and filled from a checkpoint's tensors ----------


def empty_model(model_cls, config, dtype):
    """``model_cls`` built from ``config`` on the meta device (no memory, no random init), the way
    ``from_pretrained`` builds it (``_from_config``: same attention implementation, parameters in ``dtype``).
    Fill it (``kern.models.quantized.load_into``), then :func:`restore_buffers`."""
    import torch

    with torch.device("meta"):
        return model_cls._from_config(config, dtype=dtype)


def restore_buffers(model, device) -> None:
    """Recompute the non-persistent buffers (RoPE frequencies) a model built on the meta device still lacks: they are
    not in any checkpoint. transformers' own loader does the same (empty buffer on the device, then the model's
    ``_init_weights`` on its module)."""
    import torch

    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        persistent = attr not in owner._non_persistent_buffers_set
        owner.register_buffer(attr, torch.empty_like(buf, device=device), persistent=persistent)
        model._init_weights(owner)


def still_meta(model) -> list[str]:
    """Parameters and buffers of ``model`` that nothing filled (still on the meta device)."""
    return [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]


def config_from_dict(values: dict, where: Path, what: str):
    """A transformers config from a plain dict (``model_type`` picks the class); a dict transformers cannot read is a
    ``ModelFileError`` naming ``where``."""
    from transformers import AutoConfig

    try:
        values = dict(values)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelFileError(f"{where}: {what} is not a transformers config ({e})") from None


def companion_dir(file: Path, name: str, marker: str | None = None) -> Path | None:
    """A ``name/`` folder (``tokenizer``, ``processor``) beside a single-file checkpoint or in its parent folder
    (a diffusers-style layout around it) that holds the file ``marker`` (default: tokenizer files); None if none."""
    for cand in (file.parent / name, file.parent.parent / name):
        if (cand / marker).exists() if marker else has_tokenizer(cand):
            return cand
    return None


SINGLE_FILE = "single file"
FOLDER = "transformers folder"
METADATA_CONFIG = "kern.config"  # a non-standard (tiny test) single file's transformers config, as JSON
# Full ComfyUI checkpoints hold each text encoder's keys under this prefix.
CHECKPOINT_PREFIX = re.compile(r"^text_encoders\.[^.]+\.transformer\.")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


@attrs.frozen
class TextEncoderFile:
    """What a text-encoder checkpoint is, from its keys (an architecture plugin's ``te_files.identify``): ``kind``
    (the plugin's name for the model family), ``size`` ("4B", or "non-standard (hidden 16)"), the plugin's
    ``variants`` it fits, ``what`` (a phrase for messages) and ``layout`` (:data:`SINGLE_FILE` / :data:`FOLDER`)."""

    kind: str
    size: str
    variants: tuple[str, ...]
    what: str
    layout: str


def count_layers(keys) -> int:
    """How many decoder layers (``model.layers.N.``) the keys hold."""
    return len({int(m.group(1)) for k in keys if (m := _LAYER_INDEX.match(k))})


def metadata_config(metadata: dict, where: Path):
    """The transformers config in a file's ``kern.config`` metadata, or None when it has none."""
    if METADATA_CONFIG not in metadata:
        return None
    try:
        values = json.loads(metadata[METADATA_CONFIG])
    except ValueError as e:
        raise ModelFileError(f"{where}: metadata {METADATA_CONFIG} is not JSON ({e})") from None
    return config_from_dict(values, where, f"metadata {METADATA_CONFIG}")


def unknown_size(where: Path, what: str, width: int, layers: int, known: str) -> ModelFileError:
    """The error for a single file of a size no stored config describes (and no ``kern.config``)."""
    return ModelFileError(
        f"{where}: {what}: hidden width {width}, {layers} layers, a size kern has no config for (it knows {known}); "
        "use the official file, or a Hugging Face folder of the model (config.json and weights)"
    )


def companion(file: Path, name: str, given, spec: str, marker: str | None = None) -> Path:
    """A single file's tokenizer or processor folder: ``given`` (a path or repo spec), else a ``name/`` folder beside
    the file or in its parent folder (:func:`companion_dir`), else the hub ``spec`` (fetched once, then cached)."""
    from kern.models import hub

    if given is not None:
        return hub.resolve(str(given), option=f"{name}_path")
    beside = companion_dir(file, name, marker)
    return beside or hub.resolve(spec, option=f"the {name} of {file.name} (none beside it)")


def other_family(shapes, note: str) -> str | None:
    """What a checkpoint of another model family is (``kern.models.identify.foreign``), with ``note`` after a text
    encoder's name; None if unknown."""
    from kern.models.identify import foreign

    other = foreign(dict(shapes))
    if other is None:
        return None
    return f"{other.what} {note}" if "text encoder" in other.what else other.what


def fill_single_file(model, path: Path, what: str, dtype, device, fp8: bool, rename, keep=()) -> None:
    """Fill ``model`` (built by :func:`empty_model`) from the single file ``path`` through ``rename`` (the file's
    state dict -> the model's names), fp8 layers kept fp8 with ``fp8`` (``Float8StorageLinear``, except ``keep``
    regexes), then set its RoPE buffers (:func:`restore_buffers`)."""
    from kern.models.quantized import load_into

    fp8_mode = "storage" if fp8 else None
    load_into(model, [path], dtype=dtype, device=device, fp8=fp8_mode, keep=keep, what=what, where=path, rename=rename)
    restore_buffers(model, device)
    log.info("text encoder from a single file", path=str(path), what=what, fp8=fp8)
