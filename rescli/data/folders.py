"""Reading a folder of class folders: which files are images of which class, what is ignored and why, and which
folders hold no image. Links are followed once; no image counts twice, or in two classes.

Nothing here decodes a pixel (whether an image really decodes is checked later, ``checks``) or writes anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rescli.core.errors import RescliError
from rescli.data.files import is_clutter, is_hidden, special_file
from rescli.data.formats import looks_like_image


@dataclass
class ClassFolderScan:
    """What one directory of class folders holds."""

    root: Path
    files: dict[str, list[Path]]  # class name -> image files (by content or extension, not yet decoded), sorted
    ignored: list[Path] = field(default_factory=list)  # non-images, hidden things, loose files (never clutter)
    empty: list[str] = field(default_factory=list)  # sub-folders without a single image
    reasons: dict[Path, str] = field(default_factory=dict)  # ignored path -> why, where why_ignored cannot tell


def _walk_files(
    folder: Path, ignored: list[Path], reasons: dict[Path, str], *, class_roots: dict[str, str] | None = None
) -> Iterable[Path]:
    """Files under ``folder``, sorted, following links once. Clutter is skipped silently; hidden things go to
    ``ignored``. ``class_roots`` maps the real paths of all class folders to their names: a link that leads into
    another class's folder is named as ignored instead of read, so no image counts twice (and in two classes).
    """
    seen: set[str] = set()
    roots = class_roots or {}

    def unreadable(exc: OSError) -> None:  # a folder we may not list would otherwise vanish without a word
        if exc.filename:
            ignored.append(Path(exc.filename))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or two links to one folder: read it once
            dirnames[:] = []
            continue
        seen.add(real)
        owner = _class_holding(real, roots)
        if owner is not None and owner != folder.name:
            dirnames[:] = []
            ignored.append(Path(dirpath))
            reasons[Path(dirpath)] = f"link into class folder {owner} (its images count once, in {owner})"
            continue
        keep = []
        for d in sorted(dirnames):
            if is_clutter(d):  # .git, __MACOSX, .ipynb_checkpoints, @eaDir: never data, never worth a line
                continue
            if is_hidden(d):
                ignored.append(Path(dirpath) / d)  # a hidden folder someone made: named, not read
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_clutter(name):
                continue
            if is_hidden(name):
                ignored.append(path)
                continue
            yield path


def _class_holding(real: str, class_roots: dict[str, str]) -> str | None:
    """The name of the class whose folder (a real path in ``class_roots``) is ``real`` or holds it, if any."""
    for root, name in class_roots.items():
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return name
    return None


def scan_class_folders(root: Path) -> ClassFolderScan:
    """Sort what is under ``root`` into class folders of images, ignored files, and folders without images.

    A file counts as an image when its content or its extension says so (``formats.looks_like_image``); whether it
    really decodes is checked later, so a zero-byte ``.jpg`` ends up reported as broken rather than ignored. Only
    regular files are images: a FIFO, device or socket is named as ignored and never opened (reading a FIFO waits
    forever). A class folder that is a link to another one, or a link inside one leading into another, is named as
    ignored: each image is counted once, in the class whose folder really holds it.
    """
    scan = ClassFolderScan(root=root, files={})
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise RescliError(f"{root}: cannot read folder ({exc.strerror or exc})") from None
    folders: list[Path] = []
    for entry in entries:
        if is_clutter(entry.name):
            continue
        if is_hidden(entry.name) or not entry.is_dir():
            # Loose files beside the class folders belong to no class; hidden folders are nobody's class.
            scan.ignored.append(entry)
            continue
        folders.append(entry)
    class_roots: dict[str, str] = {}  # real path -> class name
    classes: list[Path] = []
    for entry in sorted(folders, key=lambda e: e.is_symlink()):  # real folders first: a link never displaces its target
        real = os.path.realpath(entry)
        owner = _class_holding(real, class_roots)
        if owner is not None:
            scan.ignored.append(entry)
            scan.reasons[entry] = f"link to class folder {owner} (its images count once, in {owner})"
            continue
        class_roots[real] = entry.name
        classes.append(entry)
    for entry in sorted(classes):
        walked = _walk_files(entry, scan.ignored, scan.reasons, class_roots=class_roots)
        images = [p for p in walked if _is_image_file(p, scan.ignored, scan.reasons)]
        if images:
            scan.files[entry.name] = images
        else:
            scan.empty.append(entry.name)
    return scan


def _is_image_file(path: Path, ignored: list[Path], reasons: dict[Path, str]) -> bool:
    kind = special_file(path)
    if kind:
        ignored.append(path)
        reasons[path] = f"{kind}, not a regular file"
        return False
    if looks_like_image(path):
        return True
    ignored.append(path)
    return False


def why_ignored(path: Path, class_roots: set[Path]) -> str:
    """Why ``path`` (from a scan's ignored list) is not used, in a few words for skipped.txt and `rescli dataset`."""
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        return "cannot read folder"
    if is_hidden(path.name):
        return "hidden folder" if path.is_dir() else "hidden file"
    if path.parent in class_roots:
        return "not inside a class folder"
    if not any(root in path.parents for root in class_roots):  # beside train/ and val/ in a split layout
        return "outside train/val/test"
    return "not an image"
