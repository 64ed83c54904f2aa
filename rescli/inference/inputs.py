"""Prediction inputs to paths: files, folders (recursive), quoted globs, '-' (paths on stdin) and @LIST
files, expanded lazily and in order; any file name survives (bytes, surrogate escapes)."""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from rescli.core.errors import RescliError, UsageError
from rescli.data.images import (
    ImageError,
    is_clutter,
    is_hidden,
    load_rgb,
    looks_like_image,
    not_regular_reason,
    plain_jpeg_bytes,
    special_file,
)

GLOB_CHARS = set("*?[")


class BadInput(str):
    """An input that names no image (a pattern matching nothing, a folder without images): becomes an error row."""

    reason: str

    def __new__(cls, value: str, reason: str) -> BadInput:
        obj = super().__new__(cls, value)
        obj.reason = reason
        return obj


def _is_list_file(item: str) -> bool:
    return item.startswith("@") and len(item) > 1 and not os.path.exists(item)


def check_inputs(inputs: Sequence[str]) -> None:
    """Usage errors found before any result is written: '-' twice, a list file that cannot be read."""
    if not inputs:
        raise UsageError("no inputs: give image files, folders, quoted globs, '-' (paths on stdin) or @LIST")
    if list(inputs).count("-") > 1:
        raise UsageError("'-' (paths on stdin) can be given only once")
    for item in inputs:
        if _is_list_file(item):
            try:
                with open(Path(item[1:]).expanduser(), "rb"):
                    pass
            except OSError as exc:
                raise UsageError(f"{item}: cannot read list file ({exc.strerror or exc})") from None


def iter_input_paths(
    inputs: Sequence[str], *, stdin: IO | None = None, null_separated: bool = False
) -> Iterator[str]:
    """Expand files, folders (recursive), quoted globs, '-' (paths on stdin) and '@list.txt', lazily, in order.

    Paths on stdin and in list files are one per line, or NUL-separated with ``null_separated``; they are
    read as bytes and decoded like the OS decodes file names, so any file name survives.
    """
    for item in inputs:
        if item == "-":
            yield from _read_paths(stdin if stdin is not None else sys.stdin, null_separated=null_separated)
        elif _is_list_file(item):
            list_file = Path(item[1:]).expanduser()
            try:
                with open(list_file, "rb") as f:
                    yield from _read_paths(f, null_separated=null_separated)
            except OSError as exc:
                raise UsageError(f"{item}: cannot read list file ({exc.strerror or exc})") from None
        elif os.path.isdir(item):
            yield from _folder(item)
        elif not os.path.exists(item) and GLOB_CHARS & set(item):
            matches = sorted(glob.iglob(os.path.expanduser(item), recursive=True))
            if not matches:
                yield BadInput(item, "no file matches this pattern")
            for m in matches:
                if os.path.isdir(m):
                    yield from _images_under(Path(m))
                else:
                    yield m
        else:
            yield item


def _folder(item: str) -> Iterator[str]:
    found = False
    for path in _images_under(Path(item)):
        found = True
        yield path
    if not found:
        yield BadInput(item, "no images found in this folder")


def _read_paths(stream: IO, *, null_separated: bool) -> Iterator[str]:
    raw = getattr(stream, "buffer", stream)  # bytes when we can: file names need not be UTF-8
    read = getattr(raw, "read1", None) or raw.read  # read1: take what has arrived, do not wait for a full chunk
    # The unfinished item is kept as a list of the chunks it spans and joined once, when its separator comes: only
    # each new chunk is searched, so one 32 MB line costs one pass, not a re-split of all of it per 64 KB chunk.
    pending: list = []
    first = True
    while True:
        chunk = read(65536)
        if not chunk:
            break
        sep = ("\0" if null_separated else "\n") if isinstance(chunk, str) else (b"\0" if null_separated else b"\n")
        *items, rest = chunk.split(sep)
        if items:
            items[0] = chunk[:0].join([*pending, items[0]])
            pending = []
        if rest:
            pending.append(rest)
        for item in items:
            path = _clean_path(item, null_separated=null_separated, first=first)
            first = False
            if path:
                yield path
    if pending:
        path = _clean_path(pending[0][:0].join(pending), null_separated=null_separated, first=first)
        if path:
            yield path


def _clean_path(item: bytes | str, *, null_separated: bool, first: bool) -> str | None:
    path = os.fsdecode(item) if isinstance(item, bytes) else item
    if first and path.startswith("\ufeff"):  # a byte-order mark from Windows editors
        path = path[1:]
    if not null_separated:
        path = path.rstrip("\r\n")
        if not path.strip():
            return None
    return path or None


def _images_under(folder: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d) and not is_clutter(d))
        for name in sorted(filenames):
            if is_hidden(name) or is_clutter(name):
                continue
            path = os.path.join(dirpath, name)
            kind = special_file(path)
            if kind:  # a FIFO would hang whoever opened it: named in an error row, never read
                yield BadInput(path, not_regular_reason(kind))
            elif looks_like_image(path):  # by content or extension: a zero-byte photo.jpg becomes an error row
                yield path


def load_input(path: str, transform, draft_size: int, *, jpeg_bytes: bool = False) -> tuple[str, Any, str | None]:
    """(path, uint8 tensor, None) or (path, None, why it failed); never raises.

    With ``jpeg_bytes``, a plain JPEG comes back undecoded, as (path, bytearray, None), for the GPU to decode.
    """
    if isinstance(path, BadInput):
        return str(path), None, path.reason
    if jpeg_bytes:
        raw = plain_jpeg_bytes(path)
        if raw is not None:
            return path, raw, None
    try:
        return path, transform(load_rgb(path, draft_size=draft_size)), None
    except Exception as exc:  # never let one odd file stop a pipeline over thousands
        return path, None, load_failure(exc)


def load_failure(exc: Exception) -> str:
    """Why an input could not be loaded, as its error row says it: the image's own reason, rescli's message, or
    the type and text of anything else."""
    if isinstance(exc, ImageError):
        return exc.reason
    if isinstance(exc, RescliError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
