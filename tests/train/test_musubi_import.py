"""`kern import musubi`: musubi-tuner command lines (copied from its docs) and config files as kern jobs."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner
from kern.core.config import JobConfig, load_job
from kern.train.setup import prepare

from tests.helpers import make_dataset

HERE = Path(__file__).parent / "musubi"
ROOT = Path(__file__).resolve().parents[2]


@attrs.define
class Result:
    exit_code: int
    stderr: str
    output: str


def kern(*args: str) -> Result:
    """The command in-process, with kern's exit codes (kern_cli.main: a UsageError exits 2 with its message)."""
    from kern.errors import KernError, UsageError
    from kern_cli.main import cli

    r = CliRunner().invoke(cli, list(args))
    code, err = r.exit_code, r.stderr
    if isinstance(r.exception, KernError):
        code, err = (2 if isinstance(r.exception, UsageError) else 1), f"{err}kern: error: {r.exception}\n"
    elif r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Result(code, err, r.output)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("musubi") / "data", n=4)  # 4 images, batch 1: 4 steps an epoch


@pytest.fixture
def here(tmp_path, monkeypatch, dataset) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def get(job: JobConfig, dotted: str):
    section, key = dotted.split(".", 1)
    part = getattr(job, section)
    if section in ("network", "timesteps") and not hasattr(part, key):
        return part.options[key]
    return getattr(part, key)


# What each option of the docs' command lines must become (the inverse: kern key -> the value musubi had).
COMMON = {
    "model.transformer": "path/to/dit_model",
    "model.text_encoder": "path/to/text_encoder",
    "train.mixed_precision": "bf16",
    "train.optimizer": "adamw8bit",
    "train.gradient_checkpointing": True,
    "train.seed": 42,
    "train.steps": 16 * 4,  # --max_train_epochs 16, 4 batches an epoch
    "save.every_n_steps": 1 * 4,  # --save_every_n_epochs 1
    "save.out": "path/to/output_dir",
    "save.name": "name-of-lora",
    "network.type": "lora",
    "network.alpha": 1.0,  # musubi's default --network_alpha
    "timesteps.weighting_scheme": "none",
}
DOCS = {
    "flux_2_docs.txt": (
        "flux2",
        "dev",
        {
            **COMMON,
            "model.vae": "path/to/ae_model",
            "train.learning_rate": 1e-4,
            "network.rank": 32,
            "timesteps.method": "flux2_shift",
        },
    ),
    "qwen_image_docs.txt": (
        "qwen-image",
        "t2i",
        {
            **COMMON,
            "model.vae": "path/to/vae_model",
            "train.learning_rate": 5e-5,
            "network.rank": 16,
            "timesteps.method": "shift",
            "timesteps.discrete_flow_shift": 2.2,
        },
    ),
}
PATHS = {"model.transformer", "model.vae", "model.text_encoder", "save.out"}


@pytest.mark.parametrize("name", sorted(DOCS))
def test_a_command_line_from_musubis_docs_round_trips(here, dataset, name):
    arch, variant, expected = DOCS[name]
    # the docs' dataset_config is a placeholder (path/to/toml); a later option wins, as in argparse
    r = kern("import", "musubi", "--out", "job.toml", "--file", str(HERE / name), "--dataset_config", str(dataset))
    assert r.exit_code == 0, r.output
    for ignored in ("--sdpa", "--max_data_loader_n_workers", "--persistent_data_loader_workers"):
        assert f"ignored {ignored}:" in r.stderr
    job = load_job(here / "job.toml")
    plan = prepare(load_job(here / "job.toml", {"train.optimizer": "adamw"}))  # bitsandbytes is not installed here
    assert (plan.arch.name, plan.variant, plan.network.name) == (arch, variant, "lora")
    assert job.dataset.config == str(dataset)
    for dotted, value in expected.items():
        got = get(job, dotted)
        if dotted in PATHS:  # made absolute from where musubi ran
            assert Path(got) == here / value, dotted
        else:
            assert got == value, dotted
    # musubi's defaults where kern's differ are written out
    assert job.save.keep_last == 0 and "train.gradient_checkpointing" in job.given


def test_the_verbatim_command_refuses_epochs_it_cannot_count(here):
    r = kern("import", "musubi", "--file", str(HERE / "flux_2_docs.txt"))
    assert r.exit_code == 2
    assert "cannot translate --max_train_epochs" in r.stderr and "cannot translate --save_every_n_epochs" in r.stderr
    assert not (here / "job.toml").exists()


