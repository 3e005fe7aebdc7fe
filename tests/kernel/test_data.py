"""kern.data (dataset_config, items, buckets, images): the musubi dataset TOML, scanning, buckets, control matching, batch order, image loading."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from kern.data.buckets import fit_area, make_buckets
from kern.data.dataset_config import DatasetSpec, load_dataset_config
from kern.data.images import load_image
from kern.data.items import batch_key, batch_order, match_controls, scan_items
from kern.errors import DatasetError
from PIL import Image
from structlog.testing import capture_logs

STEP = 16


def image(path: Path, size=(64, 64), color=(200, 30, 30), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def captioned(folder: Path, name: str, size=(64, 64), caption: str | None = None, ext=".txt") -> Path:
    path = image(folder / name, size)
    (folder / (path.stem + ext)).write_text(caption if caption is not None else f"a photo of {path.stem}\n")
    return path


def toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def one_dataset(tmp_path: Path, extra: str = "", general: str = "", folder: str = "images") -> list[DatasetSpec]:
    cfg = toml(
        tmp_path / "dataset.toml",
        f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        {general}

        [[datasets]]
        image_directory = "{folder}"
        {extra}
        """,
    )
    return load_dataset_config(cfg)


def warnings(logs) -> list[dict]:
    return [e for e in logs if e["log_level"] == "warning"]


# --------------------------------------------------------------------------- config


def test_musubi_toml_is_read_as_is_with_precedence(tmp_path):
    cfg = toml(
        tmp_path / "cfg" / "dataset.toml",
        """
        # a musubi-tuner dataset config, unchanged
        [general]
        resolution = [960, 544]
        caption_extension = ".txt"
        batch_size = 2
        enable_bucket = true
        bucket_no_upscale = false

        [[datasets]]
        image_directory = "../photos"
        cache_directory = "../photos/cache"
        num_repeats = 3

        [[datasets]]
        image_directory = "/abs/edits"
        control_directory = "/abs/edits_control"
        cache_directory = "/abs/edits_cache"
        resolution = 512
        batch_size = 1
        caption_extension = ".caption"
        no_resize_control = true
        control_resolution = [1024, 1024]
        """,
    )
    a, b = load_dataset_config(cfg)
    assert a.image_directory == (tmp_path / "photos").resolve()
    assert a.cache_directory == (tmp_path / "photos" / "cache").resolve()
    assert (a.resolution, a.batch_size, a.num_repeats, a.enable_bucket, a.caption_extension) == (
        (960, 544),
        2,
        3,
        True,
        ".txt",
    )
    assert (a.bucket_no_upscale, a.no_resize_control, a.control_resolution, a.caption_dropout_rate) == (
        False,
        False,
        None,
        0.0,
    )
    assert b.resolution == (512, 512)  # an int is a square
    assert (b.batch_size, b.num_repeats, b.caption_extension) == (1, 1, ".caption")  # dataset beats [general]
    assert b.enable_bucket is True  # from [general]
    assert b.control_directory == Path("/abs/edits_control")
    assert (b.no_resize_control, b.control_resolution) == (True, (1024, 1024))


def test_defaults_and_kern_additions(tmp_path):
    (a,) = one_dataset(tmp_path, general="caption_dropout_rate = 0.1", extra='default_caption = "sks dog"')
    assert a.cache_directory == a.image_directory  # musubi: defaults to the image folder
    assert (a.batch_size, a.num_repeats, a.enable_bucket) == (1, 1, False)
    assert a.caption_dropout_rate == 0.1
    assert a.default_caption == "sks dog"
    cfg = toml(tmp_path / "d.toml", '[[datasets]]\nimage_directory = "x"\ncaption_extension = ".txt"\n')
    assert load_dataset_config(cfg)[0].resolution == (960, 544)


def test_json_config_has_the_same_schema(tmp_path):
    cfg = tmp_path / "dataset.json"
    cfg.write_text(
        json.dumps(
            {
                "general": {"resolution": [512, 768], "caption_extension": ".txt", "enable_bucket": None},
                "datasets": [{"image_jsonl_file": "meta.jsonl", "cache_directory": "cache", "batch_size": 4}],
            }
        )
    )
    (spec,) = load_dataset_config(cfg)
    assert spec.resolution == (512, 768)
    assert spec.enable_bucket is False  # null counts as unset
    assert spec.image_jsonl_file == tmp_path / "meta.jsonl"
    assert spec.batch_size == 4


