"""The docs against the code: what README.md and docs/*.md tell a user to type is what kern accepts.

Fast, nothing is loaded but the plugins' records:

- every ``kern ...`` command in a shell code block (``\\`` continuations, ``#`` comments, ``...`` placeholders and
  ``[--optional parts]`` understood) or in inline code: the subcommand exists, each option is one that subcommand
  takes (read from the click command objects), choice and number values convert, ``--arch`` / ``--network`` name an
  installed architecture / network type;
- every config key the docs name: ``--set a.b=...``, ``--network-opt``, the options that override a key, job and
  dataset snippets in ```toml blocks, ``section.key`` and ``[section] key`` in prose: each exists in the job schema
  or in the installed plugins' options; commands and job snippets are loaded and resolved the way ``kern train``
  does before any work (types, ranges, network and timestep options); the job-file reference in docs/training.md
  shows the real defaults and names every key;
- sample prompts and prompt-file lines parse; the option tables of docs/adapters.md match the network types'
  options; ``from kern... import`` lines in Python blocks import, from the current module paths.

Each test reports every problem at once, as ``file:line: what``. The last test keeps the repository standing alone:
no text file names a path outside it.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
import shlex
import subprocess
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@functools.cache
def kernel() -> SimpleNamespace:
    """What the docs are checked against. The one place that names kernel modules: repoint it when they move."""
    from kern.core import config
    from kern.core.plugins import build_manager
    from kern.data import dataset_config, prompts
    from kern.maths.timesteps import TimestepOptions
    from kern.train.driver import prepare

    return SimpleNamespace(
        job_config=config.JobConfig,  # the [section] attrs classes
        load_job=config.load_job,  # (path, overrides) -> JobConfig, every plugin-free check
        parse_value=config.parse_value,  # a --set value as kern reads it
        prepare=prepare,  # (job, manager) -> plan: architecture, network and timestep options resolved; loads nothing
        manager=build_manager(),  # a private manager: the installed plugins, as `kern plugins` lists them
        timestep_options=TimestepOptions,
        dataset_general_keys=set(dataset_config.SHARED_KEYS),
        dataset_own_keys=set(dataset_config.DATASET_KEYS),
        dataset_deprecated=dataset_config.unprefixed_key,  # key -> the plain key it stands for, or None
        parse_prompt_line=prompts.parse_line,  # (line, where, base_prompt) -> request, UsageError naming `where`
    )


def cli() -> click.Group:
    from kern_cli.main import cli as group

    return group


# --------------------------------------------------------------------------- reading the docs


@dataclass
class Block:
    path: Path
    lang: str
    heading: str
    lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, text)


@dataclass
class Doc:
    path: Path
    blocks: list[Block]
    prose: list[tuple[int, str, str]]  # (line number, text, heading)


FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


@functools.cache
def read_doc(path: Path) -> Doc:
    blocks: list[Block] = []
    prose: list[tuple[int, str, str]] = []
    heading, block, fence = "", None, ""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        m = FENCE.match(line)
        if block is None:
            if m:
                fence, block = m.group(1), Block(path, m.group(2).lower(), heading)
                continue
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            prose.append((n, line, heading))
        elif m and line.strip() == fence[0] * len(line.strip()) and len(line.strip()) >= len(fence):
            blocks.append(block)
            block = None
        else:
            block.lines.append((n, line))
    return Doc(path, blocks, prose)


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


SHELL = {"", "bash", "sh", "shell", "console"}
INLINE_CODE = re.compile(r"`([^`]+)`")


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines with their ``\\`` continuations joined, numbered by their first line."""
    out, buf, start = [], "", None
    for n, text in lines:
        start = n if start is None else start
        if text.rstrip().endswith("\\"):
            buf += text.rstrip()[:-1] + " "
            continue
        out.append((start, buf + text))
        buf, start = "", None
    if start is not None:
        out.append((start, buf))
    return out


def kern_invocations(tokens: list[str]) -> list[list[str]]:
    """The arguments of each ``kern ...`` (or ``python -m kern_cli.main ...``) in one tokenised shell line."""
    found = []
    for i, tok in enumerate(tokens):
        if tok == "kern" or (tok == "kern_cli.main" and i and tokens[i - 1] == "-m"):
            args = []
            for t in tokens[i + 1 :]:
                if t in ("|", "||", "&&", ";"):
                    break
                args.append(t)
            found.append(args)
    return found


