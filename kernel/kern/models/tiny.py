"""Building blocks for tiny random models in the real file formats, which architecture plugins ship for their
tests and demos: deterministic random weights, a byte-level BPE tokenizer, a seeded Hugging Face folder, smooth
images to calibrate latent statistics on, and the write-once bundle with its command line.

Everything is a pure function of its seeds: the same call writes the same tensors on every machine, so tests and
the demo can rely on a bundle's exact values. Nothing here knows an architecture; each plugin's ``tiny.py`` says
which parameters are norm gains, which sizes and which files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# (name, parameter) -> (mean, std) of the normal draw that replaces the parameter, or None to leave it as it is.
Draw = Callable[[str, torch.Tensor], "tuple[float, float] | None"]


def gains_near_one(is_gain: Callable[[str, torch.Tensor], bool], std: float = 0.05, gain_std: float = 0.1) -> Draw:
    """The usual draw: norm gains (``is_gain``) about 1 so activations keep their size, everything else small."""
    return lambda name, p: (1.0, gain_std) if is_gain(name, p) else (0.0, std)


def init_random_(
    module: torch.nn.Module, seed: int | torch.Generator, draw: Draw, *, sorted_names: bool = True
) -> torch.nn.Module:
    """Overwrite ``module``'s parameters with ``mean + std * N(0, 1)`` as ``draw`` says, in place; returns ``module``.

    The draws come from one CPU generator (``seed``, or a generator to continue), parameter by parameter in name
    order (``sorted_names``) or in registration order, so the values depend on nothing but the seed and the names.
    """
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    named = list(module.named_parameters())
    with torch.no_grad():
        for name, p in sorted(named, key=lambda item: item[0]) if sorted_names else named:
            spec = draw(name, p)
            if spec is None:
                continue
            mean, std = spec
            noise = torch.randn(p.shape, generator=g)
            p.copy_(std * noise if mean == 0 else mean + std * noise)  # no "+ 0.0": it would turn -0.0 into 0.0
    return module


def write_random_model(
    model: torch.nn.Module, path: str | Path, seed: int, draw: Draw, metadata: Mapping[str, str] | None = None
) -> Path:
    """``model`` with random weights (:func:`init_random_`, sorted names) saved as one safetensors file."""
    from kern.core.io import save_file

    init_random_(model, seed, draw)
    save_file(model.state_dict(), Path(path), metadata=dict(metadata) if metadata else None)
    return Path(path)


def smooth_images(n: int, channels: int, seed: int, size: int = 64, coarse: int = 8) -> torch.Tensor:
    """``n`` smooth random images in [-1, 1] (uniform ``coarse`` x ``coarse`` noise, bilinearly upsampled to
    ``size``): stand-ins for natural images when calibrating a tiny VAE's latent statistics."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, coarse, coarse, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def byte_level_bpe(
    corpus: Iterable[str], vocab_size: int, specials: Sequence[str], *, split: str | None = None, nfc: bool = False
):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus``, as the real LLM tokenizers are built: any
    text tokenizes (unknown words fall back to bytes). ``split`` is the model's pre-tokenizer regex, applied
    before the byte mapping (else the byte-level default split); ``nfc`` normalises to NFC first."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def save_seeded_pretrained(model_cls: Any, config: Any, folder: str | Path, seed: int, *companions: Any) -> Path:
    """A Hugging Face model of ``model_cls`` built from ``config`` with its own initialisation under ``seed``
    (the global RNG is left as it was), saved to ``folder`` with its ``companions`` (tokenizer, processor)."""
    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for c in companions:
        c.save_pretrained(folder)
    return folder


def build_bundle(
    folder: str | Path, parts: Mapping[str, tuple[str, Callable[[Path], Any]]], force: bool = False
) -> dict[str, Path]:
    """Write the parts of a tiny bundle into ``folder`` and return their paths. ``parts`` maps a part's name to
    (its file or folder name, its writer), in writing order; a part already there (its file, or a folder's
    ``config.json``) is kept unless ``force``."""
    folder = Path(folder)
    paths = {name: folder / rel for name, (rel, _) in parts.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for name, (_, write) in parts.items():
        p = paths[name]
        if force or not (p.is_file() or (p / "config.json").is_file()):
            write(p)
    return paths


def bundle_main(build: Callable[[str], Mapping[str, Path]], module: str, argv: Sequence[str] | None = None) -> None:
    """``python -m MODULE OUTPUT_FOLDER``: build the bundle there and print its paths."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        raise SystemExit(f"usage: python -m {module} OUTPUT_FOLDER")
    for name, path in build(args[0]).items():
        print(f"{name}: {path}")
