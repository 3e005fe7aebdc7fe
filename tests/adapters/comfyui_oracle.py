"""A test oracle for ComfyUI's adapter loader, written from ComfyUI's source (not from kern's code).

What ComfyUI does with an adapter file on a diffusion model, step by step (``comfy/sd.py::load_lora_for_models``):

1. ``comfy/lora.py::model_lora_keys_unet`` builds ``key_map``: every key spelling it accepts → a target, from the
   model's own state-dict keys (``diffusion_model.<path>``). A target is a model key, ``(key, offset)`` with
   ``offset = (dim, start, length)`` (a slice of a fused weight), or ``(key, None, function)`` (``function`` is
   applied to ΔW: ``swap_scale_shift`` for diffusers' ``norm_out.linear``). Spellings:

   * every model: ``lora_unet_<path, . → _>`` and ``diffusion_model.<path>`` (the "generic lora format") for
     ``<path>.weight``; a non-``.weight`` key maps to itself;
   * Flux family (``model_base.Flux``, Flux2 included): from ``comfy/utils.py::flux_to_diffusers`` (diffusers name
     ``d`` → BFL key) ``transformer.<d>``, ``lycoris_<d _>``, ``lora_transformer_<d _>`` and bare ``<d>`` (DiffSynth);
     plus ``diffusion_model.single_blocks.N.linear1_qkv`` → ``linear1`` rows ``[0, 3·hidden)``;
   * Qwen-Image (``model_base.QwenImage``): bare ``<path>``, ``transformer.<path>``, ``lycoris_<path _>``.

2. ``comfy/lora.py::load_lora`` walks ``key_map``: for each spelling ``x`` it takes ``x.alpha`` and ``x.dora_scale``
   if present, then each adapter class of ``comfy/weight_adapter`` in turn (LoRA, LoHa, LoKr, GLoRA, OFT, BOFT)
   reads its tensors, then ``x.w_norm`` / ``x.b_norm`` / ``x.diff`` / ``x.diff_b`` / ``x.set_weight``. Every file key
   not read is logged ``lora key not loaded: <key>``.
3. ``ModelPatcher.add_patches`` keeps the patches whose target key is in the model; the others are logged
   ``NOT LOADED <target>``.
4. At patch time (``calculate_weight``, ``weight_adapter/lora.py`` / ``loha.py``), in float32, for strength s:
   ``W.narrow(*offset) += function(s · scale · ΔW.reshape(slice shape))`` with

   * LoRA: ``ΔW = up @ down`` (``lora_up``/``lora_B``...), ``scale = alpha / down.shape[0]``, 1 without alpha;
   * LoHa: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b)``, ``scale = alpha / hada_w1_b.shape[0]``, 1 without alpha.

   A reshape that fails is logged ``ERROR`` and the patch is skipped (a same-size, wrong-shape ΔW would be
   silently misapplied; this oracle reports it as an error too).
5. DoRA (``x.dora_scale`` present: ``weight_adapter/base.py::weight_decompose``, called by the LoRA adapter instead
   of the addition, on the weight as patched so far, narrowed to the target's slice): ``W_c = W + function(α/r · ΔW)``;
   with ``dora_scale`` of ``shape[0] == W.shape[0]`` (output axis) ``n`` = the L2 norm of each output row of ``W``
   (the weight *before* this patch), otherwise that of each input column of ``W_c``; ``n += finfo(W.dtype).eps``;
   ``W_c *= dora_scale / n``; strength 1: ``W = W_c``, else ``W += s · (W_c − W)``. ComfyUI patches a float32 copy
   of the weight (``ModelPatcher.patch_weight_to_device``; newer versions use ``lora_compute_dtype``, float32
   unless the device runs the model in fp16), so ``eps = finfo(float32).eps`` here (:func:`patched_weights`).

Sources (github.com/comfyanonymous/ComfyUI, read through the search index): ``comfy/lora.py`` (``load_lora`` and
``model_lora_keys_unet`` of a recent version with the Flux ``linear1_qkv`` and QwenImage sections; the version at
41444b5 for ``calculate_weight``'s ``narrow`` / ``function`` handling), ``comfy/utils.py::flux_to_diffusers`` (with
the Flux 2 ``attn.to_qkv_mlp_proj`` / ``attn.to_out`` entries and ``swap_scale_shift`` for ``norm_out.linear``),
``comfy/weight_adapter/lora.py`` @6fd406f (suffixes incl. ``lora_B.default.weight``, ``alpha / mat2.shape[0]``),
``comfy/weight_adapter/loha.py`` @183b377 (``alpha / w1b.shape[0]``), ``comfy/weight_adapter/base.py`` @9c0cf36
(``weight_decompose`` with the output-axis branch and ``eps``), ``comfy/sd.py::load_lora_for_models``
("NOT LOADED"). ``comfy/ldm/qwen_image/model.py`` @c708d0a uses diffusers' module names (``img_mlp.net.0.proj``,
``img_mod.1``, ``norm_out.linear``), so Qwen-Image model keys are diffusers names; ComfyUI's Flux2 uses BFL names.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import attrs
import torch

FLUX = "flux"  # model_base.Flux and its subclass Flux2
QWEN_IMAGE = "qwen_image"
PREFIX = "diffusion_model."

Target = Any  # str | (key, offset) | (key, None, function)


def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    """comfy/utils.py: diffusers' norm_out.linear holds (scale, shift) where BFL's adaLN_modulation.1 holds (shift, scale)."""
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_to_diffusers(depth: int, depth_single: int, hidden_size: int, output_prefix: str = "") -> dict[str, Target]:
    """comfy/utils.py::flux_to_diffusers: diffusers key → BFL key / (key, offset) / (key, None, function)."""
    h = hidden_size
    key_map: dict[str, Target] = {}
    for index in range(depth):
        src, dst = f"transformer_blocks.{index}", f"{output_prefix}double_blocks.{index}"
        for end in ("weight", "bias"):
            qkv = f"{dst}.img_attn.qkv.{end}"
            key_map[f"{src}.attn.to_q.{end}"] = (qkv, (0, 0, h))
            key_map[f"{src}.attn.to_k.{end}"] = (qkv, (0, h, h))
            key_map[f"{src}.attn.to_v.{end}"] = (qkv, (0, 2 * h, h))
            qkv = f"{dst}.txt_attn.qkv.{end}"
            key_map[f"{src}.attn.add_q_proj.{end}"] = (qkv, (0, 0, h))
            key_map[f"{src}.attn.add_k_proj.{end}"] = (qkv, (0, h, h))
            key_map[f"{src}.attn.add_v_proj.{end}"] = (qkv, (0, 2 * h, h))
        block_map = {
            "attn.to_out.0": "img_attn.proj",
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
            "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
            "ff.linear_in": "img_mlp.0",
            "ff.linear_out": "img_mlp.2",
            "ff_context.linear_in": "txt_mlp.0",
            "ff_context.linear_out": "txt_mlp.2",
        }
        for d, b in block_map.items():
            for end in ("weight", "bias"):
                key_map[f"{src}.{d}.{end}"] = f"{dst}.{b}.{end}"
        for d, b in {
            "attn.norm_q.weight": "img_attn.norm.query_norm.weight",
            "attn.norm_k.weight": "img_attn.norm.key_norm.weight",
            "attn.norm_added_q.weight": "txt_attn.norm.query_norm.weight",
            "attn.norm_added_k.weight": "txt_attn.norm.key_norm.weight",
        }.items():
            key_map[f"{src}.{d}"] = f"{dst}.{b}"
    for index in range(depth_single):
        src, dst = f"single_transformer_blocks.{index}", f"{output_prefix}single_blocks.{index}"
        for end in ("weight", "bias"):
            qkv = f"{dst}.linear1.{end}"
            key_map[f"{src}.attn.to_q.{end}"] = (qkv, (0, 0, h))
            key_map[f"{src}.attn.to_k.{end}"] = (qkv, (0, h, h))
            key_map[f"{src}.attn.to_v.{end}"] = (qkv, (0, 2 * h, h))
            key_map[f"{src}.proj_mlp.{end}"] = (qkv, (0, 3 * h, 4 * h))
        for d, b in {
            "norm.linear.weight": "modulation.lin.weight",
            "norm.linear.bias": "modulation.lin.bias",
            "proj_out.weight": "linear2.weight",
            "proj_out.bias": "linear2.bias",
            "attn.norm_q.weight": "norm.query_norm.weight",
            "attn.norm_k.weight": "norm.key_norm.weight",
            "attn.to_qkv_mlp_proj.weight": "linear1.weight",  # Flux 2
            "attn.to_out.weight": "linear2.weight",  # Flux 2
        }.items():
            key_map[f"{src}.{d}"] = f"{dst}.{b}"
    basic = [
        ("final_layer.linear", "proj_out"),
        ("img_in", "x_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("txt_in", "context_embedder"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("pos_embed_input", "controlnet_x_embedder"),
    ]
    for end in ("weight", "bias"):
        for b, d in basic:
            key_map[f"{d}.{end}"] = f"{output_prefix}{b}.{end}"
        key_map[f"norm_out.linear.{end}"] = (
            f"{output_prefix}final_layer.adaLN_modulation.1.{end}",
            None,
            swap_scale_shift,
        )
    return key_map


def _blocks(keys: Sequence[str], name: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def model_lora_keys_unet(shapes: Mapping[str, Sequence[int]], family: str | None) -> dict[str, Target]:
    """comfy/lora.py::model_lora_keys_unet for a model whose own state dict (without ``diffusion_model.``) has these
    keys; ``family`` is FLUX, QWEN_IMAGE or None. A Flux model's ``unet_config`` (depth, depth_single_blocks,
    hidden_size) is read off its keys, as ComfyUI's model detection does (hidden_size = img_in rows)."""
    sdk = [PREFIX + k for k in shapes]
    key_map: dict[str, Target] = {}
    for k in sdk:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len(PREFIX) : -len(".weight")].replace(".", "_")] = k
            key_map[k[: -len(".weight")]] = k  # generic lora format without any weird key names
        else:
            key_map[k] = k
    if family == FLUX:
        own = list(shapes)
        hidden = int(shapes["img_in.weight"][0])
        diffusers = flux_to_diffusers(_blocks(own, "double_blocks"), _blocks(own, "single_blocks"), hidden, PREFIX)
        for k, to in diffusers.items():
            if k.endswith(".weight"):
                d = k[: -len(".weight")]
                key_map["transformer." + d] = to
                key_map["lycoris_" + d.replace(".", "_")] = to
                key_map["lora_transformer_" + d.replace(".", "_")] = to
                key_map[d] = to  # DiffSynth lora format
        for k in sdk:
            if k.endswith(".weight") and ".linear1." in k:
                key_map[k.replace(".linear1.weight", ".linear1_qkv")] = (k, (0, 0, hidden * 3))
    elif family == QWEN_IMAGE:
        for k in sdk:
            if k.endswith(".weight"):
                d = k[len(PREFIX) : -len(".weight")]
                key_map[d] = k
                key_map["transformer." + d] = k
                key_map["lycoris_" + d.replace(".", "_")] = k
    return key_map


