"""From a folder on disk to a DatasetIndex: layouts, classes, clutter, checks, the split.

Two layouts are understood:
  DATA/<class>/<images>                      -> a seeded, stratified validation split is made in memory
  DATA/train/<class>/… + DATA/val|valid|validation/<class>/… (+ optional DATA/test/<class>/…)
Nothing is ever copied, moved or written into DATA."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from rescli.core.errors import RescliError, UsageError
from rescli.core.events import warn
from rescli.core.fileio import shown_name
from rescli.data.checks import cache_file_for, check_images
from rescli.data.images import (
    ImageInfo,
    is_clutter,
    is_hidden,
    looks_like_image,
    special_file,
)

SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


@dataclass
class ClassFolderScan:
    """What one directory of class folders holds."""

    root: Path
    files: dict[str, list[Path]]  # class name -> image files (by content or extension, not yet decoded), sorted
    ignored: list[Path] = field(default_factory=list)  # non-images, hidden things, loose files (never clutter)
    empty: list[str] = field(default_factory=list)  # sub-folders without a single image
    reasons: dict[Path, str] = field(default_factory=dict)  # ignored path -> why, where _why_ignored cannot tell


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

    A file counts as an image when its content or its extension says so (``images.looks_like_image``); whether it
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


def find_split_folders(root: Path) -> dict[str, Path]:
    """Map train/val/test to the sub-folders of ``root`` named like them (any case)."""
    found: dict[str, Path] = {}
    try:
        children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    except OSError:
        return found
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in children:
                found[split] = children[alias]
                break
    return found


def split_layout_folders(root: Path) -> dict[str, Path]:
    """find_split_folders, or {} where ``root`` is not a split root: its train/ holds images but no class folders,
    so it is a class named "train" (pictures of trains, say), beside the others."""
    found = find_split_folders(root)
    if "train" in found and not _holds_folders(found["train"]):
        return {}
    return found


def _holds_folders(folder: Path) -> bool:
    try:
        return any(p.is_dir() and not is_clutter(p.name) and not is_hidden(p.name) for p in folder.iterdir())
    except OSError:
        return False


@dataclass
class DatasetIndex:
    """Everything known about a data folder: classes, samples per split, and what was left out."""

    root: Path
    layout: str  # "class-folders" | "split-folders"
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(absolute path, class index)]
    ignored: list[str] = field(default_factory=list)  # relative POSIX paths
    ignored_reasons: dict[str, str] = field(default_factory=dict)  # relative path -> why it is not used
    empty_classes: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # relative path -> reason
    infos: dict[str, ImageInfo] = field(default_factory=dict)  # absolute path -> check result
    split_files: dict[str, dict[str, list[Path]]] = field(default_factory=dict)  # split -> class -> files
    split_roots: dict[str, Path] = field(default_factory=dict)  # split -> the folder holding its class folders
    warnings: list[str] = field(default_factory=list)  # what may mislead: a class no validation image measures

    def rel(self, path: str | Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def counts(self, split: str) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for _, label in self.splits.get(split, []):
            out[self.classes[label]] += 1
        return out


def scan_dataset(
    root: str | os.PathLike,
    *,
    val_split: float = 0.2,
    seed: int = 0,
    check: bool = True,
    strict: bool = False,
    cache: bool = True,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetIndex:
    root = Path(root).expanduser()
    if not root.exists():
        raise UsageError(f"{root}: no such folder")
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder (expected a folder with one sub-folder per class)")
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"--val-split {val_split}: expected a fraction in [0, 1)")

    split_dirs = split_layout_folders(root)
    if "train" in split_dirs:
        layout = "split-folders"
        scans = {split: scan_class_folders(path) for split, path in split_dirs.items()}
    else:
        layout = "class-folders"
        scans = {"train": scan_class_folders(root)}

    index = DatasetIndex(root=root, layout=layout, classes=[], splits={})
    ignored: list[Path] = []
    reasons: dict[Path, str] = {}
    if layout == "split-folders":  # whatever sits beside train/ and val/ is in no split: say so, never drop it silently
        used = set(split_dirs.values())
        try:
            ignored += [p for p in sorted(root.iterdir()) if p not in used and not is_clutter(p.name)]
        except OSError as exc:
            raise RescliError(f"{root}: cannot read folder ({exc.strerror or exc})") from None
    for split, scan in scans.items():
        ignored += scan.ignored
        reasons.update(scan.reasons)
        index.empty_classes += [index.rel(scan.root / name) for name in scan.empty]
        index.split_files[split] = scan.files
        index.split_roots[split] = scan.root
    index.ignored = sorted(index.rel(p) for p in ignored)
    index.ignored_reasons = {
        index.rel(p): reasons.get(p) or _why_ignored(p, set(index.split_roots.values())) for p in ignored
    }

    if check:
        _check_all(index, strict=strict, cache=cache, workers=workers, progress=progress)

    index.classes = sorted(index.split_files["train"])
    if len(index.classes) < 2:
        where = split_dirs.get("train", root)
        found = ", ".join(f"{c} ({len(f)})" for c, f in index.split_files["train"].items()) or "none"
        raise RescliError(
            f"{where}: need at least two class folders with images; found {len(index.classes)}: {found}"
            + (f"; empty: {', '.join(index.empty_classes)}" if index.empty_classes else "")
        )
    for split, files in index.split_files.items():
        unknown = sorted(set(files) - set(index.classes))
        if unknown:
            raise RescliError(
                f"{split_dirs[split]}: class folder(s) {', '.join(unknown)} not in the training split {split_dirs['train']}"
            )

    lookup = {c: i for i, c in enumerate(index.classes)}
    labelled = {
        split: [(str(p), lookup[c]) for c in sorted(files) for p in files[c]] for split, files in index.split_files.items()
    }
    if "val" in labelled:
        index.splits = labelled
    else:
        train, val = stratified_split(labelled["train"], val_fraction=val_split, seed=seed)
        index.splits = {"train": train, "val": val, **({"test": labelled["test"]} if "test" in labelled else {})}
    if not index.splits["train"]:
        raise RescliError(f"{root}: no training images left after the validation split")
    index.warnings += _unmeasured_classes(index)
    return index


def _unmeasured_classes(index: DatasetIndex) -> list[str]:
    """A warning for each class that has training images but no validation image while others have some: its
    accuracy is never measured, and nothing else would say so (the split gives a one-image class to training)."""
    val = index.counts("val")
    if not any(val.values()):
        return []
    train = index.counts("train")
    out = []
    for cls in index.classes:
        if val[cls] or not train[cls]:
            continue
        name = shown_name(cls)
        if index.layout == "class-folders" and train[cls] == 1:
            path = next(shown_name(index.rel(p)) for p, y in index.splits["train"] if index.classes[y] == cls)
            out.append(f"class '{name}' has only one image ({path}): it goes to training, so no validation image "
                       f"measures '{name}'; add images to it")
        else:
            where = shown_name(index.rel(index.split_roots.get("val", index.root)))
            out.append(f"class '{name}' has no validation images (in {where}): validation never measures it")
    return out


def _why_ignored(path: Path, class_roots: set[Path]) -> str:
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


def _check_all(index: DatasetIndex, *, strict: bool, cache: bool, workers: int | None, progress) -> None:
    """Decode every image once; broken ones leave the index and are reported by name."""
    paths = [str(p) for files in index.split_files.values() for fs in files.values() for p in fs]
    cache_file = _usable_cache_file(index.root) if cache else None
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(paths))

    index.infos = check_images(paths, workers=workers, cache_file=cache_file, progress=tick)
    index.broken = {index.rel(p): info.error or "unreadable" for p, info in index.infos.items() if not info.ok}
    if strict and index.broken:
        listing = "; ".join(f"{p}: {why}" for p, why in list(index.broken.items())[:5])
        more = f" (+{len(index.broken) - 5} more)" if len(index.broken) > 5 else ""
        raise RescliError(
            f"--strict: {len(index.broken)} broken image(s) in {index.root}: {listing}{more}. "
            f"Fix or remove them, or drop --strict to skip them (`rescli dataset {index.root}` lists them all)"
        )
    for split, files in index.split_files.items():
        kept: dict[str, list[Path]] = {}
        for cls, fs in files.items():
            good = [p for p in fs if index.infos[str(p)].ok]
            if good:
                kept[cls] = good
            else:  # only broken files: not a class (each broken file is reported on its own)
                index.empty_classes.append(index.rel(index.split_roots.get(split, index.root) / cls))
        index.split_files[split] = kept


def _usable_cache_file(root: Path) -> Path | None:
    """Where check results for ``root`` are cached, or None, with one warning, where that cannot be: the cache only
    saves time, so a read-only or missing home or cache folder must not stop a run."""
    where = "the cache folder"
    try:
        cache_file = cache_file_for(root)
        where = str(cache_file.parent)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        return cache_file
    except (OSError, RuntimeError, KeyError) as exc:  # RuntimeError/KeyError: Path.home() finding no home
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        warn(f"no image check cache ({shown_name(where)}: {why}); every image is checked again on each run. "
             f"Set RESCLI_CACHE_DIR to a writable folder to keep the results")
        return None


def stratified_split(
    samples: Sequence[tuple[str, int]], *, val_fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Per class, a seeded shuffle then the first ``round(n * f)`` (at least one, if n >= 2) to validation."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = 0
        if val_fraction > 0 and len(items) >= 2:
            n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        val += items[:n_val]
        train += items[n_val:]
    return train, val
