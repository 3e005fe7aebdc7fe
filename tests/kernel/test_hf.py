"""kern.models.hf: the shared checks of Hugging Face text-encoder folders."""

from __future__ import annotations

import pytest
from kern.errors import ModelFileError
from kern.models import hf


def test_read_config_names_the_file(tmp_path):
    with pytest.raises(ModelFileError, match=r"config\.json: not found"):
        hf.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match=r"config\.json: unreadable"):
        hf.read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    assert hf.read_config(tmp_path) == {"model_type": "qwen3"}


def test_loading_info_errors_and_expected_unused_layers(tmp_path, caplog):
    with pytest.raises(
        ModelFileError, match=r"does not fit Qwen2\.5-VL: 1 missing weights \['a'\], 1 mis-shaped \['b'\]"
    ):
        hf.check_loading_info({"missing_keys": ["a"], "mismatched_keys": [("b", (1,), (2,))]}, tmp_path, "Qwen2.5-VL")
    keep = hf.layers_from(2)
    assert keep("model.layers.2.mlp.weight") and keep("model.layers.30.x") and not keep("model.layers.1.x")
    assert not keep("lm_head.weight") and hf.layers_from(None) is None
