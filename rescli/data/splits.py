"""The split: which labelled images train a model and which measure it. A split layout brings its own val/
(and test/) folders; a folder of class folders gets a seeded, stratified draw, the same on every run."""

from __future__ import annotations

import random
from collections.abc import Sequence

Sample = tuple[str, int]  # (absolute path, class index)


def split_samples(labelled: dict[str, list[Sample]], *, val_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """train / val (/ test) samples from the labelled images of each split folder found ("train" at least)."""
    if "val" in labelled:
        return labelled
    train, val = stratified_split(labelled["train"], val_fraction=val_fraction, seed=seed)
    return {"train": train, "val": val, **({"test": labelled["test"]} if "test" in labelled else {})}


def stratified_split(samples: Sequence[Sample], *, val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per class, a seeded shuffle then the first ``round(n * f)`` (at least one, if n >= 2) to validation."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = 0
        if val_fraction > 0 and len(items) >= 2:
            n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        val += items[:n_val]
        train += items[n_val:]
    return train, val
