"""Tiny data for the insight tests: coloured squares pasted into one quadrant of a grey-noise canvas (the colour is
the class, so a model must look at the square), and a resnet20 trained on them in a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def quadrant_of(x: float, y: float, size: int) -> int:
    """0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    return int(x >= size / 2) + 2 * int(y >= size / 2)


def make_quadrant_squares(root: Path, *, per_class: int = 16, size: int = 32, seed: int = 0) -> dict[str, int]:
    """Class folders of squares in one quadrant; returns {path: quadrant}."""
    rng = np.random.default_rng(seed)
    where: dict[str, int] = {}
    side = size // 4
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            canvas = rng.integers(90, 170, (size, size, 3)).astype(np.uint8)
            quadrant = int(rng.integers(4))
            x0 = (quadrant % 2) * size // 2 + int(rng.integers(0, size // 2 - side))
            y0 = (quadrant // 2) * size // 2 + int(rng.integers(0, size // 2 - side))
            canvas[y0:y0 + side, x0:x0 + side] = colour
            path = root / name / f"{name}_{i:02d}.png"
            Image.fromarray(canvas).save(path)
            where[str(path)] = quadrant
    return where


def train_squares(root: Path, run_cli) -> tuple[Path, Path, dict[str, int]]:
    """(data folder, run folder, {path: quadrant}): resnet20 at 32 px, 4 epochs, which learns the squares."""
    data = root / "squares"
    where = make_quadrant_squares(data)
    res = run_cli("finetune", data, "--arch", "resnet20", "--weights", "none", "--img-size", "32", "--epochs", "4",
                  "--batch-size", "8", "--workers", "0", "--augment", "none", "--val-split", "0.25",
                  "--output", root / "run")
    assert res.code == 0, res.err
    return data, root / "run", where