def doc_commands() -> list[tuple[str, list[str], bool]]:
    """(where, arguments, inline) of every kern command in the docs' shell blocks and inline code."""
    found = []
    for path in DOCS:
        doc = read_doc(path)
        for block in doc.blocks:
            if block.lang not in SHELL:
                continue
            for n, line in logical_lines(block.lines):
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError as exc:
                    found.append((where(path, n), ["<unreadable>", str(exc)], False))
                    continue
                found += [(where(path, n), args, False) for args in kern_invocations(tokens)]
        for n, line, _ in doc.prose:
            for span in INLINE_CODE.findall(line):
                try:
                    tokens = shlex.split(span)
                except ValueError:
                    continue  # prose such as `en|zh` or an apostrophe, not a command
                found += [(where(path, n), args, True) for args in kern_invocations(tokens)]
    return found


# --------------------------------------------------------------------------- the config schema


def sections() -> dict[str, type]:
    job = kernel().job_config
    attrs.resolve_types(job)
    return {f.name: f.type for f in attrs.fields(job) if attrs.has(f.type)}


def section_fields(cls: type) -> dict[str, attrs.Attribute]:
    extra = getattr(cls, "EXTRA", None)
    return {f.name: f for f in attrs.fields(cls) if f.name != extra}


def plugin_options(section: str) -> dict[str, Any]:
    """Keys a plugin or sampler brings to a section that keeps them in its ``EXTRA`` table: name -> default."""
    k = kernel()
    if section == "network":
        return {o.name: o.default for net in k.manager.networks.values() for o in net.options}
    if section == "timesteps":
        return {f.name: f.default for f in attrs.fields(k.timestep_options)}
    return {}


def key_problem(dotted: str) -> str | None:
    """Why ``dotted`` (``section.key``) is not a job config key, or None."""
    section, _, key = dotted.partition(".")
    cls = sections().get(section)
    if cls is None:
        return f"{dotted}: there is no [{section}] in a job (sections: {', '.join(sections())})"
    if key in section_fields(cls) or (getattr(cls, "EXTRA", None) and key in plugin_options(section)):
        return None
    known = sorted({*section_fields(cls), *plugin_options(section)})
    return f"{dotted}: no such config key (known in [{section}]: {', '.join(known)})"


def any_arch() -> str:
    return next(iter(kernel().manager.architectures))


def resolve_job(overrides: dict[str, Any]) -> str | None:
    """Load ``overrides`` as a job and resolve it as ``kern train`` does before any work; the error, or None."""
    from kern.errors import KernError

    k = kernel()
    overrides = dict(overrides)
    overrides.setdefault(
        "model.arch", any_arch()
    )  # only to resolve the plugin options; the docs may leave it to a file
    try:
        k.prepare(k.load_job(None, overrides), k.manager)
    except KernError as exc:
        return str(exc)
    return None


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{key}": v for s, table in data.items() if isinstance(table, dict) for key, v in table.items()}


# --------------------------------------------------------------------------- commands

HELP_NAMES = ("-h", "--help")
PLACEHOLDER = "..."


def option_table(command: click.Command) -> dict[str, click.Option]:
    return {o: p for p in command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}


def convert(param: click.Parameter, value: str) -> tuple[Any, str | None]:
    """``value`` as ``param`` reads it, and why not; paths and plain strings are taken as written."""
    if value == PLACEHOLDER or isinstance(param.type, (click.Path, click.types.StringParamType)):
        return value, None
    try:
        return param.type.convert(value, param, None), None
    except click.BadParameter as exc:
        return value, exc.message
    except Exception as exc:  # noqa: BLE001 - a type that fails outside a context still says why
        return value, str(exc)


def unbracket(args: list[str]) -> list[str]:
    """``[--dtype bfloat16] [--overwrite]``, the docs' optional parts, as plain arguments."""
    out, opened = [], False
    for a in args:
        if a.startswith("[-"):
            a, opened = a[1:], True
        if opened and a.endswith("]"):
            a, opened = a[:-1], False
        out.append(a)
    return out


