"""What library code says while it works: messages and progress, as events for whoever listens.

Library code never prints. It calls ``info`` and ``warn`` for messages and ``progress`` for work that counts
up (an epoch's steps, images checked), and the caller decides how to show them: the CLI subscribes one
renderer for the length of a command (rich, on stderr; one progress display for every command), a
notebook or a test can subscribe its own. With nobody subscribed, messages go to the ``rescli`` logger
and progress is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["info", "warning", "progress"]


@dataclass(frozen=True)
class Event:
    kind: Kind
    message: str = ""
    task: str = ""  # progress: what is being counted ("epoch 3/5", "lr-find", "checking images")
    done: int = 0
    total: int | None = None
    finished: bool = False  # progress: the task ended (its display can go)
    fields: dict[str, float] = field(default_factory=dict)  # progress: figures to show beside it ({"loss": 0.41})


Listener = Callable[[Event], None]

_listeners: list[Listener] = []
_lock = threading.Lock()
_muted = 0  # distributed runs: processes other than rank 0 say nothing (rank 0 speaks for all)
_log = logging.getLogger("rescli")


def emit(event: Event) -> None:
    if _muted:
        return
    with _lock:
        listeners = list(_listeners)
    if listeners:
        for listener in listeners:
            listener(event)
    elif event.kind != "progress":
        _log.log(logging.WARNING if event.kind == "warning" else logging.INFO, event.message)


def info(message: str) -> None:
    emit(Event("info", message))


def warn(message: str) -> None:
    emit(Event("warning", message))


def progress(task: str, done: int, total: int | None = None, *, finished: bool = False, **fields: float) -> None:
    emit(Event("progress", task=task, done=done, total=total, finished=finished, fields=fields))


@contextlib.contextmanager
def counting(task: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Progress of one task: yields ``advance(**fields)``, one call per unit done; says when the task ends."""
    done = 0
    progress(task, 0, total)

    def advance(**fields: float) -> None:
        nonlocal done
        done += 1
        # Straight to an Event: a figure named like one of progress()'s own parameters stays a figure.
        emit(Event("progress", task=task, done=done, total=total, fields=fields))

    try:
        yield advance
    finally:
        progress(task, done, total, finished=True)


@contextlib.contextmanager
def subscribed(listener: Listener) -> Iterator[None]:
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def set_muted(muted: bool) -> None:
    """Mute (or unmute) every event in this process: a distributed run's processes other than rank 0."""
    global _muted
    _muted = max(0, _muted + (1 if muted else -1))
