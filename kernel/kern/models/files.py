"""Reading model checkpoints, for architecture plugins: files of a path, headers, key checks, streamed loads.

Every architecture needs the same few steps around its own key names: find the safetensors files of
a single file or a diffusers folder, look at shapes without reading tensors, compare them with the
model it is about to build (one error listing everything wrong), and load tensor by tensor straight
into the target dtype and device.

fp8 checkpoints (plain casts, ComfyUI's scaled and mixed files; below :func:`read_layout`) read the same way: their
quantisation keys are consumed, their weights dequantised exactly; ``kern.models.quantized.load_into`` keeps them
fp8 instead, for fp8 layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import attrs
import torch

from kern.core.io import read_header
from kern.errors import KernError, ModelFileError

__all__ = [
    "MODEL_PREFIXES",
    "PART_OPTIONS",
    "Layout",
    "assign_checked",
    "check_shapes",
    "dequantize",
    "load_tensors",
    "read_layout",
    "read_shapes",
    "read_state",
    "read_tensors",
    "require_path",
    "safetensors_files",
    "shape_reader",
    "state_shapes",
    "strip_prefixes",
]

MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


# Where a user sets each part: kern train reads it from the job only, kern generate and kern cache also take an option.
PART_OPTIONS = {
    part: f"model.{part} (kern train: [model] {part} or --set model.{part}=PATH; "
    f"kern generate, kern cache: --{part.replace('_', '-')})"
    for part in ("transformer", "vae", "text_encoder")
}


def require_path(path: str | None, part: str, arch_label: str) -> str:
    """``path``, or a ``UsageError`` saying which option to set for the ``part`` of ``arch_label``."""
    if not path:
        from kern.errors import UsageError

        raise UsageError(
            f"{arch_label} needs a {part.replace('_', ' ')} checkpoint: set {PART_OPTIONS.get(part, part)}"
        )
    return path


def safetensors_files(path: str | Path, subfolder: str) -> list[Path]:
    """The weight files of ``path``: the file itself, or the ``*.safetensors`` of a diffusers folder
    (``path/subfolder/`` or ``path/``), sharded or not."""
    p = Path(path)
    if p.is_file():
        return [p]
    for folder in (p / subfolder, p):
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return files
    if not p.exists():
        raise ModelFileError(f"{p}: no such file or folder")
    raise ModelFileError(
        f"{p}: no .safetensors files here or in {p / subfolder}; point at the checkpoint file or a diffusers folder"
    )


def read_shapes(files: Iterable[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of all ``files`` (headers only), as :func:`load_tensors` returns the tensors: the
    keys of an fp8 checkpoint's quantisation (markers, scales, ``comfy_quant``) left out (:func:`read_layout`)."""
    layout = read_layout(files)
    return dict(layout.shapes), dict(layout.metadata)


