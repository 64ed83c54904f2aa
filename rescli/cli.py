"""The command line: parse options, call one library function, print results, exit with meaning.

stdout carries results only (a table for people, or json/jsonl/csv/tsv for programs);
progress, logs and warnings go to stderr. Exit status: 0 ok, 1 failure (or some inputs
failed), 2 usage error, 130 interrupted, 141 output pipe closed.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from rescli import __version__, console
from rescli.errors import RescliError

app = typer.Typer(
    name="rescli",
    help="Fine-tune ImageNet ResNets on a folder of images; evaluate, predict and export from the command line.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


class TableOrJson(str, Enum):
    table = "table"
    json = "json"


class PredictFormat(str, Enum):
    table = "table"
    jsonl = "jsonl"
    json = "json"
    csv = "csv"
    tsv = "tsv"


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


# --- finetune --------------------------------------------------------------------------------------------

@app.command(epilog="""
Examples:

    rescli finetune ./images                         # ResNet-18, ImageNet weights, 5 epochs
    rescli finetune ./images --depth 50 --epochs 10 --batch-size 64
    rescli finetune sample_data --weights none --img-size 32 --epochs 3
    rescli finetune ./more --weights runs/run1/best.pt --strategy head
    rescli finetune --resume runs/run3               # continue an interrupted run
""")
def finetune(
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
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate of the head (AdamW, warmup + cosine)."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW weight decay (not applied to norms and biases)."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="Label smoothing of the training loss."),
    augment: str = typer.Option("light", "--augment", help="none | light (crops, flips) | strong (+ TrivialAugment)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many epochs without a better validation accuracy."),
    balance: bool = typer.Option(False, "--balance", help="Weight the loss by inverse class frequency (for imbalanced folders)."),
    val_split: float = typer.Option(0.2, "--val-split", help="Fraction held out for validation when DATA_DIR has no val/ folder."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, the data order and initialisation."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode workers [default: depends on the machine]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: bf16 on CPUs with AMX/AVX512-BF16 and GPUs that have it, fp16 on older GPUs)."),
    strict: bool = typer.Option(False, "--strict", help="Stop on any broken image instead of skipping it."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder [default: a new runs/runN]."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run: its folder or its last.pt."),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format", help="Summary on stdout as a table or JSON."),
) -> None:
    """Fine-tune a ResNet on DATA_DIR and write a run folder (best.pt, last.pt, history.csv, metrics.json)."""
    from rescli import models
    from rescli.train import TrainSettings, finetune as run_finetune

    if resume is None:
        if data_dir is None:
            raise RescliError("missing DATA_DIR (or pass --resume RUN_DIR)", exit_code=2)
        arch_kwargs = {"shortcut": shortcut.upper()} if shortcut else {}
        settings = TrainSettings(
            data_dir=str(data_dir), arch=models.arch_name(depth=depth, arch=arch), arch_kwargs=arch_kwargs, weights=weights,
            strategy=strategy, freeze_epochs=freeze_epochs, epochs=epochs or 5, batch_size=batch_size, img_size=img_size,
            lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, augment=augment, patience=patience,
            balance=balance, val_split=val_split, seed=seed, workers=workers, device=device, precision=precision, strict=strict,
        )
        result = run_finetune(settings=settings, output=output)
    else:
        result = run_finetune(resume=resume, epochs=epochs)
    m = result["metrics"]
    summary = {
        "run_dir": result["run_dir"],
        "best_checkpoint": str(Path(result["run_dir"]) / "best.pt"),
        "best_epoch": m.get("best_epoch"),
        "epochs_run": m.get("epochs_run"),
        "val_accuracy": m.get("accuracy"),
        "val_balanced_accuracy": m.get("balanced_accuracy"),
        "val_macro_f1": m.get("macro_f1"),
    }
    if fmt == TableOrJson.json:
        _print_json(summary)
        return
    from rich.table import Table

    table = Table(title="finetune", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.out.print(table)
    console.info(f"next: rescli evaluate {summary['best_checkpoint']} DATA_DIR  ·  rescli predict IMAGES --model {summary['best_checkpoint']}")


# --- evaluate --------------------------------------------------------------------------------------------

@app.command(epilog="""
Examples:

    rescli evaluate runs/run1/best.pt ./images/test
    rescli evaluate runs/run1/best.pt ./images --split val --format json | jq .macro_f1
