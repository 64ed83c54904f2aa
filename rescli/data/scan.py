"""From a folder or a label table on disk to a DatasetIndex: the one view of a data set that training,
`rescli dataset` and evaluation share.

The steps, each in its own module: the layout (``layout``), what the class folders hold (``folders``) or what the
table's rows say (``tables``), every image decoded once (``checks``), then classes and the split (``splits``).
Nothing is ever copied, moved or written into the data folder (a table's folder is the data folder).
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
from rescli.data.layout import SPLIT_FOLDERS, TABLE, Layout, detect_layout
from rescli.data.splits import Sample, split_samples
from rescli.data.tables import LabelTable, TableOptions, TableRow, read_label_table
from rescli.data.tasks import MULTI, SINGLE, Task, class_counts

#: The progress task of the image check, as events report it.
CHECKING_IMAGES = "checking images"


@dataclass
class DatasetIndex:
    """Everything known about a data set: classes, samples per split, and what was left out."""

    root: Path  # the data folder (a table's: the folder holding it)
    layout: str  # layout.CLASS_FOLDERS | layout.SPLIT_FOLDERS | layout.TABLE
    classes: list[str]
    splits: dict[str, list[Sample]]  # split -> [(absolute path, class index, or the indices of its labels)]
    ignored: list[str] = field(default_factory=list)  # relative POSIX paths
    ignored_reasons: dict[str, str] = field(default_factory=dict)  # relative path -> why it is not used
    empty_classes: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # relative path -> reason
    infos: dict[str, ImageInfo] = field(default_factory=dict)  # absolute path -> check result
    split_files: dict[str, dict[str, list[Path]]] = field(default_factory=dict)  # split -> class -> files
    split_roots: dict[str, Path] = field(default_factory=dict)  # split -> the folder holding its class folders
    warnings: list[str] = field(default_factory=list)  # what may mislead: a class no validation image measures
    task: Task = SINGLE  # single-label, or (a table read with --multi-label) multi-label
    table: Path | None = None  # the label table, for a table
    rows: list[TableRow] = field(default_factory=list)  # a table's rows that are usable images (after the check)
    val_drawn: bool = True  # whether the validation split was drawn (no val/ folder, no val rows)

    def rel(self, path: str | Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def counts(self, split: str) -> dict[str, int]:
        """Images per class in ``split`` (multi-label: an image counts for each of its labels)."""
        return class_counts(self.task, (label for _, label in self.splits.get(split, [])), self.classes)

    @property
    def source(self) -> Path:
        """What the user pointed at: the data folder, or the label table."""
        return self.table if self.table is not None else self.root


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
    table: TableOptions | None = None,
) -> DatasetIndex:
    """The DatasetIndex of ``root`` (a folder, or a label table read as ``table`` says): its layout read, every
    image checked (unless ``check`` is False; broken ones are left out and named, or refused with ``strict``), the
    classes found and the split made.

    ``progress(done, total)`` follows the image check; it is also reported as events progress (CHECKING_IMAGES).
    """
    source = _data_source(root, val_split=val_split)
    layout = detect_layout(source)
    options = table or TableOptions()
    if layout.kind == TABLE:
        if options.label_sep != " " and not options.multi_label:
            raise UsageError("--label-sep splits the labels of a multi-label table's rows: add --multi-label")
        index = _read_table(read_label_table(source, options=options), options)
    elif not options.default:
        raise UsageError(_not_a_table(source, options))
    else:
        index = _read_class_folders(source, layout)
    if check:
        _check_all(index, strict=strict, cache=cache, workers=workers, progress=progress)
    labelled = _table_samples(index) if layout.kind == TABLE else _folder_samples(index)
    index.val_drawn = "val" not in labelled
    index.splits = split_samples(labelled, val_fraction=val_split, seed=seed, task=index.task)
    if not index.splits["train"]:
        raise RescliError(f"{source}: no training images left after the validation split")
    index.warnings += _unmeasured_classes(index)
    return index


def _data_source(root: str | os.PathLike, *, val_split: float) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise UsageError(f"{path}: no such folder or label table")
    if not path.is_dir() and detect_layout(path).kind != TABLE:
        raise UsageError(f"{path}: not a folder (expected a folder with one sub-folder per class) or a label table "
                         f"(.csv, .tsv, .jsonl, .parquet)")
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"--val-split {val_split}: expected a fraction in [0, 1)")
    return path


def _not_a_table(source: Path, options: TableOptions) -> str:
    given = [flag for flag, value in (("--multi-label", options.multi_label), ("--label-sep", options.label_sep != " "),
                                      ("--path-column", options.path_column), ("--label-column", options.label_column))
             if value]
    return (f"{' and '.join(given)}: {source} is a folder of class folders (one class per image); these options are "
            f"for a label table (a .csv, .tsv, .jsonl or .parquet file with a path and a label column)")


def _folder_samples(index: DatasetIndex) -> dict[str, list[Sample]]:
    """The classes (class folders with a usable image) and each split's labelled images."""
    index.classes = _training_classes(index)
    lookup = {c: i for i, c in enumerate(index.classes)}
    return {
        split: [(str(p), lookup[c]) for c in sorted(files) for p in files[c]]
        for split, files in index.split_files.items()
    }


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


