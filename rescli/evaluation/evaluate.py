"""Evaluation: run a model over labelled images, turn the logits into metrics, and write what people look at.

``run_eval`` collects logits; ``metrics_from`` turns them into scikit-learn metrics plus calibration numbers;
``write_evaluation`` writes the artefacts of an evaluation into a folder (metrics.json, predictions.csv,
confusion_matrix.png, top_losses.png, reliability.png, curves.png when a history is given, report.html).
``finetune`` calls it on the validation split of its best epoch (fitting the temperature there), ``rescli evaluate``
through ``evaluate_folder`` (applying the model's stored temperature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from rescli.evaluation.calibration import (
    expected_calibration_error,
    softmax,
)
from rescli.evaluation.metrics import classification_metrics

#: How many mistakes top_losses.png shows (and metrics.json lists).
TOP_LOSSES = 16


#: How many most-confused (true, predicted) pairs metrics.json lists.
MOST_CONFUSED = 10


#: Above this many classes confusion_matrix.png shows the classes most involved in confusions.
MAX_PLOT_CLASSES = 30


#: Bins of the reliability diagram and of the expected calibration error.
ECE_BINS = 15


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    y_true: np.ndarray
    y_pred: np.ndarray
    logits: np.ndarray  # [N, C] float32, in the order of ``paths``
    paths: list[str]
    failures: list[tuple[str, str]]  # (path, why) for images that could not be read


def run_eval(logits_fn: Callable[[torch.Tensor], torch.Tensor], loader) -> EvalResult:
    """``logits_fn`` maps a uint8 batch to CPU float logits; plain arrays come back."""
    samples = loader.dataset.samples
    logits_all, labels_all, idx_all, failures = [], [], [], []
    for batch in loader:
        failures += [(samples[i][0], msg) for i, msg in batch.failures]
        if batch.labels.numel():
            logits_all.append(logits_fn(batch.images))
            labels_all.append(batch.labels)
            idx_all.append(batch.indices)
    if not logits_all:
        return eval_result(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [], failures)
    order = torch.cat(idx_all).tolist()
    return eval_result(torch.cat(logits_all), torch.cat(labels_all), [samples[i][0] for i in order], failures)


def eval_result(logits: torch.Tensor, labels: torch.Tensor, paths: list[str], failures: list[tuple[str, str]]) -> EvalResult:
    """Loss, accuracy and predictions from CPU logits [N, C] and labels [N] (N may be 0: NaN loss and accuracy)."""
    if not len(labels):
        empty = np.zeros(0, dtype=np.int64)
        return EvalResult(float("nan"), float("nan"), empty, empty, np.zeros((0, 0), np.float32), [], failures)
    logits = logits.float()
    pred = logits.argmax(1)
    return EvalResult(
        loss=float(F.cross_entropy(logits, labels)),
        accuracy=float((pred == labels).float().mean()),
        y_true=labels.numpy(),
        y_pred=pred.numpy(),
        logits=logits.numpy(),
        paths=paths,
        failures=failures,
    )


def per_sample(ev: EvalResult, classes: Sequence[str], *, temperature: float = 1.0) -> list[dict[str, Any]]:
    """One row per evaluated image: path, true, predicted, score (probability of predicted), true_score, loss."""
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


def metrics_from(ev: EvalResult, classes: list[str], *, temperature: float = 1.0) -> dict[str, Any]:
    """scikit-learn metrics of ``softmax(logits / temperature)``, calibration (ECE before/after) and most-confused pairs.

    Predictions (argmax) do not depend on the temperature; the scores, log loss and ECE do.
    """
    from rescli.evaluation.plots import most_confused

    n = len(ev.y_true)
    probs = softmax(ev.logits, temperature) if n else None
    metrics = classification_metrics(y_true=ev.y_true, y_pred=ev.y_pred, labels=classes, probs=probs)
    metrics["loss"] = ev.loss
    metrics["temperature"] = float(temperature)
    if n:
        raw = softmax(ev.logits)
        metrics["ece"] = expected_calibration_error(probs, ev.y_true, n_bins=ECE_BINS)
        metrics["ece_before_temperature"] = expected_calibration_error(raw, ev.y_true, n_bins=ECE_BINS)
        if "log_loss" in metrics:
            metrics["log_loss_before_temperature"] = float(-np.mean(np.log(np.clip(raw[np.arange(n), ev.y_true], 1e-12, 1.0))))
        metrics["most_confused"] = most_confused(np.asarray(metrics["confusion_matrix"]), list(classes), k=MOST_CONFUSED)
        metrics["top_losses"] = top_losses(per_sample(ev, classes, temperature=temperature))
    return metrics