def strip_prefixes(names: dict[str, Any], prefixes: tuple[str, ...] = MODEL_PREFIXES) -> dict[str, Any]:
    """``names`` with a ComfyUI-style ``model.diffusion_model.`` / ``diffusion_model.`` prefix removed."""
    out = {}
    for k, v in names.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def check_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], what: str, where: Path
) -> None:
    """One ``ModelFileError`` naming every missing, unexpected and mis-shaped key (first dozen of each)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{k}: file {found[k]} vs model {expected[k]}" for k in set(found) & set(expected) if found[k] != expected[k]
    )
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:12]) + (f" ... (+{len(items) - 12} more)" if len(items) > 12 else "")
            parts.append(f"{len(items)} {label}: {shown}")
    if parts:
        raise ModelFileError(
            f"{where}: does not fit {what} (variant assumed from the file; force one with --variant): "
            + "; ".join(parts)
        )


def shape_reader(state: Mapping[str, Any], where: str, otherwise: str) -> Callable[[str], tuple[int, ...]]:
    """``shape(key)`` in ``state``, whose values are tensors or plain shapes (a header's), for reading
    hyper-parameters off the weights; a missing key is a ``ModelFileError``: "{where}: no 'key'; {otherwise}"."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ModelFileError(f"{where}: no {key!r}; {otherwise}")
        v = state[key]
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    return shape


def state_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a state dict (``check_shapes``'s input)."""
    return {k: tuple(v.shape) for k, v in state.items()}


def read_state(path: str | Path, subfolder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) model file or diffusers folder as stored, on the CPU: for checks and key
    conversions that need values before the model is built, as a VAE's."""
    files = safetensors_files(path, subfolder)
    read_shapes(files)  # a truncated or foreign file fails here, naming it
    return load_tensors(files, None, "cpu")


def assign_checked(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    where: Path,
    dtype: torch.dtype,
    device: Any,
    optional: Callable[[str], bool] | None = None,
) -> torch.nn.Module:
    """Fill ``model`` (built on the meta device) with ``state``, each tensor cast to ``dtype`` on ``device``, after
    ``check_shapes`` against the model's own keys. Keys the model has but ``optional`` accepts may be absent."""
    expected = {k: s for k, s in state_shapes(model.state_dict()).items() if not (optional and optional(k))}
    check_shapes(expected, state_shapes(state), what, where)
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True, strict=optional is None
    )
    return model


def load_tensors(files: Iterable[Path], dtype: torch.dtype | None, device: Any) -> dict[str, torch.Tensor]:
    """Every tensor of ``files``, each cast to ``dtype`` (floating tensors only) on ``device`` as it is read.

    Each file's header is validated first (``kern.core.io.read_header``) and every tensor is checked finite as it
    arrives (on ``device``, in bounded chunks): a corrupt file, a tensor holding NaN / Inf, or one that
    overflows ``dtype`` is a ``ModelFileError`` naming the file and the key. fp8 checkpoints (plain casts, ComfyUI's
    scaled and mixed files: :func:`read_layout`) come out dequantised exactly (:func:`dequantize`; float32 when
    ``dtype`` is None), their quantisation keys consumed.
    """
    return read_tensors(files, dtype, device)[0]


def _nonfinite_message(f: Path, key: str, source: torch.Tensor, out: torch.Tensor, bad: str) -> str:
    """Whether the file holds the NaN/Inf values or the cast to the load dtype made them."""
    from kern.core.io import describe_nonfinite

    if out.dtype != source.dtype and describe_nonfinite(source) is None:
        return f"{f}: tensor {key!r} overflows {str(out.dtype).replace('torch.', '')} ({bad}); load it in bfloat16 or float32 (--dtype)"
    return f"{f}: tensor {key!r} holds {describe_nonfinite(source) or bad}; the checkpoint is corrupt: re-download or re-export it"


# --------------------------------------------------------------------------- fp8 checkpoints
#
# Three ways a safetensors file holds fp8 weights, told apart by the header (dtypes, key names) alone:
# * a plain cast: ``<layer>.weight`` F8_E4M3 / F8_E5M2, no scale (scale 1);
# * ComfyUI's legacy scaled fp8: a marker ``<prefix>scaled_fp8`` (its dtype the fp8 dtype, 2 elements for
#   full-precision matmuls), per layer ``.scale_weight`` (fp32, one value) and optionally ``.scale_input``;
# * ComfyUI's mixed files: ``<layer>.comfy_quant`` (uint8 bytes of JSON ``{"format": ...}``) or the metadata
#   ``_quantization_metadata`` (``{"layers": {layer: {"format": ...}}}``), with ``.weight_scale`` / ``.input_scale``.
# W = weight.float() * scale. kern's own ``Float8*Linear`` state dicts (a ``weight_scale`` per output row) and
# musubi's ``scale_weight`` per row ([out, 1]) or per block ([out, blocks, 1]) read the same way. Input scales are
# consumed and not used: kern quantises activations per token on every call.

FP8_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # safetensors dtype -> torch / ComfyUI name
SCALE_SUFFIXES = ("weight_scale", "scale_weight")
INPUT_SCALE_SUFFIXES = ("input_scale", "scale_input")
_INTEGER_DTYPES = ("U8", "I8", "I16", "U16", "I32", "U32")


@attrs.frozen
class Layout:
    """What the headers of a checkpoint's files say, quantisation worked out: ``shapes`` / ``dtypes`` (safetensors
    names) of the keys a load returns, ``scales`` (each fp8 tensor's scale key, None for a plain cast), ``dropped``
    (markers, scales, input scales, ``comfy_quant``: consumed, never returned) and the merged ``metadata``."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    scales: dict[str, str | None]
    scale_shapes: dict[str, tuple[int, ...]]
    dropped: frozenset[str]
    metadata: dict[str, str]

    def per_row(self, key: str) -> bool:
        """Whether fp8 tensor ``key``'s scale is one number or one per output row: kern's fp8 layers' format."""
        scale = self.scales[key]
        if scale is None:
            return True
        n = 1
        for d in self.scale_shapes[scale]:
            n *= d
        return n == 1 or n == self.shapes[key][0] and len(self.scale_shapes[scale]) <= 2


def _refuse(where: Path, layer: str, fmt: str) -> ModelFileError:
    return ModelFileError(
        f"{where}: layer {layer!r} is quantised as {fmt}; kern reads fp8 checkpoints (float8_e4m3fn, float8_e5m2), "
        f"and this file holds {fmt} layers: use the bf16 or fp8 file"
    )


def _formats(f: Path, header: dict[str, Any], metadata: dict[str, str]) -> dict[str, str]:
    """The ``format`` of each layer a ComfyUI mixed file names (``.comfy_quant`` tensors, ``_quantization_metadata``)."""
    found: dict[str, Any] = {}
    if "_quantization_metadata" in metadata:
        try:
            found.update(json.loads(metadata["_quantization_metadata"]).get("layers", {}))
        except (ValueError, AttributeError) as exc:
            raise ModelFileError(
                f"{f}: metadata _quantization_metadata is not the JSON ComfyUI writes: {exc}"
            ) from None
    quant_keys = [k for k in header if k.endswith(".comfy_quant")]
    if quant_keys:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for k in quant_keys:
                try:
                    found[k[: -len(".comfy_quant")]] = json.loads(bytes(handle.get_tensor(k).tolist()).decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ModelFileError(f"{f}: {k!r} is not UTF-8 JSON as ComfyUI writes it: {exc}") from None
    return {layer: str(conf.get("format") if isinstance(conf, dict) else conf) for layer, conf in found.items()}


def _check_scale(f: Path, layer: str, weight: dict[str, Any], key: str, scale: dict[str, Any]) -> str:
    """``key``, the scale of ``layer``, if its shape is one kern reads: one number, one per output row, or musubi's
    [out, blocks, 1]; e8m0 block scales are mxfp8, refused by name."""
    shape, rows = tuple(scale["shape"]), weight["shape"][0] if weight["shape"] else 1
    n = 1
    for d in shape:
        n *= d
    if scale["dtype"] == "F8_E8M0":
        raise _refuse(f, layer, "mxfp8")
    block = len(shape) == 3 and shape[0] == rows and shape[2] == 1 and weight["shape"][-1] % shape[1] == 0
    if not (n == 1 or n == rows and len(shape) <= 2 or block):
        raise ModelFileError(
            f"{f}: layer {layer!r}: a scale of shape {list(shape)} for a weight of shape {weight['shape']} is "
            "neither per tensor, per row nor per block; kern reads fp8 checkpoints scaled so: use the bf16 or fp8 file"
        )
    return key


def read_layout(files: Iterable[Path]) -> Layout:
    """The :class:`Layout` of ``files`` from their headers (and the few bytes of any ``comfy_quant`` tensor).

    A layer quantised in a format kern does not read (nvfp4, mxfp8, int8 ...: a ``comfy_quant`` format, or a scale
    next to an integer weight) is a ``ModelFileError`` naming the file, the layer and the format.
    """
    header: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    for f in files:
        try:
            head, meta = read_header(f)
        except KernError as exc:
            raise ModelFileError(str(exc)) from None
        for layer, fmt in _formats(f, head, meta).items():
            if fmt not in FP8_DTYPES.values():
                raise _refuse(f, layer, fmt)
            dtype = head.get(f"{layer}.weight", {}).get("dtype")
            if dtype is not None and FP8_DTYPES.get(dtype) != fmt:
                raise ModelFileError(f"{f}: layer {layer!r} says {fmt} but its weight is stored as {dtype}")
        header.update({k: (f, v) for k, v in head.items()})
        metadata.update(meta)
    dropped = {k for k in header if k.endswith(".comfy_quant") or k == "scaled_fp8" or k.endswith(".scaled_fp8")}
    quantised = bool(dropped) or any(v["dtype"] in FP8_DTYPES for _, v in header.values())
    scales: dict[str, str | None] = {}
    for k, (f, v) in header.items():
        base, _, last = k.rpartition(".")
        weight = header.get(f"{base}.weight", (None, {}))[1].get("dtype")
        if weight in _INTEGER_DTYPES and last in SCALE_SUFFIXES:
            raise _refuse(f, base, f"{weight} with a {last}")
        if weight is not None and quantised and last in SCALE_SUFFIXES + INPUT_SCALE_SUFFIXES:
            dropped.add(k)  # a scale (or a bf16 layer's scale) is read with its weight; input scales are not used
        elif v["dtype"] in FP8_DTYPES and k not in dropped or quantised and last == "weight":
            scale = next((f"{base}.{s}" for s in SCALE_SUFFIXES if last == "weight" and f"{base}.{s}" in header), None)
            if v["dtype"] in FP8_DTYPES or scale is not None:
                scales[k] = scale and _check_scale(f, base, v, scale, header[scale][1])
    kept = {k: v for k, (_, v) in header.items() if k not in dropped}
    return Layout(
        shapes={k: tuple(v["shape"]) for k, v in kept.items()},
        dtypes={k: v["dtype"] for k, v in kept.items()},
        scales=scales,
        scale_shapes={s: tuple(header[s][1]["shape"]) for s in scales.values() if s is not None},
        dropped=frozenset(dropped),
        metadata=metadata,
    )


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
    """``q · scale`` computed in float32, then cast once to ``dtype`` (float32 when None): the exact value of an fp8
    weight as its producer defined it. ``scale`` is one number, one per output row, or one per block of a row."""
    w = q.to(torch.float32)
    if scale is not None:
        s = scale.to(device=w.device, dtype=torch.float32)
        if s.numel() == 1:
            w = w * s.reshape(())
        elif s.dim() == 3:  # [out, blocks, 1]: musubi's block-wise scale
            w = (w.reshape(s.shape[0], s.shape[1], -1) * s).reshape(q.shape)
        else:
            w = w * s.reshape(-1, *([1] * (q.dim() - 1)))
    return w if dtype in (None, torch.float32) else w.to(dtype)


def row_scales(scale: torch.Tensor | None, rows: int) -> torch.Tensor:
    """A per-tensor or per-row scale as kern's fp8 layers hold it: float32, one per output row."""
    if scale is None:
        return torch.ones(rows, dtype=torch.float32)
    s = scale.to(torch.float32).reshape(-1)
    return s.expand(rows).contiguous() if s.numel() == 1 else s.contiguous()


def e5m2_to_e4m3(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An e5m2 weight with per-row ``scale`` as e4m3 with per-row scale, exactly (each row shifted by a power of
    two into e4m3's range), or None where some value has no exact e4m3 form (then the caller dequantises)."""
    from kern.gpu.fp8 import E4M3_MAX, float8_dtype

    w = q.to(torch.float32)
    amax = w.abs().amax(dim=1)
    shift = torch.where(amax > 0, torch.floor(torch.log2(E4M3_MAX / amax.clamp(min=1e-30))), torch.zeros_like(amax))
    factor = torch.exp2(shift).unsqueeze(1)
    out = (w * factor).to(float8_dtype())
    if not bool((out.to(torch.float32) == w * factor).all()):
        return None
    return out, scale / factor.squeeze(1)


def _as_e4m3(t: torch.Tensor, scale: torch.Tensor | None, dtype: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A raw fp8 tensor as kern's layers hold it (e4m3, scale per row), or None if that cannot be exact."""
    row = row_scales(scale, t.shape[0])
    return e5m2_to_e4m3(t, row) if dtype == "F8_E5M2" else (t, row)


def read_tensors(
    files: Iterable[Path], dtype: torch.dtype | None, device: Any, raw: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """:func:`load_tensors`, except that the fp8 tensors named in ``raw`` stay fp8: ``(state, quantised)`` where
    ``quantised[key] = (e4m3 weight, float32 scale per row)`` and ``state[key]`` is that same e4m3 tensor. An e5m2
    tensor in ``raw`` is converted exactly (:func:`e5m2_to_e4m3`) or, where it cannot be, dequantised into ``state``
    and left out of ``quantised``. Only keys whose :meth:`Layout.per_row` holds may be ``raw``."""
    from safetensors import safe_open

    from kern.core.io import describe_nonfinite

    files = list(files)
    layout = read_layout(files)
    raw = set(raw)
    wanted_scales = {s for s in layout.scales.values() if s is not None}
    state: dict[str, torch.Tensor] = {}
    quantised: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
                scales.update({k: handle.get_tensor(k) for k in keys if k in wanted_scales})
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # safetensors' own errors, a dtype this torch lacks, the file changing meanwhile
            raise ModelFileError(f"{f}: unreadable safetensors file: {exc}") from None
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for k in handle.keys():
                    if k in layout.dropped:
                        continue
                    t = handle.get_tensor(k)
                    if k not in layout.scales:
                        out = t.to(
                            device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype
                        )
                        checked = (out,)
                    else:
                        scale = scales.get(layout.scales[k])
                        fp8 = _as_e4m3(t, scale, layout.dtypes[k]) if k in raw else None
                        if fp8 is not None:  # checked as stored: no dequantised copy of a layer that stays fp8
                            out, row = fp8[0].to(device), fp8[1].to(device)
                            quantised[k], checked = (out, row), (out, row)
                        else:
                            out = dequantize(t.to(device), scale, dtype)
                            checked = (out,)
                    for c in checked:
                        bad = describe_nonfinite(c)
                        if bad:
                            raise ModelFileError(_nonfinite_message(f, k, t, c, bad))
                    state[k] = out
        except KernError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # safetensors' own errors, a dtype this torch lacks, the file changing meanwhile
            raise ModelFileError(f"{f}: unreadable safetensors file: {exc}") from None
    return state, quantised
