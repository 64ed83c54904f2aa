"""The validation pass after each epoch: on cached features (the head alone), or on images, split across the
processes of a distributed run and gathered so that every process holds the whole split's result."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from rescli.core.runtime import Runtime
from rescli.data.splits import Sample
from rescli.data.tasks import MULTI
from rescli.evaluation.evaluate import EvalResult, eval_result, run_eval
from rescli.train.distributed import DistContext, broadcast_buffers, gather_by_index, gather_objects
from rescli.train.epoch import Notes
from rescli.train.features import FeatureSet, eval_features
from rescli.train.params import head


def validate(
    model: nn.Module, *, val_features: FeatureSet | None, val_loader, val_samples: list[Sample],
    eval_logits: Callable[[torch.Tensor], torch.Tensor], ctx: DistContext, runtime: Runtime, n_classes: int,
    notes: Notes,
) -> EvalResult:
    """The validation split's loss, accuracy and logits, the same in every process. Files that vanished or broke
    since the scan are named once, and the run goes on."""
    model.eval()
    if val_features is not None:
        ev = eval_features(head(model), val_features, val_samples, runtime=runtime, task=val_loader.dataset.task)
    elif ctx.enabled:  # every process evaluates rank 0's model (BN statistics included) on its shard
        broadcast_buffers(model, ctx)
        ev = gather_eval(ctx, run_eval(eval_logits, val_loader), val_samples, n_classes=n_classes)
    else:
        ev = run_eval(eval_logits, val_loader)
    for _, msg in ev.failures:
        notes.once(msg, f"skipped during validation: {msg}")
    return ev


def gather_eval(ctx: DistContext, ev: EvalResult, samples: list[Sample], *, n_classes: int) -> EvalResult:
    """Each process's shard of a validation pass -> the whole split's result (dataset order), in every process."""
    position = {path: i for i, (path, _) in enumerate(samples)}
    logits, y_true = ev.logits, np.asarray(ev.y_true, dtype=np.int64)
    if not len(ev.y_true):  # a shard without a readable image: arrays of the shape the others send
        logits = np.zeros((0, n_classes), np.float32)
        y_true = np.zeros((0, n_classes) if ev.task is MULTI else 0, np.int64)
    idx, got = gather_by_index(
        ctx, np.array([position[p] for p in ev.paths], dtype=np.int64), logits=logits, y_true=y_true,
    )
    failures = sorted(
        (f for part in gather_objects(ctx, list(ev.failures)) for f in part), key=lambda f: position.get(f[0], -1)
    )
    paths = [samples[i][0] for i in idx]
    if not len(idx):
        return eval_result(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [], failures, task=ev.task)
    return eval_result(torch.from_numpy(got["logits"]), torch.from_numpy(got["y_true"]), paths, failures,
                       task=ev.task)