def parse_args(command: click.Command, args: list[str], label: str, problems: list[str], inline: bool = False):
    """Walk ``args`` with ``command``'s options: (option values, positional arguments, the rest after a group's
    subcommand). Unknown options, missing and unconvertible values go to ``problems``; prose (``inline``) may name
    an option without its value (`kern train --config`)."""
    table = option_table(command)
    # a command that passes another program's options through (`kern import musubi`): its own options come first
    settings = command.context_settings
    passthrough = settings.get("ignore_unknown_options") and not settings.get("allow_interspersed_args", True)
    values: list[tuple[click.Option, Any]] = []
    positionals: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if not tok.startswith("-") or tok == "-" or re.fullmatch(r"-[\d.]+", tok):
            if isinstance(command, click.Group):
                return values, [tok], args[i:]
            if passthrough:
                positionals += args[i - 1 :]
                break
            positionals.append(tok)
            continue
        name, eq, attached = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        if name in HELP_NAMES:
            continue
        param = table.get(name)
        if param is None and re.fullmatch(r"-(\w)\1+", name) and getattr(table.get(name[:2]), "count", False):
            continue  # -vv
        if param is None and passthrough:
            positionals += args[i - 1 :]
            break
        if param is None:
            problems.append(f"{label}: no option {name}; it takes {', '.join(sorted(table))}")
            continue
        if param.is_flag or param.count:
            values.append((param, True))
            continue
        if eq:
            raw = attached
        elif i < len(args):
            raw, i = args[i], i + 1
        else:
            if not inline:
                problems.append(f"{label}: {name} needs a value")
            break
        value, why = convert(param, raw)
        if why:
            problems.append(f"{label}: {name} {raw}: {why}")
        values.append((param, value))
    return values, positionals, []


OVERRIDES = re.compile(r"overrides ([a-z_]+\.[a-z_]+)")


def config_overrides(values: list[tuple[click.Option, Any]], label: str, problems: list[str]) -> dict[str, Any]:
    """The config keys a command line sets: options whose help says ``(overrides section.key)``, ``--set KEY=VALUE``
    and ``--network-opt KEY=VALUE``."""
    out: dict[str, Any] = {}
    for param, value in values:
        if value == PLACEHOLDER:
            continue
        if "--set" in param.opts or "--network-opt" in param.opts:
            key, sep, raw = str(value).partition("=")
            if not sep:
                problems.append(f"{label}: {param.opts[0]} {value}: expected KEY=VALUE")
                continue
            key = key.strip() if "--set" in param.opts else f"network.{key.strip()}"
            out[key] = kernel().parse_value(raw.strip())
        elif m := OVERRIDES.search(param.help or ""):
            out[m.group(1)] = value
    return out


def check_command(args: list[str], label: str, inline: bool = False) -> list[str]:
    problems: list[str] = []
    if args[:1] == ["<unreadable>"]:
        return [f"{label}: cannot split this shell line: {args[1]}"]
    group = cli()
    _, sub, rest = parse_args(group, unbracket(args), f"{label}: kern", problems)
    if not sub or sub[0] == PLACEHOLDER:
        return problems
    command = group.commands.get(sub[0])
    if command is None:
        return problems + [f"{label}: no subcommand `kern {sub[0]}` (kern has: {', '.join(group.commands)})"]
    while isinstance(command, click.Group) and rest:  # a group of subcommands: `kern import musubi`
        _, sub, rest = parse_args(command, rest, f"{label}: kern {command.name}", problems)
        inner = command.commands.get(sub[0]) if sub else None
        if inner is None:
            return problems + [f"{label}: no subcommand {sub[:1]} of `kern {command.name}`"] if sub else problems
        command = inner
    name = f"{label}: kern {command.name}"
    values, positionals, _ = parse_args(command, rest, name, problems, inline)
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    given = [p for p in positionals if p != PLACEHOLDER]
    if len(given) > sum(10**6 if a.nargs < 0 else a.nargs for a in arguments):
        problems.append(
            f"{name}: unexpected argument(s) {given}; it takes {[a.human_readable_name for a in arguments]}"
        )
    for argument, raw in zip(arguments, positionals):
        if argument.nargs == 1:
            _, why = convert(argument, raw)
            if why:
                problems.append(f"{name}: {argument.human_readable_name} {raw}: {why}")
    manager = kernel().manager
    from kern.errors import KernError

    for param, value in values:
        if value == PLACEHOLDER or param.name not in ("arch", "network"):
            continue
        try:
            (manager.resolve_arch if param.name == "arch" else manager.resolve_network)(value)
        except KernError as exc:
            problems.append(f"{name}: --{param.name} {value}: {exc}")
    overrides = config_overrides(values, name, problems)
    bad = [p for p in map(key_problem, overrides) if p]
    problems += [f"{name}: {p}" for p in bad]
    if overrides and not bad and (why := resolve_job(overrides)):
        problems.append(f"{name}: {why}")
    return problems


