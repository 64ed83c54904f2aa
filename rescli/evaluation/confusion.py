"""Reading a confusion matrix: the most-confused pairs of classes, and which classes to show when there are too many
to draw. Plain numpy; the figure, the report and metrics.json all use these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rescli.core.errors import RescliError


def check_confusion_matrix(cm: Any, labels: Sequence[str]) -> np.ndarray:
    """``cm`` as an array, once it is square and has one label per class."""
    arr = np.asarray(cm)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise RescliError(f"confusion matrix must be square, got shape {arr.shape}")
    if len(labels) != arr.shape[0]:
        raise RescliError(f"confusion matrix has {arr.shape[0]} classes but {len(labels)} labels were given")
    return arr


def confusion_subset(
    cm: np.ndarray, labels: Sequence[str], max_classes: int = 30
) -> tuple[np.ndarray, list[str], list[int]]:
    """The part of ``cm`` that confusion_matrix.png (and the report's table) shows: ``(sub_cm, sub_labels, indices)``.

    With at most ``max_classes`` classes everything is kept. Otherwise keeps the ``max_classes`` classes most involved
    in confusions (off-diagonal mass of their row plus their column; ties broken by support, then index), in their
    original order.
    """
    arr = check_confusion_matrix(cm, labels)
    n = arr.shape[0]
    if max_classes < 1:
        raise RescliError(f"max_classes must be at least 1, got {max_classes}")
    if n <= max_classes:
        return arr, [str(x) for x in labels], list(range(n))
    a = arr.astype(np.float64)
    off = a.copy()
    np.fill_diagonal(off, 0.0)
    involvement = off.sum(axis=1) + off.sum(axis=0)
    support = a.sum(axis=1)
    order = sorted(range(n), key=lambda i: (-involvement[i], -support[i], i))
    keep = sorted(order[:max_classes])
    return arr[np.ix_(keep, keep)], [str(labels[i]) for i in keep], keep


def most_confused(cm: np.ndarray, labels: Sequence[str], *, k: int = 10) -> list[dict]:
    """The ``k`` largest off-diagonal cells: ``[{"true", "predicted", "count"}]``, count descending, count > 0."""
    arr = check_confusion_matrix(cm, labels)
    n = arr.shape[0]
    pairs = [
        (int(arr[i, j]) if float(arr[i, j]).is_integer() else float(arr[i, j]), i, j)
        for i in range(n)
        for j in range(n)
        if i != j and arr[i, j] > 0
    ]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": str(labels[i]), "predicted": str(labels[j]), "count": c} for c, i, j in pairs[: max(0, int(k))]]
