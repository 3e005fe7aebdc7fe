"""Plugins cannot break kern: whatever a plugin raises or declares, it is reported and left out, the others load,
and no third-party plugin can take over a built-in name unless the user disables the built-in."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import pytest
from kern.core import plugins
from kern.errors import PluginError, UsageError

from tests.conftest import make_dist, plugins_json, run_kern

BUILTIN = {"lora": "kern-lora", "loha": "kern-loha", "flux2": "kern-flux2", "qwen_image": "kern-qwen-image"}

ARCH = """
    import kern

    @kern.hookimpl
    def register_architectures(register):
        register(kern.Architecture(name="{arch}", aliases=({aliases}), variants=(kern.Variant(name="v1", aliases=({valiases})),)))

    @kern.hookimpl
    def load_model(arch, variant, part, path, dtype, device, options):
        return "third-party model"
"""

NETWORK = """
    import kern

    @kern.hookimpl
    def register_networks(register):
        register(kern.NetworkType(name="{name}", aliases=({aliases})))

    @kern.hookimpl
    def make_network(network_type, model, targets, options):
        return "third-party network"
"""

# A plugin that answers every architecture hook it implements by leaving a mark, so a test sees whether it was asked.
HIJACK = """
    import os
    import kern

    def _mark(what):
        with open(os.environ["HIJACK_MARK"], "a") as f:
            f.write(what + "\\n")
        raise kern.ModelFileError("HIJACKED " + what)

    @kern.hookimpl
    def register_architectures(register):
        register(kern.Architecture(name="{arch}", variants=(kern.Variant(name="dev"),)))

    @kern.hookimpl
    def detect_variant(arch, path):
        _mark("detect_variant " + arch)

    @kern.hookimpl
    def load_model(arch, variant, part, path, dtype, device, options):
        _mark("load_model " + arch)
