"""Classification metrics from plain arrays, all computed by scikit-learn."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm


def classification_metrics(
    *, y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/weighted P/R/F1, per-class table, confusion matrix (+ top-k, ROC-AUC with probs)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    ids = list(range(len(labels)))
    out: dict[str, Any] = {"n": int(len(y_true)), "labels": list(labels)}
    if len(y_true) == 0:
        return out
    with warnings.catch_warnings():
        # Classes absent from a small evaluation set make sklearn warn; the zeros are reported as such.
        warnings.simplefilter("ignore")
        out["accuracy"] = float(skm.accuracy_score(y_true, y_pred))
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, y_pred))
        for avg in ("macro", "weighted"):
            p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=avg, zero_division=0)
            out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
        p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
        out["per_class"] = {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(labels)
        }
        out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=ids).tolist()
        if probs is not None and len(labels) > 1:
            probs = np.asarray(probs, dtype=np.float64)
            # With two classes sklearn wants the positive class's score only (a 2-D array raises ValueError).
            scores = probs[:, 1] if len(ids) == 2 else probs
            out["top_k_accuracy"] = {
                str(k): float(skm.top_k_accuracy_score(y_true, scores, k=k, labels=ids))
                for k in (1, 3, 5)
                if k < len(labels) or k == 1
            }
            out["log_loss"] = float(skm.log_loss(y_true, np.clip(probs, 1e-12, 1.0), labels=ids))
            out["roc_auc_ovr"] = _roc_auc(y_true, probs, ids)
    return out


def _roc_auc(y_true: np.ndarray, probs: np.ndarray, ids: list[int]) -> float | None:
    """One-vs-rest macro ROC-AUC; None where undefined (a class missing from y_true)."""
    if len(np.unique(y_true)) != len(ids):
        return None
    try:
        if len(ids) == 2:
            return float(skm.roc_auc_score(y_true, probs[:, 1]))
        return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=ids))
    except ValueError:
        return None
