"""`kern train` on bad input and faults, where a user meets them: exit codes, messages, and nothing lost.

Run folders are locked, an earlier run is never replaced unasked, signals end in a checkpoint, resume trusts no
pickle and survives a damaged checkpoint or a torn metrics line, and the debris of a killed run is cleared.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kern.core.io import load_file

from tests.conftest import REPO, run_kern
from tests.helpers import make_dataset

TOY = [REPO / "examples" / "plugins" / "kern-toy"]
BASE = (
    "--arch",
    "toy",
    "--network-opt",
    "rank=4",
    "--set",
    "model.dtype=float32",
    "--set",
    "train.mixed_precision=no",
    "--set",
    "train.device=cpu",
    "--set",
    "train.gradient_checkpointing=false",
    "--lr",
    "0.003",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n=2)


def train_cli(dataset, out, *extra, **kw):
    return run_kern("train", *BASE, "--dataset", str(dataset), "--out", str(out), *extra, pythonpath=TOY, **kw)


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".kern.lock"
    }


def same_tensors(a: Path, b: Path) -> None:
    ta, _ = load_file(a)
    tb, _ = load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# --------------------------------------------------------------------------- an earlier run


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path, dataset):
    out = tmp_path / "run"
    assert train_cli(dataset, out, "--steps", "2").returncode == 0
    before = snapshot(out)
    proc = train_cli(dataset, out, "--steps", "3")
    assert proc.returncode == 2, proc.stderr
    assert "holds an earlier run" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(out) == before
    (out / "notes.txt").write_text("mine")
    proc = train_cli(dataset, out, "--steps", "3", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes kern's files only
    assert train_cli(dataset, out, "--resume", "--overwrite").returncode == 2


def test_a_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(tmp_path, dataset):
    from kern.train.runs import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        proc = train_cli(dataset, out, "--steps", "2")
        assert proc.returncode == 2, proc.stderr
        assert "in use by another kern train" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == [".kern.lock"]
    # A lock file left by a killed process (its content says who; nobody holds the lock).
    (out / ".kern.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "yesterday"}))
    proc = train_cli(dataset, out, "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "stale run lock" in proc.stderr and "pid 999999" in proc.stderr


# --------------------------------------------------------------------------- signals


SIGNAL_STEPS = "120"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("full") / "run"
    proc = train_cli(dataset, out, "--steps", SIGNAL_STEPS, "--set", "save.every_n_steps=5")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_ends_in_a_checkpoint_and_resume_is_exact(tmp_path, dataset, uninterrupted, signum):
    out = tmp_path / "part"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERN_")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, TOY), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kern_cli.main",
            "train",
            *BASE,
            "--dataset",
            str(dataset),
            "--out",
            str(out),
            "--steps",
            SIGNAL_STEPS,
            "--set",
            "save.every_n_steps=5",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 7):
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert not (out / "adapter.safetensors").exists()
    if signum == signal.SIGKILL:  # no say in the matter: whatever checkpoint was complete is what resume finds
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signum, err
        assert (
            f"stopped by {signal.Signals(signum).name} after step" in err
            and "--resume" in err
            and "Traceback" not in err
        )
        done = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
        assert 7 <= done[-1] < int(SIGNAL_STEPS)
        assert (out / "checkpoints" / f"step-{done[-1]:06d}").is_dir()  # the step it finished

    proc = train_cli(dataset, out, "--steps", SIGNAL_STEPS, "--set", "save.every_n_steps=5", "--resume")
    assert proc.returncode == 0, proc.stderr
    same_tensors(uninterrupted / "adapter.safetensors", out / "adapter.safetensors")
    assert (out / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()
    assert not list(out.rglob(".*.tmp"))


# --------------------------------------------------------------------------- resume trusts nothing


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_a_state_file(tmp_path, dataset):
    out = tmp_path / "run"
    marker = tmp_path / "pwned"
    step = out / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "state.pt").write_bytes(pickle.dumps({"step": _Payload(marker)}))
    (step / "adapter.safetensors").write_bytes(b"")
    torch.save({"step": _Payload(marker)}, step / "other.pt")
    proc = train_cli(dataset, out, "--steps", "4", "--resume")
    assert proc.returncode == 2, proc.stderr
    assert "pickle" in proc.stderr and "step-000002" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_resume_skips_a_damaged_checkpoint_and_tolerates_a_torn_metrics_line(tmp_path, dataset):
    full = tmp_path / "full"
    assert train_cli(dataset, full, "--steps", "6").returncode == 0
    out = tmp_path / "run"
    assert train_cli(dataset, out, "--steps", "6", "--set", "save.every_n_steps=2").returncode == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    (out / "adapter.safetensors").unlink()  # unfinished (killed before its final save): a finished one is not redone
    for step in ("step-000006", "step-000004"):  # the last step has a checkpoint too (issue 17): damage both
        damaged = out / "checkpoints" / step / "state.safetensors"
        data = bytearray(damaged.read_bytes())
        data[-5] ^= 0xFF  # one byte of tensor data: the header still reads, only the digest can tell
        damaged.write_bytes(bytes(data))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a write torn by kill -9
    # Debris of a killed process: temporary files of atomic writes, a half-written checkpoint folder.
    (out / ".adapter.safetensors.x1y2.tmp").write_bytes(b"partial")
    (out / "checkpoints" / ".step-000006.tmp").mkdir()
    # ... and in the dataset's cache folder, which other runs may share: only temp files over an hour old go.
    cache = dataset.parent / "cache"
    old, fresh = (
        cache / ".img0_0064x0064_toy.safetensors.ab12CD34.tmp",
        cache / ".img1_0064x0064_toy.safetensors.zz99YY88.tmp",
    )
    for f in (old, fresh):
        f.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))

    proc = train_cli(dataset, out, "--steps", "6", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "damaged checkpoint skipped" in proc.stderr and "step-000004" in proc.stderr
    same_tensors(full / "adapter.safetensors", out / "adapter.safetensors")
    assert (out / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*.tmp"))
    assert not old.exists() and fresh.exists()
    fresh.unlink()


def test_resume_with_no_intact_checkpoint_names_them(tmp_path, dataset):
    out = tmp_path / "run"
    assert train_cli(dataset, out, "--steps", "4", "--set", "save.every_n_steps=2").returncode == 0
    for step in ("step-000002", "step-000004"):  # the last step has a checkpoint too (issue 17)
        (out / "checkpoints" / step / "state.json").write_text("{not json")
    proc = train_cli(dataset, out, "--steps", "4", "--resume")
    assert proc.returncode == 2
    assert "no intact checkpoint" in proc.stderr and "step-000002" in proc.stderr and "state.json" in proc.stderr


def test_resume_with_another_network_is_a_clear_error(tmp_path, dataset):
    out = tmp_path / "run"
    assert train_cli(dataset, out, "--steps", "4", "--set", "save.every_n_steps=2").returncode == 0
    proc = train_cli(dataset, out, "--steps", "6", "--resume", "--network-opt", "rank=8")  # 6: continue it
    assert proc.returncode == 2, proc.stderr
    assert "does not fit this job" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- files kern writes


def test_files_follow_the_umask(tmp_path, dataset):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERN_")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, TOY), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kern_cli.main",
            "train",
            *BASE,
            "--dataset",
            str(dataset),
            "--out",
            str(out),
            "--steps",
            "2",
            "--set",
            "save.every_n_steps=1",
        ],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o027),
    )
    assert proc.returncode == 0, proc.stderr
    for name in (
        "adapter.safetensors",
        "config.toml",
        "checkpoints/step-000001/state.json",
        "checkpoints/step-000001/adapter.safetensors",
    ):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name


def test_a_full_disk_during_a_checkpoint_is_one_clear_line_and_keeps_the_last_checkpoint(
    tmp_path, dataset, kern_main, monkeypatch
):
    import errno

    from kern.train import state

    real = state.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata)

    monkeypatch.setattr(state, "save_file", full_disk)
    out = tmp_path / "run"
    code, err = kern_main(
        "train", *BASE, "--dataset", str(dataset), "--out", str(out), "--steps", "6", "--set", "save.every_n_steps=2"
    )
    assert code == 1
    assert "no space left on device" in err and "Traceback" not in err and "inline_container" not in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # the failed one left nothing behind


# --------------------------------------------------------------------------- checked before any work


@pytest.mark.parametrize(
    "args, names",
    [
        (("--lr", "nan"), "train.learning_rate"),
        (("--lr", "0"), "train.learning_rate"),
        (("--lr", "-1e-4"), "train.learning_rate"),
        (("--steps", "0"), "train.steps"),
        (("--steps", str(10**12)), "train.steps"),
        (("--network-opt", "rank=0"), "'rank'"),
        (("--network-opt", "rank=-4"), "'rank'"),
        (("--network-opt", "alpha=nan"), "'alpha'"),
        (("--network-opt", "dropout=1.5"), "'dropout'"),
        (("--network-opt", "rank_pattern=['(=4']"), "rank_pattern"),
        (("--network-opt", "rank_pattern=['blocks.*=0']"), "rank_pattern"),
        (("--network-opt", "colour=red"), "colour"),
        (("--set", "train.gradient_accumulation=0"), "train.gradient_accumulation"),
        (("--set", "train.max_grad_norm=inf"), "train.max_grad_norm"),
        (("--set", "train.seed=-1"), "train.seed"),
        (("--set", f"train.seed={2**70}"), "train.seed"),
        (("--set", "train.device=banana"), "train.device"),
        (("--set", "train.device=cuda:1"), "CUDA_VISIBLE_DEVICES"),
        (("--set", "train.optimizer=sgdx"), "train.optimizer"),
        (("--set", "train.selective_blocks=4"), "train.selective_blocks"),
        (("--set", "train.bogus=1"), "train.bogus"),
        (("--set", "save.name=../escape"), "save.name"),
        (("--set", "save.name=a/b"), "save.name"),
        (("--set", "save.name=.hidden"), "save.name"),
        (("--set", "save.keep_last=-1"), "save.keep_last"),
        (("--set", "sample.width=512"), "sample.width"),
        (("--set", "sample.prompts=['a cat --w 33']"), "multiple of"),
        (("--set", "sample.prompts=['a cat --g nan']"), "sample.prompts[0]"),
        (("--set", "timesteps.method=bogus"), "timesteps.method"),
        (("--set", "timesteps.sigmoid_scale=nan"), "sigmoid_scale"),
        (("--set", "timesteps.min_timestep=900", "--set", "timesteps.max_timestep=100"), "min_timestep"),
        (("--set", "network.targets=['(']"), "network.targets[0]"),
        (("--set", "model.transformer=/no/such/file.safetensors"), "model.transformer"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, dataset, args, names, kern_main):
    out = tmp_path / "run"
    code, err = kern_main("train", *BASE, "--dataset", str(dataset), "--out", str(out), *args)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("kern: error:")]
    assert len(lines) == 1 and names in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_bad_setting_at_the_command_line_of_a_new_process(tmp_path, dataset):
    proc = train_cli(dataset, tmp_path / "run", "--lr", "nan")
    assert proc.returncode == 2 and proc.stderr.startswith("kern: error:") and "train.learning_rate" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_an_unusable_output_folder_fails_before_any_work(tmp_path, dataset):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        proc = train_cli(dataset, out)
        assert proc.returncode == 2, proc.stderr
        assert "save.out" in proc.stderr and str(blocker) in proc.stderr and "Traceback" not in proc.stderr
    assert blocker.read_text() == "x"


def test_job_files_that_cannot_be_read(tmp_path):
    bad = tmp_path / "job.toml"
    bad.write_bytes(b"[train]\nsteps = 3\n# caf\xe9\n")
    proc = run_kern("train", "--config", str(bad))
    assert (
        proc.returncode == 2 and str(bad) in proc.stderr and "UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    )
    proc = run_kern("train", "--config", str(tmp_path))
    assert proc.returncode == 2 and "is a directory" in proc.stderr


def test_an_architecture_that_needs_files_names_the_missing_one(tmp_path, dataset):
    proc = run_kern("train", "--arch", "flux2-klein-4b", "--dataset", str(dataset), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "model.transformer is not set" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_layered_training_is_refused_at_start(tmp_path, dataset):
    some = tmp_path / "some.safetensors"
    some.write_bytes(b"x")
    proc = run_kern(
        "train",
        "--arch",
        "qwen-image-layered",
        "--dataset",
        str(dataset),
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"model.transformer={some}",
        "--set",
        f"model.vae={some}",
        "--set",
        f"model.text_encoder={tmp_path}",
    )
    assert proc.returncode == 2, proc.stderr
    assert "layered cannot be trained" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unexpected_errors_show_a_traceback_only_with_vv(tmp_path, dataset, kern_main, monkeypatch):
    from kern.train import driver as train

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "latent_phase", broken)
    for flags, traceback in (((), False), (("-vv",), True)):
        code, err = kern_main(
            *flags,
            "train",
            *BASE,
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path / f"run{len(flags)}"),
            "--steps",
            "2",
        )
        assert code == 1
        assert "unexpected ZeroDivisionError: a bug" in err
        assert ("Traceback" in err) == traceback


def test_kern_cache_checks_before_any_work(tmp_path, kern_main):
    dataset = make_dataset(tmp_path / "data", n=1)
    code, err = kern_main("cache", "latents", "--arch", "flux2-klein-4b", "--dataset", str(dataset))
    assert code == 2 and "model.vae is not set" in err
    code, err = kern_main(
        "cache", "text", "--arch", "flux2-klein-4b", "--dataset", str(dataset), "--text-encoder", str(tmp_path / "nope")
    )
    assert code == 2 and "model.text_encoder" in err and "no such file" in err
    code, err = kern_main(
        "cache",
        "all",
        "--arch",
        "qwen-image-layered",
        "--dataset",
        str(dataset),
        "--vae",
        str(dataset),
        "--text-encoder",
        str(tmp_path),
    )
    assert code == 2 and "cannot be trained" in err
    assert not (dataset.parent / "cache").exists()
