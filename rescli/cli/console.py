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


class EventRenderer:
    """What the library says, on stderr: info as it is, warnings as ``warning: …``, and progress as one rich
    display of bars (only when stderr is a terminal: logs get the library's own one-line summaries instead)."""

    def __init__(self) -> None:
        self._progress = None
        self._tasks: dict[str, object] = {}

    def __call__(self, event) -> None:
        if event.kind == "info":
            self._stop_bars()
            info(event.message)
        elif event.kind == "warning":
            self._stop_bars()
            warn(event.message)
        elif err.is_terminal:
            self._show(event)

    def _show(self, event) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[figures]}"), TimeRemainingColumn(), console=err,
                                      transient=True)
            self._progress.start()
        figures = "  ".join(f"{k} {v:.4f}" for k, v in event.fields.items())
        task = self._tasks.get(event.task)
        if task is None:
            task = self._tasks[event.task] = self._progress.add_task(event.task, total=event.total, figures=figures)
        self._progress.update(task, completed=event.done, total=event.total, figures=figures)
        if event.finished:
            self._progress.remove_task(task)
            del self._tasks[event.task]
            if not self._tasks:
                self._stop_bars()

    def _stop_bars(self) -> None:
        if self._progress is not None and not self._tasks:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self._tasks.clear()
        self._stop_bars()
