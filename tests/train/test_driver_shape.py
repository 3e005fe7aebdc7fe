"""The training driver stays readable: ``run`` is a story of about 40 lines, each module of kern.train a chapter."""

from __future__ import annotations

import inspect
from pathlib import Path

import kern.train
from kern.train import driver


def test_run_is_under_60_lines():
    assert len(inspect.getsource(driver.run).splitlines()) < 60


def test_no_module_of_kern_train_is_over_500_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in Path(kern.train.__file__).parent.glob("*.py")}
    assert max(sizes.values()) <= 500, sizes
