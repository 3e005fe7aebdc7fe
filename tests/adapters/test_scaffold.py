"""The shared adapter scaffolding: one owner for the saved metadata, a base small enough for a new adapter type,
and no code repeated between the LoRA and LoHa plugins."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import torch
from kern.adapters.network import (
    RankAdapter,
    RankAdapterModule,
    TrainingFacts,
    adapter_metadata,
    rank_options,
    safetensors_hashes,
)
from kern.adapters.weights import apply_adapters
from kern.core.io import read_header
from kern.core.plugins import build_manager
from kern.records import TargetSpec, resolve_options
from torch import nn

from tests.adapters.helpers import LayerTree

REPO = Path(__file__).resolve().parents[2]

FACTS = TrainingFacts(
    arch="flux2",
    variant="klein-4b",
    learning_rate=1e-4,
    lr_scheduler="cosine",
    warmup_steps=3,
    max_train_steps=100,
    steps=50,
    seed=42,
    optimizer="adamw",
    mixed_precision="bf16",
    gradient_checkpointing=True,
    gradient_accumulation_steps=2,
    max_grad_norm=1.0,
    timestep_sampling="shift",
    started_at=1700000000.25,
    output_name="my-adapter",
)


def resolved(network_type, manager=None, **given):
    manager = manager or build_manager()
    return resolve_options(manager.resolve_network(network_type).options, given, "test")


def test_a_trained_adapter_keeps_its_metadata_values():
    """The keys and values kern's trainer has always written (kohya / sd-webui / ComfyUI read them)."""
    md = adapter_metadata(
        "lora", resolved("lora", rank=4, alpha=4.0), modelspec={"modelspec.title": "t"}, training=FACTS
    )
    assert md == {
        "modelspec.title": "t",
        "kern.arch": "flux2",
        "kern.variant": "klein-4b",
        "ss_base_model_version": "flux2_klein_4b",
        "ss_learning_rate": "0.0001",
        "ss_lr_scheduler": "cosine",
        "ss_lr_warmup_steps": "3",
        "ss_max_train_steps": "100",
        "ss_steps": "50",
        "ss_seed": "42",
        "ss_optimizer": "adamw",
        "ss_mixed_precision": "bf16",
        "ss_gradient_checkpointing": "True",
        "ss_gradient_accumulation_steps": "2",
        "ss_max_grad_norm": "1.0",
        "ss_timestep_sampling": "shift",
        "ss_training_started_at": "1700000000.25",
        "ss_output_name": "my-adapter",
        "ss_network_module": "lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "4.0",
        "ss_network_dropout": "0",
        "ss_network_args": '{"dropout": 0.0, "rank_dropout": 0.0, "module_dropout": 0.0, "loraplus_lr_ratio": null, '
        '"dora": false, "use_rslora": false, "rank_pattern": []}',  # dora: issue 18
    }
    loha = adapter_metadata("loha", resolved("loha", dropout=0.1))
    assert loha["ss_network_module"] == "loha" and loha["ss_network_alpha"] == "16.0" and loha["ss_network_dim"] == "16"
    assert loha["ss_network_dropout"] == "0.1"


def test_saving_with_or_without_training_facts_describes_the_network_the_same_way(tmp_path):
    manager = build_manager()
    for network_type in ("lora", "loha"):
        options = resolved(network_type, manager, rank=2, alpha=1.0, dropout=0.1)
        net = manager.hook.make_network(
            network_type=network_type, model=LayerTree(), targets=TargetSpec(), options=options
        )
        bare = net.save(tmp_path / f"{network_type}-bare.safetensors")
        trained = net.save(
            tmp_path / f"{network_type}-trained.safetensors",
            metadata=adapter_metadata(network_type, options, training=FACTS),
        )
        _, md_bare = read_header(bare)
        _, md_trained = read_header(trained)
        network_keys = {k: v for k, v in md_trained.items() if k.startswith("ss_network_")}
        assert network_keys == {k: v for k, v in md_bare.items() if k.startswith("ss_network_")}
        assert network_keys == net.network_metadata()
        tensors = net.adapter_state_dict(torch.float32)
        assert md_trained["sshs_model_hash"] == safetensors_hashes(tensors, md_trained)["sshs_model_hash"]


# --------------------------------------------------------------------------- a new adapter type on the base

U, V = "lowrank_u", "lowrank_v"


def lowrank_delta(tensors, base_shape, where=""):
    u, v = tensors[U].float(), tensors[V].float()
    alpha = tensors.get("alpha")
    return (u @ v * ((float(alpha) if alpha is not None else v.shape[0]) / v.shape[0])).reshape(tuple(base_shape))


