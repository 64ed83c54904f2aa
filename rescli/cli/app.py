"""The command line: parse options, call one library function, print results, exit with meaning.

stdout carries results only (a table for people, or json/jsonl/csv/tsv for programs);
progress, logs and warnings go to stderr. Exit status: 0 ok, 1 failure (or some inputs
failed), 2 usage error, 130 interrupted, 141 output pipe closed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

import rescli.cli.console as console
from rescli import __version__
from rescli.core import events
from rescli.core.cpus import let_idle_threads_sleep
from rescli.core.errors import RescliError
from rescli.core.fileio import json_escapes, shown_name
from rescli.train.launch import is_main_process, launch, launched_by_torchrun, strip_launch_option

app = typer.Typer(
    name="rescli",
    help="Fine-tune ImageNet ResNets on a folder of images; evaluate, predict and export from the command line.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    epilog="""
Examples:

    rescli finetune ./images                          # train; writes runs/run1/best.pt
    rescli predict ./new_photos --format jsonl | jq -r '.label'
    rescli export runs/run1 --format onnx -o model.onnx
    rescli info model.onnx
    rescli --install-completion                       # tab completion in your shell

Run `rescli COMMAND --help` for each command's options and examples.
""",
)


def _threads_for_load() -> None:
    """Before torch loads: fewer threads, waiting passively, when other programs keep the CPUs busy (rescli.cpus)."""
    from rescli.core.cpus import adapt_to_load

    plan = adapt_to_load()
    if plan is not None and plan.threads is not None:
        console.info(plan.describe())


class TableOrJson(str, Enum):
    table = "table"
    json = "json"


class PredictFormat(str, Enum):
    table = "table"
    jsonl = "jsonl"
    json = "json"
    csv = "csv"
    tsv = "tsv"


class JpegDecoder(str, Enum):
    auto = "auto"
    pillow = "pillow"
    torchvision = "torchvision"


class ExportFormat(str, Enum):
    torchscript = "torchscript"
    onnx = "onnx"


def _version(value: bool) -> None:
    if value:
        console.out.print(f"rescli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """rescli: transfer learning for image folders."""


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


@app.command(epilog="""
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
""")
def finetune(
    ctx: typer.Context,
    data_dir: Optional[Path] = typer.Argument(None, help="Folder with one sub-folder per class, or train/ + val/ (+ test/) split folders."),
    depth: Optional[int] = typer.Option(None, "--depth", help="torchvision ResNet depth: 18, 34, 50, 101 or 152 [default: 18]."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture by name (overrides --depth), e.g. resnext50_32x4d, resnet20, plain56."),
    shortcut: Optional[str] = typer.Option(None, "--shortcut", help="CIFAR-style nets only: A (identity+zero-pad), B (projection when shape changes), C (projection everywhere)."),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet, none, or PATH to a torchvision/timm state_dict or a rescli checkpoint."),
    strategy: str = typer.Option("auto", "--strategy", help="head (backbone frozen), full, gradual (head first, then all with lower LRs for early layers); auto = gradual when pretrained, else full."),
    freeze_epochs: int = typer.Option(1, "--freeze-epochs", help="gradual: epochs with the backbone frozen."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs to train [default: 5]; with --resume, the new total."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per step."),
    img_size: int = typer.Option(224, "--img-size", help="Square input size in pixels."),
    lr: str = typer.Option("2e-3", "--lr", help="Peak learning rate of the head (AdamW, warmup + cosine), or auto: run the LR range test (rescli lr-find) first."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW weight decay (not applied to norms and biases)."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="Label smoothing of the training loss."),
    augment: str = typer.Option("none", "--augment", help="none | light (crops, flips) | strong (+ TrivialAugment). Short runs learn faster without; use light/strong for long runs (20+ epochs) or when validation loss rises while training loss falls."),
    mixup: float = typer.Option(0.0, "--mixup", help="Mixup alpha (e.g. 0.2); 0 = off."),
    cutmix: float = typer.Option(0.0, "--cutmix", help="CutMix alpha (e.g. 1.0); 0 = off. With --mixup too, each batch uses one of them."),
    cache_features: bool = typer.Option(True, "--cache-features/--no-cache-features", help="--strategy head with --augment none: compute backbone features once and train the head on them."),
    cache_images: bool = typer.Option(True, "--cache-images/--no-cache-images", help="Keep decoded validation images (and training images with --augment none) in RAM after the first epoch, within a quarter of free memory."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many epochs without a better validation accuracy."),
    balance: bool = typer.Option(False, "--balance", help="Weight the loss by inverse class frequency (for imbalanced folders)."),
    val_split: float = typer.Option(0.2, "--val-split", help="Fraction held out for validation when DATA_DIR has no val/ folder."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, the data order and initialisation."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode workers [default: depends on the machine]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: bf16 on CPUs with AMX/AVX512-BF16 and GPUs that have it, fp16 on older GPUs)."),
    strict: bool = typer.Option(False, "--strict", help="Stop on any broken image instead of skipping it."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model for training (slower start, faster steps; single process)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder [default: a new runs/runN]."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run: its folder or its last.pt."),
    gpus: Optional[int] = typer.Option(None, "--gpus", "--nproc", help="Train with N processes on this machine (one per GPU; gloo processes on a CPU-only machine): re-runs this command under torchrun. --batch-size stays the global batch. Several machines: torchrun itself (docs/distributed.md)."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Distributed runs on GPUs: BatchNorm statistics over the whole global batch (SyncBatchNorm); not available on CPU."),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format", help="Summary on stdout as a table or JSON."),
) -> None:
    """Fine-tune a ResNet on DATA_DIR and write a run folder (best.pt, last.pt, history.csv, metrics.json)."""
    if gpus is None:  # a launcher shares the cores between its processes itself
        _threads_for_load()
    from rescli.models.registry import arch_name, check_arch_kwargs
    from rescli.train.distributed import check_batch_size
    from rescli.train.loop import finetune as run_finetune
    from rescli.train.settings import TrainSettings

    if gpus is not None and (gpus > 1 or launched_by_torchrun()):
        if resume is None:
            check_batch_size(batch_size, gpus)
        raise QuietExit(launch(gpus, strip_launch_option(sys.argv[1:])))  # the processes said why
    if gpus is not None and gpus < 1:
        raise RescliError("--gpus/--nproc must be at least 1", exit_code=2)
    if resume is None:
        if data_dir is None:
            raise RescliError("missing DATA_DIR (or pass --resume RUN_DIR)", exit_code=2)
        chosen_arch = arch_name(depth=depth, arch=arch)
        arch_kwargs = check_arch_kwargs(chosen_arch, {"shortcut": shortcut} if shortcut else {})  # exit 2 before any work
        settings = TrainSettings(
            data_dir=str(data_dir), arch=chosen_arch, arch_kwargs=arch_kwargs, weights=weights,
            strategy=strategy, freeze_epochs=freeze_epochs, epochs=epochs or 5, batch_size=batch_size, img_size=img_size,
            lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, augment=augment, patience=patience,
            balance=balance, val_split=val_split, seed=seed, workers=workers, device=device, precision=precision, strict=strict, compile=compile_,
            mixup=mixup, cutmix=cutmix, cache_features=cache_features, cache_images=cache_images, sync_bn=sync_bn,
        )
        result = run_finetune(settings=settings, output=output)
    else:
        ignored = _given_options(ctx, keep=("resume", "epochs", "fmt", "gpus"))
        if ignored:
            console.warn(
                f"--resume continues the run with its own settings; ignoring {', '.join(ignored)} "
                "(only --epochs changes a resumed run)"
            )
        result = run_finetune(resume=resume, epochs=epochs)
    if not is_main_process():  # torchrun's other processes: rank 0 prints the one summary
        return
    m = result["metrics"]
    summary = {
        "run_dir": result["run_dir"],
        "best_checkpoint": str(Path(result["run_dir"]) / "best.pt"),
        "best_epoch": m.get("best_epoch"),
        "epochs_run": m.get("epochs_run"),
        "val_accuracy": m.get("accuracy"),
        "val_balanced_accuracy": m.get("balanced_accuracy"),
        "val_macro_f1": m.get("macro_f1"),
        "temperature": m.get("temperature"),
        "val_ece": m.get("ece"),
        "val_ece_before_temperature": m.get("ece_before_temperature"),
        "report": str(Path(result["run_dir"]) / "report.html"),
    }
    if fmt == TableOrJson.json:
        _print_json(summary)
        return
    from rich.table import Table

    table = Table(title="finetune", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths wrap instead of ending in "…": they are meant to be copied
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.out.print(table)
    if m.get("per_class"):
        _print_class_tables(m)
    console.info(f"next: rescli evaluate {summary['best_checkpoint']} DATA_DIR  ·  rescli predict IMAGES --model {summary['best_checkpoint']}")


def _given_options(ctx: typer.Context, *, keep: tuple[str, ...]) -> list[str]:
    """The options and arguments the user typed (not defaults), as spelled on the command line, except ``keep``."""
    given = []
    for param in ctx.command.params:
        if param.name in keep or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)  # Typer vendors click: its ParameterSource, told by name
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.append(param.opts[0] if param.opts and param.opts[0].startswith("-") else param.human_readable_name)
    return given


@app.command("lr-find", epilog="""
Examples:

    rescli lr-find ./images                          # prints the suggested LR, writes lr_find.png
    rescli lr-find ./images --weights none --img-size 32 --output curve.png
    LR=$(rescli lr-find ./images --format json | jq .suggested_lr); rescli finetune ./images --lr $LR
    rescli finetune ./images --lr auto               # the same test, run inside finetune