# comfy/weight_adapter/lora.py: (up key, down key, mid key) suffixes, tried in this order.
LORA_SUFFIXES = (
    ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),  # appended without a dot
    ("lora_B.weight", "lora_A.weight", None),
    ("lora.up.weight", "lora.down.weight", None),
    ("lora_B", "lora_A", None),  # Mochi
    ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight", None),
    ("lora_B.default.weight", "lora_A.default.weight", None),
)


@attrs.frozen
class Patch:
    kind: str  # "lora", "loha", or another adapter type (keys recognised, ΔW not modelled here)
    tensors: dict[str, torch.Tensor]  # "up"/"down" (LoRA), "w1a"/"w1b"/"w2a"/"w2b" (LoHa), raw keys otherwise
    alpha: float | None
    source: str  # the spelling x the patch was read under
    dora_scale: torch.Tensor | None = None  # x.dora_scale, handed to every adapter class (used by LoRA)


@attrs.frozen
class Loaded:
    patches: dict[Any, Patch]  # target → patch
    not_loaded: list[str]  # file keys ComfyUI logs as "lora key not loaded"
    errors: list[str]  # what would raise (a missing partner tensor) inside ComfyUI's loader


def _name(x: str, suffix: str) -> str:
    return x + suffix if suffix.startswith("_") else f"{x}.{suffix}"


