"""`rescli finetune` and `rescli lr-find`: training a model, and finding the learning rate to train it with."""

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

import rescli.cli.console as console
import rescli.cli.tables as tables
from rescli.cli.before_torch import threads_for_load
from rescli.cli.entry import QuietExit
from rescli.cli.options import (
    DATA_DIR_HELP,
    Arch,
    Augment,
    DataDir,
    Depth,
    Device,
    ImgSize,
    LabelColumn,
    LabelSep,
    LabelSmoothing,
    MultiLabel,
    OutputFormat,
    PathColumn,
    Precision,
    Seed,
    Shortcut,
    Strategy,
    TableOrJson,
    TrainBatchSize,
    ValSplit,
    WeightDecay,
    Weights,
    Workers,
)
from rescli.core.errors import UsageError
from rescli.train.launch import is_main_process, launch, launched_by_torchrun, strip_launch_option

FINETUNE_EPILOG = """
Examples:

    rescli finetune ./images                         # ResNet-18, ImageNet weights, 5 epochs
    rescli finetune ./images --depth 50 --epochs 10 --batch-size 64
    rescli finetune sample_data --weights none --img-size 32 --epochs 3
    rescli finetune ./more --weights runs/run1/best.pt --strategy head
    rescli finetune ./images --lr auto               # LR range test first (lr_find.png in the run folder)
    rescli finetune ./images --augment strong --mixup 0.2 --cutmix 1.0 --epochs 20
    rescli finetune ./images --weights my_resnet18.pth --strategy full
    rescli finetune --resume runs/run3               # continue an interrupted run (Ctrl-C saves last.pt)
    rescli finetune --resume runs/run3 --epochs 10   # ... or train it longer
    rescli finetune ./images --gpus 4 --batch-size 256   # 4 GPUs (DDP via torchrun); 256 = the global batch
    torchrun --nproc-per-node 4 -m rescli finetune ./images --batch-size 256   # the same, started by hand
    rescli finetune labels.csv                       # a label table: path and label columns, one row per image
    rescli finetune labels.csv --multi-label         # several labels per row ("cat dog"): a sigmoid per label
    rescli finetune train.csv --multi-label --label-sep ';' --path-column image_id --label-column tags
"""

# Options of finetune alone.
FreezeEpochs = Annotated[int, typer.Option("--freeze-epochs", help="gradual: epochs with the backbone frozen.")]
Epochs = Annotated[Optional[int], typer.Option(
    "--epochs", help="Epochs to train [default: 5]; with --resume, the new total.")]
LearningRate = Annotated[str, typer.Option("--lr", help=(
    "Peak learning rate of the head (AdamW, warmup + cosine), or auto: run the LR range test (rescli lr-find) "
    "first."))]
Mixup = Annotated[float, typer.Option("--mixup", help="Mixup alpha (e.g. 0.2); 0 = off.")]
CutMix = Annotated[float, typer.Option(
    "--cutmix", help="CutMix alpha (e.g. 1.0); 0 = off. With --mixup too, each batch uses one of them.")]
CacheFeatures = Annotated[bool, typer.Option("--cache-features/--no-cache-features", help=(
    "--strategy head with --augment none: compute backbone features once and train the head on them."))]
CacheImages = Annotated[bool, typer.Option("--cache-images/--no-cache-images", help=(
    "Keep decoded validation images (and training images with --augment none) in RAM after the first epoch, "
    "within a quarter of free memory."))]
Patience = Annotated[Optional[int], typer.Option(
    "--patience", help="Stop after this many epochs without a better validation accuracy.")]
Balance = Annotated[bool, typer.Option("--balance", help=(
    "Weight the loss by inverse class frequency (for imbalanced folders); multi-label, each label's positives by "
    "its negatives / positives."))]
Strict = Annotated[bool, typer.Option("--strict", help="Stop on any broken image instead of skipping it.")]
CompileTraining = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the model for training (slower start, faster steps; single process).")]
RunFolder = Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder [default: a new runs/runN].")]
Resume = Annotated[Optional[Path], typer.Option("--resume", help="Continue a run: its folder or its last.pt.")]
Gpus = Annotated[Optional[int], typer.Option("--gpus", "--nproc", help=(
    "Train with N processes on this machine (one per GPU; gloo processes on a CPU-only machine): re-runs this "
    "command under torchrun. --batch-size stays the global batch. Several machines: torchrun itself "
    "(docs/distributed.md)."))]
SyncBatchNorm = Annotated[bool, typer.Option("--sync-bn", help=(
    "Distributed runs on GPUs: BatchNorm statistics over the whole global batch (SyncBatchNorm); not available on "
    "CPU."))]

#: What a resumed run still takes from the command line; anything else given is named in a warning.
RESUME_KEEPS = ("resume", "epochs", "fmt", "gpus")


