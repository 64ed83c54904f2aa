"""From a folder on disk to a DatasetIndex: the one view of a data folder that training, `rescli dataset` and
evaluation share.

The steps, each in its own module: the layout (``layout``), what the class folders hold (``folders``), every
image decoded once (``checks``), then classes and the split (``splits``). Nothing is ever copied, moved or
written into the data folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rescli.core import events
from rescli.core.errors import RescliError, UsageError
from rescli.core.fileio import shown_name
from rescli.data.checks import cache_file_for, check_images
from rescli.data.files import is_clutter
from rescli.data.folders import scan_class_folders, why_ignored
from rescli.data.images import ImageInfo
from rescli.data.layout import CLASS_FOLDERS, SPLIT_FOLDERS, Layout, detect_layout
from rescli.data.splits import Sample, split_samples

#: The progress task of the image check, as events report it.
CHECKING_IMAGES = "checking images"


@dataclass
class DatasetIndex:
    """Everything known about a data folder: classes, samples per split, and what was left out."""

    root: Path
    layout: str  # layout.CLASS_FOLDERS | layout.SPLIT_FOLDERS
    classes: list[str]
    splits: dict[str, list[Sample]]  # split -> [(absolute path, class index)]
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
        out = dict.fromkeys(self.classes, 0)
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
    """The DatasetIndex of ``root``: its layout read, every image checked (unless ``check`` is False; broken ones
    are left out and named, or refused with ``strict``), the classes found and the split made.

    ``progress(done, total)`` follows the image check; it is also reported as events progress (CHECKING_IMAGES).
    """
    root = _data_folder(root, val_split=val_split)
    index = _read_class_folders(root, detect_layout(root))
    if check:
        _check_all(index, strict=strict, cache=cache, workers=workers, progress=progress)
    index.classes = _training_classes(index)
    lookup = {c: i for i, c in enumerate(index.classes)}
    labelled = {
        split: [(str(p), lookup[c]) for c in sorted(files) for p in files[c]]
        for split, files in index.split_files.items()
    }
    index.splits = split_samples(labelled, val_fraction=val_split, seed=seed)
    if not index.splits["train"]:
        raise RescliError(f"{root}: no training images left after the validation split")
    index.warnings += _unmeasured_classes(index)
    return index


def _data_folder(root: str | os.PathLike, *, val_split: float) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise UsageError(f"{path}: no such folder")
    if not path.is_dir():
        raise UsageError(f"{path}: not a folder (expected a folder with one sub-folder per class)")
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"--val-split {val_split}: expected a fraction in [0, 1)")
    return path


def _read_class_folders(root: Path, layout: Layout) -> DatasetIndex:
    """An index of what the class folders of each split hold (no classes or samples yet), and of all left out."""
    index = DatasetIndex(root=root, layout=layout.kind, classes=[], splits={})
    ignored: list[Path] = []
    reasons: dict[Path, str] = {}
    if layout.kind == SPLIT_FOLDERS:  # whatever sits beside train/ and val/ is in no split: say so, never drop it
        used = set(layout.split_roots.values())
        try:
            ignored += [p for p in sorted(root.iterdir()) if p not in used and not is_clutter(p.name)]
        except OSError as exc:
            raise RescliError(f"{root}: cannot read folder ({exc.strerror or exc})") from None
    for split, split_root in layout.split_roots.items():
        scan = scan_class_folders(split_root)
        ignored += scan.ignored
        reasons.update(scan.reasons)
        index.empty_classes += [index.rel(scan.root / name) for name in scan.empty]
        index.split_files[split] = scan.files
        index.split_roots[split] = scan.root
    index.ignored = sorted(index.rel(p) for p in ignored)
    class_roots = set(index.split_roots.values())
    index.ignored_reasons = {index.rel(p): reasons.get(p) or why_ignored(p, class_roots) for p in ignored}
    return index


def _training_classes(index: DatasetIndex) -> list[str]:
    """The classes: the training split's class folders that hold a usable image; every other split's are among them."""
    classes = sorted(index.split_files["train"])
    if len(classes) < 2:
        found = ", ".join(f"{c} ({len(f)})" for c, f in index.split_files["train"].items()) or "none"
        raise RescliError(
            f"{index.split_roots['train']}: need at least two class folders with images; found {len(classes)}: {found}"
            + (f"; empty: {', '.join(index.empty_classes)}" if index.empty_classes else "")
        )
    for split, files in index.split_files.items():
        unknown = sorted(set(files) - set(classes))
        if unknown:
            raise RescliError(
                f"{index.split_roots[split]}: class folder(s) {', '.join(unknown)} not in the training split "
                f"{index.split_roots['train']}"
            )
    return classes


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
        if index.layout == CLASS_FOLDERS and train[cls] == 1:
            path = next(shown_name(index.rel(p)) for p, y in index.splits["train"] if index.classes[y] == cls)
            out.append(f"class '{name}' has only one image ({path}): it goes to training, so no validation image "
                       f"measures '{name}'; add images to it")
        else:
            where = shown_name(index.rel(index.split_roots.get("val", index.root)))
            out.append(f"class '{name}' has no validation images (in {where}): validation never measures it")
    return out


def _check_all(
    index: DatasetIndex, *, strict: bool, cache: bool, workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Decode every image once; broken ones leave the index and are reported by name."""
    paths = [str(p) for files in index.split_files.values() for fs in files.values() for p in fs]
    cache_file = _usable_cache_file(index.root) if cache else None
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        events.progress(CHECKING_IMAGES, done, len(paths))
        if progress:
            progress(done, len(paths))

    events.progress(CHECKING_IMAGES, 0, len(paths))
    try:
        index.infos = check_images(paths, workers=workers, cache_file=cache_file, progress=tick)
    finally:
        events.progress(CHECKING_IMAGES, done, len(paths), finished=True)
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
        events.warn(f"no image check cache ({shown_name(where)}: {why}); every image is checked again on each run. "
                    f"Set RESCLI_CACHE_DIR to a writable folder to keep the results")
        return None
