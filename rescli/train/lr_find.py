"""Learning-rate range test (Leslie Smith; fastai's ``lr_find``): raise the LR exponentially over a
few dozen steps, record the loss, and suggest a rate from the curve.

The test runs on a copy of the model, so the caller's model is untouched. With a frozen backbone
(``head`` and ``gradual`` strategies start that way) only the head trains during the test, as in
fastai, and the suggestion is the head's peak learning rate -- what ``--lr`` means.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rescli.core import events
from rescli.core.errors import RescliError, UsageError
from rescli.core.runtime import Runtime, default_workers
from rescli.data.loading import make_loader
from rescli.data.scan import scan_dataset
from rescli.data.tasks import MULTI, SINGLE
from rescli.data.transforms import to_model_input
from rescli.models.registry import create_model
from rescli.models.weights import load_pretrained
from rescli.train.distributed import DistContext, on_main
from rescli.train.params import (
    freeze_batchnorm_stats,
    param_groups,
    set_backbone_trainable,
)
from rescli.train.prepare import training_dataset
from rescli.train.run_folder import report_scan
from rescli.train.settings import (
    TrainSettings,
    auto_batch_size,
    batch_size_of,
    resolve_strategy,
    table_options,
    training_runtime,
    validate_settings,
)
from rescli.train.state import seed_everything
from rescli.train.step import Objective, objective_for


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed (exponential moving average, bias-corrected), as plotted
    raw_losses: list[float]
    suggestion: float  # the "valley" rule: inside the longest stretch where the loss keeps falling
    minimum_lr: float  # LR at the lowest loss, divided by 10 (the classic rule of thumb)
    steepest_lr: float  # LR where the smoothed loss falls fastest
    diverged: bool  # the test stopped early because the loss blew up (the usual, healthy end)
    extra: dict[str, Any] = field(default_factory=dict)

    def plot(self, path: str | os.PathLike) -> Path:
        from rescli.evaluation.plots import plot_lr_find

        return plot_lr_find(self.lrs, self.losses, path, suggestion=self.suggestion)

    def as_dict(self) -> dict[str, Any]:
        return {
            "suggested_lr": self.suggestion,
            "minimum_lr_div10": self.minimum_lr,
            "steepest_lr": self.steepest_lr,
            "steps": len(self.lrs),
            "diverged": self.diverged,
            **self.extra,
        }


def valley(losses: list[float]) -> int:
    """Index of fastai's "valley" suggestion: the longest decreasing subsequence of the loss curve,
    then a point 1/2 of the way into its middle third (well before the minimum, where the loss still falls)."""
    n = len(losses)
    if n == 0:
        raise ValueError("no losses")
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[max_end] < lds[i]:
            max_end = i
            max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return min(n - 1, max_start + int(sections) + int(sections / 2))


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float, float]:
    """(valley, lr at minimum / 10, steepest descent) from a smoothed curve."""
    lr = np.asarray(lrs, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    i_min = int(np.argmin(loss))
    minimum = float(lr[i_min] / 10)
    if len(loss) >= 3:
        slope = np.gradient(loss, np.log(lr))
        steepest = float(lr[int(np.argmin(slope[: max(1, i_min)]))]) if i_min > 0 else float(lr[0])
    else:
        steepest = minimum
    if len(loss) < 5:
        return minimum, minimum, steepest
    return float(lr[valley(list(loss))]), minimum, steepest


@dataclass
class _Curve:
    """The sweep's losses as they come: raw, smoothed (bias-corrected moving average), and whether it blew up."""

    smoothing: float
    divergence: float
    lrs: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    smooth: list[float] = field(default_factory=list)
    average: float = 0.0
    best: float = math.inf
    diverged: bool = False

    def add(self, lr: float, loss: float) -> None:
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        smoothed = self.average / (1 - self.smoothing ** (len(self.lrs) + 1))
        self.lrs.append(lr)
        self.raw.append(loss)
        self.smooth.append(smoothed)
        self.best = min(self.best, smoothed)
        if len(self.lrs) > 5 and smoothed > self.divergence * self.best:
            self.diverged = True


