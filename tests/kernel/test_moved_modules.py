"""A plugin written against kern 0.1's flat module paths still imports: the old path gives the module at its new
place (the same object, so its names and state are shared) and a DeprecationWarning that names the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from kern import _moved


@pytest.mark.parametrize("old,new", sorted(_moved.MOVED.items()))
def test_every_old_path_names_a_module_that_exists(old, new):
    assert importlib.import_module(new).__name__ == new


def test_an_old_path_imports_the_new_module_with_a_warning():
    # a fresh interpreter: in this one an earlier test may already have imported the old path
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    from kern.checkpoint import require_path\n"
        "    import kern.network, kern.adapters.network, kern.models.files\n"
        "assert require_path is kern.models.files.require_path\n"
        "assert kern.network is kern.adapters.network\n"
        "messages = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
        "assert any('kern.checkpoint moved to kern.models.files' in m for m in messages), messages\n"
        "assert any('kern.network moved to kern.adapters.network' in m for m in messages), messages\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_an_unknown_old_path_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kern.no_such_module")