""")
def evaluate(
    model: Path = typer.Argument(..., help="A rescli checkpoint (.pt) or export (.ts, .onnx)."),
    data_dir: Path = typer.Argument(..., help="Class folders, or a split root (then --split)."),
    split: Optional[str] = typer.Option(None, "--split", help="train, val or test for a split root [default: test if present, else val]."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    workers: Optional[int] = typer.Option(None, "--workers"),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision"),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format", help="table for people, json for programs."),
) -> None:
    """Score MODEL on labelled images: accuracy, balanced accuracy, per-class P/R/F1, confusion matrix."""
    from rescli.evaluate import evaluate_folder

    metrics, ev = evaluate_folder(model=model, data_dir=data_dir, split=split, batch_size=batch_size, workers=workers, device=device, precision=precision)
    for item in metrics["skipped"]:
        console.warn(f"skipped {item['error']}")
    if fmt == TableOrJson.json:
        _print_json(metrics)
        return
    _print_metrics_table(metrics)


def _print_metrics_table(m: dict[str, Any]) -> None:
    from rich.table import Table

    head = Table(title=f"{m['n']} images", show_header=False)
    for key in ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1", "roc_auc_ovr", "loss"):
        if m.get(key) is not None:
            head.add_row(key, f"{m[key]:.4f}")
    for k, v in (m.get("top_k_accuracy") or {}).items():
        if k != "1":
            head.add_row(f"top{k}_accuracy", f"{v:.4f}")
    console.out.print(head)
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


# --- predict ---------------------------------------------------------------------------------------------

@app.command(epilog="""
Examples:

    rescli predict photo.jpg                          # uses the newest runs/*/best.pt
    rescli predict ./new_photos --model runs/run2/best.pt --top-k 3
    find shots -name '*.jpg' | rescli predict - --format jsonl | jq -r '.label'
    find shots -name '*.jpg' -print0 | rescli predict -0 - --format csv > labels.csv
    rescli predict 'shots/**/*.png' @more_paths.txt --format tsv --fields path,label
""")
def predict(
    inputs: List[str] = typer.Argument(..., help="Image files, folders (recursive), quoted globs, '-' for paths on stdin, @LIST for a file of paths."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint or export [default: $RESCLI_MODEL, else the newest runs/*/best.pt]."),
    top_k: int = typer.Option(1, "--top-k", "-k", help="How many labels to report per image."),
    fmt: PredictFormat = typer.Option(PredictFormat.table, "--format", "-f", help="table, jsonl, json, csv or tsv."),
    fields: Optional[str] = typer.Option(None, "--fields", help="Comma-separated columns for csv/tsv/jsonl/table: path,label,score,topk,error."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Label 'unknown' when the top score is below this."),
    raw_scores: bool = typer.Option(False, "--raw-scores", help="Softmax of raw logits (skip the stored temperature calibration)."),
    null: bool = typer.Option(False, "-0", "--null", help="Paths on stdin / in list files are NUL-separated (find -print0)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b"),
    workers: int = typer.Option(2, "--workers", help="Decode threads."),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Nothing on stderr except errors."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress counter on stderr."),
) -> None:
    """Label images with a trained model; results stream to stdout in input order, batch by batch."""
    from rescli.predict import iter_input_paths, load_predictor, predict_stream, resolve_model_path

    path, how = resolve_model_path(model)
    predictor = load_predictor(path, device=device, precision=precision)
    if not quiet:
        console.info(f"model: {path} ({how}; {predictor.kind}, {len(predictor.classes)} classes)")
    chosen = _fields(fields, top_k)
    rows = predict_stream(
        iter_input_paths(inputs, null_separated=null), predictor=predictor, batch_size=batch_size, workers=workers,
        top_k=top_k, raw_scores=raw_scores, threshold=threshold,
    )
    failed = _write_predictions(rows, fmt, chosen, quiet=quiet, progress=not (quiet or no_progress))
    if failed:
        raise typer.Exit(1)


def _fields(spec: Optional[str], top_k: int) -> list[str]:
    allowed = ["path", "label", "score", "topk", "error"]
    if not spec:
        return ["path", "label", "score"] + (["topk"] if top_k > 1 else []) + ["error"]
    chosen = [f.strip() for f in spec.split(",") if f.strip()]
    bad = [f for f in chosen if f not in allowed]
    if bad:
        raise RescliError(f"--fields: unknown field(s) {', '.join(bad)}; choose from {', '.join(allowed)}", exit_code=2)
    return chosen


def _write_predictions(rows, fmt: PredictFormat, fields: list[str], *, quiet: bool, progress: bool) -> int:
    """Write rows as they come; returns how many inputs failed."""
    try:
        return _write_rows(rows, fmt, fields, quiet=quiet, progress=progress)
    except BrokenPipeError:
        raise PipeClosed() from None


def _write_rows(rows, fmt: PredictFormat, fields: list[str], *, quiet: bool, progress: bool) -> int:
    failed = done = 0
    show = progress and console.err.is_terminal
    table_rows: list[dict] = []
    writer = None
    if fmt in (PredictFormat.csv, PredictFormat.tsv):
        writer = csv.writer(sys.stdout, delimiter="," if fmt == PredictFormat.csv else "\t", lineterminator="\n")
        writer.writerow(fields)
    json_first = True
    if fmt == PredictFormat.json:
        sys.stdout.write("[")
    for row in rows:
        done += 1
        if "error" in row:
            failed += 1
            if not quiet or fmt == PredictFormat.table:
                console.err.print(f"error: {row['error']}", markup=False, highlight=False)
        if fmt == PredictFormat.table:
            table_rows.append(row)
        elif fmt in (PredictFormat.jsonl, PredictFormat.json):
            obj = {k: row[k] for k in fields if k in row} if "error" not in row else {k: row[k] for k in ("path", "error")}
            text = json.dumps(obj)
            if fmt == PredictFormat.json:
                text = ("\n  " if json_first else ",\n  ") + text
                json_first = False
            sys.stdout.write(text + ("\n" if fmt == PredictFormat.jsonl else ""))
        else:
            writer.writerow([_cell(row.get(k)) for k in fields])
        if done % 32 == 0 or "error" in row:
            sys.stdout.flush()
        if show and done % 100 == 0:
            console.err.print(f"{done} images", end="\r", markup=False)
    if fmt == PredictFormat.json:
        sys.stdout.write("\n]\n" if not json_first else "]\n")
    sys.stdout.flush()
    if fmt == PredictFormat.table:
        _print_prediction_table(table_rows, fields)
    if not quiet:
        console.info(f"{done} input(s), {done - failed} predicted, {failed} failed")
    return failed


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(f"{t['label']}:{t['score']:.4f}" for t in value)
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def _print_prediction_table(rows: list[dict], fields: list[str]) -> None:
    from rich.table import Table

    table = Table()
    cols = [f for f in fields if f != "error" or any("error" in r for r in rows)]
    for c in cols:
        table.add_column(c, justify="right" if c == "score" else "left")
    for r in rows:
        table.add_row(*[_cell(r.get(c)) if c != "score" or r.get(c) is None else f"{r[c]:.4f}" for c in cols])
    console.out.print(table)


# --- export, info --------------------------------------------------------------------------------------------

@app.command(epilog="""
Examples:

    rescli export runs/run1/best.pt --format torchscript --output model.ts
    rescli export runs/run1/best.pt --format onnx --output model.onnx --check-images ./images/val
    rescli predict photo.jpg --model model.onnx
