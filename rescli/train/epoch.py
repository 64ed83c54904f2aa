"""One epoch of training: the batches of the epoch (images, or cached backbone features) as one stream of
model inputs, and the loop that takes a step on each until the epoch ends or a stop is asked."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch

from rescli.core import events
from rescli.core.runtime import Runtime
from rescli.data.loading import Batch, ImageSamples, make_loader
from rescli.data.transforms import to_model_input
from rescli.train.features import FeatureSet
from rescli.train.interrupts import StopFlag
from rescli.train.state import EpochTotals
from rescli.train.step import Trainer

#: A step's inputs and labels on the training device, or None for a step without a batch (every image of a
#: single process's batch failed to load: the schedule still moves on).
StepBatch = Optional[tuple[torch.Tensor, torch.Tensor]]
Batches = Generator[StepBatch, None, None]


class TrainingBatches(Protocol):
    def epoch(self, slots: list[list[int]], *, epoch: int, batchnorm_in_training: bool) -> Batches:
        """The epoch's batches, one per slot (this process's share of each global batch, in step order)."""
        ...


@dataclass
class Notes:
    """Messages said once per run however often their cause comes back (a file that broke, every epoch)."""

    said: set[str] = field(default_factory=set)

    def once(self, key: str, message: str, *, warning: bool = True) -> None:
        if key not in self.said:
            self.said.add(key)
            (events.warn if warning else events.info)(message)


@dataclass
class FeatureBatches:
    """Training batches of cached backbone features: the head trains on them, one small matrix product a step."""

    features: FeatureSet
    device: torch.device

    def epoch(self, slots: list[list[int]], *, epoch: int, batchnorm_in_training: bool) -> Batches:
        for slot in slots:
            idx = torch.tensor(slot, dtype=torch.long, device=self.device)
            yield self.features.features[idx], self.features.labels[idx]


@dataclass
class ImageBatches:
    """Training batches of images, decoded and augmented by the data loader, normalised on the device."""

    dataset: ImageSamples
    img_size: int
    per_process_batch: int
    workers: int
    pin_memory: bool
    seed: int
    runtime: Runtime
    mean: list[float]
    std: list[float]
    distributed: bool
    notes: Notes
    lone_image_note: str  # said once when a batch of one image sits out its step

    def epoch(self, slots: list[list[int]], *, epoch: int, batchnorm_in_training: bool) -> Batches:
        # Distributed: full slots are batch/N long, so batching the flattened slots gives them back.
        loader = make_loader(
            self.dataset, batch_size=self.per_process_batch, shuffle=False, workers=self.workers,
            pin_memory=self.pin_memory, sampler=[i for slot in slots for i in slot], seed=self.seed + epoch,
        )
        empty = self.dataset.task.empty_targets(self.dataset.n_classes)  # a batch without images: the targets' shape
        for batch in _padded(loader, len(slots), img_size=self.img_size, empty_targets=empty):
            for _, msg in batch.failures:
                self.notes.once(msg, f"skipped during training: {msg}")
            if len(batch.labels) == 1 and batchnorm_in_training:
                batch = _without_images(batch, self.img_size, empty_targets=empty)
                self.notes.once("lone image", self.lone_image_note, warning=False)
            if len(batch.labels) > 0 or self.distributed:  # every process takes part in every step
                x = to_model_input(batch.images, device=self.runtime.device, mean=self.mean, std=self.std,
                                   channels_last=self.runtime.channels_last)
                yield x, batch.labels.to(self.runtime.device, non_blocking=True)
            else:
                yield None


def lone_image_note(*, train_images: int, batch_size: int, processes: int) -> str:
    return (
        f"a training batch of one image cannot be normalised by BatchNorm in training mode: such an image sits out "
        f"its step ({train_images} images, --batch-size {batch_size}"
        + (f" over {processes} processes" if processes > 1 else "")
        + "; the order changes every epoch, so each time it is another one)"
    )


def _padded(loader: Iterable[Batch], steps: int, *, img_size: int, empty_targets: torch.Tensor) -> Iterator[Batch]:
    """A process's batches, then empty ones up to ``steps``: in a last global batch smaller than the number of
    processes some get no image, yet every process must take part in every (all-reducing) step."""
    n = 0
    for batch in loader:
        if len(batch.labels) == 0:  # every image of the slot failed to load: an empty batch of the right shape
            batch.images = torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8)
            batch.labels = empty_targets
        yield batch
        n += 1
    no_indices = torch.zeros(0, dtype=torch.long)
    for _ in range(n, steps):
        yield Batch(torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8), empty_targets, no_indices, [])


def _without_images(batch: Batch, img_size: int, *, empty_targets: torch.Tensor) -> Batch:
    """An empty batch of the right shape (keeping the failures to report): a distributed step still takes part."""
    no_indices = torch.zeros(0, dtype=torch.long)
    return Batch(torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8), empty_targets, no_indices, batch.failures)


def train_one_epoch(
    trainer: Trainer, batches: Batches, *, epoch: int, first_step: int, steps: int, totals: EpochTotals,
    stop: StopFlag, title: str,
) -> int:
    """Optimiser steps from ``first_step`` on, one per batch, until the epoch ends or a stop is asked (after the
    step it came in; distributed: as every process agreed). Returns the steps done in the epoch."""
    step = first_step
    distributed = trainer.ctx.enabled
    with contextlib.closing(batches), events.counting(title, steps - first_step) as advance:
        for batch in batches:
            if batch is not None:
                result = trainer.step(*batch, epoch=epoch, step=step, stop_asked=bool(stop))
                totals.add(loss_sum=result.loss_sum, images=result.images, correct=result.correct)
            trainer.scheduler.step()
            step += 1
            advance(loss=totals.mean_loss)
            if trainer.stop_agreed if distributed else stop.check():
                break
    return step
