"""The learning-rate schedule (warmup + cosine per phase) and the seeded order of each epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if total <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Plan:
    """Which epochs train what: phase 1 = head only (frozen backbone), phase 2 = everything."""

    strategy: str
    frozen_epochs: int
    epochs: int
    steps_per_epoch: int
    warmup_fraction: float
    head_lr_after_unfreeze: float = 0.5  # fastai's fine_tune halves the head LR after unfreezing

    def frozen(self, epoch: int) -> bool:
        return epoch < self.frozen_epochs

    def lr_factor(self, step: int, *, is_head: bool) -> float:
        """Multiplier on a group's base LR at global optimiser step ``step``."""
        boundary = self.frozen_epochs * self.steps_per_epoch
        total = self.epochs * self.steps_per_epoch
        if step < boundary:  # phase 1: its own warmup + cosine, backbone idle
            if not is_head:
                return 0.0
            return warmup_cosine(step, boundary, max(1, int(boundary * self.warmup_fraction)))
        span = total - boundary
        factor = warmup_cosine(step - boundary, span, max(1, int(span * self.warmup_fraction)))
        if self.frozen_epochs > 0:
            factor *= self.head_lr_after_unfreeze
        return factor


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    # The order depends only on (seed, epoch), so a resumed epoch can skip exactly the batches already seen.
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
