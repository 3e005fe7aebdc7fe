"""The adapter runtime: :class:`AdapterModule` (one adapter on one layer; plugins subclass it) and :class:`Network`
(a set of them: wrapping, multiplier, enable/disable, LoRA+ parameter groups, save in kohya naming, merge into the
model).

How wrapping works: the target layer is **not replaced**. Its ``forward`` is swapped (an instance attribute) for a
function that calls the original ``forward`` and adds the outputs of the adapters attached to it, so the layer
keeps its weights and type, and several adapters (any types mixed, from several networks) can sit on one
layer. ``Network.remove()`` detaches; when the last adapter leaves a layer, its original ``forward`` is restored.

Precision: each adapter casts the layer's input to its own dtype (an fp32 adapter on a bf16 model computes in
fp32), or under autocast to the autocast dtype its matmuls run in anyway (:func:`compute_dtype`); the adapter
outputs are summed and added to the layer's output with type promotion, then rounded **once** to the layer's
output dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kern.adapters.network.metadata import network_metadata, safetensors_hashes
from kern.adapters.network.names import RowSlice
from kern.adapters.network.targets import is_linear
from kern.errors import AdapterError, UsageError
from kern.log import get_logger

log = get_logger(__name__)


def layer_geometry(org: nn.Module) -> dict[str, Any]:
    """``kind`` (``linear`` / ``conv2d``), ``in_features``, ``out_features``, ``weight_shape`` of a target layer."""
    if isinstance(org, nn.Conv2d):
        return {
            "kind": "conv2d",
            "in_features": org.in_channels,
            "out_features": org.out_channels,
            "weight_shape": tuple(org.weight.shape),
        }
    if is_linear(org):
        return {
            "kind": "linear",
            "in_features": org.in_features,
            "out_features": org.out_features,
            "weight_shape": (org.out_features, org.in_features),
        }
    raise AdapterError(f"cannot put an adapter on a {type(org).__name__}; only Linear and Conv2d layers")


def compute_dtype(x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adapter casts its input to: autocast's while autocast is on (its matmuls run there anyway,
    so a cast to an fp32 adapter's dtype would only copy the activation to fp32 and back: same numbers, twice
    the traffic), else the adapter's own dtype. The parameters stay fp32 masters either way."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return adapter_dtype


def layer_device(org: nn.Module) -> torch.device:
    w = getattr(org, "weight", None)
    return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")


class AdapterModule(nn.Module):
    """One adapter on one target layer. Network plugins subclass it.

    The target layer is held as ``self.org`` but **not registered as a submodule**, so the adapter's
    ``state_dict``, ``parameters()`` and ``.to()`` cover only the adapter's own tensors. Subclasses implement:

    * ``adapter_forward(x)`` — the adapter's contribution to the layer output for input ``x`` (already scaled
      by α/r, dropout applied in training), **without** the user multiplier, in the adapter's dtype;
    * ``delta_weight()`` — the full-size ``ΔW`` (float32, the layer's weight shape), without the multiplier;
    * ``kohya_tensors()`` / ``load_kohya_tensors(tensors)`` — the module's tensors by kohya suffix
      (``lora_down.weight``, ``hada_w1_a``, ``alpha`` ...).

    ``up_param_names`` lists parameter-name prefixes that LoRA+ trains at ``lr × loraplus_lr_ratio``.
    """

    up_param_names: tuple[str, ...] = ()

    def __init__(self, name: str, path: str, org: nn.Module, module_dropout: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self.__dict__["org"] = org  # deliberately not a submodule
        self.geometry = layer_geometry(org)
        self.multiplier = 1.0
        self.enabled = True
        self.module_dropout = float(module_dropout or 0.0)

    def active(self) -> bool:
        """Whether this adapter contributes to this forward (enabled, non-zero multiplier, not module-dropped)."""
        if not self.enabled or self.multiplier == 0:
            return False
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return False
        return True

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_to(self, out: torch.Tensor, x: torch.Tensor, multiplier: float) -> torch.Tensor:
        """``out + multiplier · adapter_forward(x)``, rounded once to ``out``'s dtype: the layer's output when this is
        its only active adapter. Subclasses may fuse the addition into their last matmul (LoRA does)."""
        y = self.adapter_forward(x)
        if multiplier != 1.0:
            y = y * multiplier
        return (out + y).to(out.dtype)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_kohya_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.path}"


_ATTACHED = "_kern_adapters"
_PREVIOUS = "_kern_previous_forward"


class RowsAdapter(AdapterModule):
    """The adapters of a layer's :class:`RowSlice` s, as one adapter of the whole layer: each slice adapter's output
    (times its multiplier) goes into its rows, zero elsewhere."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__("row slices", "", layer)
        self.__dict__["parts"] = []  # (RowSlice, adapter); plain list: the adapters belong to their networks

    def active(self) -> bool:
        return any(a.enabled and a.multiplier != 0 for _, a in self.parts)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.geometry["out_features"]
        total = None
        for s, a in self.parts:
            if not a.active():
                continue
            y = a.adapter_forward(x)
            y = F.pad(y * a.multiplier if a.multiplier != 1.0 else y, (s.start, rows - s.stop))
            total = y if total is None else total + y
        return x.new_zeros(*x.shape[:-1], rows) if total is None else total


_ROWS = "_kern_row_slices"


def _attach(org: nn.Module, adapter: AdapterModule) -> None:
    if isinstance(org, RowSlice):  # the adapter works on the layer's output through the layer's RowsAdapter
        rows = org.layer.__dict__.setdefault(_ROWS, RowsAdapter(org.layer))
        if (org, adapter) not in rows.parts:
            rows.parts.append((org, adapter))
        _attach(org.layer, rows)
        return
    d = org.__dict__
    if _ATTACHED not in d:
        adapters: list[AdapterModule] = []
        original = org.forward  # the class's bound forward, or an earlier instance-level replacement

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return _add_adapter_outputs(original(x, *args, **kwargs), x, adapters)

        d[_PREVIOUS] = d.get("forward")
        d[_ATTACHED] = adapters
        d["forward"] = forward
    if adapter not in d[_ATTACHED]:
        d[_ATTACHED].append(adapter)


def _detach(org: nn.Module, adapter: AdapterModule) -> None:
    if isinstance(org, RowSlice):
        rows = org.layer.__dict__.get(_ROWS)
        if rows is not None:
            rows.parts[:] = [(s, a) for s, a in rows.parts if not (s is org and a is adapter)]
            if not rows.parts:
                _detach(org.layer, rows)
                org.layer.__dict__.pop(_ROWS, None)
        return
    d = org.__dict__
    adapters = d.get(_ATTACHED)
    if adapters is None:
        return
    if adapter in adapters:
        adapters.remove(adapter)
    if not adapters:
        previous = d.pop(_PREVIOUS, None)
        d.pop(_ATTACHED, None)
        if previous is None:
            d.pop("forward", None)
        else:
            d["forward"] = previous


def _add_adapter_outputs(out: torch.Tensor, x: torch.Tensor, adapters: Sequence[AdapterModule]) -> torch.Tensor:
    active = [a for a in adapters if a.active()]
    if len(active) == 1:  # the training case: the adapter may fuse its addition into its own last matmul
        return active[0].add_to(out, x, active[0].multiplier)
    total = None
    for a in active:
        y = a.adapter_forward(x)
        if a.multiplier != 1.0:
            y = y * a.multiplier
        total = y if total is None else total + y
    if total is None:
        return out
    # Type promotion does the sum in the wider dtype (an fp32 adapter on a bf16 layer adds in fp32), then one rounding.
    return (out + total).to(out.dtype)


def attached_adapters(org: nn.Module) -> list[AdapterModule]:
    """The adapters currently attached to layer ``org`` (in attach order)."""
    return list(org.__dict__.get(_ATTACHED, ()))


class Network(nn.Module):
    """A set of adapter modules of one network type on one model.

    ``adapters`` is an ``nn.ModuleDict`` keyed by kohya module name, so ``network.parameters()`` are the
    trainable adapter tensors and ``network.to(...)``, ``.train()``, ``.eval()`` act on them only.
    """

    def __init__(
        self,
        network_type: str,
        modules: Iterable[AdapterModule],
        *,
        multiplier: float = 1.0,
        loraplus_lr_ratio: float | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.network_type = network_type
        self.adapters = nn.ModuleDict()
        for m in modules:
            if m.name in self.adapters:
                raise AdapterError(
                    f"two adapter modules are called {m.name!r} (paths {self.adapters[m.name].path!r} and {m.path!r})"
                )
            self.adapters[m.name] = m
        self.options = dict(options or {})
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.attached = False
        self.merged = False
        self._enabled = True
        self._multiplier = 1.0
        self.multiplier = multiplier

    # ------------------------------------------------------------------ state

    @property
    def multiplier(self) -> float:
        """The user strength ``m`` in ``y = W x + m · ΔW x``; settable at any time (also during inference)."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        if self.merged:
            log.warning(
                "network already merged into the model; changing its multiplier has no effect",
                network=self.network_type,
            )
        self._multiplier = float(value)
        for m in self.adapters.values():
            m.multiplier = self._multiplier

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        for m in self.adapters.values():
            m.enabled = self._enabled

    def __len__(self) -> int:
        return len(self.adapters)

    def modules_by_path(self) -> dict[str, AdapterModule]:
        return {m.path: m for m in self.adapters.values()}

    # ------------------------------------------------------------------ wrapping

    def apply(self, fn: Callable[[nn.Module], None] | None = None) -> Network:  # type: ignore[override]
        """Attach every adapter to its layer (idempotent); returns ``self``.

        ``apply(fn)`` keeps ``nn.Module.apply``'s meaning (call ``fn`` on every submodule), so generic code
        that walks modules is not surprised.
        """
        if fn is not None:
            return super().apply(fn)
        return self.attach()

    def attach(self) -> Network:
        """Attach every adapter to its layer (idempotent); returns ``self``."""
        if self.merged:
            raise AdapterError("this network was merged into the model; it cannot be attached again")
        for m in self.adapters.values():
            _attach(m.org, m)
        self.attached = True
        return self

    def remove(self) -> None:
        """Detach every adapter; layers get their original ``forward`` back when no adapter is left on them."""
        for m in self.adapters.values():
            _detach(m.org, m)
        self.attached = False

    # ------------------------------------------------------------------ training

    def optimizer_param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: everything at ``lr``; with LoRA+ (``loraplus_lr_ratio``), the up/B
        factors (``AdapterModule.up_param_names``) in a second group at ``lr × ratio``."""
        ratio = self.loraplus_lr_ratio
        base: list[nn.Parameter] = []
        up: list[nn.Parameter] = []
        for m in self.adapters.values():
            for n, p in m.named_parameters():
                if not p.requires_grad:
                    continue
                is_up = bool(ratio) and any(n == u or n.startswith(u + ".") for u in m.up_param_names)
                (up if is_up else base).append(p)
        if ratio and not up:
            log.warning(
                "loraplus_lr_ratio has no effect on this network type: it has no up factors", network=self.network_type
            )
        groups = [{"params": base, "lr": lr, "name": self.network_type}]
        if up:
            groups.append({"params": up, "lr": lr * float(ratio), "name": f"{self.network_type}_plus_up"})
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ weights

    def adapter_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The adapter in kohya naming: ``{"<kohya name>.<suffix>": tensor}``; ``alpha`` stays float32."""
        out = {}
        for m in self.adapters.values():
            for suffix, t in m.kohya_tensors().items():
                t = t.detach()
                if dtype is not None and suffix != "alpha" and t.is_floating_point():
                    t = t.to(dtype)
                out[f"{m.name}.{suffix}"] = t.to(torch.float32) if suffix == "alpha" else t
        return out

    def load_adapter_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load tensors in kohya naming (as ``adapter_state_dict`` writes them), e.g. to resume training."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state_dict.items():
            name, _, suffix = key.partition(".")
            grouped.setdefault(name, {})[suffix] = t
        unknown = sorted(set(grouped) - set(self.adapters))
        missing = sorted(set(self.adapters) - set(grouped))
        if unknown or missing:
            raise AdapterError(
                f"adapter state does not fit this network: unknown modules {unknown[:10]}, missing {missing[:10]}"
            )
        for name, tensors in grouped.items():
            self.adapters[name].load_kohya_tensors(tensors)

    def network_metadata(self) -> dict[str, str]:
        """kohya ``ss_network_*`` keys describing this network (type, rank, alpha, dropout, other options), from
        :func:`kern.adapters.network.metadata.network_metadata`."""
        return network_metadata(self.network_type, self.options)

    def save(
        self, path: str | Path, dtype: torch.dtype = torch.float32, metadata: Mapping[str, str] | None = None
    ) -> Path:
        """Write the adapter as safetensors in kohya naming (``lora_unet_*``), atomically.

        ``metadata`` (the header from :func:`~kern.adapters.network.metadata.adapter_metadata`, or extra keys such as
        :func:`~kern.adapters.network.metadata.modelspec_metadata`'s) is merged over this network's ``ss_network_*``
        keys; ``sshs_model_hash`` / ``sshs_legacy_hash`` are computed as sd-scripts does. Values must be strings.
        """
        from kern.core.io import save_file

        tensors = self.adapter_state_dict(dtype)
        md = {**self.network_metadata(), **dict(metadata or {})}
        bad = [k for k, v in md.items() if not isinstance(v, str)]
        if bad:
            raise UsageError(f"adapter metadata values must be strings; not for {bad}")
        md.update(safetensors_hashes(tensors, md))
        save_file(tensors, path, md)
        log.info(
            "saved adapter",
            path=str(path),
            modules=len(self.adapters),
            network=self.network_type,
            dtype=str(dtype).replace("torch.", ""),
        )
        return Path(path)

    @torch.no_grad()
    def merge_into_model(self) -> None:
        """Add ``multiplier · ΔW`` of every enabled adapter into its layer's weight and detach the network.

        For "merged for speed" generation: afterwards the model runs at base speed. The merge is computed in
        float32 and rounded once to the weight's dtype (an fp8 ``Float8StorageLinear`` is re-quantised). It is not
        undoable without a copy of the original weights; reload the model to unmerge.
        """
        merge_networks([self])


@torch.no_grad()
def merge_networks(networks: Sequence[Network]) -> None:
    """:meth:`Network.merge_into_model` for several networks at once: a layer's ΔW are all taken on its unmerged
    weight, then added together (a DoRA's ΔW depends on the weight it is merged into; unmerged, each adapter sees
    the base layer, and so does ``kern merge``), one layer at a time (one layer's ΔW in memory)."""
    layers: dict[int, tuple[nn.Module, list[AdapterModule]]] = {}
    for net in networks:
        if net.merged:
            continue
        for m in net.adapters.values():
            if m.enabled and m.multiplier != 0:
                layers.setdefault(id(m.org), (m.org, []))[1].append(m)
    for org, adapters in layers.values():
        add_to_weight_(org, sum(m.delta_weight() * m.multiplier for m in adapters))
    for net in networks:
        if not net.merged:
            net.remove()
            net.merged = True


def add_to_weight_(org: nn.Module, delta: torch.Tensor) -> None:
    """``org.weight += delta`` computed in float32 and rounded once (fp8 layers, ``kern.gpu.fp8.Float8StorageLinear``
    and ``kern.gpu.fp8.Float8MatmulLinear`` alike, are dequantised and re-quantised with a new per-row scale). On a
    :class:`RowSlice` the update goes into its rows of the layer's weight."""
    if isinstance(org, RowSlice):
        layer = org.layer
        full = torch.zeros(tuple(layer.weight.shape), dtype=torch.float32, device=delta.device)
        if tuple(delta.shape) != (org.out_features, org.in_features):
            raise AdapterError(f"ΔW shape {tuple(delta.shape)} does not fit rows [{org.start}, {org.stop}) of {layer}")
        full[org.start : org.stop] = delta.to(torch.float32)
        return add_to_weight_(layer, full)
    if hasattr(org, "weight_scale") and hasattr(org, "dequantized_weight"):
        from kern.gpu.fp8 import quantize_weight

        w = org.dequantized_weight(torch.float32) + delta.to(device=org.weight.device, dtype=torch.float32)
        q, s = quantize_weight(w)
        org.weight.copy_(q)
        org.weight_scale.copy_(s)
        return
    w = org.weight
    if tuple(w.shape) != tuple(delta.shape):
        raise AdapterError(f"ΔW shape {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
    w.copy_((w.to(torch.float32) + delta.to(device=w.device, dtype=torch.float32)).to(w.dtype))