def range_test(
    model: nn.Module,
    train_ds,
    *,
    runtime: Runtime,
    mean,
    std,
    frozen_backbone: bool,
    batch_size: int = 32,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    workers: int = 0,
    seed: int = 0,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    divergence: float = 4.0,
) -> LRFindResult:
    """Train a copy of ``model`` for up to ``num_steps`` batches with the LR rising from start_lr to end_lr."""
    if not (0 < start_lr < end_lr):
        raise UsageError(f"lr range: need 0 < start ({start_lr}) < end ({end_lr})")
    if num_steps < 5:
        raise UsageError("lr-find needs at least 5 steps")
    if len(train_ds) == 0:
        raise RescliError("lr-find: no training images")
    sweep = _Sweep(model, runtime=runtime, mean=mean, std=std, frozen_backbone=frozen_backbone,
                   weight_decay=weight_decay, objective=_objective(train_ds, label_smoothing, runtime),
                   start_lr=start_lr)
    ratio = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    curve = _Curve(smoothing, divergence)
    g = torch.Generator()
    g.manual_seed(seed)
    with events.counting("lr-find", num_steps) as advance:
        while len(curve.lrs) < num_steps and not curve.diverged:  # the data repeats if it is smaller
            order = torch.randperm(len(train_ds), generator=g).tolist()
            loader = make_loader(
                train_ds, batch_size=batch_size, shuffle=False, workers=workers, sampler=order,
                seed=seed + len(curve.lrs), pin_memory=runtime.device.type == "cuda",
            )
            usable = 0
            for batch in loader:
                if len(curve.lrs) >= num_steps:
                    break
                if len(batch.labels) == 0:
                    continue
                usable += 1
                lr = start_lr * ratio ** len(curve.lrs)
                loss = sweep.step(batch, lr=lr)
                if not math.isfinite(loss):
                    curve.diverged = True
                    break
                curve.add(lr, loss)
                advance()
                if curve.diverged:
                    break
            if usable == 0:
                raise RescliError("lr-find: no training image could be read")
    return _result(curve, start_lr=start_lr)


def _objective(train_ds, label_smoothing: float, runtime: Runtime) -> Objective:
    """The loss of the data's task, as training has it but without class weights."""
    return objective_for(
        getattr(train_ds, "task", SINGLE), samples=[], n_classes=getattr(train_ds, "n_classes", 0), balance=False,
        label_smoothing=label_smoothing, summed=False, device=runtime.device,
    )


