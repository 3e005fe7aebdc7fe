"""How many bytes autograd keeps for backward per LoHa layer: kern's HadaWeight vs plain autograd.

Runs on the meta device by default (shapes only, no memory), for every adapted Linear of a FLUX.2 or
Qwen-Image transformer, at a given rank, token count and dtype:

    python bench/loha_memory.py --model flux2-klein-4b --rank 16 --tokens 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from kern_loha.module import HadaWeight

# (out, in) of each adapted Linear and their count, per model (default targets: docs/flux2.md, docs/qwen_image.md).
MODELS = {
    "flux2-dev": (6144, 8, 48),
    "flux2-klein-9b": (4096, 8, 24),
    "flux2-klein-4b": (3072, 5, 20),
}


def flux2_layers(d: int, double: int, single: int) -> list[tuple[int, int]]:
    per_double = [(3 * d, d), (d, d), (6 * d, d), (d, 3 * d)] * 2  # img / txt: qkv, proj, mlp.0, mlp.2
    per_single = [(9 * d, d), (d, 4 * d)]
    return per_double * double + per_single * single


def qwen_layers(layers: int = 60, d: int = 3072) -> list[tuple[int, int]]:
    per_block = [(6 * d, d)] * 2 + [(d, d)] * 8 + [(4 * d, d), (d, 4 * d)] * 2
    return per_block * layers


def saved_bytes(out_f: int, in_f: int, rank: int, tokens: int, dtype: torch.dtype, device: str, custom: bool) -> int:
    w1a = torch.zeros(out_f, rank, dtype=dtype, device=device, requires_grad=True)
    w1b = torch.zeros(rank, in_f, dtype=dtype, device=device, requires_grad=True)
    w2a = torch.zeros(out_f, rank, dtype=dtype, device=device, requires_grad=True)
    w2b = torch.zeros(rank, in_f, dtype=dtype, device=device, requires_grad=True)
    x = torch.zeros(1, tokens, in_f, dtype=dtype, device=device, requires_grad=True)  # activations carry gradients
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dw = HadaWeight.apply(w1a, w1b, w2a, w2b, 1.0) if custom else (w1a @ w1b) * (w2a @ w2b)
        F.linear(x, dw)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux2-klein-4b", choices=[*MODELS, "qwen-image"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096, help="sequence length through each layer")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="meta")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    layers = qwen_layers() if args.model == "qwen-image" else flux2_layers(*MODELS[args.model])
    custom = sum(saved_bytes(o, i, args.rank, args.tokens, dtype, args.device, True) for o, i in layers)
    plain = sum(saved_bytes(o, i, args.rank, args.tokens, dtype, args.device, False) for o, i in layers)
    gib = 2**30
    print(f"{args.model}: {len(layers)} LoHa layers, rank {args.rank}, {args.tokens} tokens, {args.dtype}")
    print(f"  saved for backward, HadaWeight:     {custom / gib:8.2f} GiB")
    print(f"  saved for backward, plain autograd: {plain / gib:8.2f} GiB")
    print(f"  difference:                         {(plain - custom) / gib:8.2f} GiB")


if __name__ == "__main__":
    main()
