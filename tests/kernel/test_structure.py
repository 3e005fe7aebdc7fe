"""The kernel's shape, as issue 14 set it: layers with no upward imports, no import cycles, small modules.

Layers, lowest first: the plugin API at the top level of ``kern`` (what a plugin imports); ``core`` (plugin manager,
config, I/O) and ``maths``; the building blocks ``models``, ``data``, ``adapters`` and ``gpu``; the drivers ``train``
and ``generate``. A module imports only from its own layer or lower ones; lazy imports inside functions count.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

KERN = Path(__file__).resolve().parents[2] / "kernel" / "kern"
LAYERS = {"": 0, "core": 1, "maths": 1, "models": 2, "data": 2, "adapters": 2, "gpu": 2, "train": 3, "generate": 3}
MAX_LINES = 510  # "about 500": room for the formatter's wrapping, not for another topic


def _module_name(path: Path) -> str:
    parts = path.relative_to(KERN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(KERN.rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    sub = parts[1] if len(parts) > 1 and parts[1] in LAYERS else ""
    return LAYERS[sub]


def _imports(path: Path) -> set[str]:
    """Every kern module ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "kern" or a.name.startswith("kern.")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and (node.module == "kern" or node.module.startswith("kern."))
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_the_layers_are_the_ones_this_test_knows():
    unknown = sorted(
        {m.split(".")[1] for m in MODULES if m.count(".") >= 1 and (KERN / m.split(".")[1]).is_dir()} - set(LAYERS)
    )
    assert not unknown, f"new kernel subpackage(s) {unknown}: give each a layer in LAYERS"


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, targets in GRAPH.items()
        for dst in sorted(targets)
        if _layer(dst) > _layer(src) and not (src == "kern" and dst == "kern._moved")
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if nxt == node or nxt == "kern" or node == "kern":
                continue  # the package's __init__ re-exports the API; everything may import it
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_kernel_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, (
        f"{MODULES[name].relative_to(KERN.parent)} has {lines} lines (limit {MAX_LINES}): split it along its seams"
    )


SKIP_TOKENS = (
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
)


def _code_lines(path: Path) -> list[str]:
    """The file's code lines as tokens joined by spaces: comments, blank lines and import statements left out; a
    docstring counts on each of its lines."""
    by_line: dict[int, list[str]] = {}
    imports: set[int] = set()
    start, first = None, True
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NEWLINE:
            first = True
            continue
        if first and tok.type not in SKIP_TOKENS:
            first = False
            start = tok.start[0] if tok.type == tokenize.NAME and tok.string in ("import", "from") else None
        if start is not None:
            imports.update(range(start, tok.end[0] + 1))
        if tok.type in SKIP_TOKENS:
            continue
        for k, part in enumerate(tok.string.split("\n")):
            if part.strip():
                by_line.setdefault(tok.start[0] + k, []).append(part.strip())
    return [" ".join(parts) for n, parts in sorted(by_line.items()) if n not in imports]


def _code_windows(package: Path, size: int = 6) -> dict[tuple[str, ...], str]:
    """Every run of ``size`` code lines within one file of ``package``, with where it starts."""
    out = {}
    for f in sorted(package.glob("*.py")):
        lines = _code_lines(f)
        out.update(
            {
                tuple(lines[i : i + size]): f"{package.name}/{f.name} (code line {i + 1})"
                for i in range(len(lines) - size + 1)
            }
        )
    return out


def test_the_architecture_plugins_share_no_block_of_six_lines():
    """Plumbing both architectures need lives in the kernel (kern.models); the plugins hold what differs."""
    plugins = KERN.parents[1] / "plugins"
    flux2 = _code_windows(plugins / "flux2" / "kern_flux2")
    qwen = _code_windows(plugins / "qwen_image" / "kern_qwen_image")
    shared = sorted(f"{flux2[w]} = {qwen[w]}" for w in set(flux2) & set(qwen))
    assert not shared, "move the shared code into the kernel (kern.models):\n" + "\n".join(shared)
