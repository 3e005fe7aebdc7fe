"""Hook routing (kern.core.routing): a call for an architecture or network type reaches the plugin that registered
it (and the kernel's own defaults), so plugins need no ``if arch != ...`` guards, and plugins written with them
still work."""

from __future__ import annotations

import types

import kern
import pluggy
import pytest
import torch
from kern.core.plugins import build_manager
from kern.errors import UsageError


def arch_plugin(name: str, calls: list, guarded: bool = False, aliases: tuple = ()) -> types.ModuleType:
    """An in-process architecture plugin ``name`` whose hooks log their calls; ``guarded``: written to the old
    documented API, returning ``None`` for every other architecture."""
    mod = types.ModuleType(f"{name}_plugin")

    @kern.hookimpl
    def register_architectures(register):
        register(
            kern.Architecture(name=name, aliases=aliases, variants=(kern.Variant(name="v", aliases=(f"{name}-v",)),))
        )

    @kern.hookimpl
    def load_model(arch, variant, part, path, dtype, device, options):
        if guarded and arch != name:
            return None
        calls.append((name, "load_model", arch))
        return f"{name} {part}"

    @kern.hookimpl
    def generation_schedule(arch, variant, steps, latent_shape, options):
        if guarded and arch != name:
            return None
        calls.append((name, "generation_schedule", arch))
        return torch.linspace(1.0, 0.0, steps + 1)

    mod.register_architectures, mod.load_model, mod.generation_schedule = (
        register_architectures,
        load_model,
        generation_schedule,
    )
    return mod


def network_plugin(name: str, calls: list) -> types.ModuleType:
    mod = types.ModuleType(f"{name}_plugin")

    @kern.hookimpl
    def register_networks(register):
        register(kern.NetworkType(name=name))

    @kern.hookimpl
    def make_network(network_type, model, targets, options):
        calls.append((name, "make_network", network_type))
        return f"{name} network"

    @kern.hookimpl
    def detect_weights(keys, metadata):
        calls.append((name, "detect_weights"))
        return kern.WeightsClaim(network_type=name, layout="kohya") if "mine" in keys else None

    mod.register_networks, mod.make_network, mod.detect_weights = register_networks, make_network, detect_weights
    return mod


def load(manager, arch, part="transformer"):
    return manager.hook.load_model(arch=arch, variant=None, part=part, path=None, dtype=None, device="cpu", options={})


def test_a_plugin_without_guards_answers_for_its_own_architecture():
    calls = []
    manager = build_manager(extra=[("alpha", arch_plugin("alpha", calls))])
    assert load(manager, "alpha") == "alpha transformer"
    sigmas = manager.hook.generation_schedule(arch="alpha", variant="v", steps=4, latent_shape=(4, 8, 8), options={})
    assert len(sigmas) == 5
    assert calls == [("alpha", "load_model", "alpha"), ("alpha", "generation_schedule", "alpha")]
    # The kernel's own defaults still answer, last, what the plugin does not implement.
    cond, uncond = torch.full((1, 4), 2.0), torch.zeros(1, 4)
    out = manager.hook.combine_guidance(arch="alpha", variant="v", cond=cond, uncond=uncond, scale=3.0, options={})
    assert torch.equal(out, torch.full((1, 4), 6.0))
    t = manager.hook.sample_timesteps(
        arch="alpha",
        method="uniform",
        batch_size=3,
        latent_shape=(4, 8, 8),
        generator=torch.Generator().manual_seed(0),
        options={},
    )
    assert t.shape == (3,)


def test_two_architectures_from_two_plugins_each_get_only_their_own_calls():
    calls = []
    manager = build_manager(
        extra=[("alpha", arch_plugin("alpha", calls)), ("beta", arch_plugin("beta", calls, aliases=("b",)))]
    )
    assert load(manager, "alpha") == "alpha transformer"
    assert load(manager, "beta", "vae") == "beta vae"
    assert load(manager, "b") == "beta transformer"  # an alias reaches its owner
    assert load(manager, "alpha-v") == "alpha transformer"  # so does a variant alias
    assert calls == [
        ("alpha", "load_model", "alpha"),
        ("beta", "load_model", "beta"),
        ("beta", "load_model", "b"),
        ("alpha", "load_model", "alpha-v"),
    ]


def test_a_plugin_written_with_the_old_guards_still_works():
    calls = []
    manager = build_manager(
        extra=[("old", arch_plugin("old", calls, guarded=True)), ("new", arch_plugin("new", calls))]
    )
    assert load(manager, "old") == "old transformer"
    assert load(manager, "new") == "new transformer"
    assert calls == [("old", "load_model", "old"), ("new", "load_model", "new")]


