"""Everything before the first step: the settings of a new or resumed run, its folder, the checked data, the
model's starting weights, the datasets and their image caches. ``Run`` holds what stays fixed while it trains."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rescli.core.errors import RescliError, UsageError
from rescli.core.runtime import Runtime, default_workers
from rescli.data.loading import DecodedCache, ImageSamples, image_cache_budget, make_loader
from rescli.data.scan import DatasetIndex
from rescli.data.transforms import build_transform, draft_size_for
from rescli.models.checkpoint import versions
from rescli.models.weights import load_pretrained
from rescli.train.distributed import DistContext, backend, main_first, on_main, shard
from rescli.train.features import CachedFeatures
from rescli.train.run_folder import (
    RunFolderLock,
    load_resume,
    open_new_run,
    report_scan,
    restore_split,
    run_finished,
)
from rescli.train.settings import TrainSettings, batch_size_of, check_run_settings, settings_from_dict


@dataclass
class RunStart:
    """A run's settings before anything is made: new, or read back from the last.pt of the run it continues."""

    settings: TrainSettings
    resumed: dict[str, Any] | None  # the last.pt of the run being continued
    run_dir: Path | None  # a resumed run's folder (a new run's folder is made later, by rank 0)
    tail_only: bool = False  # every epoch ran, but the final evaluation was interrupted


def resolve_start(
    *, settings: TrainSettings | None, resume: str | os.PathLike | None, epochs: int | None
) -> RunStart:
    """The settings to train with; usage errors come here, before a run folder is made (nothing is left behind)."""
    if resume is not None:
        run_dir, last = load_resume(resume)  # every process reads last.pt (multi-node: a folder they all see)
        settings = settings_from_dict(last["settings"])
        if last.get("data"):  # the resolved folder (or table) it was trained on, wherever this process was started
            settings.data_dir = last["data"].get("table") or last["data"]["root"]
        if epochs is not None:
            settings.epochs = epochs
        done = int(last["epoch"])
        if done >= settings.epochs and run_finished(run_dir):
            raise UsageError(f"{run_dir} already trained {done} epochs; pass --epochs N with N > {done} to continue")
        start = RunStart(settings, last, run_dir, tail_only=done >= settings.epochs)
    elif settings is None:
        raise UsageError("finetune needs settings or --resume")
    else:
        settings.data_dir = os.path.abspath(os.path.expanduser(settings.data_dir))
        start = RunStart(settings, None, None)
    check_run_settings(start.settings)
    return start


def open_run_folder(
    ctx: DistContext, start: RunStart, *, output: str | os.PathLike | None, holds: contextlib.ExitStack
) -> Path:
    """The run folder, locked by rank 0 until ``holds`` closes: a resumed run's own, or a new one that rank 0
    picks and makes (the other processes learn its name)."""
    if start.run_dir is not None:
        if ctx.is_main:
            holds.callback(RunFolderLock(start.run_dir).acquire().release)
        return start.run_dir

    def open_new() -> str:
        out, lock = open_new_run(output, data_dir=start.settings.data_dir)
        holds.callback(lock.release)
        return str(out)

    return Path(on_main(ctx, open_new))


def checked_index(found: DatasetIndex, *, start: RunStart, run_dir: Path) -> DatasetIndex:
    """A scanned folder as the run uses it: a resumed run's own split, what was left out reported (skipped.txt),
    and a validation split that is not empty."""
    if start.resumed is not None:
        found = restore_split(found, start.resumed)
    report_scan(found, run_dir)
    if not found.splits["val"]:
        raise RescliError(
            f"{start.settings.data_dir}: no validation images (use --val-split > 0 or add a val/ folder)"
        )
    return found


@dataclass(frozen=True)
class StartWeights:
    mean: list[float]  # the input normalisation that goes with the weights
    std: list[float]
    pretrained: bool


def start_weights(
    model: nn.Module, *, settings: TrainSettings, resumed: dict[str, Any] | None, ctx: DistContext
) -> StartWeights:
    """Load the weights training starts from: --weights for a new run, a resumed run's last.pt."""
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        return StartWeights(resumed["mean"], resumed["std"], resumed["settings_pretrained"])
    with main_first(ctx):  # one download of --weights imagenet, then the others read the cache
        info = load_pretrained(model, arch=settings.arch, weights=settings.weights, arch_kwargs=settings.arch_kwargs)
    return StartWeights(list(info.mean), list(info.std), info.pretrained)


