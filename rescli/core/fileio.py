"""Atomic file writes (no torch import, so plots and reports can use it cheaply).

Everything rescli writes goes to a temp file beside the target, is fsynced, then renamed
over it: a kill at any moment leaves the old file or the new one, never half of one.

File names need not be UTF-8: Python holds the bytes that are not as lone surrogates (U+DC80-U+DCFF,
``os.fsdecode``'s "surrogateescape"), which strict UTF-8 cannot encode. Text files handle them by kind:
path lists and CSV get the original bytes back (a name in them still names the file, as ``find`` prints it);
HTML, XML and SVG must be valid UTF-8, so there such a byte is shown as ``\\xNN``; JSON stays ASCII with
``\\udcNN`` escapes (valid JSON, and ``json.loads`` + ``os.fsencode`` give the bytes back).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rescli.core.errors import RescliError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path beside ``path``; when the block succeeds it replaces ``path`` in one rename.

    An OSError (a full disk, a read-only folder) names ``path``, not the temp file. A target that exists and is
    not a regular file (``/dev/null``, a FIFO, a folder) is refused: the rename would replace it.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise RescliError(f"{path}: exists and is not a regular file; choose a file name", exit_code=2)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
            try:
                # 0o666 & ~umask, like any file the user creates (mkstemp would make it 0600).
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None or tmp is None or os.fspath(exc.filename) == os.fspath(tmp):
            raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


UNDECODABLE = ("auto", "raw", "escape", "json")


_ESCAPED_SUFFIXES = {".html": "escape", ".htm": "escape", ".xhtml": "escape", ".xml": "escape", ".svg": "escape",
                     ".json": "json"}


_SURROGATE = re.compile("[\ud800-\udfff]")


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def shown_name(text: str) -> str:
    """A name as people should see it: each byte that is not UTF-8 as ``\\xNN`` (``notes\\xff.txt``)."""
    return _ESCAPED_BYTE.sub(lambda m: f"\\x{ord(m[0]) - 0xDC00:02x}", text)


def json_escapes(text: str) -> str:
    """JSON text with each lone surrogate (a non-UTF-8 byte of a file name) spelled ``\\udcNN``: valid UTF-8 JSON."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def encode_text(text: str, *, undecodable: str = "raw") -> bytes:
    """``text`` as UTF-8, whatever file names it holds; ``undecodable`` says what becomes of their non-UTF-8 bytes.

    "raw": the original bytes; "escape": the text ``\\xNN`` (valid UTF-8); "json": ``\\udcNN``, which is how a JSON
    string spells that character. A surrogate no file name can produce (from a JSON input, say) is ``\\uXXXX`` in all.
    """
    if undecodable not in UNDECODABLE[1:]:
        raise ValueError(f"undecodable={undecodable!r}: expected one of {', '.join(UNDECODABLE[1:])}")
    try:
        return text.encode("utf-8")  # the common case: no surrogates, one pass
    except UnicodeEncodeError:
        pass
    if undecodable == "raw":
        text = _SURROGATE.sub(lambda m: m[0] if _ESCAPED_BYTE.fullmatch(m[0]) else f"\\u{ord(m[0]):04x}", text)
        return text.encode("utf-8", "surrogateescape")
    if undecodable == "escape":
        text = shown_name(text)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text).encode("utf-8")


def atomic_write_text(path: str | os.PathLike, text: str, *, undecodable: str = "auto") -> None:
    """Write ``text`` as UTF-8. ``undecodable`` (see encode_text) is, with "auto", chosen by the suffix of ``path``:
    "escape" for .html/.htm/.xhtml/.xml/.svg, "json" for .json, else "raw" (path lists, CSV, TSV, logs)."""
    if undecodable == "auto":
        undecodable = _ESCAPED_SUFFIXES.get(Path(path).suffix.lower(), "raw")
    atomic_write_bytes(path, encode_text(text, undecodable=undecodable))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    # ensure_ascii: any name, UTF-8 or not, becomes \uXXXX escapes, so the file is plain ASCII whatever it holds.
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=True, default=json_default) + "\n",
                      undecodable="json")


def json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, tensors
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
