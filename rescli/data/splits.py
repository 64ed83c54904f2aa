"""The labelled images to evaluate a model on: a folder of class folders, or one split of a split root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from rescli.core.errors import RescliError, UsageError
from rescli.data.scan import (
    SPLIT_ALIASES,
    DatasetIndex,
    find_split_folders,
    scan_class_folders,
    scan_dataset,
    split_layout_folders,
)


def eval_samples(
    root: str | os.PathLike, *, classes: Sequence[str], split: str | None = None, val_split: float = 0.2, seed: int = 0
) -> tuple[list[tuple[str, int]], DatasetIndex]:
    """Samples to evaluate a model with ``classes`` on: a class folder, or one split of a split root."""
    root = Path(root).expanduser()
    split_dirs = find_split_folders(root) if root.is_dir() else {}
    if "train" in split_dirs and not split_layout_folders(root):  # a class named train, not a split
        split_dirs = {}
    if split is not None and split not in SPLIT_ALIASES:
        raise UsageError(f"--split {split!r}: expected train, val or test")
    if split_dirs and "train" in split_dirs:
        chosen = split or ("test" if "test" in split_dirs else "val")
        folder = split_dirs.get(chosen)
        if folder is None and chosen != "val":
            raise UsageError(f"--split {chosen}: {root} has no {chosen} folder")
    elif split_dirs and split in split_dirs:
        folder = split_dirs[split]
    else:
        folder = root
        chosen = None
    if folder is None:  # split root with train only: evaluate the same held-out split finetune made
        index = scan_dataset(root, val_split=val_split, seed=seed)
        match_classes(index.classes, classes, root)
        return relabel(index.splits["val"], index.classes, classes), index
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    scan = scan_class_folders(folder)
    unknown = sorted(set(scan.files) - set(classes))
    if unknown:
        raise RescliError(
            f"{folder}: class folder(s) {', '.join(unknown)} unknown to the model (its classes: {', '.join(classes)})"
        )
    lookup = {c: i for i, c in enumerate(classes)}
    samples = [(str(p), lookup[c]) for c in sorted(scan.files) for p in scan.files[c]]
    if not samples:
        raise RescliError(f"{folder}: no images found in class folders")
    index = DatasetIndex(root=folder, layout="class-folders", classes=list(classes), splits={"eval": samples})
    index.ignored = [index.rel(p) for p in scan.ignored]
    return samples, index


def match_classes(found: Sequence[str], known: Sequence[str], root: Path) -> None:
    unknown = sorted(set(found) - set(known))
    if unknown:
        raise RescliError(f"{root}: class folder(s) {', '.join(unknown)} unknown to the model (its classes: {', '.join(known)})")


def relabel(samples, found: Sequence[str], known: Sequence[str]):
    lookup = {c: i for i, c in enumerate(known)}
    return [(p, lookup[found[y]]) for p, y in samples]
