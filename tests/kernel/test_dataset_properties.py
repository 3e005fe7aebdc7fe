"""Property tests: malformed dataset configs end in a DatasetError (or a valid result), never another exception.

Hypothesis writes many TOML / JSON dataset configs — random and known keys, wrong types, huge, negative and NaN
numbers, tables where scalars go, non-UTF-8 bytes — and each must be read by ``load_dataset_config`` (and scanned
by ``scan_items`` when it gets that far) to a result or a ``DatasetError``. Path values are drawn from names inside
one scratch folder, so scanning never creates folders elsewhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from kern.data.dataset_config import DATASET_KEYS, SHARED_KEYS, DatasetSpec, load_dataset_config
from kern.data.items import scan_items
from kern.errors import DatasetError
from PIL import Image

PROPERTY = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
PATH_KEYS = ("image_directory", "image_jsonl_file", "cache_directory", "control_directory")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A scratch folder with one usable image folder, a JSONL file, a plain file and a folder named like a file."""
    root = tmp_path_factory.mktemp("dataset_properties")
    (root / "images").mkdir()
    Image.new("RGB", (64, 48), (90, 10, 200)).save(root / "images" / "a.png")
    (root / "images" / "a.txt").write_text("a picture")
    (root / "controls").mkdir()
    Image.new("RGB", (40, 40), (0, 0, 0)).save(root / "controls" / "a_0.png")
    (root / "m.jsonl").write_text(
        json.dumps({"image_path": "images/a.png", "caption": "x", "control_path": "controls/a_0.png"}) + "\n"
    )
    (root / "afile").write_text("a file, not a folder")
    (root / "dir.jsonl").mkdir()
    return root


scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", ".txt", "/x", "\\", "..", "a\x00b", "é", "x" * 300]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
sizes = st.one_of(
    st.integers(min_value=-5, max_value=20000),
    st.lists(st.one_of(st.integers(min_value=-5, max_value=40000), st.floats(), st.booleans()), min_size=0, max_size=3),
    values,
)
SAFE_PATHS = (
    "images",
    "missing",
    "afile",
    "afile/sub",
    "m.jsonl",
    "dir.jsonl",
    "controls",
    "cache_a",
    "cache_b/sub",
    "",
    " ",
    "images/",
    "./images",
    "images/a.png",
    "a\x00b",
)
safe_paths = st.sampled_from(SAFE_PATHS)
KNOWN = [k for k in (*SHARED_KEYS, *DATASET_KEYS) if k not in PATH_KEYS]
ODD_KEYS = [
    "video_directory",
    "fp_1f_no_post",
    "qwen_image_edit_control_resolution",
    "flux_kontext_no_resize_control",
    "colour",
]
GOOD = {  # well-typed values, so that many documents get past the config to the scan
    "size": st.one_of(st.integers(1, 600), st.lists(st.integers(1, 600), min_size=2, max_size=2)),
    "int": st.integers(1, 6),
    "bool": st.booleans(),
    "float": st.floats(0, 1),
    "str": st.sampled_from([".txt", ".caption", "_c.txt", "sks"]),
}
KIND = {key: kind for key, (kind, _) in {**SHARED_KEYS, **DATASET_KEYS}.items()}


USABLE_PATHS = {
    "image_directory": "images",
    "image_jsonl_file": "m.jsonl",
    "control_directory": "controls",
    "cache_directory": "cache_b/sub",
}


def _value_for(key: str):
    if key in PATH_KEYS:
        return st.one_of(st.just(USABLE_PATHS[key]), st.just(USABLE_PATHS[key]), safe_paths, values)
    good = GOOD.get(KIND.get(key, ""), values)
    bad = sizes if key in ("resolution", "control_resolution") else values
    return st.one_of(good, good, good, good, bad)


