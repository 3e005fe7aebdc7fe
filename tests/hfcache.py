"""A Hugging Face hub cache in its real layout, built from local files, for offline tests.

``<cache>/models--<org>--<name>/refs/<revision>`` holds the commit hash, ``snapshots/<commit>/<path>`` are symlinks
to ``blobs/<sha256>`` (what ``huggingface_hub`` writes for LFS files), as documented in huggingface_hub's cache
guide. The real resolution code (``snapshot_download``, ``hf_hub_download``) then finds them with
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest


class HubCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def add(
        self, repo_id: str, files: dict[str, Path | bytes], revision: str = "main", commit: str | None = None
    ) -> str:
        """Put ``files`` (path in the repo -> local file, folder or bytes) in the cache as ``repo_id`` at
        ``revision``; returns the commit hash."""
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        for name, src in files.items():
            if isinstance(src, Path) and src.is_dir():
                for f in sorted(src.rglob("*")):
                    if f.is_file():
                        self._blob(repo, snapshot / name / f.relative_to(src), f.read_bytes())
            else:
                self._blob(repo, snapshot / name, src if isinstance(src, bytes) else src.read_bytes())
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        return commit

    @staticmethod
    def _blob(repo: Path, target: Path, data: bytes) -> None:
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        os.symlink(os.path.relpath(blob, target.parent), target)

    def env(self) -> dict[str, str]:
        """Environment for a ``kern`` subprocess that uses this cache, offline."""
        return {"HF_HUB_CACHE": str(self.root), "HF_HUB_OFFLINE": "1", "HF_HOME": str(self.root.parent / "hf_home")}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> HubCache:
    """An empty offline hub cache that in-process calls and ``kern`` subprocesses (given ``.env()``) use."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    cache = HubCache(root)
    for key, value in cache.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def no_network(monkeypatch) -> list[tuple]:
    """Every attempt to open a network connection is recorded and refused."""
    attempts: list[tuple] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network call attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(None, host))
    return attempts


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
