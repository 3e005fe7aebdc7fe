"""kern.gpu.attention: the one attention call of the architectures, SDPA or a flash-attention package.

The flash-attention packages need a CUDA build this machine lacks, so the dispatch is checked with a stand-in
``flash_attn`` module whose ``flash_attn_func`` is the reference attention in the package's (B, L, H, D) layout:
what breaks here is kern's side (layout, head merge, the calls that must fall back to SDPA, the config error).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from kern.core.config import TrainConfig
from kern.errors import ConfigError
from kern.gpu import accel, attention


def _reference(q, k, v, mask=None):
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


@pytest.fixture
def fake_flash(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v):  # the package's layout: (B, L, H, D) in and out
        assert q.shape[2] == k.shape[2] and q.stride(-1) == 1
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import fails: FlashAttention-2 is found
    monkeypatch.setattr(attention, "_FLASH_DEVICES", ("cpu", "cuda"))
    yield calls
    attention.use_flash_attn(None)


def test_sdpa_by_default():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    assert torch.equal(attention.attention(q, k, v), _reference(q, k, v))


def test_flash_attn_package_gets_the_calls_it_can_take(fake_flash):
    found = attention.flash_attn_package()
    assert found is not None and found[0] == "flash_attn"
    attention.use_flash_attn(found[1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    out = attention.attention(q, k, v)
    assert len(fake_flash) == 1 and out.shape == (2, 6, 4 * 16)
    assert torch.allclose(out.float(), _reference(q, k, v).float(), atol=1e-2)
    # what the package cannot take goes to SDPA: a key mask (padded Qwen-Image text), fp32 inputs
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., -2:] = False
    assert torch.equal(attention.attention(q, k, v, mask), _reference(q, k, v, mask))
    q32, k32, v32 = (t.float() for t in (q, k, v))
    assert torch.equal(attention.attention(q32, k32, v32), _reference(q32, k32, v32))
    assert len(fake_flash) == 1


def test_architectures_attend_through_it(fake_flash):
    """Both architectures' blocks call kern.gpu.attention, so a third-party backend choice reaches them."""
    from kern_flux2 import layers as flux2_layers
    from kern_qwen_image import layers as qwen_layers

    attention.use_flash_attn(attention.flash_attn_package()[1])
    q, k, v = (torch.randn(1, 2, 4, 8).to(torch.bfloat16) for _ in range(3))
    flux2_layers.attention(q, k, v)
    qwen_layers.attention(q, k, v)
    assert len(fake_flash) == 2


def test_set_attention_chooses_and_reset_undoes(fake_flash):
    assert accel.set_attention("flash_attn") == "flash_attn"
    assert attention._flash is sys.modules["flash_attn"].flash_attn_func
    accel.reset_attention()
    assert attention._flash is None
    assert accel.set_attention("auto") == "auto" and attention._flash is None
    accel.reset_attention()


def test_flash_attn_without_the_package_names_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    assert attention.flash_attn_package() is None
    assert TrainConfig(attention="flash_attn").attention == "flash_attn"
    with pytest.raises(ConfigError, match=r"train\.attention.*pip install flash-attn"):
        accel.set_attention("flash_attn")
    accel.reset_attention()


def test_selective_checkpoint_keeps_the_package_attention_output():
    from torch.utils.checkpoint import CheckpointPolicy

    op = type("Op", (), {"__str__": lambda self: "flash_attn._flash_attn_forward.default"})()
    assert accel._save_attention(None, op) == CheckpointPolicy.MUST_SAVE
    assert accel._save_attention(None, torch.ops.aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE
