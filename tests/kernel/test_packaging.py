"""The distributions as pip builds them (not editable): every package a `kern` command imports is in the wheel.

An editable install maps whole folders, so a package left out of ``[tool.setuptools] packages`` only shows up
once someone installs the built wheel (as the device machine did: ``No module named 'kern_cli.commands'``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

DISTS = {
    ".": "kern_tuner",
    "plugins/lora": "kern_lora",
    "plugins/loha": "kern_loha",
    "plugins/flux2": "kern_flux2",
    "plugins/qwen_image": "kern_qwen_image",
}


@pytest.mark.parametrize("folder", sorted(DISTS))
def test_wheel_holds_every_python_package_of_its_source(folder, tmp_path):
    # Build from a clean copy: setuptools reuses an in-tree build/ folder, which would hide a missing package.
    src = tmp_path / "src"
    shutil.copytree(
        REPO / folder,
        src,
        ignore=shutil.ignore_patterns(
            "build",
            "*.egg-info",
            "__pycache__",
            ".venv",
            "runs",
            ".*",
            "tests",
            "examples",
            "bench",
            "docs",
            "plugins",
            "requirements",
        ),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob(f"{DISTS[folder]}-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # (source folder, its path inside the wheel): the kernel distribution maps kernel/kern and cli/kern_cli.
    roots = (
        [(REPO / "kernel" / "kern", "kern"), (REPO / "cli" / "kern_cli", "kern_cli")]
        if folder == "."
        else [(REPO / folder / DISTS[folder], DISTS[folder])]
    )
    sources = [(p, f"{inside}/{p.relative_to(src).as_posix()}") for src, inside in roots for p in src.rglob("*.py")]
    assert sources
    for path, inside in sources:
        assert inside in names, f"{path} is missing from {wheel.name} (as {inside})"
