"""How a data folder is laid out, decided in one place for every command that reads one.

Three layouts are understood:
  DATA/<class>/<images>                      -> "class-folders": training draws a validation split in memory
  DATA/train/<class>/… + DATA/val|valid|validation/<class>/… (+ optional DATA/test/<class>/…) -> "split-folders"
A folder named train/ that holds images but no class folders is a class (pictures of trains), not a split.
A file named like a table (labels.csv, .tsv, .jsonl, .parquet) is a label table -> "table" (rescli.data.tables):
one row per image, the images anywhere (relative paths start from the table's folder, the data folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rescli.data.files import is_clutter, is_hidden

SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


CLASS_FOLDERS = "class-folders"


SPLIT_FOLDERS = "split-folders"


TABLE = "table"


#: What a label table's file name ends with.
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")


@dataclass(frozen=True)
class Layout:
    kind: str  # CLASS_FOLDERS | SPLIT_FOLDERS | TABLE
    split_roots: dict[str, Path]  # split -> the folder holding its class folders (class-folders: {"train": root};
    # a table: {})


def is_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a label table: by its suffix, and not a folder."""
    p = Path(path)
    return p.suffix.lower() in TABLE_SUFFIXES and not p.is_dir()


def data_folder(path: str | os.PathLike) -> Path:
    """The folder rescli never writes into: the data folder itself, or the folder holding a label table."""
    p = Path(path).expanduser()
    return p.parent if is_table(p) else p


def detect_layout(root: Path) -> Layout:
    if is_table(root):
        return Layout(TABLE, {})
    split_dirs = split_layout_folders(root)
    if "train" in split_dirs:
        return Layout(SPLIT_FOLDERS, split_dirs)
    return Layout(CLASS_FOLDERS, {"train": root})


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
