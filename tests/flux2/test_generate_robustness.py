"""`kern generate` batches on the tiny FLUX.2 klein bundle (CPU, fp32): a true-CFG variant (klein base) with
different prompts and negative prompts in one batch makes the images it makes one at a time."""

from __future__ import annotations

import pytest
import torch
from kern.core.plugins import get_manager
from kern.data.prompts import Request
from kern.generate.driver import Generator, Setup


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _latents(bundle, requests, batch_size):
    gen = Generator(
        Setup(
            arch="flux2",
            variant="klein-base-4b",
            transformer=str(bundle["transformer"]),
            vae=str(bundle["vae"]),
            text_encoder=str(bundle["text_encoder"]),
            dtype="float32",
            device="cpu",
            width=32,
            height=32,
            steps=2,
            batch_size=batch_size,
        )
    )
    images = gen.plan(requests)
    gen.denoise(images, gen.encode(images))
    return images


def test_mixed_prompts_and_negatives_in_one_batch_equal_single_images(tiny_bundle, monkeypatch):
    hook = get_manager().hook
    real, calls = hook.predict_velocity, []
    monkeypatch.setattr(hook, "predict_velocity", lambda **kw: (calls.append(kw["latents"].shape[0]), real(**kw))[1])
    requests = [
        Request(prompt="a red circle", negative="blurry", seed=1),
        Request(
            prompt="a blue square on a long wooden table", negative="ugly, deformed, low quality, extra limbs", seed=2
        ),
        Request(prompt="a red circle", seed=3),  # the variant's default negative prompt
        Request(prompt="a green triangle", negative="", seed=4, guidance=4.0),
    ]
    batched = _latents(tiny_bundle, requests, batch_size=4)
    assert set(calls) == {4}  # the fixed-length FLUX.2 context lets all four share each forward
    alone = _latents(tiny_bundle, requests, batch_size=1)
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)