With pretrained weights the backbone is frozen during the test (only the head trains, as in
the first epoch of --strategy gradual); from scratch the whole network trains. The suggestion
is fastai's "valley" rule; the plot also marks it.
""")
def lr_find(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class, or train/ + val/ split folders."),
    depth: Optional[int] = typer.Option(None, "--depth", help="torchvision ResNet depth [default: 18]."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture by name (overrides --depth)."),
    shortcut: Optional[str] = typer.Option(None, "--shortcut", help="CIFAR-style nets only: A, B or C."),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet, none, or PATH, as for finetune."),
    strategy: str = typer.Option("auto", "--strategy", help="As for finetune: head/gradual test the head with the backbone frozen; full tests everything."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per step (use finetune's)."),
    img_size: int = typer.Option(224, "--img-size", help="Square input size in pixels."),
    weight_decay: float = typer.Option(0.05, "--weight-decay"),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing"),
    augment: str = typer.Option("none", "--augment", help="none | light | strong (use finetune's)."),
    start_lr: float = typer.Option(1e-7, "--start-lr", help="First learning rate of the sweep."),
    end_lr: float = typer.Option(10.0, "--end-lr", help="Last learning rate (the sweep stops early when the loss blows up)."),
    steps: int = typer.Option(100, "--steps", help="Steps of the sweep (batches; the data repeats if it is smaller)."),
    val_split: float = typer.Option(0.2, "--val-split", help="As for finetune: the test uses the training part only."),
    seed: int = typer.Option(0, "--seed"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode workers [default: depends on the machine]."),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision"),
    output: Path = typer.Option(Path("lr_find.png"), "--output", "-o", help="Where to save the loss-vs-LR plot."),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format", help="table (the suggested LR alone) or json."),
) -> None:
    """Learning-rate range test: train briefly with a rising LR, print the suggested rate, save the curve."""
    _threads_for_load()
    from rescli.models.registry import arch_name
    from rescli.train.lr_find import find_lr
    from rescli.train.settings import TrainSettings

    settings = TrainSettings(
        data_dir=str(data_dir), arch=arch_name(depth=depth, arch=arch),
        arch_kwargs={"shortcut": shortcut.upper()} if shortcut else {}, weights=weights, strategy=strategy,
        batch_size=batch_size, img_size=img_size, weight_decay=weight_decay, label_smoothing=label_smoothing,
        augment=augment, val_split=val_split, seed=seed, workers=workers, device=device, precision=precision,
    )
    result = find_lr(settings, output=output, start_lr=start_lr, end_lr=end_lr, num_steps=steps)
    if fmt == TableOrJson.json:
        _print_json(result.as_dict())
        return
    console.out.print(f"{result.suggestion:.3g}", markup=False, highlight=False)
    console.info(
        f"suggested lr {result.suggestion:.3g} (valley); min/10 {result.minimum_lr:.3g}; steepest {result.steepest_lr:.3g}; "
        f"{len(result.lrs)} steps; plot: {result.extra.get('plot')}  ·  next: rescli finetune {data_dir} --lr {result.suggestion:.3g}"
    )


@app.command(epilog="""
Examples:

    rescli dataset ./images                   # what finetune ./images would use
    rescli dataset ./images --format json | jq .broken
    rescli dataset ./images --format json | jq '.duplicates[] | select(.leak)'
    rescli dataset ./images --val-split 0.3   # as finetune --val-split 0.3
