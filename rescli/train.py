"""The fine-tuning loop: one function, ``finetune``, from a data folder to a run folder.

The run folder holds best.pt (best validation accuracy), last.pt (everything needed to
resume), history.csv, metrics.json, run.json and skipped.txt. Every file is written
atomically, so a kill at any moment leaves usable files behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from rescli import console, data, distributed, models
from rescli.runfolder import RunFolderLock, open_new_run
from rescli.checkpoint import MAX_IMG_SIZE, load_checkpoint, make_checkpoint, save_checkpoint, versions
from rescli.fileio import atomic_write_json, atomic_write_text
from rescli.errors import RescliError, UsageError
from rescli.evaluate import EvalResult, eval_result, run_eval, write_evaluation
from rescli.predict import torch_logits_fn
from rescli.runtime import Runtime, default_workers, resolve_device, select_runtime

STRATEGIES = ("auto", "head", "full", "gradual")
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")


class Interrupted(RescliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=130)


@dataclass
class TrainSettings:
    """Everything that defines a run; stored in every checkpoint and in run.json."""

    data_dir: str
    arch: str = "resnet18"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = "imagenet"
    strategy: str = "auto"
    freeze_epochs: int = 1
    epochs: int = 5
    batch_size: int = 32
    img_size: int = 224
    lr: float = 2e-3
    weight_decay: float = 0.05
    backbone_lr_ratio: float = 0.01
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    augment: str = "none"  # short runs underfit: augmentation only slows them (docs/training.md); light/strong for long runs
    balance: bool = False
    patience: int | None = None
    val_split: float = 0.2
    seed: int = 0
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    strict: bool = False
    compile: bool = False  # torch.compile the training forward/backward (first steps pay the compile time)
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of image pairs; 0 = off
    cutmix: float = 0.0  # alpha of CutMix boxes; 0 = off (both on: one or the other per batch)
    cache_features: bool = True  # head strategy without augmentation: train the head on cached backbone features
    cache_images: bool = True  # keep decoded validation images (and training ones with --augment none) in RAM after epoch 1
    sync_bn: bool = False  # distributed runs on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)


def settings_from_dict(d: dict[str, Any]) -> TrainSettings:
    """Settings stored in a checkpoint -> TrainSettings; keys added for information (or by newer versions) are ignored."""
    known = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in d.items() if k in known})


def _attach_image_caches(
    settings: TrainSettings, *, train_ds: data.ImageSamples, val_ds: data.ImageSamples, workers: int, processes: int,
    epochs_left: int, features_cached: bool,
) -> dict[str, int]:
    """Decoded-image caches for the datasets whose pixels repeat every epoch; returns how many images each holds.

    Validation always repeats; training only without augmentation (mixup and cutmix act on batches, later).
    Nothing to gain with a single epoch left, or when the backbone's features are cached instead.
    """
    if not settings.cache_images or epochs_left < 2 or features_cached:
        return {}
    shared = workers > 0  # worker processes fill the slots: they must see the same memory as the main process
    budget = data.image_cache_budget(shared=shared) // max(1, processes)
    held = {}
    for name, ds in (("val", val_ds), ("train", train_ds)):  # validation first: it is smaller and always repeats
        if name == "train" and settings.augment != "none":
            continue
        ds.cache = data.DecodedCache(len(ds), settings.img_size, budget_bytes=budget, shared=shared)
        budget -= ds.cache.nbytes
        held[name] = ds.cache.capacity
    return held


# --- run files ------------------------------------------------------------------------------------

def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in HISTORY_FIELDS})
    atomic_write_text(path, buf.getvalue())


# --- interrupts --------------------------------------------------------------------------------------

class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves, then stops. A second Ctrl-C kills."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signal_name is not None:  # asked twice: stop now
                signal.signal(signum, signal.SIG_DFL)
                raise KeyboardInterrupt
            self.signal_name = signal.Signals(signum).name
            console.warn(f"{self.signal_name}: finishing this step and saving last.pt (press again to abort at once)")

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def check(self) -> bool:
        """Asked once after every optimiser step: stop here?"""
        return bool(self)


# --- schedule ------------------------------------------------------------------------------------------

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


def resolve_strategy(strategy: str, *, pretrained: bool, epochs: int, freeze_epochs: int) -> tuple[str, int]:
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        strategy = "gradual" if pretrained else "full"
    if strategy == "head":
        return strategy, epochs
    if strategy == "full":
        return strategy, 0
    if freeze_epochs < 0:
        raise UsageError("--freeze-epochs must be >= 0")
    return strategy, min(freeze_epochs, max(0, epochs - 1)) if epochs > 1 else min(freeze_epochs, epochs)


# --- the run ---------------------------------------------------------------------------------------------

def _capture_rng() -> dict[str, Any]:
    """RNG states as tensors, lists and numbers: types the weights_only loader accepts."""
    np_state = np.random.get_state()
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


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    # The order depends only on (seed, epoch), so a resumed epoch can skip exactly the batches already seen.
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


SMALL_IMAGES_FP32 = 40  # below this size, fp32 NCHW trains faster than bf16 channels_last on CPU


def training_runtime(settings: TrainSettings, *, device: str | None = None) -> Runtime:
    """Device and precision for training. --precision auto on a CPU picks bf16 + channels_last (AMX), except
    for small images: measured here (resnet18, batch 32, AMX CPU) fp32 NCHW takes 127 vs 162 ms a step at
    32 px and loses from 48 px on (241 vs 222; 96 px: 650 vs 344), as the tiny convolutions cannot use AMX.
    ``device`` overrides settings.device (a distributed run's process uses the GPU of its local rank)."""
    runtime = select_runtime(device=settings.device if device is None else device, precision=settings.precision)
    if (
        runtime.device.type == "cpu" and (settings.precision or "auto").lower() == "auto" and runtime.precision == "bf16"
        and settings.img_size < SMALL_IMAGES_FP32
        # CIFAR-style nets keep full resolution in their first stage, where AMX wins (resnet56 at 32 px:
        # 291 ms bf16 vs 655 ms fp32 a step), so the rule is for torchvision's 4x-downsampling stem only.
        and models.arch_spec(settings.arch).family == "torchvision"
    ):
        return Runtime(device=runtime.device, precision="fp32", channels_last=False)
    return runtime


def validate_settings(settings: TrainSettings) -> None:
    """Usage errors (exit 2) for values no run can use; checked before any data is read."""
    if isinstance(settings.lr, str):
        if settings.lr.strip().lower() != "auto":
            try:
                settings.lr = float(settings.lr)
            except ValueError:
                raise UsageError(f"--lr {settings.lr!r}: expected a number such as 2e-3, or auto") from None
        else:
            settings.lr = "auto"
    if settings.lr != "auto" and not (math.isfinite(settings.lr) and settings.lr > 0):
        raise UsageError(f"--lr {settings.lr}: must be a positive number (or auto)")
    for name in ("mixup", "cutmix"):
        value = getattr(settings, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} {value}: expected an alpha >= 0 (0 = off; 0.2-1.0 are usual)")
    if settings.weight_decay < 0 or not 0 <= settings.label_smoothing < 1:
        raise UsageError("--weight-decay must be >= 0 and --label-smoothing in [0, 1)")
    if not 0 <= settings.warmup_fraction < 1 or not 0 < settings.backbone_lr_ratio <= 1:
        raise UsageError("warmup_fraction must be in [0, 1) and backbone_lr_ratio in (0, 1]")
    if settings.patience is not None and settings.patience < 1:
        raise UsageError("--patience must be at least 1")


# --- mixup / cutmix ---------------------------------------------------------------------------------------

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


def _mix_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, step, 0x6D6978])


