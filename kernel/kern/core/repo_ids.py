"""Hugging Face repo ids as kern reads them in model options: ``org/name[@revision][/path/inside]``.

Only the syntax lives here (the job config uses it to tell a repo id from a relative path); ``kern.models.hub``
resolves them.
"""

from __future__ import annotations

import re

import attrs

# huggingface_hub's own rule for a repo id part: letters, digits, '-', '_', '.', not starting or ending with - or .
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_SPEC = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^/@\s]+))?(?:/(?P<path>[^@\s]+))?")
FILE_SUFFIXES = (".safetensors",)
# A repo is never named like a file: "models/t.safetensors" is a path that does not exist (yet), not a repo.
_FILE_LIKE = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".json", ".toml", ".txt")


@attrs.frozen
class RepoRef:
    """A parsed spec: ``repo_id``, ``revision`` (None: the default branch) and ``path`` inside ('' = the root)."""

    repo_id: str
    revision: str | None = None
    path: str = ""

    @property
    def is_file(self) -> bool:
        return self.path.endswith(FILE_SUFFIXES)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{rev}{'/' + self.path if self.path else ''}"


def parse(spec: str) -> RepoRef | None:
    """``spec`` as a repo reference, or None when it cannot be one (an absolute path, ``./x``, ``~/x``, a Windows
    drive, a part with characters a repo id cannot have)."""
    if not spec or spec.startswith(("/", ".", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", spec) or "\\" in spec:
        return None
    m = _SPEC.fullmatch(spec.strip("/"))
    if not m or "--" in m["repo"] or ".." in m["repo"] or m["repo"].lower().endswith(_FILE_LIKE):
        return None
    path = (m["path"] or "").strip("/")
    if any(p in ("", ".", "..") for p in path.split("/")) and path:
        return None
    return RepoRef(m["repo"], m["revision"], path)


def named(option: str, value: object) -> str:
    """How messages show an option and its value: ``--vae x.safetensors`` on the command line,
    ``job.toml: model.vae = 'x.safetensors'`` in a job file."""
    return f"{option} {value}" if option.startswith("--") else f"{option} = {str(value)!r}"
