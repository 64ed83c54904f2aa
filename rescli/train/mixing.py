"""Mixup and CutMix of a batch, seeded per step so a resumed run mixes the same pairs."""

from __future__ import annotations

import math

import numpy as np
import torch


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, *, mixup: float, cutmix: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix a batch: returns (images, labels_a, labels_b, lam); loss = lam*L(a) + (1-lam)*L(b).

    With both alphas > 0, each batch uses one of the two (even odds), as timm does. ``rng`` is seeded per
    (seed, epoch, step), so a resumed run mixes exactly the same pairs.
    """
    if (mixup <= 0 and cutmix <= 0) or len(y) < 2:
        return x, y, y, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(y))).to(y.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)  # the area actually pasted
    else:
        x = x * lam + x[perm] * (1.0 - lam)
    return x, y, y[perm], lam


def mix_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, step, 0x6D6978])
