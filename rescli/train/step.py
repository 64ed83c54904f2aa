"""One optimisation step, the same body whether the batch is images through the whole network or cached backbone
features through the head: mix, forward, loss, the checks every process agrees on, backward, update.

The objective is the one place of a step that knows the task: the loss of a batch and how many of it were right.
``SoftmaxObjective`` (single-label: cross-entropy) and ``SigmoidObjective`` (multi-label: binary cross-entropy, a
sigmoid per class) have the same three methods; ``objective_for`` picks the task's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import nn

from rescli.core.errors import RescliError
from rescli.core.runtime import Runtime
from rescli.data.splits import Sample
from rescli.data.tasks import MULTI, Task
from rescli.train.distributed import DistContext, all_reduce_sum, convert_sync_bn, wrap
from rescli.train.mixing import mix_batch, mix_rng
from rescli.train.params import freeze_batchnorm_stats, head, param_groups, set_backbone_trainable
from rescli.train.schedule import Plan
from rescli.train.settings import TrainSettings, peak_lr


class SoftmaxObjective:
    """Single-label classification: cross-entropy on the logits (label smoothing, optional class weights)."""

    def __init__(self, *, class_weights: torch.Tensor | None, label_smoothing: float, summed: bool) -> None:
        self.class_weights = class_weights
        # Distributed (``summed``): each process sums its images' losses and the step divides by the global
        # batch's total weight (all-reduced), times N: DDP's gradient average is then exactly the gradient of
        # the global batch's mean loss, also when the batch does not split evenly.
        self.criterion = nn.CrossEntropyLoss(
            weight=class_weights, label_smoothing=label_smoothing, reduction="sum" if summed else "mean"
        )

    def loss(self, logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
        """The batch's loss; a mixed batch (mixup, cutmix) counts both labels of each image by their shares."""
        if lam == 1.0:
            return self.criterion(logits, y_a)
        return lam * self.criterion(logits, y_a) + (1 - lam) * self.criterion(logits, y_b)

    def weight(self, labels: torch.Tensor) -> float:
        """What the batch weighs in the mean loss: its images, or the sum of their class weights."""
        return float(self.class_weights[labels].sum()) if self.class_weights is not None else float(len(labels))

    def correct(self, logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> float:
        pred = logits.detach().argmax(1)
        hits = lam * int((pred == y_a).sum())
        return hits if lam == 1.0 else hits + (1 - lam) * int((pred == y_b).sum())


class SigmoidObjective:
    """Multi-label classification: binary cross-entropy of each class's sigmoid (optional positive weights), label
    smoothing towards 1/2, the mean over the classes of an image."""

    def __init__(self, *, pos_weight: torch.Tensor | None, label_smoothing: float, summed: bool) -> None:
        self.pos_weight = pos_weight
        self.smoothing = label_smoothing
        self.summed = summed  # as SoftmaxObjective: each process sums, the step divides by the global batch
        self.criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")

    def loss(self, logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
        """The batch's loss; binary cross-entropy is linear in its target, so a mixed batch mixes the targets."""
        target = y_a if lam == 1.0 else lam * y_a + (1 - lam) * y_b
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / 2
        per_image = self.criterion(logits, target).mean(1)
        return per_image.sum() if self.summed else per_image.mean()

    def weight(self, labels: torch.Tensor) -> float:
        return float(len(labels))

    def correct(self, logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> float:
        """Images right, counting each by the share of its classes decided right at 1/2 (fastai's accuracy_multi)."""
        pred = (logits.detach() > 0).float()
        hits = lam * float((pred == y_a).float().mean(1).sum())
        return hits if lam == 1.0 else hits + (1 - lam) * float((pred == y_b).float().mean(1).sum())


Objective = Union[SoftmaxObjective, SigmoidObjective]


def objective_for(
    task: Task, *, samples: list[Sample], n_classes: int, balance: bool, label_smoothing: float, summed: bool,
    device: torch.device,
) -> Objective:
    """The training objective of ``task``; ``balance`` weighs rare classes (single-label) or rare positives
    (multi-label) up, from the training ``samples``."""
    if task is MULTI:
        pos_weight = positive_weights_for([y for _, y in samples], n_classes, device) if balance else None
        return SigmoidObjective(pos_weight=pos_weight, label_smoothing=label_smoothing, summed=summed)
    weights = class_weights_for([y for _, y in samples], n_classes, device) if balance else None
    return SoftmaxObjective(class_weights=weights, label_smoothing=label_smoothing, summed=summed)


def class_weights_for(labels: list[int], n_classes: int, device: torch.device) -> torch.Tensor:
    """--balance: inverse-frequency loss weights, normalised so a balanced set gets weight 1 everywhere."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = torch.tensor(counts.sum() / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    return weights.to(device)


#: --balance, multi-label: a positive weighs at most this many times a negative (a class seen once would
#: otherwise weigh thousands of times more, and swamp every other class's gradient).
MAX_POSITIVE_WEIGHT = 100.0


def positive_weights_for(labels: list[tuple[int, ...]], n_classes: int, device: torch.device) -> torch.Tensor:
    """--balance, multi-label: each class's positives weighted by its negatives / positives in the training split,
    so that both sides weigh the same in the loss (capped at MAX_POSITIVE_WEIGHT)."""
    positives = np.zeros(n_classes, dtype=np.float64)
    for label in labels:
        positives[list(label)] += 1
    weights = np.clip((len(labels) - positives) / np.maximum(positives, 1), 1.0 / MAX_POSITIVE_WEIGHT,
                      MAX_POSITIVE_WEIGHT)
    return torch.tensor(weights, dtype=torch.float32, device=device)


@dataclass
class StepResult:
    loss_sum: float  # the batch's mean loss times its images
    images: int
    correct: float


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite, here or in another process; nothing was updated."""

    def __init__(self, shown: float | str, *, step: int) -> None:
        super().__init__(f"{shown} at step {step + 1}")
        self.shown = shown
        self.step = step  # in the epoch, from 0


class Trainer:
    """The model with what updates it: optimiser, LR schedule, gradient scaler, objective, and the module each
    step calls (the model or its head; wrapped in DistributedDataParallel, or compiled)."""

    def __init__(
        self, model: nn.Module, *, settings: TrainSettings, plan: Plan, runtime: Runtime, ctx: DistContext,
        objective: Objective, on_features: bool, train_images: int,
    ) -> None:
        self.model, self.settings, self.plan, self.runtime, self.ctx = model, settings, plan, runtime, ctx
        self.objective = objective
        self.on_features = on_features  # the steps train the head on cached backbone features
        self.train_images = train_images
        ratio = settings.backbone_lr_ratio if plan.strategy == "gradual" else 1.0
        groups = param_groups(model, lr=peak_lr(settings), weight_decay=settings.weight_decay, backbone_lr_ratio=ratio)
        head_ids = {id(p) for p in head(model).parameters()}
        for g in groups:
            g["is_head"] = all(id(p) in head_ids for p in g["params"])
        # Fused AdamW: one kernel over all tensors instead of one per tensor, a large part of a small-image step
        # on CPU (docs/performance.md).
        fused = runtime.device.type in ("cuda", "cpu") or None
        self.optimizer = torch.optim.AdamW(groups, lr=peak_lr(settings), fused=fused)
        factors = [_lr_factor(plan, g["is_head"]) for g in groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factors)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = model
        self.trainable: list[nn.Parameter] = []
        self.stop_agreed = False  # distributed: every process saw a stop request at the last step
        self._ddp: nn.Module | None = None
        self._ddp_frozen: bool | None = None
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Optimiser, schedule and scaler as a last.pt saved them."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])

    def begin_epoch(self, epoch: int) -> None:
        """Train mode, with the backbone frozen or not as the plan says; the module the steps call."""
        frozen = self.plan.frozen(epoch)
        set_backbone_trainable(self.model, not frozen)
        self.model.train()
        if frozen:
            freeze_batchnorm_stats(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        trained = head(self.model) if self.on_features else self.model
        if self.ctx.enabled:
            if self._ddp is None or self._ddp_frozen != frozen:
                # DDP registers the parameters that require grad when it is built: rebuilt when the set changes
                # (gradual: after the frozen epochs). Building also copies rank 0's weights and buffers everywhere.
                self._ddp = None  # the old wrapper (and its gradient buckets) goes before the new one is built
                self._ddp = wrap(trained, self.ctx, self.runtime.device)
                self._ddp_frozen = frozen
            self.forward = self._ddp
        elif self.settings.compile and not self.on_features:
            if self._compiled is None:  # once per run; the plain model still owns the weights checkpoints save
                self._compiled = torch.compile(self.model)
            self.forward = self._compiled
        else:
            self.forward = trained

    @property
    def batchnorm_in_training(self) -> bool:
        """Whether some BatchNorm layer normalises with batch statistics (a batch of one image cannot)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.model.modules())

    def step(
        self, inputs: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int, stop_asked: bool
    ) -> StepResult:
        """One optimiser step on a batch (this process's share of the global batch, possibly empty)."""
        inputs, y_a, y_b, lam = self._mixed(inputs, labels, epoch=epoch, step=step)
        with self.runtime.autocast():
            logits = self._logits(inputs, epoch=epoch, step=step)
            loss = self.objective.loss(logits, y_a, y_b, lam)
        finite = bool(torch.isfinite(loss))
        images = len(labels)
        weight = total_weight = float(images)
        if self.ctx.enabled:  # one small all-reduce: the global batch's weight, a bad loss anywhere, a stop anywhere
            weight = self.objective.weight(y_a)
            total_weight, bad, stops = all_reduce_sum(self.ctx, weight, float(not finite), float(stop_asked))
            finite, self.stop_agreed = finite and bad == 0, stops > 0
        if not finite:
            raise NonFiniteLoss(loss.item() if not torch.isfinite(loss) else "non-finite in another process", step=step)
        if self.ctx.enabled:
            scaled = loss * (self.ctx.world_size / total_weight if total_weight > 0 else 0.0)
            self._update(scaled, apply=total_weight > 0)  # no process had an image: nothing to apply
            loss_sum = loss.item() * images / weight if weight > 0 else 0.0
        else:
            self._update(loss, apply=True)
            loss_sum = loss.item() * images
        return StepResult(loss_sum, images, self.objective.correct(logits, y_a, y_b, lam))

    def _mixed(
        self, inputs: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        s = self.settings
        if self.on_features or (s.mixup <= 0 and s.cutmix <= 0):
            return inputs, labels, labels, 1.0
        return mix_batch(inputs, labels, mixup=s.mixup, cutmix=s.cutmix, rng=mix_rng(s.seed, epoch, step))

    def _logits(self, inputs: torch.Tensor, *, epoch: int, step: int) -> torch.Tensor:
        try:
            return self.forward(inputs).float()
        except ValueError as exc:  # BatchNorm in training mode cannot normalise one value per channel
            if "more than 1 value per channel" not in str(exc):
                raise
            raise RescliError(
                f"a training batch of {len(inputs)} image(s) reached a 1x1 BatchNorm layer (epoch {epoch + 1}, "
                f"step {step + 1}), which cannot be normalised in training mode: use a --batch-size that leaves no "
                f"batch of one image per process (here {self.train_images} training images), or a larger --img-size"
            ) from None

    def _update(self, loss: torch.Tensor, *, apply: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP: the gradients are all-reduced here
        if not apply:
            return
        if self.settings.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable, self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _lr_factor(plan: Plan, is_head: bool) -> Callable[[int], float]:
    # A plain function, as the lambdas were: LambdaLR leaves functions out of its state_dict.
    def factor(step: int) -> float:
        return plan.lr_factor(step, is_head=is_head)

    return factor


def maybe_sync_bn(model: nn.Module, *, settings: TrainSettings, ctx: DistContext, on_features: bool) -> nn.Module:
    """--sync-bn in a distributed run that trains the backbone: BatchNorm over the global batch."""
    if settings.sync_bn and ctx.enabled and not on_features:
        return convert_sync_bn(model)  # same parameter and buffer tensors, same state_dict keys
    return model