# --- cached backbone features (head strategy without augmentation) ---------------------------------------

@dataclass
class FeatureSet:
    """Backbone outputs (the head's inputs) for a list of samples, computed once."""

    features: torch.Tensor  # float32 [N, D] on the training device
    labels: torch.Tensor  # int64 [N]
    indices: list[int]  # positions in the dataset (images that failed to load are absent)
    failures: list[tuple[int, str]]


@torch.no_grad()
def extract_features(model: nn.Module, loader, *, runtime: Runtime, mean, std, allow_empty: bool = False) -> FeatureSet:
    """One pass of the backbone (the model with its head swapped for Identity) over ``loader``.

    ``allow_empty``: a loader that yields no readable image gives an empty set (one process's shard) instead of an error.
    """
    head = model.fc
    model.fc = nn.Identity()
    was_training = model.training
    model.eval()
    feats, labels, indices, failures = [], [], [], []
    try:
        for batch in loader:
            failures += batch.failures
            if batch.labels.numel() == 0:
                continue
            x = data.to_model_input(batch.images, device=runtime.device, mean=mean, std=std, channels_last=runtime.channels_last)
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
            return FeatureSet(torch.zeros(0, dim, device=runtime.device), torch.zeros(0, dtype=torch.long, device=runtime.device), [], failures)
        raise RescliError("no image could be read to compute backbone features")
    return FeatureSet(torch.cat(feats), torch.cat(labels), indices, failures)


def _gather_features(ctx: distributed.DistContext, fs: FeatureSet, device: torch.device) -> FeatureSet:
    """Every process's shard of features -> the whole set on every process, in dataset order."""
    idx, got = distributed.gather_by_index(
        ctx, np.asarray(fs.indices, dtype=np.int64), features=fs.features.cpu().numpy(), labels=fs.labels.cpu().numpy()
    )
    failures = sorted(f for part in distributed.gather_objects(ctx, list(fs.failures)) for f in part)
    if not len(idx):
        raise distributed.shared_error("no image could be read to compute backbone features")
    return FeatureSet(
        torch.from_numpy(got["features"]).to(device), torch.from_numpy(got["labels"]).to(device), idx.tolist(), failures
    )


def _eval_features(head: nn.Module, fs: FeatureSet, samples, *, runtime: Runtime) -> EvalResult:
    with torch.inference_mode(), runtime.autocast():
        logits = head(fs.features).float()
    return eval_result(
        logits.cpu(), fs.labels.cpu(), [samples[i][0] for i in fs.indices], [(samples[i][0], msg) for i, msg in fs.failures]
    )


def _padded(loader, steps: int, *, img_size: int) -> Iterator[data.Batch]:
    """A process's batches, then empty ones up to ``steps``: in a last global batch smaller than the number of
    processes some get no image, yet every process must take part in every (all-reducing) step."""
    n = 0
    for batch in loader:
        if batch.labels.numel() == 0:  # every image of the slot failed to load: an empty batch of the right shape
            batch.images = torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8)
        yield batch
        n += 1
    empty = torch.zeros(0, dtype=torch.long)
    for _ in range(n, steps):
        yield data.Batch(torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8), empty, empty, [])


def _without_lone_image(batch: data.Batch, img_size: int) -> data.Batch:
    """The batch with its single image left out: an empty batch, which a distributed step still takes part in."""
    empty = torch.zeros(0, dtype=torch.long)
    return data.Batch(torch.zeros(0, 3, img_size, img_size, dtype=torch.uint8), empty, empty, batch.failures)


def _gather_eval(ctx: distributed.DistContext, ev: EvalResult, samples, *, n_classes: int) -> EvalResult:
    """Each process's shard of a validation pass -> the whole split's result (dataset order), the same in every process."""
    position = {path: i for i, (path, _) in enumerate(samples)}
    logits = ev.logits if len(ev.y_true) else np.zeros((0, n_classes), np.float32)
    idx, got = distributed.gather_by_index(
        ctx, np.array([position[p] for p in ev.paths], dtype=np.int64), logits=logits, y_true=np.asarray(ev.y_true, dtype=np.int64)
    )
    failures = sorted(
        (f for part in distributed.gather_objects(ctx, list(ev.failures)) for f in part), key=lambda f: position.get(f[0], -1)
    )
    paths = [samples[i][0] for i in idx]
    if not len(idx):
        return eval_result(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [], failures)
    return eval_result(torch.from_numpy(got["logits"]), torch.from_numpy(got["y_true"]), paths, failures)


