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

EVAL_SPLITS = ("train", "val", "test", "all")


@dataclass
class Selection:
    """Which labelled images an evaluation scores, and what they are to the model."""

    samples: list[tuple[str, int]]
    name: str  # for the default output folder: eval-<name>
    split: str | None  # train | val | test | all, or None: a whole folder the model was not trained on
    held_out: bool  # whether the model is meant never to have seen these images
    note: str | None = None  # which images were chosen and why, for the person running it


def select_images(
    data_dir: str | os.PathLike, *, classes: Sequence[str], split: str | None, record: dict[str, Any] | None,
    settings: dict[str, Any],
) -> Selection:
    """The images to score. On the folder the model was trained on, the split it held out (or ``split``), file for
    file from the model's record of its training data; elsewhere the whole folder, or one split of a split root."""
    root = Path(data_dir).expanduser()
    if split is not None and split not in EVAL_SPLITS:
        raise UsageError(f"--split {split!r}: expected train, val, test or all")
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder")
    if record and root.resolve() == Path(record["root"]):
        return _training_folder(root, record, classes=classes, split=split)
    split_dirs = data.find_split_folders(root)
    if not record and settings.get("data_dir") and root.resolve() == Path(settings["data_dir"]).expanduser().resolve() \
            and "train" not in split_dirs:
        return _redrawn_split(root, classes=classes, split=split, settings=settings)
    if "train" in split_dirs or (split in split_dirs and split != "all"):
        if split == "all":
            samples = [s for name in split_dirs for s in data.eval_samples(root, classes=classes, split=name)[0]]
            return Selection(samples, f"{root.name}-all", "all", held_out=False)
        samples, index = data.eval_samples(root, classes=classes, split=split)
        chosen = split or ("test" if "test" in split_dirs else "val")
        return Selection(samples, f"{root.name}-{Path(index.root).name}", chosen, held_out=True)
    if split not in (None, "all"):
        raise UsageError(
            f"--split {split}: {root} holds class folders that this model was not trained on, so it has no {split} "
            "split; drop --split to score all its images"
        )
    samples, _ = data.eval_samples(root, classes=classes)
    return Selection(samples, root.name or "data", None, held_out=True)


_SPLIT_WORDS = {
    "val": "images it held out for validation", "test": "images of its test split",
    "train": "images it was trained on", "all": "images of every split",
}


def _training_folder(root: Path, record: dict[str, Any], *, classes: Sequence[str], split: str | None) -> Selection:
    stored = {
        name: [(str(Path(record["root"]) / rel), int(y)) for rel, y in zip(part["paths"], part["labels"])]
        for name, part in record["splits"].items()
    }
    split_dirs = data.find_split_folders(root) if record["layout"] == "split-folders" else {}
    chosen = split or ("test" if "test" in split_dirs else "val")
    if chosen == "test" and "test" not in split_dirs:
        raise UsageError(
            f"--split test: the model was trained on {root} without a test split; choose val (the images it held out), "
            "train or all"
        )
    test = data.eval_samples(root, classes=classes, split="test")[0] if "test" in split_dirs and chosen in ("test", "all") else []
    samples = {"train": stored["train"], "val": stored["val"], "test": test, "all": stored["train"] + stored["val"] + test}[chosen]
    listed = {p for part in stored.values() for p, _ in part}
    scanned = Path(record["root"]) if record["layout"] == "class-folders" else split_dirs["train"]
    present = {str(p) for files in data.scan_class_folders(scanned).files.values() for p in files}
    added = len(present - listed) if record["layout"] == "class-folders" else 0
    note = (
        f"{root} is the folder this model was trained on: scoring the {len(samples)} {_SPLIT_WORDS[chosen]}"
        + (" (--split train|val|all to choose)" if split is None else "")
        + (f"; {added} image(s) added since training belong to no split and are not scored" if added else "")
    )
    return Selection(samples, f"{root.name}-{chosen}", chosen, held_out=chosen in ("val", "test"), note=note)


