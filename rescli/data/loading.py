"""Datasets and loaders: (path, label) samples to uint8 batches and their targets (as the task has them: class
indices, or 0/1 rows of multi-label targets), with per-item failures instead of exceptions, and the in-memory
cache of decoded images for transforms without randomness."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from rescli.core.errors import RescliError
from rescli.data.images import (
    load_rgb,
)
from rescli.data.splits import Sample
from rescli.data.tasks import SINGLE, Task


class DecodedCache:
    """Transformed uint8 images kept in memory from their first load on, for transforms without randomness.

    Validation passes, and training with --augment none, turn each file into the same pixels every epoch;
    keeping them lets every epoch after the first skip reading, decoding and resizing, which on a CPU is a
    noticeable share of a training step (docs/performance.md, "How rescli is fast"). Slots are in shared memory when
    decode worker processes fill them, so the main process, every worker and later epochs see them. Holds
    the first ``capacity`` images by index; the others are decoded each time.
    """

    def __init__(self, n: int, img_size: int, *, budget_bytes: int, shared: bool) -> None:
        per_image = 3 * img_size * img_size
        self.capacity = max(0, min(n, budget_bytes // per_image))
        # torch.empty: the pages are only touched (and take memory) as slots fill.
        self.images = torch.empty((self.capacity, 3, img_size, img_size), dtype=torch.uint8)
        self.filled = torch.zeros(self.capacity, dtype=torch.bool)
        if shared and self.capacity:
            self.images.share_memory_()
            self.filled.share_memory_()

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def get(self, i: int) -> torch.Tensor | None:
        return self.images[i] if i < self.capacity and bool(self.filled[i]) else None

    def put(self, i: int, image: torch.Tensor) -> None:
        if i < self.capacity and image.shape == self.images.shape[1:]:
            self.images[i].copy_(image)
            self.filled[i] = True


def image_cache_budget(*, shared: bool) -> int:
    """Bytes the decoded-image caches of one run may use: a quarter of the available RAM (and, for
    caches shared with worker processes, at most half of what /dev/shm has free, where they live)."""
    budget = _available_ram() // 4
    if shared:
        try:
            st = os.statvfs("/dev/shm")
        except OSError:
            return 0
        budget = min(budget, st.f_bavail * st.f_frsize // 2)
    return max(0, budget)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class ImageSamples(Dataset):
    """(path, label) pairs -> (uint8 image, target, index); a file that fails to load yields its error instead.

    The target is what ``task`` makes of the label (``n_classes``: how many classes a multi-label target spans).
    """

    def __init__(
        self, samples: Sequence[Sample], transform: Callable, *, draft_size: int | None = None,
        cache: DecodedCache | None = None, task: Task = SINGLE, n_classes: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size
        self.cache = cache  # only for transforms that give the same pixels every time
        self.task = task
        self.n_classes = n_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, raw = self.samples[i]
        label = self.task.target(raw, self.n_classes)
        if self.cache is not None:
            cached = self.cache.get(i)
            if cached is not None:
                return cached, label, i, None
        try:
            image = self.transform(load_rgb(path, draft_size=self.draft_size))
            if self.cache is not None:
                self.cache.put(i, image)
            return image, label, i, None
        except RescliError as exc:
            return None, label, i, exc.message
        except Exception as exc:  # a transform failing on an odd image must not kill an epoch
            return None, label, i, f"{path}: {type(exc).__name__}: {exc}"


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W]
    labels: torch.Tensor  # the targets: int64 [B] (single-label), float32 [B, C] 0/1 (multi-label)
    indices: torch.Tensor  # int64 [B], positions in the dataset
    failures: list[tuple[int, str]]  # (dataset index, message) for items that could not be loaded

    def pin_memory(self) -> Batch:
        self.images = self.images.pin_memory()
        self.labels = self.labels.pin_memory()
        return self


def collate(items) -> Batch:
    good = [it for it in items if it[0] is not None]
    failures = [(it[2], it[3]) for it in items if it[0] is None]
    if good:
        images = torch.stack([it[0] for it in good])
    else:
        images = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return Batch(
        images=images,
        labels=_targets([it[1] for it in good], of=items),
        indices=torch.tensor([it[2] for it in good], dtype=torch.long),
        failures=failures,
    )


def _targets(targets: list, *, of: list) -> torch.Tensor:
    """The batch's targets as one tensor: multi-label rows stacked, class indices as int64."""
    if targets and isinstance(targets[0], torch.Tensor):
        return torch.stack(targets)
    if not targets and of and isinstance(of[0][1], torch.Tensor):  # no image loaded: still the task's target shape
        return torch.zeros(0, len(of[0][1]), dtype=torch.float32)
    return torch.tensor(targets, dtype=torch.long)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    sampler: Any = None,
) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_seed_worker,
    )


def _seed_worker(worker_id: int) -> None:
    # Augmentations use Python's and torch's RNGs; derive both from the loader's seed so runs repeat.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    torch.manual_seed(seed)
    # Ctrl-C reaches the whole process group; the main process decides what to do (finetune finishes its
    # step and saves), so a worker must not die of it mid-epoch and take the next batches with it.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
