"""Write a multi-label image set: 1-3 different handwritten digits on each picture, and a label table.

    python scripts/make_multilabel_digits.py /tmp/mldigits                  # 2,000 pictures, 64 px
    python scripts/make_multilabel_digits.py /tmp/mldigits --images 500 --size 64 --valid 0.2

Each picture is a white canvas with 1-3 distinct digits from scikit-learn's bundled UCI scans, each scaled to
between a third and a half of the canvas and placed where it overlaps no other. OUT/labels.csv has one row per
picture: `path` (relative to the table), `labels` (the digits' names, space-separated, as Kaggle's and fastai's
multi-label tables have them) and `is_valid` (a seeded 0/1 split, so every tool trains on the same images).
Deterministic: the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _place(rng: np.random.Generator, taken: list[tuple[int, int, int]], size: int, side: int) -> tuple[int, int] | None:
    """A top-left corner for a side x side digit that overlaps none of ``taken`` (x, y, side), or None."""
    for _ in range(200):
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        if all(x + side <= tx or tx + ts <= x or y + side <= ty or ty + ts <= y for tx, ty, ts in taken):
            return x, y
    return None


def write_set(out: Path, *, images: int, size: int, valid: float, seed: int) -> int:
    digits = load_digits()
    by_label = [np.flatnonzero(digits.target == k) for k in range(10)]
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(images):
        canvas = Image.new("L", (size, size), 255)
        count = int(rng.integers(1, 4))
        labels = sorted(rng.choice(10, size=count, replace=False).tolist())
        taken: list[tuple[int, int, int]] = []
        for label in labels:
            side = int(rng.integers(size // 3, size // 2 + 1))
            spot = _place(rng, taken, size, side)
            if spot is None:  # no room left: a smaller digit always fits beside the others
                side = size // 4
                spot = _place(rng, taken, size, side) or (0, 0)
            scan = digits.images[int(rng.choice(by_label[label]))]
            ink = Image.fromarray((255 - scan * (255 / 16)).clip(0, 255).astype(np.uint8), "L")
            canvas.paste(ink.resize((side, side), Image.BICUBIC), spot)
            taken.append((*spot, side))
        name = f"images/img_{i:05d}.png"
        canvas.convert("RGB").save(out / name, optimize=True)
        rows.append((name, " ".join(NAMES[k] for k in labels), int(rng.random() < valid)))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "is_valid"])
        writer.writerows(rows)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--valid", type=float, default=0.2, help="fraction marked is_valid=1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = write_set(args.out, images=args.images, size=args.size, valid=args.valid, seed=args.seed)
    print(f"wrote {n} pictures and {args.out / 'labels.csv'}")


if __name__ == "__main__":
    main()