def test_deprecated_keys_are_mapped_with_a_warning(tmp_path):
    with capture_logs() as logs:
        (a, b) = load_dataset_config(
            toml(
                tmp_path / "d.toml",
                """
            [general]
            caption_extension = ".txt"
            [[datasets]]
            image_directory = "a"
            qwen_image_edit_control_resolution = [1024, 1024]
            flux_kontext_no_resize_control = true
            [[datasets]]
            image_directory = "b"
            qwen_image_edit_no_resize_control = true
            no_resize_control = false
            """,
            )
        )
    assert (a.control_resolution, a.no_resize_control) == ((1024, 1024), True)
    assert b.no_resize_control is False  # the new key wins; the old one is ignored
    keys = {e["key"] for e in warnings(logs)}
    assert keys == {
        "qwen_image_edit_control_resolution",
        "flux_kontext_no_resize_control",
        "qwen_image_edit_no_resize_control",
    }


@pytest.mark.parametrize(
    ("line", "plain", "value"),
    [
        ("flux_kontext_no_resize_control = true", "no_resize_control", True),
        ("qwen_image_edit_no_resize_control = true", "no_resize_control", True),
        ("qwen_image_edit_control_resolution = [1024, 512]", "control_resolution", (1024, 512)),
        (
            "some_model_v2_control_resolution = 256",
            "control_resolution",
            (256, 256),
        ),  # any prefix: the rule, not a list
    ],
)
@pytest.mark.parametrize("where", ["general", "dataset"])
def test_architecture_prefixed_musubi_keys_are_read_as_the_plain_key(tmp_path, line, plain, value, where):
    with capture_logs() as logs:
        (spec,) = one_dataset(tmp_path, **({"extra": line} if where == "dataset" else {"general": line}))
    assert getattr(spec, plain) == value
    old = line.split(" = ")[0]
    assert [(e["key"], e["use"]) for e in warnings(logs)] == [(old, plain)]


@pytest.mark.parametrize(
    "key",
    [
        "qwen_image_edit_control_resolutoin",
        "flux_kontext_no_resize_contol",
        "qwen-image_control_resolution",
        "_no_resize_control",
        "control_resolution_v2",
        "no_resize_controls",
    ],
)
def test_misspelt_prefixed_keys_are_errors_naming_them(tmp_path, key):
    with pytest.raises(DatasetError, match="unknown key") as err:
        one_dataset(tmp_path, extra=f'"{key}" = true')
    message = str(err.value)
    assert str(tmp_path / "dataset.toml") in message and repr(key) in message


@pytest.mark.parametrize("key_line", ['video_directory = "v"', "target_frames = [1, 25]", "source_fps = 30.0"])
def test_video_keys_are_rejected(tmp_path, key_line):
    with pytest.raises(DatasetError, match="kern trains images; video datasets are not supported") as err:
        one_dataset(tmp_path, extra=key_line)
    assert str(tmp_path / "dataset.toml") in str(err.value)


@pytest.mark.parametrize(
    ("where", "line", "key", "what"),
    [
        ("dataset", "colour_jitter = true", "colour_jitter", "unknown key"),
        ("general", "shuffle_caption = true", "shuffle_caption", "unknown key"),
        ("dataset", 'batch_size = "2"', "batch_size", "expected an integer"),
        ("dataset", "batch_size = 1.5", "batch_size", "expected an integer"),
        ("dataset", "enable_bucket = 1", "enable_bucket", "expected true or false"),
        ("dataset", "resolution = [512, 512, 3]", "resolution", "integer or \\[width, height\\]"),
        ("dataset", "control_resolution = [0, 512]", "control_resolution", "positive"),
        ("dataset", "num_repeats = 0", "num_repeats", "at least 1"),
        ("dataset", "caption_dropout_rate = 1.5", "caption_dropout_rate", "between 0 and 1"),
        ("general", 'cache_directory = "c"', "cache_directory", "per dataset"),
    ],
)
def test_bad_keys_and_types_name_file_and_key(tmp_path, where, line, key, what):
    with pytest.raises(DatasetError, match=what) as err:
        one_dataset(tmp_path, **({"extra": line} if where == "dataset" else {"general": line}))
    message = str(err.value)
    assert str(tmp_path / "dataset.toml") in message and repr(key) in message


def test_structural_errors(tmp_path):
    for text, what in [
        ("[general]\nresolution = 64\n", "no datasets"),
        ('[[datasets]]\nimage_directory = "a"\n', "caption_extension"),
        ('[[datasets]]\nimage_jsonl_file = "a.jsonl"\n', "cache_directory"),
        ('[[datasets]]\ncaption_extension = ".txt"\n', "image_directory"),
        (
            '[[datasets]]\nimage_directory = "a"\nimage_jsonl_file = "b"\ncache_directory = "c"\ncaption_extension = ".txt"\n',
            "not both",
        ),
        ("[train]\nsteps = 1\n", "unknown top-level key 'train'"),
        ("[[datasets]\n", "not valid TOML"),
    ]:
        with pytest.raises(DatasetError, match=what):
            load_dataset_config(toml(tmp_path / "d.toml", text))
    (tmp_path / "d.yaml").write_text("x: 1")
    with pytest.raises(DatasetError, match=".toml or .json"):
        load_dataset_config(tmp_path / "d.yaml")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset_config(tmp_path / "missing.toml")


