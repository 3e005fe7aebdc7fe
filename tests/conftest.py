"""Shared fixtures: fake installed distributions, the `kern` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_plugin_manager(monkeypatch):
    """Each test sees plugins as the environment it sets up says, not a cached manager."""
    from kern.core import plugins

    for var in (plugins.ENV_ALLOW, plugins.ENV_DENY, plugins.ENV_NO_AUTOLOAD):
        monkeypatch.delenv(var, raising=False)
    plugins.reset_manager()
    yield
    plugins.reset_manager()


@pytest.fixture(scope="session")
def toy_site(tmp_path_factory):
    """pip-install examples/plugins/kern-toy into a private folder (the test venv stays untouched)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "--target",
            str(target),
            str(REPO / "examples" / "plugins" / "kern-toy"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(target.glob("kern_toy-0.1.0.dist-info/entry_points.txt")), "pip did not install the entry point"
    return target


def make_dist(root: Path, dist: str, version: str, ep_name: str, module: str, source: str) -> Path:
    """Write an installed-looking distribution (dist-info with an entry point) plus its module under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[kern.plugins]\n{ep_name} = {module}\n")
    return root


def run_kern(
    *args: str, env: dict | None = None, pythonpath: list[Path] | None = None, input: str | None = None, cwd=None
):
    """Run ``python -m kern_cli.main ARGS`` and return the CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KERN_")}
    if pythonpath:
        full_env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kern_cli.main", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        cwd=cwd,
        timeout=600,
    )


def plugins_json(**kw) -> dict:
    proc = run_kern("plugins", "--json", **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


from tests.hfcache import hub_cache, no_network  # noqa: E402,F401  (fixtures: an offline Hugging Face cache)
