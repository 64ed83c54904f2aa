"""What defines a run (TrainSettings), every check of it, and the strategy and runtime it resolves to."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rescli.core.errors import RescliError, UsageError
from rescli.core.runtime import Runtime, select_runtime
from rescli.data.tables import TableOptions
from rescli.models.checkpoint import MAX_IMG_SIZE
from rescli.models.registry import arch_spec

STRATEGIES = ("auto", "head", "full", "gradual")
LR_AUTO = "auto"  # --lr auto: the learning-rate range test picks the rate before training


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
    batch_size: int | None = None  # None: auto_batch_size, chosen once the training split is known
    img_size: int = 224
    lr: float | str = 2e-3  # a number, or "auto"; a string from the command line is parsed by validate_settings
    weight_decay: float = 0.05
    backbone_lr_ratio: float = 0.01
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    # Short runs underfit: augmentation only slows them (docs/training.md); light/strong for long runs.
    augment: str = "none"
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
    # Keep decoded validation images (and training ones with --augment none) in RAM after epoch 1.
    cache_images: bool = True
    sync_bn: bool = False  # distributed runs on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    # A label table (data_dir names a .csv, .tsv, .jsonl or .parquet file): how to read it.
    multi_label: bool = False  # several labels per image: a sigmoid per class, binary cross-entropy
    label_sep: str = " "  # what separates an image's labels in the label column (multi-label)
    path_column: str | None = None  # None: found by name (path, file, filename, image, image_path, fname)
    label_column: str | None = None  # None: found by name (label, labels, tags, class, category, target)


def settings_from_dict(d: dict[str, Any]) -> TrainSettings:
    """Settings stored in a checkpoint -> TrainSettings; keys added for information (or by newer versions) are
    ignored."""
    known = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{k: v for k, v in d.items() if k in known})


def table_options(settings: TrainSettings) -> TableOptions:
    """How the run reads a label table (its data_dir, when that is one)."""
    return TableOptions(path_column=settings.path_column, label_column=settings.label_column,
                        multi_label=settings.multi_label, label_sep=settings.label_sep)


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


SMALL_IMAGES_FP32 = 40  # below this size, fp32 NCHW trains faster than bf16 channels_last on CPU


def training_runtime(settings: TrainSettings, *, device: str | None = None) -> Runtime:
    """Device and precision for training. --precision auto on a CPU picks bf16 + channels_last (AMX), except
    for small images, where fp32 NCHW is faster (docs/performance.md): the tiny convolutions cannot use AMX.
    ``device`` overrides settings.device (a distributed run's process uses the GPU of its local rank)."""
    runtime = select_runtime(device=settings.device if device is None else device, precision=settings.precision)
    auto_precision = (settings.precision or "auto").lower() == "auto"
    if (
        runtime.device.type == "cpu" and auto_precision and runtime.precision == "bf16"
        and settings.img_size < SMALL_IMAGES_FP32
        # CIFAR-style nets keep full resolution in their first stage, where AMX wins even on small images,
        # so the rule is for torchvision's 4x-downsampling stem only.
        and arch_spec(settings.arch).family == "torchvision"
    ):
        return Runtime(device=runtime.device, precision="fp32", channels_last=False)
    return runtime


#: The default batch, and the larger one for many small images (see auto_batch_size).
BATCH_SIZE, SMALL_IMAGES_BATCH_SIZE = 32, 64
#: Below this size and from this many training images on, the larger batch is the default.
SMALL_IMAGES_PX, MANY_IMAGES = 64, 2000


def auto_batch_size(*, img_size: int, train_images: int) -> int:
    """The batch a run takes when --batch-size is not given: 32, or 64 for many small images.

    At small sizes a step's fixed costs (kernel launches on tiny tensors, the optimiser, gradient clipping) weigh
    as much as its images, so twice the images a step cost far less than twice the time (docs/performance.md,
    "Batch size at small image sizes"); a small folder keeps 32, so that a short run still takes enough steps.
    """
    if img_size < SMALL_IMAGES_PX and train_images >= MANY_IMAGES:
        return SMALL_IMAGES_BATCH_SIZE
    return BATCH_SIZE


def check_run_settings(settings: TrainSettings) -> None:
    """Usage errors (exit 2) for values no fine-tuning run can use; checked before a run folder is made."""
    if settings.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if settings.batch_size is not None and settings.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not 8 <= settings.img_size <= MAX_IMG_SIZE:
        raise UsageError(f"--img-size must be from 8 to {MAX_IMG_SIZE} pixels")
    validate_settings(settings)


def validate_settings(settings: TrainSettings) -> None:
    """Usage errors (exit 2) for values no run can use; checked before any data is read. Parses --lr: afterwards
    ``settings.lr`` is a float or LR_AUTO."""
    lr = settings.lr = _parsed_lr(settings.lr)
    if not isinstance(lr, str) and not (math.isfinite(lr) and lr > 0):  # the only string left is LR_AUTO
        raise UsageError(f"--lr {lr}: must be a positive number (or auto)")
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
    if not settings.label_sep:
        raise UsageError("--label-sep: give the text that separates an image's labels (a space by default)")


def _parsed_lr(lr: float | str) -> float | str:
    if not isinstance(lr, str):
        return lr
    if lr.strip().lower() == LR_AUTO:
        return LR_AUTO
    try:
        return float(lr)
    except ValueError:
        raise UsageError(f"--lr {lr!r}: expected a number such as 2e-3, or auto") from None


def peak_lr(settings: TrainSettings) -> float:
    """--lr as the number training uses: set by validate_settings, or by the range test of --lr auto."""
    if isinstance(settings.lr, str):
        raise RescliError(f"--lr {settings.lr!r} was not turned into a number before training (a bug)")
    return settings.lr


def batch_size_of(settings: TrainSettings) -> int:
    """--batch-size as the number training uses: given, or chosen by auto_batch_size once the data is scanned."""
    if settings.batch_size is None:
        raise RescliError("the batch size was not chosen before training (a bug)")
    return settings.batch_size


def settings_record(
    settings: TrainSettings, *, strategy: str, frozen_epochs: int, train_images: int, val_images: int
) -> dict[str, Any]:
    """The settings as every checkpoint and run.json store them, with what they resolved to in this run."""
    record = asdict(settings)
    record["strategy_resolved"] = strategy
    record["frozen_epochs"] = frozen_epochs
    record["train_images"], record["val_images"] = train_images, val_images
    return record
