"""kern.data.cache: latent and text caches (names, keys, reuse, rebuilds, corruption) and batch loading."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kern.core.io import load_file
from kern.data import cache
from kern.data.dataset_config import load_dataset_config
from kern.data.items import batch_order, scan_items
from kern.errors import KernError
from PIL import Image
from structlog.testing import capture_logs

ARCH = "toy4"
STEP = 16


class FakeVAE:
    """(B, 3, H, W) → (B, 4, H/8, W/8); counts what it is asked to encode."""

    def __init__(self, nan: bool = False):
        self.calls, self.images, self.nan = 0, 0, nan

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += images.shape[0]
        pooled = F.avg_pool2d(images, 8)
        out = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        if self.nan:
            out[:, 0, 0, 0] = float("nan")
        return out


class FakeTE:
    """prompts → {"ctx_vec": (B, 4, 8) bf16} that depends on the prompt; records the prompts."""

    def __init__(self):
        self.prompts: list[str] = []

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.prompts += prompts
        codes = torch.tensor([float(sum(map(ord, p)) % 97) for p in prompts])
        return {"ctx_vec": codes.view(-1, 1, 1).expand(-1, 4, 8).to(torch.bfloat16)}


def image(path: Path, size=(64, 64), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def dataset(tmp_path: Path, names=("a", "b", "c"), extra: str = "", controls: dict[str, int] | None = None):
    folder = tmp_path / "images"
    for i, stem in enumerate(names):
        image(folder / f"{stem}.png", (64 + 16 * i, 64), (40 * i, 100, 200))
        (folder / f"{stem}.txt").write_text(f"caption of {stem}")
    for stem, n in (controls or {}).items():
        for c in range(n):
            image(tmp_path / "controls" / f"{stem}_{c}.png", (48, 80), (10, 20 * c, 30))
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        enable_bucket = true

        [[datasets]]
        image_directory = "images"
        cache_directory = "cache"
        {extra}
        """)
    )
    specs = load_dataset_config(cfg)
    return specs, tmp_path / "cache"


def build(specs, vae=None, te=None, settings=None, text_settings=None):
    """Scan and cache; returns (items, latents encoded, texts encoded)."""
    items = scan_items(specs, STEP)
    n_lat = cache.ensure_latent_cache(
        items, ARCH, vae or FakeVAE(), torch.float32, batch_size=2, settings=settings or {"vae": "v1"}
    )
    n_txt = cache.ensure_text_cache(items, ARCH, te or FakeTE(), settings=text_settings or {"te": "t1"})
    return items, n_lat, n_txt


def assert_clean(cache_dir: Path) -> None:
    """No temporary leftovers, and every cache file opens."""
    names = [p.name for p in cache_dir.iterdir()]
    assert not [n for n in names if n.endswith(".tmp")], names
    for p in cache_dir.glob("*.safetensors"):
        load_file(p)


def touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))


# --------------------------------------------------------------------------- layout


def test_file_names_keys_and_metadata(tmp_path):
    specs, cache_dir = dataset(tmp_path, names=("a", "b"))
    items, n_lat, n_txt = build(specs)
    assert (n_lat, n_txt) == (2, 2)
    a = next(i for i in items if i.stem == "a")
    b = next(i for i in items if i.stem == "b")
    assert cache.latent_cache_path(a, ARCH) == cache_dir / "a_0064x0064_toy4.safetensors"
    assert cache.latent_cache_path(b, ARCH).name == "b_0080x0064_toy4.safetensors"  # the original size
    tensors, meta = load_file(cache.latent_cache_path(a, ARCH))
    assert list(tensors) == ["latents_8x8_float32"]  # (C, h, w) → h x w
    assert tensors["latents_8x8_float32"].shape == (4, 8, 8)
    assert {k: meta[k] for k in ("architecture", "width", "height", "format_version")} == {
        "architecture": ARCH,
        "width": "64",
        "height": "64",
        "format_version": "1.0.1",
    }
    assert "kern.source" in meta
    tensors, meta = load_file(cache_dir / "a_toy4_te.safetensors")
    assert list(tensors) == ["ctx_vec_bfloat16"] and tensors["ctx_vec_bfloat16"].shape == (4, 8)
    assert meta["caption1"] == "caption of a" and meta["architecture"] == ARCH
    _, meta = load_file(cache_dir / "_empty_toy4_te.safetensors")
    assert meta["caption1"] == ""
    assert_clean(cache_dir)


def test_arch_name_goes_into_metadata(tmp_path):
    specs, cache_dir = dataset(tmp_path, names=("a",))
    items = scan_items(specs, STEP)
    cache.ensure_latent_cache(items, ARCH, FakeVAE(), "bfloat16", settings={}, arch_name="toy_four")
    tensors, meta = load_file(cache_dir / "a_0064x0064_toy4.safetensors")
    assert meta["architecture"] == "toy_four" and list(tensors) == ["latents_8x8_bfloat16"]


# --------------------------------------------------------------------------- reuse and rebuilds


