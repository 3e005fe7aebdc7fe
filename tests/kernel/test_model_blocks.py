"""The architecture-free building blocks under the plugins' model code: tiny random models (kern.models.tiny),
checked state loading and tokenizer folders (kern.models.files, kern.models.hf), the tiling decision."""

from __future__ import annotations

import pytest
import torch
from kern.errors import ModelFileError
from kern.models import files, hf, tiling, tiny
from torch import nn


class Net(nn.Module):
    def __init__(self, reverse: bool = False) -> None:
        super().__init__()
        layers = [("proj", nn.Linear(4, 3)), ("norm", nn.LayerNorm(3))]
        for name, m in reversed(layers) if reverse else layers:
            self.add_module(name, m)


def is_gain(name, p):
    return name == "norm.weight"


def test_init_random_is_the_plain_seeded_loop():
    # What the plugins' and tests' hand-written loops did: one generator, names in sorted order, gains 1 + 0.1 N.
    ours = tiny.init_random_(Net(), 7, tiny.gains_near_one(is_gain, std=0.05))
    ref, g = Net(), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(ref.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if is_gain(name, p) else 0.05 * noise)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))


def test_init_random_depends_on_names_not_registration_order_unless_asked():
    draw = tiny.gains_near_one(is_gain)
    a, b = tiny.init_random_(Net(), 0, draw), tiny.init_random_(Net(reverse=True), 0, draw)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    c = tiny.init_random_(Net(reverse=True), 0, draw, sorted_names=False)
    assert not torch.equal(a.proj.weight, c.proj.weight)
    assert not torch.equal(a.proj.weight, tiny.init_random_(Net(), 1, draw).proj.weight)


def test_init_random_leaves_undrawn_parameters_and_continues_a_generator():
    net = Net()
    before = net.proj.weight.clone()
    g = torch.Generator().manual_seed(3)
    tiny.init_random_(net, g, lambda name, p: (0.0, 1.0) if name.endswith("bias") else None)
    assert torch.equal(net.proj.weight, before)
    after = torch.randn(1, generator=g)
    g2 = torch.Generator().manual_seed(3)
    for _ in ("norm.bias", "proj.bias"):
        torch.randn(3, generator=g2)
    assert torch.equal(after, torch.randn(1, generator=g2))


def test_smooth_images_are_seeded_and_in_range():
    x = tiny.smooth_images(2, 3, seed=5, size=32)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, tiny.smooth_images(2, 3, seed=5, size=32))


def test_byte_level_bpe_tokenizes_anything_and_keeps_specials_whole():
    tok = tiny.byte_level_bpe(["a red square"] * 3, 300, ["<|s|>"])
    ids = tok.encode("<|s|>unseen wörds").ids
    assert ids[0] == tok.token_to_id("<|s|>")
    assert tok.decode(ids[1:]) == "unseen wörds"


def test_build_bundle_writes_missing_parts_only(tmp_path, capsys):
    calls = []

    def file_writer(p):
        calls.append(p.name)
        p.write_text("x")

    def folder_writer(p):
        calls.append(p.name)
        p.mkdir()
        (p / "config.json").write_text("{}")

    parts = {"a": ("a.bin", file_writer), "b": ("b", folder_writer)}
    paths = tiny.build_bundle(tmp_path / "bundle", parts)
    assert paths == {"a": tmp_path / "bundle" / "a.bin", "b": tmp_path / "bundle" / "b"} and calls == ["a.bin", "b"]
    tiny.build_bundle(tmp_path / "bundle", parts)
    assert calls == ["a.bin", "b"]
    (tmp_path / "bundle" / "a.bin").unlink()
    tiny.build_bundle(tmp_path / "bundle", parts)
    assert calls == ["a.bin", "b", "a.bin"]
    with pytest.raises(SystemExit, match="usage: python -m some.tiny OUTPUT_FOLDER"):
        tiny.bundle_main(lambda folder: {}, "some.tiny", [])
    tiny.bundle_main(lambda folder: {"a": folder}, "some.tiny", ["out"])
    assert capsys.readouterr().out == "a: out\n"


def test_write_random_model_saves_the_seeded_weights(tmp_path):
    from kern.core.io import load_file

    path = tiny.write_random_model(Net(), tmp_path / "net.safetensors", 2, tiny.gains_near_one(is_gain), {"k": "v"})
    state, metadata = load_file(path)
    ref = tiny.init_random_(Net(), 2, tiny.gains_near_one(is_gain)).state_dict()
    assert metadata["k"] == "v" and all(torch.equal(state[k], ref[k]) for k in ref)


def test_assign_checked_fills_a_meta_model_or_names_what_is_wrong(tmp_path):
    state = Net().state_dict()
    with torch.device("meta"):
        model = Net()
    files.assign_checked(model, state, "the net", tmp_path, torch.float64, "cpu")
    assert model.proj.weight.dtype == torch.float64 and torch.equal(model.proj.weight, state["proj.weight"].double())
    with torch.device("meta"):
        model = Net()
    bad = {**state, "proj.weight": torch.zeros(2, 4)}
    with pytest.raises(ModelFileError, match=r"does not fit the net.*mis-shaped: proj.weight"):
        files.assign_checked(model, bad, "the net", tmp_path, None, "cpu")
    del state["norm.bias"]
    files.assign_checked(model, state, "the net", tmp_path, None, "cpu", optional=lambda k: k == "norm.bias")
    assert model.norm.bias.is_meta  # left out, as asked


def test_tokenizer_dir_looks_in_the_folder_then_its_sibling(tmp_path):
    te = tmp_path / "text_encoder"
    te.mkdir()
    with pytest.raises(ModelFileError, match="no tokenizer files"):
        hf.tokenizer_dir(te)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    assert hf.tokenizer_dir(te) == tmp_path / "tokenizer"
    (te / "tokenizer_config.json").write_text("{}")
    assert hf.tokenizer_dir(te) == te and hf.has_tokenizer(te)
    assert hf.tokenizer_dir(te, str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"


def test_wants_tiles():
    z = torch.zeros(1, 4, 10, 10)
    assert tiling.wants_tiles(z, None, 99) and not tiling.wants_tiles(z, None, 100)
    assert tiling.wants_tiles(z, True, 10**6) and not tiling.wants_tiles(z, False, 0)


def test_run_block_checkpoints_only_with_gradients_and_gives_the_same_gradients():
    from kern.models.blocks import run_block
    from torch import nn

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    plain = run_block(block, x, checkpointed=False)
    plain.sum().backward()
    want = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    calls = []
    block[0].register_forward_hook(lambda *_: calls.append(1))
    ckpt = run_block(block, x, checkpointed=True)
    ckpt.sum().backward()
    assert len(calls) == 2  # the checkpoint ran the block again in backward
    assert torch.equal(plain, ckpt)
    assert all(torch.equal(a, p.grad) for a, p in zip(want, block.parameters()))
    with torch.no_grad():
        assert torch.equal(run_block(block, x, checkpointed=True), plain)
