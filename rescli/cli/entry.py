"""How a command ends: every outcome becomes one line on stderr (or none) and an exit status.

0 ok; 1 failure (or some inputs failed); 2 usage error; 130 interrupted (Ctrl-C, SIGTERM); 141 the reader of
stdout went away (``| head``). stdout is guarded for the length of a command, so that a write failing
anywhere (rich, csv, json) ends the command cleanly instead of with a traceback or a message at exit.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import typer

import rescli.cli.console as console
from rescli.core import events
from rescli.core.errors import RescliError


class QuietExit(RescliError):
    """Exit with a status whose message was already shown (by the processes a launcher started)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("", exit_code=exit_code)


class PipeClosed(RescliError):
    """The reader of stdout went away (`| head`); not an error worth a message."""

    def __init__(self) -> None:
        super().__init__("", exit_code=141)  # 128 + SIGPIPE, what a shell reports for `cat big | head`


class StdoutFailed(RescliError):
    """Writing results failed (a full disk behind `> file`, an I/O error): one line, exit 1."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write the results to stdout: {exc.strerror or exc}")


def run(app: typer.Typer) -> None:
    """Run the command on sys.argv and exit with its status."""
    try:
        _run_guarded(app)
    except SystemExit as exc:  # under `finetune --gpus N`, rank 0 leaves its status for the launcher
        if os.environ.get("RESCLI_LAUNCH_STATUS_FILE"):  # (checked first: no torch import on every exit)
            from rescli.train.launch import record_exit_status

            record_exit_status(exc.code)
        raise


def _run_guarded(app: typer.Typer) -> None:
    if sys.stdout is None:  # started with stdout closed (`>&-`): results would vanish without a word
        console.err.print(
            "error: stdout is closed, and rescli writes its results there; redirect it instead "
            "(> FILE, or > /dev/null to discard them)", markup=False)
        sys.exit(1)
    stdout = sys.stdout
    if hasattr(stdout, "reconfigure"):  # a file name that is not UTF-8 is printed as its bytes, as ls prints it
        stdout.reconfigure(errors="surrogateescape")
    sys.stdout = GuardedStdout(stdout)
    try:
        with _sigterm_interrupts():
            _run_app(app)
    finally:
        sys.stdout = stdout


class GuardedStdout:
    """sys.stdout for the length of a command: every failed write or flush, whoever makes it (rich, csv, json),
    becomes PipeClosed (the reader went away) or StdoutFailed, instead of a traceback or a message at exit."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise PipeClosed() from None
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise PipeClosed() from None
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _run_app(app: typer.Typer) -> NoReturn:
    try:
        code = _call(app)
    except PipeClosed as exc:
        _exit_pipe_closed(exc)
    except RescliError as exc:
        _exit_with_error(exc)
    except KeyboardInterrupt:
        _exit_interrupted()
    except OSError as exc:  # a file the library did not expect to fail (a full disk, a read-only folder): one line
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
        console.error(f"{where}{exc.strerror or exc}")
        sys.exit(1)
    except Exception as exc:
        # Typer vendors click; its exceptions are recognised by shape rather than by an import.
        if type(exc).__name__ == "Abort":
            _exit_interrupted()
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def _call(app: typer.Typer) -> Any:
    """The command's own exit status, with the library's events shown on stderr while it runs."""
    # standalone_mode=False hands typer.Exit(code) back as a return value instead of exiting. Typer also turns
    # a KeyboardInterrupt into Exit(130) there, before any handler of ours sees it: 130 can only mean that.
    renderer = console.EventRenderer()
    try:
        with events.subscribed(renderer):
            code = app(standalone_mode=False)
    finally:
        renderer.close()
    if code == 130:
        console.err.print("interrupted", markup=False)
    sys.stdout.flush()  # a buffered `> file` fails here, if at all, while it can still be said well
    return code


def _exit_pipe_closed(exc: PipeClosed) -> NoReturn:
    _silence_stdout()
    if threading.active_count() > 1 and _stdout_is_real_fd():
        # Decode threads may still be inside native code; a normal interpreter teardown under them can
        # abort ("terminate called without an active exception", exit 134). Nothing is left to flush.
        sys.stderr.flush()
        os._exit(exc.exit_code)
    sys.exit(exc.exit_code)


def _exit_with_error(exc: RescliError) -> NoReturn:
    if isinstance(exc, StdoutFailed):
        _silence_stdout()  # the interpreter flushes stdout once more at exit: let that find somewhere to go
    rank = _torchrun_rank()
    if not exc.message:
        pass
    elif rank == 0:
        console.error(exc.message)
    elif not getattr(exc, "shared", False) and exc.exit_code != 2:  # rank 0 shows the errors all ranks share
        console.err.print(f"error (rank {rank}): {exc.message}", markup=False, highlight=False)
    sys.exit(exc.exit_code)


def _exit_interrupted() -> NoReturn:
    console.err.print("interrupted", markup=False)
    sys.exit(130)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (kill, a scheduler ending a job) stops rescli like Ctrl-C does: cleanly, files intact, exit 130."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _torchrun_rank() -> int:
    """This process's rank when torchrun started it (0 otherwise); read from the environment, no torch import."""
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except (KeyError, ValueError):
        return 0


def _stdout_is_real_fd() -> bool:
    try:
        sys.stdout.fileno()
        return True
    except (OSError, ValueError):  # replaced by an in-memory stream (tests, embedding)
        return False


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot raise.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
