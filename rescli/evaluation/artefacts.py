"""The files an evaluation writes: metrics.json, predictions.csv, the figures and report.html; the
temperature fitted on a validation split, and (multi-label) each class's threshold tuned on it."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rescli.core.errors import RescliError
from rescli.core.fileio import atomic_write_json, atomic_write_text
from rescli.data.tasks import MULTI
from rescli.evaluation.calibration import as_binary_decisions, fit_temperature, softmax
from rescli.evaluation.evaluate import EvalResult
from rescli.evaluation.metrics import ECE_BINS, TOP_LOSSES, metrics_from, per_sample
from rescli.evaluation.multilabel import sigmoid, tune_thresholds
from rescli.evaluation.plots import (
    plot_confusion_matrix,
    plot_curves,
    plot_pr_curves,
    plot_reliability,
    plot_top_losses,
)
from rescli.evaluation.report import write_html_report

#: Above this many classes confusion_matrix.png shows the classes most involved in confusions.
MAX_PLOT_CLASSES = 30


SINGLE_LABEL_COLUMNS = ["path", "true", "predicted", "score", "true_score", "loss", "correct"]


MULTI_LABEL_COLUMNS = ["path", "true", "predicted", "loss", "correct"]  # then one probability column per class


def write_predictions_csv(path: Path, rows: list[dict[str, Any]], *, multi_label: list[str] | None = None) -> None:
    """One row per image. Paths and class names that are not UTF-8 are written as their original bytes (fileio's
    "raw" for .csv), so each path still names its file, as `find` or `ls` would print it.

    ``multi_label``: the classes of multi-label rows, each of which gets a column with its probability, named
    ``score:CLASS``; true and predicted are then the labels joined by spaces."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    fields = MULTI_LABEL_COLUMNS if multi_label is not None else SINGLE_LABEL_COLUMNS
    score_columns = list(multi_label or [])
    writer.writerow(fields + [f"score:{c}" for c in score_columns])
    for r in rows:
        writer.writerow([_csv_cell(r[f]) for f in fields] + [_csv_cell(r["scores"][c]) for c in score_columns])
    atomic_write_text(path, buf.getvalue())


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value).lower() if isinstance(value, bool) else value


def fitted_temperature(ev: EvalResult) -> tuple[float, str | None]:
    """The NLL-minimising temperature on ``ev``, or (1.0, why not) where it is not defined.

    With no mistakes at all the NLL keeps falling as T -> 0, so a "fit" would only make the model maximally
    over-confident on new data; 1.0 is kept instead.
    """
    n = len(ev.y_true)
    if n < 2 or (ev.task is not MULTI and ev.logits.shape[1] < 2):
        return 1.0, "not fitted: fewer than 2 validation images"
    if np.all(ev.y_pred == ev.y_true):
        return 1.0, "not fitted: every validation image is classified correctly, so no temperature is identifiable"
    if ev.task is MULTI:  # one temperature for every class's sigmoid, fitted on all the binary decisions
        return fit_temperature(as_binary_decisions(ev.logits), ev.y_true.reshape(-1)), None
    return fit_temperature(ev.logits, ev.y_true), None


def write_evaluation(
    *,
    out_dir: str | os.PathLike,
    ev: EvalResult,
    classes: list[str],
    temperature: float | None = None,
    fit: bool = False,
    history: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    report: bool = True,
    heatmaps: Callable[[list[dict[str, Any]]], dict[str, np.ndarray]] | None = None,
    thresholds: list[float] | None = None,
) -> dict[str, Any]:
    """Compute the metrics of ``ev`` and write every evaluation artefact into ``out_dir``; return the metrics.

    ``fit=True`` fits a temperature on ``ev`` (use it on the validation split only), and for a multi-label result
    tunes each class's threshold on it; otherwise ``temperature`` (default 1.0) and ``thresholds`` (default 0.5 each)
    are applied as given. The returned dict is what metrics.json holds; its ``temperature`` (and ``thresholds``) are
    what a checkpoint should store. ``heatmaps``: the worst mistakes' heatmaps for top_losses.png
    (rescli.insight.reports; single-label).
    """

    out = Path(out_dir)
    n = len(ev.y_true)
    note = None
    if fit:
        t, note = fitted_temperature(ev)
    else:
        t = 1.0 if temperature is None else float(temperature)
    if fit and ev.task is MULTI and n:  # on the calibrated probabilities that predict will threshold
        thresholds = tune_thresholds(ev.y_true, sigmoid(ev.logits, t))
    metrics = metrics_from(ev, classes, temperature=t, thresholds=thresholds)
    if fit:
        metrics["temperature_source"] = note or f"fitted on the validation split ({n} images)"
    if ev.task is MULTI:
        metrics["thresholds_source"] = (f"tuned on the validation split ({n} images), each maximising its class's F1"
                                        if fit else "the model's" if thresholds is not None else "0.5 for every class")
    if extra:
        metrics.update(extra)
    try:
        write_predictions_csv(out / "predictions.csv", per_sample(ev, classes, temperature=t, thresholds=thresholds),
                              multi_label=classes if ev.task is MULTI else None)
        if n:
            _write_figures(out, ev, classes, metrics, temperature=t, heatmaps=heatmaps)
        if history is not None:
            plot_curves(history, out / "curves.png")
        atomic_write_json(out / "metrics.json", metrics)
        if report:
            write_html_report(out)
    except OSError as exc:
        raise RescliError(f"cannot write evaluation files to {out}: {exc.strerror or exc}") from exc
    return metrics


def _write_figures(
    out: Path, ev: EvalResult, classes: list[str], metrics: dict[str, Any], *, temperature: float,
    heatmaps: Callable[[list[dict[str, Any]]], dict[str, np.ndarray]] | None = None,
) -> None:
    """confusion_matrix.png, top_losses.png and reliability.png (before and after the temperature, if it is not 1).
    Multi-label: pr_curves.png instead of the confusion matrix, and the reliability of the binary decisions."""
    scaled = temperature != 1.0
    if ev.task is MULTI:
        plot_pr_curves(ev.y_true, sigmoid(ev.logits, temperature), classes, out / "pr_curves.png",
                       thresholds=metrics["thresholds"])
        plot_top_losses(metrics["top_losses"], out / "top_losses.png", max_items=TOP_LOSSES, sets=True)
        binary = as_binary_decisions(ev.logits)
        plot_reliability(softmax(binary, temperature), ev.y_true.reshape(-1), out / "reliability.png",
                         n_bins=ECE_BINS, temperature=temperature if scaled else None,
                         logits=binary if scaled else None)
        return
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), classes, out / "confusion_matrix.png",
                          max_classes=MAX_PLOT_CLASSES)
    # Issue #16: each mistake drawn with the heatmap of its predicted label, where the model can be explained.
    overlays = heatmaps(metrics["top_losses"][:TOP_LOSSES]) if heatmaps is not None else None
    plot_top_losses(metrics["top_losses"], out / "top_losses.png", max_items=TOP_LOSSES, overlays=overlays)
    plot_reliability(softmax(ev.logits, temperature), ev.y_true, out / "reliability.png", n_bins=ECE_BINS,
                     temperature=temperature if scaled else None, logits=ev.logits if scaled else None)
