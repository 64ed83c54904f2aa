"""Where a run stands: ``TrainingState``, the one record of progress that last.pt holds beside the model and the
optimiser, and the random-number state that lets a resumed run repeat the uninterrupted one bit for bit."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rescli.evaluation.evaluate import EvalResult


@dataclass
class EpochTotals:
    """Sums over the current epoch's training batches; saved with a mid-epoch stop, so a resumed epoch counts
    every batch once."""

    loss_sum: float = 0.0  # each batch's mean loss times its images
    images: int = 0
    correct: float = 0.0  # mixed batches count each label by its share

    def add(self, *, loss_sum: float, images: int, correct: float) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.images += images

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.images)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.images)

    def as_list(self) -> list[float]:
        """The form last.pt stores (``epoch_partial``)."""
        return [self.loss_sum, self.images, self.correct]

    @classmethod
    def from_list(cls, saved: list[float]) -> EpochTotals:
        return cls(float(saved[0]), int(saved[1]), float(saved[2]))


@dataclass
class TrainingState:
    """The run's progress between two optimiser steps. With the model, the optimiser, the scheduler, the gradient
    scaler and the RNG states, it is what last.pt holds: a run resumed from it continues exactly here."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimiser steps done in the epoch after them (non-zero after a mid-epoch stop)
    totals: EpochTotals = field(default_factory=EpochTotals)
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = -1  # 0-based; -1 until an epoch has been validated
    bad_epochs: int = 0  # epochs since the best one (for --patience)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_eval: EvalResult | None = None  # the best epoch's validation, if it ran in this process (not saved)
    stopped_early: bool = False  # --patience ended the run (not saved: the tail runs before any resume)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainingState:
        """The state of a last.pt (files from before a key was added get its default)."""
        return cls(
            epoch=int(ckpt["epoch"]),
            step_in_epoch=int(ckpt.get("step_in_epoch", 0)),
            totals=EpochTotals.from_list(ckpt["epoch_partial"]) if ckpt.get("epoch_partial") else EpochTotals(),
            best_accuracy=float(ckpt["best_accuracy"]),
            best_loss=float(ckpt["best_loss"]),
            best_epoch=int(ckpt["best_epoch"]),
            bad_epochs=int(ckpt.get("bad_epochs", 0)),
            history=[dict(row) for row in ckpt.get("history", [])],
        )

    def checkpoint_fields(self) -> dict[str, Any]:
        """This state as last.pt stores it (beside the optimiser, scheduler, scaler and RNG entries)."""
        return {
            "epoch_partial": self.totals.as_list() if self.step_in_epoch else [0.0, 0, 0],
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_accuracy": self.best_accuracy,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
        }

    def record_validation(self, ev: EvalResult, *, epoch: int) -> bool:
        """Count a validated epoch; True if it is the new best (higher accuracy, or the same with a lower loss)."""
        improved = ev.accuracy > self.best_accuracy or (ev.accuracy == self.best_accuracy and ev.loss < self.best_loss)
        if improved:
            self.best_accuracy, self.best_loss, self.best_epoch, self.bad_epochs = ev.accuracy, ev.loss, epoch, 0
            self.best_eval = ev
        else:
            self.bad_epochs += 1
        return improved


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors, lists and numbers: types the weights_only loader accepts."""
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # legacy=True always gives the tuple form; this tells the type checker
        raise TypeError("numpy's legacy RNG state is not a tuple")
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": _tuples_to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _tuples_to_lists(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(o) for o in obj]
    return obj


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
