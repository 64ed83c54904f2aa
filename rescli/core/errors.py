"""The one error type library code raises; the CLI turns it into a message and an exit code."""

from __future__ import annotations


class RescliError(Exception):
    """A failure the user can act on. ``str(err)`` is the one-line message shown to them."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(RescliError):
    """Bad options or arguments: exit status 2, like Click's own usage errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def first_line(exc: BaseException, limit: int | None = 160) -> str:
    """A third-party exception as a fragment of a one-line message: its first line, cut at ``limit``, or its
    type name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