def test_second_run_encodes_nothing(tmp_path):
    specs, cache_dir = dataset(tmp_path)
    vae, te = FakeVAE(), FakeTE()
    build(specs, vae, te)
    assert vae.images == 3 and vae.calls == 2  # a and b share a bucket: one batch of 2, then c
    assert sorted(te.prompts) == ["", "caption of a", "caption of b", "caption of c"]
    vae2, te2 = FakeVAE(), FakeTE()
    _, n_lat, n_txt = build(specs, vae2, te2)
    assert (n_lat, n_txt, vae2.calls, te2.prompts) == (0, 0, 0, [])


def test_changed_caption_reencodes_only_that_text(tmp_path):
    specs, cache_dir = dataset(tmp_path)
    build(specs)
    (tmp_path / "images" / "b.txt").write_text("a new caption")
    vae, te = FakeVAE(), FakeTE()
    _, n_lat, n_txt = build(specs, vae, te)
    assert (n_lat, n_txt, vae.calls) == (0, 1, 0)
    assert te.prompts == ["a new caption"]
    assert load_file(cache_dir / "b_toy4_te.safetensors")[1]["caption1"] == "a new caption"


def test_touched_image_reencodes_only_its_latents(tmp_path):
    specs, cache_dir = dataset(tmp_path)
    build(specs)
    touch(tmp_path / "images" / "c.png")
    vae, te = FakeVAE(), FakeTE()
    _, n_lat, n_txt = build(specs, vae, te)
    assert (n_lat, n_txt, vae.images, te.prompts) == (1, 0, 1, [])


def test_changed_settings_rebuild(tmp_path):
    specs, cache_dir = dataset(tmp_path)
    build(specs)
    vae, te = FakeVAE(), FakeTE()
    _, n_lat, n_txt = build(specs, vae, te, settings={"vae": "v2"})
    assert (n_lat, n_txt) == (3, 0)
    _, n_lat, n_txt = build(specs, FakeVAE(), te, settings={"vae": "v2"}, text_settings={"te": "t2"})
    assert (n_lat, n_txt) == (0, 3)
    assert "" in te.prompts  # the empty caption is re-encoded too
    items = scan_items(specs, STEP)
    assert (
        cache.ensure_latent_cache(items, ARCH, FakeVAE(), torch.bfloat16, settings={"vae": "v2"}) == 3
    )  # dtype counts
    # Resize settings: a new resolution changes every bucket.
    specs2, _ = dataset(tmp_path, extra="resolution = 128")
    _, n_lat, _ = build(specs2, settings={"vae": "v2"})
    assert n_lat == 3
    assert_clean(cache_dir)


def test_resized_image_replaces_its_old_cache(tmp_path):
    specs, cache_dir = dataset(tmp_path, names=("a",))
    build(specs)
    image(tmp_path / "images" / "a.png", (96, 64))
    items, n_lat, _ = build(specs)
    assert n_lat == 1
    assert sorted(p.name for p in cache_dir.glob("a_*x*_toy4.safetensors")) == ["a_0096x0064_toy4.safetensors"]


# --------------------------------------------------------------------------- controls and batches


def test_batch_of_two_with_two_references_stacks(tmp_path):
    specs, cache_dir = dataset(
        tmp_path, names=("a", "c"), controls={"a": 2, "c": 2}, extra='control_directory = "controls"\nbatch_size = 2'
    )
    items, n_lat, _ = build(specs)
    assert n_lat == 2
    tensors, _ = load_file(cache_dir / "a_0064x0064_toy4.safetensors")
    assert sorted(tensors) == ["latents_8x8_float32", "latents_control_0_8x8_float32", "latents_control_1_8x8_float32"]
    (batch,) = batch_order(items, specs, seed=0, epoch=0)
    out = cache.load_batch([items[i] for i in batch], ARCH)
    assert out["latents"].shape == (2, 4, 8, 8) and out["latents"].dtype == torch.float32
    assert [r.shape for r in out["references"]] == [(2, 4, 8, 8), (2, 4, 8, 8)]
    assert out["text"]["ctx_vec"].shape == (2, 4, 8)
    assert sorted(out["captions"]) == ["caption of a", "caption of c"]
    assert sorted(out["keys"]) == ["0/a", "0/c"]
    assert_clean(cache_dir)


def test_mixed_reference_counts_never_share_a_batch(tmp_path):
    specs, _ = dataset(
        tmp_path,
        names=("a", "c", "e"),
        controls={"a": 2, "c": 1},
        extra='control_directory = "controls"\nbatch_size = 4\nallow_missing_control = true',
    )
    items, _, _ = build(specs)
    batches = batch_order(items, specs, seed=0, epoch=0)
    assert sorted(len(b) for b in batches) == [1, 1, 1]
    by_stem = {i.stem: i for i in items}
    assert cache.load_batch([by_stem["e"]], ARCH)["references"] is None
    with pytest.raises(KernError, match="different numbers of control images"):
        cache.load_batch([by_stem["a"], by_stem["c"]], ARCH)


def test_changed_control_reencodes_its_item(tmp_path):
    specs, _ = dataset(tmp_path, names=("a", "c"), controls={"a": 1, "c": 1}, extra='control_directory = "controls"')
    build(specs)
    touch(tmp_path / "controls" / "c_0.png")
    vae = FakeVAE()
    _, n_lat, _ = build(specs, vae)
    assert (n_lat, vae.images) == (1, 2)  # its target and its control


