"""FLUX.2 generation schedule: the official empirical mu, as a pure function of tokens and steps."""

from __future__ import annotations

import math

import torch

# Fits of mu against image tokens at 10 and 200 steps (BFL sampling.py; identical in diffusers and musubi).
A1, B1 = 8.73809524e-05, 1.89833333
A2, B2 = 0.00016927, 0.45666666


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """mu for ``image_seq_len`` target tokens (references not counted) and ``num_steps`` steps.

    Above 4300 tokens the 200-step fit alone is used; below, mu interpolates linearly in the step
    count between the 10- and 200-step fits (and extrapolates under 10 steps).
    """
    if image_seq_len > 4300:
        return A2 * image_seq_len + B2
    m_200 = A2 * image_seq_len + B2
    m_10 = A1 * image_seq_len + B1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return a * num_steps + b


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """e^mu / (e^mu + 1/t - 1), with t = 0 kept at 0."""
    t = t.double()
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t.clamp_min(1e-12) - 1.0))
    return torch.where(t > 0, shifted, torch.zeros_like(t)).float()


def sigmas(num_steps: int, image_seq_len: int, shift: float | None = None) -> torch.Tensor:
    """``num_steps + 1`` values from 1 to 0. ``shift`` replaces the dynamic mu by a fixed s (mu = ln s)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    mu = math.log(shift) if shift else empirical_mu(image_seq_len, num_steps)
    return time_shift(mu, t)