def test_cache_directory_must_be_unique(tmp_path):
    cfg = toml(
        tmp_path / "d.toml",
        """
        [general]
        caption_extension = ".txt"
        [[datasets]]
        image_directory = "images"
        [[datasets]]
        image_directory = "images"
        num_repeats = 2
        """,
    )
    with pytest.raises(DatasetError, match="datasets\\[1\\] key 'cache_directory'.*datasets\\[0\\]"):
        load_dataset_config(cfg)


def test_framepack_keys_are_ignored_with_a_warning(tmp_path):
    with capture_logs() as logs:
        one_dataset(tmp_path, extra="fp_latent_window_size = 9")
    assert [e["key"] for e in warnings(logs)] == ["fp_latent_window_size"]


# --------------------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    ("resolution", "step"), [((64, 64), 16), ((960, 544), 16), ((1024, 1024), 16), ((1328, 1328), 32)]
)
def test_buckets_are_step_multiples_within_the_area(resolution, step):
    buckets = make_buckets(resolution, step)
    area = resolution[0] * resolution[1]
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w >= step and h >= step
        assert w * h <= area
        assert max(w / h, h / w) <= 4.5  # musubi's enumeration: about 1:4
    if resolution[0] == resolution[1] and resolution[0] % step == 0:
        assert resolution in buckets
    assert (buckets[0][1] / buckets[0][0]) >= 3  # the tallest is about 1:4


def test_fit_area_keeps_the_aspect_within_the_area():
    w, h = fit_area((3000, 2000), (1024, 1024), 16)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024
    assert abs(w / h - 1.5) < 0.05


def test_bucket_assignment_and_modes(tmp_path):
    folder = tmp_path / "images"
    captioned(folder, "square.png", (100, 100))
    captioned(folder, "wide.png", (200, 100))
    captioned(folder, "tall.jpg", (90, 180))
    captioned(folder, "small.png", (40, 50))
    (spec,) = one_dataset(tmp_path, general="enable_bucket = true")
    items = {i.stem: i for i in scan_items([spec], STEP)}
    buckets = make_buckets((64, 64), STEP)
    assert all(i.bucket in buckets for i in items.values())
    assert items["square"].bucket == (64, 64)
    assert items["wide"].bucket == (80, 48)  # nearest aspect to 2:1 among the 64² buckets
    assert items["tall"].bucket == (48, 80)
    assert items["small"].size == (40, 50)

    (spec,) = one_dataset(
        tmp_path / "x",
        general="enable_bucket = true\nbucket_no_upscale = true",
        folder=str(folder),
        extra='cache_directory = "c"',
    )
    items = {i.stem: i for i in scan_items([spec], STEP)}
    assert items["small"].bucket == (32, 48)  # its own size, rounded down to the step
    assert items["wide"].bucket == (80, 48)  # larger than the area: normal buckets

    (spec,) = one_dataset(tmp_path / "y", folder=str(folder), extra='cache_directory = "c"\nresolution = [72, 40]')
    assert {i.bucket for i in scan_items([spec], STEP)} == {
        (64, 32)
    }  # no bucketing: the resolution, floored to the step


def test_control_buckets_follow_the_settings(tmp_path):
    folder, controls = tmp_path / "images", tmp_path / "controls"
    captioned(folder, "a.png", (64, 64))
    image(controls / "a_0.png", (100, 70))
    image(controls / "a_1.png", (300, 300))
    base = 'control_directory = "controls"\n'
    cases = [
        ("", [(64, 64), (64, 64)]),  # default: the target's bucket
        ("no_resize_control = true", [(96, 64), (288, 288)]),  # only cropped to the step
        ("control_resolution = 64", [(80, 48), (64, 64)]),  # own area
        ("no_resize_control = true\ncontrol_resolution = [128, 128]", [(96, 64), (128, 128)]),  # area is a maximum
    ]
    for extra, expected in cases:
        (spec,) = one_dataset(tmp_path, extra=base + extra)
        (item,) = scan_items([spec], STEP)
        assert list(item.control_buckets) == expected, extra
        assert [p.name for p in item.control_paths] == ["a_0.png", "a_1.png"]


# --------------------------------------------------------------------------- controls


