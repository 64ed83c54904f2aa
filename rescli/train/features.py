"""Cached backbone features: with a frozen backbone and no augmentation an image's features never change,
so they are computed once and the head trains on them (each epoch a small matrix multiply a batch)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rescli.core import events
from rescli.core.errors import RescliError
from rescli.core.runtime import Runtime
from rescli.data.loading import ImageSamples, make_loader
from rescli.data.tasks import Task
from rescli.data.transforms import to_model_input
from rescli.evaluation.evaluate import EvalResult, eval_result
from rescli.train.distributed import (
    DistContext,
    gather_by_index,
    gather_objects,
    shard,
    shared_error,
)
from rescli.train.settings import TrainSettings


@dataclass
class FeatureSet:
    """Backbone outputs (the head's inputs) for a list of samples, computed once."""

    features: torch.Tensor  # float32 [N, D] on the training device
    labels: torch.Tensor  # the targets: int64 [N], or float32 [N, C] (multi-label)
    indices: list[int]  # positions in the dataset (images that failed to load are absent)
    failures: list[tuple[int, str]]


@dataclass
class CachedFeatures:
    """Both splits' backbone features, computed once before the first epoch."""

    train: FeatureSet
    val: FeatureSet
    seconds: float  # the one pass over both splits


def use_feature_cache(settings: TrainSettings, *, strategy: str, tail_only: bool) -> bool:
    """Head only, no augmentation, no mixing: the backbone's output for an image never changes, so the head can
    train on features computed once."""
    return (
        not tail_only and settings.cache_features and strategy == "head" and settings.augment == "none"
        and settings.mixup <= 0 and settings.cutmix <= 0
    )


def cache_features(
    model: nn.Module, *, train_ds: ImageSamples, val_loader, ctx: DistContext, runtime: Runtime, mean: list[float],
    std: list[float], batch_size: int, workers: int, pin_memory: bool,
) -> CachedFeatures:
    """One backbone pass over both splits; distributed, each process computes a shard and all get every feature."""
    started = time.perf_counter()
    events.info(
        f"head only, no augmentation: caching backbone features ({len(train_ds)} train + "
        f"{len(val_loader.dataset)} val images, one pass)"
    )
    train_loader = make_loader(
        train_ds, batch_size=batch_size, shuffle=False, workers=workers, pin_memory=pin_memory,
        sampler=shard(range(len(train_ds)), ctx) if ctx.enabled else None,
    )
    train = extract_features(model, train_loader, runtime=runtime, mean=mean, std=std, allow_empty=ctx.enabled)
    val = extract_features(model, val_loader, runtime=runtime, mean=mean, std=std, allow_empty=ctx.enabled)
    if ctx.enabled:  # in dataset order
        train, val = gather_features(ctx, train, runtime.device), gather_features(ctx, val, runtime.device)
    seconds = time.perf_counter() - started
    for _, msg in train.failures + val.failures:
        events.warn(f"skipped: {msg}")
    events.info(f"features cached in {seconds:.1f}s")
    return CachedFeatures(train, val, seconds)


@torch.no_grad()
def extract_features(model: nn.Module, loader, *, runtime: Runtime, mean, std, allow_empty: bool = False) -> FeatureSet:
    """One pass of the backbone (the model with its head swapped for Identity) over ``loader``.

    ``allow_empty``: a loader that yields no readable image gives an empty set (one process's shard) instead of
    an error.
    """
    head = model.fc
    model.fc = nn.Identity()
    was_training = model.training
    model.eval()
    feats, labels, indices, failures = [], [], [], []
    try:
        for batch in loader:
            failures += batch.failures
            if len(batch.labels) == 0:
                continue
            x = to_model_input(
                batch.images, device=runtime.device, mean=mean, std=std, channels_last=runtime.channels_last
            )
            with runtime.autocast():
                f = model(x)
            feats.append(torch.flatten(f, 1).float())
            labels.append(batch.labels.to(runtime.device))
            indices += batch.indices.tolist()
    finally:
        model.fc = head
        model.train(was_training)
    if not feats:
        if allow_empty:
            dim = int(getattr(head, "in_features", 0))
            dataset = loader.dataset
            empty = dataset.task.empty_targets(dataset.n_classes).to(runtime.device)
            return FeatureSet(torch.zeros(0, dim, device=runtime.device), empty, [], failures)
        raise RescliError("no image could be read to compute backbone features")
    return FeatureSet(torch.cat(feats), torch.cat(labels), indices, failures)


def gather_features(ctx: DistContext, fs: FeatureSet, device: torch.device) -> FeatureSet:
    """Every process's shard of features -> the whole set on every process, in dataset order."""
    idx, got = gather_by_index(
        ctx, np.asarray(fs.indices, dtype=np.int64), features=fs.features.cpu().numpy(),
        labels=fs.labels.cpu().numpy(),
    )
    failures = sorted(f for part in gather_objects(ctx, list(fs.failures)) for f in part)
    if not len(idx):
        raise shared_error("no image could be read to compute backbone features")
    return FeatureSet(
        torch.from_numpy(got["features"]).to(device), torch.from_numpy(got["labels"]).to(device), idx.tolist(), failures
    )


def eval_features(head: nn.Module, fs: FeatureSet, samples, *, runtime: Runtime, task: Task) -> EvalResult:
    with torch.inference_mode(), runtime.autocast():
        logits = head(fs.features).float()
    paths = [samples[i][0] for i in fs.indices]
    return eval_result(logits.cpu(), fs.labels.cpu(), paths, [(samples[i][0], msg) for i, msg in fs.failures],
                       task=task)
