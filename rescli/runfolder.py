"""Run folders: where a run's files go, who may write there, and what a kill left behind.

A run folder is written by one process at a time: ``RunFolderLock`` holds an exclusive ``flock`` on the
folder itself (no lock file to leave behind; the kernel drops the lock when the process dies, even on
SIGKILL). Under the lock, temp files that an earlier, killed writer left (``fileio``'s
``.<name>.<hex>.tmp``) are removed: nobody else can be writing them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rescli.errors import RescliError, UsageError

#: What fileio.atomic_path names its temp files: ``.<target name>.<12 hex digits>.tmp``.
STALE_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
#: Files a run (finetune, evaluate, degradation) writes into its folder; a folder holding others is not ours.
RUN_FILE_MARKERS = ("run.json", "last.pt", "best.pt", "degradation.json")


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (links resolved)."""
    try:
        Path(path).expanduser().resolve().relative_to(Path(folder).expanduser().resolve())
        return True
    except ValueError:
        return False


def refuse_inside_data(output: str | os.PathLike, data_dir: str | os.PathLike, *, what: str) -> None:
    """UsageError when ``output`` would lie inside the data folder: rescli never writes there, and a later scan
    would take the run's files (plots, checkpoints) for a new class."""
    if inside(output, data_dir):
        raise UsageError(
            f"{what} {output} lies inside the data folder {data_dir}; rescli never writes there. "
            "Run from outside the data folder, or pass --output DIR outside it"
        )


def new_run_dir(base: str | os.PathLike = "runs") -> Path:
    """runs/run1, runs/run2, …: mkdir is atomic, so two runs started together never share a folder."""
    base = Path(base)
    _mkdir(base, parents=True, exist_ok=True)
    taken = [int(p.name[3:]) for p in base.glob("run*") if p.name[3:].isdigit()]
    n = max(taken, default=0) + 1
    while True:
        candidate = base / f"run{n}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
        except OSError as exc:
            raise _cannot_create(candidate, exc) from None


def _mkdir(path: Path, **kwargs: bool) -> None:
    try:
        path.mkdir(**kwargs)
    except FileExistsError:
        raise UsageError(f"{path}: exists and is not a folder") from None
    except OSError as exc:
        raise _cannot_create(path, exc) from None


def _cannot_create(path: Path, exc: OSError) -> RescliError:
    return RescliError(f"cannot create run folder {path}: {exc.strerror or exc}; choose a writable place with --output DIR")


def check_output_dir(out: Path) -> None:
    """An existing --output folder must be empty, or hold only what an earlier, killed writer left behind."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a folder")
    if any((out / name).exists() for name in RUN_FILE_MARKERS) or any(out.glob("*.pt")):
        raise UsageError(f"--output {out}: already holds a run; choose a new folder, or continue it with --resume {out}")
    others = sorted(p.name for p in out.iterdir() if not STALE_TEMP.match(p.name))
    if others:
        shown = ", ".join(others[:3]) + (f" (+{len(others) - 3} more)" if len(others) > 3 else "")
        raise UsageError(f"--output {out}: not empty (holds {shown}); choose a new or empty folder")


class RunFolderLock:
    """An exclusive lock on a run folder for as long as one run writes it; a second writer is refused at once."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the checks on the folder's contents still apply
            return self
        try:
            fd = os.open(self.folder, os.O_RDONLY)
        except OSError as exc:
            raise RescliError(f"cannot open run folder {self.folder}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RescliError(
                f"{self.folder} is being written by another rescli process; wait for it to finish, "
                "or choose another --output"
            ) from None
        self._fd = fd
        remove_stale_temps(self.folder)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temps(folder: Path) -> list[str]:
    """Delete the temp files a killed atomic write left in ``folder`` (call only while holding its lock)."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        if STALE_TEMP.match(path.name) and path.is_file():
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
    return removed


def open_new_run(output: str | os.PathLike | None, *, data_dir: str | os.PathLike) -> tuple[Path, RunFolderLock]:
    """The folder of a new run, locked: --output (new, or empty), else the next runs/runN; never inside ``data_dir``.

    The contents are checked after the lock is taken, so a run that finished between a check and the lock is seen.
    """
    if output is None:
        refuse_inside_data(Path("runs"), data_dir, what="the run folder")
        out = new_run_dir()
    else:
        out = Path(output).expanduser()
        refuse_inside_data(out, data_dir, what="--output")
        check_output_dir(out)  # before mkdir: a usage error creates nothing
        _mkdir(out, parents=True, exist_ok=True)
    lock = RunFolderLock(out).acquire()
    try:
        check_output_dir(out)
    except RescliError:
        lock.release()
        raise
    return out, lock