def test_controls_match_longest_stem_first_and_sort_by_suffix(tmp_path):
    names = [
        "img1.png",
        "img1_1.jpg",
        "img1_0.png",
        "img10_0.png",
        "img10_0002.png",
        "img10_1.webp",
        "other_0.png",
        "img1_10.png",
    ]
    files = [image(tmp_path / n) for n in names]
    found = match_controls(["img1", "img10", "img2"], files)
    assert [p.name for p in found["img1"]] == ["img1.png", "img1_0.png", "img1_1.jpg", "img1_10.png"]
    assert [p.name for p in found["img10"]] == ["img10_0.png", "img10_1.webp", "img10_0002.png"]
    assert "img2" not in found
    with pytest.raises(DatasetError, match="suffix 'mask' is not a number"):
        match_controls(["img1"], [image(tmp_path / "img1_mask.png")])


def test_directory_dataset_with_prefix_collision(tmp_path):
    folder, controls = tmp_path / "images", tmp_path / "controls"
    for stem in ("img1", "img10"):
        captioned(folder, f"{stem}.png")
    for name in ("img1_0.png", "img1_1.png", "img10_0.png"):
        image(controls / name)
    (spec,) = one_dataset(tmp_path, extra='control_directory = "controls"')
    items = {i.stem: i for i in scan_items([spec], STEP)}
    assert [p.name for p in items["img1"].control_paths] == ["img1_0.png", "img1_1.png"]
    assert [p.name for p in items["img10"].control_paths] == ["img10_0.png"]


def test_jsonl_dataset_with_control_paths(tmp_path):
    data = tmp_path / "data"
    image(data / "t1.png", (64, 64))
    image(data / "t2.png", (64, 64))
    for name in ("t1_a.png", "t1_b.png", "t2_a.png"):
        image(data / "ctl" / name, (64, 64))
    lines = [
        {
            "image_path": "t1.png",
            "caption": "first",
            "control_path_1": "ctl/t1_b.png",
            "control_path_0": "ctl/t1_a.png",
        },
        {"image_path": str(data / "t2.png"), "caption": " second ", "control_path": "ctl/t2_a.png", "score": 5},
    ]
    (data / "meta.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    cfg = toml(
        tmp_path / "d.toml",
        """
        [general]
        resolution = 64
        [[datasets]]
        image_jsonl_file = "data/meta.jsonl"
        cache_directory = "cache"
        """,
    )
    with capture_logs() as logs:
        a, b = scan_items(load_dataset_config(cfg), STEP)
    assert (a.caption, b.caption) == ("first", "second")
    assert [p.name for p in a.control_paths] == ["t1_a.png", "t1_b.png"]  # by index, not by order in the line
    assert [p.name for p in b.control_paths] == ["t2_a.png"]
    assert a.cache_dir == (tmp_path / "cache").resolve()
    assert [e["keys"] for e in warnings(logs)] == [["score"]]


def test_jsonl_errors_name_file_and_line(tmp_path):
    cfg = toml(tmp_path / "d.toml", '[[datasets]]\nimage_jsonl_file = "m.jsonl"\ncache_directory = "c"\n')
    for line, what in [
        ("{not json", "not valid JSON"),
        ('{"caption": "x"}', "'image_path'"),
        ('{"video_path": "v.mp4"}', "video"),
    ]:
        (tmp_path / "m.jsonl").write_text(line + "\n")
        with pytest.raises(DatasetError, match=what) as err:
            scan_items(load_dataset_config(cfg), STEP)
        assert f"{tmp_path / 'm.jsonl'}:1" in str(err.value)


# --------------------------------------------------------------------------- bad input


def test_bad_items_are_skipped_with_warnings(tmp_path):
    folder = tmp_path / "images"
    good = captioned(folder, "good.png")
    captioned(folder, "upper.JPG")
    image(folder / "nocap.png")
    truncated = captioned(folder, "broken.png")
    truncated.write_bytes(good.read_bytes()[:60])
    captioned(folder, "tiny.png", (8, 40))
    (folder / "notes.md").write_text("not an image")
    (spec,) = one_dataset(tmp_path, general="enable_bucket = true\nbucket_no_upscale = true")
    with capture_logs() as logs:
        items = scan_items([spec], STEP)
    assert sorted(i.stem for i in items) == ["good", "upper"]
    skipped = {Path(e["file"]).name: e["event"] for e in warnings(logs)}
    assert set(skipped) == {"nocap.png", "broken.png", "tiny.png"}
    assert "no caption" in skipped["nocap.png"]
    assert "truncated" in skipped["broken.png"]
    assert "smaller than one resolution step" in skipped["tiny.png"]