def load_lora(lora: Mapping[str, torch.Tensor], key_map: Mapping[str, Target]) -> Loaded:
    """comfy/lora.py::load_lora: the patches read from the file and the keys left over."""
    patches: dict[Any, Patch] = {}
    loaded: set[str] = set()
    errors: list[str] = []
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = float(lora[f"{x}.alpha"].item())
            loaded.add(f"{x}.alpha")
        dora = lora.get(f"{x}.dora_scale")
        if dora is not None:
            loaded.add(f"{x}.dora_scale")
        # LoRA
        for up, down, mid in LORA_SUFFIXES:
            up_key = _name(x, up)
            if up_key in lora:
                down_key = _name(x, down)
                if down_key not in lora:
                    errors.append(f"{up_key} without {down_key} (KeyError in ComfyUI)")
                    break
                loaded.update((up_key, down_key))
                if mid is not None and _name(x, mid) in lora:
                    loaded.add(_name(x, mid))
                if f"{x}.reshape_weight" in lora:
                    loaded.add(f"{x}.reshape_weight")
                patches[target] = Patch("lora", {"up": lora[up_key], "down": lora[down_key]}, alpha, x, dora)
                break
        # LoHa
        if f"{x}.hada_w1_a" in lora:
            names = {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b"}
            missing = [f"{x}.{n}" for n in names.values() if f"{x}.{n}" not in lora]
            if missing:
                errors.append(f"{x}.hada_w1_a without {missing} (KeyError in ComfyUI)")
            else:
                if f"{x}.hada_t1" in lora:
                    loaded.update((f"{x}.hada_t1", f"{x}.hada_t2"))
                loaded.update(f"{x}.{n}" for n in names.values())
                patches[target] = Patch("loha", {k: lora[f"{x}.{n}"] for k, n in names.items()}, alpha, x, dora)
        # LoKr: each factor is read if present
        lokr = [
            f"{x}.{n}" for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        ]
        present = [k for k in lokr if k in lora]
        loaded.update(present)
        if any(k in lora for k in (lokr[0], lokr[1], lokr[2], lokr[4])):
            patches[target] = Patch("lokr", {k: lora[k] for k in present}, alpha, x, dora)
        # GLoRA
        if f"{x}.a1.weight" in lora:
            glora = [f"{x}.{n}.weight" for n in ("a1", "a2", "b1", "b2")]
            loaded.update(glora)
            patches[target] = Patch("glora", {k: lora[k] for k in glora if k in lora}, alpha, x)
        # OFT / BOFT
        if f"{x}.oft_blocks" in lora:
            loaded.add(f"{x}.oft_blocks")
            if f"{x}.rescale" in lora:
                loaded.add(f"{x}.rescale")
            patches[target] = Patch("oft", {"blocks": lora[f"{x}.oft_blocks"]}, alpha, x)
        for n in ("w_norm", "b_norm", "diff", "diff_b", "set_weight"):
            if f"{x}.{n}" in lora:
                loaded.add(f"{x}.{n}")
    not_loaded = [k for k in lora if k not in loaded]
    return Loaded(patches, not_loaded, errors)


def target_key(target: Target) -> str:
    return target if isinstance(target, str) else target[0]


def slice_shape(target: Target, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the part of a weight of ``shape`` that a target patches (``narrow(dim, start, length)``)."""
    shape = list(shape)
    if not isinstance(target, str) and target[1] is not None:
        dim, start, length = target[1]
        if start + length > shape[dim]:
            raise ValueError(f"{target_key(target)}: slice [{start}, {start + length}) beyond {shape[dim]} rows")
        shape[dim] = length
    return tuple(shape)


def delta_shape(patch: Patch) -> tuple[int, int]:
    """The shape of ΔW before ComfyUI reshapes it to the weight's (2-D for LoRA / LoHa on a Linear)."""
    t = patch.tensors
    if patch.kind == "lora":
        return int(t["up"].shape[0]), int(math.prod(t["down"].shape[1:]))
    if patch.kind == "loha":
        return int(t["w1a"].shape[0]), int(t["w1b"].shape[1])
    if patch.kind == "lokr":  # kron(w1, w2)'s shape, without building it (real shapes: hundreds of MB each)
        t = {k.rsplit(".", 1)[1]: v for k, v in t.items()}
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = tuple(t["lokr_w2"].shape)
        elif "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        w1 = tuple(w1) + (1,) * (len(w2) - 2)  # ComfyUI unsqueezes a 2-D w1 for a conv w2
        return int(w1[0] * w2[0]), int(math.prod(a * b for a, b in zip(w1[1:], w2[1:])))
    raise NotImplementedError(f"ΔW of {patch.kind} is not modelled by this oracle")


def _lokr(patch: Patch) -> tuple[torch.Tensor, int | None]:
    """ComfyUI's ``LoKrAdapter.calculate_weight``: ``kron(w1, w2)`` (before its reshape to the weight) and the ``dim``
    α is divided by: the rank of the last low-rank half, None when both halves are full (then α is ignored)."""
    t = {k.rsplit(".", 1)[1]: v.to(torch.float32) for k, v in patch.tensors.items()}
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()), dim


def delta(patch: Patch) -> torch.Tensor:
    """ΔW · scale in float32 (strength 1), before the target's slice / function; not for DoRA (:func:`patched_weights`)."""
    if patch.dora_scale is not None:
        raise NotImplementedError(f"{patch.source}: a DoRA patch depends on the weight; use patched_weights")
    t = {k: v.to(torch.float32) for k, v in patch.tensors.items()}
    if patch.kind == "lora":
        diff = t["up"].flatten(start_dim=1) @ t["down"].flatten(start_dim=1)
        rank = t["down"].shape[0]
    elif patch.kind == "loha":
        diff = (t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"])
        rank = t["w1b"].shape[0]
    elif patch.kind == "lokr":
        diff, rank = _lokr(patch)
        return diff * (1.0 if patch.alpha is None or rank is None else patch.alpha / rank)
    else:
        raise NotImplementedError(f"ΔW of {patch.kind} is not modelled by this oracle")
    scale = 1.0 if patch.alpha is None else patch.alpha / rank
    return scale * diff


@attrs.frozen
class Report:
    not_loaded: list[str]  # "lora key not loaded: <key>"
    not_applied: list[str]  # "NOT LOADED <target>": mapped, but the model has no such key
    errors: list[str]  # KeyError in the loader, or a ΔW that does not fit its weight (slice)
    targets: dict[str, list[Any]]  # model key (no prefix) → the targets patching it

    @property
    def clean(self) -> bool:
        return not (self.not_loaded or self.not_applied or self.errors)


def check(lora: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], family: str | None) -> Report:
    """Everything ComfyUI would complain about when loading ``lora`` onto a model with these state-dict shapes."""
    loaded = load_lora(lora, model_lora_keys_unet(shapes, family))
    not_applied, errors, targets = [], list(loaded.errors), {}
    for target, patch in loaded.patches.items():
        key = target_key(target)
        own = key[len(PREFIX) :]
        if own not in shapes:
            not_applied.append(key)
            continue
        try:
            want = slice_shape(target, shapes[own])
        except ValueError as exc:
            errors.append(str(exc))
            continue
        got = delta_shape(patch)
        if tuple(got) != tuple(want):
            errors.append(f"{patch.source}: ΔW {tuple(got)} does not fit {key} {tuple(want)}")
            continue
        targets.setdefault(own, []).append(target)
    return Report(loaded.not_loaded, not_applied, errors, targets)


def weight_deltas(
    lora: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], family: str | None
) -> dict[str, torch.Tensor]:
    """The ΔW ComfyUI adds to each model weight (key without prefix), strength 1, float32; raises on any complaint:
    :func:`patched_weights` on zero weights (a DoRA's update depends on the weight: use that with the real ones)."""
    dora = [k for k in lora if k.endswith(".dora_scale")]
    if dora:
        raise NotImplementedError(f"{dora[0]}: a DoRA patch depends on the weight; use patched_weights")
    return patched_weights(lora, {k: torch.zeros(tuple(v)) for k, v in shapes.items()}, family)


