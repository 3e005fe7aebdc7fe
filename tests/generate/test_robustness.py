"""`kern generate` with bad input, on the example toy architecture: every case is a clear error naming the option,
file or line before any model loads (exit 2), nothing in --out is created or replaced, and interactive sessions
survive bad lines. The Qwen-Image / FLUX.2 cases (batches with variable-length text, Layered processor files)
are in tests/qwen_image/test_generate_robustness.py and tests/flux2/test_generate_robustness.py."""

from __future__ import annotations

import json
import os

import pytest
from kern.data.prompts import MAX_SEED, Request, Wildcards, read_prompt_file
from kern.errors import KernError, UsageError
from kern.generate.driver import Generator, Setup, run_batch, run_interactive
from kern.generate.outputs import contact_sheet, next_index, publish
from PIL import Image

from tests.conftest import run_kern


@pytest.fixture
def toy(monkeypatch):
    from kern.core import plugins

    from tests.conftest import REPO

    monkeypatch.setenv(plugins.ENV_DENY, "toy")  # an in-tree build may have left an entry point for it
    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugins" / "kern-toy"))
    import kern_toy.plugin as toy_plugin

    manager = plugins.build_manager(extra=[("toy", toy_plugin)])
    monkeypatch.setattr(plugins, "_MANAGER", manager)
    return manager


def setup(tmp_path, **kw):
    kw = {"width": 16, "height": 16, "steps": 2, "dtype": "float32", "device": "cpu", **kw}
    return Setup(arch="toy", out=tmp_path / "out", **kw)


def kern_toy(toy_site, *args, input=None, cwd=None):
    return run_kern(
        "generate",
        "--arch",
        "toy",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--steps",
        "2",
        "-W",
        "16",
        "-H",
        "16",
        *args,
        pythonpath=[toy_site],
        input=input,
        cwd=cwd,
    )


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else None


def png(path, size=(16, 16), mode="RGB"):
    Image.new(mode, size, (200, 30, 30)).save(path)
    return path


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--width", "1000000000", "--width"),
        ("--guidance", "nan", "not a finite number"),
        ("--seed", "-1", "--seed"),
        ("--seed", str(2**64), "--seed"),
        ("--steps", "0", "--steps"),
        ("--count", "99999999", "--count"),
    ],
)
def test_cli_numbers_out_of_range_are_usage_errors_before_anything(toy_site, tmp_path, option, value, message):
    out = tmp_path / "out"
    proc = kern_toy(toy_site, "-p", "a cat", option, value, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("width", 0, "--width"),
        ("width", 10**9, "--width"),
        ("height", -16, "--height"),
        ("steps", 0, "--steps"),
        ("steps", 10**6, "--steps"),
        ("guidance", float("nan"), "--guidance"),
        ("guidance", float("-inf"), "--guidance"),
        ("seed", -1, "--seed"),
        ("seed", MAX_SEED + 1, "--seed"),
        ("count", 0, "--count"),
        ("count", 10**8, "--count"),
        ("batch_size", 0, "--batch-size"),
        ("layers", 0, "--layers"),
        ("layers", 10**6, "--layers"),
        ("width", 16.5, "--width"),
    ],
)
def test_setup_numbers_out_of_range_name_the_option(tmp_path, toy, field, value, option):
    with pytest.raises(UsageError, match=option):
        Generator(setup(tmp_path, **{field: value}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a cat --g nan", "--g must be a finite number"),
        ("a cat --g inf", "--g must be a finite number"),
        ("a cat --g 1e999", "--g must be a finite number"),
        ("a cat --d -1", "--d must be at least 0"),
        ("a cat --d 18446744073709551616", "--d must be at most 18446744073709551615"),
        ("a cat --w 1e9", "--w wants int"),
        ("a cat --w 1000000000", "--w must be at most 16384"),
        ("a cat --s 0", "--s must be at least 1"),
        ("a cat --s 999999", "--s must be at most"),
        ("a cat --f 99999999", "--f must be at most"),
        ("a cat --layers 100000", "--layers must be at most"),
    ],
)
def test_prompt_file_numbers_out_of_range_name_file_and_line(tmp_path, line, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"# header\na good line --w 16\n{line}\n")
    with pytest.raises(UsageError, match=message) as err:
        read_prompt_file(prompts)
    assert f"{prompts}:3" in str(err.value)


