"""Prompt lines and wildcards: parsing, per-line options, expansion, errors with line numbers."""

from __future__ import annotations

import random

import pytest
from kern.data.prompts import Request, Wildcards, expand_request, iter_interactive, parse_line, read_prompt_file
from kern.errors import UsageError


def test_line_with_every_option():
    r = parse_line('a red fox in snow --w 768 --h 512 --d 42 --s 28 --g 3.5 --n "blurry, low quality" --f 3', "p.txt:1")
    assert (r.prompt, r.width, r.height, r.seed, r.steps, r.guidance, r.negative, r.count) == (
        "a red fox in snow",
        768,
        512,
        42,
        28,
        3.5,
        "blurry, low quality",
        3,
    )
    assert r.source == "p.txt:1"


def test_comments_and_blank_lines_are_skipped():
    assert parse_line("   ", "x:1") is None
    assert parse_line("# a comment --w 5", "x:2") is None


def test_option_only_line_takes_the_base_prompt():
    r = parse_line("--w 256 --d 7", "p.txt:4", base_prompt="a lighthouse")
    assert (r.prompt, r.width, r.seed) == ("a lighthouse", 256, 7)


def test_option_only_line_without_base_prompt_names_the_line():
    with pytest.raises(UsageError, match=r"p.txt:4: this line has only options"):
        parse_line("--w 256", "p.txt:4")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cat --zz 3", "unknown option --zz"),
        ("cat --w wide", "--w wants int"),
        ("cat --w 0", "--w must be at least 1"),
        ("cat --w", "option --w needs a value"),
        ('cat --n "unclosed', "cannot read the options"),
    ],
)
def test_bad_options_name_line(line, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_line(line, "f.txt:9")
    assert "f.txt:9" in str(err.value)


def test_architecture_options_are_collected():
    r = parse_line("edit this --ri a.png --ri b.png", "x:1", extra_options={"ri": str})
    assert r.extra == {"ri": ["a.png", "b.png"]}


def test_prompt_file_reports_the_bad_line_number_before_anything_runs(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# header\na cat --w 64\n\n--d 3\nbad --q 1\n")
    with pytest.raises(UsageError, match=r"prompts.txt:5: unknown option --q"):
        read_prompt_file(f, base_prompt="base")
    f.write_text("# header\na cat --w 64\n\n--d 3\n")
    requests = read_prompt_file(f, base_prompt="base")
    assert [(r.prompt, r.source.rsplit(":", 1)[1]) for r in requests] == [("a cat", "2"), ("base", "4")]


@pytest.fixture
def cards(tmp_path):
    (tmp_path / "animal.txt").write_text("cat\ndog:3\n# comment\n__big__ bird:0.5\n")
    (tmp_path / "big.txt").write_text("huge\nlarge\n")
    (tmp_path / "loop_a.txt").write_text("x __loop_b__\n")
    (tmp_path / "loop_b.txt").write_text("y __loop_a__\n")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "color.txt").write_text("red\n")
    return Wildcards(tmp_path)


def test_nested_weighted_expansion_is_seeded(cards):
    a = cards.expand("a __animal__ in __deep/color__", random.Random(5), "x:1")
    b = cards.expand("a __animal__ in __deep/color__", random.Random(5), "x:1")
    assert a == b and a.endswith(" in red") and "__" not in a


def test_weights_shape_the_distribution(cards):
    rng = random.Random(0)
    picks = [cards.expand("__animal__", rng, "x") for _ in range(9000)]
    share = {v: picks.count(v) / len(picks) for v in set(picks)}
    # weights cat 1, dog 3, "__big__ bird" 0.5 (then huge/large evenly): 1/4.5, 3/4.5, 0.25/4.5 each
    assert share["dog"] == pytest.approx(3 / 4.5, abs=0.02)
    assert share["cat"] == pytest.approx(1 / 4.5, abs=0.02)
    assert share["huge bird"] == pytest.approx(0.25 / 4.5, abs=0.015)


def test_cycle_is_an_error(cards):
    with pytest.raises(UsageError, match="wildcard cycle loop_a -> loop_b -> loop_a"):
        cards.expand("__loop_a__", random.Random(0), "p.txt:3")


def test_missing_wildcard_file_names_file_and_line(cards, tmp_path):
    with pytest.raises(UsageError, match=r"p.txt:2: wildcard __nope__: no file .*nope.txt"):
        cards.expand("a __nope__", random.Random(0), "p.txt:2")


def test_depth_limit(tmp_path):
    for i in range(20):
        (tmp_path / f"w{i}.txt").write_text(f"__w{i + 1}__\n")
    (tmp_path / "w20.txt").write_text("end\n")
    with pytest.raises(UsageError, match="nest deeper than"):
        Wildcards(tmp_path).expand("__w0__", random.Random(0), "x")


def test_expand_request_applies_to_negative_too(cards):
    r = expand_request(Request(prompt="__animal__", negative="no __deep/color__", source="x"), cards, seed=3)
    assert r.negative == "no red" and "__" not in r.prompt


def test_interactive_stream_reports_bad_lines_and_stops_at_exit():
    items = list(iter_interactive(["a cat --w 64\n", "--zz 1\n", "\n", "exit\n", "never\n"], base_prompt=None))
    assert isinstance(items[0], Request) and items[0].width == 64
    assert isinstance(items[1], UsageError) and "<stdin>:2" in str(items[1])
    assert len(items) == 2
