"""Loading Hugging Face ``transformers`` model folders (the architectures' text encoders): the pieces every
architecture plugin needs the same way. Errors name the folder or file and say what is wrong."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

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