""")
def dataset(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class, or train/ + val/ (+ test/) split folders."),
    val_split: float = typer.Option(0.2, "--val-split", help="As for finetune: fraction held out when DATA_DIR has no val/ folder."),
    seed: int = typer.Option(0, "--seed", help="As for finetune: seed of that split."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Threads that check images [default: one per core]."),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format", help="table for people, json for programs."),
) -> None:
    """Show what DATA_DIR holds, exactly as finetune sees it: classes, counts per split, broken and ignored files,
    image sizes, class imbalance, and identical files across splits (leakage) or classes (label conflicts)."""
    from rescli.data.report import describe_dataset

    show = console.err.is_terminal

    def progress(done: int, total: int) -> None:
        if show and (done == total or done % 50 == 0):
            console.err.print(f"checked {done}/{total} images", end="\r" if done < total else "\n", markup=False)

    report = describe_dataset(data_dir, val_split=val_split, seed=seed, workers=workers, progress=progress)
    if fmt == TableOrJson.json:
        _print_json(report)
        return
    for table in tables(report):
        console.out.print(table)


@app.command(epilog="""
Examples:

    rescli evaluate runs/run1/best.pt ./images/test   # files go to runs/run1/eval-test/
    rescli evaluate runs/run1/best.pt ./images --split val --format json | jq .macro_f1
    rescli evaluate model.onnx ./images/test --output reports/onnx-test
    rescli evaluate runs/run1/best.pt ./images/test --no-files --format json > metrics.json