def report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s) in the docs:\n  " + "\n  ".join(problems)


def test_the_docs_show_kern_commands():
    commands = doc_commands()
    names = {args[0] for _, args, _ in commands if args}
    assert {"train", "generate", "merge", "convert", "plugins"} <= names, f"the command finder found only {names}"


def test_kern_commands_in_the_docs_are_accepted():
    problems = [p for label, args, inline in doc_commands() for p in check_command(args, label, inline)]
    assert not problems, report(problems)


def test_the_command_checker_catches_drift():
    # Guard against a checker that accepts everything.
    assert check_command(["train", "--text-encoder", "te/"], "x")
    assert check_command(["train", "--set", "train.no_such_key=1"], "x")
    assert check_command(["train", "--set", "train.base_precision=fp16"], "x")
    assert check_command(["train", "--network", "lora", "--network-opt", "ranks=4"], "x")
    assert check_command(["convert", "a.safetensors", "--to", "onnx"], "x")
    assert check_command(["generate", "--arch", "no-such-model"], "x")
    assert check_command(["frobnicate"], "x")
    assert not check_command(
        [
            "-vv",
            "train",
            "--arch",
            "flux2",
            "--network",
            "loha",
            "--network-opt",
            "rank=8",
            "--set",
            "train.blocks_to_swap=4",
            "--steps",
            "10",
        ],
        "x",
    )


def test_a_missing_model_file_names_options_the_commands_have():
    """An architecture asked for a part whose file is not set says what to set, per command; every option it names
    is one that command takes (`kern train` has no --text-encoder) and every key is a config key."""
    import torch
    from kern.errors import KernError

    k = kernel()
    problems, checked = [], 0
    for arch in k.manager.architectures.values():
        for part in arch.required_files:
            try:
                k.manager.hook.load_model(
                    arch=arch.name, variant=None, part=part, path=None, dtype=torch.float32, device="cpu", options={}
                )
            except KernError as exc:
                message = str(exc)
            else:
                problems.append(f"{arch.name} {part}: loading without a file raised nothing")
                continue
            checked += 1
            label = f"{arch.name} {part}: {message!r}"
            if "kern train" not in message:
                problems.append(f"{label}: does not say how to set it for kern train")
            for segment in re.split(r"[;()]", message):
                for command in re.findall(r"kern (\w+)", segment):
                    options = option_table(cli().commands[command])
                    problems += [
                        f"{label}: kern {command} has no {o}"
                        for o in re.findall(r"(?<![\w-])--[\w-]+", segment)
                        if o not in options
                    ]
            problems += [f"{label}: {why}" for key in re.findall(r"\bmodel\.\w+", message) if (why := key_problem(key))]
    assert checked, "no architecture requires a model file"
    assert not problems, report(problems)


# --------------------------------------------------------------------------- TOML snippets

HEADER = re.compile(r"^\s*\[\[?\s*([\w.-]+)\s*\]\]?")
KEY_LINE = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def toml_keys(block: Block) -> list[tuple[int, str, str]]:
    """(line, table, key) of each key line of a TOML block; ``table`` is "" before the first header."""
    out, table = [], ""
    for n, text in block.lines:
        if m := HEADER.match(text):
            table = m.group(1)
        elif m := KEY_LINE.match(text):
            out.append((n, table, m.group(1)))
    return out


