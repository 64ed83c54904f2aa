"""The metrics of a multi-label task, from scikit-learn: mean average precision, micro and macro F1 at each class's
threshold, subset accuracy, hamming loss, per-class precision / recall / F1 / AP / support and confusion counts,
calibration per class, and the rows with the highest binary cross-entropy. Also the thresholds themselves: each
class's is the one that maximises its F1 on the validation split.

Everything takes plain arrays: ``y_true`` [N, C] of 0/1, ``probs`` [N, C] of probabilities (sigmoid of logits /
temperature).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from rescli.evaluation.calibration import as_binary_decisions, expected_calibration_error, softmax
from rescli.evaluation.evaluate import EvalResult

#: A class whose validation images are all positive or all negative keeps this threshold (no F1 to maximise).
UNTUNED_THRESHOLD = 0.5


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """sigmoid(logits / temperature), computed as the two-class softmax so that it never overflows."""
    z = np.asarray(logits, dtype=np.float64)
    return softmax(as_binary_decisions(z), temperature)[:, 1].reshape(z.shape)


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray) -> list[float]:
    """Each class's decision threshold: the one that maximises its F1 on these images (a class is predicted where
    its probability >= the threshold), placed halfway to the next lower probability seen, so that it sits in the gap
    the images leave rather than on one of them. UNTUNED_THRESHOLD where the images hold no positive or no negative.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    return [_best_threshold(y[:, c], p[:, c]) for c in range(p.shape[1])]


def _best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        return UNTUNED_THRESHOLD
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    hits = np.cumsum(y_sorted)
    last_of_value = np.flatnonzero(np.r_[p_sorted[1:] != p_sorted[:-1], True])  # predict the first i+1 images
    f1 = 2 * hits[last_of_value] / (last_of_value + 1 + positives)
    i = int(last_of_value[int(np.argmax(f1))])
    lower = p_sorted[i + 1] if i + 1 < len(p_sorted) else 0.0
    return float((p_sorted[i] + lower) / 2)


def predictions(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """0/1 decisions [N, C]: probability >= the class's threshold."""
    return (np.asarray(probs) >= np.asarray(thresholds, dtype=np.float64)[None, :]).astype(np.int64)


def multi_label_metrics(
    *, y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], thresholds: Sequence[float]
) -> dict[str, Any]:
    """mAP (macro, over classes with a positive), micro/macro P/R/F1, subset accuracy and hamming loss at
    ``thresholds``; per class: P/R/F1, AP, support, threshold and the confusion counts (tp, fp, fn, tn)."""
    y = np.asarray(y_true, dtype=np.int64)
    out: dict[str, Any] = {"n": int(len(y)), "labels": list(labels), "thresholds": [float(t) for t in thresholds]}
    if len(y) == 0:
        return out
    pred = predictions(probs, thresholds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class absent from a small set: its zeros are reported as such
        for avg in ("micro", "macro"):
            p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
            out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
        out["subset_accuracy"] = float(skm.accuracy_score(y, pred))
        out["hamming_loss"] = float(skm.hamming_loss(y, pred))
        ap = _average_precisions(y, probs)
        measured = [v for v in ap if v is not None]
        out["mean_average_precision"] = float(np.mean(measured)) if measured else None
        p, r, f, s = skm.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    out["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "average_precision": ap[i],
               "support": int(s[i]), "threshold": float(thresholds[i])}
        for i, name in enumerate(labels)
    }
    out["confusion_counts"] = {name: _counts(y[:, i], pred[:, i]) for i, name in enumerate(labels)}
    return out


def _average_precisions(y: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """Each class's average precision; None for a class without a positive image (AP is not defined)."""
    return [float(skm.average_precision_score(y[:, c], probs[:, c])) if y[:, c].any() else None
            for c in range(y.shape[1])]


def _counts(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    return {"tp": int(((y == 1) & (pred == 1)).sum()), "fp": int(((y == 0) & (pred == 1)).sum()),
            "fn": int(((y == 1) & (pred == 0)).sum()), "tn": int(((y == 0) & (pred == 0)).sum())}


def binary_losses(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Each image's binary cross-entropy (mean over its classes) of sigmoid(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y_true, dtype=np.float64)
    per = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))  # stable BCE with logits
    return per.mean(axis=1)


def multi_label_rows(ev: EvalResult, classes: Sequence[str], *, temperature: float,
                     thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """One row per evaluated image: path, true and predicted labels (space-separated), loss (BCE), correct (the
    whole set right), and each class's probability (scores)."""
    if len(ev.y_true) == 0:
        return []
    probs = sigmoid(ev.logits, temperature)
    pred = predictions(probs, thresholds)
    loss = binary_losses(ev.logits, ev.y_true, temperature)

    def names(row: np.ndarray) -> str:
        return " ".join(classes[int(i)] for i in np.flatnonzero(row))

    return [
        {"path": ev.paths[i], "true": names(ev.y_true[i]), "predicted": names(pred[i]), "loss": float(loss[i]),
         "correct": bool((pred[i] == ev.y_true[i]).all()),
         "scores": {name: float(probs[i, c]) for c, name in enumerate(classes)}}
        for i in range(len(ev.y_true))
    ]


def worst_rows(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` images with a wrong set of labels and the highest binary cross-entropy, worst first."""
    wrong = sorted((r for r in rows if not r["correct"]), key=lambda r: (-r["loss"], r["path"]))
    return [{key: r[key] for key in ("path", "true", "predicted", "loss")} for r in wrong[:k]]


def calibration_metrics(ev: EvalResult, classes: Sequence[str], *, temperature: float, n_bins: int) -> dict[str, Any]:
    """ECE of every (image, class) decision together, before and after the temperature, and of each class."""
    y = np.asarray(ev.y_true, dtype=np.int64)
    flat = y.reshape(-1)
    binary = as_binary_decisions(ev.logits)
    per_class = {}
    for c, name in enumerate(classes):
        scaled = softmax(as_binary_decisions(ev.logits[:, c]), temperature)
        per_class[name] = expected_calibration_error(scaled, y[:, c], n_bins=n_bins)
    return {
        "ece": expected_calibration_error(softmax(binary, temperature), flat, n_bins=n_bins),
        "ece_before_temperature": expected_calibration_error(softmax(binary), flat, n_bins=n_bins),
        "ece_per_class": per_class,
    }