def _read_table(table: LabelTable, options: TableOptions) -> DatasetIndex:
    """An index of a table's rows (no classes or samples yet): every row is a candidate image."""
    return DatasetIndex(root=table.folder, layout=TABLE, classes=[], splits={}, task=MULTI if options.multi_label
                        else SINGLE, table=table.file, rows=list(table.rows))


def _table_samples(index: DatasetIndex) -> dict[str, list[Sample]]:
    """The classes (labels of usable training rows) and each split's labelled images: rows without a split go to
    training, and validation is drawn from them unless some rows are val rows."""
    train_rows = [r for r in index.rows if r.split in (None, "train")]
    index.classes = sorted({name for row in train_rows for name in row.labels})
    table = shown_name(str(index.table))
    if index.task is SINGLE and len(index.classes) < 2:
        raise RescliError(f"{table}: need at least two classes among the training rows with a usable image; found "
                          f"{len(index.classes)}: {', '.join(map(shown_name, index.classes)) or 'none'}")
    if not index.classes:
        raise RescliError(f"{table}: no training row with a usable image")
    lookup = {c: i for i, c in enumerate(index.classes)}
    labelled: dict[str, list[Sample]] = {"train": []}
    for row in index.rows:
        unknown = [name for name in row.labels if name not in lookup]
        if unknown:  # with the multi-label hint where the classes look like lists: the likelier cause then
            hint = "".join(f"; {text}" for text in _looks_multi_label(index))
            raise RescliError(f"{table}, line {row.line}: label {shown_name(unknown[0])!r} of a {row.split} row is "
                              f"in no training row (the model could never predict it); add training rows for it"
                              f"{hint}")
        labelled.setdefault(row.split or "train", []).append(
            (row.path, index.task.from_indices([lookup[name] for name in row.labels])))
    index.warnings += _looks_multi_label(index)
    return labelled


def _looks_multi_label(index: DatasetIndex) -> list[str]:
    """A hint where a single-label table's class names look like lists of labels ('cat dog')."""
    if index.task is not SINGLE:
        return []
    listed = [c for c in index.classes if " " in c.strip()]
    if len(index.classes) < 4 or len(listed) * 2 < len(index.classes):
        return []
    return [f"{len(listed)} of the {len(index.classes)} classes hold spaces (such as {shown_name(listed[0])!r}): if a "
            f"row lists several labels, pass --multi-label (and --label-sep for another separator)"]


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
    noun = "label" if index.task is MULTI else "class"
    out = []
    for cls in index.classes:
        if val[cls] or not train[cls]:
            continue
        name = shown_name(cls)
        if index.val_drawn and train[cls] == 1:
            c = index.classes.index(cls)
            path = next(shown_name(index.rel(p)) for p, y in index.splits["train"] if c in index.task.classes_of(y))
            out.append(f"{noun} '{name}' has only one image ({path}): it goes to training, so no validation image "
                       f"measures '{name}'; add images to it")
        else:
            val_root = index.table if index.table is not None else index.split_roots.get("val", index.root)
            where = shown_name(index.rel(val_root))
            out.append(f"{noun} '{name}' has no validation images (in {where}): validation never measures it")
    return out


def _check_all(
    index: DatasetIndex, *, strict: bool, cache: bool, workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Decode every image once; broken ones leave the index and are reported by name."""
    if index.table is not None:
        paths = list(dict.fromkeys(row.path for row in index.rows))
    else:
        paths = [str(p) for files in index.split_files.values() for fs in files.values() for p in fs]
    # A table's own cache: two tables in one folder each keep the results of their images.
    cache_file = _usable_cache_file(index.source) if cache else None
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
            f"--strict: {len(index.broken)} broken image(s) in {index.source}: {listing}{more}. "
            f"Fix or remove them, or drop --strict to skip them (`rescli dataset {index.source}` lists them all)"
        )
    if index.rows:  # a table: a label whose rows are all broken is not a class (each file is reported on its own)
        labels_before = {name for row in index.rows for name in row.labels}
        index.rows = [row for row in index.rows if index.infos[row.path].ok]
        index.empty_classes += sorted(labels_before - {name for row in index.rows for name in row.labels})
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
    """Where check results for ``root`` (a folder or a table) are cached, or None, with one warning, where that
    cannot be: the cache only saves time, so a read-only or missing home or cache folder must not stop a run."""
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