def test_default_caption_replaces_missing_caption_files(tmp_path):
    image(tmp_path / "images" / "a.png")
    captioned(tmp_path / "images", "b.png", caption="own caption")
    (spec,) = one_dataset(tmp_path, extra='default_caption = "sks photo"')
    assert [(i.stem, i.caption) for i in scan_items([spec], STEP)] == [("a", "sks photo"), ("b", "own caption")]


def test_missing_folders_and_empty_datasets_raise(tmp_path):
    (spec,) = one_dataset(tmp_path)
    with pytest.raises(DatasetError, match="key 'image_directory': folder .*images does not exist") as err:
        scan_items([spec], STEP)
    assert str(tmp_path / "dataset.toml") in str(err.value)
    image(tmp_path / "images" / "a.png")  # no caption: skipped, nothing left
    with pytest.raises(DatasetError, match="no usable images"):
        scan_items([spec], STEP)
    captioned(tmp_path / "images", "b.png")
    (spec,) = one_dataset(tmp_path, extra='control_directory = "nowhere"')
    with pytest.raises(DatasetError, match="key 'control_directory'"):
        scan_items([spec], STEP)


def test_bad_controls_skip_their_item(tmp_path):
    captioned(tmp_path / "images", "a.png")
    captioned(tmp_path / "images", "b.png")
    image(tmp_path / "controls" / "a_0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    image(tmp_path / "controls" / "b_0.png")
    (spec,) = one_dataset(tmp_path, extra='control_directory = "controls"')
    with capture_logs() as logs:
        (item,) = scan_items([spec], STEP)
    assert item.stem == "b"
    assert [Path(e["file"]).name for e in warnings(logs)] == ["a_0.png"]


def test_same_stem_twice_is_an_error(tmp_path):
    captioned(tmp_path / "images", "a.png")
    image(tmp_path / "images" / "a.jpg")
    (spec,) = one_dataset(tmp_path)
    with pytest.raises(DatasetError, match="same name stem 'a'"):
        scan_items([spec], STEP)


# --------------------------------------------------------------------------- batches


def _items_with_controls(tmp_path, counts: dict[str, int], batch_size=2, repeats=1):
    (tmp_path / "controls").mkdir()
    for stem, n in counts.items():
        captioned(tmp_path / "images", f"{stem}.png")
        for c in range(n):
            image(tmp_path / "controls" / f"{stem}_{c}.png", (48, 80))
    specs = one_dataset(
        tmp_path,
        extra=f'control_directory = "controls"\nbatch_size = {batch_size}\nnum_repeats = {repeats}\ncontrol_resolution = 64'
        "\nallow_missing_control = true",  # some items have no control
    )
    return scan_items(specs, STEP), specs


def test_batches_stack_references_and_split_mixed_counts(tmp_path):
    items, specs = _items_with_controls(tmp_path, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 1, "f": 0})
    batches = batch_order(items, specs, seed=1, epoch=0)
    for batch in batches:
        assert len({batch_key(items[i]) for i in batch}) == 1
    sizes = sorted((len(b), len(items[b[0]].control_paths)) for b in batches)
    assert sizes == [(1, 0), (1, 1), (2, 2), (2, 2)]
    assert {items[i].control_buckets for b in batches for i in b if len(b) == 2} == {((48, 80), (48, 80))}


def test_batch_order_is_deterministic_and_complete(tmp_path):
    items, specs = _items_with_controls(tmp_path, {f"i{n}": 0 for n in range(7)}, batch_size=3, repeats=2)
    first = batch_order(items, specs, seed=7, epoch=3)
    assert first == batch_order(items, specs, seed=7, epoch=3)
    assert first != batch_order(items, specs, seed=7, epoch=4)
    assert first != batch_order(items, specs, seed=8, epoch=3)
    flat = sorted(i for b in first for i in b)
    assert flat == sorted(list(range(7)) * 2)
    assert sorted(len(b) for b in first) == [2, 3, 3, 3, 3]  # 14 = 4·3 + 2: the short batch is kept


# --------------------------------------------------------------------------- images


def test_load_image_covers_and_centre_crops(tmp_path):
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # a red middle third
    img.save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", (32, 32))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)  # the centre is red


def test_load_image_alpha_on_white_and_grey(tmp_path):
    image(tmp_path / "clear.png", (20, 20), (0, 0, 0, 0), mode="RGBA")
    assert torch.allclose(load_image(tmp_path / "clear.png", (16, 16)), torch.ones(3, 16, 16))
    image(tmp_path / "grey.png", (16, 16), 0, mode="L")
    assert torch.allclose(load_image(tmp_path / "grey.png", (16, 16)), -torch.ones(3, 16, 16))


