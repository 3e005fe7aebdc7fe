"""Property-style checks of the prompt parser: whatever a prompt line or file holds, the outcome is a Request whose
numbers are in range, nothing (blank / comment), or a UsageError naming the line, never another exception."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kern.data.prompts import LIMITS, Request, iter_interactive, parse_line, read_prompt_file
from kern.errors import UsageError

OPTIONS = ["--w", "--h", "--d", "--s", "--g", "--n", "--f", "--ci", "--layers", "--zz", "--", "-w", "w"]
VALUES = [
    "0",
    "1",
    "-1",
    "16",
    "64.0",
    "1e9",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "NaN",
    str(2**64),
    str(2**64 - 1),
    "99999999",
    "٣",
    "1_0",
    "0x10",
    "",
    "''",
    '"',
    "'",
    "a b",
    '"quoted value"',
    "__card__",
    "\\",
    "\x00",
    "é",
    "--w",
]
token = st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES), st.text(max_size=6))
line = st.one_of(
    st.lists(token, max_size=8).map(" ".join),
    st.builds(lambda p, opts: f"{p} {opts}", st.text(max_size=12), st.lists(token, max_size=8).map(" ".join)),
    st.text(max_size=40),
)


def in_range(request: Request) -> bool:
    for field in ("width", "height", "seed", "steps", "count"):
        value = getattr(request, field)
        if value is not None:
            low, high = LIMITS[field]
            if not (isinstance(value, int) and low <= value <= high):
                return False
    if request.guidance is not None and not math.isfinite(request.guidance):
        return False
    layers = request.extra.get("layers")
    return layers is None or LIMITS["layers"][0] <= layers <= LIMITS["layers"][1]


@settings(max_examples=400, deadline=None)
@given(text=line, base=st.one_of(st.none(), st.just("base"), st.just("")))
def test_any_line_parses_in_range_or_is_a_usage_error_naming_it(text, base):
    try:
        request = parse_line(text, "p.txt:7", base_prompt=base)
    except UsageError as exc:
        assert str(exc).startswith("p.txt:7: ")
        return
    assert request is None or (isinstance(request, Request) and in_range(request) and request.source == "p.txt:7")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200), st.lists(line, max_size=5).map(lambda ls: "\n".join(ls).encode())))
def test_any_prompt_file_reads_in_range_or_is_a_usage_error_naming_it(tmp_path, data):
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    try:
        requests = read_prompt_file(path, base_prompt="base")
    except UsageError as exc:
        assert str(path) in str(exc)
        return
    assert requests and all(in_range(r) for r in requests)


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.one_of(line, st.binary(max_size=30)), max_size=6))
def test_interactive_streams_never_raise(lines):
    for item in iter_interactive(lines, base_prompt=None):
        assert isinstance(item, UsageError) or in_range(item)
