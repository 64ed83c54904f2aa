"""The split: which labelled images train a model and which measure it. A split layout (or a table's split
column) brings its own val (and test) images; otherwise a seeded, stratified draw, the same on every run."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from rescli.data.tasks import SINGLE, Label, Task

#: (absolute path, label): the label is a tasks.Label, a class index or (multi-label) the sorted indices of the
#: image's labels. Typed Any so that code for one task (degradation: single-label) keeps its own narrower types.
Sample = tuple[str, Any]


def split_samples(
    labelled: dict[str, list[Sample]], *, val_fraction: float, seed: int, task: Task = SINGLE
) -> dict[str, list[Sample]]:
    """train / val (/ test) samples from the labelled images of each split found ("train" at least)."""
    if "val" in labelled:
        return labelled
    train, val = stratified_split(labelled["train"], val_fraction=val_fraction, seed=seed, task=task)
    return {"train": train, "val": val, **({"test": labelled["test"]} if "test" in labelled else {})}


def stratified_split(
    samples: Sequence[Sample], *, val_fraction: float, seed: int, task: Task = SINGLE
) -> tuple[list[Sample], list[Sample]]:
    """Per stratum, a seeded shuffle then the first ``round(n * f)`` (at least one, if n >= 2) to validation.

    A stratum is a class; multi-label, an image goes with the rarest of its labels, so that a rare label reaches
    validation as surely as a common one (and a label seen once stays in training).
    """
    stratum = _strata(samples, task)
    by_stratum: dict[int, list[Sample]] = {}
    for s in samples:
        by_stratum.setdefault(stratum(s[1]), []).append(s)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for key in sorted(by_stratum):
        items = sorted(by_stratum[key])
        rng.shuffle(items)
        n_val = 0
        if val_fraction > 0 and len(items) >= 2:
            n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def _strata(samples: Sequence[Sample], task: Task):
    """The stratum of a label: its class, or (several classes) the rarest of them, ties to the lower index."""
    frequency = Counter(i for _, label in samples for i in task.classes_of(label))

    def stratum(label: Label) -> int:
        classes = task.classes_of(label)
        return min(classes, key=lambda i: (frequency[i], i)) if classes else -1

    return stratum