def test_small_trims_crop_without_resampling(tmp_path):
    img = Image.effect_noise((70, 40), 80).convert("RGB")
    img.save(tmp_path / "n.png")
    cropped = load_image(tmp_path / "n.png", (64, 32), crop_below=16)
    expected = img.crop((3, 4, 67, 36))
    ref = (
        torch.frombuffer(bytearray(expected.tobytes()), dtype=torch.uint8).view(32, 64, 3).permute(2, 0, 1).float()
        / 127.5
        - 1
    )
    assert torch.equal(cropped, ref)
    assert not torch.equal(load_image(tmp_path / "n.png", (64, 32)), ref)  # without the allowance it resamples


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°
    captioned(tmp_path / "images", "p.jpg", (96, 48))
    image(tmp_path / "images" / "p.jpg", (96, 48), exif=exif)
    (spec,) = one_dataset(tmp_path)
    (item,) = scan_items([spec], STEP)
    assert item.size == (48, 96)
    assert load_image(item.image_path, (48, 96)).shape == (3, 96, 48)


# --------------------------------------------------------------------------- text encoding


def test_utf8_bom_is_accepted_in_captions_jsonl_and_configs(tmp_path):
    bom = b"\xef\xbb\xbf"
    image(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "a.txt").write_bytes(bom + "un café\n".encode())
    cfg = tmp_path / "dataset.toml"
    cfg.write_bytes(
        bom + b'[general]\nresolution = 64\ncaption_extension = ".txt"\n[[datasets]]\nimage_directory = "images"\n'
    )
    (item,) = scan_items(load_dataset_config(cfg), STEP)
    assert item.caption == "un café"
    (tmp_path / "m.jsonl").write_bytes(
        bom + json.dumps({"image_path": "images/a.png", "caption": "über"}).encode() + b"\n"
    )
    jcfg = tmp_path / "d.json"
    jcfg.write_bytes(
        bom
        + json.dumps({"datasets": [{"image_jsonl_file": "m.jsonl", "cache_directory": "c", "resolution": 64}]}).encode()
    )
    (item,) = scan_items(load_dataset_config(jcfg), STEP)
    assert item.caption == "über"


def test_non_utf8_caption_is_an_error_naming_file_line_and_byte(tmp_path):
    captioned(tmp_path / "images", "good.png")
    image(tmp_path / "images" / "latin.png")
    caption = tmp_path / "images" / "latin.txt"
    caption.write_bytes("first line\nun caf".encode() + b"\xe9\n")  # Latin-1 é
    (spec,) = one_dataset(tmp_path)
    with pytest.raises(DatasetError) as err:
        scan_items([spec], STEP)
    message = str(err.value)
    assert (
        str(caption) in message and "line 2" in message and "byte 17" in message and "save the file as UTF-8" in message
    )
    assert "datasets[0]" in message