Writes metrics.json, predictions.csv, confusion_matrix.png, top_losses.png, reliability.png and
report.html into the output folder (never into DATA_DIR). Scores use the temperature stored in
the model (fitted by finetune on its validation split) unless --raw-scores.
""")
def evaluate(
    model: Path = typer.Argument(..., help=(
        "A rescli checkpoint (.pt) or export (.ts, .onnx), a run folder, or 'latest' (newest runs/*/best.pt). "
        "A checkpoint is read as data only; a .ts (TorchScript) file is a program that runs when opened: use only "
        "your own.")),
    data_dir: Path = typer.Argument(..., help="Class folders, or a split root (then --split)."),
    split: Optional[str] = typer.Option(None, "--split", help="train, val, test or all. On the folder the model was trained on: its held-out images by default (test if it had one, else val). On a split root: test if present, else val. Elsewhere: every image."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for the evaluation files [default: MODEL's folder/eval-DATA_DIR name[-split]]."),
    no_files: bool = typer.Option(False, "--no-files", help="Only print the metrics; write no files."),
    raw_scores: bool = typer.Option(False, "--raw-scores", help="Softmax of raw logits (skip the stored temperature calibration)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    workers: Optional[int] = typer.Option(None, "--workers"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model first (~10-15 s, ~2 s once cached): ~1.5x faster inference on a CPU, for large folders. Checkpoints only."),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format", help="table for people, json for programs."),
) -> None:
    """Score MODEL on labelled images: accuracy, per-class P/R/F1, confusion matrix, mistakes, calibration (ECE)."""
    _threads_for_load()
    from rescli.evaluation.folder import evaluate_folder
    from rescli.inference.lookup import resolve_model_path

    model, _ = resolve_model_path(model)
    metrics, ev, out_dir = evaluate_folder(
        model=model, data_dir=data_dir, split=split, output=output, raw_scores=raw_scores, write_files=not no_files,
        batch_size=batch_size, workers=workers, device=device, precision=precision, compile=compile,
    )
    evaluated = metrics["evaluated"]
    if evaluated.get("note"):
        console.info(evaluated["note"])
    if evaluated.get("seen_in_training"):
        console.warn(
            f"{evaluated['seen_in_training']} of the {metrics['n'] + len(metrics['skipped'])} images were used to train "
            "this model (the same file, or a copy of one): these metrics are not a held-out estimate"
        )
    for item in metrics["skipped"]:
        console.warn(f"skipped {item['error']}")
    if out_dir is not None:
        console.info(f"wrote metrics.json, predictions.csv, figures and report.html to {out_dir}")
    if fmt == TableOrJson.json:
        _print_json(metrics)
        return
    _print_metrics_table(metrics)


def _print_metrics_table(m: dict[str, Any]) -> None:
    from rich.table import Table

    head = Table(title=f"{m['n']} images", show_header=False)
    for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1", "roc_auc_ovr", "loss",
                "log_loss", "ece", "ece_before_temperature", "temperature"):
        if m.get(key) is not None:
            head.add_row(key, f"{m[key]:.4f}")
    for k, v in (m.get("top_k_accuracy") or {}).items():
        if k != "1":
            head.add_row(f"top{k}_accuracy", f"{v:.4f}")
    console.out.print(head)
    _print_class_tables(m)


def _print_class_tables(m: dict[str, Any]) -> None:
    """Per-class P/R/F1, the confusion matrix (up to 20 classes) and the most-confused pairs."""
    from rich.table import Table

    per = Table(title="per class")
    for col in ("class", "precision", "recall", "f1", "support"):
        per.add_column(col, justify="left" if col == "class" else "right")
    for name, row in m["per_class"].items():
        per.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    console.out.print(per)
    labels, cm = m["labels"], m["confusion_matrix"]
    if len(labels) <= 20:
        conf = Table(title="confusion matrix (rows: true, columns: predicted)")
        conf.add_column("")
        for name in labels:
            conf.add_column(name, justify="right")
        for name, row in zip(labels, cm):
            conf.add_row(name, *map(str, row))
        console.out.print(conf)
    if m.get("most_confused"):
        pairs = Table(title="most confused (true -> predicted)")
        for col in ("true", "predicted", "count"):
            pairs.add_column(col, justify="right" if col == "count" else "left")
        for p in m["most_confused"]:
            pairs.add_row(p["true"], p["predicted"], str(p["count"]))
        console.out.print(pairs)


@app.command(epilog="""
Examples:

    rescli report runs/run1                     # writes runs/run1/report.html
    rescli report runs/run1/eval-test           # a folder from evaluate
    rescli report runs/run1 -o pr-1234.html     # to attach to a PR

The file is self-contained (figures embedded, no scripts, no network): open it in any browser.
finetune and evaluate already write one; run this again after editing or copying a run folder.
""")
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (finetune) or evaluation folder (evaluate) with metrics.json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file to write [default: RUN_DIR/report.html]."),
) -> None:
    """Write one self-contained HTML report (settings, curves, metrics, confusion matrix, mistakes, calibration)."""
    from rescli.evaluation.report import write_html_report

    path = write_html_report(run_dir, output=output)
    console.out.print(str(path), markup=False, highlight=False)


@app.command(epilog="""
Examples:

    rescli predict photo.jpg                          # uses the newest runs/*/best.pt
    rescli predict ./new_photos --model runs/run2/best.pt --top-k 3
    find shots -name '*.jpg' | rescli predict - --format jsonl | jq -r '.label'
    find shots -name '*.jpg' -print0 | rescli predict -0 - --format csv > labels.csv
    rescli predict 'shots/**/*.png' @more_paths.txt --format tsv --fields path,label
    rescli predict ./inbox --model model.onnx --format jsonl | jq -r 'select(.error) | .path'

