"""Interrupts: SIGINT/SIGTERM during training set a flag (the step finishes, last.pt is saved); outside
the loop they raise, so the tail of a run stops cleanly and stays resumable."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rescli.core import events
from rescli.core.errors import RescliError


class Interrupted(RescliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=130)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves, then stops. A second Ctrl-C kills."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signal_name is not None:  # asked twice: stop now
                signal.signal(signum, signal.SIG_DFL)
                raise KeyboardInterrupt
            self.signal_name = signal.Signals(signum).name
            events.warn(f"{self.signal_name}: finishing this step and saving last.pt (press again to abort at once)")

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def check(self) -> bool:
        """Asked once after every optimiser step: stop here?"""
        return bool(self)


@contextmanager
def interrupt_raises() -> Iterator[None]:
    """SIGTERM, like Ctrl-C, raises KeyboardInterrupt inside the block (outside the training loop's StopFlag)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
