"""Label tables for tests: tiny generated images listed in a CSV (or another table format), single- or
multi-label, that a model learns in a few steps."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from conftest import COLORS, write_color_images
from PIL import Image

#: Multi-label toy set: each label owns a third of the picture, coloured when the picture has that label.
LABELS = ("red", "green", "blue")


def label_sets(n: int) -> list[tuple[str, ...]]:
    """``n`` label sets cycling through every non-empty subset of LABELS (each label on 4 of the 7)."""
    subsets = [s for k in (1, 2, 3) for s in itertools.combinations(LABELS, k)]
    return [subsets[i % len(subsets)] for i in range(n)]


def write_multilabel_image(path: Path, labels: Sequence[str], *, size: int = 24, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 30.0, dtype=np.float32)
    third = size // 3
    for k, name in enumerate(LABELS):
        if name in labels:
            img[:, k * third:(k + 1) * third] = COLORS[name]
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, "RGB").save(path)


def write_table(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """A .csv, .tsv or .jsonl table with ``header`` columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, row))) + "\n" for row in rows))
        return path
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_multilabel_table(root: Path, *, n: int = 42, size: int = 24, valid_every: int | None = None,
                          name: str = "labels.csv") -> Path:
    """root/images/img_NNN.png with 1-3 of LABELS each, and root/labels.csv (path, labels[, is_valid])."""
    rows = []
    for i, labels in enumerate(label_sets(n)):
        rel = f"images/img_{i:03d}.png"
        write_multilabel_image(root / rel, labels, size=size, seed=i)
        row: list[object] = [rel, " ".join(labels)]
        if valid_every:
            row.append(int(i % valid_every == 0))
        rows.append(row)
    header = ["path", "labels"] + (["is_valid"] if valid_every else [])
    return write_table(root / name, header, rows)


def make_single_label_table(root: Path, *, per_class: int = 12, size: int = 24,
                            classes: Sequence[str] = ("red", "green", "blue"), name: str = "labels.csv") -> Path:
    """root/pics/<class>_NNN.png (all in one folder: the table, not the folders, says the class) and the table."""
    rows = []
    for k, cls in enumerate(classes):
        for p in write_color_images(root / "pics" / cls, COLORS[cls], per_class, size=size, seed=k):
            flat = root / "pics" / f"{cls}_{p.name}"
            p.rename(flat)
            rows.append([flat.relative_to(root).as_posix(), cls])
        (root / "pics" / cls).rmdir()
    return write_table(root / name, ["file", "class"], rows)
