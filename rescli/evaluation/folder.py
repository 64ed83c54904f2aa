"""`rescli evaluate`: a model (checkpoint or export) on a folder of labelled images or a label table, and its
files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rescli.core.errors import RescliError, UsageError
from rescli.core.paths import refuse_inside_data
from rescli.core.runtime import default_workers
from rescli.data.layout import data_folder
from rescli.data.loading import ImageSamples, make_loader
from rescli.data.tables import TableOptions
from rescli.data.tasks import MULTI
from rescli.data.transforms import draft_size_for
from rescli.evaluation.artefacts import write_evaluation
from rescli.evaluation.evaluate import EvalResult, run_eval
from rescli.evaluation.metrics import metrics_from
from rescli.evaluation.selection import (
    count_seen_in_training,
    select_images,
    training_record,
)
from rescli.inference.load import load_predictor
from rescli.insight.reports import heatmaps_for_model


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
    path_column: str | None = None,
    label_column: str | None = None,
    label_sep: str | None = None,
) -> tuple[dict[str, Any], EvalResult, Path | None]:
    """Metrics of ``model`` (checkpoint or export) on labelled images (see ``select_images``).

    Scores use the model's stored temperature (and, multi-label, its thresholds) unless ``raw_scores``. A label
    table is read as the model's training table was (its task; its columns and separator unless ``path_column``,
    ``label_column`` or ``label_sep`` say otherwise). Unless ``write_files`` is False,
    the artefacts go to ``output`` (default: ``<model's folder>/eval-<name>``), which may not lie inside the data
    folder. Returns (metrics, per-sample result, output folder or None); ``metrics["evaluated"]`` says which
    images were scored (``split``, ``note``) and how many of them the model was trained on (``seen_in_training``).
    """
    model = Path(model)
    predictor = load_predictor(model, device=device, precision=precision, compile=compile)
    record = training_record(predictor)
    settings = predictor.meta.get("settings", {})
    table = _as_trained(predictor, path_column=path_column, label_column=label_column, label_sep=label_sep)
    chosen = select_images(data_dir, classes=predictor.classes, split=split, record=record, settings=settings,
                           task=predictor.task, table=table)
    if not chosen.samples:
        where = f" in the {chosen.split} split" if chosen.split else ""
        raise RescliError(f"{data_dir}: no images to evaluate{where}")
    data_root = Path(data_dir).expanduser().resolve()
    out_dir = (_output_folder(output, model=model, name=chosen.name, data_root=data_folder(data_root))
               if write_files else None)
    n_workers = default_workers() if workers is None else workers
    seen = None
    if chosen.split not in ("train", "all"):
        seen = count_seen_in_training(chosen.samples, record, workers=max(2, n_workers))
    dataset = ImageSamples(chosen.samples, predictor.transform(), draft_size=draft_size_for(predictor.img_size,
                           train=False), task=predictor.task, n_classes=len(predictor.classes))
    ev = run_eval(predictor.logits, make_loader(dataset, batch_size=batch_size, shuffle=False, workers=n_workers))
    if len(ev.y_true) == 0:
        raise RescliError(f"{data_dir}: none of the {len(chosen.samples)} image(s) could be read")
    temperature = 1.0 if raw_scores else predictor.temperature
    extra = {
        "evaluated": {"model": str(model.resolve()), "data_dir": str(data_root), "split": chosen.split,
                      "held_out": chosen.held_out, "seen_in_training": seen, "note": chosen.note,
                      "temperature_source": "none (--raw-scores)" if raw_scores else "the model's stored temperature"},
        "skipped": [{"path": p, "error": e} for p, e in ev.failures],
    }
    thresholds = None if raw_scores else predictor.thresholds  # tuned on calibrated scores: not for raw ones
    if out_dir is None:
        metrics = metrics_from(ev, predictor.classes, temperature=temperature, thresholds=thresholds)
        metrics.update(extra)
    else:
        metrics = write_evaluation(out_dir=out_dir, ev=ev, classes=predictor.classes, temperature=temperature,
                                   extra=extra, thresholds=thresholds,
                                   heatmaps=heatmaps_for_model(model))  # issue #16: mistakes' heatmaps
    return metrics, ev, out_dir


def _as_trained(predictor: Any, *, path_column: str | None, label_column: str | None,
                label_sep: str | None) -> TableOptions:
    """How to read a label table: as the model's training table was read, but for the options given."""
    settings = predictor.meta.get("settings", {})
    return TableOptions(path_column=path_column or settings.get("path_column"),
                        label_column=label_column or settings.get("label_column"),
                        multi_label=predictor.task is MULTI, label_sep=label_sep or settings.get("label_sep") or " ")


def _output_folder(output: str | os.PathLike | None, *, model: Path, name: str, data_root: Path) -> Path:
    """``output``, or eval-<name> beside the model; never inside the data folder, never an existing file."""
    out_dir = Path(output).expanduser().resolve() if output is not None else model.resolve().parent / f"eval-{name}"
    refuse_inside_data(out_dir, data_root, what="evaluation output")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output {out_dir}: exists and is not a folder")
    return out_dir
