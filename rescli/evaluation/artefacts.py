"""The files an evaluation writes: metrics.json, predictions.csv, the figures and report.html; the
temperature fitted on a validation split."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rescli.core.errors import RescliError
from rescli.core.fileio import atomic_write_json, atomic_write_text
from rescli.evaluation.calibration import fit_temperature, softmax
from rescli.evaluation.evaluate import EvalResult
from rescli.evaluation.metrics import ECE_BINS, TOP_LOSSES, metrics_from, per_sample
from rescli.evaluation.plots import plot_confusion_matrix, plot_curves, plot_reliability, plot_top_losses
from rescli.evaluation.report import write_html_report

#: Above this many classes confusion_matrix.png shows the classes most involved in confusions.
MAX_PLOT_CLASSES = 30


def write_predictions_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per image. Paths and class names that are not UTF-8 are written as their original bytes (fileio's
    "raw" for .csv), so each path still names its file, as `find` or `ls` would print it."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    fields = ["path", "true", "predicted", "score", "true_score", "loss", "correct"]
    writer.writerow(fields)
    for r in rows:
        writer.writerow([_csv_cell(r[f]) for f in fields])
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
    if n < 2 or ev.logits.shape[1] < 2:
        return 1.0, "not fitted: fewer than 2 validation images"
    if np.all(ev.y_pred == ev.y_true):
        return 1.0, "not fitted: every validation image is classified correctly, so no temperature is identifiable"
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
) -> dict[str, Any]:
    """Compute the metrics of ``ev`` and write every evaluation artefact into ``out_dir``; return the metrics.

    ``fit=True`` fits a temperature on ``ev`` (use it on the validation split only); otherwise ``temperature``
    (default 1.0) is applied as given. The returned dict is what metrics.json holds; its ``temperature`` is what a
    checkpoint should store. ``heatmaps``: the worst mistakes' heatmaps for top_losses.png (rescli.insight.reports).
    """

    out = Path(out_dir)
    n = len(ev.y_true)
    note = None
    if fit:
        t, note = fitted_temperature(ev)
    else:
        t = 1.0 if temperature is None else float(temperature)
    metrics = metrics_from(ev, classes, temperature=t)
    if fit:
        metrics["temperature_source"] = note or f"fitted on the validation split ({n} images)"
    if extra:
        metrics.update(extra)
    try:
        write_predictions_csv(out / "predictions.csv", per_sample(ev, classes, temperature=t))
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
    """confusion_matrix.png, top_losses.png and reliability.png (before and after the temperature, if it is not 1)."""
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), classes, out / "confusion_matrix.png",
                          max_classes=MAX_PLOT_CLASSES)
    # Issue #16: each mistake drawn with the heatmap of its predicted label, where the model can be explained.
    overlays = heatmaps(metrics["top_losses"][:TOP_LOSSES]) if heatmaps is not None else None
    plot_top_losses(metrics["top_losses"], out / "top_losses.png", max_items=TOP_LOSSES, overlays=overlays)
    scaled = temperature != 1.0
    plot_reliability(softmax(ev.logits, temperature), ev.y_true, out / "reliability.png", n_bins=ECE_BINS,
                     temperature=temperature if scaled else None, logits=ev.logits if scaled else None)
