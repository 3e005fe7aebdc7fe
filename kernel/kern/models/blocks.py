"""Running a transformer's repeated blocks: the one piece of the forward pass every architecture shares."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, *args: Any, checkpointed: bool) -> Any:
    """``block(*args)``, under activation checkpointing when ``checkpointed`` and gradients are on.

    Keyed on grad mode, not ``block.training``: kern trains adapters with the frozen base in eval mode.
    """
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
