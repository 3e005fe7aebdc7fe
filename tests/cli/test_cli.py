"""The kern command: help for every subcommand, exit codes, log formats."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_kern


def subcommands():
    from kern_cli.main import cli

    return sorted(cli.commands)


def test_top_level_help_lists_subcommands():
    proc = run_kern("--help")
    assert proc.returncode == 0
    for name in subcommands():
        assert name in proc.stdout


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_has_help(name):
    proc = run_kern(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: kern {name}")
    body = proc.stdout.split("\n", 2)[2].strip()
    assert len(body) > 20, f"kern {name} --help has no description"


def test_unknown_subcommand_is_a_usage_error():
    proc = run_kern("frobnicate")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr


def test_bad_option_value_is_a_usage_error():
    proc = run_kern("train", "--steps", "many")
    assert proc.returncode == 2


def test_unknown_architecture_is_a_usage_error_with_the_installed_ones(tmp_path):
    proc = run_kern("train", "--arch", "nonexistent-arch", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "unknown architecture 'nonexistent-arch'" in proc.stderr and "flux2" in proc.stderr


def test_version():
    proc = run_kern("--version")
    assert proc.returncode == 0 and "0.1.0" in proc.stdout


def test_json_log_format_emits_json_lines(tmp_path):
    proc = run_kern("--log-format", "json", "-v", "train", "--arch", "nonexistent-arch", "--out", str(tmp_path / "r"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    assert lines, proc.stderr
    assert all("event" in json.loads(line) for line in lines)
