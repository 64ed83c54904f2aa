"""Logits to result rows: the one place where what a model outputs becomes what predict reports.

A rescli model is single-label today: calibrated scores are the softmax of logits / temperature, a row names the
top-scoring class (or "unknown" below a threshold) and the top k. Another kind of output, several labels per
image or an embedding, would be another function here, chosen by what the model's metadata says it is; the
engines that compute logits (rescli.inference.predictor and the export loaders) stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

UNKNOWN = "unknown"


def label_rows(
    paths: Sequence[str], logits: torch.Tensor, *, classes: Sequence[str], top_k: int, temperature: float,
    threshold: float | None,
) -> list[dict[str, Any]]:
    """One row per path: its label, that label's score and the ``top_k`` best labels with theirs.

    ``threshold``: below it the label is "unknown" (top-k still lists the classes). Scores are rounded to 6 places.
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
