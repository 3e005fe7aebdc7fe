"""The LoRA layer, its file-format handling and its exact factor algebra.

Maths (kohya / peft LoRA): for a layer ``y = W x (+ b)``, ``ΔW = s · B · A`` with ``A = lora_down`` (r × in),
``B = lora_up`` (out × r) and ``s = α / r`` (``α / √r`` with rsLoRA). The hooked forward is
``y = W x + m · s · B(drop(A x))``; ``m`` is the user multiplier.

Initialisation: ``A`` is Kaiming-uniform (``a = √5``, as ``nn.Linear`` and kohya/musubi do) and **``B`` is
zero**. One factor must be zero so that ΔW = 0 at step 0 (training starts from the base model). It is ``B``
rather than ``A`` because the gradients are ``∂L/∂B = G (A x)ᵀ`` and ``∂L/∂A = Bᵀ G xᵀ``: with a random ``A``
and a zero ``B``, ``B`` gets a non-zero gradient at the first step and ``A`` follows, whereas zeroing ``A``
would leave ``B``'s first gradient zero and waste the random init of ``B``'s scale.

Conv2d: ``lora_down`` is a conv with the layer's kernel, stride, padding and dilation, ``lora_up`` a 1×1 conv
(kohya's layout), so ``ΔW = s · up[:, :, 0, 0] @ down.flatten(1)`` reshaped to the kernel.

Saving keeps the "kohya-equivalent" α: with rsLoRA the ``alpha`` written is ``s · r``, so every loader that
computes ``alpha / r`` gets the trained scale.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from kern.adapters.network import FactorOps, RankAdapterModule, compute_dtype, scale_of, strip_layout_prefix
from kern.errors import AdapterError
from kern.log import get_logger
from torch import nn

log = get_logger(__name__)

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
DORA = "dora_scale"  # DoRA's magnitude (kern_lora.dora), one per output row

# Suffixes of LoRA keys in the files kern reads, and the kohya suffix each means.
SUFFIX_ALIASES: dict[str, str] = {
    "dora_scale": DORA,  # kohya / LyCORIS / ComfyUI
    "lora_magnitude_vector": DORA,  # PEFT / diffusers
    "lora_magnitude_vector.weight": DORA,
    "lora_magnitude_vector.default.weight": DORA,
    "lora_down.weight": DOWN,
    "lora_up.weight": UP,
    "lora_A.weight": DOWN,
    "lora_B.weight": UP,
    "lora_A.default.weight": DOWN,
    "lora_B.default.weight": UP,
    "lora.down.weight": DOWN,
    "lora.up.weight": UP,
    "alpha": ALPHA,
}
FACTOR_SUFFIXES = tuple(k for k, v in SUFFIX_ALIASES.items() if v not in (ALPHA, DORA))


def lora_delta(tensors: Mapping[str, torch.Tensor], base_shape: Sequence[int], where: str = "") -> torch.Tensor:
    """``ΔW = (α/r) · B · A`` in float32 with the layer weight's shape (Linear or Conv2d with a 1×1 up)."""
    try:
        down, up = tensors[DOWN], tensors[UP]
    except KeyError as exc:
        raise AdapterError(f"{where}: LoRA module lacks {exc.args[0]}") from None
    rank = down.shape[0]
    if up.dim() < 2 or up.shape[1] != rank:
        raise AdapterError(f"{where}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} have different ranks")
    alpha = tensors.get(ALPHA)
    scale = (float(alpha) if alpha is not None else float(rank)) / rank
    a = down.to(torch.float32).reshape(rank, -1)
    b = up.to(torch.float32).reshape(up.shape[0], rank)
    delta = b @ a
    if scale != 1.0:
        delta.mul_(scale)
    if delta.numel() != math.prod(base_shape) or up.shape[0] != base_shape[0]:
        raise AdapterError(
            f"{where}: LoRA of ΔW shape {tuple(delta.shape)} (lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}) "
            f"does not fit the base weight {tuple(base_shape)}"
        )
    return delta.reshape(tuple(base_shape))


