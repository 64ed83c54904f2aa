"""Checking every image of a folder once, in parallel threads, with the results cached outside the folder.

A file whose size, times and inode are unchanged since its last check is not decoded again. The cache
lives in the user's cache folder (never in the data folder), keyed by the data folder's absolute path."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from typing import Callable

import PIL
from PIL import Image

from rescli.core.cpus import available_cpus
from rescli.core.events import warn
from rescli.core.fileio import atomic_write_text
from rescli.data.files import fs_name
from rescli.data.images import ImageInfo, check_image

_CACHE_VERSION = 2  # 2: entries are keyed on inode and ctime too


def _cache_stamp() -> dict:
    # Results depend on the decoder and on the pixel limit, not only on the file: a change to either invalidates all.
    return {"version": _CACHE_VERSION, "pillow": PIL.__version__, "max_image_pixels": Image.MAX_IMAGE_PIXELS}


def _read_cache(cache_file: str | os.PathLike) -> dict:
    try:
        with open(cache_file, encoding="utf-8") as fh:
            doc = json.load(fh)
        if all(doc.get(k) == v for k, v in _cache_stamp().items()) and isinstance(doc.get("entries"), dict):
            return doc["entries"]
    except (OSError, ValueError, AttributeError):  # missing, unreadable or corrupt: start afresh
        pass
    return {}


def _stat_key(st: os.stat_result) -> dict[str, int]:
    """What must be unchanged for a cached result to stand. Size and mtime miss a chmod (and a file replaced by one
    with the same size and mtime, as ``cp -p`` or rsync leave it); the inode number and ctime change then too."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _from_cache(entry: object, name: str, st: os.stat_result) -> ImageInfo | None:
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in _stat_key(st).items()):
        return None
    try:
        info = ImageInfo(name, entry["ok"], entry["error"], entry["width"], entry["height"], entry["sha1"])
    except (KeyError, TypeError):
        return None
    types_ok = isinstance(info.ok, bool) and isinstance(info.width, int) and isinstance(info.height, int)
    return info if types_ok and isinstance(info.sha1, str) and info.sha1 else None


def _write_cache(cache_file: str | os.PathLike, entries: dict) -> None:
    target = pathlib.Path(cache_file)
    try:
        # ensure_ascii: file names that are not UTF-8 are kept as \udcNN escapes, which json.load gives back exactly.
        atomic_write_text(target, json.dumps({**_cache_stamp(), "entries": entries}, ensure_ascii=True),
                          undecodable="json")
    except OSError as exc:  # a cache we cannot write only costs time next run
        warn(f"could not write image check cache {target}: {exc.strerror or exc}")


def check_images(
    paths: Sequence[str | os.PathLike],
    *,
    workers: int | None = None,
    cache_file: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, ImageInfo]:
    """check_image() for many files in parallel, reusing cached results for files whose stat is unchanged (_stat_key).

    Returns {path as given (str): ImageInfo} in input order. ``progress(n)`` is called from this thread.
    """
    names = list(dict.fromkeys(fs_name(p) for p in paths))
    cached = _read_cache(cache_file) if cache_file is not None else {}
    stats: dict[str, tuple[str, os.stat_result]] = {}  # name -> (cache key, stat taken before checking)
    results: dict[str, ImageInfo] = {}
    todo: list[str] = []
    for name in names:
        try:
            st = os.stat(name)
        except OSError:
            todo.append(name)  # check_image reports why
            continue
        key = os.path.abspath(name)
        stats[name] = (key, st)
        hit = _from_cache(cached.get(key), name, st)
        if hit:
            results[name] = hit
        else:
            todo.append(name)
    if progress and results:
        progress(len(results))
    try:
        _check_uncached(todo, results, workers=max(1, workers or available_cpus()), progress=progress)
    finally:
        if cache_file is not None:  # also after an interrupt, so finished work is not redone
            _write_cache(cache_file, _cache_entries(results, stats))
    return {name: results[name] for name in names}


def _check_uncached(
    names: list[str], results: dict[str, ImageInfo], *, workers: int, progress: Callable[[int], None] | None
) -> None:
    """check_image() of each of ``names`` into ``results``, as they finish."""
    if workers == 1 or len(names) <= 1:
        for name in names:
            results[name] = check_image(name)
            if progress:
                progress(1)
        return
    # Threads, not processes: Pillow's decoders, conversions and hashlib release the GIL, so threads scale like
    # forked processes without their pickling and start-up cost or fork-with-threads hazards, and spawned processes
    # are slower than checking serially (the figures are in docs/performance.md).
    with ThreadPoolExecutor(workers, thread_name_prefix="rescli-check") as pool:
        futures = {pool.submit(check_image, name): name for name in names}
        try:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if progress:
                    progress(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, drop the queue; finish the few running


def _cache_entries(results: dict[str, ImageInfo], stats: dict[str, tuple[str, os.stat_result]]) -> dict:
    """The cache's entries for ``results``: each keyed by absolute path, with the stat it was checked under."""
    return {
        stats[name][0]: {**_stat_key(stats[name][1]), **{k: v for k, v in asdict(info).items() if k != "path"}}
        for name, info in results.items()
        if name in stats and info.sha1  # unreadable files (permissions, I/O errors) may be fine next time
    }


def default_cache_dir() -> pathlib.Path:
    explicit = os.environ.get("RESCLI_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says relative values are to be ignored
        return pathlib.Path(xdg) / "rescli"
    return pathlib.Path.home() / ".cache" / "rescli"


def cache_file_for(root: str | os.PathLike) -> pathlib.Path:
    """Where check results for the data folder ``root`` are cached: outside it, keyed by its absolute path."""
    key = hashlib.sha1(os.fsencode(os.path.abspath(os.fspath(root)))).hexdigest()[:16]
    return default_cache_dir() / "checks" / f"{key}.json"