"""

IMPORT_FAILURES = {
    "sysexit": ("raise SystemExit(3)\n", "SystemExit"),
    "sysexitcall": ("import sys\nsys.exit('bye from a plugin')\n", "SystemExit: bye from a plugin"),
    "genexit": ("raise GeneratorExit('closing')\n", "GeneratorExit"),
    "custombase": ("class Boom(BaseException):\n    pass\nraise Boom('deep trouble')\n", "Boom: deep trouble"),
    "badstr": ("class Odd(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\nraise Odd()\n", "Odd"),
}


@pytest.fixture
def on_path(monkeypatch):
    def add(root):
        monkeypatch.syspath_prepend(str(root))
        return root

    return add


_UNIQUE = itertools.count()


def _dist(root: Path, ep: str, source: str, dist: str | None = None, version: str = "1.0") -> Path:
    """A fake installed plugin; its module name is new each time (Python caches imported modules by name)."""
    return make_dist(root / ep, dist or f"kern-{ep}", version, ep, f"kern_{ep}_{next(_UNIQUE)}_mod", source)


def _builtins_loaded(manager) -> None:
    for name, dist in BUILTIN.items():
        info = manager.infos[name]
        assert (info.status, info.distribution, info.error) == ("loaded", dist, ""), info


# --------------------------------------------------------------------------- anything raised, in-process


@pytest.mark.parametrize("ep", sorted(IMPORT_FAILURES))
def test_any_exception_at_import_is_isolated(tmp_path, on_path, ep):
    source, expected = IMPORT_FAILURES[ep]
    on_path(_dist(tmp_path, ep, source, version="3.1"))
    manager = plugins.build_manager()
    info = manager.infos[ep]
    assert (info.status, info.distribution, info.version) == ("failed", f"kern-{ep}", "3.1")
    assert info.error.startswith("import failed: ") and expected in info.error
    _builtins_loaded(manager)


def test_keyboard_interrupt_at_import_still_stops_kern(tmp_path, on_path):
    on_path(_dist(tmp_path, "ctrlc", "raise KeyboardInterrupt\n"))
    with pytest.raises(KeyboardInterrupt):
        plugins.build_manager()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("raise SystemExit(1)", "register_architectures raised SystemExit: 1"),
        ("raise GeneratorExit()", "register_architectures raised GeneratorExit"),
        ("raise ValueError('bad arch')", "register_architectures raised ValueError: bad arch"),
        ("register(kern.Architecture(name='x', variants=()), 'extra')", "register_architectures raised TypeError"),
        ("register('flux3')", "registered a str, expected kern.Architecture"),
        ("register(kern.NetworkType(name='n'))", "registered a NetworkType, expected kern.Architecture"),
    ],
)
def test_register_hook_failures_leave_the_plugin_out(tmp_path, on_path, body, expected):
    source = f"""
        import kern

        @kern.hookimpl
        def register_architectures(register):
            register(kern.Architecture(name="fine", variants=(kern.Variant(name="v"),)))
            {body}

        @kern.hookimpl
        def load_model(arch, variant, part, path, dtype, device, options):
            return "model"
    """
    on_path(_dist(tmp_path, "regfail", source))
    manager = plugins.build_manager()
    info = manager.infos["regfail"]
    assert info.status == "failed" and expected in info.error
    assert manager.pm.get_plugin("regfail") is None  # its hooks are not asked either
    with pytest.raises(UsageError, match="unknown architecture 'fine'"):  # nothing of it stays registered
        manager.resolve_arch("fine")
    _builtins_loaded(manager)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("register_architectures = 5\n", "register_architectures is not a function (it is 5)"),
        ("def register_networks():\n    pass\n", "register_networks raised TypeError"),
        (
            "import kern\n\n@kern.hookimpl\ndef register_networks(register, extra):\n    pass\n",
            "extra",
        ),  # pluggy rejects it
    ],
)
def test_register_hooks_that_are_not_callable_or_have_a_wrong_signature(tmp_path, on_path, source, expected):
    on_path(_dist(tmp_path, "badreg", source))
    manager = plugins.build_manager()
    assert manager.infos["badreg"].status == "failed" and expected in manager.infos["badreg"].error
    _builtins_loaded(manager)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("kern.Architecture(name=5, variants=(kern.Variant(name='v'),))", "architecture name 5 is not a valid name"),
        ("kern.Architecture(name='has space', variants=(kern.Variant(name='v'),))", "not a valid name"),
        ("kern.Architecture(name='a', variants=())", "non-empty tuple of kern.Variant"),
        ("kern.Architecture(name='a', aliases='abc', variants=(kern.Variant(name='v'),))", "aliases must be a tuple"),
        ("kern.Architecture(name='a', variants=(kern.Variant(name='v'),), default_variant='w')", "default_variant 'w'"),
        (
            "kern.Architecture(name='a', variants=(kern.Variant(name='v'),), resolution_step=0)",
            "resolution_step must be a positive",
        ),
        (
            "kern.Architecture(name='a', variants=(kern.Variant(name='v'),), default_targets=('(',))",
            "not a valid regular expression",
        ),
        ("kern.Architecture(name='a', variants=(kern.Variant(name='v', cache_id='../x'),))", "cache_id"),
        ("kern.Architecture(name='a', variants=(kern.Variant(name='v', steps=0),))", "steps must be a positive"),
        ("kern.Architecture(name='a', variants=(kern.Variant(name='v', guidance=float('nan')),))", "finite"),
        (
            "kern.Architecture(name='a', variants=(kern.Variant(name='v'), kern.Variant(name='v')))",
            "variant names must be unique",
        ),
        ("kern.Architecture(name='a', variants=(kern.Variant(name='v', aliases=('a',)),))", "declared twice"),
    ],
)
def test_malformed_records_leave_the_plugin_out(tmp_path, on_path, record, expected):
    source = f"""
        import kern

        @kern.hookimpl
        def register_architectures(register):
            register({record})
    """
    on_path(_dist(tmp_path, "badrec", source))
    manager = plugins.build_manager()
    info = manager.infos["badrec"]
    assert info.status == "failed" and expected in info.error, info.error
    assert manager.pm.get_plugin("badrec") is None
    _builtins_loaded(manager)


def test_network_records_are_checked(tmp_path, on_path):
    on_path(_dist(tmp_path, "badnet", NETWORK.format(name="dora", aliases="'dora', 'x y'")))
    manager = plugins.build_manager()
    assert manager.infos["badnet"].status == "failed" and "'x y' is not a valid name" in manager.infos["badnet"].error
    with pytest.raises(UsageError, match="unknown network type 'dora'"):
        manager.resolve_network("dora")


# --------------------------------------------------------------------------- misspelled and refused hooks


def test_misspelled_hook_fails_the_plugin_with_a_suggestion(tmp_path, on_path):
    source = (
        ARCH.format(arch="typo", aliases="", valiases="")
        + """
    @kern.hookimpl
    def laod_model(arch, variant, part, path, dtype, device, options):
        return None
    """
    )
    on_path(_dist(tmp_path, "typo", source))
    manager = plugins.build_manager()
    info = manager.infos["typo"]
    assert info.status == "failed"
    assert "'laod_model' matches no kern hook (did you mean 'load_model'?)" in info.error
    assert manager.pm.get_plugin("typo") is None
    with pytest.raises(UsageError):
        manager.resolve_arch("typo")


def test_hook_name_far_from_any_hook_gets_no_suggestion(tmp_path, on_path):
    source = (
        ARCH.format(arch="odd", aliases="", valiases="")
        + """
    @kern.hookimpl
    def completely_unrelated():
        return None
    """
    )
    on_path(_dist(tmp_path, "odd", source))
    info = plugins.build_manager().infos["odd"]
    assert info.status == "failed" and "'completely_unrelated' matches no kern hook; the hooks are listed" in info.error


@pytest.mark.parametrize("option", ["tryfirst=True", "wrapper=True", "hookwrapper=True"])
def test_hooks_that_would_run_before_other_plugins_are_refused(tmp_path, on_path, option):
    source = f"""
        import kern

        @kern.hookimpl({option})
        def load_model(arch, variant, part, path, dtype, device, options):
            return (yield) if {"wrapper" in option} else "mine"
    """
    on_path(_dist(tmp_path, "pushy", source))
    manager = plugins.build_manager()
    info = manager.infos["pushy"]
    assert info.status == "failed" and option.split("=")[0] in info.error and "kern refuses" in info.error
    assert manager.pm.get_plugin("pushy") is None


def test_undecorated_hook_function_is_a_warning(tmp_path, on_path):
    source = (
        ARCH.format(arch="plain", aliases="", valiases="")
        + """
    def encode_text(arch, variant, encoder, prompts, options):
        return None
    """
    )
    on_path(_dist(tmp_path, "plain", source))
    info = plugins.build_manager().infos["plain"]
    assert (
        info.status == "loaded"
        and "['encode_text'] are named like kern hooks but not marked @kern.hookimpl" in info.error
    )


def test_entry_point_to_a_module_without_hooks_fails(tmp_path, on_path):
    on_path(_dist(tmp_path, "empty", "VALUE = 1\n"))
    info = plugins.build_manager().infos["empty"]
    assert info.status == "failed" and "implements no kern hook" in info.error and "entry point" in info.error


# --------------------------------------------------------------------------- name clashes: the built-in wins


def _builtin_names():
    manager = plugins.build_manager()
    return manager._arch_names, manager._network_names


@pytest.mark.parametrize(
    ("kind", "name", "owner"),
    [
        ("arch", "flux2", "kern-flux2"),  # architecture name
        ("arch", "flux-2", "kern-flux2"),  # its alias
        ("arch", "flux2-klein-4b", "kern-flux2"),  # a variant alias
        ("arch", "qwen-image-edit", "kern-qwen-image"),
        ("network", "lora", "kern-lora"),
        ("network", "loha", "kern-loha"),
    ],
)
def test_third_party_clashing_with_a_builtin_loads_after_it_and_is_left_out(tmp_path, on_path, kind, name, owner):
    arch_names, network_names = _builtin_names()
    assert name in (arch_names if kind == "arch" else network_names)  # the test names a real built-in name
    if kind == "arch":
        source = ARCH.format(arch="mine", aliases=f"'{name}',", valiases="")
    else:
        source = NETWORK.format(name="mine", aliases=f"'{name}',")
    on_path(_dist(tmp_path, "aaa", source, dist="kern-evil", version="6.6"))  # "aaa" sorts before every built-in
    manager = plugins.build_manager()
    info = manager.infos["aaa"]
    assert info.status == "failed"
    assert "kern-evil 6.6" in info.error and f"{owner} 0.1.0" in info.error and repr(name) in info.error
    assert "KERN_DISABLE_PLUGINS=" in info.error
    assert manager.pm.get_plugin("aaa") is None  # not registered: its hooks cannot answer for the built-in's names
    _builtins_loaded(manager)
    if kind == "arch":
        arch, _ = manager.resolve_arch(name)
        assert (
            arch.name != "mine"
            and arch.name in manager.infos[[k for k, d in BUILTIN.items() if d == owner][0]].architectures
        )
        assert (
            manager.hook.load_model(
                arch="mine", variant=None, part="transformer", path=None, dtype=None, device="cpu", options={}
            )
            is None
        )
    else:
        assert manager.resolve_network(name).name == name
        assert manager.hook.make_network(network_type="mine", model=None, targets=None, options={}) is None


def test_disabling_the_builtin_lets_the_third_party_own_the_name(tmp_path, on_path, monkeypatch):
    on_path(
        _dist(
            tmp_path,
            "aaa",
            ARCH.format(arch="flux2", aliases="", valiases="'flux2-dev',"),
            dist="kern-evil",
            version="6.6",
        )
    )
    monkeypatch.setenv(plugins.ENV_DENY, "flux2")
    manager = plugins.build_manager()
    assert manager.infos["flux2"].status == "disabled"
    assert manager.infos["aaa"].status == "loaded" and manager.infos["aaa"].architectures == ["flux2"]
    assert manager.resolve_arch("flux2-dev")[0] is manager.architectures["flux2"]
    model = manager.hook.load_model(
        arch="flux2", variant="v1", part="transformer", path=None, dtype=None, device="cpu", options={}
    )
    assert model == "third-party model"


def test_a_third_party_entry_point_named_like_a_builtin(tmp_path, on_path, monkeypatch):
    on_path(_dist(tmp_path, "lora", NETWORK.format(name="lora", aliases=""), dist="kern-lora-ng", version="2.0"))
    manager = plugins.build_manager()
    assert manager.infos["lora"].distribution == "kern-lora" and manager.infos["lora"].status == "loaded"
    clash = next(i for i in manager.infos.values() if i.distribution == "kern-lora-ng")
    assert clash.status == "failed" and "already used by kern-lora 0.1.0" in clash.error
    # Disabled by distribution name, the built-in makes room for the replacement's entry point of the same name.
    monkeypatch.setenv(plugins.ENV_DENY, "kern-lora")
    manager = plugins.build_manager()
    replacement = manager.infos["lora"]
    assert (replacement.distribution, replacement.status, replacement.networks) == ("kern-lora-ng", "loaded", ["lora"])
    assert any(i.distribution == "kern-lora" and i.status == "disabled" for i in manager.infos.values())
    assert manager.hook.make_network(network_type="lora", model=None, targets=None, options={}) == "third-party network"


def test_builtins_answer_before_a_third_party_that_answers_for_everyone(tmp_path, on_path):
    source = """
        import kern

        @kern.hookimpl
        def register_architectures(register):
            register(kern.Architecture(name="greedy", variants=(kern.Variant(name="v"),)))

        @kern.hookimpl
        def generation_schedule(arch, variant, steps, latent_shape, options):
            return "greedy answer"   # ignores arch: a contract violation
    """
    on_path(_dist(tmp_path, "aaa", source, dist="kern-greedy"))
    manager = plugins.build_manager()
    assert manager.infos["aaa"].status == "loaded"
    sigmas = manager.hook.generation_schedule(
        arch="flux2", variant="dev", steps=4, latent_shape=(128, 16, 16), options={}
    )
    assert sigmas != "greedy answer" and len(sigmas) == 5
    # Its own architecture still reaches it (the built-ins decline).
    assert (
        manager.hook.generation_schedule(arch="greedy", variant="v", steps=4, latent_shape=(1, 2, 2), options={})
        == "greedy answer"
    )


def test_clash_between_two_third_parties_keeps_the_first_by_entry_point_name(tmp_path, on_path):
    on_path(_dist(tmp_path, "zeta", ARCH.format(arch="zed", aliases="", valiases=""), version="1.0"))
    on_path(_dist(tmp_path, "alpha", ARCH.format(arch="other", aliases="'zed',", valiases=""), version="2.0"))
    manager = plugins.build_manager()
    assert manager.infos["alpha"].architectures == ["other"]
    assert manager.infos["zeta"].status == "failed" and "kern-alpha 2.0" in manager.infos["zeta"].error
    assert "kern-zeta 1.0" in manager.infos["zeta"].error


# --------------------------------------------------------------------------- at the command line


def _broken_dists(tmp_path: Path) -> list[Path]:
    roots = [_dist(tmp_path, ep, IMPORT_FAILURES[ep][0]) for ep in ("sysexit", "genexit", "custombase")]
    roots.append(
        _dist(
            tmp_path,
            "chatty",
            "print('hello from a plugin')\n" + textwrap.dedent(NETWORK.format(name="chat", aliases="")),
        )
    )
    roots.append(
        _dist(
            tmp_path,
            "typo",
            textwrap.dedent(ARCH.format(arch="typo", aliases="", valiases=""))
            + "\n@kern.hookimpl\ndef laod_model(arch, variant, part, path, dtype, device, options):\n    return None\n",
        )
    )
    roots.append(
        _dist(
            tmp_path, "aaa", ARCH.format(arch="mine", aliases="'flux2',", valiases=""), dist="kern-evil", version="6.6"
        )
    )
    return roots


def test_unreadable_distribution_metadata_is_reported_and_the_rest_discovered(tmp_path, on_path):
    # Run in-process only: in a fresh process such a file also breaks other libraries that read entry points (torch).
    enc = make_dist(tmp_path / "enc", "kern-enc", "1.0", "enc", "kern_enc_mod", "")
    (enc / "kern_enc-1.0.dist-info" / "entry_points.txt").write_bytes(b"[kern.plugins]\nen\xffc = kern_enc_mod\n")
    anon = make_dist(tmp_path / "anon", "kern-anon", "1.0", "anon", "kern_anon_mod", "")
    (anon / "kern_anon-1.0.dist-info" / "METADATA").unlink()
    on_path(enc), on_path(anon)
    manager = plugins.KernPluginManager()
    found = {ep.name for ep in manager._discover()}
    assert set(BUILTIN) <= found and not {"enc", "anon"} & found
    errors = {i.name: i for i in manager.infos.values()}
    assert errors["? (kern_enc-1.0.dist-info)"].status == "failed"
    assert (
        "UnicodeDecodeError" in errors["? (kern_enc-1.0.dist-info)"].error
        and "reinstall or remove it" in errors["? (kern_enc-1.0.dist-info)"].error
    )
    # Without METADATA the backport cannot name the distribution (reported); Python 3.12 names it None (loaded as "?").
    assert "anon" in found or errors["? (kern_anon-1.0.dist-info)"].status == "failed"


def test_kern_plugins_survives_every_kind_of_broken_plugin(tmp_path):
    roots = _broken_dists(tmp_path)
    data = plugins_json(pythonpath=roots)  # exit 0 and valid JSON: the chatty plugin's print went to stderr
    by_name = {p["name"]: p for p in data["plugins"]}
    for name, dist in BUILTIN.items():
        assert (by_name[name]["distribution"], by_name[name]["status"]) == (dist, "loaded")
    for ep, (_, expected) in IMPORT_FAILURES.items():
        if ep in by_name:
            assert by_name[ep]["status"] == "failed" and expected in by_name[ep]["error"]
    assert {"sysexit", "genexit", "custombase"} <= set(by_name)
    assert by_name["chatty"]["status"] == "loaded" and data["networks"]["chat"] == {"options": []}
    assert by_name["typo"]["status"] == "failed" and "did you mean 'load_model'" in by_name["typo"]["error"]
    assert by_name["aaa"]["status"] == "failed" and "kern-flux2 0.1.0" in by_name["aaa"]["error"]
    assert "kern-evil 6.6" in by_name["aaa"]["error"]

    table = run_kern("plugins", pythonpath=roots)
    assert table.returncode == 0, table.stderr
    assert "hello from a plugin" not in table.stdout
    for text in (
        "SystemExit",
        "GeneratorExit",
        "Boom",
        "did you mean 'load_model'",
        "kern-evil 6.6",
        "kern-flux2 0.1.0",
    ):
        assert text in table.stderr
    help_ = run_kern("train", "--help", pythonpath=roots)
    assert help_.returncode == 0 and "--arch" in help_.stdout


def _train_flux2(tmp_path: Path, roots: list[Path], env: dict | None = None):
    """`kern train --arch flux2` on garbage model files: whoever answers for flux2 shows in the error."""
    images = tmp_path / "data" / "img"
    images.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 20, 30)).save(images / "a.png")
    (images / "a.txt").write_text("a cat")
    dataset = tmp_path / "data" / "d.toml"
    dataset.write_text(
        '[general]\nresolution = 32\ncaption_extension = ".txt"\n[[datasets]]\nimage_directory = "img"\n'
    )
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 1000)
    before = garbage.read_bytes()
    mark = tmp_path / "hijack.mark"
    proc = run_kern(
        "train",
        "--arch",
        "flux2",
        "--network",
        "lora",
        "--dataset",
        str(dataset),
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"model.transformer={garbage}",
        "--set",
        f"model.vae={garbage}",
        "--set",
        f"model.text_encoder={garbage}",
        pythonpath=roots,
        env={"HIJACK_MARK": str(mark), **(env or {})},
    )
    assert garbage.read_bytes() == before
    return proc, mark


def test_kern_train_reaches_the_builtin_despite_a_clashing_plugin(tmp_path):
    roots = [_dist(tmp_path, "aaa", HIJACK.format(arch="flux2"), dist="kern-evil", version="6.6")]
    proc, mark = _train_flux2(tmp_path, roots)
    assert proc.returncode != 0
    assert "HIJACKED" not in proc.stderr and not mark.exists()  # no hook of the clashing plugin was asked
    assert "garbage.safetensors" in proc.stderr  # the built-in judged the file
    assert "kern-evil 6.6" in proc.stderr and "kern-flux2 0.1.0" in proc.stderr  # the clash was reported


def test_kern_train_uses_the_third_party_when_the_builtin_is_disabled(tmp_path):
    roots = [_dist(tmp_path, "aaa", HIJACK.format(arch="flux2"), dist="kern-evil", version="6.6")]
    listing = json.loads(run_kern("plugins", "--json", pythonpath=roots, env={plugins.ENV_DENY: "flux2"}).stdout)
    status = {p["name"]: (p["status"], p["architectures"]) for p in listing["plugins"]}
    assert status["flux2"] == ("disabled", []) and status["aaa"] == ("loaded", ["flux2"])
    proc, mark = _train_flux2(tmp_path, roots, env={plugins.ENV_DENY: "flux2"})
    assert proc.returncode == 1 and "HIJACKED" in proc.stderr
    assert mark.read_text().startswith("detect_variant flux2")


# --------------------------------------------------------------------------- exits from hooks at run time


EXITER = """
    import sys
    import kern

    @kern.hookimpl
    def register_architectures(register):
        register(kern.Architecture(name="exiter", variants=(kern.Variant(name="v"),)))

    @kern.hookimpl
    def detect_variant(arch, path):
        if arch == "exiter":
            sys.exit({code})

    @kern.hookimpl
    def load_model(arch, variant, part, path, dtype, device, options):
        if arch == "exiter":
            raise GeneratorExit("closing")
