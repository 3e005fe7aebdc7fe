"""Plugin discovery: entry points, allow/deny lists, broken and clashing plugins."""

from __future__ import annotations

import pytest
from kern.core import plugins
from kern.errors import UsageError

from tests.conftest import make_dist, plugins_json, run_kern

BUILTIN = {"lora": "kern-lora", "loha": "kern-loha", "flux2": "kern-flux2", "qwen_image": "kern-qwen-image"}

GOOD_ARCH = """
    import kern

    @kern.hookimpl
    def register_architectures(register):
        register(kern.Architecture(name="{arch}", aliases=("{alias}",), variants=(kern.Variant(name="v1", aliases=("{arch}-v1",)),)))

    @kern.hookimpl
    def load_model(arch, variant, part, path, dtype, device, options):
        return None
"""


@pytest.fixture
def on_path(monkeypatch):
    """Put fake distributions on sys.path for in-process discovery."""

    def add(root):
        monkeypatch.syspath_prepend(str(root))
        return root

    return add


def test_builtin_plugins_are_discovered_through_entry_points():
    manager = plugins.build_manager()
    for name, dist in BUILTIN.items():
        info = manager.infos[name]
        assert info.status == "loaded", info.error
        assert info.distribution == dist
        assert info.version == "0.1.0"
        assert info.module == f"kern_{name}.plugin"
    assert manager.infos["kern"].module == "kern.core.defaults"  # the kernel's defaults are a plugin like the others
    assert "sample_timesteps" in manager.infos["kern"].hooks


def test_allow_list_loads_only_named_plugins(monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOW, "lora,kern-flux2")  # entry-point or distribution names
    manager = plugins.build_manager()
    status = {n: manager.infos[n].status for n in BUILTIN}
    assert status == {"lora": "loaded", "flux2": "loaded", "loha": "disabled", "qwen_image": "disabled"}
    assert manager.pm.get_plugin("loha") is None


def test_deny_list_skips_named_plugins(monkeypatch):
    monkeypatch.setenv(plugins.ENV_DENY, "kern-loha")
    manager = plugins.build_manager()
    assert manager.infos["loha"].status == "disabled"
    assert manager.infos["lora"].status == "loaded"
    assert manager.pm.get_plugin("loha") is None


def test_autoload_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(plugins.ENV_NO_AUTOLOAD, "1")
    manager = plugins.build_manager()
    assert set(manager.infos) == {"kern"}


def test_broken_plugin_is_reported_and_others_still_load(tmp_path, on_path):
    on_path(
        make_dist(
            tmp_path, "kern-broken", "9.9.1", "broken", "kern_broken_mod", "raise RuntimeError('boom at import')\n"
        )
    )
    manager = plugins.build_manager()
    info = manager.infos["broken"]
    assert info.status == "failed"
    assert (info.distribution, info.version) == ("kern-broken", "9.9.1")
    assert "RuntimeError: boom at import" in info.error
    assert all(manager.infos[n].status == "loaded" for n in BUILTIN)
    assert info in manager.problems()


def test_plugin_with_a_misnamed_hook_argument_is_rejected(tmp_path, on_path):
    source = """
        import kern

        @kern.hookimpl
        def load_model(arch, variant, part, path, dtype, device, options, extra_arg):
            return None
    """
    on_path(make_dist(tmp_path, "kern-badsig", "0.2", "badsig", "kern_badsig_mod", source))
    manager = plugins.build_manager()
    assert manager.infos["badsig"].status == "failed"
    assert "extra_arg" in manager.infos["badsig"].error
    assert manager.pm.get_plugin("badsig") is None


def test_duplicate_architecture_name_is_reported_with_both_distributions(tmp_path, on_path):
    on_path(
        make_dist(
            tmp_path / "a",
            "kern-first",
            "1.0",
            "first",
            "kern_first_mod",
            GOOD_ARCH.format(arch="dupe", alias="dupe-a"),
        )
    )
    on_path(
        make_dist(
            tmp_path / "b",
            "kern-second",
            "2.0",
            "second",
            "kern_second_mod",
            GOOD_ARCH.format(arch="other", alias="dupe"),
        )
    )
    manager = plugins.build_manager()
    assert manager.infos["first"].architectures == ["dupe"]
    second = manager.infos["second"]
    assert second.status == "failed" and second.architectures == []  # a clash leaves the whole plugin out
    assert "kern-second 2.0" in second.error and "kern-first 1.0" in second.error and "'dupe'" in second.error
    assert manager.resolve_arch("dupe")[0].name == "dupe"
    with pytest.raises(UsageError, match="unknown architecture 'other'"):
        manager.resolve_arch("other")


def test_variant_aliases_resolve_to_architecture_and_variant(tmp_path, on_path):
    on_path(
        make_dist(
            tmp_path, "kern-arch", "1.0", "archp", "kern_arch_mod", GOOD_ARCH.format(arch="zeta", alias="zeta-alias")
        )
    )
    manager = plugins.build_manager()
    assert [(a.name, v) for a, v in [manager.resolve_arch("zeta-v1"), manager.resolve_arch("zeta-alias")]] == [
        ("zeta", "v1"),
        ("zeta", None),
    ]


def test_kern_plugins_cli_lists_builtins_and_reports_broken_plugin(tmp_path):
    root = make_dist(tmp_path, "kern-broken", "9.9.1", "broken", "kern_broken_mod", "import does_not_exist\n")
    data = plugins_json(pythonpath=[root])
    by_name = {p["name"]: p for p in data["plugins"]}
    for name, dist in BUILTIN.items():
        assert by_name[name]["distribution"] == dist and by_name[name]["status"] == "loaded"
    assert by_name["broken"]["status"] == "failed" and "does_not_exist" in by_name["broken"]["error"]
    table = run_kern("plugins", pythonpath=[root])
    assert table.returncode == 0
    header = table.stdout.splitlines()[0].split()
    assert header == ["PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "ARCHITECTURES", "NETWORKS", "HOOKS"]
    assert "kern-broken 9.9.1" in table.stderr


def test_kern_plugins_respects_env_lists(tmp_path):
    data = plugins_json(env={plugins.ENV_DENY: "flux2"})
    status = {p["name"]: p["status"] for p in data["plugins"]}
    assert status["flux2"] == "disabled" and status["lora"] == "loaded"


def test_registration_records_are_type_checked(tmp_path, on_path):
    source = """
        import kern

        @kern.hookimpl
        def register_networks(register):
            register("not a NetworkType")
    """
    on_path(make_dist(tmp_path, "kern-wrongrec", "0.1", "wrongrec", "kern_wrongrec_mod", source))
    manager = plugins.build_manager()
    assert (
        manager.infos["wrongrec"].status == "failed" and "expected kern.NetworkType" in manager.infos["wrongrec"].error
    )