@dataclass
class RunData:
    """Both splits as datasets, and the validation loader every epoch uses."""

    train_ds: ImageSamples
    val_ds: ImageSamples
    val_loader: Any  # this process's share of the validation split (all of it in a single process)
    workers: int
    pin_memory: bool
    eval_batch_size: int

    def whole_val_loader(self) -> Any:
        """Every validation image, whichever process asks (rank 0's final evaluation of a distributed run)."""
        return make_loader(self.val_ds, batch_size=self.eval_batch_size, shuffle=False, workers=self.workers,
                           pin_memory=self.pin_memory)


def prepare_data(settings: TrainSettings, index: DatasetIndex, *, ctx: DistContext, runtime: Runtime) -> RunData:
    workers = default_workers() if settings.workers is None else settings.workers
    pin = runtime.device.type == "cuda"
    train_ds = training_dataset(settings, index)
    val_ds = ImageSamples(
        index.splits["val"],
        build_transform(img_size=settings.img_size, train=False),
        draft_size=draft_size_for(settings.img_size, train=False), task=index.task, n_classes=len(index.classes),
    )
    # Distributed: each process evaluates every N-th validation image; the results are gathered by index.
    val_loader = make_loader(
        val_ds, batch_size=batch_size_of(settings) * 2, shuffle=False, workers=workers, pin_memory=pin,
        sampler=shard(range(len(val_ds)), ctx) if ctx.enabled else None,
    )
    return RunData(train_ds, val_ds, val_loader, workers, pin, batch_size_of(settings) * 2)


def training_dataset(settings: TrainSettings, index: DatasetIndex) -> ImageSamples:
    """The training split as the run (and its learning-rate test) reads it: augmented as asked, the task's targets."""
    return ImageSamples(
        index.splits["train"],
        build_transform(img_size=settings.img_size, train=True, augment=settings.augment),
        draft_size=draft_size_for(settings.img_size, train=True), task=index.task, n_classes=len(index.classes),
    )


def attach_image_caches(
    settings: TrainSettings, data: RunData, *, processes: int, epochs_left: int, features_cached: bool
) -> dict[str, int]:
    """Decoded-image caches for the datasets whose pixels repeat every epoch; returns how many images each holds.

    Validation always repeats; training only without augmentation (mixup and cutmix act on batches, later).
    Nothing to gain with a single epoch left, or when the backbone's features are cached instead.
    """
    if not settings.cache_images or epochs_left < 2 or features_cached:
        return {}
    shared = data.workers > 0  # worker processes fill the slots: they must see the same memory as the main process
    budget = image_cache_budget(shared=shared) // max(1, processes)
    held = {}
    for name, ds in (("val", data.val_ds), ("train", data.train_ds)):  # validation first: smaller, always repeats
        if name == "train" and settings.augment != "none":
            continue
        ds.cache = DecodedCache(len(ds), settings.img_size, budget_bytes=budget, shared=shared)
        budget -= ds.cache.nbytes
        held[name] = ds.cache.capacity
    return held


@dataclass
class Run:
    """What stays fixed while a run trains (the model's weights change, the object does not)."""

    settings: TrainSettings
    ctx: DistContext
    run_dir: Path
    index: DatasetIndex
    model: nn.Module
    weights: StartWeights
    strategy: str
    frozen_epochs: int
    runtime: Runtime
    data: RunData
    features: CachedFeatures | None  # head-only training on cached backbone features
    resumed: dict[str, Any] | None  # the last.pt this run continues
    tail_only: bool  # resumed after its last epoch: only the final evaluation is left
    lr_find: dict[str, Any] | None  # --lr auto: what the range test found

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def train_images(self) -> int:
        """Images a training epoch goes through (with cached features: those whose features were computed)."""
        return len(self.features.train.indices) if self.features is not None else len(self.data.train_ds)


def describe_run(run: Run, *, settings: dict[str, Any], image_cache: dict[str, int]) -> dict[str, Any]:
    """run.json: what the run is, where it runs, what was found in the data and what was cached."""
    s, index = run.settings, run.index
    info: dict[str, Any] = {
        "settings": settings, "arch": s.arch, "task": index.task.name, "classes": run.classes, "img_size": s.img_size,
        "mean": run.weights.mean, "std": run.weights.std, "runtime": run.runtime.describe(), "layout": index.layout,
        "counts": {split: index.counts(split) for split in index.splits}, "versions": versions(),
    }
    if run.lr_find is not None:
        info["lr_find"] = run.lr_find
    if image_cache:
        info["image_cache"] = image_cache
    if run.features is not None:
        info["feature_cache"] = {
            "seconds": round(run.features.seconds, 3), "train": run.train_images, "val": len(run.features.val.indices)
        }
    if run.ctx.enabled:
        info["distributed"] = {
            "world_size": run.ctx.world_size, "backend": backend(),
            "per_process_batch": batch_size_of(s) // run.ctx.world_size, "sync_bn": bool(s.sync_bn),
        }
    return info
