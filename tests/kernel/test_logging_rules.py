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


def test_library_code_logs_through_kern_get_logger():
    # structlog.get_logger would print to stdout (structlog's default) in any program that imports kern.
    offenders = [
        str(p.relative_to(REPO)) for p in python_files(*LIBRARY_DIRS) if "structlog.get_logger(" in p.read_text()
    ]
    assert offenders == [], f"use kern.log.get_logger(__name__) in {offenders}"


def test_kern_used_as_a_library_is_quiet_until_logging_is_set_up():
    import subprocess
    import sys

    code = (
        "import logging, kern.core.plugins as p; p.get_manager(); from kern.log import get_logger; "
        "log = get_logger('kern.t'); log.info('quiet info'); log.debug('quiet debug'); "
        "logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s'); log.info('now heard', n=1)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "quiet" not in proc.stderr and "plugins loaded" not in proc.stderr
    assert "kern.t" in proc.stderr and "now heard" in proc.stderr
