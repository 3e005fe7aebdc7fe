"""How many bytes autograd keeps for backward per LoKr layer: kern's Kronecker forward vs plain autograd.

kern's LoKr computes ``x·(γ W1⊗W2)ᵀ`` as ``W1·X·W2ᵀ`` on x viewed as (…, b, d) and never builds ΔW
(``kern_lokr.module.LoKrModule.kron_linear``); plain autograd, as LyCORIS' and musubi's LoKr forward, builds
``ΔW = γ·kron(W1, W2)`` (out × in) and computes ``F.linear(x, ΔW)``, which keeps ΔW alive for backward. Runs on the
meta device by default (shapes only, no memory), for every adapted Linear of a FLUX.2 or Qwen-Image transformer, at
a given rank, factor, token count and dtype; ``--device cuda`` allocates for real:

    python bench/lokr_memory.py --model flux2-klein-4b --rank 16 --factor -1 --tokens 4096 --dtype bfloat16

A tensor that shares the layer input's storage (x or a view of it) is counted once: both ways keep x.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from kern_lokr.module import LoKrModule, kron_delta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loha_memory import MODELS, flux2_layers, qwen_layers  # noqa: E402  (the same layer shapes)


def lokr(out_f: int, in_f: int, rank: int, factor: int, dtype: torch.dtype, device: str) -> LoKrModule:
    org = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype, device=device)
    return LoKrModule("m", "m", org, rank, None, factor=factor, dtype=dtype, device=device)


def saved_bytes(m: LoKrModule, tokens: int, custom: bool) -> int:
    w = next(iter(m.factors().values()))
    x = torch.zeros(1, tokens, m.geometry["weight_shape"][1], dtype=w.dtype, device=w.device, requires_grad=True)
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        base = t if t._base is None else t._base
        key = id(x) if base is x else id(base)
        if key not in seen:
            seen.add(key)
            total += base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.kron_linear(x) if custom else F.linear(x, kron_delta(m.w1(), m.w2(), m.scale))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux2-klein-4b", choices=[*MODELS, "qwen-image"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--factor", type=int, default=-1, help="LoKr factor (-1: the most balanced split)")
    ap.add_argument("--tokens", type=int, default=4096, help="sequence length through each layer")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="meta")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    layers = qwen_layers() if args.model == "qwen-image" else flux2_layers(*MODELS[args.model])
    mib, gib = 2**20, 2**30
    print(f"{args.model}: {len(layers)} LoKr layers, rank {args.rank}, factor {args.factor}, {args.tokens} tokens, "
          f"{args.dtype}, {args.device}")  # fmt: skip
    print(f"  {'layer (out × in)':>18} {'n':>4} {'W1':>10} {'W2':>16} {'kern MiB':>9} {'plain MiB':>10}")
    totals = [0, 0]
    for (o, i), n in collections.Counter(layers).items():
        m = lokr(o, i, args.rank, args.factor, dtype, args.device)
        p = m.plan
        kern, plain = saved_bytes(m, args.tokens, True), saved_bytes(m, args.tokens, False)
        totals[0], totals[1] = totals[0] + n * kern, totals[1] + n * plain
        w2 = f"{p.c}×{p.d}" + (f" r{args.rank}" if p.w2_low else " full")
        print(f"  {f'{o} × {i}':>18} {n:>4} {f'{p.a}×{p.b}':>10} {w2:>16} {kern / mib:9.1f} {plain / mib:10.1f}")
    print(f"  saved for backward, kern (no ΔW): {totals[0] / gib:8.2f} GiB")
    print(f"  saved for backward, plain ΔW:     {totals[1] / gib:8.2f} GiB")
    print(f"  difference:                       {(totals[1] - totals[0]) / gib:8.2f} GiB")


if __name__ == "__main__":
    main()