def test_untranslatable_options_are_refused_by_name(here, dataset):
    r = kern(
        "import", "musubi", "--out", "job.toml",
        "accelerate", "launch", "src/musubi_tuner/flux_2_train_network.py",
        "--dit", "d.safetensors", "--dataset_config", str(dataset), "--network_module", "networks.oft",
        "--xformers", "--resume", "old_state", "--full_bf16", "--made_up", "3",
        "--network_args", "algo=lokr", "--max_data_loader_n_workers", "2",
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    for option in ("network_module", "xformers", "resume", "full_bf16", "made_up", "network_args"):
        assert re.search(rf"cannot translate --{option}\b", r.stderr), option
    assert "ignored --max_data_loader_n_workers" in r.stderr
    assert not (here / "job.toml").exists()


def test_unknown_script_and_version_are_refused(here, dataset):
    r = kern("import", "musubi", "python", "src/musubi_tuner/qwen_image_train.py", "--dataset_config", str(dataset))
    assert r.exit_code == 2 and "full fine-tune" in r.stderr
    r = kern("import", "musubi", "qwen_image_train_network.py", "--model_version", "edit-9999",
             "--network_module", "networks.lora_qwen_image", "--dataset_config", str(dataset))  # fmt: skip
    assert r.exit_code == 2 and "edit-9999" in r.stderr


def test_a_musubi_config_file_and_overrides(here, dataset):
    (here / "cfg.toml").write_text(
        "[model]\n"
        'dit = "dit.safetensors"\nmodel_version = "edit-2511"\n'
        f'dataset_config = "{dataset}"\n'
        "[training]\n"
        'network_module = "networks.lora_qwen_image"\nnetwork_dim = 8\nnetwork_alpha = 4\n'
        "learning_rate = 2e-4\nmax_train_steps = 300\nseed = 7\nblocks_to_swap = 16\nfp8_base = true\n"
        'optimizer_type = "AdamW"\noptimizer_args = ["weight_decay=0.05", "betas=(0.9,0.99)"]\n'
        'lr_scheduler = "cosine_with_restarts"\nlr_scheduler_num_cycles = 3\nlr_warmup_steps = 0.1\n'
        'network_args = ["loraplus_lr_ratio=4", "exclude_patterns=[\'.*img_mod.*\']"]\n'
        'timestep_sampling = "qwen_shift"\nsave_every_n_steps = 100\nsave_last_n_steps = 300\n'
    )
    # musubi adds ".toml" to --config_file; the command line wins over the file
    r = kern("import", "musubi", "--out", "job.toml", "qwen_image_train_network.py", "--config_file", "cfg",
             "--learning_rate", "1e-4")  # fmt: skip
    assert r.exit_code == 0, r.output
    job = load_job(here / "job.toml")
    plan = prepare(job)
    assert (plan.arch.name, plan.variant) == ("qwen-image", "edit-2511")
    assert job.train.learning_rate == 1e-4 and job.train.steps == 300 and job.train.seed == 7
    assert (job.train.blocks_to_swap, job.train.base_precision) == (16, "fp8")
    assert job.train.optimizer == "adamw" and job.train.weight_decay == 0.05
    assert job.train.optimizer_args == {"betas": [0.9, 0.99]}
    assert (job.train.lr_scheduler, job.train.lr_scheduler_num_cycles, job.train.warmup_steps) == (
        "cosine_with_restarts", 3.0, 30,
    )  # fmt: skip
    assert job.network.options == {"rank": 8, "alpha": 4.0, "loraplus_lr_ratio": 4.0}
    assert job.network.exclude == [".*img_mod.*"]
    assert job.timesteps.method == "qwen_shift" and job.train.gradient_checkpointing is False  # musubi's default
    assert (job.save.every_n_steps, job.save.keep_last) == (100, 3)
    assert job.train.mixed_precision == "no"  # neither the script nor the launcher set it


def test_lycoris_loha_weights_and_base_weights(here, dataset):
    r = kern(
        "import", "musubi", "--out", "job.toml", "flux_2_train_network.py", "--model_version", "klein-base-4b",
        "--dataset_config", str(dataset), "--network_module", "lycoris.kohya", "--network_args", "algo=loha",
        "--network_weights", "start.safetensors", "--dim_from_weights",
        "--base_weights", "a.safetensors", "b.safetensors", "--base_weights_multiplier", "0.5",
        "--sample_prompts", "prompts.txt", "--sample_every_n_steps", "50", "--max_train_steps", "100",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    job = load_job(here / "job.toml")
    assert prepare(job).variant == "klein-base-4b"
    assert job.network.type == "loha" and "rank" not in job.network.options  # read from the file
    assert job.network.init_weights == str(here / "start.safetensors")
    assert job.model.base_weights == [f"{here / 'a.safetensors'}:0.5", f"{here / 'b.safetensors'}:1"]
    assert (job.sample.prompt_file, job.sample.every_n_steps) == (str(here / "prompts.txt"), 50)


def test_out_is_not_overwritten_without_the_flag(here, dataset):
    (here / "job.toml").write_text("keep")
    args = ["flux_2_train_network.py", "--dataset_config", str(dataset), "--network_module", "networks.lora_flux_2"]
    r = kern("import", "musubi", "--out", "job.toml", *args)
    assert r.exit_code == 2 and "--overwrite" in r.stderr and (here / "job.toml").read_text() == "keep"
    r = kern("import", "musubi", "--out", "job.toml", "--overwrite", *args)
    assert r.exit_code == 0, r.output and load_job(here / "job.toml").model.arch == "flux2"


def test_every_kern_key_in_the_migration_table_exists():
    """docs/migrating.md's tables: each backticked `section.key` in the kern column is a job key."""
    from tests.docs.test_docs import key_problem

    text = (ROOT / "docs" / "migrating.md").read_text(encoding="utf-8")
    rows = [line.split("|") for line in text.splitlines() if line.startswith("|") and "---" not in line]
    keys = {k for row in rows if len(row) > 3 for k in re.findall(r"`([a-z_]+\.[a-z_]+)`", row[2])}
    assert len(keys) > 30
    problems = [why for k in sorted(keys) if (why := key_problem(k))]
    assert not problems, problems


# LoKr and DoRA as musubi's own networks.lokr and LyCORIS (lycoris.kohya) write them.
FLUX2 = ["flux_2_train_network.py", "--model_version", "klein-4b", "--max_train_steps", "10"]


def imported(here, dataset, module: str, *args: str) -> tuple[Result, JobConfig | None]:
    r = kern("import", "musubi", "--out", "job.toml", *FLUX2, "--dataset_config", str(dataset),
             "--network_module", module, "--network_args", *args)  # fmt: skip
    return r, (load_job(here / "job.toml") if r.exit_code == 0 else None)


def test_lycoris_lokr_with_its_options(here, dataset):
    r, job = imported(here, dataset, "lycoris.kohya", "algo=lokr", "factor=16", "decompose_both=True",
                      "rank_dropout=0.1", "rs_lora=True", "conv_dim=4")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert job.network.type == "lokr" and prepare(job).network.name == "lokr"
    assert job.network.options == {
        "rank": 4, "alpha": 1.0, "factor": 16, "decompose_both": True, "use_rslora": True, "rank_dropout": 0.1,
    }  # fmt: skip
    assert "ignored --network_args conv_dim" in r.stderr


def test_musubis_own_lokr(here, dataset):
    # musubi's networks.lokr (30c658c) is LyCORIS' LoKr with W1 always full: it reads factor, not decompose_both
    r, job = imported(here, dataset, "networks.lokr", "factor=-4", "decompose_both=True")
    assert r.exit_code == 0, r.stderr
    assert job.network.type == "lokr" and job.network.options["factor"] == -1  # any negative factor is -1 there
    assert "decompose_both" not in job.network.options and "ignored --network_args decompose_both" in r.stderr


@pytest.mark.parametrize("algo", ["lora", "locon"])
def test_lycoris_dora_is_kerns_lora_with_dora(here, dataset, algo):
    r, job = imported(here, dataset, "lycoris.kohya", f"algo={algo}", "dora_wd=True", "wd_on_output=True")
    assert r.exit_code == 0, r.stderr
    assert job.network.type == "lora" and job.network.options["dora"] is True
    assert prepare(job).network.name == "lora" and "note: dora_wd" in r.stderr


@pytest.mark.parametrize(
    ("module", "args", "named", "says"),
    [
        ("lycoris.kohya", ["algo=lora", "dora_wd=True", "wd_on_output=False"], " wd_on_output", "per input column"),
        ("lycoris.kohya", ["algo=lokr", "dora_wd=True"], " dora_wd", "option of the lora network"),
        ("lycoris.kohya", ["algo=loha", "dora_wd=True"], " dora_wd", "option of the lora network"),
        ("networks.lora_flux_2", ["dora_wd=True"], " dora_wd", "has no DoRA"),
        ("lycoris.kohya", ["algo=lokr", "decompose_both=False"], " decompose_both", "reads as true"),
        ("lycoris.kohya", ["algo=lokr", "factor=0"], " factor", "splits nothing"),
        ("lycoris.kohya", ["algo=lokr", "unbalanced_factorization=True"], " unbalanced_factorization", "no such"),
        ("networks.lokr", ["loraplus_lr_ratio=4"], " loraplus_lr_ratio", "LoRA+"),
        ("lycoris.kohya", ["algo=ia3"], ": algo=ia3", "no ia3 network type"),
    ],
)
def test_lokr_and_dora_arguments_kern_lacks_are_refused_by_name(here, dataset, module, args, named, says):
    r, _ = imported(here, dataset, module, *args)
    assert r.exit_code == 2, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith(f"cannot translate --network_args{named}"))
    assert says in line, line
    assert not (here / "job.toml").exists()