def _redrawn_split(root: Path, *, classes: Sequence[str], split: str | None, settings: dict[str, Any]) -> Selection:
    """A model from before stored splits, on its training folder: draw the split again from its seed."""
    chosen = split or "val"
    if chosen == "test":
        raise UsageError(f"--split test: {root} has no test split; choose val, train or all")
    index = data.scan_dataset(root, val_split=settings.get("val_split", 0.2), seed=settings.get("seed", 0))
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(index.classes) - set(classes))
    if unknown:
        raise RescliError(f"{root}: class folder(s) {', '.join(unknown)} unknown to the model (its classes: {', '.join(classes)})")
    parts = {name: [(p, lookup[index.classes[y]]) for p, y in index.splits[name]] for name in ("train", "val")}
    samples = parts["train"] + parts["val"] if chosen == "all" else parts[chosen]
    note = (f"{root} is the folder this model was trained on: scoring the {len(samples)} {_SPLIT_WORDS[chosen]}, "
            "drawn again from its seed (the model predates stored splits, so images added since may be among them)")
    return Selection(samples, f"{root.name}-{chosen}", chosen, held_out=chosen == "val", note=note)


def count_seen_in_training(samples: Sequence[tuple[str, int]], record: dict[str, Any] | None, *, workers: int = 4) -> int | None:
    """How many of ``samples`` the model was trained on: the same file, or a file with the same content.
    None when the model carries no record of its training images."""
    if not record or "train_sha1" not in record:
        return None
    root = Path(record["root"])
    trained_paths = {os.path.realpath(root / rel) for rel in record["splits"]["train"]["paths"]}
    trained_hashes = set(record["train_sha1"])
    paths = [p for p, _ in samples]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL: threads read and hash in parallel
        hashes = list(pool.map(_short_sha1, paths))
    return sum(os.path.realpath(p) in trained_paths or (h is not None and h in trained_hashes) for p, h in zip(paths, hashes))


def _short_sha1(path: str) -> str | None:
    import hashlib

    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:16]


def training_record(predictor: Any) -> dict[str, Any] | None:
    """The model's record of its training data (``data`` in a checkpoint, or in an export's metadata)."""
    return predictor.meta.get("data")


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
    """Metrics of ``model`` (checkpoint or export) on labelled images (see ``select_images``).

    Scores use the model's stored temperature unless ``raw_scores``. Unless ``write_files`` is False, the
    artefacts go to ``output`` (default: ``<model's folder>/eval-<name>``), which may not lie inside the data
    folder. Returns (metrics, per-sample result, output folder or None); ``metrics["evaluated"]`` says which
    images were scored (``split``, ``note``) and how many of them the model was trained on (``seen_in_training``).
    """
    from rescli.predict import load_predictor
    from rescli.runfolder import refuse_inside_data

    model = Path(model)
    predictor = load_predictor(model, device=device, precision=precision, compile=compile)
    record = training_record(predictor)
    chosen = select_images(data_dir, classes=predictor.classes, split=split, record=record,
                           settings=predictor.meta.get("settings", {}))
    if not chosen.samples:
        raise RescliError(f"{data_dir}: no images to evaluate" + (f" in the {chosen.split} split" if chosen.split else ""))
    data_root = Path(data_dir).expanduser().resolve()
    out_dir = None
    if write_files:
        out_dir = Path(output).expanduser().resolve() if output is not None else model.resolve().parent / f"eval-{chosen.name}"
        refuse_inside_data(out_dir, data_root, what="evaluation output")
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--output {out_dir}: exists and is not a folder")
    n_workers = default_workers() if workers is None else workers
    seen = count_seen_in_training(chosen.samples, record, workers=max(2, n_workers)) if chosen.split not in ("train", "all") else None
    dataset = data.ImageSamples(chosen.samples, predictor.transform(), draft_size=data.draft_size_for(predictor.img_size, train=False))
    loader = data.make_loader(dataset, batch_size=batch_size, shuffle=False, workers=n_workers)
    ev = run_eval(predictor.logits, loader)
    if len(ev.y_true) == 0:
        raise RescliError(f"{data_dir}: none of the {len(chosen.samples)} image(s) could be read")
    temperature = 1.0 if raw_scores else predictor.temperature
    extra = {
        "evaluated": {
            "model": str(model.resolve()),
            "data_dir": str(data_root),
            "split": chosen.split,
            "held_out": chosen.held_out,
            "seen_in_training": seen,
            "note": chosen.note,
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
