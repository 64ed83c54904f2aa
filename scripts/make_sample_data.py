"""Write handwritten-digit images (scikit-learn's bundled UCI digits, real scans) as class folders.

    python scripts/make_sample_data.py sample_data --per-class 30     # the bundled demo set
    python scripts/make_sample_data.py /tmp/digits                    # all 1,797 images

The 8x8 scans (16 grey levels) are upscaled to 32x32 PNGs, one folder per digit. Output is
deterministic: the same arguments always write the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digits(out: Path, *, per_class: int | None = None, size: int = 32, offset: int = 0) -> int:
    digits = load_digits()
    written = 0
    for label, name in enumerate(NAMES):
        idx = np.flatnonzero(digits.target == label)[offset:]
        if per_class is not None:
            idx = idx[:per_class]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx:
            pixels = (255 - digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)  # dark ink on white paper
            image = Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC)
            image.save(folder / f"{name}_{i:04d}.png", optimize=True)
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=None, help="images per digit (default: all, about 180)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--offset", type=int, default=0, help="skip this many images per digit first (disjoint sets)")
    args = parser.parse_args()
    n = write_digits(args.out, per_class=args.per_class, size=args.size, offset=args.offset)
    print(f"wrote {n} images to {args.out}")


if __name__ == "__main__":
    main()