class LowRankModule(RankAdapterModule):
    """ΔW = s·U·V with plain parameters: what a plugin writes for a new type besides its maths."""

    label = "LowRank"
    rank_factor = V
    weight_delta = staticmethod(lowrank_delta)

    def make_factors(self, rank, *, dtype, device):
        out_f, in_f = self.geometry["weight_shape"]
        self.lowrank_u = nn.Parameter(torch.empty(out_f, rank, dtype=dtype, device=device))
        self.lowrank_v = nn.Parameter(torch.empty(rank, in_f, dtype=dtype, device=device))

    def reset_factors(self):
        nn.init.zeros_(self.lowrank_u)
        nn.init.normal_(self.lowrank_v)

    def factors(self):
        return {U: self.lowrank_u, V: self.lowrank_v}

    def adapter_forward(self, x):
        return nn.functional.linear(x.to(self.lowrank_v.dtype), self.lowrank_u @ self.lowrank_v) * self.scale


class LowRank(RankAdapter):
    name = "lowrank"
    description = "a test type"
    options = rank_options(rank="r", alpha="α", dropout="unused", rank_dropout="unused", use_rslora="α/√r")
    module = LowRankModule
    suffixes = (U, V, "alpha")
    markers = (U,)

    def normalise(self, state_dict, metadata, modules):
        return {name: {k[len(name) + 1 :]: state_dict[k] for k in keys} for name, keys in modules.items()}


def test_a_new_adapter_type_is_small_and_gets_every_hook(tmp_path):
    plugin = types.ModuleType("kern_lowrank_test")
    (
        plugin.register_networks,
        plugin.make_network,
        plugin.detect_weights,
        plugin.load_network,
        plugin.weight_delta,
        plugin.convert_weights,
        plugin.weight_shape,
        plugin.weight_rank,
    ) = LowRank().hooks()
    manager = build_manager(extra=[("lowrank", plugin)])
    info = manager.infos["lowrank"]
    assert info.status == "loaded" and info.networks == ["lowrank"], info.error
    assert [o.name for o in manager.resolve_network("lowrank").options][:2] == ["rank", "alpha"]

    model = LayerTree()
    x = torch.randn(3, 8)
    base = model.double_blocks[0].img_attn.proj(x)
    net = manager.hook.make_network(
        network_type="lowrank",
        model=model,
        targets=TargetSpec(targets=(r".*\.proj",)),
        options=resolved("lowrank", manager, rank=2, alpha=1.0),
    )
    torch.testing.assert_close(model.double_blocks[0].img_attn.proj(x), base)  # a no-op until trained
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    trained = model.double_blocks[0].img_attn.proj(x)
    path = net.save(tmp_path / "lowrank.safetensors")
    assert read_header(path)[1]["ss_network_module"] == "lowrank"
    net.remove()

    fresh = LayerTree()
    (loaded,) = apply_adapters(fresh, [(path, 1.0)], manager=manager)
    assert loaded.network_type == "lowrank"
    torch.testing.assert_close(fresh.double_blocks[0].img_attn.proj(x), trained)


# --------------------------------------------------------------------------- no repeated code


def _windows(package: Path, size: int = 6) -> dict[tuple[str, ...], str]:
    """Every run of ``size`` code lines (stripped, comments and blank lines left out, the type's own name folded so
    ``lora_delta`` and ``loha_delta`` read the same), with where it starts."""
    lines = []
    for f in sorted(package.glob("*.py")):
        for i, raw in enumerate(f.read_text().splitlines(), 1):
            s = re.sub(r"\s+#.*$", "", raw.strip())
            if s and not s.startswith("#"):
                lines.append((re.sub(r"(?i)loha|lora|hada", "X", s), f"{f.name}:{i}"))
    return {tuple(t for t, _ in lines[i : i + size]): lines[i][1] for i in range(len(lines) - size + 1)}


def test_lora_and_loha_share_no_block_of_six_lines():
    lora = _windows(REPO / "plugins" / "lora" / "kern_lora")
    loha = _windows(REPO / "plugins" / "loha" / "kern_loha")
    shared = sorted(f"kern_lora/{lora[w]} = kern_loha/{loha[w]}" for w in set(lora) & set(loha))
    assert not shared, "move the shared code into kern.adapters.network.scaffold:\n" + "\n".join(shared)


def test_the_metadata_keys_have_one_owner():
    """The trainer and the network plugins spell out no ss_* / modelspec.* key: kern.adapters.network.metadata
    computes every one they write (readers elsewhere, e.g. generation reading modelspec.architecture, may name them)."""
    writers = [
        *(REPO / "kernel" / "kern" / "train").rglob("*.py"),
        *(REPO / "kernel" / "kern" / "adapters" / "network").rglob("*.py"),
        *(REPO / "plugins" / "lora" / "kern_lora").rglob("*.py"),
        *(REPO / "plugins" / "loha" / "kern_loha").rglob("*.py"),
    ]
    owner = REPO / "kernel" / "kern" / "adapters" / "network" / "metadata.py"
    spelled = [
        f"{f.relative_to(REPO)}: {m.group(0)}"
        for f in writers
        if f != owner
        for m in re.finditer(r"[\"'](ss_[a-z_]+|modelspec\.[a-z_]+)[\"']", f.read_text())
        if m.group(1) != "ss_metadata"
    ]
    assert not spelled, "\n".join(spelled)
    assert json.loads(adapter_metadata("lora", {"rank": 1})["ss_network_args"]) == {}
