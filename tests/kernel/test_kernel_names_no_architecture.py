"""The kernel names no architecture (issue 14): no module under kernel/kern mentions a built-in plugin's architecture,
in code, strings or comments. What an architecture needs is declared by its plugin (records, hooks).

Checked, case-insensitively: the names and aliases of every architecture the built-in plugins register and the
aliases of their variants (read from the plugin manager), the variant names that are not plain words (``klein-4b``,
``edit-2509``, ``t2i``: a variant called ``dev`` or ``edit`` is checked through its qualified aliases, since those
words have other meanings), and the words FLUX, Qwen, klein and BFL (``flux2``, ``Qwen-Image``, ``qwen_image`` ...).
"""

from __future__ import annotations

import re
from pathlib import Path

from kern.core.plugins import BUILTIN_DISTRIBUTIONS, build_manager

KERN = Path(__file__).resolve().parents[2] / "kernel" / "kern"
WORDS = ("flux", "qwen", "klein", "bfl")
# The kernel must know which distributions ship with it, to let them keep their names: that one line names them.
ALLOWED = {("core/plugins.py", "BUILTIN_DISTRIBUTIONS = ")}


def builtin_names() -> set[str]:
    manager = build_manager()
    names: set[str] = set()
    for info in manager.infos.values():
        if info.distribution not in BUILTIN_DISTRIBUTIONS:
            continue
        for arch in (manager.architectures[a] for a in info.architectures):
            names |= {arch.name, *arch.aliases}
            for variant in arch.variants:
                names |= set(variant.aliases)
                if not variant.name.isalpha():
                    names.add(variant.name)
    return names


def pattern(names: set[str]) -> re.Pattern:
    exact = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    words = "|".join(WORDS)
    # A name stands alone (no letter or digit around it); a word may be followed by a digit (flux2) or _ (qwen_image).
    return re.compile(
        rf"(?<![A-Za-z0-9])(?:{exact})(?![A-Za-z0-9])|(?<![A-Za-z])(?:{words})(?![A-Za-z])", re.IGNORECASE
    )


def test_the_check_knows_the_builtin_architectures():
    names = builtin_names()
    assert len(names) >= 4  # two architectures with their aliases, read from the installed plugins
    found = pattern(names)
    for text in (
        "FLUX.2",
        "flux2-klein-4b",
        "Qwen-Image-Edit",
        "qwen_image",
        "BFL's reference",
        "klein 4B",
        "edit-2511",
    ):
        assert found.search(text), text
    for text in ("bfloat16", "st_dev", "/dev/zero", "an edit model", "reflux", "device"):
        assert not found.search(text), text


def test_no_kernel_module_names_a_builtin_architecture():
    found = pattern(builtin_names())
    hits = []
    for path in sorted(KERN.rglob("*.py")):
        rel = path.relative_to(KERN).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if found.search(line) and not any(rel == f and line.lstrip().startswith(start) for f, start in ALLOWED):
                hits.append(f"kernel/kern/{rel}:{number}: {line.strip()}")
    assert not hits, "the kernel names an architecture; say it generically or move it into the plugin:\n" + "\n".join(
        hits
    )