def test_non_utf8_jsonl_is_an_error_naming_the_line(tmp_path):
    image(tmp_path / "a.png")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b'{"image_path": "a.png", "caption": "ok"}\n{"image_path": "a.png", "caption": "caf\xe9"}\n')
    cfg = toml(
        tmp_path / "d.toml", '[[datasets]]\nimage_jsonl_file = "m.jsonl"\ncache_directory = "c"\nresolution = 64\n'
    )
    with pytest.raises(DatasetError, match="not UTF-8 text \\(line 2, byte 80") as err:
        scan_items(load_dataset_config(cfg), STEP)
    assert str(jsonl) in str(err.value) and "save the file as UTF-8" in str(err.value)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_non_utf8_dataset_config_is_an_error_naming_the_file(tmp_path, suffix):
    cfg = tmp_path / f"d{suffix}"
    text = (
        '[[datasets]]\nimage_directory = "caf\xe9"\n'
        if suffix == ".toml"
        else '{"datasets": [{"image_directory": "caf\xe9"}]}'
    )
    cfg.write_bytes(text.encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8 text") as err:
        load_dataset_config(cfg)
    assert str(cfg) in str(err.value) and "save the file as UTF-8" in str(err.value)


def test_caption_path_that_is_a_folder_is_an_error(tmp_path):
    image(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "a.txt").mkdir()
    (spec,) = one_dataset(tmp_path)
    with pytest.raises(DatasetError, match="a.txt of a.png is a folder"):
        scan_items([spec], STEP)


# --------------------------------------------------------------------------- numbers and ranges


@pytest.mark.parametrize(
    ("line", "key", "what"),
    [
        ("resolution = 16385", "resolution", "at most 16384"),
        ("resolution = [512, 100000]", "resolution", "at most 16384"),
        ("control_resolution = [99999999999, 512]", "control_resolution", "at most 16384"),
        ("resolution = { width = 512 }", "resolution", "integer or \\[width, height\\]"),
        ("resolution = [512.0, 512.0]", "resolution", "integer or \\[width, height\\]"),
        ("batch_size = 0", "batch_size", "at least 1"),
        ("batch_size = 5000", "batch_size", "at most 4096"),
        ("batch_size = -3", "batch_size", "at least 1"),
        ("batch_size = [1]", "batch_size", "expected an integer"),
        ("batch_size = 1e3", "batch_size", "expected an integer"),
        ("num_repeats = 1000000000", "num_repeats", "at most 10000"),
        ("num_repeats = 99999999999999999999", "num_repeats", "at most 10000"),
        ("caption_dropout_rate = nan", "caption_dropout_rate", "finite"),
        ("caption_dropout_rate = inf", "caption_dropout_rate", "finite"),
        ("caption_dropout_rate = -0.1", "caption_dropout_rate", "between 0 and 1"),
        ("caption_dropout_rate = 1.0000001", "caption_dropout_rate", "between 0 and 1"),
        ("caption_dropout_rate = 99999999999999999999", "caption_dropout_rate", "between 0 and 1"),
        ("caption_dropout_rate = true", "caption_dropout_rate", "expected a number"),
        ('caption_dropout_rate = "0.1"', "caption_dropout_rate", "expected a number"),
        ("caption_extension = 5", "caption_extension", "expected a string"),
        ('caption_extension = "/../../x"', "caption_extension", "without / or"),
        ('caption_extension = ""', "caption_extension", "non-empty"),
        ("enable_bucket = { a = 1 }", "enable_bucket", "expected true or false"),
        ('default_caption = ["a"]', "default_caption", "expected a string"),
        ('image_directory = ""', "image_directory", "is empty"),
        ('image_directory = "a\\u0000b"', "image_directory", "NUL"),
        ("image_directory = 3", "image_directory", "expected a string"),
        ('cache_directory = [ "c" ]', "cache_directory", "expected a string"),
    ],
)
def test_numbers_and_values_are_checked_with_file_and_key(tmp_path, line, key, what):
    cfg = toml(
        tmp_path / "dataset.toml",
        f"""
        [general]
        caption_extension = ".txt"

        [[datasets]]
        {line}
        {"" if line.startswith("image_directory") else 'image_directory = "images"'}
        """,
    )
    with pytest.raises(DatasetError, match=what) as err:
        load_dataset_config(cfg)
    message = str(err.value)
    assert str(cfg) in message and repr(key) in message and len(message) < 400


def test_sides_up_to_the_bound_are_accepted(tmp_path):
    (spec,) = one_dataset(
        tmp_path, extra="resolution = [16384, 16]\nbatch_size = 4096\nnum_repeats = 10000\ncaption_dropout_rate = 1"
    )
    assert (spec.resolution, spec.batch_size, spec.num_repeats, spec.caption_dropout_rate) == (
        (16384, 16),
        4096,
        10000,
        1.0,
    )


def test_json_nan_and_huge_numbers_are_errors(tmp_path):
    cfg = tmp_path / "d.json"
    for dataset, what in [
        ({"caption_dropout_rate": float("nan")}, "finite"),
        ({"batch_size": 10**30}, "at most 4096"),
        ({"caption_dropout_rate": 10**400}, "finite number"),
    ]:
        cfg.write_text(json.dumps({"datasets": [{"image_directory": "i", "caption_extension": ".txt", **dataset}]}))
        with pytest.raises(DatasetError, match=what):
            load_dataset_config(cfg)
    cfg.write_text('{"datasets": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset_config(cfg)


def test_too_many_items_per_epoch_is_an_error(tmp_path, monkeypatch):
    import kern.data.items

    for name in ("a.png", "b.png", "c.png"):
        captioned(tmp_path / "images", name)
    monkeypatch.setattr(kern.data.items, "MAX_EPOCH_ITEMS", 5)
    (spec,) = one_dataset(tmp_path, extra="num_repeats = 2")
    with pytest.raises(DatasetError, match="key 'num_repeats': 3 images x 2 repeats is more than 5 items per epoch"):
        scan_items([spec], STEP)


# --------------------------------------------------------------------------- paths


def test_image_directory_that_is_a_file(tmp_path):
    (tmp_path / "images").write_text("not a folder")
    (spec,) = one_dataset(tmp_path)
    with pytest.raises(DatasetError, match="key 'image_directory': .*images is a file, not a folder"):
        scan_items([spec], STEP)
    captioned(tmp_path / "real", "a.png")
    (tmp_path / "controls").write_text("x")
    (spec,) = one_dataset(tmp_path, folder="real", extra='control_directory = "controls"')
    with pytest.raises(DatasetError, match="key 'control_directory': .*controls is a file, not a folder"):
        scan_items([spec], STEP)


def test_image_jsonl_file_that_is_a_folder(tmp_path):
    (tmp_path / "m.jsonl").mkdir()
    cfg = toml(tmp_path / "d.toml", '[[datasets]]\nimage_jsonl_file = "m.jsonl"\ncache_directory = "c"\n')
    with pytest.raises(DatasetError, match="key 'image_jsonl_file': .*m.jsonl is a folder"):
        scan_items(load_dataset_config(cfg), STEP)


def test_cache_directory_that_is_a_file_is_an_error_and_left_alone(tmp_path):
    captioned(tmp_path / "images", "a.png")
    blocker = tmp_path / "cache"
    blocker.write_text("my notes")
    (spec,) = one_dataset(tmp_path, extra='cache_directory = "cache"')
    with pytest.raises(
        DatasetError, match="datasets\\[0\\] key 'cache_directory' .*cache: exists and is not a folder"
    ) as err:
        scan_items([spec], STEP)
    assert str(tmp_path / "dataset.toml") in str(err.value)
    assert blocker.read_text() == "my notes"
    (spec,) = one_dataset(tmp_path, extra='cache_directory = "cache/sub"')  # a folder under a file cannot be made
    with pytest.raises(DatasetError, match="key 'cache_directory' .*cannot write there"):
        scan_items([spec], STEP)


def test_cache_directory_that_is_not_writable(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root (the file-under-a-file case covers the error)")
    captioned(tmp_path / "images", "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (spec,) = one_dataset(tmp_path, extra='cache_directory = "locked"')
        with pytest.raises(DatasetError, match="key 'cache_directory' .*cannot write there"):
            scan_items([spec], STEP)
    finally:
        locked.chmod(0o755)


def test_missing_cache_directory_is_created_before_scanning(tmp_path):
    captioned(tmp_path / "images", "a.png")
    (spec,) = one_dataset(tmp_path, extra='cache_directory = "caches/one"')
    scan_items([spec], STEP)
    assert (tmp_path / "caches" / "one").is_dir() and not list((tmp_path / "caches" / "one").iterdir())


@pytest.mark.parametrize(
    ("record", "key", "what"),
    [
        ({"image_path": "missing.png", "caption": "x"}, "image_path", "does not exist"),
        ({"image_path": "sub", "caption": "x"}, "image_path", "is a folder, not an image file"),
        ({"image_path": "", "caption": "x"}, "image_path", "expected a path string"),
        ({"image_path": "a.png", "caption": "x", "control_path_0": "nope.png"}, "control_path_0", "does not exist"),
        ({"image_path": "a.png", "caption": "x", "control_path": "sub"}, "control_path", "is a folder"),
        ({"image_path": "a.png", "caption": "x", "control_path_1": 3}, "control_path_1", "expected a path string"),
        ({"image_path": "a.png", "caption": ["x"]}, "caption", "expected a string"),
    ],
)
def test_jsonl_paths_must_name_existing_files(tmp_path, record, key, what):
    image(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    good = json.dumps({"image_path": "a.png", "caption": "fine"})
    (tmp_path / "m.jsonl").write_text(good + "\n" + json.dumps(record) + "\n")
    cfg = toml(
        tmp_path / "d.toml", '[[datasets]]\nimage_jsonl_file = "m.jsonl"\ncache_directory = "c"\nresolution = 64\n'
    )
    with pytest.raises(DatasetError, match=what) as err:
        scan_items(load_dataset_config(cfg), STEP)
    assert f"{tmp_path / 'm.jsonl'}:2 key {key!r}" in str(err.value)


def test_dataset_config_that_is_a_folder(tmp_path):
    (tmp_path / "d.toml").mkdir()
    with pytest.raises(DatasetError, match="is a folder"):
        load_dataset_config(tmp_path / "d.toml")


def test_datasets_entry_that_is_not_a_table(tmp_path):
    cfg = tmp_path / "d.json"
    cfg.write_text(json.dumps({"datasets": [{"image_directory": "i", "caption_extension": ".txt"}, "oops"]}))
    with pytest.raises(DatasetError, match="datasets\\[1\\] must be a table"):
        load_dataset_config(cfg)


def test_names_too_long_for_the_file_system_are_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="cannot read the dataset config"):
        load_dataset_config(tmp_path / ("x" * 5000 + ".toml"))
    cfg = toml(tmp_path / "d.toml", f'[[datasets]]\ncaption_extension = ".txt"\nimage_directory = "{"y" * 5000}"\n')
    with pytest.raises(DatasetError, match="datasets\\[0\\]: File name too long"):
        scan_items(load_dataset_config(cfg), STEP)