Exit status: 0 all inputs labelled, 1 some input failed (its row has an error field), 2 usage error.
""")
def predict(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (recursive), quoted globs, '-' for paths on stdin, @LIST for a file of paths."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=(
        "Checkpoint, run folder or export (.ts, .onnx) [default: $RESCLI_MODEL, else the newest runs/*/best.pt]. "
        "A checkpoint is read as data only; a .ts (TorchScript) file is a program that runs when opened: use only "
        "your own.")),
    top_k: int = typer.Option(1, "--top-k", "-k", help="How many labels to report per image (the topk field)."),
    fmt: PredictFormat = typer.Option(PredictFormat.table, "--format", "-f", help="table (people), jsonl, json, csv or tsv."),
    fields: Optional[str] = typer.Option(None, "--fields", help="Comma-separated columns, in order: path,label,score,topk,error."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Label 'unknown' when the top score is below this (0..1)."),
    raw_scores: bool = typer.Option(False, "--raw-scores", help="Softmax of raw logits (skip the stored temperature calibration)."),
    null: bool = typer.Option(False, "-0", "--null", help="Paths on stdin / in list files are NUL-separated (find -print0)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per model call; results are flushed after each batch."),
    workers: int = typer.Option(2, "--workers", help="Decode threads."),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model first (~10-15 s, ~2 s once cached): ~1.4-1.5x faster prediction on a CPU, worth it from a few thousand images. Checkpoints only."),
    jpeg_decoder: JpegDecoder = typer.Option(JpegDecoder.auto, "--jpeg-decoder", help="auto: torchvision (nvJPEG) on the model's GPU when it can, else Pillow; pillow; torchvision: on the model's device, GPU or CPU. Other formats always go through Pillow."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Nothing on stderr except errors."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress counter on stderr (it only shows when stderr is a terminal)."),
) -> None:
    """Label images with a trained model; results stream to stdout in input order, batch by batch."""
    import warnings

    _threads_for_load()
    let_idle_threads_sleep()
    from rescli.inference.inputs import check_inputs, iter_input_paths
    from rescli.inference.load import load_predictor
    from rescli.inference.lookup import resolve_model_path
    from rescli.inference.stream import predict_batches

    if quiet:
        warnings.simplefilter("ignore")  # library warnings are chatter too
    chosen = _fields(fields, top_k, fmt)
    if top_k < 1:
        raise RescliError("--top-k must be at least 1", exit_code=2)
    if batch_size < 1:
        raise RescliError("--batch-size must be at least 1", exit_code=2)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise RescliError("--threshold is a probability: give a number between 0 and 1", exit_code=2)
    check_inputs(inputs)
    path, how = resolve_model_path(model)
    predictor = load_predictor(path, device=device, precision=precision, compile=compile)
    jpeg_device = _jpeg_device(jpeg_decoder, predictor)
    if not quiet:
        console.info(f"model: {path} ({how}; {predictor.kind}, {len(predictor.classes)} classes)")
        if "-" in inputs and sys.stdin.isatty():
            console.info("reading image paths from the terminal, one per line; end with Ctrl-D")
    batches = predict_batches(
        iter_input_paths(inputs, null_separated=null), predictor=predictor, batch_size=batch_size, workers=workers,
        top_k=top_k, raw_scores=raw_scores, threshold=threshold, jpeg_device=jpeg_device,
    )
    with contextlib.closing(batches):
        done, failed = _write_predictions(batches, fmt, chosen, classes=predictor.classes, top_k=top_k, quiet=quiet,
                                          progress=not (quiet or no_progress))
    if done == 0 and not quiet:
        console.warn("no input paths were given on stdin or in the list files")
    if failed:
        raise typer.Exit(1)


PREDICT_FIELDS = ("path", "label", "score", "topk", "error")


def _jpeg_device(choice: "JpegDecoder", predictor):
    from rescli.inference.jpeg import jpeg_decode_works

    if choice == JpegDecoder.pillow:
        return None
    if choice == JpegDecoder.auto:
        return "auto"
    if predictor.device is None:
        raise RescliError(f"--jpeg-decoder torchvision: not for {predictor.kind} models (they take Pillow's images); use auto or pillow", exit_code=2)
    if not jpeg_decode_works(predictor.device):
        raise RescliError(f"--jpeg-decoder torchvision: this torchvision cannot decode JPEGs on {predictor.device}; use auto or pillow", exit_code=2)
    return predictor.device


def _fields(spec: Optional[str], top_k: int, fmt: "PredictFormat") -> list[str]:
    if not spec:
        chosen = ["path", "label", "score"] + (["topk"] if top_k > 1 else []) + ["error"]
        if fmt == PredictFormat.table:  # the one unbounded column goes last, so the others line up; errors follow it
            chosen = [f for f in chosen if f not in ("path", "error")] + ["path"]
        return chosen
    chosen = [f.strip() for f in spec.split(",") if f.strip()]
    bad = [f for f in chosen if f not in PREDICT_FIELDS]
    if bad or not chosen:
        raise RescliError(f"--fields: unknown field(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(PREDICT_FIELDS)}", exit_code=2)
    if len(set(chosen)) != len(chosen):
        raise RescliError("--fields: a field is named twice", exit_code=2)
    return chosen


def _write_predictions(batches, fmt: "PredictFormat", fields: list[str], *, classes: list[str], top_k: int, quiet: bool,
                       progress: bool) -> tuple[int, int]:
    """Write each batch as it comes and flush; returns (inputs, inputs that failed)."""
    try:
        return _write_batches(batches, fmt, fields, classes=classes, top_k=top_k, quiet=quiet, progress=progress)
    except BrokenPipeError:  # sys.stdout not guarded (the library called directly)
        raise PipeClosed() from None


def _write_batches(batches, fmt: "PredictFormat", fields: list[str], *, classes: list[str], top_k: int, quiet: bool,
                   progress: bool) -> tuple[int, int]:
    import time

    out = sys.stdout
    failed = done = 0
    show = progress and console.err.is_terminal
    started = time.monotonic()
    last_shown = started - 1.0  # show the first batch at once
    writer = None
    table = _StreamTable(fields, classes, top_k) if fmt == PredictFormat.table else None
    if fmt in (PredictFormat.csv, PredictFormat.tsv):
        writer = csv.writer(out, delimiter="," if fmt == PredictFormat.csv else "\t", lineterminator="\n")
        writer.writerow(fields)
    elif table is not None:
        out.write(table.header())
    if fmt == PredictFormat.json:
        out.write("[")
    for batch in batches:
        for row in batch:
            done += 1
            if "error" in row:
                failed += 1
                if show:
                    sys.stderr.write("\r\x1b[K")
                console.err.print(f"error: {row['path']}: {row['error']}", markup=False, highlight=False, soft_wrap=True)
            if table is not None:
                out.write(table.line(row))
            elif writer is not None:
                writer.writerow([_cell(row.get(k)) for k in fields])
            else:
                obj = {k: row[k] for k in fields if k in row} if "error" not in row else {"path": row["path"], "error": row["error"]}
                text = json_escapes(json.dumps(obj, ensure_ascii=False))  # any file name, valid UTF-8
                if fmt == PredictFormat.json:
                    out.write(("\n  " if done == 1 else ",\n  ") + text)
                else:
                    out.write(text + "\n")
        out.flush()  # a batch is visible downstream as soon as it is computed
        now = time.monotonic()
        if show and now - last_shown > 0.2:
            last_shown = now
            sys.stderr.write(f"\r{done} images, {failed} failed, {done / max(now - started, 1e-9):.0f}/s")
            sys.stderr.flush()
    if fmt == PredictFormat.json:
        out.write("\n]\n" if done else "]\n")
    out.flush()
    if show:
        sys.stderr.write("\r\x1b[K")
    if not quiet and done:
        elapsed = time.monotonic() - started
        console.info(f"{done} input(s), {done - failed} predicted, {failed} failed in {elapsed:.1f}s ({done / max(elapsed, 1e-9):.0f}/s)")
    return done, failed


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(f"{t['label']}:{t['score']:.4f}" for t in value)
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


class _StreamTable:
    """Aligned plain-text columns written line by line: a table for people that needs no buffering."""

    def __init__(self, fields: list[str], classes: list[str], top_k: int) -> None:
        self.fields = fields
        label_w = max([len("label"), len("unknown")] + [len(c) for c in classes])
        k = max(1, min(top_k, len(classes)))
        self.widths = {"label": label_w, "score": 6, "topk": max(4, k * (label_w + 6) + (k - 1) * 2), "path": 4, "error": 5}

    def header(self) -> str:
        return self._join({f: f for f in self.fields}, header=True)

    def line(self, row: dict) -> str:
        if "error" in row:
            cells = {"label": "-", "score": "-", "topk": "-", "path": row["path"], "error": f"error: {row['error']}"}
        else:
            cells = {
                "label": row["label"], "score": f"{row['score']:.4f}", "path": row["path"], "error": "",
                "topk": "  ".join(f"{t['label']}:{t['score']:.3f}" for t in row["topk"]),
            }
        return self._join(cells)

    def _join(self, cells: dict[str, str], header: bool = False) -> str:
        parts = []
        last = len(self.fields) - 1
        for i, f in enumerate(self.fields):
            text = cells.get(f, "")
            if f == "path" and not header:
                self.widths["path"] = max(self.widths["path"], len(text))  # grows with the longest path seen
            if i == last:
                parts.append(text)
                if "error" not in self.fields and cells.get("error"):  # an error is never hidden by --fields
                    parts.append(cells["error"])
            elif f == "score":
                parts.append(text.rjust(self.widths[f]))
            else:
                parts.append(text.ljust(self.widths[f]))
        return "  ".join(parts).rstrip() + "\n"


@app.command(epilog="""
Examples:

    rescli degradation ./images --depths 20,56     # plain/ResNet-20 and -56
    rescli degradation ./images --depths 20,32,44,56 --epochs 30 -o runs/deg
    rescli degradation ./images --shortcut B --img-size 16
    rescli degradation ./images --format json | jq '.summary'
    rescli degradation ./images --threads 1        # busy machine: much faster

