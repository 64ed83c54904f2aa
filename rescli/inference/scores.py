"""Logits to result rows: the one place where what a model outputs becomes what predict reports, one function per
task (``rows_for`` picks it from the model's metadata).

Single-label: calibrated scores are the softmax of logits / temperature; a row names the top-scoring class (or
"unknown" below a threshold) and the top k. Multi-label: each class's probability is the sigmoid of its logit /
temperature; a row lists every class at or above its threshold (those tuned on the validation split, or one
given), the probability of each class, and the top k. The engines that compute logits (rescli.inference.predictor
and the export loaders) stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from rescli.data.tasks import MULTI_LABEL, Task

UNKNOWN = "unknown"


#: A multi-label model without tuned thresholds decides at this probability.
DEFAULT_THRESHOLD = 0.5


class RowsFn(Protocol):
    def __call__(self, paths: Sequence[str], logits: torch.Tensor, *, classes: Sequence[str], top_k: int,
                 temperature: float, threshold: float | None,
                 thresholds: Sequence[float] | None = None) -> list[dict[str, Any]]: ...


def rows_for(task: Task) -> RowsFn:
    """How the logits of a model of ``task`` become rows."""
    return multi_label_rows if task.name == MULTI_LABEL else label_rows


def label_rows(
    paths: Sequence[str], logits: torch.Tensor, *, classes: Sequence[str], top_k: int, temperature: float,
    threshold: float | None, thresholds: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One row per path: its label, that label's score and the ``top_k`` best labels with theirs.

    ``threshold``: below it the label is "unknown" (top-k still lists the classes). Scores are rounded to 6 places.
    ``thresholds`` is for multi-label models, and unused here.
    """
    k = max(1, min(top_k, len(classes)))
    probs = torch.softmax(logits.float() / temperature, dim=1)
    top = probs.topk(k, dim=1)
    rows: list[dict[str, Any]] = []
    for path, scores, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
        label = classes[indices[0]]
        if threshold is not None and scores[0] < threshold:
            label = UNKNOWN
        rows.append({
            "path": path,
            "label": label,
            "score": round(scores[0], 6),
            "topk": [{"label": classes[i], "score": round(s, 6)} for i, s in zip(indices, scores)],
        })
    return rows


def multi_label_rows(
    paths: Sequence[str], logits: torch.Tensor, *, classes: Sequence[str], top_k: int, temperature: float,
    threshold: float | None, thresholds: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One row per path: ``labels``, the classes whose probability reaches their threshold (possibly none), in the
    order of the model's classes (as a label table lists them); ``scores``, every class's probability; ``topk``, the
    ``top_k`` most probable classes.

    ``threshold`` (one for every class) overrides ``thresholds`` (one per class; default 0.5 each).
    """
    probs = multi_label_probabilities(logits, temperature=temperature)
    cut = decision_thresholds(len(classes), threshold=threshold, thresholds=thresholds)
    k = max(1, min(top_k, len(classes)))
    rows: list[dict[str, Any]] = []
    for path, p in zip(paths, probs.tolist()):
        order = sorted(range(len(classes)), key=lambda i: (-p[i], i))
        rows.append({
            "path": path,
            "labels": [classes[i] for i in range(len(classes)) if p[i] >= cut[i]],
            "scores": {classes[i]: round(p[i], 6) for i in range(len(classes))},
            "topk": [{"label": classes[i], "score": round(p[i], 6)} for i in order[:k]],
        })
    return rows


def multi_label_probabilities(logits: torch.Tensor, *, temperature: float) -> torch.Tensor:
    return torch.sigmoid(logits.float() / temperature)


def decision_thresholds(n_classes: int, *, threshold: float | None,
                        thresholds: Sequence[float] | None) -> list[float]:
    """Each class's threshold: ``threshold`` for all, else the stored ``thresholds``, else DEFAULT_THRESHOLD."""
    if threshold is not None:
        return [float(threshold)] * n_classes
    if thresholds is not None:
        return [float(t) for t in thresholds]
    return [DEFAULT_THRESHOLD] * n_classes