def test_cli_prompt_file_with_a_bad_line_writes_nothing(toy_site, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog --d 3\n\na cat --g nan\n")
    out = tmp_path / "out"
    proc = kern_toy(toy_site, "--from-file", str(prompts), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert f"{prompts}:3: --g must be a finite number" in proc.stderr
    assert not out.exists()


def test_planned_sizes_are_checked_against_the_step_and_the_maximum(tmp_path, toy):
    gen = Generator(setup(tmp_path))
    with pytest.raises(UsageError, match=r"p.txt:2: size 12x16 is not a multiple of 8"):
        gen.plan([Request(prompt="x", width=12, source="p.txt:2")])
    with pytest.raises(UsageError, match=r"p.txt:4: size 4x16 is not a multiple of 8"):
        gen.plan([Request(prompt="x", width=4, source="p.txt:4")])
    with pytest.raises(UsageError, match=r"p.txt:3: width \(--w/--width\) must be at least 1"):
        gen.plan([Request(prompt="x", width=0, source="p.txt:3")])
    with pytest.raises(UsageError, match=r"p.txt:5: seeds .* leave 0\.\.18446744073709551615"):
        gen.plan([Request(prompt="x", seed=MAX_SEED, count=2, source="p.txt:5")])
    (last,) = gen.plan([Request(prompt="x", seed=MAX_SEED)])  # the largest seed torch takes is fine
    assert last.seed == MAX_SEED
    with pytest.raises(UsageError, match=r"p.txt:6: --layers 2: toy base does not make layers"):
        gen.plan([Request(prompt="x", extra={"layers": 2}, source="p.txt:6")])


# --------------------------------------------------------------------------- files and folders


def test_missing_model_files_and_folders_name_the_option(tmp_path, toy):
    for field, option in (("transformer", "--transformer"), ("vae", "--vae"), ("text_encoder", "--text-encoder")):
        with pytest.raises(UsageError, match=f"{option} .*nope: no such file or folder"):
            Generator(setup(tmp_path, **{field: str(tmp_path / "nope")}))
    with pytest.raises(UsageError, match="--wildcards .*: no such folder"):
        Generator(setup(tmp_path, wildcards=str(tmp_path / "cards")))
    with pytest.raises(UsageError, match="--variant nope: toy has no such variant; variants: base"):
        Generator(setup(tmp_path, variant="nope"))
    with pytest.raises(UsageError, match="--device bogus: not a device"):
        Generator(setup(tmp_path, device="bogus"))
    with pytest.raises(UsageError, match="--dtype"):
        Generator(setup(tmp_path, dtype="int8"))
    assert not (tmp_path / "out").exists()


def test_cli_missing_vae_is_refused_before_any_work(toy_site, tmp_path):
    out = tmp_path / "out"
    proc = kern_toy(toy_site, "-p", "a cat", "--vae", str(tmp_path / "missing.safetensors"), "--out", str(out))
    assert proc.returncode == 2 and "--vae" in proc.stderr and "missing.safetensors" in proc.stderr, proc.stderr
    assert not out.exists()


def test_cli_out_must_be_a_writable_folder(toy_site, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    proc = kern_toy(toy_site, "-p", "a cat", "--out", str(blocker / "sub"))
    assert proc.returncode == 2, proc.stderr
    assert "--out" in proc.stderr and "cannot write there" in proc.stderr
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the permission check cannot fail")
def test_read_only_out_folder_is_refused_before_loading(tmp_path, toy, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    loads = []
    monkeypatch.setattr(toy.hook, "load_model", lambda **kw: loads.append(kw))
    try:
        with pytest.raises(UsageError, match="--out .*cannot write there"):
            run_batch(setup(tmp_path), [Request(prompt="a cat")])
    finally:
        out.chmod(0o755)
    assert loads == [] and list(out.iterdir()) == []


def test_model_that_fails_to_load_leaves_no_out_folder(toy_site, tmp_path):
    not_a_model = tmp_path / "model.safetensors"
    not_a_model.write_text("not safetensors")
    out = tmp_path / "new" / "out"
    proc = kern_toy(toy_site, "-p", "a cat", "--transformer", str(not_a_model), "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    assert "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["text", "truncated", "folder", "missing", "too_small"])
def test_unreadable_reference_images_name_the_line(tmp_path, toy, kind):
    path = tmp_path / "ref.png"
    if kind == "text":
        path.write_text("not an image")
    elif kind == "truncated":
        png(path, (64, 64))
        path.write_bytes(path.read_bytes()[:80])
    elif kind == "folder":
        path.mkdir()
    elif kind == "too_small":
        png(path, (4, 4))
    gen = Generator(setup(tmp_path))
    with pytest.raises(UsageError, match=r"p.txt:7: reference image .*ref.png") as err:
        gen.plan([Request(prompt="x", extra={"ci": [str(path)]}, source="p.txt:7")])
    assert ("cannot read it" in str(err.value)) != (kind == "too_small")


def test_cli_reference_that_is_not_an_image(toy_site, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    out = tmp_path / "out"
    proc = kern_toy(toy_site, "-p", "a cat", "--ref", str(text), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert f"reference image {text}: cannot read it" in proc.stderr
    assert not out.exists()


def test_prompt_file_errors(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(UsageError, match="is a folder, not a prompt file"):
        read_prompt_file(folder)
    with pytest.raises(UsageError, match="prompt file not found"):
        read_prompt_file(tmp_path / "missing.txt")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a cat\nun caf\xe9 --w 16\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.txt:2: the prompt file is not UTF-8 text .*save it as UTF-8"):
        read_prompt_file(latin)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("a cat\n", encoding="utf-16")
    with pytest.raises(UsageError, match="not UTF-8"):
        read_prompt_file(utf16)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n   \n")
    with pytest.raises(UsageError, match="empty.txt: no prompts"):
        read_prompt_file(empty)
    only_options = tmp_path / "opts.txt"
    only_options.write_text("a cat\n--w 32 --d 3\n")
    with pytest.raises(UsageError, match=r"opts.txt:2: this line has only options and there is no --prompt"):
        read_prompt_file(only_options)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a cat\x00 dog\n")
    with pytest.raises(UsageError, match=r"nul.txt:1: .*NUL"):
        read_prompt_file(nul)
    with pytest.raises(UsageError, match="/dev/zero: the prompt file is larger than 64 MiB"):
        read_prompt_file("/dev/zero")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa café --w 32\n".encode("utf-8"))
    (request,) = read_prompt_file(bom)
    assert request.prompt == "a café" and request.width == 32


@pytest.mark.parametrize("content", [b"", b"# nothing\n", "caf\xe9\n".encode("latin-1")])
def test_cli_unusable_prompt_files_are_usage_errors(toy_site, tmp_path, content):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(content)
    proc = kern_toy(toy_site, "--from-file", str(prompts), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert str(prompts) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_weights_multiplier_must_be_finite(toy_site, tmp_path):
    import torch
    from kern.core.io import save_file

    adapter = tmp_path / "a.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, adapter)
    for bad in ("nan", "inf"):
        proc = kern_toy(toy_site, "-p", "a cat", "--weights", f"{adapter}:{bad}", "--out", str(tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr
        assert "--weights" in proc.stderr and bad in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- wildcards


@pytest.fixture
def cards(tmp_path):
    folder = tmp_path / "cards"
    (folder / "sub").mkdir(parents=True)
    (folder / "color.txt").write_text("red\n")
    (folder / "sub" / "shade.txt").write_text("dark\n")
    (tmp_path / "secret.txt").write_text("the secret\n")
    (folder / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (folder / "out_link").symlink_to(tmp_path)
    (folder / "nested.txt").write_text("a __../secret__ b\n")
    (folder / "inner.txt").symlink_to(folder / "color.txt")  # a link that stays inside is fine
    return folder


@pytest.mark.parametrize("name", ["../secret", "sub/../../secret", "/etc/passwd", "leak", "out_link/secret", "nested"])
def test_wildcards_cannot_leave_their_folder(cards, name):
    import random

    with pytest.raises(UsageError, match=r"p.txt:4: wildcard __.*__ points outside the --wildcards folder"):
        Wildcards(cards).expand(f"a __{name}__", random.Random(0), "p.txt:4")


def test_wildcards_inside_the_folder_still_work(cards):
    import random

    text = Wildcards(cards).expand("__color__ __sub/shade__ __inner__", random.Random(0), "x")
    assert text == "red dark red"


def test_wildcard_files_must_be_utf8_and_may_have_a_bom(tmp_path):
    import random

    (tmp_path / "bad.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "bom.txt").write_bytes("\ufeffcafé\n".encode("utf-8"))
    (tmp_path / "dir.txt").mkdir()
    (tmp_path / "huge.txt").write_text("a:" + "9" * 400 + "\n")
    cards = Wildcards(tmp_path)
    with pytest.raises(UsageError, match=r"bad.txt:1: the wildcard file is not UTF-8 text"):
        cards.expand("__bad__", random.Random(0), "p.txt:1")
    assert cards.expand("__bom__", random.Random(0), "p.txt:1") == "café"
    with pytest.raises(UsageError, match=r"dir.txt: is a folder"):
        cards.expand("__dir__", random.Random(0), "p.txt:1")
    with pytest.raises(UsageError, match=r"huge.txt:1: weight"):
        cards.expand("__huge__", random.Random(0), "p.txt:1")


def test_wildcard_expansion_is_bounded(tmp_path):
    import random

    for i in range(15):
        (tmp_path / f"w{i}.txt").write_text(f"__w{i + 1}__ __w{i + 1}__\n")
    (tmp_path / "w15.txt").write_text("x\n")
    with pytest.raises(UsageError, match="more than 10000 wildcard substitutions"):
        Wildcards(tmp_path).expand("__w0__", random.Random(0), "p.txt:1")


def test_cli_wildcard_escape_writes_nothing(toy_site, tmp_path, cards):
    out = tmp_path / "out"
    proc = kern_toy(toy_site, "-p", "a __../secret__", "--wildcards", str(cards), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "<command line>: wildcard __../secret__ points outside the --wildcards folder" in proc.stderr
    assert "the secret" not in proc.stderr + proc.stdout and not out.exists()


# --------------------------------------------------------------------------- never replace


def test_cli_second_run_into_the_same_folder_replaces_nothing(toy_site, tmp_path):
    out = tmp_path / "out"
    first = kern_toy(toy_site, "-p", "a cat", "--count", "2", "--grid", "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    assert sorted(before) == ["00000_0.png", "00001_1.png", "grid.png"]
    second = kern_toy(toy_site, "-p", "a dog", "--count", "2", "--grid", "--out", str(out))
    assert second.returncode == 0, second.stderr
    after = snapshot(out)
    assert sorted(after) == ["00000_0.png", "00001_1.png", "00002_0.png", "00003_1.png", "grid-1.png", "grid.png"]
    assert {k: after[k] for k in before} == before  # the first run's files, byte for byte
    assert second.stdout.split() == [str(out / n) for n in ("00002_0.png", "00003_1.png", "grid-1.png")]
    assert json.loads(Image.open(out / "00002_0.png").text["kern"])["prompt"] == "a dog"


def test_numbering_continues_after_the_highest_index_and_keeps_foreign_files(tmp_path, toy):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00041_9_layer2.png").write_bytes(b"mine")
    (out / "notes.png").write_bytes(b"also mine")
    paths = run_batch(setup(tmp_path), [Request(prompt="a cat", seed=5, count=2)])
    assert [p.name for p in paths] == ["00042_5.png", "00043_6.png"]
    assert (out / "00041_9_layer2.png").read_bytes() == b"mine" and (out / "notes.png").read_bytes() == b"also mine"
    assert next_index(out) == 44 and next_index(tmp_path / "nowhere") == 0


def test_a_name_taken_meanwhile_gets_the_next_one(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "00000_1.png").write_bytes(b"existing")

    def write(tmp):
        # Another run publishes "00000_1-1.png" while this one writes: the link fails, the next name is used.
        if not (folder / "00000_1-1.png").exists():
            (folder / "00000_1-1.png").write_bytes(b"other run")
        tmp.write_bytes(b"new")

    path = publish(folder, "00000_1", write)
    assert path.name == "00000_1-2.png" and path.read_bytes() == b"new"
    assert (folder / "00000_1.png").read_bytes() == b"existing" and (
        folder / "00000_1-1.png"
    ).read_bytes() == b"other run"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("stem", ["../escape", "sub/x", "", ".", "..", ".hidden", "a\x00b"])
def test_output_names_cannot_leave_the_folder(tmp_path, stem):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(KernError, match="not a plain file name"):
        publish(folder, stem, lambda tmp: tmp.write_bytes(b"x"))
    assert list(tmp_path.rglob("*")) == [folder]


def test_named_saves_as_the_trainer_makes_them_never_replace(tmp_path, toy):
    gen = Generator(setup(tmp_path))
    images = gen.plan([Request(prompt="a cat", seed=3)])
    gen.denoise(images, gen.encode(images))
    name = lambda im, layer: f"step-000010_{im.index:02d}"  # noqa: E731 - kern.train.driver.Sampler's names
    first = gen.decode_and_save(images, name=name)
    again = gen.decode_and_save(images, name=name)
    assert [p.name for p in first + again] == ["step-000010_00.png", "step-000010_00-1.png"]
    with pytest.raises(KernError, match="not a plain file name"):
        gen.decode_and_save(images, name=lambda im, layer: "../../escaped")
    assert not list(tmp_path.glob("escaped*"))


def test_grid_never_replaces(tmp_path, toy):
    folder = tmp_path / "g"
    folder.mkdir()
    cells = [png(folder / f"{i}.png") for i in range(2)]
    (folder / "grid.png").write_bytes(b"an older grid")
    sheet = contact_sheet(cells, folder / "grid.png")
    assert sheet.name == "grid-1.png" and Image.open(sheet).size == (32, 16)
    assert (folder / "grid.png").read_bytes() == b"an older grid"


# --------------------------------------------------------------------------- interactive


def test_cli_interactive_session_survives_every_kind_of_bad_line(toy_site, tmp_path):
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "color.txt").write_text("red\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    lines = [
        "a __color__ cat --d 1",  # fine
        '--n "unclosed',  # parse error
        "a cat --w 1e9",  # bad number
        "a cat --g nan",  # not finite
        "a __missing__ dog",  # missing wildcard
        "a __../x__ dog",  # wildcard escape
        f"a cat --ci {tmp_path / 'nope.png'}",  # missing reference
        f"a cat --ci {notes}",  # a reference that is not an image
        "a cat --bogus 3",  # unknown option
        "a cat --w 12",  # not a multiple of the step
        "a dog --d 2",  # fine again
        "exit",
        "never read --d 3",
    ]
    out = tmp_path / "out"
    proc = kern_toy(toy_site, "--wildcards", str(cards), "-i", "--out", str(out), input="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout.splitlines()
    errors = [s for s in said if s.startswith("error:")]
    assert len(errors) == 9, said
    for n, error in zip((2, 3, 4, 5, 6, 7, 8, 9, 10), errors):
        assert error.startswith(f"error: <stdin>:{n}: ")
    assert [s for s in said if s.startswith("saved ")] == [
        f"saved {out / '00000_1.png'}",
        f"saved {out / '00001_2.png'}",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["00000_1.png", "00001_2.png"]
    assert "Traceback" not in proc.stderr


def test_interactive_line_that_fails_while_generating_is_reported(tmp_path, toy, monkeypatch):
    real = toy.hook.decode_latents
    calls = []

    def flaky(**kw):
        calls.append(1)
        if len(calls) == 1:
            raise KernError("the VAE hiccuped")
        return real(**kw)

    monkeypatch.setattr(toy.hook, "decode_latents", flaky)
    said = []
    made = run_interactive(setup(tmp_path), iter(["a cat --d 1\n", b"a dog --d 2\n", b"\xff\n"]), None, said.append)
    assert said[1] == "error: the VAE hiccuped" and said[3] == "error: <stdin>:3: the line is not UTF-8 text"
    assert [p.name for p in made] == ["00000_2.png"] and said[2] == f"saved {made[0]}"


def test_interactive_models_that_fail_to_load_end_the_session_at_once(tmp_path, toy, monkeypatch):
    def broken(**kw):
        raise KernError("broken model")

    monkeypatch.setattr(toy.hook, "load_model", broken)
    said = []
    with pytest.raises(KernError, match="broken model"):
        run_interactive(setup(tmp_path), iter(["a cat\n"]), None, said.append)
    assert said == [] and not (tmp_path / "out").exists()
