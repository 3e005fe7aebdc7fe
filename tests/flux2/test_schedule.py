"""FLUX.2 generation schedule against the reference's published numbers."""

from __future__ import annotations

import math

import pytest
import torch
from kern_flux2 import schedule


@pytest.mark.parametrize(
    ("tokens", "steps", "mu"),
    [
        (1024, 4, 2.031),
        (1024, 28, 1.859),
        (1024, 50, 1.702),
        (2304, 50, 1.836),
        (4096, 4, 2.291),
        (4096, 28, 2.151),
        (4096, 50, 2.023),
        (6889, 50, 1.623),
        (9216, 4, 2.017),
        (16384, 50, 3.230),
    ],
)
def test_empirical_mu_matches_reference_table(tokens, steps, mu):
    assert schedule.empirical_mu(tokens, steps) == pytest.approx(mu, abs=1e-3)


def test_above_4300_tokens_mu_equals_flux1_linear_mu():
    # a2 = 0.65/3840 and b2 = 0.5 - 256 a2: FLUX.1's 0.5 -> 1.15 line over 256 -> 4096 tokens.
    for tokens in (5000, 8192, 20000):
        assert schedule.empirical_mu(tokens, 7) == pytest.approx(0.5 + (tokens - 256) * 0.65 / 3840, abs=2e-4)


def test_four_step_schedule_at_1024():
    expected = torch.tensor([1.0, 0.9674, 0.9081, 0.7672, 0.0])
    assert torch.allclose(schedule.sigmas(4, 4096), expected, atol=1e-4)


def test_fifty_step_schedule_ends():
    s = schedule.sigmas(50, 4096)
    assert torch.allclose(s[:4], torch.tensor([1.0, 0.9973, 0.9945, 0.9916]), atol=1e-4)
    assert torch.allclose(s[-4:], torch.tensor([0.3256, 0.2396, 0.1337, 0.0]), atol=1e-4)
    assert bool((s[1:] < s[:-1]).all())


def test_fixed_shift_replaces_dynamic_mu():
    s = schedule.sigmas(10, 4096, shift=3.0)
    t = torch.linspace(1, 0, 11)
    assert torch.allclose(s[1:-1], (3 * t / (1 + 2 * t))[1:-1], atol=1e-6)
    assert math.isclose(float(s[-1]), 0.0)