@st.composite
def document(draw) -> dict:
    """A valid config, then a few edits: a key set to a good or a bad value, a key removed, a table replaced."""
    doc: dict = {
        "general": {"resolution": 64, "caption_extension": ".txt"},
        "datasets": [{"image_directory": "images"}, {"image_jsonl_file": "m.jsonl", "cache_directory": "cache_a"}],
    }
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 2, 3, 5]))):
        where = draw(st.sampled_from(["general", 0, 1, 1, 0]))
        target = (
            doc["general"] if where == "general" else (doc["datasets"][where] if where < len(doc["datasets"]) else {})
        )
        action = draw(st.integers(0, 9))
        if action <= 5:
            key = draw(st.sampled_from([*KNOWN, *PATH_KEYS]))
            target[key] = draw(_value_for(key))
        elif action == 6 and target:
            target.pop(draw(st.sampled_from(sorted(target))))
        elif action == 7:
            target[draw(st.one_of(st.sampled_from(ODD_KEYS), st.text(min_size=1, max_size=8)))] = draw(values)
        elif action == 8:
            doc[draw(st.sampled_from(["general", "datasets", "extra"]))] = draw(values)
            break
        else:
            doc["datasets"] = doc["datasets"][: draw(st.integers(0, 2))]
    _keep_paths_safe(doc)
    return doc


def _keep_paths_safe(doc: dict) -> None:
    """Path keys may hold junk of any type, but a string must be one of the scratch folder's names."""
    allowed = set(SAFE_PATHS)
    tables = [doc.get("general")] + (
        doc["datasets"] if isinstance(doc.get("datasets"), list) else [doc.get("datasets")]
    )
    for t in tables:
        if isinstance(t, dict):
            for key in PATH_KEYS:
                if isinstance(t.get(key), str) and t[key] not in allowed:
                    t[key] = "missing"


def _check(path: Path) -> None:
    try:
        specs = load_dataset_config(path)
    except DatasetError as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        event("config rejected")
        return
    assert specs and all(isinstance(s, DatasetSpec) for s in specs)
    for spec in specs:  # a valid result is within the documented ranges
        assert 1 <= spec.batch_size <= 4096 and 1 <= spec.num_repeats <= 10000
        assert math.isfinite(spec.caption_dropout_rate) and 0 <= spec.caption_dropout_rate <= 1
        assert all(1 <= side <= 16384 for side in spec.resolution)
    try:
        items = scan_items(specs, 16)
    except DatasetError as exc:
        assert str(path.parent) in str(exc), f"the error names no file: {exc}"
        event("config valid, scan rejected")
        return
    event("scanned")
    assert items


def _toml(doc: dict) -> str | None:
    try:
        return tomli_w.dumps(doc)
    except (TypeError, ValueError):  # TOML cannot hold this document (e.g. a NaN where tomli_w refuses, surrogates)
        return None


@PROPERTY
@given(doc=document())
def test_any_toml_config_is_a_result_or_a_dataset_error(base, doc):
    text = _toml(doc)
    assume(text is not None)
    path = base / "dataset.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check(path)


@PROPERTY
@given(doc=document())
def test_any_json_config_is_a_result_or_a_dataset_error(base, doc):
    path = base / "dataset.json"
    path.write_text(json.dumps(doc), encoding="utf-8", errors="surrogatepass")
    _check(path)


@PROPERTY
@given(
    doc=document(),
    junk=st.binary(min_size=1, max_size=6),
    at=st.floats(0, 1),
    suffix=st.sampled_from([".toml", ".json"]),
)
def test_corrupted_bytes_are_a_result_or_a_dataset_error(base, doc, junk, at, suffix):
    text = (_toml(doc) or "") if suffix == ".toml" else json.dumps(doc)
    data = text.encode("utf-8", "surrogatepass")
    cut = int(len(data) * at)
    path = base / f"corrupt{suffix}"
    path.write_bytes(data[:cut] + junk + data[cut:])
    _check(path)


@settings(max_examples=60, deadline=None, database=None)
@given(
    lines=st.lists(
        st.one_of(
            st.binary(max_size=20),
            st.builds(
                json.dumps,
                st.dictionaries(
                    st.sampled_from(["image_path", "caption", "control_path", "control_path_0", "x"]),
                    st.one_of(safe_paths, values),
                    max_size=4,
                ),
            ),
            st.just('{"image_path": "images/a.png", "caption": "ok"}'),
        ),
        max_size=4,
    )
)
def test_any_jsonl_file_is_a_result_or_a_dataset_error(base, lines):
    jsonl = base / "p.jsonl"
    jsonl.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass") for line in lines)
    )
    cfg = base / "jsonl.toml"
    cfg.write_text('[[datasets]]\nimage_jsonl_file = "p.jsonl"\ncache_directory = "cache_j"\nresolution = 64\n')
    try:
        scan_items(load_dataset_config(cfg), 16)
    except DatasetError:
        pass