def weight_decompose(
    dora_scale: torch.Tensor,
    weight: torch.Tensor,
    lora_diff: torch.Tensor,
    alpha: float,
    strength: float,
    function: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """comfy/weight_adapter/base.py::weight_decompose (intermediate dtype float32): ``weight`` (a view of the model
    weight, narrowed to the target's slice) is updated in place and returned."""
    dora_scale = dora_scale.to(torch.float32)
    lora_diff = lora_diff * alpha
    weight_calc = weight + function(lora_diff).type(weight.dtype)
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output_axis: the norms of the weight before the patch
        weight_norm = (
            weight.reshape(weight.shape[0], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        )
    else:
        weight_norm = (
            weight_calc.transpose(0, 1)
            .reshape(weight_calc.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1))
            .transpose(0, 1)
        )
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc *= (dora_scale / weight_norm).type(weight.dtype)
    if strength != 1.0:
        weight_calc -= weight
        weight += strength * weight_calc
    else:
        weight[:] = weight_calc
    return weight


def patched_weights(
    lora: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    family: str | None,
    strength: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The model weights (keys without prefix) ComfyUI patches with ``lora`` at ``strength`` (float32; only the
    patched ones), DoRA included: each target's patch in turn on the weight as patched so far (comfy/lora.py::
    calculate_weight). Raises on anything ComfyUI would complain about or log as ``ERROR``."""
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    report = check(lora, shapes, family)
    if not report.clean:
        raise AssertionError(f"ComfyUI would complain: {report}")
    loaded = load_lora(lora, model_lora_keys_unet(shapes, family))
    out: dict[str, torch.Tensor] = {}
    for own, targets in report.targets.items():
        weight = weights[own].to(torch.float32).clone()  # patch_weight_to_device: a float32 copy
        for target in targets:
            patch = loaded.patches[target]
            view = weight
            function: Callable[[torch.Tensor], torch.Tensor] = lambda a: a  # noqa: E731
            if not isinstance(target, str):
                if target[1] is not None:
                    view = weight.narrow(*target[1])
                if len(target) > 2:
                    function = target[2]
            if patch.dora_scale is None:
                view += function((strength * delta(patch)).reshape(view.shape))
                continue
            if patch.kind != "lora":
                raise NotImplementedError(f"{patch.source}: DoRA on {patch.kind} is not modelled by this oracle")
            t = {k: v.to(torch.float32) for k, v in patch.tensors.items()}
            alpha = 1.0 if patch.alpha is None else patch.alpha / t["down"].shape[0]
            diff = (t["up"].flatten(start_dim=1) @ t["down"].flatten(start_dim=1)).reshape(view.shape)
            try:
                weight_decompose(patch.dora_scale, view, diff, alpha, strength, function)
            except RuntimeError as exc:  # ComfyUI logs "ERROR <name> <key> <exc>" and skips the patch
                raise AssertionError(f"ComfyUI: ERROR lora {target_key(target)} {exc}") from None
        out[own] = weight
    return out
