"""Two consoles: results go to stdout, everything meant for a person watching goes to stderr."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

# Results hold the user's own strings (paths, class names): never read as markup or emoji codes, so
# "exp[v2]/best.pt", a class "[bold]x" or a folder "run[/]m" print as they are.
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # one message, one line: greppable logs


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}")


def info(message: str) -> None:
    err.print(message, markup=False, highlight=False)
