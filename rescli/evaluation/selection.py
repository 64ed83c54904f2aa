"""Which labelled images an evaluation scores: on the folder (or label table) a model was trained on, the split it
held out (from the model's record of its training data); elsewhere the folder, one split of a split root, or the
rows of a table (one split of it, with a split column); and how many of them the model was trained on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rescli.core.errors import RescliError, UsageError
from rescli.data.folders import scan_class_folders
from rescli.data.layout import CLASS_FOLDERS, SPLIT_FOLDERS, find_split_folders, is_table, split_layout_folders
from rescli.data.scan import scan_dataset
from rescli.data.splits import Sample
from rescli.data.tables import LabelTable, TableOptions, read_label_table
from rescli.data.tasks import SINGLE, Task

EVAL_SPLITS = ("train", "val", "test", "all")


@dataclass
class Selection:
    """Which labelled images an evaluation scores, and what they are to the model."""

    samples: list[Sample]
    name: str  # for the default output folder: eval-<name>
    split: str | None  # train | val | test | all, or None: a whole folder the model was not trained on
    held_out: bool  # whether the model is meant never to have seen these images
    note: str | None = None  # which images were chosen and why, for the person running it


def select_images(
    data_dir: str | os.PathLike, *, classes: Sequence[str], split: str | None, record: dict[str, Any] | None,
    settings: dict[str, Any], task: Task = SINGLE, table: TableOptions | None = None,
) -> Selection:
    """The images to score. On the folder the model was trained on, the split it held out (or ``split``), file for
    file from the model's record of its training data; elsewhere the whole folder, or one split of a split root.
    A label table (read as ``table`` says) is chosen from the same way: see ``_table_selection``."""
    root = Path(data_dir).expanduser()
    if split is not None and split not in EVAL_SPLITS:
        raise UsageError(f"--split {split!r}: expected train, val, test or all")
    if is_table(root):
        if not root.is_file():
            raise UsageError(f"{root}: no such label table")
        return _table_selection(root, classes=classes, split=split, record=record, task=task,
                                table=table or TableOptions())
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder")
    if record and root.resolve() == Path(record["root"]):
        return _training_folder(root, record, classes=classes, split=split)
    split_dirs = split_layout_folders(root)
    trained_on = settings.get("data_dir") or None
    trained_here = trained_on is not None and root.resolve() == Path(trained_on).expanduser().resolve()
    if not record and trained_here and "train" not in split_dirs:
        return _redrawn_split(root, classes=classes, split=split, settings=settings)
    if "train" in split_dirs or (split in split_dirs and split != "all"):
        if split == "all":
            samples = [s for name in split_dirs for s in eval_samples(root, classes=classes, split=name)[0]]
            return Selection(samples, f"{root.name}-all", "all", held_out=False)
        samples, folder = eval_samples(root, classes=classes, split=split)
        chosen = split or ("test" if "test" in split_dirs else "val")
        return Selection(samples, f"{root.name}-{folder.name}", chosen, held_out=True)
    if split not in (None, "all"):
        raise UsageError(
            f"--split {split}: {root} holds class folders that this model was not trained on, so it has no {split} "
            "split; drop --split to score all its images"
        )
    samples, _ = eval_samples(root, classes=classes)
    return Selection(samples, root.name or "data", None, held_out=True)


def eval_samples(
    root: Path, *, classes: Sequence[str], split: str | None = None, val_split: float = 0.2, seed: int = 0
) -> tuple[list[Sample], Path]:
    """Samples to evaluate a model with ``classes`` on, and the folder they come from: a folder of class folders, or
    one split of a split root (with train/ only, the held-out split finetune made of it)."""
    split_dirs = split_layout_folders(root) if root.is_dir() else {}
    folder: Path | None = root
    if "train" in split_dirs:
        chosen = split or ("test" if "test" in split_dirs else "val")
        folder = split_dirs.get(chosen)
        if folder is None and chosen != "val":
            raise UsageError(f"--split {chosen}: {root} has no {chosen} folder")
    elif split in split_dirs:
        folder = split_dirs[split]
    if folder is None:
        index = scan_dataset(root, val_split=val_split, seed=seed)
        return _relabelled(index.splits["val"], index.classes, classes, root), root
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    scan = scan_class_folders(folder)
    lookup = _model_labels(scan.files, classes, folder)
    samples = [(str(p), lookup[c]) for c in sorted(scan.files) for p in scan.files[c]]
    if not samples:
        raise RescliError(f"{folder}: no images found in class folders")
    return samples, folder


def _model_labels(found: Iterable[str], known: Sequence[str], folder: Path) -> dict[str, int]:
    """The model's label of each of its classes; a class folder in ``folder`` that the model does not know is an
    error (it could only be scored as wrong)."""
    unknown = sorted(set(found) - set(known))
    if unknown:
        raise RescliError(
            f"{folder}: class folder(s) {', '.join(unknown)} unknown to the model (its classes: {', '.join(known)})"
        )
    return {c: i for i, c in enumerate(known)}


def _relabelled(samples: Sequence[Sample], found: Sequence[str], known: Sequence[str], folder: Path) -> list[Sample]:
    """``samples`` labelled by index into ``found`` (a scan's classes), relabelled by index into ``known``."""
    lookup = _model_labels(found, known, folder)
    return [(p, lookup[found[y]]) for p, y in samples]


_SPLIT_WORDS = {
    "val": "images it held out for validation", "test": "images of its test split",
    "train": "images it was trained on", "all": "images of every split",
}


def _training_folder(root: Path, record: dict[str, Any], *, classes: Sequence[str], split: str | None) -> Selection:
    stored = {
        name: [(str(Path(record["root"]) / rel), int(y)) for rel, y in zip(part["paths"], part["labels"])]
        for name, part in record["splits"].items()
    }
    split_dirs = find_split_folders(root) if record["layout"] == SPLIT_FOLDERS else {}
    chosen = split or ("test" if "test" in split_dirs else "val")
    if chosen == "test" and "test" not in split_dirs:
        raise UsageError(
            f"--split test: the model was trained on {root} without a test split; choose val (the images it held out), "
            "train or all"
        )
    test = []
    if "test" in split_dirs and chosen in ("test", "all"):
        test = eval_samples(root, classes=classes, split="test")[0]
    samples = {"train": stored["train"], "val": stored["val"], "test": test,
               "all": stored["train"] + stored["val"] + test}[chosen]
    listed = {p for part in stored.values() for p, _ in part}
    scanned = Path(record["root"]) if record["layout"] == CLASS_FOLDERS else split_dirs["train"]
    present = {str(p) for files in scan_class_folders(scanned).files.values() for p in files}
    added = len(present - listed) if record["layout"] == CLASS_FOLDERS else 0
    note = (
        f"{root} is the folder this model was trained on: scoring the {len(samples)} {_SPLIT_WORDS[chosen]}"
        + (" (--split train|val|all to choose)" if split is None else "")
        + (f"; {added} image(s) added since training belong to no split and are not scored" if added else "")
    )
    return Selection(samples, f"{root.name}-{chosen}", chosen, held_out=chosen in ("val", "test"), note=note)


def _redrawn_split(root: Path, *, classes: Sequence[str], split: str | None, settings: dict[str, Any]) -> Selection:
    """A model from before stored splits, on its training folder: draw the split again from its seed."""
    chosen = split or "val"
    if chosen == "test":
        raise UsageError(f"--split test: {root} has no test split; choose val, train or all")
    index = scan_dataset(root, val_split=settings.get("val_split", 0.2), seed=settings.get("seed", 0))
    parts = {name: _relabelled(index.splits[name], index.classes, classes, root) for name in ("train", "val")}
    samples = parts["train"] + parts["val"] if chosen == "all" else parts[chosen]
    note = (f"{root} is the folder this model was trained on: scoring the {len(samples)} {_SPLIT_WORDS[chosen]}, "
            "drawn again from its seed (the model predates stored splits, so images added since may be among them)")
    return Selection(samples, f"{root.name}-{chosen}", chosen, held_out=chosen == "val", note=note)


def _table_selection(root: Path, *, classes: Sequence[str], split: str | None, record: dict[str, Any] | None,
                     task: Task, table: TableOptions) -> Selection:
    """The table the model was trained on: the split it held out (or ``split``), from its record, file for file, and
    the table's test rows. Another table: its rows of ``split`` (default: test rows if it has any, else val rows),
    or every row where it has no split column (or with --split all)."""
    rows = read_label_table(root, options=table)
    if record and record.get("table") and root.resolve() == Path(record["table"]):
        return _training_table(root, rows, record, classes=classes, split=split, task=task)
    splits = {row.split for row in rows.rows}
    if split in (None, "all") and splits == {None}:
        return Selection(_table_samples(rows, None, classes=classes, task=task), root.stem, None, held_out=True)
    if splits == {None}:
        raise UsageError(f"--split {split}: {root} has no split column, so it has no {split} rows; drop --split to "
                         "score all its rows")
    chosen = split or ("test" if "test" in splits else "val")
    samples = _table_samples(rows, None if chosen == "all" else chosen, classes=classes, task=task)
    if not samples:
        raise UsageError(f"--split {chosen}: {root} has no {chosen} rows")
    return Selection(samples, f"{root.stem}-{chosen}", chosen, held_out=chosen in ("val", "test"))


def _table_samples(table: LabelTable, split: str | None, *, classes: Sequence[str], task: Task) -> list[Sample]:
    """The rows of ``split`` (None: every row) labelled by the model's classes; a label the model does not know is
    an error naming its row."""
    lookup = {c: i for i, c in enumerate(classes)}
    samples = []
    for row in table.rows:
        if split is not None and (row.split or "train") != split:
            continue
        unknown = [name for name in row.labels if name not in lookup]
        if unknown:
            raise RescliError(f"{table.file}, line {row.line}: label {unknown[0]!r} unknown to the model (its "
                              f"classes: {', '.join(classes)})")
        samples.append((row.path, task.from_indices([lookup[name] for name in row.labels])))
    return samples


def _training_table(root: Path, table: LabelTable, record: dict[str, Any], *, classes: Sequence[str],
                    split: str | None, task: Task) -> Selection:
    stored = {
        name: [(str(Path(record["root"]) / rel), task.from_record(y)) for rel, y in zip(part["paths"], part["labels"])]
        for name, part in record["splits"].items()
    }
    has_test = any(row.split == "test" for row in table.rows)
    chosen = split or ("test" if has_test else "val")
    if chosen == "test" and not has_test:
        raise UsageError(f"--split test: the model was trained on {root}, which has no test rows; choose val (the "
                         "images it held out), train or all")
    test = _table_samples(table, "test", classes=classes, task=task) if chosen in ("test", "all") else []
    samples = {"train": stored["train"], "val": stored["val"], "test": test,
               "all": stored["train"] + stored["val"] + test}[chosen]
    listed = {p for part in stored.values() for p, _ in part}
    added = len({row.path for row in table.rows if row.split != "test"} - listed)
    note = (
        f"{root} is the table this model was trained on: scoring the {len(samples)} {_SPLIT_WORDS[chosen]}"
        + (" (--split train|val|all to choose)" if split is None else "")
        + (f"; {added} row(s) added since training belong to no split and are not scored" if added else "")
    )
    return Selection(samples, f"{root.stem}-{chosen}", chosen, held_out=chosen in ("val", "test"), note=note)


def count_seen_in_training(
    samples: Sequence[Sample], record: dict[str, Any] | None, *, workers: int = 4
) -> int | None:
    """How many of ``samples`` the model was trained on: the same file, or a file with the same content.
    None when the model carries no record of its training images."""
    if not record or "train_sha1" not in record:
        return None
    root = Path(record["root"])
    trained_paths = {os.path.realpath(root / rel) for rel in record["splits"]["train"]["paths"]}
    trained_hashes = set(record["train_sha1"])
    paths = [p for p, _ in samples]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL: threads read and hash in parallel
        hashes = list(pool.map(_short_sha1, paths))
    return sum(os.path.realpath(p) in trained_paths or (h is not None and h in trained_hashes)
               for p, h in zip(paths, hashes))


def _short_sha1(path: str) -> str | None:
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:16]


def training_record(predictor: Any) -> dict[str, Any] | None:
    """The model's record of its training data (``data`` in a checkpoint, or in an export's metadata)."""
    return predictor.meta.get("data")