def finetune(
    *,
    settings: TrainSettings | None = None,
    output: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    epochs: int | None = None,
    show_progress: bool = True,
    on_epoch_end: Callable[..., dict[str, Any] | None] | None = None,
    _stop: StopFlag | None = None,
) -> dict[str, Any]:
    """Train and return a summary dict (run_dir, best epoch, metrics). Raises RescliError on failure.

    on_epoch_end(epoch=, model=, logits_fn=), if given, runs after each epoch's validation with the model
    in eval mode; the dict it returns is merged into that epoch's history row (returned; history.csv keeps
    its fixed columns). rescli degradation uses it to measure training-set error. In a distributed run it
    runs in every process.

    Started by torchrun (WORLD_SIZE > 1), every process calls this: DistributedDataParallel, each process
    taking its share of every global batch (see rescli.distributed); rank 0 alone writes the run folder,
    and every rank returns the same summary.
    """
    try:
        with contextlib.ExitStack() as stack:  # releases the run folder's lock however the run ends
            return _finetune(
                settings=settings, output=output, resume=resume, epochs=epochs, show_progress=show_progress,
                on_epoch_end=on_epoch_end, _stop=_stop, _stack=stack,
            )
    finally:
        distributed.shutdown()


def _finetune(
    *,
    settings: TrainSettings | None,
    output: str | os.PathLike | None,
    resume: str | os.PathLike | None,
    epochs: int | None,
    show_progress: bool,
    on_epoch_end: Callable[..., dict[str, Any] | None] | None,
    _stop: StopFlag | None,
    _stack: contextlib.ExitStack,
) -> dict[str, Any]:
    state: dict[str, Any] | None = None
    _compiled_cache: dict[str, Any] = {}
    tail_only = False
    if resume is not None:
        run_dir, state = _load_resume(resume)  # every process reads last.pt (multi-node: a folder they all see)
        settings = settings_from_dict(state["settings"])
        if state.get("data"):  # the resolved folder it was trained on, wherever this process was started
            settings.data_dir = state["data"]["root"]
        if epochs is not None:
            settings.epochs = epochs
        done = int(state["epoch"])
        if done >= settings.epochs and _run_finished(run_dir):
            raise UsageError(f"{run_dir} already trained {done} epochs; pass --epochs N with N > {done} to continue")
        tail_only = done >= settings.epochs  # every epoch ran, but the final evaluation was interrupted
    elif settings is None:
        raise UsageError("finetune needs settings or --resume")
    else:
        settings.data_dir = os.path.abspath(os.path.expanduser(settings.data_dir))
    if settings.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if settings.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not 8 <= settings.img_size <= MAX_IMG_SIZE:
        raise UsageError(f"--img-size must be from 8 to {MAX_IMG_SIZE} pixels")
    validate_settings(settings)  # before a run folder is made: a usage error leaves nothing behind
    ctx, dist_device = distributed.init_from_env(settings.device)
    distributed.check_batch_size(settings.batch_size, ctx.world_size)
    if settings.sync_bn:
        distributed.check_sync_bn(True, resolve_device(dist_device))
    if resume is None:  # rank 0 picks, makes and locks the run folder; the others learn its name

        def open_run() -> str:
            out, lock = open_new_run(output, data_dir=settings.data_dir)
            _stack.callback(lock.release)
            return str(out)

        run_dir = Path(distributed.on_main(ctx, open_run))
    elif ctx.is_main:
        _stack.callback(RunFolderLock(run_dir).acquire().release)
    _seed_everything(settings.seed)

    # Data: scan and check every image once (cached), split, report what was left out. Distributed: rank 0
    # scans and hands the index to the others, so every process has the same split. A resumed run keeps the
    # split it started with, file for file.
    def scan() -> data.DatasetIndex:
        found = data.scan_dataset(
            settings.data_dir, val_split=settings.val_split, seed=settings.seed, strict=settings.strict, workers=settings.workers
        )
        if state is not None:
            found = _restore_split(found, state)
        report_scan(found, run_dir)
        if not found.splits["val"]:
            raise RescliError(f"{settings.data_dir}: no validation images (use --val-split > 0 or add a val/ folder)")
        return found

    index = distributed.on_main(ctx, scan)
    classes = index.classes
    train_samples, val_samples = index.splits["train"], index.splits["val"]

    # Model and weights.
    model = models.create_model(settings.arch, len(classes), settings.arch_kwargs)
    if state is None:
        with distributed.main_first(ctx):  # one download of --weights imagenet, then the others read the cache
            winfo = models.load_pretrained(model, arch=settings.arch, weights=settings.weights, arch_kwargs=settings.arch_kwargs)
        mean, std, pretrained = list(winfo.mean), list(winfo.std), winfo.pretrained
    else:
        model.load_state_dict(state["model"])
        mean, std, pretrained = state["mean"], state["std"], state["settings_pretrained"]
    strategy, frozen_epochs = resolve_strategy(
        settings.strategy, pretrained=pretrained, epochs=settings.epochs, freeze_epochs=settings.freeze_epochs
    )
    runtime = training_runtime(settings, device=dist_device)
    model.to(runtime.device, memory_format=runtime.memory_format)

    workers = default_workers() if settings.workers is None else settings.workers
    pin = runtime.device.type == "cuda"
    train_ds = data.ImageSamples(
        train_samples,
        data.build_transform(img_size=settings.img_size, train=True, augment=settings.augment),
        draft_size=data.draft_size_for(settings.img_size, train=True),
    )
    val_ds = data.ImageSamples(
        val_samples,
        data.build_transform(img_size=settings.img_size, train=False),
        draft_size=data.draft_size_for(settings.img_size, train=False),
    )
    # Distributed: each process evaluates every N-th validation image; the results are gathered by index.
    val_loader = data.make_loader(
        val_ds, batch_size=settings.batch_size * 2, shuffle=False, workers=workers, pin_memory=pin,
        sampler=distributed.shard(range(len(val_ds)), ctx) if ctx.enabled else None,
    )

    lr_find_info: dict[str, Any] | None = None
    if settings.lr == "auto":  # LR range test on this model and data first (never on resume: last.pt holds a number)
        from rescli.lr_find import range_test

        def lr_test() -> dict[str, Any]:  # distributed: on rank 0 alone, with the whole global batch
            console.info("--lr auto: running the learning-rate range test first")
            found = range_test(
                model, train_ds, runtime=runtime, mean=mean, std=std, frozen_backbone=strategy in ("head", "gradual") and frozen_epochs > 0,
                batch_size=settings.batch_size, weight_decay=settings.weight_decay, label_smoothing=settings.label_smoothing,
                workers=workers, seed=settings.seed, show_progress=show_progress,
            )
            found.plot(run_dir / "lr_find.png")
            return {"suggested_lr": found.suggestion, "plot": str(run_dir / "lr_find.png"), "steps": len(found.lrs)}

        lr_find_info = distributed.on_main(ctx, lr_test)
        settings.lr = lr_find_info["suggested_lr"]
        console.info(f"--lr auto: using lr {settings.lr:.3g} (curve in {run_dir / 'lr_find.png'})")
        _seed_everything(settings.seed)

    # Head only, no augmentation: the backbone's output for an image never changes, so compute it once and
    # train the head on the cached features (each epoch is then one small matrix multiply per batch).
    use_cache = (
        not tail_only and settings.cache_features and strategy == "head" and settings.augment == "none"
        and settings.mixup <= 0 and settings.cutmix <= 0
    )
    train_feats = val_feats = None
    cache_seconds = 0.0
    if use_cache:
        t_cache = time.perf_counter()
        console.info(f"head only, no augmentation: caching backbone features ({len(train_ds)} train + {len(val_ds)} val images, one pass)")
        train_feats = extract_features(
            model, data.make_loader(
                train_ds, batch_size=settings.batch_size * 2, shuffle=False, workers=workers, pin_memory=pin,
                sampler=distributed.shard(range(len(train_ds)), ctx) if ctx.enabled else None,
            ),
            runtime=runtime, mean=mean, std=std, allow_empty=ctx.enabled,
        )
        val_feats = extract_features(model, val_loader, runtime=runtime, mean=mean, std=std, allow_empty=ctx.enabled)
        if ctx.enabled:  # each process computed a shard: every process gets all features, in dataset order
            train_feats = _gather_features(ctx, train_feats, runtime.device)
            val_feats = _gather_features(ctx, val_feats, runtime.device)
        cache_seconds = time.perf_counter() - t_cache
        for _, msg in train_feats.failures + val_feats.failures:
            console.warn(f"skipped: {msg}")
        console.info(f"features cached in {cache_seconds:.1f}s")
    if settings.sync_bn and ctx.enabled and not use_cache:  # after the LR test, which runs on rank 0 alone
        model = distributed.convert_sync_bn(model)  # same parameter and buffer tensors, same state_dict keys
    n_train = len(train_feats.indices) if use_cache else len(train_ds)
    steps_per_epoch = max(1, math.ceil(n_train / settings.batch_size))
    plan = Plan(strategy, frozen_epochs, settings.epochs, steps_per_epoch, settings.warmup_fraction)

    ratio = settings.backbone_lr_ratio if strategy == "gradual" else 1.0
    groups = models.param_groups(model, lr=settings.lr, weight_decay=settings.weight_decay, backbone_lr_ratio=ratio)
    head_ids = {id(p) for p in model.fc.parameters()}
    for g in groups:
        g["is_head"] = all(id(p) in head_ids for p in g["params"])
    # Fused AdamW: one kernel over all tensors; on CPU ~5x faster than the per-tensor default (60 vs 280 ms a step
    # for resnet18), which at small image sizes is a third of the step.
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, fused=runtime.device.type in ("cuda", "cpu") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, h=g["is_head"]: plan.lr_factor(step, is_head=h) for g in groups]
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)

    class_weights = None
    if settings.balance:
        counts = np.bincount([y for _, y in train_samples], minlength=len(classes)).astype(np.float64)
        # Inverse-frequency loss weights, normalised so a balanced set gets weight 1 everywhere.
        class_weights = torch.tensor(counts.sum() / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
        class_weights = class_weights.to(runtime.device)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=settings.label_smoothing)
    # Distributed: each process sums its images' losses and divides by the global batch's total (all-reduced),
    # times N: DDP's gradient average is then exactly the gradient of the global batch's mean loss.
    criterion_sum = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=settings.label_smoothing, reduction="sum")
    eval_logits = torch_logits_fn(model, runtime=runtime, mean=mean, std=std)

    start_epoch, start_step, best_acc, best_loss, best_epoch = 0, 0, -1.0, float("inf"), -1
    history: list[dict[str, Any]] = []
    best_eval: EvalResult | None = None
    bad_epochs = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = int(state["epoch"]), int(state.get("step_in_epoch", 0))
        best_acc, best_loss, best_epoch = float(state["best_accuracy"]), float(state["best_loss"]), int(state["best_epoch"])
        bad_epochs = int(state.get("bad_epochs", 0))
        history = [dict(r) for r in state.get("history", [])]
        _restore_rng(state["rng"])
        if tail_only:
            console.info(f"resuming {run_dir}: all {start_epoch} epochs are done; finishing its evaluation of best.pt")
        else:
            console.info(f"resuming {run_dir} at epoch {start_epoch + 1}" + (f", step {start_step + 1}" if start_step else ""))

    image_cache = _attach_image_caches(
        settings, train_ds=train_ds, val_ds=val_ds, workers=workers, processes=ctx.world_size if ctx.enabled else 1,
        epochs_left=settings.epochs - start_epoch, features_cached=use_cache,
    )

    base = dict(
        arch=settings.arch,
        arch_kwargs=settings.arch_kwargs,
        classes=classes,
        img_size=settings.img_size,
        mean=mean,
        std=std,
        data=_data_record(index),  # what evaluate needs to score the held-out images, and resume to keep the split
    )
    settings_dict = asdict(settings)
    settings_dict["strategy_resolved"] = strategy
    settings_dict["frozen_epochs"] = frozen_epochs
    settings_dict["train_images"], settings_dict["val_images"] = len(train_samples), len(val_samples)
    run_info = {
        "settings": settings_dict,
        "arch": settings.arch,
        "classes": classes,
        "img_size": settings.img_size,
        "mean": mean,
        "std": std,
        "runtime": runtime.describe(),
        "layout": index.layout,
        "counts": {s: index.counts(s) for s in index.splits},
        "versions": versions(),
    }
    if lr_find_info is not None:
        run_info["lr_find"] = lr_find_info
    if image_cache:
        run_info["image_cache"] = image_cache
    if use_cache:
        run_info["feature_cache"] = {"seconds": round(cache_seconds, 3), "train": n_train, "val": len(val_feats.indices)}
    if ctx.enabled:
        run_info["distributed"] = {
            "world_size": ctx.world_size, "backend": distributed.backend(),
            "per_process_batch": settings.batch_size // ctx.world_size, "sync_bn": bool(settings.sync_bn),
        }
    if ctx.is_main:
        atomic_write_json(run_dir / "run.json", run_info)

    partial = [0.0, 0, 0]  # loss sum, images, correct so far in the current epoch (saved on interrupt)

    def training_state(epoch_done: int, step_in_epoch: int) -> dict[str, Any]:
        return dict(
            epoch_partial=list(partial) if step_in_epoch else [0.0, 0, 0],
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else {},
            epoch=epoch_done,
            step_in_epoch=step_in_epoch,
            best_accuracy=best_acc,
            best_loss=best_loss,
            best_epoch=best_epoch,
            bad_epochs=bad_epochs,
            history=history,
            rng=_capture_rng(),
            settings_pretrained=pretrained,
        )

    def save_last(epoch_done: int, step_in_epoch: int, metrics: dict[str, Any] | None = None) -> None:
        if not ctx.is_main:
            return
        ckpt = make_checkpoint(
            model_state=model.state_dict(), settings=settings_dict, metrics=metrics or {}, **base,
            **training_state(epoch_done, step_in_epoch),
        )
        _save(ckpt, run_dir / "last.pt")

    console.info(
        f"{settings.arch} · {len(classes)} classes · {len(train_samples)} train / {len(val_samples)} val images · "
        f"{runtime.describe()} · strategy {strategy}" + (f" ({frozen_epochs} frozen epoch(s))" if strategy == "gradual" else "")
        + (f" · {ctx.world_size} processes ({distributed.backend()}), {settings.batch_size // ctx.world_size} images each a step"
           if ctx.enabled else "")
        + f" · run folder {run_dir}"
    )
    stop = _stop if _stop is not None else StopFlag()  # not `_stop or`: an unset flag is falsy
    warned: set[str] = set()
    stopped_early = False
    ddp: nn.Module | None = None  # DistributedDataParallel over the model (or the head, on cached features)
    ddp_frozen: bool | None = None
    stop_all = [False]  # distributed: a stop asked in any process, as agreed at the last step
    with stop.installed():
        for epoch in range(start_epoch, settings.epochs):
            t0 = time.perf_counter()
            frozen = plan.frozen(epoch)
            models.set_backbone_trainable(model, not frozen)
            model.train()
            if frozen:
                models.freeze_batchnorm_stats(model)
            bn_training = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
            order = _epoch_order(n_train, seed=settings.seed, epoch=epoch)
            skip = start_step if epoch == start_epoch else 0
            if skip and state is not None and state.get("epoch_partial") and ctx.is_main:  # saved totals: counted once
                partial[:] = [float(state["epoch_partial"][0]), int(state["epoch_partial"][1]), float(state["epoch_partial"][2])]
            else:
                partial[:] = [0.0, 0, 0]
            trainable = [p for p in model.parameters() if p.requires_grad]
            if ctx.enabled and (ddp is None or ddp_frozen != frozen):
                # DDP registers the parameters that require grad when it is built: rebuild it when the set changes
                # (gradual: after the frozen epochs). Building also copies rank 0's weights and buffers everywhere.
                ddp = None
                ddp = distributed.wrap(model.fc if use_cache else model, ctx, runtime.device)
                ddp_frozen = frozen

            # Compiled once per run; the plain `model` still owns the weights, so checkpoints are unchanged.
            compiled = model if not settings.compile or ctx.enabled else _compiled_cache.setdefault("m", torch.compile(model))

            def train_step(inputs: torch.Tensor, y: torch.Tensor, forward, step: int) -> None:
                """One optimiser step on a batch; ``forward`` maps inputs to logits (the whole net, or the head)."""
                inputs, y_a, y_b, lam = mix_batch(
                    inputs, y, mixup=settings.mixup, cutmix=settings.cutmix, rng=_mix_rng(settings.seed, epoch, step)
                ) if not use_cache else (inputs, y, y, 1.0)
                crit = criterion_sum if ctx.enabled else criterion
                with runtime.autocast():
                    try:
                        logits = forward(inputs).float()
                    except ValueError as exc:  # BatchNorm in training mode cannot normalise one value per channel
                        if "more than 1 value per channel" not in str(exc):
                            raise
                        raise RescliError(
                            f"a training batch of {len(y)} image(s) reached a 1x1 BatchNorm layer (epoch {epoch + 1}, step {step + 1}), "
                            f"which cannot be normalised in training mode: use a --batch-size that leaves no batch of one image "
                            f"per process (here {n_train} training images), or a larger --img-size"
                        ) from None
                    loss = crit(logits, y_a) if lam == 1.0 else lam * crit(logits, y_a) + (1 - lam) * crit(logits, y_b)
                finite = bool(torch.isfinite(loss))
                scale, weight, total_weight = 1.0, float(len(y)), float(len(y))
                if ctx.enabled:  # one small all-reduce: the global batch's weight, a bad loss anywhere, a stop anywhere
                    weight = float(class_weights[y_a].sum()) if class_weights is not None else float(len(y))
                    total_weight, bad, stops = distributed.all_reduce_sum(ctx, weight, float(not finite), float(bool(stop)))
                    finite, stop_all[0] = finite and bad == 0, stops > 0
                    scale = ctx.world_size / total_weight if total_weight > 0 else 0.0
                if not finite:
                    kept = (
                        f"best.pt (epoch {best_epoch + 1}, val accuracy {best_acc:.4f}) is kept in {run_dir}"
                        if best_epoch >= 0 else f"no epoch finished, so there is no best.pt in {run_dir}"
                    )
                    shown = loss.item() if not torch.isfinite(loss) else "non-finite in another process"
                    raise distributed.shared(RescliError(
                        f"loss became {shown} at epoch {epoch + 1}, step {step + 1}; training stopped. {kept}. "
                        f"Try a lower --lr (now {settings.lr:.3g}) or rescli lr-find"
                    ), ctx)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss * scale if ctx.enabled else loss).backward()  # DDP: gradients all-reduced here
                if total_weight > 0:  # (distributed: not when no process had an image; single: never 0 here)
                    if settings.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                pred = logits.detach().argmax(1)
                partial[0] += (loss.item() * len(y) / weight if weight > 0 else 0.0) if ctx.enabled else loss.item() * len(y)
                partial[2] += lam * int((pred == y_a).sum()) + (1 - lam) * int((pred == y_b).sum())
                partial[1] += len(y)

            step = skip
            # Distributed: this process's slot of every global batch of the same order (one entry per global step).
            mine = distributed.rank_batches(order, batch_size=settings.batch_size, ctx=ctx)[skip:] if ctx.enabled else None
            with _progress(f"epoch {epoch + 1}/{settings.epochs}", steps_per_epoch - skip, enabled=show_progress and ctx.is_main) as advance:
                if use_cache:
                    while step < steps_per_epoch:
                        if ctx.enabled:
                            idx = torch.tensor(mine[step - skip], dtype=torch.long, device=runtime.device)
                        else:
                            idx = torch.tensor(order[step * settings.batch_size:(step + 1) * settings.batch_size], device=runtime.device)
                        train_step(train_feats.features[idx], train_feats.labels[idx], ddp if ctx.enabled else model.fc, step)
                        scheduler.step()
                        step += 1
                        advance(partial[0] / max(1, partial[1]))
                        if stop_all[0] if ctx.enabled else stop.check():
                            break
                else:
                    if ctx.enabled:  # full slots are batch/N long, so batching the flattened slots gives them back
                        loader = data.make_loader(
                            train_ds, batch_size=settings.batch_size // ctx.world_size, shuffle=False, workers=workers,
                            pin_memory=pin, sampler=[i for b in mine for i in b], seed=settings.seed + epoch,
                        )
                        batches = _padded(loader, len(mine), img_size=settings.img_size)
                    else:
                        loader = data.make_loader(
                            train_ds, batch_size=settings.batch_size, shuffle=False, workers=workers, pin_memory=pin,
                            sampler=order[skip * settings.batch_size:], seed=settings.seed + epoch,
                        )
                        batches = loader
                    for batch in batches:
                        for i, msg in batch.failures:
                            if msg not in warned:
                                warned.add(msg)
                                console.warn(f"skipped during training: {msg}")
                        if batch.labels.numel() == 1 and bn_training:
                            batch = _without_lone_image(batch, settings.img_size)
                            if "lone image" not in warned:
                                warned.add("lone image")
                                console.info(
                                    f"a training batch of one image cannot be normalised by BatchNorm in training mode: "
                                    f"such an image sits out its step ({n_train} images, --batch-size {settings.batch_size}"
                                    + (f" over {ctx.world_size} processes" if ctx.enabled else "")
                                    + "; the order changes every epoch, so each time it is another one)"
                                )
                        if batch.labels.numel() > 0 or ctx.enabled:  # every process takes part in every step
                            x = data.to_model_input(batch.images, device=runtime.device, mean=mean, std=std, channels_last=runtime.channels_last)
                            train_step(x, batch.labels.to(runtime.device, non_blocking=True), ddp if ctx.enabled else compiled, step)
                        scheduler.step()
                        step += 1
                        advance(partial[0] / max(1, partial[1]))
                        if stop_all[0] if ctx.enabled else stop.check():
                            break
                    del batches, loader
            if ctx.enabled:  # this epoch's training loss and accuracy over every process's images
                partial[:] = distributed.all_reduce_sum(ctx, *partial)
                distributed.check_in_sync(model, ctx)
            loss_sum, seen, correct = partial
            if (stop_all[0] if ctx.enabled else stop) and step < steps_per_epoch:  # mid-epoch: save where we are
                save_last(epoch, step)  # the resumed run skips the batches done
                distributed.barrier(ctx)  # nobody exits (and has torchrun stop the others) before last.pt is written
                raise distributed.shared(Interrupted(
                    f"interrupted ({stop.signal_name or 'stop asked in another process'}) in epoch {epoch + 1}, step {step}/{steps_per_epoch}; "
                    f"saved {run_dir / 'last.pt'}. Continue with: rescli finetune --resume {run_dir}"
                ), ctx)

            train_seconds = time.perf_counter() - t0
            model.eval()
            if use_cache:
                ev = _eval_features(model.fc, val_feats, val_samples, runtime=runtime)
            elif ctx.enabled:  # every process evaluates rank 0's model (BN statistics included) on its shard
                distributed.broadcast_buffers(model, ctx)
                ev = _gather_eval(ctx, run_eval(eval_logits, val_loader), val_samples, n_classes=len(classes))
            else:
                ev = run_eval(eval_logits, val_loader)
            for _, msg in ev.failures:  # a validation file that vanished or broke since the scan: named once, run goes on
                if msg not in warned:
                    warned.add(msg)
                    console.warn(f"skipped during validation: {msg}")
            seconds = time.perf_counter() - t0
            row = {
                "epoch": epoch + 1,
                "train_loss": round(loss_sum / max(1, seen), 6),
                "train_accuracy": round(correct / max(1, seen), 6),  # on augmented batches, in train mode
                "val_loss": round(ev.loss, 6),
                "val_accuracy": round(ev.accuracy, 6),
                "lr": float(f"{max(g['lr'] for g in optimizer.param_groups):.3g}"),
                "seconds": round(seconds, 2),
                "train_seconds": round(train_seconds, 3),  # the optimisation steps alone (not in history.csv)
            }
            if on_epoch_end is not None:
                row.update(on_epoch_end(epoch=epoch + 1, model=model, logits_fn=eval_logits) or {})
            history.append(row)
            if ctx.is_main:
                write_history(run_dir / "history.csv", history)
            # Distributed: ev is the same gathered result in every process, so they all take the same decisions.
            improved = ev.accuracy > best_acc or (ev.accuracy == best_acc and ev.loss < best_loss)
            if improved:
                best_acc, best_loss, best_epoch, bad_epochs = ev.accuracy, ev.loss, epoch, 0
                best_eval = ev
                if ctx.is_main:
                    _save(
                        make_checkpoint(model_state=model.state_dict(), settings=settings_dict,
                                        metrics={"val_accuracy": ev.accuracy, "val_loss": ev.loss, "epoch": epoch + 1}, **base),
                        run_dir / "best.pt",
                    )
            else:
                bad_epochs += 1
            save_last(epoch + 1, 0, {"val_accuracy": ev.accuracy, "val_loss": ev.loss, "epoch": epoch + 1})
            if distributed.any_rank(ctx, bool(stop)):  # the signal came during the epoch's last step: complete, evaluated, saved
                # (any_rank waits for rank 0, which has written last.pt by then)
                raise distributed.shared(Interrupted(
                    f"interrupted ({stop.signal_name or 'stop asked in another process'}) after epoch {epoch + 1}; "
                    f"saved {run_dir / 'last.pt'}. Continue with: rescli finetune --resume {run_dir}"
                ), ctx)
            console.info(
                f"epoch {epoch + 1}/{settings.epochs}  train loss {row['train_loss']:.4f}  val loss {ev.loss:.4f}  "
                f"val acc {ev.accuracy:.4f}  {seconds:.1f}s" + ("  *" if improved else "")
            )
            if settings.patience is not None and bad_epochs >= settings.patience and epoch + 1 < settings.epochs:
                console.info(f"early stop: no improvement for {bad_epochs} epoch(s); best epoch {best_epoch + 1}")
                stopped_early = True
                break

    def evaluation_files() -> dict[str, Any]:  # distributed: rank 0 alone; the others receive the metrics
        ev = best_eval
        if ev is None:  # resumed after the best epoch: evaluate best.pt once to report its metrics
            best = load_checkpoint(run_dir / "best.pt")
            model.load_state_dict(best["model"])
            model.eval()
            loader = val_loader if not ctx.enabled else data.make_loader(  # the whole split, not this process's shard
                val_ds, batch_size=settings.batch_size * 2, shuffle=False, workers=workers, pin_memory=pin
            )
            ev = run_eval(eval_logits, loader)
        # Temperature fitted on the validation split; metrics.json, predictions.csv, the PNGs and report.html.
        metrics = write_evaluation(
            out_dir=run_dir, ev=ev, classes=classes, fit=True, history=history,
            extra=dict(best_epoch=best_epoch + 1, epochs_run=len(history), stopped_early=stopped_early),
        )
        best_ckpt = load_checkpoint(run_dir / "best.pt")
        best_ckpt["metrics"] = metrics
        best_ckpt["temperature"] = float(metrics["temperature"])
        save_checkpoint(best_ckpt, run_dir / "best.pt")
        atomic_write_json(run_dir / "run.json", {**run_info, "finished": True})  # --resume: nothing left to do
        return metrics

    # Every file of the tail is written atomically and best.pt last, so an interrupt here loses nothing:
    # --resume sees that run.json is not marked finished and runs this tail again.
    with _interrupt_raises():
        try:
            metrics = distributed.on_main(ctx, evaluation_files)
        except KeyboardInterrupt:
            raise distributed.shared(Interrupted(
                f"interrupted during the final evaluation; every epoch is saved. Finish it with: "
                f"rescli finetune --resume {run_dir}"
            ), ctx) from None
    return {"run_dir": str(run_dir), "metrics": metrics, "history": history, "classes": classes}