def toml_blocks() -> list[tuple[Block, dict[str, Any] | None, str | None]]:
    out = []
    for path in DOCS:
        for block in read_doc(path).blocks:
            if block.lang == "toml":
                try:
                    out.append((block, tomllib.loads("\n".join(t for _, t in block.lines)), None))
                except tomllib.TOMLDecodeError as exc:
                    out.append((block, None, str(exc)))
    return out


def kind_of(data: dict[str, Any]) -> str:
    if {"project", "build-system", "tool"} & set(data):
        return "pyproject"
    if {"general", "datasets"} & set(data):
        return "dataset"
    return "job"


def default_of(section: str, key: str, data: dict[str, Any]) -> Any:
    cls = sections()[section]
    fields = section_fields(cls)
    if key in fields:
        d = fields[key].default
        return d.factory() if isinstance(d, attrs.Factory) else d
    if section == "network":
        net = kernel().manager.resolve_network(data.get("network", {}).get("type", "lora"))
        return {o.name: o.default for o in net.options}.get(key)
    return plugin_options(section).get(key)


def check_job_block(block: Block, data: dict[str, Any]) -> list[str]:
    problems = []
    lines = {}
    for n, table, key in toml_keys(block):
        lines[f"{table}.{key}"] = n
        if not table:
            problems.append(
                f"{where(block.path, n)}: {key} stands outside a [section]; a job file has no top-level keys"
            )
        elif why := key_problem(f"{table}.{key}"):
            problems.append(f"{where(block.path, n)}: {why}")
    first = where(block.path, block.lines[0][0] if block.lines else 0)
    if problems:
        return problems
    if why := resolve_job(flatten(data)):
        problems.append(f"{first}: this job snippet is refused: {why}")
    for i, prompt in enumerate(data.get("sample", {}).get("prompts", [])):
        try:
            kernel().parse_prompt_line(prompt, f"sample.prompts[{i}]", "")
        except Exception as exc:  # noqa: BLE001 - UsageError, named with the snippet's line
            problems.append(f"{where(block.path, lines.get('sample.prompts', 0))}: {exc}")
    if "job file" in block.heading.lower():  # the reference: every key, with its default
        for dotted, value in flatten(data).items():
            default = default_of(*dotted.split("."), data)
            if default is not None and value != default:
                problems.append(
                    f"{where(block.path, lines[dotted])}: {dotted} = {value!r} is shown as the default, "
                    f"but the default is {default!r}"
                )
        text = "\n".join(t for _, t in block.lines)
        names = [f"{s}.{f}" for s, cls in sections().items() for f in section_fields(cls)]
        names += [f"timesteps.{f}" for f in plugin_options("timesteps")]
        missing = [d for d in names if not re.search(rf"\b{d.split('.')[1]}\b", text)]
        if missing:
            problems.append(f"{first}: the job-file reference does not name {missing}")
    return problems


def check_dataset_block(block: Block) -> list[str]:
    k = kernel()
    problems = []
    for n, table, key in toml_keys(block):
        every = k.dataset_general_keys | k.dataset_own_keys
        allowed = {"general": k.dataset_general_keys, "datasets": every, "validation.datasets": every}.get(table)
        if allowed is None:
            problems.append(
                f"{where(block.path, n)}: [{table}] is not a dataset config table ([general], [[datasets]])"
            )
        elif k.dataset_deprecated(key):
            problems.append(
                f"{where(block.path, n)}: {key} is deprecated (kern warns); use {k.dataset_deprecated(key)}"
            )
        elif key not in allowed:
            problems.append(f"{where(block.path, n)}: no dataset key {key} in [{table}]")
    return problems


def test_toml_snippets_are_valid_configs():
    problems, kinds = [], set()
    for block, data, error in toml_blocks():
        if data is None:
            problems.append(f"{where(block.path, block.lines[0][0])}: not valid TOML: {error}")
            continue
        kind = kind_of(data)
        kinds.add(kind)
        if kind == "job":
            problems += check_job_block(block, data)
        elif kind == "dataset":
            problems += check_dataset_block(block)
    assert {"job", "dataset"} <= kinds, f"found only {kinds} snippets"
    assert not problems, report(problems)


