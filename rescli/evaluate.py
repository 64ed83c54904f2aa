"""Evaluation: run a model over labelled images and turn the logits into metrics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from rescli import data
from rescli.metrics import classification_metrics
from rescli.runtime import default_workers


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
        empty = np.zeros(0, dtype=np.int64)
        return EvalResult(float("nan"), float("nan"), empty, empty, np.zeros((0, 0), np.float32), [], failures)
    logits = torch.cat(logits_all).float()
    labels = torch.cat(labels_all)
    order = torch.cat(idx_all).tolist()
    pred = logits.argmax(1)
    return EvalResult(
        loss=float(F.cross_entropy(logits, labels)),
        accuracy=float((pred == labels).float().mean()),
        y_true=labels.numpy(),
        y_pred=pred.numpy(),
        logits=logits.numpy(),
        paths=[samples[i][0] for i in order],
        failures=failures,
    )


def metrics_from(ev: EvalResult, classes: list[str], *, temperature: float = 1.0) -> dict[str, Any]:
    probs = torch.softmax(torch.from_numpy(ev.logits) / temperature, 1).numpy()
    metrics = classification_metrics(y_true=ev.y_true, y_pred=ev.y_pred, labels=classes, probs=probs)
    metrics["loss"] = ev.loss
    return metrics


def evaluate_folder(
    *,
    model: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> tuple[dict[str, Any], EvalResult]:
    """Metrics of ``model`` (checkpoint or export) on a class folder or one split of a split root."""
    from rescli.predict import load_predictor

    predictor = load_predictor(Path(model), device=device, precision=precision)
    settings = predictor.meta.get("settings", {})
    samples, _ = data.eval_samples(
        data_dir, classes=predictor.classes, split=split,
        val_split=settings.get("val_split", 0.2), seed=settings.get("seed", 0),
    )
    dataset = data.ImageSamples(samples, predictor.transform(), draft_size=data.draft_size_for(predictor.img_size, train=False))
    loader = data.make_loader(dataset, batch_size=batch_size, shuffle=False, workers=default_workers() if workers is None else workers)
    ev = run_eval(predictor.logits, loader)
    metrics = metrics_from(ev, predictor.classes, temperature=predictor.temperature)
    metrics["skipped"] = [{"path": p, "error": e} for p, e in ev.failures]
    return metrics, ev
