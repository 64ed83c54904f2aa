"""Running a model over labelled images: the logits of every image that could be read, with its label and path,
as plain arrays (an EvalResult); and which images could not be read. What the logits mean is ``metrics``.

The loss and accuracy of a result are the task's: single-label, cross-entropy and the share of images whose top
class is right; multi-label, binary cross-entropy and the share of (image, class) decisions at probability 0.5 that
are right (fastai's accuracy_multi), the figures training follows epoch by epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from rescli.data.tasks import MULTI, SINGLE, Task


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    y_true: np.ndarray  # [N] class indices; multi-label: [N, C] 0/1
    y_pred: np.ndarray  # [N] argmax; multi-label: [N, C] 0/1 at probability 0.5 (metrics apply the thresholds)
    logits: np.ndarray  # [N, C] float32, in the order of ``paths``
    paths: list[str]
    failures: list[tuple[str, str]]  # (path, why) for images that could not be read
    task: Task = SINGLE


def run_eval(logits_fn: Callable[[torch.Tensor], torch.Tensor], loader) -> EvalResult:
    """``logits_fn`` maps a uint8 batch to CPU float logits; plain arrays come back. The task is the dataset's."""
    samples = loader.dataset.samples
    task = getattr(loader.dataset, "task", SINGLE)
    logits_all, labels_all, idx_all, failures = [], [], [], []
    for batch in loader:
        failures += [(samples[i][0], msg) for i, msg in batch.failures]
        if len(batch.labels):
            logits_all.append(logits_fn(batch.images))
            labels_all.append(batch.labels)
            idx_all.append(batch.indices)
    if not logits_all:
        return eval_result(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [], failures, task=task)
    order = torch.cat(idx_all).tolist()
    return eval_result(torch.cat(logits_all), torch.cat(labels_all), [samples[i][0] for i in order], failures,
                       task=task)


def eval_result(
    logits: torch.Tensor, labels: torch.Tensor, paths: list[str], failures: list[tuple[str, str]], *,
    task: Task = SINGLE,
) -> EvalResult:
    """Loss, accuracy and predictions from CPU logits [N, C] and the targets (N may be 0: NaN loss and accuracy)."""
    if not len(labels):
        empty = np.zeros((0, 0) if task is MULTI else 0, dtype=np.int64)
        return EvalResult(float("nan"), float("nan"), empty, empty, np.zeros((0, 0), np.float32), [], failures, task)
    logits = logits.float()
    if task is MULTI:
        targets = labels.float()
        pred = (logits > 0).long()  # probability above 0.5
        return EvalResult(
            loss=float(F.binary_cross_entropy_with_logits(logits, targets)),
            accuracy=float((pred == targets.long()).float().mean()),
            y_true=targets.long().numpy(), y_pred=pred.numpy(), logits=logits.numpy(), paths=paths,
            failures=failures, task=task,
        )
    pred = logits.argmax(1)
    return EvalResult(
        loss=float(F.cross_entropy(logits, labels)),
        accuracy=float((pred == labels).float().mean()),
        y_true=labels.numpy(),
        y_pred=pred.numpy(),
        logits=logits.numpy(),
        paths=paths,
        failures=failures,
        task=task,
    )
