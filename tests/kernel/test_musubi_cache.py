"""musubi-tuner's cache files are kern's: a musubi ``cache_directory`` is reused as it is (nothing re-encoded, as the
log says), kern writes files musubi's loader reads, and a cache that does not fit (other settings, other sizes, other
metadata) is rebuilt, not trusted.

The musubi side is written here from musubi-tuner's source (kohya-ss/musubi-tuner @30c658c), independently of kern's
naming code: file names from ``dataset/image_video_dataset.py`` (``get_latent_cache_path``,
``get_text_encoder_output_cache_path``); keys and metadata from ``dataset/cache_io.py`` (``save_latent_cache_flux_2``
/ ``_qwen_image``, ``save_text_encoder_output_cache_flux_2`` / ``_qwen_image``, ``save_*_common``); the load rules
from ``dataset/bucket.py`` (``BucketBatchManager.__getitem__``) and ``utils/model_utils.py`` (``dtype_to_str``,
``remove_dtype_suffix``). The first tests use a toy architecture and fake encoders; the last ones the real FLUX.2
and Qwen-Image plugins on their tiny bundles, through ``kern cache``'s and ``kern train``'s own code.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kern.core.io import load_file
from kern.data import cache
from kern.data.dataset_config import load_dataset_config
from kern.data.items import scan_items
from kern.records import CacheLayout, TextCacheKey
from PIL import Image
from safetensors.torch import save_file
from structlog.testing import capture_logs

STEP = 16
ARCH, ARCH_FULL = "toy4", "toy_four"
GRID = (4, 8)  # FakeVAE: 4 channels, 8 px per cell
# As FLUX.2 declares: (C, h, w) latents, fixed-length text renamed. As Qwen-Image: frames, unpadded text.
FLAT = CacheLayout(text=(TextCacheKey(name="ctx", key="ctx_vec"),))
FRAMES = CacheLayout(text=(TextCacheKey(name="ctx", key="vl_embed", mask="mask"),), latent_frames=True)
LAYOUTS = {"flat": FLAT, "frames": FRAMES}


# --------------------------------------------------------------------------- musubi's side, from its source


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def remove_dtype_suffix(name: str) -> str:
    names = sorted(
        {dtype_to_str(getattr(torch, a)) for a in dir(torch) if isinstance(getattr(torch, a), torch.dtype)},
        key=len,
        reverse=True,
    )
    for n in names:
        if name.endswith("_" + n):
            return name[: -len(n) - 1]
    return name


def musubi_latent_file(cache_dir: Path, stem: str, size: tuple[int, int], arch: str) -> Path:
    w, h = size
    return cache_dir / f"{stem}_{w:04d}x{h:04d}_{arch}.safetensors"


def musubi_text_file(cache_dir: Path, stem: str, arch: str) -> Path:
    return cache_dir / f"{stem}_{arch}_te.safetensors"


def musubi_save_latents(path: Path, size, latent, controls, arch_full: str, frames: bool) -> None:
    """save_latent_cache_flux_2 (latent (C, H, W): ``latents_{H}x{W}``) or save_latent_cache_qwen_image (latent
    (C, F, H, W): ``latents_{F}x{H}x{W}``), then save_latent_cache_common's metadata."""
    dtype_str = dtype_to_str(latent.dtype)

    def key(prefix: str, t: torch.Tensor) -> str:
        if frames:
            _, f, hh, ww = t.shape
            return f"{prefix}_{f}x{hh}x{ww}_{dtype_str}"
        _, hh, ww = t.shape
        return f"{prefix}_{hh}x{ww}_{dtype_str}"

    sd = {key("latents", latent): latent.contiguous()}
    for i, c in enumerate(controls):
        sd[key(f"latents_control_{i}", c)] = c.contiguous()
    metadata = {"architecture": arch_full, "width": f"{size[0]}", "height": f"{size[1]}", "format_version": "1.0.1"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata)


