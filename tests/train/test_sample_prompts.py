"""Preview prompts from a prompt file with wildcards (issue 17 item 8): kern generate's syntax and expansion, paths
relative to the job file, expanded once at start, every mistake an exit-2 error before any work."""

from __future__ import annotations

import pytest
from kern.core import config
from kern.data.prompts import Wildcards, expand_request, parse_line
from kern.errors import UsageError
from kern.train import driver as train

from tests.helpers import make_dataset


@pytest.fixture
def folder(tmp_path):
    """A job folder: dataset, a prompt file, a wildcard folder (one nested, one weighted)."""
    make_dataset(tmp_path / "data", n=2)
    (tmp_path / "prompts.txt").write_text("# previews\na __color__ square --d 7\n\na __shape__ on grey --w 64 --h 64\n")
    wc = tmp_path / "wc"
    wc.mkdir()
    (wc / "color.txt").write_text("red\ngreen:2\n__tone__ blue\n")
    (wc / "tone.txt").write_text("dark\nlight\n")
    (wc / "shape.txt").write_text("circle\nstar\n")
    return tmp_path


def write_job(folder, **sample) -> str:
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in sample.items())
    (folder / "job.toml").write_text(
        f"""
[model]
arch = "toy"
dtype = "float32"

[network]
type = "lora"
rank = 4

[dataset]
config = "data/dataset.toml"

[train]
steps = 2
mixed_precision = "no"
device = "cpu"
gradient_checkpointing = false

[sample]
{lines}
steps = 2

[save]
out = "run"
"""
    )
    return str(folder / "job.toml")


def previews_of(path):
    return train.check_job(config.load_job(path))[-1]


def test_prompt_file_and_wildcards_expand_like_kern_generate(folder, toy_plugin):
    job = write_job(folder, prompts=["a plain square"], prompt_file="prompts.txt", wildcards="wc", seed=100)
    images = previews_of(job).images
    assert [im.source for im in images] == [
        f"{job}: sample.prompts[0]",
        f"{folder / 'prompts.txt'}:2",
        f"{folder / 'prompts.txt'}:4",
    ]
    # seeds: the line's --d, else sample.seed plus the image's index, as kern generate numbers them
    assert [im.seed for im in images] == [100, 7, 102]
    wildcards = Wildcards(folder / "wc")
    for im, line in zip(images[1:], ["a __color__ square --d 7", "a __shape__ on grey --w 64 --h 64"]):
        expected = expand_request(parse_line(line, "x"), wildcards, im.seed)
        assert im.prompt == expected.prompt and "__" not in im.prompt
    assert images[2].width == 64 and images[2].height == 64
    # expanded once, at start: the same job gives the same prompts (previews are comparable across steps and runs)
    assert [im.prompt for im in previews_of(job).images] == [im.prompt for im in images]


def test_a_run_makes_the_prompt_file_previews_at_each_step(folder, toy_plugin):
    job = config.load_job(write_job(folder, prompt_file="prompts.txt", wildcards="wc", every_n_steps=1))
    train.run(job)
    names = sorted(p.name for p in (folder / "run" / "samples").glob("*.png"))
    assert names == ["step-000001_00.png", "step-000001_01.png", "step-000002_00.png", "step-000002_01.png"]


@pytest.mark.parametrize(
    ("content", "sample", "message"),
    [
        (None, {"prompt_file": "missing.txt"}, r"missing\.txt: prompt file not found"),
        ("fine\na square --w abc\n", {"prompt_file": "bad.txt"}, r"bad\.txt:2: --w wants int"),
        ("a square --zz 3\n", {"prompt_file": "bad.txt"}, r"bad\.txt:1: unknown option --zz"),
        ("# only comments\n", {"prompt_file": "bad.txt"}, r"bad\.txt: no prompts"),
        (
            "a __nothing__\n",
            {"prompt_file": "bad.txt", "wildcards": "wc"},
            r"bad\.txt:1: wildcard __nothing__: no file",
        ),
        ("a __../secret__\n", {"prompt_file": "bad.txt", "wildcards": "wc"}, r"bad\.txt:1: .*points outside"),
        ("a __color__\n", {"prompt_file": "bad.txt"}, r"bad\.txt:1: __color__ used but no --wildcards folder"),
        ("a square\n", {"prompt_file": "bad.txt", "wildcards": "nowhere"}, r"sample\.wildcards = .*nowhere: no such"),
    ],
)
def test_mistakes_fail_at_start_naming_file_and_line(folder, toy_plugin, content, sample, message):
    if content is not None:
        (folder / "bad.txt").write_text(content)
    (folder / "secret.txt").write_text("x")
    with pytest.raises(UsageError, match=message):
        previews_of(write_job(folder, **sample))
    assert not (folder / "run").exists()  # before any work


def test_cli_exits_2_on_a_bad_prompt_line(folder, toy_plugin, capsys):
    from kern_cli.main import main

    (folder / "bad.txt").write_text("a square --s 0\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", write_job(folder, prompt_file="bad.txt")])
    assert exc.value.code == 2
    assert "bad.txt:1: --s must be at least 1" in capsys.readouterr().err