"""


def test_a_hook_that_exits_is_a_plugin_error_naming_the_plugin(tmp_path, on_path):
    on_path(_dist(tmp_path, "exiter", EXITER.format(code=0), version="0.3"))
    manager = plugins.build_manager()
    with pytest.raises(
        PluginError, match="plugin 'exiter' \\(kern-exiter 0.3\\) raised SystemExit: 0 in hook detect_variant"
    ):
        manager.hook.detect_variant(arch="exiter", path="x")
    with pytest.raises(
        PluginError, match="raised GeneratorExit: closing in hook load_model.*KERN_DISABLE_PLUGINS=exiter"
    ):
        manager.hook.load_model(
            arch="exiter", variant=None, part="vae", path=None, dtype=None, device="cpu", options={}
        )
    assert manager.hook.detect_variant(arch="other", path="x") is None  # other calls are untouched


def test_kern_train_does_not_exit_0_when_a_plugin_calls_sys_exit(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(images / "a.png")
    (images / "a.txt").write_text("a")
    (tmp_path / "d.toml").write_text(
        '[general]\nresolution = 32\ncaption_extension = ".txt"\n[[datasets]]\nimage_directory = "img"\n'
    )
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"\x00" * 64)
    root = _dist(tmp_path, "exiter", EXITER.format(code=0), version="0.3")
    proc = run_kern(
        "train",
        "--arch",
        "exiter",
        "--network",
        "lora",
        "--dataset",
        str(tmp_path / "d.toml"),
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"model.transformer={model}",
        pythonpath=[root],
    )
    assert proc.returncode == 1, proc.stderr
    assert "plugin 'exiter' (kern-exiter 0.3) raised SystemExit: 0 in hook detect_variant" in proc.stderr