def musubi_save_text(path: Path, caption: str, embed: torch.Tensor, arch_full: str, varlen_key: str | None) -> None:
    """save_text_encoder_output_cache_flux_2 (``ctx_vec_{dtype}``) or _qwen_image (``varlen_vl_embed_{dtype}``, the
    caption's tokens only), then save_text_encoder_output_cache_common's metadata."""
    name = f"varlen_{varlen_key}" if varlen_key else "ctx_vec"
    metadata = {"architecture": arch_full, "caption1": caption, "format_version": "1.0.1"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{name}_{dtype_to_str(embed.dtype)}": embed.contiguous()}, str(path), metadata=metadata)


def musubi_batch(pairs: list[tuple[Path, Path]]) -> dict:
    """BucketBatchManager.__getitem__: dtype suffixes removed, ``latents*`` keys lose their shape, ``varlen_`` keys
    stay lists, the rest is stacked."""
    data: dict[str, list] = {}
    varlen = set()
    for latent_path, text_path in pairs:
        sd = {**load_file(latent_path)[0], **load_file(text_path)[0]}
        for key, value in sd.items():
            is_varlen = key.startswith("varlen_")
            content = key.replace("varlen_", "") if is_varlen else key
            if not content.endswith("_mask"):
                content = remove_dtype_suffix(content)
                if content.startswith("latents_"):
                    content = content.rsplit("_", 1)[0]
            data.setdefault(content, []).append(value)
            if is_varlen:
                varlen.add(content)
    return {k: v if k in varlen else torch.stack(v) for k, v in data.items()}


# --------------------------------------------------------------------------- a toy dataset and encoders


class FakeVAE:
    """(B, 3, H, W) → (B, 4, H/8, W/8); counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


class FakeTE:
    """{"ctx": (B, L, 8) bf16} with L fixed (flat) or the caption's length, right-padded, plus its mask (frames)."""

    def __init__(self, varlen: bool):
        self.varlen, self.prompts = varlen, []

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.prompts += prompts
        lengths = [1 + len(p) % 7 if self.varlen else 4 for p in prompts]
        ctx = torch.zeros(len(prompts), max(lengths), 8)
        mask = torch.zeros(len(prompts), max(lengths), dtype=torch.int64)
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            ctx[i, :n] = torch.arange(n * 8).view(n, 8) + sum(map(ord, p)) % 97
            mask[i, :n] = 1
        out = {"ctx": ctx.to(torch.bfloat16)}
        return {**out, "mask": mask} if self.varlen else out


def never(*args, **kwargs):
    raise AssertionError("nothing should be encoded")


def image(path: Path, size, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def dataset(tmp_path: Path, controls: bool = True, names=("a", "b")):
    """Two images of one bucket (so one batch), each with one control image; caches in ``cache``."""
    for i, stem in enumerate(names):
        image(tmp_path / "images" / f"{stem}.png", (64, 64), (40 * i, 100, 200))
        (tmp_path / "images" / f"{stem}.txt").write_text(f"caption of {stem}" + "!" * i)
        if controls:
            image(tmp_path / "controls" / f"{stem}_0.png", (48, 80), (10, 20 * i, 30))
    cfg = tmp_path / "dataset.toml"
    control = 'control_directory = "controls"' if controls else ""
    cfg.write_text(
        textwrap.dedent(f"""
        [general]
        resolution = 64
        caption_extension = ".txt"
        enable_bucket = true
        batch_size = 2

        [[datasets]]
        image_directory = "images"
        cache_directory = "cache"
        {control}
        """)
    )
    return scan_items(load_dataset_config(cfg), STEP), tmp_path / "cache"


def write_musubi_cache(items, cache_dir: Path, layout: CacheLayout, seed: int = 0) -> dict[str, dict]:
    """musubi's files for every item (random values: what kern loads must be these); returns them by stem."""
    g = torch.Generator().manual_seed(seed)
    frames = layout.latent_frames
    out = {}
    for item in items:

        def latent(bucket):
            w, h = bucket
            shape = (4, 1, h // 8, w // 8) if frames else (4, h // 8, w // 8)
            return torch.randn(shape, generator=g).to(torch.bfloat16)  # musubi's Qwen-Image VAE runs in bf16

        target, controls = latent(item.bucket), [latent(b) for b in item.control_buckets]
        musubi_save_latents(
            musubi_latent_file(cache_dir, item.stem, item.size, ARCH), item.size, target, controls, ARCH_FULL, frames
        )
        length = 3 + len(item.caption) % 5 if frames else 4
        embed = torch.randn(length, 8, generator=g).to(torch.bfloat16)
        musubi_save_text(
            musubi_text_file(cache_dir, item.stem, ARCH),
            item.caption,
            embed,
            ARCH_FULL,
            "vl_embed" if frames else None,
        )
        out[item.stem] = {"latents": target, "controls": controls, "ctx": embed}
    return out


def fill(items, layout, vae=None, te=None, settings=None, text_settings=None, **kw):
    """kern's caching of both kinds; returns (latents encoded, texts encoded)."""
    n_lat = cache.ensure_latent_cache(
        items,
        ARCH,
        vae or FakeVAE(),
        torch.float32,
        batch_size=2,
        settings=settings or {"vae": "v1"},
        arch_name=ARCH_FULL,
        layout=layout,
        grid=kw.pop("grid", GRID),
    )
    n_txt = cache.ensure_text_cache(
        items,
        ARCH,
        te or FakeTE(layout.latent_frames),
        settings=text_settings or {"te": "t1"},
        arch_name=ARCH_FULL,
        layout=layout,
        **kw,
    )
    return n_lat, n_txt


# --------------------------------------------------------------------------- a musubi cache is reused


@pytest.mark.parametrize("kind", ["flat", "frames"])
def test_a_musubi_cache_is_reused_as_it_is_and_the_log_says_so(tmp_path, kind):
    layout = LAYOUTS[kind]
    items, cache_dir = dataset(tmp_path)
    musubi = write_musubi_cache(items, cache_dir, layout)
    before = sorted(p.name for p in cache_dir.iterdir())

    with capture_logs() as logs:
        assert fill(items, layout, vae=never, te=never) == (0, 0)
    counts = {e["event"]: e for e in logs if e["event"] in ("latent cache", "text cache")}
    assert counts["latent cache"]["to_encode"] == 0 and counts["latent cache"]["reused_foreign"] == 2
    assert counts["text cache"]["to_encode"] == 0 and counts["text cache"]["reused_foreign"] == 2
    assert sum("musubi" in e["event"] and "trusted" in e["event"] for e in logs) == 2  # latents, text
    assert sorted(p.name for p in cache_dir.iterdir()) == before  # nothing written, the files left as they were

    batch = cache.load_batch(items, ARCH, layout=layout)
    for j, item in enumerate(items):
        want = musubi[item.stem]
        squeeze = (lambda t: t[:, 0]) if layout.latent_frames else (lambda t: t)
        assert torch.equal(batch["latents"][j], squeeze(want["latents"]).float())
        assert torch.equal(batch["references"][0][j], squeeze(want["controls"][0]).float())
        n = want["ctx"].shape[0]
        assert torch.equal(batch["text"]["ctx"][j, :n], want["ctx"])
        assert batch["text"]["ctx"][j, n:].abs().sum() == 0  # right-padded with zeros to the batch's longest
        if layout.latent_frames:
            assert batch["text"]["mask"].dtype == torch.int64
            assert batch["text"]["mask"][j].tolist() == [1] * n + [0] * (batch["text"]["ctx"].shape[1] - n)
    if layout.latent_frames:
        assert len({musubi[i.stem]["ctx"].shape[0] for i in items}) == 2  # the padding above was exercised
    else:
        assert set(batch["text"]) == {"ctx"}


def test_caption_dropout_on_a_musubi_cache_encodes_only_kerns_empty_caption(tmp_path):
    items, cache_dir = dataset(tmp_path, controls=False)
    write_musubi_cache(items, cache_dir, FLAT)
    te = FakeTE(False)
    assert fill(items, FLAT, vae=never, te=te, caption_dropout=True) == (0, 0)
    assert te.prompts == [""]
    _, meta = load_file(cache_dir / f"_empty_{ARCH}_te.safetensors")
    assert meta["caption1"] == "" and "kern.settings" in meta
    out = cache.load_batch(items, ARCH, torch.Generator().manual_seed(0), caption_dropout_rate=1.0, layout=FLAT)
    assert out["captions"] == ["", ""] and out["text"]["ctx"].shape == (2, 4, 8)


def _wrong_architecture(path: Path) -> None:
    tensors, meta = load_file(path)
    save_file(tensors, str(path), metadata={**meta, "architecture": "other_arch"})


def _wrong_width(path: Path) -> None:
    tensors, meta = load_file(path)
    save_file(tensors, str(path), metadata={**meta, "width": "65"})


def _other_bucket(path: Path) -> None:  # as if musubi had bucketed the image at 64x48
    tensors, meta = load_file(path)
    out = {}
    for k, t in tensors.items():
        t = t[..., :6, :]
        parts = k.rsplit("_", 2)
        out[f"{parts[0]}_{'x'.join(map(str, t.shape[1:]))}_{parts[2]}"] = t.contiguous()
    save_file(out, str(path), metadata=meta)


def _no_control(path: Path) -> None:
    tensors, meta = load_file(path)
    save_file({k: t for k, t in tensors.items() if "control" not in k}, str(path), metadata=meta)


def _wrong_dtype_suffix(path: Path) -> None:
    tensors, meta = load_file(path)
    save_file({k.replace("bfloat16", "float32"): t for k, t in tensors.items()}, str(path), metadata=meta)


def _other_caption(path: Path) -> None:
    tensors, meta = load_file(path)
    save_file(tensors, str(path), metadata={**meta, "caption1": "an older caption"})


def _other_text_key(path: Path) -> None:  # e.g. a file of another architecture's encoder
    tensors, meta = load_file(path)
    save_file({f"t5_{k}": t for k, t in tensors.items()}, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("which", "damage", "kind"),
    [
        ("latents", _wrong_architecture, "flat"),
        ("latents", _wrong_width, "frames"),
        ("latents", _other_bucket, "flat"),
        ("latents", _other_bucket, "frames"),
        ("latents", _no_control, "frames"),
        ("latents", _wrong_dtype_suffix, "flat"),
        ("text", _wrong_architecture, "frames"),
        ("text", _other_caption, "flat"),
        ("text", _other_text_key, "frames"),
    ],
)
def test_a_musubi_file_that_does_not_fit_is_rebuilt(tmp_path, which, damage, kind):
    layout = LAYOUTS[kind]
    items, cache_dir = dataset(tmp_path)
    write_musubi_cache(items, cache_dir, layout)
    a = items[0]
    path = (
        musubi_latent_file(cache_dir, a.stem, a.size, ARCH)
        if which == "latents"
        else cache_dir / f"a_{ARCH}_te.safetensors"
    )
    damage(path)
    vae, te = FakeVAE(), FakeTE(layout.latent_frames)
    n_lat, n_txt = fill(items, layout, vae=vae, te=te)
    assert (n_lat, n_txt) == ((1, 0) if which == "latents" else (0, 1))
    assert "kern.source" in load_file(musubi_latent_file(cache_dir, a.stem, a.size, ARCH))[1] or which == "text"
    # the rebuilt file is kern's, in musubi's layout, and the batch loads
    assert cache.load_batch(items, ARCH, layout=layout)["latents"].shape[0] == 2


def test_without_a_grid_a_musubi_latent_file_is_rebuilt(tmp_path):
    items, cache_dir = dataset(tmp_path)
    write_musubi_cache(items, cache_dir, FLAT)
    assert fill(items, FLAT, te=never, grid=None) == (2, 0)


def test_without_declared_text_keys_a_musubi_text_file_is_rebuilt(tmp_path):
    items, cache_dir = dataset(tmp_path, controls=False)
    write_musubi_cache(items, cache_dir, FLAT)
    n = cache.ensure_text_cache(items, ARCH, FakeTE(False), settings={}, arch_name=ARCH_FULL)
    assert n == 2  # the layout names no output, so kern cannot tell what such a file must hold


# --------------------------------------------------------------------------- kern's files are musubi's


@pytest.mark.parametrize("kind", ["flat", "frames"])
def test_kern_writes_musubis_names_keys_and_metadata_and_musubis_loader_reads_them(tmp_path, kind):
    layout = LAYOUTS[kind]
    items, cache_dir = dataset(tmp_path)
    te = FakeTE(layout.latent_frames)
    assert fill(items, layout, te=te) == (2, 2)
    a, b = items
    lat_a, lat_b = (musubi_latent_file(cache_dir, i.stem, i.size, ARCH) for i in items)
    txt_a, txt_b = (musubi_text_file(cache_dir, i.stem, ARCH) for i in items)
    tensors, meta = load_file(lat_a)
    if layout.latent_frames:
        assert sorted(tensors) == ["latents_1x8x8_float32", "latents_control_0_1x8x8_float32"]
        assert tensors["latents_1x8x8_float32"].shape == (4, 1, 8, 8)
    else:
        assert sorted(tensors) == ["latents_8x8_float32", "latents_control_0_8x8_float32"]
        assert tensors["latents_8x8_float32"].shape == (4, 8, 8)
    assert {k: meta[k] for k in ("architecture", "width", "height", "format_version")} == {
        "architecture": ARCH_FULL,
        "width": "64",
        "height": "64",
        "format_version": "1.0.1",
    }
    assert "kern.source" in meta  # kern's fingerprint alongside
    tensors, meta = load_file(txt_a)
    key = "varlen_vl_embed_bfloat16" if layout.latent_frames else "ctx_vec_bfloat16"
    assert list(tensors) == [key]  # no mask: musubi stores none
    assert meta["caption1"] == a.caption and meta["architecture"] == ARCH_FULL and meta["format_version"] == "1.0.1"
    assert "kern.settings" in meta

    got = musubi_batch([(lat_a, txt_a), (lat_b, txt_b)])
    encoded = FakeTE(layout.latent_frames)([a.caption, b.caption])
    if layout.latent_frames:
        assert set(got) == {"latents", "latents_control_0", "vl_embed"}
        assert got["latents"].shape == (2, 4, 1, 8, 8)
        for j in range(2):  # each caption's tokens, without the batch's padding
            n = int(encoded["mask"][j].sum())
            assert torch.equal(got["vl_embed"][j], encoded["ctx"][j, :n])
        assert got["vl_embed"][0].shape[0] != got["vl_embed"][1].shape[0]
    else:
        assert set(got) == {"latents", "latents_control_0", "ctx_vec"}
        assert got["latents"].shape == (2, 4, 8, 8) and torch.equal(got["ctx_vec"], encoded["ctx"])

    # kern reads its files back as the encoder gave them
    batch = cache.load_batch(items, ARCH, layout=layout)
    assert torch.equal(batch["text"]["ctx"], encoded["ctx"])
    if layout.latent_frames:
        assert torch.equal(batch["text"]["mask"], encoded["mask"])
        assert torch.equal(batch["latents"], got["latents"][:, :, 0])


# --------------------------------------------------------------------------- kern's own caches: fingerprints still rule


def test_a_kern_cache_made_with_other_settings_is_rebuilt_not_trusted(tmp_path):
    items, cache_dir = dataset(tmp_path)
    fill(items, FRAMES)
    assert fill(items, FRAMES, vae=never, te=never) == (0, 0)
    # musubi-shaped files with kern's fingerprint: the fingerprint decides, not the metadata checks
    assert fill(items, FRAMES, settings={"vae": "v2"}, text_settings={"te": "t2"}) == (2, 2)


def test_kern_caches_of_the_earlier_layout_are_rebuilt_once(tmp_path):
    items, cache_dir = dataset(tmp_path)
    none = CacheLayout()
    fill(items, none)  # as kern wrote them before the layouts: ctx_<dtype> and mask_<dtype>, (C, h, w) latents
    assert sorted(load_file(cache_dir / f"a_{ARCH}_te.safetensors")[0]) == ["ctx_bfloat16"]
    assert fill(items, FRAMES) == (2, 2)
    assert list(load_file(cache_dir / f"a_{ARCH}_te.safetensors")[0]) == ["varlen_vl_embed_bfloat16"]
    assert fill(items, FRAMES, vae=never, te=never) == (0, 0)


# --------------------------------------------------------------------------- the real plugins, end to end


def test_the_plugins_cache_ids_and_names_are_musubis():
    """musubi's dataset/architectures.py and flux_2/flux2_utils.py (FLUX2_MODEL_INFO): base and distilled klein of
    one size share an id; every Qwen-Image variant writes ``architecture`` = ``qwen_image`` (cache_io.py)."""
    from kern.core.plugins import get_manager

    expected = {
        "flux2": {
            "dev": ("f2d", "flux_2_dev"),
            "klein-4b": ("f2k4b", "flux_2_klein_4b"),
            "klein-base-4b": ("f2k4b", "flux_2_klein_4b"),
            "klein-9b": ("f2k9b", "flux_2_klein_9b"),
            "klein-base-9b": ("f2k9b", "flux_2_klein_9b"),
        },
        "qwen-image": {
            "t2i": ("qi", "qwen_image"),
            "edit": ("qie", "qwen_image"),
            "edit-2509": ("qie", "qwen_image"),
            "edit-2511": ("qie", "qwen_image"),
            "layered": ("qil", "qwen_image"),
        },
    }
    for arch_name, variants in expected.items():
        arch = get_manager().resolve_arch(arch_name)[0]
        assert {v.name: (v.cache_id, v.cache_name) for v in arch.variants} == variants
    layouts = {a: get_manager().resolve_arch(a)[0].cache_layout for a in expected}
    assert layouts["flux2"] == CacheLayout(text=(TextCacheKey("ctx", "ctx_vec"),))
    assert layouts["qwen-image"] == CacheLayout(text=(TextCacheKey("ctx", "vl_embed", "mask"),), latent_frames=True)


CASES = {
    "flux2": {"arch": "flux2-klein-4b", "id": "f2k4b", "name": "flux_2_klein_4b", "text": "ctx_vec", "frames": False},
    "qwen": {"arch": "qwen-image", "id": "qi", "name": "qwen_image", "text": "vl_embed", "frames": True},
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from kern_flux2 import tiny as flux2_tiny
    from kern_qwen_image import tiny as qwen_tiny

    return {
        "flux2": flux2_tiny.build(tmp_path_factory.mktemp("tiny-flux2")),
        "qwen": qwen_tiny.build(tmp_path_factory.mktemp("tiny-qwen")),
    }


def job_for(bundle, case, dataset_toml: Path, out: Path, **over):
    from kern.core import config

    values = {
        "model.arch": CASES[case]["arch"],
        "model.transformer": str(bundle["transformer"]),
        "model.vae": str(bundle["vae"]),
        "model.text_encoder": str(bundle["text_encoder"]),
        "model.dtype": "float32",
        "network.type": "lora",
        "network.rank": 4,
        "network.alpha": 4.0,
        "dataset.config": str(dataset_toml),
        "save.out": str(out),
        "train.steps": 1,
        "train.mixed_precision": "no",
        "train.device": "cpu",
        "train.gradient_checkpointing": False,
        "sample.prompts": [],
        **over,
    }
    return config.load_job(None, values)


def spy_hooks(monkeypatch, *names: str) -> dict[str, list[dict]]:
    from kern.core.plugins import get_manager

    manager, calls = get_manager(), {n: [] for n in names}
    for name in names:
        real = getattr(manager.hook, name)

        def wrapper(_name=name, _real=real, **kw):
            calls[_name].append(kw)
            return _real(**kw)

        monkeypatch.setattr(manager.hook, name, wrapper)
    return calls


@pytest.mark.parametrize("case", ["flux2", "qwen"])
def test_kern_cache_and_training_use_a_musubi_cache_directory_as_it_is(bundles, tmp_path, monkeypatch, case):
    from kern.core.plugins import get_manager
    from kern.train import caching
    from kern.train import driver as train

    from tests.helpers import make_dataset

    c, bundle = CASES[case], bundles[case]
    cid, frames = c["id"], c["frames"]

    # kern's own caches are in musubi's layout: names, keys, metadata, and musubi's loader reads them.
    first = make_dataset(tmp_path / "data", n=2, size=(32, 32))
    assert caching.cache_only(job_for(bundle, case, first, tmp_path / "run0")) == {"text": (2, 2), "latents": (2, 2)}
    kern_dir = tmp_path / "data" / "cache"
    assert sorted(p.name for p in kern_dir.iterdir()) == sorted(
        [f"_empty_{cid}_te.safetensors"]
        + [f"img{i}_0032x0032_{cid}.safetensors" for i in range(2)]
        + [f"img{i}_{cid}_te.safetensors" for i in range(2)]
    )
    lat, meta = load_file(kern_dir / f"img0_0032x0032_{cid}.safetensors")
    assert list(lat) == (["latents_1x4x4_float32"] if frames else ["latents_2x2_float32"])
    assert meta["architecture"] == c["name"] and (meta["width"], meta["height"]) == ("32", "32")
    txt, meta = load_file(kern_dir / f"img0_{cid}_te.safetensors")
    assert list(txt) == [("varlen_" if frames else "") + c["text"] + "_float32"]
    assert meta["architecture"] == c["name"] and meta["caption1"] == "a red square"
    pairs = [
        (kern_dir / f"img{i}_0032x0032_{cid}.safetensors", kern_dir / f"img{i}_{cid}_te.safetensors") for i in (0, 1)
    ]
    assert set(musubi_batch(pairs)) == {"latents", c["text"]}
    (latent_shape,) = (t.shape for t in lat.values())
    (embed_shape,) = (t.shape for t in txt.values())

    # A musubi cache_directory over the same images: files written as musubi writes them, with other values.
    musubi_dir = tmp_path / "musubi_cache"
    second = tmp_path / "data" / "musubi.toml"
    second.write_text(first.read_text().replace(str(kern_dir), str(musubi_dir)))
    g = torch.Generator().manual_seed(1)
    want = {}
    for i, caption in enumerate(["a red square", "a green square"]):
        latent = torch.randn(latent_shape, generator=g).to(torch.bfloat16)
        length = embed_shape[0] + (i if frames else 0)  # musubi's Qwen-Image text: each caption's own length
        embed = torch.randn(length, embed_shape[1], generator=g).to(torch.bfloat16)
        stem = f"img{i}"
        musubi_save_latents(
            musubi_latent_file(musubi_dir, stem, (32, 32), cid), (32, 32), latent, [], c["name"], frames
        )
        musubi_save_text(
            musubi_text_file(musubi_dir, stem, cid), caption, embed, c["name"], c["text"] if frames else None
        )
        want[stem] = (latent, embed)

    calls = spy_hooks(monkeypatch, "load_model", "encode_text", "encode_latents")
    with capture_logs() as logs:
        out = caching.cache_only(job_for(bundle, case, second, tmp_path / "run1"))
    assert out == {"text": (0, 2), "latents": (0, 2)}
    assert calls["encode_text"] == [] and calls["encode_latents"] == []
    assert [kw["part"] for kw in calls["load_model"]] == ["vae"]  # the text encoder is never loaded
    lines = {e["event"]: e for e in logs if e["event"] in ("latent cache", "text cache")}
    assert all(lines[k]["to_encode"] == 0 and lines[k]["reused_foreign"] == 2 for k in lines) and len(lines) == 2
    assert sorted(p.name for p in musubi_dir.iterdir()) == sorted(
        f"img{i}_{s}" for i in range(2) for s in (f"0032x0032_{cid}.safetensors", f"{cid}_te.safetensors")
    )  # nothing added or rewritten

    # The batch is musubi's tensors, under the names the plugin's model reads.
    layout = get_manager().resolve_arch(c["arch"])[0].cache_layout
    items = scan_items(load_dataset_config(second), STEP)
    batch = cache.load_batch(items, cid, layout=layout)
    for j, item in enumerate(items):
        latent, embed = want[item.stem]
        assert torch.equal(batch["latents"][j], (latent[:, 0] if frames else latent).float())
        assert torch.equal(batch["text"]["ctx"][j, : embed.shape[0]], embed)
        if frames:
            assert int(batch["text"]["mask"][j].sum()) == embed.shape[0]

    # Training on it encodes nothing and runs.
    for v in calls.values():
        v.clear()
    train.run(job_for(bundle, case, second, tmp_path / "run2"))
    assert calls["encode_text"] == [] and calls["encode_latents"] == []
    assert (tmp_path / "run2" / "adapter.safetensors").is_file()