class _Sweep:
    """A copy of the model and its optimiser for the test (the caller's model is left untouched)."""

    def __init__(
        self, model: nn.Module, *, runtime: Runtime, mean, std, frozen_backbone: bool, weight_decay: float,
        objective: Objective, start_lr: float,
    ) -> None:
        self.net = copy.deepcopy(model)
        self.runtime, self.mean, self.std = runtime, mean, std
        set_backbone_trainable(self.net, not frozen_backbone)
        self.net.train()
        if frozen_backbone:
            freeze_batchnorm_stats(self.net)
        groups = param_groups(self.net, lr=start_lr, weight_decay=weight_decay)
        groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
        fused = runtime.device.type in ("cuda", "cpu") or None
        self.optimizer = torch.optim.AdamW(groups, lr=start_lr, fused=fused)
        self.objective = objective  # the task's training loss, without class weights
        self.trainable = [p for g in groups for p in g["params"] if p.requires_grad]

    def step(self, batch, *, lr: float) -> float:
        """One step at ``lr``; returns the loss before it (not finite: nothing was updated)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = to_model_input(batch.images, device=self.runtime.device, mean=self.mean, std=self.std,
                           channels_last=self.runtime.channels_last)
        y = batch.labels.to(self.runtime.device)
        with self.runtime.autocast():
            loss = self.objective.loss(self.net(x).float(), y, y, 1.0)
        value = loss.item()
        if not math.isfinite(value):
            return value
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        return value


def _result(curve: _Curve, *, start_lr: float) -> LRFindResult:
    if len(curve.lrs) < 5:
        raise RescliError(
            f"lr-find: the loss diverged after {len(curve.lrs)} step(s), starting at lr {start_lr:g}; "
            "try a lower --start-lr"
        )
    # As fastai does: leave out the first tenth (the moving average is still settling) and the last
    # points (the blow-up) when choosing, so neither can pull the suggestion around.
    smooth = curve.smooth
    lo = len(smooth) // 10
    hi = len(smooth) - 5 if len(smooth) - 5 - lo >= 5 else len(smooth)
    suggestion, minimum, steepest = suggest(curve.lrs[lo:hi], smooth[lo:hi])
    return LRFindResult(curve.lrs, smooth, curve.raw, suggestion, minimum, steepest, curve.diverged)


def auto_lr(
    model: nn.Module, train_ds, *, settings: TrainSettings, ctx: DistContext, runtime: Runtime, mean, std,
    frozen_backbone: bool, workers: int, run_dir: Path,
) -> dict[str, Any]:
    """--lr auto: the range test on this model and data (distributed: on rank 0 alone, with the whole global
    batch), its curve saved in the run folder; sets ``settings.lr`` to the suggestion and returns what run.json
    records of it. Reseeds afterwards, so training starts from the same random state as with a given --lr."""

    def test() -> dict[str, Any]:
        events.info("--lr auto: running the learning-rate range test first")
        found = range_test(
            model, train_ds, runtime=runtime, mean=mean, std=std, frozen_backbone=frozen_backbone,
            batch_size=batch_size_of(settings), weight_decay=settings.weight_decay,
            label_smoothing=settings.label_smoothing, workers=workers, seed=settings.seed,
        )
        found.plot(run_dir / "lr_find.png")
        return {"suggested_lr": found.suggestion, "plot": str(run_dir / "lr_find.png"), "steps": len(found.lrs)}

    info = on_main(ctx, test)
    settings.lr = info["suggested_lr"]
    events.info(f"--lr auto: using lr {settings.lr:.3g} (curve in {run_dir / 'lr_find.png'})")
    seed_everything(settings.seed)
    return info


def find_lr(
    settings: TrainSettings,
    *,
    output: str | os.PathLike | None = "lr_find.png",
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    show_progress: bool = True,
) -> LRFindResult:
    """``rescli lr-find``: build the model and data exactly as finetune would (same settings), run the test,
    save the plot. Returns the result; ``extra`` names the plot and what was trained. (``show_progress`` is kept
    for callers of older versions: progress is always reported as events.)"""
    validate_settings(settings)
    seed_everything(settings.seed)
    index = scan_dataset(
        settings.data_dir, val_split=settings.val_split, seed=settings.seed, strict=settings.strict,
        workers=settings.workers, table=table_options(settings),
    )
    report_scan(index, None)
    if settings.batch_size is None:  # as finetune would choose it for this folder
        settings.batch_size = auto_batch_size(img_size=settings.img_size, train_images=len(index.splits["train"]))
    classes = index.classes
    model = create_model(settings.arch, len(classes), settings.arch_kwargs)
    winfo = load_pretrained(model, arch=settings.arch, weights=settings.weights, arch_kwargs=settings.arch_kwargs)
    strategy, frozen_epochs = resolve_strategy(
        settings.strategy, pretrained=winfo.pretrained, epochs=settings.epochs, freeze_epochs=settings.freeze_epochs
    )
    runtime = training_runtime(settings)
    model.to(runtime.device).to(memory_format=runtime.memory_format)  # two calls: torch's stubs type no call with both
    train_ds = training_dataset(settings, index)
    frozen = strategy == "head" or (strategy == "gradual" and frozen_epochs > 0)
    kind = "labels (multi-label)" if index.task is MULTI else "classes"
    events.info(
        f"lr range test: {settings.arch} · {len(classes)} {kind} · {len(train_ds)} train images · "
        f"{runtime.describe()} · {'head only (backbone frozen)' if frozen else 'whole network'} · "
        f"lr {start_lr:g} → {end_lr:g} over up to {num_steps} steps"
    )
    result = range_test(
        model, train_ds, runtime=runtime, mean=list(winfo.mean), std=list(winfo.std), frozen_backbone=frozen,
        batch_size=batch_size_of(settings), weight_decay=settings.weight_decay,
        label_smoothing=settings.label_smoothing,
        workers=default_workers() if settings.workers is None else settings.workers, seed=settings.seed,
        start_lr=start_lr, end_lr=end_lr, num_steps=num_steps,
    )
    result.extra.update(trained="head" if frozen else "all", strategy=strategy)
    if output is not None:
        result.extra["plot"] = str(result.plot(output))
    return result
