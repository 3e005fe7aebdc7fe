"""Model files named by Hugging Face repo id: ``org/name``, ``org/name@revision``, ``org/name[@revision]/path/inside``.

A spec is first a local path: one that exists always wins, whatever it looks like. Otherwise it must read as a repo
id and is resolved through ``huggingface_hub``: its cache (``HF_HOME`` / ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE``,
the token ``hf auth login`` saved. Only the files a part needs are fetched (``allow_patterns``: safetensors,
configs, tokenizer files; never a pickled ``.bin`` / ``.pt``), with huggingface_hub's progress bars. Files already
in the cache are used without a network call when ``HF_HUB_OFFLINE=1``, and when the hub cannot be reached.

The path inside the repo is a file when it ends in ``.safetensors`` (``org/name/split_files/vae/vae.safetensors``),
else a folder (``org/name/transformer``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kern.core.repo_ids import RepoRef, named, parse
from kern.errors import ConfigError, ModelFileError
from kern.log import get_logger

log = get_logger(__name__)

# What a model folder needs: weights, their index, configs, tokenizer and processor files. No pickles.
FOLDER_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists()


def resolve(spec: str, *, option: str, siblings: Sequence[str] = ()) -> Path:
    """The local file or folder ``spec`` names: itself if it exists, else the files of the repo it names, fetched
    into (or found in) the Hugging Face cache. ``siblings``: folders next to a repo subfolder to fetch too (a text
    encoder's ``tokenizer`` / ``processor``). Errors name ``option`` and say what was tried."""
    local = Path(spec).expanduser()
    if local.exists():
        return local
    ref = parse(spec)
    if ref is None:
        raise ConfigError(
            f"{named(option, spec)}: no such file or folder (and not a Hugging Face repo id: org/name[@revision][/path])"
        )
    return _fetch(ref, spec, option, siblings)


def patterns_for(ref: RepoRef, siblings: Sequence[str] = ()) -> list[str] | None:
    """``allow_patterns`` for ``ref``: the file itself, or the model files of its folder and of its ``siblings``."""
    if ref.is_file:
        return [ref.path]
    folders = [ref.path]
    parent = ref.path.rpartition("/")[0]
    folders += [f"{parent}/{s}" if parent else s for s in siblings]
    out = []
    for folder in folders:
        prefix = f"{folder}/" if folder else ""
        out += [prefix + p for p in FOLDER_PATTERNS]
    return out


def _fetch(ref: RepoRef, spec: str, option: str, siblings: Sequence[str]) -> Path:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    tried = f"{named(option, spec)}: not a local file or folder, so it was taken as the Hugging Face repo {ref.repo_id}"
    if ref.revision:
        tried += f" at revision {ref.revision}"
    try:
        root = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns_for(ref, siblings)))
    except hf_errors.GatedRepoError:
        raise ModelFileError(
            f"{tried}, which is gated: accept its licence on huggingface.co/{ref.repo_id} and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ConfigError(
            f"{tried}, which does not exist (or is private: log in with `hf auth login`); check the spelling "
            "or the local path"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ConfigError(f"{tried}: the repo has no revision {ref.revision!r}") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError) as exc:
        raise ModelFileError(f"{tried}: {_why_offline(exc)}") from None
    except hf_errors.HfHubHTTPError as exc:
        raise ModelFileError(f"{tried}: the hub answered {exc}") from None
    except OSError as exc:
        raise ModelFileError(f"{tried}: {exc}") from None
    target = root / ref.path if ref.path else root
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        raise ModelFileError(f"{tried}: it has no {ref.path or 'files'!r} (of the model files kern fetches)")
    log.info("model files from the hub cache", spec=spec, path=str(target))
    return target


def _why_offline(exc: Exception) -> str:
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return (
            f"the files are not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; download them "
            "once online, or set HF_HUB_CACHE / HF_HOME to the cache that has them"
        )
    return f"the hub cannot be reached and the files are not in the Hugging Face cache ({cache}) ({exc})"
