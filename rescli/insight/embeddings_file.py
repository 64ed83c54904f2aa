"""Embedding files, by their suffix: ``.npy`` (float32 [N, D]) beside a paths file (``<stem>.paths.txt``, one path a
line, in row order: it also works as an @LIST input), ``.parquet`` (path, vector) or ``.jsonl`` (one
``{"path", "vector"}`` a line). Each is written row group by row group, so memory does not grow with N, through a
temp file renamed at the end; ``<file>.meta.json`` beside it says which model made it, so `similar` compares
vectors of one model only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from rescli.core.errors import RescliError, UsageError
from rescli.core.fileio import atomic_path, atomic_write_json, json_escapes

SUFFIXES = (".npy", ".parquet", ".jsonl")

FORMAT = "rescli-embeddings"

PARQUET_MISSING = "parquet embeddings need pyarrow: pip install 'rescli[parquet]'"

#: The .npy header is written last, when N is known, into this many bytes reserved at the start.
NPY_HEADER_BYTES = 128


def check_embeddings_path(path: str | os.PathLike) -> Path:
    out = Path(path).expanduser()
    if out.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--output {out}: name it .npy, .parquet or .jsonl (the format follows the suffix)")
    if out.suffix.lower() == ".parquet":
        _pyarrow()
    return out


def paths_file(path: Path) -> Path:
    return path.with_name(path.stem + ".paths.txt")


def meta_file(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def embeddings_meta(*, model: str, fingerprint: str, arch: Any, normalised: bool) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": 1, "model": model, "model_fingerprint": fingerprint, "arch": arch,
            "normalised": normalised, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


class EmbeddingsWriter:
    """``with EmbeddingsWriter(path, meta) as w: w.add(paths, vectors)`` ... ; the files appear when it ends well."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.path = check_embeddings_path(path)
        self.kind = self.path.suffix.lower()[1:]
        self.meta = dict(meta)
        self.rows = 0
        self.dim: int | None = None
        self._stack = contextlib.ExitStack()
        self._parquet: Any = None

    def __enter__(self) -> EmbeddingsWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._main: IO[Any] = self._stack.enter_context(open(tmp, "wb" if self.kind != "jsonl" else "w",
                                                             encoding=None if self.kind != "jsonl" else "utf-8"))
        if self.kind == "npy":
            self._main.write(b"\0" * NPY_HEADER_BYTES)
            paths_tmp = self._stack.enter_context(atomic_path(paths_file(self.path)))
            self._paths: IO[bytes] = self._stack.enter_context(open(paths_tmp, "wb"))
        return self

    def add(self, paths: Sequence[str], vectors: np.ndarray) -> list[dict[str, Any]]:
        """Write these rows; returns error rows for the paths this format cannot hold (a newline in a .paths.txt)."""
        errors: list[dict[str, Any]] = []
        if self.kind == "npy" and any("\n" in p for p in paths):
            keep = [i for i, p in enumerate(paths) if "\n" not in p]
            errors = [{"path": p, "error": "its name holds a newline, which a .paths.txt cannot hold; write .jsonl or "
                                            ".parquet instead"} for p in paths if "\n" in p]
            paths, vectors = [paths[i] for i in keep], vectors[keep]
        if not len(paths):
            return errors
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if self.kind == "npy":
            self._main.write(vectors.tobytes())
            self._paths.write(b"".join(os.fsencode(p) + b"\n" for p in paths))
        elif self.kind == "jsonl":
            self._main.write("".join(json_escapes(json.dumps({"path": p, "vector": v.tolist()}, ensure_ascii=False))
                                     + "\n" for p, v in zip(paths, vectors)))
        else:
            self._parquet_rows(paths, vectors)
        self.rows += len(paths)
        return errors

    def _parquet_rows(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        pa, pq = _pyarrow()
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        table = pa.table({"path": pa.array(list(paths), type=pa.string()),
                          "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._main, table.schema)
        self._parquet.write_table(table)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._stack.__exit__(exc_type, exc, tb)

    def _finish(self) -> None:
        if self.kind == "npy":
            self._main.seek(0)
            self._main.write(npy_header(self.rows, self.dim or 0))
        elif self.kind == "parquet" and self._parquet is not None:
            self._parquet.close()
        atomic_write_json(meta_file(self.path), {**self.meta, "count": self.rows, "dim": self.dim})


def npy_header(rows: int, dim: int) -> bytes:
    """A version 1.0 .npy header for float32 [rows, dim], padded to NPY_HEADER_BYTES."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body = text.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin-1")


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(paths, float32 vectors [N, D], metadata or {}) of an embeddings file written by `rescli embed`."""
    src = Path(path).expanduser()
    suffix = src.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"{src}: not an embeddings file (.npy, .parquet or .jsonl)")
    if not src.is_file():
        raise UsageError(f"{src}: no such embeddings file")
    try:
        paths, vectors = {".npy": _read_npy, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[suffix](src)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RescliError(f"{src}: not a readable embeddings file ({type(exc).__name__}: {exc})") from None
    if vectors.ndim != 2 or len(paths) != len(vectors):
        raise RescliError(f"{src}: {len(paths)} paths for {len(vectors)} vectors; write it again with rescli embed")
    return paths, vectors.astype(np.float32, copy=False), _read_meta(src)


def _read_npy(src: Path) -> tuple[list[str], np.ndarray]:
    listing = paths_file(src)
    if not listing.is_file():
        raise UsageError(f"{src}: its paths file {listing} is missing (embed writes both)")
    vectors = np.load(src, allow_pickle=False)
    with open(listing, "rb") as f:
        paths = [os.fsdecode(line.rstrip(b"\n")) for line in f]
    return paths, vectors


def _read_jsonl(src: Path) -> tuple[list[str], np.ndarray]:
    paths, rows = [], []
    with open(src, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                paths.append(str(obj["path"]))
                rows.append(obj["vector"])
    return paths, np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)


def _read_parquet(src: Path) -> tuple[list[str], np.ndarray]:
    _, pq = _pyarrow()
    table = pq.read_table(src, columns=["path", "vector"])
    paths = [str(p) for p in table.column("path").to_pylist()]
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return paths, np.asarray(flat, dtype=np.float32).reshape(len(paths), -1)


def _read_meta(src: Path) -> dict[str, Any]:
    try:
        with open(meta_file(src), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else {}


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RescliError(PARQUET_MISSING) from None
    return pa, pq
