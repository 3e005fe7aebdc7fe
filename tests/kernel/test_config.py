"""Job config: TOML in, command-line overrides, errors that name the key and the file."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kern.core import config
from kern.errors import ConfigError

from tests.conftest import run_kern

GOOD = """
[model]
arch = "flux2-klein-4b"
dtype = "float32"

[network]
type = "loha"
rank = 8
alpha = 4.0
exclude = [".*txt_mlp.*"]

[train]
steps = 30
learning_rate = 1e-3

[timesteps]
method = "flux2_shift"
sigmoid_scale = 1.5

[sample]
prompts = ["a cat", "a dog"]
"""


def write(tmp_path, text, name="job.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_values_and_plugin_options_are_read(tmp_path):
    job = config.load_job(write(tmp_path, GOOD))
    assert job.model.arch == "flux2-klein-4b" and job.model.dtype == "float32"
    assert job.network.type == "loha" and job.network.exclude == [".*txt_mlp.*"]
    assert job.network.options == {"rank": 8, "alpha": 4.0}  # checked later against the network type's schema
    assert job.timesteps.options == {"sigmoid_scale": 1.5}
    assert job.train.steps == 30 and job.train.learning_rate == 1e-3
    assert job.train.seed == 42  # default kept


def test_overrides_win_over_the_file(tmp_path):
    job = config.load_job(write(tmp_path, GOOD), {"train.steps": 5, "network.rank": 16, "save.out": "runs/y"})
    assert job.train.steps == 5 and job.network.options["rank"] == 16 and job.save.out == "runs/y"


def test_integer_is_accepted_for_float():
    job = config.load_job(None, {"train.learning_rate": 1})
    assert job.train.learning_rate == 1.0 and isinstance(job.train.learning_rate, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[train]\nstepz = 3\n", "unknown key 'train.stepz'"),
        ("[bogus]\nx = 1\n", "unknown key 'bogus'"),
        ('[train]\nsteps = "many"\n', "train.steps: expected int"),
        ("[train]\nsteps = 2.5\n", "train.steps: expected int"),
        ("[train]\ngradient_checkpointing = 1\n", "train.gradient_checkpointing: expected bool"),
        ('[model]\ndtype = "float64"\n', "dtype"),
        ('[sample]\nprompts = "one"\n', "sample.prompts: expected a list"),
        ("train = 3\n", "'train' must be a table"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load_job(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        config.load_job(tmp_path / "nope.toml")


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        config.load_job(None, {"train.steps": "x"})


def test_parse_value_reads_toml_scalars():
    assert [config.parse_value(v) for v in ("3", "1e-4", "true", "[1, 2]", "hello", "a b")] == [
        3,
        1e-4,
        True,
        [1, 2],
        "hello",
        "a b",
    ]


def test_resolved_config_round_trips_through_toml(tmp_path):
    job = config.load_job(write(tmp_path, GOOD), {"save.out": str(tmp_path / "out")})
    again = config.load_job(write(tmp_path, config.dump_toml(job.to_dict()), "again.toml"))
    assert again.to_dict() == job.to_dict()


def test_cli_config_error_exits_2_and_names_file_and_key(tmp_path):
    path = write(tmp_path, "[train]\nlearning_rat = 1e-4\n")
    proc = run_kern("train", "--config", str(path))
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "train.learning_rat" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_relative_paths_in_a_job_file_are_relative_to_it(tmp_path):
    sub = tmp_path / "jobs"
    sub.mkdir()
    path = write(
        sub,
        '[model]\ntransformer = "models/t.safetensors"\nvae = "/abs/ae.safetensors"\n[dataset]\nconfig = "../data.toml"\n',
    )
    job = config.load_job(path, {"save.out": "runs/x"})
    assert job.model.transformer == str(sub / "models" / "t.safetensors")
    assert job.model.vae == "/abs/ae.safetensors"
    assert job.dataset.config == str(tmp_path / "data.toml")
    assert job.save.out == "runs/x"  # command-line values stay relative to the working directory


# --------------------------------------------------------------------------- written config, ranges


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)  # any Unicode but lone surrogates


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(_TEXT, max_size=3), out=_TEXT, rate=st.floats(1e-9, 10.0))
def test_every_written_config_reads_back_to_the_same_job(tmp_path_factory, prompts, out, rate):
    """Control characters, quotes, backslashes, any Unicode: config.toml is TOML that parses back to the job."""
    folder = tmp_path_factory.mktemp("c")
    job = config.load_job(
        None,
        {
            "sample.prompts": prompts,
            "save.out": str(folder / ("x" + out.replace("\0", ""))),
            "train.learning_rate": rate,
            "network.rank": 3,
            "network.rank_pattern": ["a\\d=2"],
        },
    )
    path = folder / "config.toml"
    path.write_text(config.dump_toml(job.to_dict()), encoding="utf-8")
    assert config.load_job(path).to_dict() == job.to_dict()


def test_option_ranges_and_checks():
    from kern.adapters.network import parse_rank_patterns
    from kern.records import Option, resolve_options

    schema = (
        Option("rank", "int", 16, minimum=1),
        Option("p", "float", 0.0, minimum=0.0, maximum=0.99),
        Option("pattern", "list", (), check=parse_rank_patterns),
    )
    assert resolve_options(schema, {"rank": 4, "p": 0.5, "pattern": ["a=2"]}, "w") == {
        "rank": 4,
        "p": 0.5,
        "pattern": ("a=2",),
    }
    for values, words in (
        ({"rank": 0}, "at least 1"),
        ({"rank": -2}, "at least 1"),
        ({"p": float("nan")}, "finite"),
        ({"p": 1.0}, "between 0.0 and 0.99"),
        ({"p": float("inf")}, "finite"),
        ({"pattern": ["(=2"]}, "bad regular expression"),
        ({"pattern": ["a=0"]}, "at least 1"),
        ({"pattern": ["a"]}, "regex=rank"),
        ({"rank": 2.5}, "wants int"),
    ):
        with pytest.raises(ValueError, match=words):
            resolve_options(schema, values, "w")


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.learning_rate", float("nan")),
        ("train.learning_rate", 0.0),
        ("train.steps", 0),
        ("train.steps", 2**40),
        ("train.gradient_accumulation", 0),
        ("train.warmup_steps", -1),
        ("train.max_grad_norm", float("-inf")),
        ("train.seed", -5),
        ("train.seed", 2**64),
        ("train.device", "gpu"),
        ("train.device", "cuda:0"),
        ("sample.seed", -1),
        ("sample.steps", 0),
        ("sample.width", 0),
        ("save.keep_last", -2),
        ("save.every_n_steps", -1),
        ("save.name", ""),
        ("save.name", ".."),
        ("save.name", "a\\b"),
        ("save.name", "x\ny"),
        ("save.name", " padded "),
        ("save.out", "  "),
        ("model.vae", "a\0b"),
        ("network.exclude", ["[z-a]"]),
    ],
)
def test_context_free_checks_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load_job(None, {key: value, "sample.prompts": ["p"]} if key.startswith("sample.") else {key: value})


def test_model_keys_may_be_repo_ids_and_a_folder_next_to_the_job_file_wins(tmp_path):
    sub = tmp_path / "jobs"
    (sub / "Qwen" / "Local").mkdir(parents=True)
    path = write(
        sub,
        '[model]\npath = "Qwen/Qwen-Image"\ntransformer = "Qwen/Local"\nvae = "org/name@v2/vae"\n'
        'text_encoder = "te/qwen_2.5_vl_7b.safetensors"\n',
    )
    job = config.load_job(path)
    assert job.model.path == "Qwen/Qwen-Image"  # a repo id: kern.models.hub resolves it
    assert job.model.transformer == str(sub / "Qwen" / "Local")  # exists next to the job file: a path
    assert job.model.vae == "org/name@v2/vae"
    assert job.model.text_encoder == str(sub / "te" / "qwen_2.5_vl_7b.safetensors")  # no repo id: job-relative