def test_the_example_jobs_load():
    problems = []
    for path in sorted((ROOT / "examples").rglob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        if kind_of(data) != "job":
            continue
        from kern.errors import KernError

        k = kernel()
        try:
            k.prepare(k.load_job(path), k.manager)
        except KernError as exc:
            problems.append(f"{path.relative_to(ROOT)}: {exc}")
    assert not problems, report(problems)


# --------------------------------------------------------------------------- prose


NOT_KEYS = {"toml", "py", "md", "json", "jsonl", "safetensors", "png", "txt", "yaml", "yml", "pt"}


def prose_key_problems() -> list[str]:
    """``section.key``, ``[section] key`` and ``key = value`` in the docs' prose."""
    k = kernel()
    names = "|".join(sections())
    dotted = re.compile(rf"(?<![\w./\\-])({names})\.([a-z_][a-z0-9_]*)(?![\w(/-])(?!\.\S)")  # keys are lower case
    table_key = re.compile(rf"`\[({names})\]\s+([a-z_]\w*)")
    assignment = re.compile(r"^([a-z_][a-z0-9_]*)\s*=\s*\S")
    every_key = {f for cls in sections().values() for f in section_fields(cls)}
    every_key |= set(plugin_options("network")) | set(plugin_options("timesteps"))
    every_key |= k.dataset_general_keys | k.dataset_own_keys
    problems = []
    for path in DOCS:
        for n, line, _ in read_doc(path).prose:
            for section, key in dotted.findall(line) + table_key.findall(line):
                if key not in NOT_KEYS and (why := key_problem(f"{section}.{key}")):
                    problems.append(f"{where(path, n)}: {why}")
            for span in INLINE_CODE.findall(line):
                if (m := assignment.match(span)) is None:
                    continue
                key = m.group(1)
                if k.dataset_deprecated(key):
                    problems.append(
                        f"{where(path, n)}: `{span}`: {key} is a deprecated dataset key (kern warns); "
                        f"use {k.dataset_deprecated(key)}"
                    )
                elif key not in every_key and (near := difflib.get_close_matches(key, every_key, 1, 0.85)):
                    # prose also writes maths and keyword arguments this way; flag only what looks like a misspelt key
                    problems.append(f"{where(path, n)}: `{span}`: no key {key}; did you mean {near[0]}?")
    return problems


def test_config_keys_named_in_prose_exist():
    problems = prose_key_problems()
    assert not problems, report(problems)


def test_network_option_tables_match_the_plugins():
    """docs/adapters.md has a table per network type (a heading `lora`); its first column is the type's options."""
    problems, seen = [], set()
    for path in DOCS:
        rows: dict[str, dict[str, int]] = {}
        for n, line, heading in read_doc(path).prose:
            m = re.fullmatch(r"`([\w-]+)`", heading)
            if m and m.group(1) in kernel().manager.networks and (row := re.match(r"^\|\s*`(\w+)`\s*\|", line)):
                rows.setdefault(m.group(1), {})[row.group(1)] = n
        for name, documented in rows.items():
            seen.add(name)
            real = {o.name for o in kernel().manager.networks[name].options}
            problems += [
                f"{where(path, n)}: `{name}` has no option {o}" for o, n in documented.items() if o not in real
            ]
            first = min(documented.values())
            problems += [
                f"{where(path, first)}: the `{name}` table lacks the option {o}" for o in sorted(real - set(documented))
            ]
    assert seen, "no network option table found"
    assert not problems, report(problems)


def test_timestep_methods_listed_exist():
    """The methods docs/training.md lists under "Timestep methods" sample with some installed architecture."""
    options = set(plugin_options("timesteps"))
    problems, methods = [], []
    for path in DOCS:
        lines = [(n, line) for n, line, heading in read_doc(path).prose if heading.lower() == "timestep methods"][1:]
        while lines and not lines[0][1].strip():
            lines.pop(0)
        paragraph = []
        for n, line in lines:
            if not line.strip():
                break
            paragraph.append(line)
        sentence = re.split(r"\.\s", " ".join(paragraph))[0]  # the list is the section's first sentence
        methods += [
            (lines[0][0], path, s)
            for s in INLINE_CODE.findall(sentence)
            if re.fullmatch(r"[a-z]\w*", s) and s not in options
        ]
    for n, path, method in methods:
        if all(resolve_job({"model.arch": a, "timesteps.method": method}) for a in kernel().manager.architectures):
            problems.append(f"{where(path, n)}: no installed architecture samples the timestep method {method!r}")
    assert len(methods) >= 5, f"found only {methods}"
    assert not problems, report(problems)


# --------------------------------------------------------------------------- prompt lines and Python snippets


def test_prompt_lines_in_the_docs_parse():
    """A ```text block is a prompt file; `> ...` lines in a shell block are interactive prompt lines."""
    problems, count = [], 0
    parse = kernel().parse_prompt_line
    for path in DOCS:
        for block in read_doc(path).blocks:
            lines = block.lines if block.lang == "text" else []
            if block.lang in SHELL:
                lines = [
                    (n, t[2:]) for n, t in block.lines if t.startswith("> ") and t[2:].strip() not in ("exit", "quit")
                ]
            for n, text in lines:
                count += 1
                try:
                    request = parse(text, where(path, n), "base prompt")
                except Exception as exc:  # noqa: BLE001 - the parser's UsageError names the line
                    problems.append(str(exc))
                    continue
                if request is not None and re.search(r"\s#", request.prompt):
                    problems.append(
                        f"{where(path, n)}: '#' here is part of the prompt, not a comment: {request.prompt!r}"
                    )
    assert count, "no prompt lines found"
    assert not problems, report(problems)


IMPORT = re.compile(r"^\s*(?:from\s+(kern[\w.]*)\s+import\s+\(?([\w\s,]+)\)?|import\s+(kern[\w.]*))\s*(?:#.*)?$")


def test_kern_imports_in_python_snippets_resolve():
    problems, count = [], 0
    for path in DOCS:
        for block in read_doc(path).blocks:
            if block.lang != "python":
                continue
            for n, text in block.lines:
                if (m := IMPORT.match(text)) is None:
                    continue
                count += 1
                module_name = m.group(1) or m.group(3)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        module = importlib.import_module(module_name)
                    except ImportError as exc:
                        problems.append(f"{where(path, n)}: {exc}")
                        continue
                old = [
                    str(w.message)
                    for w in caught
                    if issubclass(w.category, DeprecationWarning) and module_name in str(w.message)
                ]
                if old:
                    problems.append(f"{where(path, n)}: an old module path: {old[0]}")
                for name in (s.split(" as ")[0].strip() for s in (m.group(2) or "").split(",")):
                    if name and not hasattr(module, name):
                        try:
                            importlib.import_module(f"{module_name}.{name}")
                        except ImportError:
                            problems.append(f"{where(path, n)}: {module_name} has no {name}")
    assert count, "no kern imports found in Python snippets"
    assert not problems, report(problems)


# --------------------------------------------------------------------------- the repository stands alone

OUTSIDE = re.compile(r"/work/|(?<![\w.-])(?:\.\./)*shared/")


def repo_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_file_refers_to_a_path_outside_the_repository():
    problems, checked = [], 0
    for path in repo_text_files():
        if path == Path(__file__).resolve() or not path.is_file():  # this file spells the patterns out
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        checked += 1
        for n, line in enumerate(text.splitlines(), start=1):
            if m := OUTSIDE.search(line):
                problems.append(
                    f"{where(path, n)}: refers outside the repository ({m.group(0)!r}): {line.strip()[:120]}"
                )
    assert checked > 50, f"only {checked} text files found"
    assert not problems, (
        report(problems) + "\n(state what the file relies on inside the repository, e.g. bench/ANCHOR.md)"
    )


def test_the_checkers_catch_what_they_are_for():
    # Guards against checks that silently accept everything.
    assert key_problem("train.no_such_key") and key_problem("nosection.key") and key_problem("network.ranks")
    assert not key_problem("train.blocks_to_swap") and not key_problem("network.rank")
    assert not key_problem("timesteps.logit_mean") and not key_problem("sample.prompts")
    assert resolve_job({"train.base_precision": "fp16"}) and not resolve_job({"train.base_precision": "fp8"})
    for text in ("see /work/shared/bench/x.py", "../shared/reference/flux2.md", "(`shared/bench/anchor.py`)"):
        assert OUTSIDE.search(text), text
    for text in ("the shared deterministic order", "kern-shared/x", "examples/accelerate/sharded_base.toml"):
        assert not OUTSIDE.search(text), text
