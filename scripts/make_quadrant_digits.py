"""Write class folders of digits pasted into one quadrant of a noise canvas, and where each was pasted.

    python scripts/make_quadrant_digits.py /tmp/quadrants                    # 100 per digit, 128 px
    python scripts/make_quadrant_digits.py /tmp/quadrants --per-class 40 --size 128

For checking explanations: a model can only tell the digits apart by looking at the quadrant that holds one,
so a heatmap that explains it should peak there. Each picture is grey noise with one handwritten digit from
scikit-learn's bundled UCI scans, scaled to 3/8 of the canvas, pasted at a random spot inside one of the four
quadrants. OUT/<digit>/<file>.png per class, and OUT.quadrants.csv (beside the folder, not inside it, so it is not
taken for data) with `path`, `quadrant` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) and the digit's
box `x0,y0,x1,y1` in pixels. Deterministic: the same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_set(out: Path, *, per_class: int, size: int, seed: int) -> Path:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    half, side = size // 2, size * 3 // 8
    rows = []
    for label, name in enumerate(NAMES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits.target == label)[:per_class]:
            canvas = rng.integers(90, 200, (size, size), dtype=np.uint8)
            quadrant = int(rng.integers(4))
            qx, qy = (quadrant % 2) * half, (quadrant // 2) * half
            x0, y0 = qx + int(rng.integers(0, half - side + 1)), qy + int(rng.integers(0, half - side + 1))
            ink = Image.fromarray((255 - digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8), "L")
            patch = np.asarray(ink.resize((side, side), Image.BICUBIC))
            canvas[y0:y0 + side, x0:x0 + side] = patch
            path = folder / f"{name}_{i:04d}.png"
            Image.fromarray(canvas, "L").convert("RGB").save(path, optimize=True)
            rows.append((str(path), quadrant, x0, y0, x0 + side, y0 + side))
    table = out.with_name(out.name + ".quadrants.csv")
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "quadrant", "x0", "y0", "x1", "y1"])
        writer.writerows(rows)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = write_set(args.out, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {args.out} and {table}")


if __name__ == "__main__":
    main()
