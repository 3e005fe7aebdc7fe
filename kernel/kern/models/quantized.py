"""Loading checkpoints straight into a model, fp8 weights kept fp8: :func:`load_into`.

A file's fp8 weight with its per-tensor (or per-row) scale is exactly kern's fp8 layer format (e4m3 bytes plus one
float32 scale per output row, ``kern.gpu.fp8``), so a frozen transformer trained with an fp8 base, or a text
encoder kept in fp8, can take the file's bytes as they are: no bf16 copy of such a layer is ever made, and the
result is the same as dequantising and then quantising per row would be, without that second rounding. Which
files hold fp8 weights and how they are scaled is ``kern.models.files.read_layout``'s business (from the headers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from kern.log import get_logger
from kern.models.files import check_shapes, read_layout, read_tensors, state_shapes

__all__ = ["FP8_MODES", "load_into"]

log = get_logger(__name__)

FP8_MODES = (None, "matmul", "storage")

Rename = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def load_into(
    model: nn.Module,
    files: Iterable[str | Path],
    *,
    dtype: torch.dtype,
    device: Any,
    fp8: str | None = None,
    keep: Iterable[str] = (),
    what: str,
    where: str | Path,
    optional: Callable[[str], bool] | None = None,
    rename: Rename | None = None,
) -> nn.Module:
    """Fill ``model`` (built on the meta device) from the safetensors ``files`` and return it.

    * ``rename``: maps the file's state dict (key → tensor, quantisation keys already consumed) to the model's
      names; pure key moves keep an fp8 weight fp8, while a tensor it computes (a fused q/k/v ``torch.cat``, a
      swap of halves) is computed from dequantised inputs and lands in ``dtype``. It is called twice: on meta
      stand-ins first (shape check, and which model key is which file tensor, by identity), then on the tensors.
    * Shapes are checked against the model first (``kern.models.files.check_shapes``: one error listing every
      missing, unexpected and mis-shaped key; an fp8 weight has its Linear's shape). Model keys ``optional``
      accepts may be absent from the file.
    * ``fp8=None``: every tensor dequantised exactly (``q.float() * scale``, then one cast) into ``dtype``.
    * ``fp8="matmul"``: each ``nn.Linear`` (exactly that type) whose weight the file holds in fp8 and which
      ``kern.gpu.fp8.quantize_base`` would convert (path matching no ``keep`` regex, in and out features multiples
      of 16) becomes a ``Float8MatmulLinear`` holding the file's e4m3 bytes and scale (bias in ``dtype``).
    * ``fp8="storage"``: likewise into ``Float8StorageLinear`` (text encoders), for every plain ``nn.Linear``
      matching no ``keep`` regex.

    With ``fp8`` set, Linear weights the file holds in bf16 / fp32 stay in ``dtype``: the later ``quantize_base`` /
    ``quantize_linears_`` pass quantises them (and leaves the fp8 ones as they are). An e5m2 weight is converted to
    e4m3 exactly (a power-of-two shift per row) where every value fits, and dequantised otherwise; weights scaled
    per block (musubi) are dequantised. Errors are ``ModelFileError`` naming ``where``.
    """
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, not {fp8!r}")
    files = [Path(f) for f in files]
    layout = read_layout(files)
    stand_ins = {
        k: torch.empty(shape, dtype=dtype if _floating(layout.dtypes[k]) else torch.uint8, device="meta")
        for k, shape in layout.shapes.items()
    }
    renamed = dict(rename(dict(stand_ins))) if rename else stand_ins
    expected = {k: s for k, s in state_shapes(model.state_dict()).items() if not (optional and optional(k))}
    check_shapes(expected, state_shapes(renamed), what, Path(where))

    source = {id(v): k for k, v in stand_ins.items()}
    raw: dict[str, str] = {}  # model key of a weight that stays fp8 -> its file key
    if fp8 is not None:
        patterns = [re.compile(p) for p in keep]
        for name, v in renamed.items():
            key = source.get(id(v))
            if key is not None and key in layout.scales and layout.dtypes[key].startswith("F8_"):
                if layout.per_row(key) and _convertible(model, name, fp8, patterns):
                    raw[name] = key

    state, quantised = read_tensors(files, dtype, device, raw=raw.values())
    loaded = dict(rename(state)) if rename else state
    converted = 0
    for name, key in raw.items():
        if key not in quantised:  # an e5m2 weight with no exact e4m3 form: dequantised into ``state``
            continue
        q, scale = quantised[key]
        if loaded.get(name) is not q:
            raise RuntimeError(f"rename moved {key!r} to {name!r} on stand-ins but not on the tensors")
        layer = name[: -len(".weight")]
        _to_fp8_layer(model, layer, q, scale, fp8, dtype)
        loaded[f"{layer}.weight_scale"] = scale
        converted += 1
    model.load_state_dict(loaded, assign=True, strict=optional is None)
    if converted or layout.scales:
        log.info("fp8 checkpoint", where=str(where), fp8_layers=converted, fp8_in_file=len(layout.scales), mode=fp8)
    return model


def _floating(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith(("F", "BF"))


def _convertible(model: nn.Module, name: str, fp8: str, patterns: list[re.Pattern]) -> bool:
    """Whether model key ``name`` is the weight of a layer the ``fp8`` mode turns into an fp8 layer."""
    if not name.endswith(".weight"):
        return False
    layer = name[: -len(".weight")]
    try:
        m = model.get_submodule(layer)
    except AttributeError:
        return False
    if type(m) is not nn.Linear or not layer or any(p.search(layer) for p in patterns):
        return False
    return fp8 == "storage" or not (m.in_features % 16 or m.out_features % 16)


def _to_fp8_layer(model: nn.Module, layer: str, q: torch.Tensor, scale: torch.Tensor, fp8: str, dtype) -> None:
    """Replace (storage) or switch (matmul) the meta ``nn.Linear`` at ``layer`` into an fp8 layer holding ``q``."""
    from kern.gpu.fp8 import Float8StorageLinear, to_float8_matmul

    linear = model.get_submodule(layer)
    if fp8 == "matmul":
        to_float8_matmul(linear, q, scale, compute_dtype=dtype)
        return
    parent_name, _, attr = layer.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, Float8StorageLinear.from_quantized(q, scale, linear.bias is not None, dtype))
