"""Fixtures for training tests: the example toy architecture on sys.path (the tiny image dataset is
``tests.helpers.make_dataset``)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO


@pytest.fixture
def toy_plugin(monkeypatch):
    """The example plugin importable in-process and registered with the global manager."""
    from kern.core import plugins

    monkeypatch.setenv(plugins.ENV_DENY, "toy")  # an in-tree build may have left an entry point for it
    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugins" / "kern-toy"))
    import kern_toy.plugin as toy

    manager = plugins.build_manager(extra=[("toy", toy)])
    monkeypatch.setattr(plugins, "_MANAGER", manager)
    return manager


@pytest.fixture
def kern_main(toy_plugin, capsys):
    """``kern ARGS`` in this process (no interpreter start-up): returns (exit code, stderr). Logging is put back after."""
    import logging

    from kern_cli.main import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def call(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        return exit_.value.code, capsys.readouterr().err

    yield call
    root.handlers[:], level = saved
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