Writes OUTPUT/degradation.json, OUTPUT/degradation.png and a run folder per model
(OUTPUT/plain20/best.pt, ...). Training error is measured in eval mode on the whole
training split after each epoch, like validation error. Details: docs/degradation.md.
""")
def degradation(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class (small images: digits, CIFAR-like)."),
    depths: str = typer.Option("20,56", "--depths", help="Comma-separated 6n+2 depths; each gets a plain and a residual net."),
    epochs: int = typer.Option(12, "--epochs", help="Epochs per model (one recipe for all)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per step."),
    img_size: int = typer.Option(32, "--img-size", help="Square input size in pixels (the paper: 32)."),
    shortcut: str = typer.Option("A", "--shortcut", help="Residual nets' shortcut: A (identity+zero-pad, no parameters), B (projection when shape changes), C (projection everywhere)."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (AdamW, warmup + cosine)."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW weight decay."),
    label_smoothing: float = typer.Option(0.0, "--label-smoothing", help="Label smoothing [default: none, the paper's plain cross-entropy]."),
    augment: str = typer.Option("none", "--augment", help="none | light | strong [default: none, so training error is error on a fixed training set]."),
    val_split: float = typer.Option(0.2, "--val-split", help="Fraction held out for validation when DATA_DIR has no val/ folder."),
    seed: int = typer.Option(0, "--seed", help="One seed for the split, data order and initialisation of every model."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode workers [default: depends on the machine]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for PyTorch [default: PyTorch's]; 1 is much faster when other jobs share the cores."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder [default: a new runs/runN]."),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format", help="Results on stdout as tables or JSON (the content of degradation.json)."),
) -> None:
    """Train plain and residual nets at each depth with one recipe: training/validation error per epoch, gradient norms at init, a figure."""
    if threads is None:
        _threads_for_load()
    from rescli.experiments.degradation import STAGES, run_degradation

    result = run_degradation(
        data_dir=data_dir, depths=depths, output=output, epochs=epochs, batch_size=batch_size, img_size=img_size,
        shortcut=shortcut, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, augment=augment,
        val_split=val_split, seed=seed, workers=workers, device=device, precision=precision, threads=threads,
    )
    if fmt == TableOrJson.json:
        _print_json(result)
        return
    from rich.table import Table

    errors = Table(title=f"final error after {epochs} epoch(s), %")
    for col in ("model", "params", "train error", "val error", "best val error"):
        errors.add_column(col, justify="left" if col == "model" else "right")
    for m in result["models"]:
        errors.add_row(m["name"], f"{m['params']:,}", f"{100 * m['final_train_error']:.2f}",
                       f"{100 * m['final_val_error']:.2f}", f"{100 * m['best_val_error']:.2f}")
    console.out.print(errors)
    grads = Table(title="gradient L2 norm per stage at initialisation (one batch)")
    grads.add_column("model")
    for stage in STAGES:
        grads.add_column(stage, justify="right")
    for m in result["models"]:
        grads.add_row(m["name"], *(f"{m['grad_norms'][s]:.3g}" for s in STAGES))
    console.out.print(grads)
    console.info(f"wrote {result['run_dir']}/degradation.json, {result['figure']} and one run folder per model")


@app.command(epilog="""
Examples:

    rescli export runs/run1/best.pt --format torchscript --output model.ts
    rescli export runs/run1 --format onnx --output model.onnx --check-images ./images/val
    rescli predict photo.jpg --model model.onnx      # works like the checkpoint
    rescli info model.onnx                           # what the file holds

