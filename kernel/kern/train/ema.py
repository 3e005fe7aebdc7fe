"""An exponential moving average of the adapter's trainable weights (``train.ema_decay``).

After every optimizer step (on gradient-accumulation boundaries only) each fp32 shadow tensor moves towards the
weight: ``ema = decay * ema + (1 - decay) * weight``, computed as ``ema.lerp_(weight, 1 - decay)`` exactly as
``torch.optim.swa_utils.get_ema_multi_avg_fn`` does. The shadow starts at the weights the run starts from (no
warm-up of the decay). It is saved beside the plain adapter (``<name>_ema.safetensors``, ``adapter_ema.safetensors``
in each checkpoint) by swapping it into the network for the save, and its tensors are part of the checkpoint's
state, so a resumed run continues it exactly. Preview images are made with it swapped in as well.

Under data parallelism every process holds the same weights after each step (the gradients are all-reduced), so
every process keeps the same EMA without any communication.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from kern.errors import UsageError

METADATA_KEY = "kern.ema_decay"  # in the EMA adapter's metadata: the file is the EMA, with this decay


def ema_path(path: Path) -> Path:
    """Where the EMA adapter of the adapter at ``path`` goes: ``<stem>_ema<suffix>`` beside it."""
    return path.with_name(f"{path.stem}_ema{path.suffix}")


class EMA:
    """The fp32 shadow of ``network``'s trainable parameters, keyed by their names."""

    def __init__(self, network: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.params = {name: p for name, p in network.named_parameters() if p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()

    @classmethod
    def maybe(cls, network: nn.Module, decay: float | None) -> EMA | None:
        """The EMA of ``network`` when ``decay`` is set (``train.ema_decay``), else None."""
        return None if decay is None else cls(network, decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights."""
        self.shadow = {name: p.detach().to(torch.float32, copy=True) for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step."""
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().to(self.shadow[name].device, torch.float32), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], where: str = "the checkpoint") -> None:
        """Restore the shadow from a checkpoint's ``ema`` entry; another network's is a clear error."""
        missing, extra = self.params.keys() - state.keys(), state.keys() - self.params.keys()
        wrong = [n for n in self.params.keys() & state.keys() if tuple(state[n].shape) != tuple(self.params[n].shape)]
        if missing or extra or wrong:
            first = sorted(missing or extra or wrong)[0]
            raise UsageError(
                f"--resume: the EMA in {where} does not fit this network ({first!r}); resume with the [network] "
                "settings the run was started with (its config.toml)"
            )
        for name, p in self.params.items():
            self.shadow[name] = state[name].to(p.device, torch.float32, copy=True)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The network holds the EMA weights inside the block and exactly its own weights again after it."""
        with torch.no_grad():
            kept = {name: p.detach().clone() for name, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(kept[name])