def finetune(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Argument(help=DATA_DIR_HELP)] = None,
    depth: Depth = None,
    arch: Arch = None,
    shortcut: Shortcut = None,
    weights: Weights = "imagenet",
    strategy: Strategy = "auto",
    freeze_epochs: FreezeEpochs = 1,
    epochs: Epochs = None,
    batch_size: TrainBatchSize = None,
    img_size: ImgSize = 224,
    lr: LearningRate = "2e-3",
    weight_decay: WeightDecay = 0.05,
    label_smoothing: LabelSmoothing = 0.1,
    augment: Augment = "none",
    mixup: Mixup = 0.0,
    cutmix: CutMix = 0.0,
    cache_features: CacheFeatures = True,
    cache_images: CacheImages = True,
    patience: Patience = None,
    balance: Balance = False,
    val_split: ValSplit = 0.2,
    seed: Seed = 0,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    strict: Strict = False,
    compile_: CompileTraining = False,
    output: RunFolder = None,
    resume: Resume = None,
    gpus: Gpus = None,
    sync_bn: SyncBatchNorm = False,
    multi_label: MultiLabel = False,
    label_sep: LabelSep = " ",
    path_column: PathColumn = None,
    label_column: LabelColumn = None,
    fmt: OutputFormat = TableOrJson.table,
) -> None:
    """Fine-tune a ResNet on DATA_DIR and write a run folder (best.pt, last.pt, history.csv, metrics.json)."""
    if gpus is None:  # a launcher shares the cores between its processes itself
        threads_for_load()
    else:
        _launch_when_asked(gpus, batch_size=batch_size, resumed=resume is not None)
    from rescli.train.loop import finetune as run_finetune

    if resume is not None:
        _warn_of_ignored_options(ctx)
        result = run_finetune(resume=resume, epochs=epochs)
    elif data_dir is None:
        raise UsageError("missing DATA_DIR (or pass --resume RUN_DIR)")
    else:
        from rescli.train.settings import TrainSettings

        chosen_arch, arch_kwargs = _model_choice(depth=depth, arch=arch, shortcut=shortcut)
        settings = TrainSettings(
            data_dir=str(data_dir), arch=chosen_arch, arch_kwargs=arch_kwargs, weights=weights, strategy=strategy,
            freeze_epochs=freeze_epochs, epochs=epochs or 5, batch_size=batch_size, img_size=img_size,
            lr=lr,  # a number, or "auto", as text: TrainSettings checks it
            weight_decay=weight_decay, label_smoothing=label_smoothing, augment=augment, patience=patience,
            balance=balance, val_split=val_split, seed=seed, workers=workers, device=device, precision=precision,
            strict=strict, compile=compile_, mixup=mixup, cutmix=cutmix, cache_features=cache_features,
            cache_images=cache_images, sync_bn=sync_bn, multi_label=multi_label, label_sep=label_sep,
            path_column=path_column, label_column=label_column,
        )
        result = run_finetune(settings=settings, output=output)
    if is_main_process():  # torchrun's other processes: rank 0 prints the one summary
        _show_run(result, fmt)


def _launch_when_asked(gpus: int, *, batch_size: int | None, resumed: bool) -> None:
    """--gpus N (or a process torchrun started): run the command again under torchrun, and exit with its status."""
    if gpus > 1 or launched_by_torchrun():
        if not resumed and batch_size is not None:  # an automatic batch is checked once the data chose it
            from rescli.train.distributed import check_batch_size

            check_batch_size(batch_size, gpus)
        raise QuietExit(launch(gpus, strip_launch_option(sys.argv[1:])))  # the processes said why
    if gpus < 1:
        raise UsageError("--gpus/--nproc must be at least 1")


def _model_choice(*, depth: Optional[int], arch: Optional[str], shortcut: Optional[str]) -> tuple[str, dict[str, Any]]:
    """The architecture and its options, checked: a usage error (exit 2) before any work."""
    from rescli.models.registry import arch_name, check_arch_kwargs

    chosen = arch_name(depth=depth, arch=arch)
    return chosen, check_arch_kwargs(chosen, {"shortcut": shortcut} if shortcut else {})


def _warn_of_ignored_options(ctx: typer.Context) -> None:
    ignored = _given_options(ctx, keep=RESUME_KEEPS)
    if ignored:
        console.warn(
            f"--resume continues the run with its own settings; ignoring {', '.join(ignored)} "
            "(only --epochs changes a resumed run)"
        )


def _given_options(ctx: typer.Context, *, keep: tuple[str, ...]) -> list[str]:
    """The options and arguments the user typed (not defaults), as spelled on the command line, except ``keep``."""
    given = []
    for param in ctx.command.params:
        if param.name in keep or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)  # Typer vendors click: its ParameterSource, told by name
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            is_option = bool(param.opts) and param.opts[0].startswith("-")
            given.append(param.opts[0] if is_option else (param.metavar or param.name.upper()))  # DATA_DIR
    return given


