"""Shared pieces of the adapter tests: a tiny BFL-named FLUX.2-shaped layer tree, a test architecture plugin
with a module map, random adapter files in every layout."""

from __future__ import annotations

import contextlib
import logging
import types

import kern
import torch
from kern.adapters.network import kohya_name
from kern.core.io import save_file
from kern.core.plugins import build_manager
from kern_flux2.adapter_map import flux2_module_map
from torch import nn

D, DEPTH, SINGLE = 8, 2, 2  # hidden size, double blocks, single blocks of the tiny layer tree
ARCH = "tinyflux"


class LayerTree(nn.Module):
    """Linear layers named and shaped like a FLUX.2 transformer (BFL keys); forward runs each layer on its own input."""

    def __init__(self, d: int = D, depth: int = DEPTH, single: int = SINGLE, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def lin(i, o, bias=True):
            m = nn.Linear(i, o, bias=bias)
            with torch.no_grad():
                m.weight.copy_(torch.randn(o, i, generator=g) * 0.2)
                if bias:
                    m.bias.copy_(torch.randn(o, generator=g) * 0.1)
            return m

        def stream():
            return nn.ModuleDict({"qkv": lin(d, 3 * d), "proj": lin(d, d)})

        self.img_in = lin(4, d)
        self.double_blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.img_attn = stream()
            blk.txt_attn = stream()
            blk.img_mlp = nn.Sequential(lin(d, 6 * d, False), nn.GELU(), lin(3 * d, d, False))
            blk.txt_mlp = nn.Sequential(lin(d, 6 * d, False), nn.GELU(), lin(3 * d, d, False))
            self.double_blocks.append(blk)
        self.single_blocks = nn.ModuleList()
        for _ in range(single):
            blk = nn.Module()
            blk.linear1 = lin(d, 9 * d, False)
            blk.linear2 = lin(4 * d, d, False)
            self.single_blocks.append(blk)
        self.final_layer = nn.Module()
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), lin(d, 2 * d, False))
        self.final_layer.linear = lin(d, 4)

    def layers(self) -> dict[str, nn.Linear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, nn.Linear)}

    def inputs(self, seed: int = 1, batch: int = 3) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(batch, 5, m.in_features, generator=g) for n, m in self.layers().items()}

    def forward(self, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: m(xs[n]) for n, m in self.layers().items()}


def tiny_arch_plugin(d: int = D, depth: int = DEPTH, single: int = SINGLE) -> types.ModuleType:
    """An in-process architecture plugin ``tinyflux`` whose module map is kern_flux2's, sized like LayerTree."""
    mod = types.ModuleType("tinyflux_plugin")

    @kern.hookimpl
    def register_architectures(register):
        register(
            kern.Architecture(
                name=ARCH,
                variants=(
                    kern.Variant(name="wide", aliases=("tinyflux-wide",)),
                    kern.Variant(name="base", aliases=("tinyflux-base",)),
                ),
                default_variant="base",
            )
        )

    @kern.hookimpl
    def adapter_module_map(arch, variant, layout):
        if arch != ARCH or layout != "diffusers":
            return None
        if variant == "wide":  # another hidden size: the converter must pick "base" for LayerTree adapters
            return flux2_module_map(depth, single, 2 * d)
        return flux2_module_map(depth, single, d)

    mod.register_architectures = register_architectures
    mod.adapter_module_map = adapter_module_map
    return mod


def manager_with_arch(*extra):
    return build_manager(extra=[("tinyflux", tiny_arch_plugin()), *extra])


def random_lora(model: nn.Module, paths, rank: int = 3, alpha: float = 1.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA state dict with random non-zero factors for the given module paths."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    layers = dict(model.named_modules())
    for p in paths:
        m = layers[p]
        name = kohya_name(p)
        out[f"{name}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.3
        out[f"{name}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def random_loha(
    model: nn.Module, paths, rank: int = 2, alpha: float = 1.0, seed: int = 0, prefix: str = "lora_unet_"
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    layers = dict(model.named_modules())
    for p in paths:
        m = layers[p]
        name = prefix + p.replace(".", "_") if prefix.endswith("_") else prefix + p
        out[f"{name}.hada_w1_a"] = torch.randn(m.out_features, rank, generator=g) * 0.5
        out[f"{name}.hada_w1_b"] = torch.randn(rank, m.in_features, generator=g) * 0.5
        out[f"{name}.hada_w2_a"] = torch.randn(m.out_features, rank, generator=g) * 0.5
        out[f"{name}.hada_w2_b"] = torch.randn(rank, m.in_features, generator=g) * 0.5
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def write(path, tensors, metadata=None):
    save_file(tensors, path, metadata)
    return path


def close(a: dict, b: dict, atol=1e-5, rtol=1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=rtol) for k in a)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


ALL_PATHS = [p for p in LayerTree().layers()]
BLOCK_PATHS = [p for p in ALL_PATHS if p.startswith(("double_blocks", "single_blocks"))]


@contextlib.contextmanager
def diffusers_warnings():
    """Collect diffusers' log records (its library logger does not propagate to the root logger)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
