"""The metrics of a classification task, in one place: scikit-learn's scores, calibration (ECE before and after the
temperature), the most-confused pairs and the worst mistakes. ``metrics_from`` is what metrics.json holds, for the
task of the result (multi-label: rescli.evaluation.multilabel); the other functions take plain arrays.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from rescli.data.tasks import MULTI, MULTI_LABEL
from rescli.evaluation.calibration import expected_calibration_error, softmax
from rescli.evaluation.confusion import most_confused
from rescli.evaluation.evaluate import EvalResult
from rescli.evaluation.multilabel import (
    UNTUNED_THRESHOLD,
    calibration_metrics,
    multi_label_metrics,
    multi_label_rows,
    sigmoid,
    worst_rows,
)

#: How many mistakes top_losses.png shows (and metrics.json lists).
TOP_LOSSES = 16


#: How many most-confused (true, predicted) pairs metrics.json lists.
MOST_CONFUSED = 10


#: Bins of the reliability diagram and of the expected calibration error.
ECE_BINS = 15


def classification_metrics(
    *, y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence[str], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/weighted P/R/F1, per-class table, confusion matrix (+ top-k accuracy, log
    loss and ROC-AUC with ``probs``)."""
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


def per_sample(ev: EvalResult, classes: Sequence[str], *, temperature: float = 1.0,
               thresholds: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One row per evaluated image: path, true, predicted, score (probability of predicted), true_score, loss.

    Multi-label: path, true and predicted (labels joined by spaces), loss, correct and scores (multilabel's rows).
    """
    if ev.task is MULTI:
        return multi_label_rows(ev, classes, temperature=temperature,
                                thresholds=thresholds or [UNTUNED_THRESHOLD] * len(classes))
    if len(ev.y_true) == 0:
        return []
    probs = softmax(ev.logits, temperature)
    idx = np.arange(len(ev.y_true))
    p_pred = probs[idx, ev.y_pred]
    p_true = probs[idx, ev.y_true]
    loss = -np.log(np.clip(p_true, 1e-12, 1.0))
    return [
        {
            "path": ev.paths[i],
            "true": classes[int(ev.y_true[i])],
            "predicted": classes[int(ev.y_pred[i])],
            "score": float(p_pred[i]),
            "true_score": float(p_true[i]),
            "loss": float(loss[i]),
            "correct": bool(ev.y_true[i] == ev.y_pred[i]),
        }
        for i in range(len(ev.y_true))
    ]


def top_losses(rows: list[dict[str, Any]], k: int = TOP_LOSSES) -> list[dict[str, Any]]:
    """The ``k`` misclassified images with the highest loss (most confidently wrong first)."""
    wrong = [r for r in rows if not r["correct"]]
    wrong.sort(key=lambda r: (-r["loss"], r["path"]))
    return [{k2: r[k2] for k2 in ("path", "true", "predicted", "score", "loss")} for r in wrong[:k]]


def metrics_from(ev: EvalResult, classes: list[str], *, temperature: float = 1.0,
                 thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """scikit-learn metrics of ``softmax(logits / temperature)``, calibration (ECE before/after), most-confused pairs
    and top losses. Multi-label: those of ``multi_label_metrics_from``.

    Predictions (argmax) do not depend on the temperature; the scores, log loss and ECE do.
    """
    if ev.task is MULTI:
        return multi_label_metrics_from(ev, classes, temperature=temperature, thresholds=thresholds)
    n = len(ev.y_true)
    probs = softmax(ev.logits, temperature) if n else None
    metrics = classification_metrics(y_true=ev.y_true, y_pred=ev.y_pred, labels=classes, probs=probs)
    metrics["loss"] = ev.loss
    metrics["temperature"] = float(temperature)
    if probs is not None:
        raw = softmax(ev.logits)
        metrics["ece"] = expected_calibration_error(probs, ev.y_true, n_bins=ECE_BINS)
        metrics["ece_before_temperature"] = expected_calibration_error(raw, ev.y_true, n_bins=ECE_BINS)
        if "log_loss" in metrics:
            p_true = np.clip(raw[np.arange(n), ev.y_true], 1e-12, 1.0)
            metrics["log_loss_before_temperature"] = float(-np.mean(np.log(p_true)))
        metrics["most_confused"] = most_confused(np.asarray(metrics["confusion_matrix"]), list(classes),
                                                 k=MOST_CONFUSED)
        metrics["top_losses"] = top_losses(per_sample(ev, classes, temperature=temperature))
    return metrics


def multi_label_metrics_from(ev: EvalResult, classes: list[str], *, temperature: float = 1.0,
                             thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Multi-label metrics of ``sigmoid(logits / temperature)`` at ``thresholds`` (default 0.5 each), calibration of
    the binary decisions (ECE of all together before/after the temperature, and per class) and top losses."""
    chosen = list(thresholds) if thresholds is not None else [UNTUNED_THRESHOLD] * len(classes)
    probs = sigmoid(ev.logits, temperature) if len(ev.y_true) else np.zeros((0, len(classes)))
    metrics = multi_label_metrics(y_true=ev.y_true, probs=probs, labels=classes, thresholds=chosen)
    metrics["task"] = MULTI_LABEL
    metrics["loss"] = ev.loss
    metrics["accuracy_at_half"] = ev.accuracy  # the per-decision accuracy training follows (val_accuracy)
    metrics["temperature"] = float(temperature)
    if len(ev.y_true):
        metrics.update(calibration_metrics(ev, classes, temperature=temperature, n_bins=ECE_BINS))
        rows = multi_label_rows(ev, classes, temperature=temperature, thresholds=chosen)
        metrics["top_losses"] = worst_rows(rows, TOP_LOSSES)
    return metrics
