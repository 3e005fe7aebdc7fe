"""Prompt lines and wildcards for ``kern generate``: pure parsing, no models.

A prompt line is ``text --w 768 --h 512 --d 42 --s 28 --g 4.0 --n "negative" --f 2``; a line of
only options takes the command line's ``--prompt``. ``__name__`` in a prompt is replaced by a
random line of ``<wildcards>/name.txt``; a line may end in ``:weight``; wildcards may nest.

Every number is checked here against ``LIMITS`` (and guidance must be finite), so a bad line is a
``UsageError`` naming its source before any model loads; wildcard names resolve inside their folder only.
"""

from __future__ import annotations

import math
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

# Bounds of every number a run takes (inclusive). A side must also be a multiple of the architecture's
# resolution step (checked when the images are planned); seeds are what torch.Generator.manual_seed takes.
MAX_SIDE = 16384
MAX_STEPS = 1000
MAX_COUNT = 10000
MAX_LAYERS = 64
MAX_BATCH = 1024
MAX_SEED = 2**64 - 1
LIMITS: dict[str, tuple[int, int]] = {
    "width": (1, MAX_SIDE),
    "height": (1, MAX_SIDE),
    "steps": (1, MAX_STEPS),
    "count": (1, MAX_COUNT),
    "seed": (0, MAX_SEED),
    "layers": (1, MAX_LAYERS),
    "batch_size": (1, MAX_BATCH),
}

WILDCARD = re.compile(r"__([A-Za-z0-9_\-./]+?)__")
MAX_WILDCARD_DEPTH = 16
MAX_TEXT_BYTES = 64 * 2**20  # prompt and wildcard files
MAX_WILDCARD_EXPANSIONS = 10000  # substitutions in one prompt: nested wildcards cannot grow it without bound


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


def check_value(field: str, value: Any, what: str) -> Any:
    """``value`` if it is a valid ``field`` (``LIMITS``; guidance: a finite number), else ``UsageError``.

    ``what`` names where the value came from, e.g. ``"--width"`` or ``"prompts.txt:3: --w"``.
    """
    if field == "guidance":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{what} must be a finite number, got {value!r}")
        return float(value)
    if field in LIMITS:
        low, high = LIMITS[field]
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{what} must be a whole number, got {value!r}")
        if value < low:
            raise UsageError(f"{what} must be at least {low}, got {value}")
        if value > high:
            raise UsageError(f"{what} must be at most {high}, got {value}")
    return value


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
    if "\x00" in text:
        raise UsageError(f"{where}: the line holds a NUL character; is this a text file?")
    extra_options = extra_options or {}
    start = _options_start(text)
    head, tail = text[:start], text[start:]
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


def _options_start(text: str) -> int:
    """Where the options begin: the first ``--`` at the start of the line or after whitespace (else the end)."""
    m = re.search(r"(?:^|\s)--", text)
    return m.start() if m else len(text)


