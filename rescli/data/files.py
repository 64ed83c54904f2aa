"""What a path in a data folder is, before any pixel is decoded: a regular file, or something never to be read
(a FIFO, a device, a socket); hidden; or clutter that operating systems and tools leave behind.

The standard library only (no Pillow, no torch), so listing a folder stays cheap to import.
"""

from __future__ import annotations

import errno
import io
import os
import pathlib
import stat

# Lower-cased names that operating systems, file managers, photo tools and editors leave behind.
CLUTTER_NAMES = frozenset(
    {
        ".ds_store", ".localized", "icon\r", ".directory", ".apdisk", ".appledouble", ".lsoverride",
        "__macosx", ".spotlight-v100", ".trashes", ".fseventsd", ".temporaryitems", ".documentrevisions-v100",
        "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "$recycle.bin", "system volume information",
        ".picasa.ini", "picasa.ini", ".picasaoriginals", "@eadir", ".@__thumb", ".thumbnails", ".nomedia",
        ".ipynb_checkpoints", "__pycache__", ".git", ".svn", ".hg", "lost+found",
    }
)


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def fs_name(path: str | os.PathLike) -> str:
    return os.fsdecode(os.fspath(path))


def special_kind(mode: int) -> str | None:
    """What a file that is neither a regular file nor a folder is ("a named pipe (FIFO)", ...); None for those two."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "not a regular file")


def special_file(path: str | os.PathLike) -> str | None:
    """special_kind of what ``path`` names (links followed); None for a regular file, a folder, or nothing at all."""
    try:
        return special_kind(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


def not_regular_reason(kind: str) -> str:
    return f"not a regular file but {kind}; only regular files are read as images"


class NotRegular(OSError):
    """Raised by open_regular for a FIFO, device or socket, which it never reads."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """``open(path, "rb")`` for regular files only: reading a FIFO waits for a writer forever (and a device may never
    end), so anything else raises NotRegular without a byte read. The stat before the open keeps devices unopened;
    the non-blocking open and the fstat after it close the gap in which the name could be swapped for a FIFO."""
    kind = special_file(path)
    if kind:
        raise NotRegular(kind)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), fs_name(path))
        kind = special_kind(mode)
        if kind:
            raise NotRegular(kind)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_hidden(path: str | os.PathLike) -> bool:
    return pathlib.PurePath(fs_name(path)).name.startswith(".")


def is_clutter(path: str | os.PathLike) -> bool:
    """Files and folders left by OSes and tools; skipped without a report because nobody put them there on purpose."""
    name = pathlib.PurePath(fs_name(path)).name
    return name.lower() in CLUTTER_NAMES or name.startswith("._")