def benchmark_feature_cache(
    data_dir: str | os.PathLike,
    *,
    weights: str = "none",
    arch: str = "resnet18",
    img_size: int = 32,
    epochs: int = 3,
    batch_size: int = 32,
    workers: int | None = 0,
    precision: str = "auto",
    seed: int = 0,
    output_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Time ``--strategy head --augment none`` with and without cached backbone features on one folder.

    Returns per-run wall time, mean epoch time, one-off caching time and best validation accuracy, plus the
    speed-ups (per epoch and whole run). A plain function for benchmark scripts; nothing is printed.
    """
    import tempfile

    root = Path(output_root) if output_root is not None else Path(tempfile.mkdtemp(prefix="rescli-cache-bench-"))
    out: dict[str, Any] = {"data_dir": str(data_dir), "arch": arch, "img_size": img_size, "epochs": epochs, "batch_size": batch_size}
    for name, cache in (("cached", True), ("uncached", False)):
        s = TrainSettings(
            data_dir=str(data_dir), arch=arch, weights=weights, strategy="head", augment="none", epochs=epochs,
            batch_size=batch_size, img_size=img_size, workers=workers, precision=precision, seed=seed, cache_features=cache,
        )
        t0 = time.perf_counter()
        result = finetune(settings=s, output=root / name, show_progress=False)
        wall = time.perf_counter() - t0
        run_info = json.loads((root / name / "run.json").read_text())
        secs = [float(r["seconds"]) for r in result["history"]]
        out[name] = {
            "wall_seconds": round(wall, 2),
            "epoch_seconds": secs,
            "mean_epoch_seconds": round(sum(secs) / len(secs), 3),
            "cache_seconds": run_info.get("feature_cache", {}).get("seconds", 0.0),
            "val_accuracy": result["metrics"]["accuracy"],
            "run_dir": str(root / name),
        }
    out["speedup_per_epoch"] = round(out["uncached"]["mean_epoch_seconds"] / max(out["cached"]["mean_epoch_seconds"], 1e-3), 1)
    out["speedup_training"] = round(
        sum(out["uncached"]["epoch_seconds"]) / max(sum(out["cached"]["epoch_seconds"]) + out["cached"]["cache_seconds"], 1e-3), 2
    )
    return out


def _save(ckpt: dict[str, Any], path: Path) -> None:
    """save_checkpoint (atomic: temp file + rename), with a disk-full or permission error said plainly."""
    try:
        save_checkpoint(ckpt, path)
    except OSError as exc:
        raise RescliError(
            f"could not write {path}: {exc.strerror or exc}; the previous {path.name}, if any, is intact"
        ) from None


def report_scan(index: data.DatasetIndex, run_dir: Path | None) -> None:
    """Name every skipped file once on stderr, and list them in run_dir/skipped.txt; warn of what index.warnings holds.

    skipped.txt is a path list: names that are not UTF-8 keep their bytes (fileio), so each line names its file;
    a tab or line break inside a name is written as \\t, \\n or \\r so that a name cannot split its line.
    """
    from rescli.fileio import shown_name  # stderr shows undecodable bytes as \\xNN

    for message in index.warnings:
        console.warn(message)
    for rel, why in index.broken.items():
        console.warn(f"skipped broken image {shown_name(rel)}: {why}")
    if index.empty_classes:
        empty = ", ".join(shown_name(c) for c in sorted(set(index.empty_classes)))
        console.info(f"not a class (no usable images): {empty}")
    if index.ignored:
        shown = ", ".join(map(shown_name, index.ignored[:5]))
        more = f" (+{len(index.ignored) - 5} more)" if len(index.ignored) > 5 else ""
        console.info(f"ignored {len(index.ignored)} file(s) that are not images or not in a class folder: "
                     f"{shown}{more}")
    if run_dir is not None:
        def one_line(text: str) -> str:
            return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

        lines = [f"broken\t{one_line(rel)}\t{one_line(why)}" for rel, why in index.broken.items()]
        lines += [f"ignored\t{one_line(rel)}\t{one_line(index.ignored_reasons.get(rel, 'not an image'))}"
                  for rel in index.ignored]
        lines += [f"empty\t{one_line(rel)}\tno usable images" for rel in sorted(set(index.empty_classes))]
        atomic_write_text(run_dir / "skipped.txt", "".join(line + "\n" for line in lines))


def _run_finished(run_dir: Path) -> bool:
    """Whether the run's final evaluation completed (runs from before the marker: when metrics.json exists)."""
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    return bool(info["finished"]) if "finished" in info else (run_dir / "metrics.json").is_file()


@contextmanager
def _interrupt_raises() -> Iterator[None]:
    """SIGTERM, like Ctrl-C, raises KeyboardInterrupt inside the block (outside the training loop's StopFlag)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _data_record(index: data.DatasetIndex) -> dict[str, Any]:
    """The resolved data folder and the exact files (relative paths, labels) of both splits, plus a short content
    hash of every training image: evaluate scores the held-out images and counts trained-on ones elsewhere;
    --resume keeps the split file for file."""

    def part(split: str) -> dict[str, list]:
        samples = index.splits.get(split, [])
        return {"paths": [index.rel(p) for p, _ in samples], "labels": [int(y) for _, y in samples]}

    train_hashes = [index.infos[p].sha1[:16] for p, _ in index.splits["train"] if p in index.infos and index.infos[p].sha1]
    return {
        "root": str(Path(index.root).resolve()),
        "layout": index.layout,
        "splits": {"train": part("train"), "val": part("val")},
        "train_sha1": train_hashes,
    }


def _restore_split(index: data.DatasetIndex, state: dict[str, Any]) -> data.DatasetIndex:
    """A resumed run's index: the same classes (else one clear refusal), and the stored split file for file.

    Images added since the run started are left out (they would otherwise land in either split and mix
    validation images into training); images of the split that are gone or broken now are skipped.
    """
    stored = list(state["classes"])
    if index.classes != stored:
        new = sorted(set(index.classes) - set(stored))
        gone = sorted(set(stored) - set(index.classes))
        what = "; ".join(part for part in (f"new: {', '.join(new)}" if new else "", f"gone: {', '.join(gone)}" if gone else "")
                         if part) or "same names in another order"
        raise RescliError(
            f"--resume: the classes of {index.root} changed since the run started ({what}); a resumed run must keep "
            f"its classes. Restore them, or start a new run"
        )
    record = state.get("data")
    if not record:  # a last.pt from before stored splits: the split is drawn again from the seed, as it was then
        return index
    root = Path(record["root"])
    usable = {p for split in ("train", "val") for p, _ in index.splits.get(split, [])}
    kept: dict[str, list[tuple[str, int]]] = {}
    listed: set[str] = set()
    for split in ("train", "val"):
        entries = record["splits"][split]
        paths = [str(root / rel) for rel in entries["paths"]]
        listed.update(paths)
        kept[split] = [(p, int(y)) for p, y in zip(paths, entries["labels"]) if p in usable]
    missing = len(listed) - sum(len(v) for v in kept.values())
    added = len(usable - listed)
    if added:
        console.info(f"resume: {added} image(s) added to {root} since the run started are left out; the run keeps its split")
    if missing:
        console.warn(f"resume: {missing} image(s) of the run's split are gone or unreadable now; training goes on without them")
    index.splits = {**kept, **({"test": index.splits["test"]} if "test" in index.splits else {})}
    return index


def _load_resume(resume: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise UsageError(f"--resume {path}: holds no training state (resume from last.pt, not best.pt)")
    return path.parent, ckpt


@contextmanager
def _progress(description: str, total: int, *, enabled: bool) -> Iterator[Any]:
    """A per-epoch bar on stderr (only when stderr is a terminal; logs get one line per epoch instead)."""
    if not enabled or not console.err.is_terminal:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(), console=console.err, transient=True,
    ) as bar:
        task = bar.add_task(description, total=total, loss=float("nan"))
        yield lambda loss: bar.update(task, advance=1, loss=loss)
