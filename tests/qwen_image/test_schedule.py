"""Qwen-Image schedule and true CFG against the reference's numbers and formulas."""

from __future__ import annotations

import math

import pytest
import torch
from kern_qwen_image import schedule


@pytest.mark.parametrize(("tokens", "mu"), [(1024, 0.539), (4096, 0.694), (6889, 0.834), (6032, 0.791)])
def test_mu_matches_reference(tokens, mu):
    assert schedule.mu_for_tokens(tokens) == pytest.approx(mu, abs=1e-3)


def test_schedules_match_reference():
    s = schedule.sigmas(50, 4096)
    assert torch.allclose(s[:4], torch.tensor([1.0, 0.9897, 0.9792, 0.9685]), atol=1e-4)
    assert torch.allclose(s[-5:], torch.tensor([0.1311, 0.0955, 0.0585, 0.02, 0.0]), atol=1e-4)
    s = schedule.sigmas(50, 6889)
    assert torch.allclose(s[:3], torch.tensor([1.0, 0.9910, 0.9818]), atol=1e-4)
    assert torch.allclose(s[-3:], torch.tensor([0.0638, 0.02, 0.0]), atol=1e-4)
    s = schedule.sigmas(40, 4096)
    assert torch.allclose(s[-4:], torch.tensor([0.1135, 0.0679, 0.02, 0.0]), atol=1e-4)


def test_layered_mu_is_sqrt_of_condition_tokens():
    s = schedule.layered_sigmas(50, 1600)  # 640^2 -> mu 2.5
    t = 1.0 - 1.0 / 50
    shifted = math.exp(2.5) / (math.exp(2.5) + 1 / t - 1)
    assert s[0] == pytest.approx(1.0) and s[-1] == 0 and s[-2] == pytest.approx(0.02, abs=1e-6)
    assert float(s[1]) <= shifted + 1e-6


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    out = schedule.true_cfg(cond, uncond, 4.0)

    def tokens(x):  # the transformer's packing: (B, h/2 * w/2, 16 * 2 * 2)
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)

    comb = uncond + 4.0 * (cond - uncond)
    expected = tokens(comb) * tokens(cond).norm(dim=-1, keepdim=True) / tokens(comb).norm(dim=-1, keepdim=True)
    assert torch.allclose(tokens(out), expected, atol=1e-5)
    assert torch.allclose(schedule.true_cfg(cond, uncond, 4.0, normalize=False), comb)