The file carries class names, image size, mean/std and temperature (TorchScript extra file
or ONNX metadata_props "rescli.json"); the ONNX batch axis is dynamic. Both load without
rescli: torch.jit.load, or onnxruntime (see examples/predict_onnx.py).

A TorchScript file is a program: loading it (torch.jit.load, rescli predict/evaluate/info)
runs the code inside, so open only TorchScript files you made yourself. rescli loads
TorchScript only from a file named .ts or .torchscript, and ONNX only from .onnx, so
--output must end that way; a checkpoint (.pt, a run folder) is only ever read as data.
""")
def export(
    model: Path = typer.Argument(..., help="A rescli checkpoint, or a run folder (its best.pt); read as data only."),
    fmt: ExportFormat = typer.Option(ExportFormat.torchscript, "--format", "-f", help="torchscript (.ts) or onnx (.onnx; needs pip install 'rescli[onnx]')."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file [default: MODEL with .ts/.onnx]."),
    check_images: Optional[List[str]] = typer.Option(None, "--check-images", help="Images or folders for the parity check [default: the training folder, if present]."),
    out_fmt: TableOrJson = typer.Option(TableOrJson.table, "--print", help="Result as table or json."),
) -> None:
    """Export a checkpoint to TorchScript or ONNX (labels and preprocessing inside), checked against PyTorch."""
    from rescli.inference.export import export_model

    result = export_model(model=model, fmt=fmt.value, output=output, check_images=check_images)
    if out_fmt == TableOrJson.json:
        _print_json(result)
    else:
        console.out.print(f"wrote {result['output']} ({result['format']}, {result['classes']} classes, {result['img_size']} px)", markup=False)
        for key, what in (("max_abs_diff_random", "random images"), ("max_abs_diff_real", f"{result.get('real_images')} real images")):
            if key in result:
                console.out.print(f"max |logit difference| vs PyTorch, {what}: {result[key]:.3g}", markup=False)
    if "parity" in result:
        console.warn(result["parity"])
    elif "max_abs_diff_real" not in result:
        console.warn("parity checked on random images only: the training folder is gone; pass --check-images FOLDER to check real ones")


@app.command(epilog="""
Examples:

    rescli info runs/run1/best.pt
    rescli info runs/run1                # a run folder: its best.pt
    rescli info model.onnx --format json | jq .classes

info loads the file and checks what it says about itself (classes against the model's
outputs, image size, mean/std, temperature). A checkpoint is read as data only, whatever
it holds; a .ts/.torchscript file is a TorchScript program, which runs when it is opened,
even by info: open only your own.
""")
def info(
    model: Path = typer.Argument(..., help=(
        "Checkpoint (.pt), run folder, or export (.ts, .onnx). A checkpoint is read as data only; a .ts "
        "(TorchScript) file is a program that runs when opened: use only your own.")),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format", help="table for people, json for programs."),
) -> None:
    """Show what a checkpoint or export holds: architecture, classes, image size, metrics, versions."""
    from rescli.inference.describe import describe_model

    desc = describe_model(model)
    if fmt == TableOrJson.json:
        _print_json(desc)
        return
    from rich.table import Table

    table = Table(show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths and class lists wrap instead of ending in "…"
    for key, value in desc.items():
        if value is None or value == {}:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_short(v)}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(key, str(value))
    console.out.print(table)


def _short(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class QuietExit(RescliError):
    """Exit with a status whose message was already shown (by the processes a launcher started)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("", exit_code=exit_code)


class PipeClosed(RescliError):
    """The reader of stdout went away (`| head`); not an error worth a message."""

    def __init__(self) -> None:
        super().__init__("", exit_code=141)  # 128 + SIGPIPE, what a shell reports for `cat big | head`


def main() -> None:
    try:
        _main()
    except SystemExit as exc:  # under `finetune --gpus N`, rank 0 leaves its status for the launcher
        if os.environ.get("RESCLI_LAUNCH_STATUS_FILE"):  # (checked first: no torch import on every exit)
            from rescli.train.launch import record_exit_status

            record_exit_status(exc.code)
        raise


def _main() -> None:
    if sys.stdout is None:  # started with stdout closed (`>&-`): results would vanish without a word
        console.err.print(
            "error: stdout is closed, and rescli writes its results there; redirect it instead "
            "(> FILE, or > /dev/null to discard them)", markup=False)
        sys.exit(1)
    stdout = sys.stdout
    if hasattr(stdout, "reconfigure"):  # a file name that is not UTF-8 is printed as its bytes, as ls prints it
        stdout.reconfigure(errors="surrogateescape")
    sys.stdout = _GuardedStdout(stdout)
    try:
        with _sigterm_interrupts():
            _run_app()
    finally:
        sys.stdout = stdout