def lora_shape(tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The base weight's shape from a module's kohya tensors: lora_up's rows × lora_down's columns (and kernel)."""
    if DOWN not in tensors or UP not in tensors:
        return None
    return (int(tensors[UP].shape[0]), *(int(s) for s in tensors[DOWN].shape[1:]))


class LoRAModule(RankAdapterModule):
    """A LoRA on one ``nn.Linear`` / ``Float8StorageLinear`` / ``nn.Conv2d``.

    Dropout kinds (training only): ``dropout`` — inverted dropout on the rank-r activation ``A x``;
    ``rank_dropout`` — a (batch, r) mask on ``A x``, shared over tokens / pixels, with the scale multiplied by
    ``1 / (1 − p)``; ``module_dropout`` — skip the whole adapter for a forward with probability ``p``.
    """

    label = "LoRA"
    rank_factor = DOWN
    up_param_names = ("lora_up",)
    weight_delta = staticmethod(lora_delta)
    weight_shape = staticmethod(lora_shape)

    def make_factors(self, rank: int, *, dtype: torch.dtype, device: torch.device | str | None) -> None:
        org, g = self.org, self.geometry
        kw = {"bias": False, "dtype": dtype, "device": device}
        if g["kind"] == "conv2d":
            self.lora_down = nn.Conv2d(
                org.in_channels,
                rank,
                org.kernel_size,
                org.stride,
                org.padding,
                org.dilation,
                padding_mode=org.padding_mode,
                **kw,
            )
            self.lora_up = nn.Conv2d(rank, org.out_channels, 1, **kw)
        else:
            self.lora_down = nn.Linear(g["in_features"], rank, **kw)
            self.lora_up = nn.Linear(rank, g["out_features"], **kw)

    def reset_factors(self) -> None:
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def factors(self) -> dict[str, torch.Tensor]:
        return {DOWN: self.lora_down.weight, UP: self.lora_up.weight}

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_down(x.to(compute_dtype(x, self.lora_down.weight.dtype)))
        scale = self.scale
        if self.training:
            if self.dropout > 0:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout > 0:
                if self.geometry["kind"] == "conv2d":
                    shape = (h.shape[0], self.rank, 1, 1)
                else:
                    shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
                h = h * (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        """``out + m·s·B(A x)`` with the scale applied on the rank-r activation and the addition done by the up
        matmul itself (``addmm``: one pass over the layer output instead of a separate product and sum, one
        rounding). Falls back to the general path for convs, dropouts in training, and dtypes addmm cannot mix."""
        if self.geometry["kind"] == "conv2d" or (self.training and (self.dropout > 0 or self.rank_dropout > 0)):
            return super().add_to(out, x, multiplier)
        h = self.lora_down(x.to(compute_dtype(x, self.lora_down.weight.dtype)))
        s = self.scale * multiplier
        if s != 1.0:
            h = h * s
        up = self.lora_up.weight
        if not torch.is_autocast_enabled(x.device.type) and not (out.dtype == h.dtype == up.dtype):
            return (out + F.linear(h, up)).to(out.dtype)  # e.g. an fp32 adapter on a bf16 model without autocast
        y = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), up.t())
        return y.view(out.shape).to(out.dtype)


def fold_alpha(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with the α/r scale folded in (√s into each, as musubi's converter; B only if s < 0)."""
    down, up = tensors[DOWN], tensors[UP]
    rank = down.shape[0]
    alpha = tensors.get(ALPHA)
    s = (float(alpha) if alpha is not None else float(rank)) / rank
    if s == 1.0:
        return down, up
    dt_d, dt_u = down.dtype, up.dtype
    if s > 0:
        r = math.sqrt(s)
        return (down.float() * r).to(dt_d), (up.float() * r).to(dt_u)
    return down, (up.float() * s).to(dt_u)


class LoRAOps(FactorOps):
    """Exact split / fuse of LoRA modules along the output rows."""

    def split(self, tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        down, up = tensors[DOWN], tensors[UP]
        if up.dim() != 2:
            raise AdapterError("splitting a conv LoRA along its output rows is not supported")
        rank = down.shape[0]
        alpha = float(tensors[ALPHA]) if ALPHA in tensors else float(rank)
        b = up[start:stop]
        dora = {DORA: tensors[DORA][start:stop].contiguous()} if DORA in tensors else {}  # each row's norm is its own
        # A rank-3r block-diagonal B (from a split → fused conversion) splits back to rank r exactly.
        used = (b != 0).any(dim=0)
        if 0 < int(used.sum()) < rank:
            keep = int(used.sum())
            return {
                DOWN: down[used].contiguous(),
                UP: b[:, used].contiguous(),
                ALPHA: torch.tensor(alpha * keep / rank),
                **dora,
            }
        return {DOWN: down.clone(), UP: b.contiguous(), ALPHA: torch.tensor(alpha), **dora}

    def fuse(
        self, parts: Sequence[tuple[tuple[int, int], Mapping[str, torch.Tensor]]], total_rows: int
    ) -> dict[str, torch.Tensor]:
        parts = sorted(parts, key=lambda p: p[0][0])
        dora = _fuse_dora(parts)
        downs = [t[DOWN] for _, t in parts]
        ups = [t[UP] for _, t in parts]
        if any(u.dim() != 2 for u in ups):
            raise AdapterError("fusing conv LoRA modules is not supported")
        scales = [(float(t[ALPHA]) if ALPHA in t else float(t[DOWN].shape[0])) / t[DOWN].shape[0] for _, t in parts]
        contiguous = (
            parts[0][0][0] == 0
            and parts[-1][0][1] == total_rows
            and all(parts[i][0][1] == parts[i + 1][0][0] for i in range(len(parts) - 1))
        )
        same_a = all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs[1:])
        if contiguous and same_a and len(set(scales)) == 1:
            # Shared A (a fused adapter that was split before): rank r, B stacked — exact and as small as it gets.
            return {
                DOWN: downs[0].clone(),
                UP: torch.cat(ups, dim=0),
                ALPHA: torch.tensor(scales[0] * downs[0].shape[0]),
                **dora,
            }
        # General case: A stacked (rank Σr), B block-diagonal, each block carrying its own scale; α = Σr (scale 1).
        dtype = torch.promote_types(downs[0].dtype, ups[0].dtype)
        total_rank = sum(d.shape[0] for d in downs)
        a = torch.cat([d.to(dtype) for d in downs], dim=0)
        b = torch.zeros(total_rows, total_rank, dtype=dtype)
        col = 0
        for ((start, stop), t), s in zip(parts, scales):
            r = t[DOWN].shape[0]
            b[start:stop, col : col + r] = t[UP].to(torch.float32).mul(s).to(dtype)
            col += r
        return {DOWN: a, UP: b, ALPHA: torch.tensor(float(total_rank)), **dora}


def _fuse_dora(parts: Sequence[tuple[tuple[int, int], Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The DoRA magnitudes of row slices (in row order) stacked; ``{}`` for plain LoRA modules."""
    has = [DORA in t for _, t in parts]
    if not any(has):
        return {}
    if not all(has):
        raise AdapterError("cannot fuse DoRA and plain LoRA modules into one module")
    return {DORA: torch.cat([t[DORA].reshape(-1, 1) for _, t in parts], dim=0)}


# --------------------------------------------------------------------------- reading files


def peft_config(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The PEFT ``LoraConfig`` dict diffusers stores under ``lora_adapter_metadata``, for the transformer."""
    raw = metadata.get("lora_adapter_metadata") if metadata else None
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except (TypeError, ValueError):
        log.warning("ignoring unreadable lora_adapter_metadata")
        return None
    if not isinstance(cfg, dict):
        return None
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k[len("transformer.") :]: v for k, v in cfg.items() if k.startswith("transformer.")}
    return cfg


def peft_alpha(cfg: Mapping[str, Any], module_path: str, rank: int) -> float:
    """The kohya-equivalent α (= scale · r) PEFT would use for ``module_path`` under config ``cfg``."""
    alpha = cfg.get("lora_alpha", rank)
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", module_path):
                alpha = value
                break
        except re.error:
            continue
    return scale_of(alpha, rank, bool(cfg.get("use_rslora"))) * rank


def normalise(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], modules: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name as written: {kohya suffix: tensor}}``, every module with ``lora_down``, ``lora_up`` and ``alpha``.

    ``alpha`` comes from the file's ``.alpha`` key; failing that from the PEFT ``lora_adapter_metadata``
    (``lora_alpha``, ``alpha_pattern``, ``use_rslora``); failing that α = r (scale 1, the PEFT and ComfyUI
    convention for files without alpha).
    """
    cfg = peft_config(metadata)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, keys in modules.items():
        t: dict[str, torch.Tensor] = {}
        for key in keys:
            suffix = SUFFIX_ALIASES[key[len(name) + 1 :]]
            if suffix in t:
                raise AdapterError(f"module {name!r} has two {suffix} tensors ({keys})")
            t[suffix] = state_dict[key]
        missing = [s for s in (DOWN, UP) if s not in t]
        if missing:
            raise AdapterError(f"module {name!r} is incomplete: no {' / '.join(missing)} (keys: {list(keys)})")
        rank = t[DOWN].shape[0]
        if t[UP].dim() < 2 or t[UP].shape[1] != rank:
            raise AdapterError(
                f"module {name!r}: lora_up {tuple(t[UP].shape)} and lora_down {tuple(t[DOWN].shape)} have different ranks"
            )
        if DORA in t:
            rows = t[UP].shape[0]
            m = t[DORA]
            if m.numel() != rows or (m.dim() > 0 and m.shape[0] != rows):
                raise AdapterError(
                    f"module {name!r}: DoRA magnitude of shape {tuple(m.shape)} is not one value per output row ({rows}); "
                    "kern reads per-output-row magnitudes (PEFT, LyCORIS wd_on_out=True), not per-input-column ones "
                    "([1, in], LyCORIS wd_on_out=False): re-export the adapter with wd_on_out=True"
                )
            t[DORA] = m.reshape(rows, 1)  # the kohya / ComfyUI shape
        if ALPHA in t:
            t[ALPHA] = t[ALPHA].detach().to(torch.float32).reshape(())
        elif cfg is not None:
            t[ALPHA] = torch.tensor(peft_alpha(cfg, strip_layout_prefix(name)[0], rank), dtype=torch.float32)
        else:
            t[ALPHA] = torch.tensor(float(rank), dtype=torch.float32)
        out[name] = t
    return out
