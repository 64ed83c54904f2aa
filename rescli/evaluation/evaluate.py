"""Running a model over labelled images: the logits of every image that could be read, with its label and path,
as plain arrays (an EvalResult); and which images could not be read. What the logits mean is ``metrics``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


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


def eval_result(
    logits: torch.Tensor, labels: torch.Tensor, paths: list[str], failures: list[tuple[str, str]]
) -> EvalResult:
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
