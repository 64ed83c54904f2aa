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
from rescli.data.loading import ImageSamples, make_loader
from rescli.data.scan import scan_dataset
from rescli.data.transforms import build_transform, draft_size_for, to_model_input
from rescli.models.registry import create_model
from rescli.models.weights import load_pretrained
from rescli.train.params import (
    freeze_batchnorm_stats,
    param_groups,
    set_backbone_trainable,
)


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
    show_progress: bool = True,
) -> LRFindResult:
    """Train a copy of ``model`` for up to ``num_steps`` batches with the LR rising from start_lr to end_lr."""
    if not (0 < start_lr < end_lr):
        raise UsageError(f"lr range: need 0 < start ({start_lr}) < end ({end_lr})")
    if num_steps < 5:
        raise UsageError("lr-find needs at least 5 steps")
    if len(train_ds) == 0:
        raise RescliError("lr-find: no training images")
    net = copy.deepcopy(model)
    set_backbone_trainable(net, not frozen_backbone)
    net.train()
    if frozen_backbone:
        freeze_batchnorm_stats(net)
    groups = param_groups(net, lr=start_lr, weight_decay=weight_decay)
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    optimizer = torch.optim.AdamW(groups, lr=start_lr, fused=runtime.device.type in ("cuda", "cpu") or None)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    trainable = [p for g in groups for p in g["params"] if p.requires_grad]
    ratio = (end_lr / start_lr) ** (1.0 / (num_steps - 1))

    lrs: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    avg, best = 0.0, math.inf
    diverged = False
    g = torch.Generator()
    g.manual_seed(seed)
    step = 0
    with events.counting("lr-find", num_steps) as advance:
        while step < num_steps and not diverged:
            order = torch.randperm(len(train_ds), generator=g).tolist()
            loader = make_loader(
                train_ds, batch_size=batch_size, shuffle=False, workers=workers, sampler=order, seed=seed + step,
                pin_memory=runtime.device.type == "cuda",
            )
            usable = 0
            for batch in loader:
                if step >= num_steps:
                    break
                if batch.labels.numel() == 0:
                    continue
                usable += 1
                lr = start_lr * ratio**step
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = to_model_input(batch.images, device=runtime.device, mean=mean, std=std, channels_last=runtime.channels_last)
                y = batch.labels.to(runtime.device)
                with runtime.autocast():
                    loss = criterion(net(x).float(), y)
                value = loss.item()
                if not math.isfinite(value):
                    diverged = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                avg = smoothing * avg + (1 - smoothing) * value
                smoothed = avg / (1 - smoothing ** (step + 1))
                lrs.append(lr)
                raw.append(value)
                smooth.append(smoothed)
                best = min(best, smoothed)
                step += 1
                advance()
                if step > 5 and smoothed > divergence * best:
                    diverged = True
                    break
            if usable == 0:
                raise RescliError("lr-find: no training image could be read")
    if len(lrs) < 5:
        raise RescliError(
            f"lr-find: the loss diverged after {len(lrs)} step(s), starting at lr {start_lr:g}; try a lower --start-lr"
        )
    # As fastai does: leave out the first tenth (the moving average is still settling) and the last
    # points (the blow-up) when choosing, so neither can pull the suggestion around.
    lo = len(smooth) // 10
    hi = len(smooth) - 5 if len(smooth) - 5 - lo >= 5 else len(smooth)
    suggestion, minimum, steepest = suggest(lrs[lo:hi], smooth[lo:hi])
    return LRFindResult(lrs, smooth, raw, suggestion, minimum, steepest, diverged)


def find_lr(
    settings,
    *,
    output: str | os.PathLike | None = "lr_find.png",
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    show_progress: bool = True,
) -> LRFindResult:
    """``rescli lr-find``: build the model and data exactly as finetune would (same settings), run the test,
    save the plot. Returns the result; ``extra`` names the plot and what was trained."""
    from rescli.train.run_folder import report_scan
    from rescli.train.settings import (
        resolve_strategy,
        training_runtime,
        validate_settings,
    )
    from rescli.train.state import seed_everything as _seed_everything

    validate_settings(settings)
    _seed_everything(settings.seed)
    index = scan_dataset(
        settings.data_dir, val_split=settings.val_split, seed=settings.seed, strict=settings.strict, workers=settings.workers
    )
    report_scan(index, None)
    classes = index.classes
    model = create_model(settings.arch, len(classes), settings.arch_kwargs)
    winfo = load_pretrained(model, arch=settings.arch, weights=settings.weights, arch_kwargs=settings.arch_kwargs)
    strategy, frozen_epochs = resolve_strategy(
        settings.strategy, pretrained=winfo.pretrained, epochs=settings.epochs, freeze_epochs=settings.freeze_epochs
    )
    runtime = training_runtime(settings)
    model.to(runtime.device, memory_format=runtime.memory_format)
    train_ds = ImageSamples(
        index.splits["train"],
        build_transform(img_size=settings.img_size, train=True, augment=settings.augment),
        draft_size=draft_size_for(settings.img_size, train=True),
    )
    frozen = strategy == "head" or (strategy == "gradual" and frozen_epochs > 0)
    events.info(
        f"lr range test: {settings.arch} · {len(classes)} classes · {len(train_ds)} train images · {runtime.describe()} · "
        f"{'head only (backbone frozen)' if frozen else 'whole network'} · lr {start_lr:g} → {end_lr:g} over up to {num_steps} steps"
    )
    result = range_test(
        model, train_ds, runtime=runtime, mean=list(winfo.mean), std=list(winfo.std), frozen_backbone=frozen,
        batch_size=settings.batch_size, weight_decay=settings.weight_decay, label_smoothing=settings.label_smoothing,
        workers=default_workers() if settings.workers is None else settings.workers, seed=settings.seed,
        start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, show_progress=show_progress,
    )
    result.extra.update(trained="head" if frozen else "all", strategy=strategy)
    if output is not None:
        result.extra["plot"] = str(result.plot(output))
    return result
