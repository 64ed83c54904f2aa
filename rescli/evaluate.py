"""Evaluation: run a model over labelled images, turn the logits into metrics, and write what people look at.

``run_eval`` collects logits; ``metrics_from`` turns them into scikit-learn metrics plus calibration numbers;
``write_evaluation`` writes the artefacts of an evaluation into a folder (metrics.json, predictions.csv,
confusion_matrix.png, top_losses.png, reliability.png, curves.png when a history is given, report.html).
``finetune`` calls it on the validation split of its best epoch (fitting the temperature there), ``rescli evaluate``
through ``evaluate_folder`` (applying the model's stored temperature).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from rescli import data
from rescli.calibration import expected_calibration_error, fit_temperature, softmax
from rescli.errors import RescliError, UsageError
from rescli.fileio import atomic_write_json, atomic_write_text
from rescli.metrics import classification_metrics
from rescli.runtime import default_workers

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


# --- numbers ---------------------------------------------------------------------------------------------

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
    from rescli.plots import most_confused

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


# --- files -----------------------------------------------------------------------------------------------

def write_predictions_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per image. Paths and class names that are not UTF-8 are written as their original bytes (fileio's
    "raw" for .csv), so each path still names its file, as `find` or `ls` would print it."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    fields = ["path", "true", "predicted", "score", "true_score", "loss", "correct"]
    writer.writerow(fields)
    for r in rows:
        writer.writerow([f"{r[f]:.6f}" if isinstance(r[f], float) else str(r[f]).lower() if isinstance(r[f], bool) else r[f]
                         for f in fields])
    atomic_write_text(path, buf.getvalue())


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
) -> dict[str, Any]:
    """Compute the metrics of ``ev`` and write every evaluation artefact into ``out_dir``; return the metrics.

    ``fit=True`` fits a temperature on ``ev`` (use it on the validation split only); otherwise ``temperature``
    (default 1.0) is applied as given. The returned dict is what metrics.json holds; its ``temperature`` is what a
    checkpoint should store.
    """
    from rescli import plots

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
        rows = per_sample(ev, classes, temperature=t)
        write_predictions_csv(out / "predictions.csv", rows)
        if n:
            plots.plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), classes, out / "confusion_matrix.png",
                                        max_classes=MAX_PLOT_CLASSES)
            plots.plot_top_losses(metrics["top_losses"], out / "top_losses.png", max_items=TOP_LOSSES)
            plots.plot_reliability(softmax(ev.logits, t), ev.y_true, out / "reliability.png", n_bins=ECE_BINS,
                                   **({"temperature": t, "logits": ev.logits} if t != 1.0 else {}))
        if history is not None:
            plots.plot_curves(history, out / "curves.png")
        atomic_write_json(out / "metrics.json", metrics)
        if report:
            from rescli.report import write_html_report

            write_html_report(out)
    except OSError as exc:
        raise RescliError(f"cannot write evaluation files to {out}: {exc.strerror or exc}") from exc
    return metrics


# --- rescli evaluate -------------------------------------------------------------------------------------

def default_output_dir(model: Path, data_root: Path, index: data.DatasetIndex) -> Path:
    """``<model's folder>/eval-<data folder>[-<split folder>]``."""
    name = data_root.name or "data"
    evaluated = Path(index.root).resolve()
    if "eval" in index.splits and evaluated != data_root:
        name = f"{name}-{evaluated.name}"
    elif "eval" not in index.splits:  # the held-out validation split of a train-only root
        name = f"{name}-val"
    return model.resolve().parent / f"eval-{name}"


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def evaluate_folder(
    *,
    model: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str | None = None,
    output: str | os.PathLike | None = None,
    raw_scores: bool = False,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    write_files: bool = True,
) -> tuple[dict[str, Any], EvalResult, Path | None]:
    """Metrics of ``model`` (checkpoint or export) on a class folder or one split of a split root.

    Scores use the model's stored temperature unless ``raw_scores``. Unless ``write_files`` is False, the
    artefacts go to ``output`` (default: ``default_output_dir``), which may not lie inside the data folder.
    Returns (metrics, per-sample result, output folder or None).
    """
    from rescli.predict import load_predictor

    model = Path(model)
    predictor = load_predictor(model, device=device, precision=precision, compile=compile)
    settings = predictor.meta.get("settings", {})
    samples, index = data.eval_samples(
        data_dir, classes=predictor.classes, split=split,
        val_split=settings.get("val_split", 0.2), seed=settings.get("seed", 0),
    )
    data_root = Path(data_dir).expanduser().resolve()
    out_dir = None
    if write_files:
        out_dir = Path(output).expanduser().resolve() if output is not None else default_output_dir(model, data_root, index)
        if _inside(out_dir, data_root):
            raise UsageError(
                f"evaluation output {out_dir} lies inside the data folder {data_root}; rescli never writes there. "
                "Choose another folder with --output DIR"
            )
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--output {out_dir}: exists and is not a folder")
    dataset = data.ImageSamples(samples, predictor.transform(), draft_size=data.draft_size_for(predictor.img_size, train=False))
    loader = data.make_loader(dataset, batch_size=batch_size, shuffle=False, workers=default_workers() if workers is None else workers)
    ev = run_eval(predictor.logits, loader)
    if len(ev.y_true) == 0:
        raise RescliError(f"{data_dir}: none of the {len(samples)} image(s) could be read")
    temperature = 1.0 if raw_scores else predictor.temperature
    extra = {
        "evaluated": {
            "model": str(model.resolve()),
            "data_dir": str(data_root),
            "images_folder": str(Path(index.root).resolve()),
            "split": "val (held out)" if "eval" not in index.splits else (split or None),
            "temperature_source": "none (--raw-scores)" if raw_scores else "the model's stored temperature",
        },
        "skipped": [{"path": p, "error": e} for p, e in ev.failures],
    }
    if out_dir is None:
        metrics = metrics_from(ev, predictor.classes, temperature=temperature)
        metrics.update(extra)
    else:
        metrics = write_evaluation(out_dir=out_dir, ev=ev, classes=predictor.classes, temperature=temperature, extra=extra)
    return metrics, ev, out_dir
