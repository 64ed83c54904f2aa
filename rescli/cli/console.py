"""Where the CLI's words go: results on stdout; messages and the one progress line on stderr.

Commands print results with ``out`` (or ``print_json``) and speak to the person watching with ``info``,
``warn`` and ``error``. Library code never prints: it emits ``rescli.core.events``, and ``EventRenderer``
shows those the same way. Whatever is being counted (an epoch's steps, images checked, images predicted)
shows on one status line at the foot of stderr, which every message clears before it prints and redraws
after, so the two never garble each other.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.control import Control
from rich.markup import escape
from rich.segment import ControlType
from rich.text import Text

from rescli.core.events import Event

# Results hold the user's own strings (paths, class names): never read as markup or emoji codes, so
# "exp[v2]/best.pt", a class "[bold]x" or a folder "run[/]m" print as they are.
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)

err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # one message, one line: greppable logs


def info(message: str) -> None:
    with status.cleared():
        err.print(message, markup=False, highlight=False)


def warn(message: str) -> None:
    with status.cleared():
        err.print(f"[yellow]warning:[/] {escape(message)}")


def error(message: str) -> None:
    with status.cleared():
        err.print(f"error: {message}", markup=False, highlight=False)


def print_json(obj: Any) -> None:
    """``obj`` as indented JSON on stdout; arrays (numpy, torch) as lists, anything else unknown as its text."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


@dataclass
class _Count:
    """One task being counted, as the status line last heard of it."""

    total: int | None
    done: int
    fields: dict[str, float]
    started: float  # when it was first heard of: its speed counts from there
    done_at_start: int
    drawn: bool = False


class StatusLine:
    """The one progress display: a single line at the foot of stderr, redrawn in place.

    It shows the task updated last: ``epoch 2/5 ━━━━━━━━━━━━━━━━━━━━ 37/120, loss 0.4100, 0:12 left`` when the
    total is known, ``340 images, 2 failed, 85/s`` when it is not. Figures (floats) read ``name value``; counts
    (ints) read ``value name``. Only on a terminal: in a log, a line redrawn with carriage returns is noise, and
    the library says what matters there in messages of its own.
    """

    def __init__(self, *, redraw_every: float = 0.1, bar_width: int = 20) -> None:
        self.redraw_every = redraw_every  # seconds: faster redraws cost time and nobody reads them
        self.bar_width = bar_width
        self._tasks: dict[str, _Count] = {}  # in the order last updated: the last one is shown
        self._shown = False
        self._last_drawn = -math.inf
        self._lock = threading.RLock()  # library warnings may come from decode threads

    def update(self, task: str, done: int, total: int | None = None, *, finished: bool = False,
               fields: dict[str, float] | None = None) -> None:
        if not err.is_terminal:
            return
        with self._lock:
            now = time.monotonic()
            count = self._tasks.pop(task, None)
            if finished:
                self._erase()
                if self._tasks:
                    self._draw(now)
                return
            if count is None:
                count = _Count(total=total, done=done, fields={}, started=now, done_at_start=done)
            count.done, count.total, count.fields = done, total, dict(fields or {})
            self._tasks[task] = count
            if not count.drawn or now - self._last_drawn >= self.redraw_every:
                self._draw(now)

    @contextlib.contextmanager
    def cleared(self) -> Iterator[None]:
        """The line out of the way for a message, and back under it afterwards."""
        with self._lock:
            shown = self._shown
            self._erase()
            try:
                yield
            finally:
                if shown and self._tasks:
                    self._draw(time.monotonic())

    def reset(self) -> None:
        """Forget every task and erase the line (a command ended, whether its tasks said so or not)."""
        with self._lock:
            self._tasks.clear()
            self._erase()

    def _draw(self, now: float) -> None:
        name, count = next(reversed(self._tasks.items()))
        line = _describe(name, count, now, bar_width=self.bar_width)
        line.truncate(max(10, err.width - 1))  # a line that wraps can no longer be redrawn in place
        with err:  # one write: the line never shows half drawn
            err.control(Control(ControlType.CARRIAGE_RETURN))
            err.print(line, end="")
            err.control(Control((ControlType.ERASE_IN_LINE, 0)))  # whatever a longer line left behind
        count.drawn, self._shown, self._last_drawn = True, True, now

    def _erase(self) -> None:
        if self._shown:
            err.control(Control(ControlType.CARRIAGE_RETURN, (ControlType.ERASE_IN_LINE, 2)))
            self._shown = False


def _describe(name: str, count: _Count, now: float, *, bar_width: int) -> Text:
    elapsed = now - count.started
    counted = count.done - count.done_at_start
    speed = counted / elapsed if counted > 0 and elapsed > 0 else None
    if count.total:
        line = Text(f"{name} ")
        filled = round(bar_width * min(count.done, count.total) / count.total)
        line.append("━" * filled, style="bar.complete")
        line.append("━" * (bar_width - filled), style="bar.back")
        line.append(f" {count.done}/{count.total}")
    else:
        line = Text(f"{count.done} {name}")
    for key, value in count.fields.items():
        line.append(f", {value} {key}" if isinstance(value, int) else f", {key} {value:.4f}")
    if speed and count.total:
        line.append(f", {_duration(max(0, count.total - count.done) / speed)} left")
    elif speed:
        line.append(f", {speed:.0f}/s")
    return line


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


status = StatusLine()


class EventRenderer:
    """What the library says, shown as the CLI's own words are: messages through ``info``/``warn``, progress on
    the status line."""

    def __call__(self, event: Event) -> None:
        if event.kind == "info":
            info(event.message)
        elif event.kind == "warning":
            warn(event.message)
        else:
            status.update(event.task, event.done, event.total, finished=event.finished, fields=event.fields)

    def close(self) -> None:
        status.reset()
