"""Prompt lines and wildcards for ``kern generate``: pure parsing, no models.

A prompt line is ``text --w 768 --h 512 --d 42 --s 28 --g 4.0 --n "negative" --f 2``; a line of
only options takes the command line's ``--prompt``. ``__name__`` in a prompt is replaced by a
random line of ``<wildcards>/name.txt``; a line may end in ``:weight``; wildcards may nest.
"""

from __future__ import annotations

import random
import re
import shlex
from pathlib import Path
from typing import Any, Iterable

import attrs

from kern.errors import UsageError

# Per-line option → (field, type). Architectures add their own through ``extra_options``.
LINE_OPTIONS: dict[str, tuple[str, type]] = {
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "s": ("steps", int),
    "g": ("guidance", float),
    "n": ("negative", str),
    "f": ("count", int),
}
# Options that may repeat and collect into Request.extra: control / reference images.
LIST_OPTIONS: dict[str, type] = {"ci": str}
# Architecture options kept in Request.extra as one value: the output layers of layered variants.
EXTRA_OPTIONS: dict[str, type] = {"layers": int}

WILDCARD = re.compile(r"__([A-Za-z0-9_\-./]+?)__")
MAX_WILDCARD_DEPTH = 16


@attrs.define
class Request:
    """One prompt to generate ``count`` images from; ``None`` fields take the run's defaults."""

    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    count: int | None = None  # None: the run's --count
    extra: dict[str, Any] = attrs.Factory(dict)  # architecture options, e.g. reference images
    source: str = "<command line>"  # "prompts.txt:12" for error messages and metadata


def parse_line(
    line: str,
    where: str,
    base_prompt: str | None = None,
    extra_options: dict[str, type] | None = None,
) -> Request | None:
    """Parse one prompt line; ``None`` for blank and ``#`` comment lines. Errors name ``where``."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    extra_options = extra_options or {}
    head, sep, tail = (text, "", "") if not text.startswith("--") and " --" not in text else _split(text)
    prompt = head.strip()
    if not prompt:
        if base_prompt is None:  # "" is a base prompt too: the image is captioned (--auto-caption-lang)
            raise UsageError(f"{where}: this line has only options and there is no --prompt to apply them to")
        prompt = base_prompt
    request = Request(prompt=prompt, source=where)
    if tail:
        try:
            tokens = shlex.split(tail)
        except ValueError as exc:
            raise UsageError(f"{where}: cannot read the options ({exc})") from None
        _apply_options(request, tokens, where, extra_options)
    return request


def _split(text: str) -> tuple[str, str, str]:
    if text.startswith("--"):
        return "", "--", text
    i = text.index(" --")
    return text[:i], "--", text[i + 1 :]


def _apply_options(request: Request, tokens: list[str], where: str, extra_options: dict[str, type]) -> None:
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise UsageError(f"{where}: expected an option like --w, got {token!r}")
        name = token[2:]
        if i + 1 >= len(tokens):
            raise UsageError(f"{where}: option --{name} needs a value")
        raw = tokens[i + 1]
        i += 2
        extra_options = {**LIST_OPTIONS, **extra_options}
        if name in LINE_OPTIONS:
            field, kind = LINE_OPTIONS[name]
        elif name in extra_options or name in EXTRA_OPTIONS:
            field, kind = name, extra_options.get(name) or EXTRA_OPTIONS[name]
        else:
            known = " ".join(f"--{k}" for k in [*LINE_OPTIONS, *extra_options, *EXTRA_OPTIONS])
            raise UsageError(f"{where}: unknown option --{name}; known: {known}")
        try:
            value = kind(raw)
        except ValueError:
            raise UsageError(f"{where}: --{name} wants {kind.__name__}, got {raw!r}") from None
        if field in ("width", "height", "steps", "count", "layers") and value < 1:
            raise UsageError(f"{where}: --{name} must be at least 1, got {value}")
        if name in EXTRA_OPTIONS:
            request.extra[field] = value
        elif name in extra_options:
            request.extra.setdefault(field, []).append(value)
        else:
            setattr(request, field, value)


def read_prompt_file(path: str | Path, base_prompt: str | None = None, extra_options: dict[str, type] | None = None) -> list[Request]:
    """Every request of a prompt file, parsed up front so a bad line fails before any image is made."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{p}: prompt file not found") from None
    requests = [parse_line(line, f"{p}:{n}", base_prompt, extra_options) for n, line in enumerate(lines, start=1)]
    found = [r for r in requests if r is not None]
    if not found:
        raise UsageError(f"{p}: no prompts (only blank or # comment lines)")
    return found


# --------------------------------------------------------------------------- wildcards


class Wildcards:
    """``__name__`` expansion from ``<folder>/name.txt`` files, weighted, nested, cycle-checked."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder else None
        self._cache: dict[str, list[tuple[str, float]]] = {}

    def choices(self, name: str, where: str) -> list[tuple[str, float]]:
        if name in self._cache:
            return self._cache[name]
        if self.folder is None:
            raise UsageError(f"{where}: __{name}__ used but no --wildcards folder was given")
        path = self.folder / f"{name}.txt"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UsageError(f"{where}: wildcard __{name}__: no file {path}") from None
        out = []
        for n, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            value, weight = line, 1.0
            m = re.fullmatch(r"(.*?):\s*([0-9]*\.?[0-9]+)", line)
            if m and m.group(1):
                value, weight = m.group(1).strip(), float(m.group(2))
            if weight < 0:
                raise UsageError(f"{path}:{n}: negative weight")
            out.append((value, weight))
        if not out or sum(w for _, w in out) <= 0:
            raise UsageError(f"{path}: wildcard file has no usable lines")
        self._cache[name] = out
        return out

    def expand(self, text: str, rng: random.Random, where: str, _stack: tuple[str, ...] = ()) -> str:
        """Replace every ``__name__`` left to right, recursively; the same ``rng`` state gives the same text."""
        if len(_stack) > MAX_WILDCARD_DEPTH:
            raise UsageError(f"{where}: wildcards nest deeper than {MAX_WILDCARD_DEPTH} ({' -> '.join(_stack)})")

        def pick(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in _stack:
                raise UsageError(f"{where}: wildcard cycle {' -> '.join((*_stack, name))}")
            options = self.choices(name, where)
            value = rng.choices([v for v, _ in options], weights=[w for _, w in options], k=1)[0]
            return self.expand(value, rng, where, (*_stack, name))

        return WILDCARD.sub(pick, text)


def expand_request(request: Request, wildcards: Wildcards, seed: int) -> Request:
    """The request with its prompt and negative expanded, seeded by the image seed."""
    rng = random.Random(seed)
    prompt = wildcards.expand(request.prompt, rng, request.source)
    negative = wildcards.expand(request.negative, rng, request.source) if request.negative else request.negative
    return attrs.evolve(request, prompt=prompt, negative=negative)


def iter_interactive(stream: Iterable[str], base_prompt: str | None, extra_options: dict[str, type] | None = None):
    """Requests from an interactive stream: one per line until EOF or a line ``exit``/``quit``.

    Bad lines raise nothing here: they yield a ``UsageError`` so the loop can report and go on.
    """
    for n, line in enumerate(stream, start=1):
        if line.strip() in ("exit", "quit"):
            return
        try:
            request = parse_line(line, f"<stdin>:{n}", base_prompt, extra_options)
        except UsageError as exc:
            yield exc
            continue
        if request is not None:
            yield request