def test_caption_dropout(tmp_path):
    specs, _ = dataset(tmp_path, names=("a", "b"))  # one bucket
    items, _, _ = build(specs)
    empty = FakeTE()([""])["ctx_vec"][0]
    out = cache.load_batch(items, ARCH, torch.Generator().manual_seed(0), caption_dropout_rate=1.0)
    assert out["captions"] == ["", ""]
    assert all(torch.equal(t, empty) for t in out["text"]["ctx_vec"])
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = cache.load_batch(items, ARCH, g, caption_dropout_rate=0.0)
    assert torch.equal(g.get_state(), state)  # no dropout draws nothing
    assert out["captions"] == [i.caption for i in items]
    drops = [cache.load_batch(items, ARCH, torch.Generator().manual_seed(s), 0.5)["captions"] for s in range(8)]
    assert drops == [cache.load_batch(items, ARCH, torch.Generator().manual_seed(s), 0.5)["captions"] for s in range(8)]
    assert {c for d in drops for c in d} == {"", "caption of a", "caption of b"}  # some dropped, some kept


# --------------------------------------------------------------------------- bad input and damage


def test_corrupt_cache_files_are_rebuilt_with_a_warning(tmp_path):
    specs, cache_dir = dataset(tmp_path)
    build(specs)
    lat = cache_dir / "a_0064x0064_toy4.safetensors"
    lat.write_bytes(lat.read_bytes()[:100])
    (cache_dir / "b_toy4_te.safetensors").write_bytes(b"garbage")
    with capture_logs() as logs:
        _, n_lat, n_txt = build(specs)
    assert (n_lat, n_txt) == (1, 1)
    assert {Path(e["file"]).name for e in logs if e["log_level"] == "warning"} == {lat.name, "b_toy4_te.safetensors"}
    assert_clean(cache_dir)


def test_failing_encoder_leaves_no_partial_files(tmp_path):
    specs, cache_dir = dataset(tmp_path)

    def broken(images):
        raise RuntimeError("out of memory")

    items = scan_items(specs, STEP)
    with pytest.raises(RuntimeError):
        cache.ensure_latent_cache(items, ARCH, broken, torch.float32, settings={})
    with pytest.raises(KernError, match="must return"):
        cache.ensure_latent_cache(items, ARCH, lambda x: x[:1], torch.float32, batch_size=2, settings={})
    with pytest.raises(KernError, match="batch dimension"):
        cache.ensure_text_cache(items, ARCH, lambda p: {"ctx": torch.zeros(1, 2)})
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


def test_nan_latents_become_zero_with_a_warning(tmp_path):
    specs, cache_dir = dataset(tmp_path, names=("a",))
    items = scan_items(specs, STEP)
    with capture_logs() as logs:
        cache.ensure_latent_cache(items, ARCH, FakeVAE(nan=True), torch.float32, settings={})
    assert [e["item"] for e in logs if e["log_level"] == "warning"] == ["0/a"]
    (t,) = load_file(cache_dir / "a_0064x0064_toy4.safetensors")[0].values()
    assert not torch.isnan(t).any() and t[0, 0, 0] == 0


def test_bad_items_leave_a_clean_cache(tmp_path):
    specs, cache_dir = dataset(tmp_path, names=("good",))
    folder = tmp_path / "images"
    good = folder / "good.png"
    (folder / "broken.png").write_bytes(good.read_bytes()[:50])
    (folder / "broken.txt").write_text("x")
    image(folder / "tiny.png", (8, 8))
    (folder / "tiny.txt").write_text("x")
    image(folder / "nocap.png")
    with capture_logs():
        items, n_lat, n_txt = build(specs)
    assert [i.stem for i in items] == ["good"] and (n_lat, n_txt) == (1, 1)
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "_empty_toy4_te.safetensors",
        "good_0064x0064_toy4.safetensors",
        "good_toy4_te.safetensors",
    ]
    assert_clean(cache_dir)


def test_missing_cache_at_load_names_the_file(tmp_path):
    specs, cache_dir = dataset(tmp_path, names=("a",))
    items = scan_items(specs, STEP)
    with pytest.raises(KernError, match="a_0064x0064_toy4.safetensors.*run the caching step again"):
        cache.load_batch(items, ARCH)


def test_variable_length_text_is_right_padded_with_zeros():
    from kern.data.cache import pad_sequences

    a, b = torch.ones(3, 4), torch.ones(5, 4)
    pa, pb = pad_sequences([a, b])
    assert pa.shape == pb.shape == (5, 4) and pa[3:].abs().sum() == 0 and torch.equal(pb, b)
    ma, mb = pad_sequences([torch.ones(3, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    assert ma.tolist() == [1, 1, 1, 0, 0]
    same = [torch.ones(2, 3), torch.ones(2, 4)]  # trailing dims differ: left alone (stacking then names them)
    assert [t.shape for t in pad_sequences(same)] == [(2, 3), (2, 4)]
