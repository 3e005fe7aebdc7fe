"""The streaming safetensors writer and reader against the safetensors library."""

from __future__ import annotations

import pytest
import torch
from kern.adapters.streaming import SafetensorsReader, StreamingWriter, aligned_order
from kern.errors import KernError
from safetensors import safe_open


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.alpha": torch.tensor(4.0),
        "c.f8": torch.randn(4, 2, generator=g).to(torch.float8_e4m3fn),
        "d.f64": torch.randn(2, generator=g, dtype=torch.float64),
        "e.idx": torch.arange(7),
        "f.mask": torch.tensor([True, False, True]),
        "g.empty": torch.zeros(0, 4),
        "h.f16": torch.randn(2, 3, generator=g).half(),
    }


def test_round_trip_with_the_safetensors_library(tmp_path):
    tensors = sample()
    layout = aligned_order((k, v.dtype, v.shape) for k, v in tensors.items())
    path = tmp_path / "s.safetensors"
    with StreamingWriter(path, layout, {"note": "x"}) as w:
        for name, _, _ in layout:
            w.write(name, tensors[name])
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "x"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    with SafetensorsReader(path) as r:
        for k, v in tensors.items():
            got = r.get(k)
            assert got.dtype == v.dtype and torch.equal(got.float(), v.float())


def test_wrong_order_or_missing_tensors_leave_no_file(tmp_path):
    tensors = sample()
    layout = [(k, v.dtype, v.shape) for k, v in tensors.items()]
    path = tmp_path / "s.safetensors"
    with pytest.raises(KernError, match="expected tensor 'a.weight'"):
        with StreamingWriter(path, layout) as w:
            w.write("b.alpha", tensors["b.alpha"])
    with pytest.raises(KernError, match="only 1 of 8 tensors were written"):
        with StreamingWriter(path, layout) as w:
            w.write("a.weight", tensors["a.weight"])
    with pytest.raises(KernError, match="expected tensor 'a.weight' torch.bfloat16"):
        with StreamingWriter(path, layout) as w:
            w.write("a.weight", tensors["a.weight"].float())
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingWriter(path, layout) as w:
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