#: The validation figures finetune reports (summary key: metrics.json key), single-label and multi-label.
SUMMARY_METRICS = {
    "single-label": {"val_accuracy": "accuracy", "val_balanced_accuracy": "balanced_accuracy",
                     "val_macro_f1": "macro_f1"},
    "multi-label": {"val_map": "mean_average_precision", "val_micro_f1": "micro_f1", "val_macro_f1": "macro_f1",
                    "val_subset_accuracy": "subset_accuracy", "val_hamming_loss": "hamming_loss"},
}


def _show_run(result: dict[str, Any], fmt: TableOrJson) -> None:
    m = result["metrics"]
    best = str(Path(result["run_dir"]) / "best.pt")
    task = m.get("task", "single-label")
    summary = {
        "run_dir": result["run_dir"],
        "best_checkpoint": best,
        "task": task,
        "best_epoch": m.get("best_epoch"),
        "epochs_run": m.get("epochs_run"),
        **{key: m.get(source) for key, source in SUMMARY_METRICS[task].items()},
        "temperature": m.get("temperature"),
        "val_ece": m.get("ece"),
        "val_ece_before_temperature": m.get("ece_before_temperature"),
        "report": str(Path(result["run_dir"]) / "report.html"),
    }
    if fmt == TableOrJson.json:
        console.print_json(summary)
        return
    console.out.print(tables.run_summary_table(summary))
    if m.get("per_class"):
        for table in tables.class_tables(m):
            console.out.print(table)
    console.info(f"next: rescli evaluate {best} DATA_DIR  ·  rescli predict IMAGES --model {best}")


LR_FIND_EPILOG = """
Examples:

    rescli lr-find ./images                          # prints the suggested LR, writes lr_find.png
    rescli lr-find ./images --weights none --img-size 32 --output curve.png
    LR=$(rescli lr-find ./images --format json | jq .suggested_lr); rescli finetune ./images --lr $LR
    rescli finetune ./images --lr auto               # the same test, run inside finetune
    rescli lr-find labels.csv --multi-label          # a multi-label table: the test with its loss

Give it the --weights, --strategy, --batch-size and --augment you will train with. With pretrained
weights the backbone is frozen during the test (only the head trains, as in the first epoch of
--strategy gradual), and so it is with --strategy head; from scratch, or with --strategy full, the
whole network trains. The test uses the training part of the split only. The suggestion is
fastai's "valley" rule; the plot also marks it. stdout holds the suggested rate alone, or with
--format json the whole result.
"""


def lr_find(
    data_dir: DataDir,
    depth: Depth = None,
    arch: Arch = None,
    shortcut: Shortcut = None,
    weights: Weights = "imagenet",
    strategy: Strategy = "auto",
    batch_size: TrainBatchSize = None,
    img_size: ImgSize = 224,
    weight_decay: WeightDecay = 0.05,
    label_smoothing: LabelSmoothing = 0.1,
    augment: Augment = "none",
    start_lr: Annotated[float, typer.Option("--start-lr", help="First learning rate of the sweep.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(
        "--end-lr", help="Last learning rate (the sweep stops early when the loss blows up).")] = 10.0,
    steps: Annotated[int, typer.Option(
        "--steps", help="Steps of the sweep (batches; the data repeats if it is smaller).")] = 100,
    val_split: ValSplit = 0.2,
    seed: Seed = 0,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Where to save the loss-vs-LR plot.")] = Path("lr_find.png"),
    multi_label: MultiLabel = False,
    label_sep: LabelSep = " ",
    path_column: PathColumn = None,
    label_column: LabelColumn = None,
    fmt: OutputFormat = TableOrJson.table,
) -> None:
    """Learning-rate range test: train briefly with a rising LR, print the suggested rate, save the curve."""
    threads_for_load()
    from rescli.train.lr_find import find_lr
    from rescli.train.settings import TrainSettings

    chosen_arch, arch_kwargs = _model_choice(depth=depth, arch=arch, shortcut=shortcut)
    settings = TrainSettings(
        data_dir=str(data_dir), arch=chosen_arch, arch_kwargs=arch_kwargs, weights=weights, strategy=strategy,
        batch_size=batch_size, img_size=img_size, weight_decay=weight_decay, label_smoothing=label_smoothing,
        augment=augment, val_split=val_split, seed=seed, workers=workers, device=device, precision=precision,
        multi_label=multi_label, label_sep=label_sep, path_column=path_column, label_column=label_column,
    )
    result = find_lr(settings, output=output, start_lr=start_lr, end_lr=end_lr, num_steps=steps)
    if fmt == TableOrJson.json:
        console.print_json(result.as_dict())
        return
    console.out.print(f"{result.suggestion:.3g}", markup=False, highlight=False)
    console.info(
        f"suggested lr {result.suggestion:.3g} (valley); min/10 {result.minimum_lr:.3g}; "
        f"steepest {result.steepest_lr:.3g}; {len(result.lrs)} steps; plot: {result.extra.get('plot')}  ·  "
        f"next: rescli finetune {data_dir} --lr {result.suggestion:.3g}"
    )