def test_a_plugin_cannot_answer_for_an_architecture_it_did_not_register():
    calls = []
    manager = build_manager(extra=[("greedy", arch_plugin("greedy", calls))])
    # Its load_model has no guard, yet the built-in answers for flux2 (and says it has no such part).
    with pytest.raises(UsageError, match="no model part 'bogus'"):
        load(manager, "flux2", part="bogus")
    sigmas = manager.hook.generation_schedule(
        arch="flux2", variant="dev", steps=4, latent_shape=(128, 16, 16), options={}
    )
    assert len(sigmas) == 5
    assert calls == []
    # A name nobody registered reaches no plugin that registered an architecture.
    assert load(manager, "nobody") is None
    assert calls == []


def test_a_name_nobody_registered_reaches_plugins_that_registered_none():
    calls = []
    loose = types.ModuleType("loose_plugin")  # implements an architecture hook but registers no architecture

    @kern.hookimpl
    def load_model(arch, variant, part, path, dtype, device, options):
        calls.append(("loose", arch))
        return "loose model"

    loose.load_model = load_model
    manager = build_manager(extra=[("loose", loose), ("alpha", arch_plugin("alpha", calls))])
    assert load(manager, "somewhere") == "loose model"
    assert load(manager, "alpha") == "alpha transformer"  # a registered name goes to its owner only
    assert calls == [("loose", "somewhere"), ("alpha", "load_model", "alpha")]


def test_network_hooks_are_routed_and_detect_weights_reaches_every_network_plugin():
    calls = []
    manager = build_manager(extra=[("third", network_plugin("third", calls))])
    assert manager.hook.make_network(network_type="third", model=None, targets=None, options={}) == "third network"
    # lora's make_network answers for lora; the third plugin's guard-less make_network is not asked.
    net = manager.hook.make_network(
        network_type="lora",
        model=torch.nn.Sequential(torch.nn.Linear(4, 4)),
        targets=kern.TargetSpec(),
        options={"rank": 2, "alpha": 1.0},
    )
    assert net is not None and net != "third network"
    assert calls == [("third", "make_network", "third")]
    answers = manager.hook.detect_weights(keys=frozenset({"mine"}), metadata={})
    assert [c for c in answers if c is not None] == [kern.WeightsClaim(network_type="third", layout="kohya")]
    assert calls[-1] == ("third", "detect_weights")
    asked = {i.plugin_name for i in manager.hook.detect_weights.get_hookimpls()}
    assert {"lora", "loha", "third"} <= asked
    from kern.adapters.weights import detect

    assert detect({"mine"}, {}, manager).network_type == "third"


def test_the_router_is_one_object_and_pluggys_relay_stays_available():
    calls = []
    manager = build_manager(extra=[("alpha", arch_plugin("alpha", calls)), ("beta", arch_plugin("beta", calls))])
    assert manager.hook is manager.hook and manager.hook.load_model is manager.hook.load_model
    assert manager.hook.load_model.name == "load_model"
    assert {i.plugin_name for i in manager.hook.load_model.get_hookimpls()} >= {"alpha", "beta", "flux2", "qwen_image"}
    # pluggy's own relay, unrouted, asks every plugin in pluggy's order: a guard-less built-in answers first for "alpha".
    assert isinstance(manager.pm.hook.load_model, pluggy.HookCaller)
    sigmas = manager.pm.hook.generation_schedule(arch="alpha", variant="v", steps=1, latent_shape=(1, 2, 2), options={})
    assert sigmas is not None and calls == []


def test_a_plugin_registered_later_is_routed_to():
    calls = []
    manager = build_manager(entry_points=())
    assert load(manager, "late") is None  # cached: nobody answers "late"
    from kern.core.plugins import PluginInfo

    manager.register_module(
        arch_plugin("late", calls), PluginInfo(name="late", distribution="(in-process)", version="", module="late")
    )
    assert load(manager, "late") == "late transformer"
    assert calls == [("late", "load_model", "late")]


def test_a_routed_hook_can_be_monkeypatched_like_a_pluggy_caller(monkeypatch):
    manager = build_manager(extra=[("alpha", arch_plugin("alpha", []))])
    real = manager.hook.load_model
    monkeypatch.setattr(manager.hook, "load_model", lambda **kw: "patched")
    assert load(manager, "alpha") == "patched"
    monkeypatch.undo()
    assert manager.hook.load_model is real and load(manager, "alpha") == "alpha transformer"
