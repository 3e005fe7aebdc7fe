"""Reading model checkpoints, for architecture plugins: files of a path, headers, key checks, streamed loads.

Every architecture needs the same few steps around its own key names: find the safetensors files of
a single file or a diffusers folder, look at shapes without reading tensors, compare them with the
model it is about to build (one error listing everything wrong), and load tensor by tensor straight
into the target dtype and device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from kern.core.io import read_header
from kern.errors import KernError, ModelFileError

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
    """Tensor shapes and metadata of all ``files`` (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    metadata: dict[str, str] = {}
    for f in files:
        try:
            header, meta = read_header(f)
        except KernError as exc:
            raise ModelFileError(str(exc)) from None
        shapes.update({k: tuple(v["shape"]) for k, v in header.items()})
        metadata.update(meta)
    return shapes, metadata


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
    overflows ``dtype`` is a ``ModelFileError`` naming the file and the key.
    """
    from safetensors import safe_open

    from kern.core.io import describe_nonfinite

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            read_header(f)
        except KernError as exc:
            raise ModelFileError(str(exc)) from None
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for k in handle.keys():
                    t = handle.get_tensor(k)
                    out = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                    bad = describe_nonfinite(out)
                    if bad:
                        raise ModelFileError(_nonfinite_message(f, k, t, out, bad))
                    state[k] = out
        except KernError:
            raise
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # safetensors' own errors, a dtype this torch lacks, the file changing meanwhile
            raise ModelFileError(f"{f}: unreadable safetensors file: {exc}") from None
    return state


def _nonfinite_message(f: Path, key: str, source: torch.Tensor, out: torch.Tensor, bad: str) -> str:
    """Whether the file holds the NaN/Inf values or the cast to the load dtype made them."""
    from kern.core.io import describe_nonfinite

    if out.dtype != source.dtype and describe_nonfinite(source) is None:
        return f"{f}: tensor {key!r} overflows {str(out.dtype).replace('torch.', '')} ({bad}); load it in bfloat16 or float32 (--dtype)"
    return f"{f}: tensor {key!r} holds {describe_nonfinite(source) or bad}; the checkpoint is corrupt: re-download or re-export it"