def _apply_options(request: Request, tokens: list[str], where: str, extra_options: dict[str, type]) -> None:
    extra_options = {**LIST_OPTIONS, **extra_options}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise UsageError(f"{where}: expected an option like --w, got {token!r}")
        name = token[2:]
        if name in LINE_OPTIONS:
            field, kind = LINE_OPTIONS[name]
        elif name in extra_options or name in EXTRA_OPTIONS:
            field, kind = name, extra_options.get(name) or EXTRA_OPTIONS[name]
        else:
            known = " ".join(f"--{k}" for k in [*LINE_OPTIONS, *extra_options, *EXTRA_OPTIONS])
            raise UsageError(f"{where}: unknown option --{name}; known: {known}")
        if i + 1 >= len(tokens):
            raise UsageError(f"{where}: option --{name} needs a value")
        raw = tokens[i + 1]
        i += 2
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: --{name} wants {kind.__name__}, got {raw!r}") from None
        check_value(field, value, f"{where}: --{name}")
        if name in EXTRA_OPTIONS:
            request.extra[field] = value
        elif name in extra_options:
            request.extra.setdefault(field, []).append(value)
        else:
            setattr(request, field, value)


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped); ``UsageError`` naming the file (and line) otherwise."""
    p = Path(path)
    try:
        with open(p, "rb") as f:  # bounded: a device such as /dev/zero or a huge file is refused, not read forever
            data = f.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{p}: {what} not found") from None
    except IsADirectoryError:
        raise UsageError(f"{p}: is a folder, not a {what}") from None
    except OSError as exc:
        raise UsageError(f"{p}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > MAX_TEXT_BYTES:
        raise UsageError(f"{p}: the {what} is larger than {MAX_TEXT_BYTES // 2**20} MiB; is it the right file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(
            f"{p}:{line}: the {what} is not UTF-8 text (byte {data[exc.start]:#04x}); save it as UTF-8"
        ) from None


def read_prompt_file(
    path: str | Path, base_prompt: str | None = None, extra_options: dict[str, type] | None = None
) -> list[Request]:
    """Every request of a prompt file, parsed up front so a bad line fails before any image is made."""
    p = Path(path)
    lines = read_text_file(p, "prompt file").splitlines()
    requests = [parse_line(line, f"{p}:{n}", base_prompt, extra_options) for n, line in enumerate(lines, start=1)]
    found = [r for r in requests if r is not None]
    if not found:
        raise UsageError(f"{p}: no prompts (only blank or # comment lines)")
    return found


# --------------------------------------------------------------------------- wildcards


class Wildcards:
    """``__name__`` expansion from ``<folder>/name.txt`` files, weighted, nested, cycle-checked.

    A name resolves to a file inside the folder only: absolute names, ``..`` and symlinks that lead out
    of it are refused.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder else None
        self._cache: dict[str, list[tuple[str, float]]] = {}

    def path(self, name: str, where: str) -> Path:
        """The file of ``__name__``, checked to lie inside the folder."""
        if self.folder is None:
            raise UsageError(f"{where}: __{name}__ used but no --wildcards folder was given")
        outside = UsageError(
            f"{where}: wildcard __{name}__ points outside the --wildcards folder {self.folder};"
            " name a file inside it (sub-folders: __sub/name__)"
        )
        if name.startswith("/") or ".." in name.split("/"):
            raise outside
        path = self.folder / f"{name}.txt"
        try:
            root, target = self.folder.resolve(), path.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise UsageError(f"{where}: wildcard __{name}__: cannot resolve {path} ({exc})") from None
        if not target.is_relative_to(root):
            raise outside
        return path

    def choices(self, name: str, where: str) -> list[tuple[str, float]]:
        if name in self._cache:
            return self._cache[name]
        path = self.path(name, where)
        if not path.exists():
            raise UsageError(f"{where}: wildcard __{name}__: no file {path}")
        lines = read_text_file(path, "wildcard file").splitlines()
        out = []
        for n, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            value, weight = line, 1.0
            m = re.fullmatch(r"(.*?):\s*([0-9]*\.?[0-9]+)", line)
            if m and m.group(1):
                value, weight = m.group(1).strip(), float(m.group(2))
            if not math.isfinite(weight):
                raise UsageError(f"{path}:{n}: weight {m.group(2)[:20]}... is too large")
            out.append((value, weight))
        total = sum(w for _, w in out)
        if not out or total <= 0:
            raise UsageError(f"{path}: wildcard file has no usable lines (all blank, comments or weight 0)")
        if not math.isfinite(total):
            raise UsageError(f"{path}: the weights add up to more than a float holds; use smaller weights")
        self._cache[name] = out
        return out

    def expand(
        self, text: str, rng: random.Random, where: str, _stack: tuple[str, ...] = (), _done: list[int] | None = None
    ) -> str:
        """Replace every ``__name__`` left to right, recursively; the same ``rng`` state gives the same text."""
        if len(_stack) > MAX_WILDCARD_DEPTH:
            raise UsageError(f"{where}: wildcards nest deeper than {MAX_WILDCARD_DEPTH} ({' -> '.join(_stack)})")
        done = [0] if _done is None else _done

        def pick(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in _stack:
                raise UsageError(f"{where}: wildcard cycle {' -> '.join((*_stack, name))}")
            done[0] += 1
            if done[0] > MAX_WILDCARD_EXPANSIONS:
                raise UsageError(
                    f"{where}: more than {MAX_WILDCARD_EXPANSIONS} wildcard substitutions in one prompt;"
                    " simplify the wildcards"
                )
            options = self.choices(name, where)
            value = rng.choices([v for v, _ in options], weights=[w for _, w in options], k=1)[0]
            return self.expand(value, rng, where, (*_stack, name), done)

        return WILDCARD.sub(pick, text)


def expand_request(request: Request, wildcards: Wildcards, seed: int) -> Request:
    """The request with its prompt and negative expanded, seeded by the image seed."""
    rng = random.Random(seed)
    prompt = wildcards.expand(request.prompt, rng, request.source)
    negative = wildcards.expand(request.negative, rng, request.source) if request.negative else request.negative
    return attrs.evolve(request, prompt=prompt, negative=negative)


def iter_interactive(
    stream: Iterable[str | bytes], base_prompt: str | None, extra_options: dict[str, type] | None = None
):
    """Requests from an interactive stream: one per line until EOF or a line ``exit``/``quit``.

    Lines may be ``str`` or ``bytes`` (decoded as UTF-8 here, so one bad line is reported, not fatal).
    Bad lines raise nothing here: they yield a ``UsageError`` so the loop can report and go on.
    """
    for n, line in enumerate(stream, start=1):
        where = f"<stdin>:{n}"
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                yield UsageError(f"{where}: the line is not UTF-8 text")
                continue
        if line.strip() in ("exit", "quit"):
            return
        try:
            request = parse_line(line, where, base_prompt, extra_options)
        except UsageError as exc:
            yield exc
            continue
        if request is not None:
            yield request
