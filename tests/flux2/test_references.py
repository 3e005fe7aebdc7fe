"""FLUX.2 reference images in generation: sized as the official preprocessing, encoded, fed to the model."""

from __future__ import annotations

import json

from kern.core.plugins import get_manager
from kern.data.prompts import Request, parse_line
from kern.generate.driver import Setup, run_batch
from PIL import Image


def test_reference_sizes_follow_the_official_caps():
    hook = get_manager().hook
    one = hook.reference_sizes(arch="flux2", variant="dev", sizes=[(4000, 3000)], target=(1024, 1024))
    assert one[0][0] * one[0][1] <= 2024 * 2024 and all(v % 16 == 0 for v in one[0])
    many = hook.reference_sizes(arch="flux2", variant="dev", sizes=[(4000, 3000), (100, 70)], target=(1024, 1024))
    assert many[0][0] * many[0][1] <= 1024 * 1024 and many[1] == (96, 64)  # small ones are only cropped to 16


def test_generation_with_reference_images(tmp_path, tiny_bundle, monkeypatch):
    refs = []
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        path = tmp_path / f"ref{i}.png"
        Image.new("RGB", (48 + 16 * i, 40), color).save(path)
        refs.append(str(path))
    manager = get_manager()
    seen = []
    real = manager.hook.predict_velocity

    def spy(**kw):
        seen.append([tuple(r.shape) for r in kw["references"] or []])
        return real(**kw)

    monkeypatch.setattr(manager.hook, "predict_velocity", spy)
    setup = Setup(
        arch="flux2-klein-4b",
        transformer=str(tiny_bundle["transformer"]),
        vae=str(tiny_bundle["vae"]),
        text_encoder=str(tiny_bundle["text_encoder"]),
        dtype="float32",
        device="cpu",
        out=tmp_path / "out",
        steps=2,
    )
    line = parse_line(f"a red circle --w 32 --h 32 --d 3 --ci {refs[0]} --ci {refs[1]}", "p.txt:1")
    with_refs = run_batch(setup, [line])
    import attrs

    plain = run_batch(
        attrs.evolve(setup, out=tmp_path / "plain"), [Request(prompt="a red circle", width=32, height=32, seed=3)]
    )
    assert seen[0] == [(1, 128, 2, 3), (1, 128, 2, 4)]  # (40 x 48) and (40 x 64) pixels at 16 px per token
    assert seen[-1] == []
    assert Image.open(with_refs[0]).tobytes() != Image.open(plain[0]).tobytes()
    assert json.loads(Image.open(with_refs[0]).text["kern"])["references"] == refs
