"""Write docs/cli.md, the CLI reference, from the Typer app's own commands, help texts and options.

    python scripts/cli_reference.py            # (re)write docs/cli.md
    python scripts/cli_reference.py --check    # exit 1, with one line on stderr, when docs/cli.md is stale

The page is built from the click objects behind `rescli.cli.app` (usage, help, epilog, and each
argument's and option's help and default), never from rendered `--help` output, so it does not
depend on the terminal's width or colours: the same code always gives the same bytes.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "cli.md"
REGENERATE = "python scripts/cli_reference.py"

# click's type names (typer < 0.29 used click itself) and the Python annotations typer >= 0.29 keeps instead.
_TYPE_NAMES = {"integer": "INTEGER", "float": "FLOAT", "text": "TEXT", "path": "PATH", "boolean": "BOOLEAN"}
_ANNOTATION_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH", bool: "BOOLEAN"}


def render(app: Any = None) -> str:
    """The whole page as markdown, for the Typer app `app` (default: rescli's)."""
    if app is None:
        if str(ROOT) not in sys.path:  # document this checkout's code, not some other installed rescli
            sys.path.insert(0, str(ROOT))
        from rescli.cli.app import app
    import typer.main

    group = typer.main.get_command(app)
    root_ctx = group.context_class(group, info_name="rescli", **group.context_settings)
    commands = []
    for name in group.list_commands(root_ctx) if hasattr(group, "list_commands") else []:
        command = group.get_command(root_ctx, name)
        if command is not None and not command.hidden:
            ctx = command.context_class(command, info_name=name, parent=root_ctx, **command.context_settings)
            commands.append((name, command, ctx))

    lines = [
        f"<!-- Generated from rescli.cli.app by scripts/cli_reference.py: do not edit by hand; run {REGENERATE}. -->",
        "",
        "# CLI reference",
        "",
        "Every command, argument and option, with its help text and default, exactly as `--help` gives them.",
        "",
    ]
    if commands:
        lines += ["| command | what it does |", "|---|---|"]
        lines += [f"| [`rescli {name}`](#{_anchor('rescli ' + name)}) | {_cell(_first_paragraph(command.help))} |"
                  for name, command, _ in commands]
        lines.append("")
    lines += _section("rescli", group, root_ctx, is_group=bool(commands))
    for name, command, ctx in commands:
        lines += _section(f"rescli {name}", command, ctx, is_group=False)
    return "\n".join(lines).rstrip("\n") + "\n"


def _section(path: str, command: Any, ctx: Any, *, is_group: bool) -> list[str]:
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    arguments = [p for p in params if not _is_option(p)]
    options = [p for p in params if _is_option(p)]
    usage = [path] + (["[OPTIONS]"] if options else []) + [_argument_usage(p) for p in arguments]
    if is_group:
        usage.append("COMMAND [ARGS]...")
    lines = [f"## {path}", "", "```", " ".join(usage), "```", ""]
    for text in (command.help, command.epilog):
        if text:
            lines += [inspect.cleandoc(text), ""]
    if arguments:
        lines += ["**Arguments**", "", "| argument | value | default | help |", "|---|---|---|---|"]
        lines += [_row(f"`{_metavar(p)}`", p) for p in arguments]
        lines.append("")
    if options:
        lines += ["**Options**", "", "| option | value | default | help |", "|---|---|---|---|"]
        lines += [_row(_option_names(p), p) for p in options]
        lines.append("")
    return lines


def _row(names: str, param: Any) -> str:
    cells = [names, _cell(_value_kind(param)), _cell(_default(param)), _cell(getattr(param, "help", None))]
    return "| " + " | ".join(cells) + " |"


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", None) == "option" or any(o.startswith("-") for o in param.opts)


def _metavar(param: Any) -> str:
    return param.metavar or param.name.upper()


def _argument_usage(param: Any) -> str:
    text = _metavar(param) + ("..." if param.nargs == -1 else "")
    return text if param.required else f"[{text}]"


def _option_names(param: Any) -> str:
    names = ", ".join(f"`{o}`" for o in _long_first(param.opts))
    if param.secondary_opts:
        names += " / " + ", ".join(f"`{o}`" for o in _long_first(param.secondary_opts))
    return names


def _long_first(opts: list[str]) -> list[str]:
    return sorted(opts, key=lambda o: not o.startswith("--"))  # stable: keeps the declared order otherwise


def _value_kind(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    choices = _choices(param)
    kind = "|".join(choices) if choices else _type_name(param)
    if param.nargs == -1:
        return f"{kind}..."
    if getattr(param, "multiple", False):
        return f"{kind} (repeatable)"
    return kind


def _choices(param: Any) -> list[str]:
    choices = getattr(getattr(param, "type", None), "choices", None)
    if choices is None:
        annotation = _annotation(param)
        if isinstance(annotation, type) and issubclass(annotation, Enum):
            choices = [member.value for member in annotation]
    return [str(c.value if isinstance(c, Enum) else c) for c in choices or []]


def _type_name(param: Any) -> str:
    name = getattr(getattr(param, "type", None), "name", None)
    if name is not None:
        return _TYPE_NAMES.get(name, name.upper())
    annotation = _annotation(param)
    if annotation is None:
        return ""
    return _ANNOTATION_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)).upper())


def _annotation(param: Any) -> Any:
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if typing.get_origin(annotation) in (list, tuple):  # List[str] for a repeatable option: its element type
        args = typing.get_args(annotation)
        annotation = args[0] if args else None
    return annotation


def _default(param: Any) -> str:
    if param.required:
        return "required"
    show = getattr(param, "show_default", None)
    if isinstance(show, str):  # click's custom default text
        return show
    if show is False:
        return ""
    value = param.default
    if getattr(param, "is_flag", False) and param.secondary_opts:
        return f"`{_long_first(param.opts if value else param.secondary_opts)[0]}`"
    if callable(value) or value is None or value is False or (isinstance(value, (list, tuple)) and not value):
        return ""
    if isinstance(value, Enum):
        value = value.value
    return f"`{value}`"


def _first_paragraph(text: str | None) -> str:
    return " ".join(inspect.cleandoc(text or "").split("\n\n")[0].split())


def _anchor(heading: str) -> str:
    """The id Python-Markdown's toc gives a heading made of words, spaces and hyphens."""
    return "-".join(heading.lower().split())


def _cell(text: str | None) -> str:
    """Help text as one markdown table cell: same meaning, nothing that ends the cell or opens an HTML tag."""
    return " ".join((text or "").split()).replace("|", "\\|").replace("<", "&lt;")


def check(page: Path = PAGE) -> str | None:
    """None when `page` holds exactly what render() gives now, else the one-line reason it does not."""
    try:
        current = page.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{_shown(page)} is missing: run {REGENERATE} to write it"
    if current != render():
        return f"{_shown(page)} is stale (a command's help, options or defaults changed): run {REGENERATE}, commit it"
    return None


def write(page: Path = PAGE) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from rescli.core.fileio import atomic_write_text

    atomic_write_text(page, render())


def _shown(page: Path) -> str:
    try:
        return str(page.resolve().relative_to(ROOT))
    except ValueError:
        return str(page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or check) the CLI reference page from rescli's own commands.")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when the page is stale")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page [default: docs/cli.md]")
    args = parser.parse_args(argv)
    if args.check:
        problem = check(args.page)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        return 0
    write(args.page)
    print(f"wrote {_shown(args.page)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