""")
def export(
    model: Path = typer.Argument(..., help="A rescli checkpoint."),
    fmt: ExportFormat = typer.Option(ExportFormat.torchscript, "--format", "-f"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file [default: MODEL with .ts/.onnx]."),
    check_images: Optional[List[str]] = typer.Option(None, "--check-images", help="Images or folders for the parity check [default: the training folder, if present]."),
    out_fmt: TableOrJson = typer.Option(TableOrJson.table, "--print", help="Result as table or json."),
) -> None:
    """Export a checkpoint to TorchScript or ONNX (labels and preprocessing inside), checked against PyTorch."""
    from rescli.export import export_model

    result = export_model(model=model, fmt=fmt.value, output=output, check_images=check_images)
    if out_fmt == TableOrJson.json:
        _print_json(result)
        return
    console.out.print(f"wrote {result['output']}", markup=False)
    for key in ("max_abs_diff_random", "max_abs_diff_real"):
        if key in result:
            console.out.print(f"{key}: {result[key]:.3g}", markup=False)
    if "parity" in result:
        console.warn(result["parity"])


@app.command(epilog="""
Examples:

    rescli info runs/run1/best.pt
    rescli info model.onnx --format json | jq .classes
""")
def info(
    model: Path = typer.Argument(..., help="Checkpoint (.pt) or export (.ts, .onnx)."),
    fmt: TableOrJson = typer.Option(TableOrJson.table, "--format"),
) -> None:
    """Show what a checkpoint or export holds: architecture, classes, image size, metrics, versions."""
    from rescli.info import describe_model

    desc = describe_model(model)
    if fmt == TableOrJson.json:
        _print_json(desc)
        return
    from rich.table import Table

    table = Table(show_header=False, title=str(model))
    for key, value in desc.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_short(v)}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        table.add_row(key, str(value))
    console.out.print(table)


def _short(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# --- entry point ---------------------------------------------------------------------------------------------

class PipeClosed(RescliError):
    """The reader of stdout went away (`| head`); not an error worth a message."""

    def __init__(self) -> None:
        super().__init__("", exit_code=141)  # 128 + SIGPIPE, what a shell reports for `cat big | head`


def main() -> None:
    try:
        # standalone_mode=False hands typer.Exit(code) back as a return value instead of exiting.
        code = app(standalone_mode=False)
    except PipeClosed as exc:
        _silence_stdout()
        sys.exit(exc.exit_code)
    except RescliError as exc:
        console.err.print(f"error: {exc.message}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.err.print("interrupted", markup=False)
        sys.exit(130)
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


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot raise.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
