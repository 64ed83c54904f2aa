"""How a data folder is laid out, decided in one place for every command that reads one.

Two layouts are understood:
  DATA/<class>/<images>                      -> "class-folders": training draws a validation split in memory
  DATA/train/<class>/… + DATA/val|valid|validation/<class>/… (+ optional DATA/test/<class>/…) -> "split-folders"
A folder named train/ that holds images but no class folders is a class (pictures of trains), not a split.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Layout:
    kind: str  # CLASS_FOLDERS | SPLIT_FOLDERS
    split_roots: dict[str, Path]  # split -> the folder holding its class folders (class-folders: {"train": root})


def detect_layout(root: Path) -> Layout:
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
