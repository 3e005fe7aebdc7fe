"""LyCORIS reads kern's own LoKr and DoRA files: ``lycoris.kohya.create_network_from_weights`` (the loader
sd-scripts and musubi-tuner use for ``--network_module lycoris.kohya``) on kern's kohya-layout save gives kern's
outputs. (test_lokr.py checks the other way: kern reads the files LyCORIS saves.)"""

from __future__ import annotations

import copy

import pytest
import torch
from kern.records import TargetSpec

lycoris_kohya = pytest.importorskip("lycoris.kohya")


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](torch.relu(self.blocks[0](x)))


@pytest.mark.parametrize("kind", ["lokr", "dora"])
def test_lycoris_applies_kerns_file_as_kern_does(kind, tmp_path):
    from kern_lokr.plugin import LOKR
    from kern_lora.plugin import LORA

    torch.manual_seed(0)
    model = TwoLayers().requires_grad_(False)
    theirs = copy.deepcopy(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        base = model(x)
    targets = TargetSpec(targets=(r"blocks\.\d",))
    if kind == "lokr":  # α ≠ r, W2 low rank
        net = LOKR.make_network(model, targets, {"rank": 2, "alpha": 1.0, "factor": 4})
    else:
        net = LORA.make_network(model, targets, {"rank": 4, "alpha": 2.0, "dora": True})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        ours = model(x)
    assert not torch.allclose(ours, base, atol=1e-3)
    path = tmp_path / f"{kind}.safetensors"
    net.save(path)
    network, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, None, theirs)
    assert len(network.unet_loras) == 2
    network.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours, rtol=1e-5, atol=1e-6)