class StdoutFailed(RescliError):
    """Writing results failed (a full disk behind `> file`, an I/O error): one line, exit 1."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"cannot write the results to stdout: {exc.strerror or exc}")


class _GuardedStdout:
    """sys.stdout for the length of a command: every failed write or flush, whoever makes it (rich, csv, json),
    becomes PipeClosed (the reader went away) or StdoutFailed, instead of a traceback or a message at exit."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise PipeClosed() from None
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise PipeClosed() from None
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _run_app() -> None:
    try:
        # standalone_mode=False hands typer.Exit(code) back as a return value instead of exiting. Typer also turns
        # a KeyboardInterrupt into Exit(130) there, before any handler of ours sees it: 130 can only mean that.
        renderer = console.EventRenderer()
        try:
            with events.subscribed(renderer):
                code = app(standalone_mode=False)
        finally:
            renderer.close()
        if code == 130:
            console.err.print("interrupted", markup=False)
        sys.stdout.flush()  # a buffered `> file` fails here, if at all, while it can still be said well
    except PipeClosed as exc:
        _silence_stdout()
        if threading.active_count() > 1 and _stdout_is_real_fd():
            # Decode threads may still be inside native code; a normal interpreter teardown under them can
            # abort ("terminate called without an active exception", exit 134). Nothing is left to flush.
            sys.stderr.flush()
            os._exit(exc.exit_code)
        sys.exit(exc.exit_code)
    except RescliError as exc:
        if isinstance(exc, StdoutFailed):
            _silence_stdout()  # the interpreter flushes stdout once more at exit: let that find somewhere to go
        rank = _torchrun_rank()
        if not exc.message:
            pass
        elif rank == 0:
            console.err.print(f"error: {exc.message}", markup=False, highlight=False)
        elif not getattr(exc, "shared", False) and exc.exit_code != 2:  # rank 0 shows the errors all ranks share
            console.err.print(f"error (rank {rank}): {exc.message}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.err.print("interrupted", markup=False)
        sys.exit(130)
    except OSError as exc:  # a file the library did not expect to fail (a full disk, a read-only folder): one line
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
        console.err.print(f"error: {where}{exc.strerror or exc}", markup=False, highlight=False)
        sys.exit(1)
    except Exception as exc:
        # Typer vendors click; its exceptions are recognised by shape rather than by an import.
        if type(exc).__name__ == "Abort":
            console.err.print("interrupted", markup=False)
            sys.exit(130)
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


@contextlib.contextmanager
def _sigterm_interrupts() -> Any:
    """SIGTERM (kill, a scheduler ending a job) stops rescli like Ctrl-C does: cleanly, files intact, exit 130."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _torchrun_rank() -> int:
    """This process's rank when torchrun started it (0 otherwise); read from the environment, no torch import."""
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except (KeyError, ValueError):
        return 0


def _stdout_is_real_fd() -> bool:
    try:
        sys.stdout.fileno()
        return True
    except (OSError, ValueError):  # replaced by an in-memory stream (tests, embedding)
        return False


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot raise.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def tables(report: dict[str, Any]) -> list[Any]:
    """The report as rich tables for people (the CLI prints them; programs use the JSON)."""
    from rich.table import Table
    from rich.text import Text

    def shown(name: str) -> Text:  # file and class names as they are (never rich markup); bytes not UTF-8 as \xNN
        return Text(shown_name(name))

    splits = list(report["splits"])
    counts = Table(title=shown(f"{report['root']} ({report['layout']})"))
    counts.add_column("class")
    for split in splits:
        counts.add_column(split, justify="right")
    counts.add_column("total", justify="right")
    for name, total in report["classes"].items():
        counts.add_row(shown(name), *(str(report["splits"][s][name]) for s in splits), str(total))
    counts.add_row("all", *(str(sum(report["splits"][s].values())) for s in splits), str(report["images"]), style="bold")

    summary = Table(show_header=False, title="summary")
    sizes = report["sizes"]
    summary.add_row("usable images", str(report["images"]))
    summary.add_row("broken images (skipped)", str(len(report["broken"])))
    summary.add_row("ignored files", str(len(report["ignored"])))
    if report["empty_classes"]:
        summary.add_row("not classes (no usable images)", shown(", ".join(report["empty_classes"])))
    summary.add_row("width range (px)", "{} - {}".format(*sizes["width"]))
    summary.add_row("height range (px)", "{} - {}".format(*sizes["height"]))
    summary.add_row("smallest image", shown("{path} ({width}x{height})".format(**sizes["smallest"])))
    summary.add_row("class imbalance (largest / smallest)", f"{report['imbalance_ratio']:.2f}")
    kinds = [g["kind"] for g in report["duplicates"]]
    summary.add_row(
        "duplicate groups",
        f"{len(kinds)} ({kinds.count('label-conflict')} label conflict(s), {kinds.count('leak')} split leak(s), "
        f"{kinds.count('copy')} copy(ies))",
    )
    out: list[Any] = [counts, summary]

    if report.get("warnings"):
        warnings = Table(title="warnings (finetune shows them too)", show_header=False)
        warnings.add_column(overflow="fold")
        for message in report["warnings"]:
            warnings.add_row(shown(message))
        out.append(warnings)

    if report["broken"]:
        broken = Table(title="broken images (finetune skips them; --strict stops on them)")
        broken.add_column("path")
        broken.add_column("problem")
        for path, why in report["broken_reasons"].items():
            broken.add_row(shown(path), shown(why))
        out.append(broken)
    if report["ignored"]:
        ignored = Table(title="ignored (not images or not regular files, hidden, outside any class folder, or counted "
                              "elsewhere)")
        ignored.add_column("path")
        ignored.add_column("why")
        for path, why in report["ignored_reasons"].items():
            ignored.add_row(shown(path), shown(why))
        out.append(ignored)
    if report["duplicates"]:
        dups = Table(title="identical files")
        for col in ("kind", "files", "classes", "splits"):
            dups.add_column(col)
        for g in report["duplicates"]:
            dups.add_row(g["kind"], shown("\n".join(g["paths"])), shown(", ".join(g["classes"])),
                         ", ".join(g["splits"]))
        out.append(dups)
    return out
