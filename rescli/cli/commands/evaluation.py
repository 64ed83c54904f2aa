"""`rescli evaluate` and `rescli report`: scoring a model on labelled images, and the HTML report of a run."""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

import rescli.cli.console as console
import rescli.cli.tables as tables
from rescli.cli.before_torch import threads_for_load
from rescli.cli.options import (
    TRUST_NOTE,
    Compile,
    Device,
    InferenceBatchSize,
    LabelColumn,
    OutputFormat,
    PathColumn,
    Precision,
    RawScores,
    TableOrJson,
    Workers,
)

EVALUATE_EPILOG = """
Examples:

    rescli evaluate runs/run1/best.pt ./images/test   # files go to runs/run1/eval-test/
    rescli evaluate runs/run1/best.pt ./images --split val --format json | jq .macro_f1
    rescli evaluate model.onnx ./images/test --output reports/onnx-test
    rescli evaluate runs/run1/best.pt ./images/test --no-files --format json > metrics.json
    rescli evaluate latest labels.csv                 # the rows the run held out of the table it trained on
    rescli evaluate runs/run2/best.pt test.csv        # a multi-label model on a table: mAP, micro/macro F1

Writes metrics.json, predictions.csv, confusion_matrix.png (multi-label: pr_curves.png),
top_losses.png, reliability.png and report.html into the output folder (never into DATA_DIR or
a table's folder). Scores use the temperature stored in the model (fitted by finetune on its
validation split) unless --raw-scores; a multi-label model decides each label at its stored
threshold (0.5 with --raw-scores). A table is read as the model's training table was.
"""

ModelToScore = Annotated[Path, typer.Argument(help=(
    "A rescli checkpoint (.pt) or export (.ts, .onnx), a run folder, or 'latest' (newest runs/*/best.pt). "
    + TRUST_NOTE))]
LabelledImages = Annotated[Path, typer.Argument(help=(
    "Class folders, a split root (then --split), or a label table (.csv, .tsv, .jsonl, .parquet)."))]
TableLabelSep = Annotated[Optional[str], typer.Option("--label-sep", help=(
    "What separates a multi-label table's labels [default: the separator of the model's training table]."))]
Split = Annotated[Optional[str], typer.Option("--split", help=(
    "train, val, test or all. On the folder the model was trained on: its held-out images by default (test if it "
    "had one, else val). On a split root: test if present, else val. Elsewhere: every image."))]
EvaluationFolder = Annotated[Optional[Path], typer.Option("--output", "-o", help=(
    "Folder for the evaluation files [default: MODEL's folder/eval-DATA_DIR name[-split]]."))]
NoFiles = Annotated[bool, typer.Option("--no-files", help="Only print the metrics; write no files.")]


def evaluate(
    model: ModelToScore,
    data_dir: LabelledImages,
    split: Split = None,
    output: EvaluationFolder = None,
    no_files: NoFiles = False,
    raw_scores: RawScores = False,
    batch_size: InferenceBatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    compile: Compile = False,
    path_column: PathColumn = None,
    label_column: LabelColumn = None,
    label_sep: TableLabelSep = None,
    fmt: OutputFormat = TableOrJson.table,
) -> None:
    """Score MODEL on labelled images: accuracy, per-class P/R/F1, confusion matrix, mistakes, calibration (ECE);
    multi-label: mAP, micro/macro F1, subset accuracy, hamming loss, per-label P/R/F1/AP."""
    threads_for_load()
    from rescli.evaluation.folder import evaluate_folder
    from rescli.inference.lookup import resolve_model_path

    model, _ = resolve_model_path(model)
    metrics, _, out_dir = evaluate_folder(
        model=model, data_dir=data_dir, split=split, output=output, raw_scores=raw_scores, write_files=not no_files,
        batch_size=batch_size, workers=workers, device=device, precision=precision, compile=compile,
        path_column=path_column, label_column=label_column, label_sep=label_sep,
    )
    _say_what_was_evaluated(metrics)
    if out_dir is not None:
        console.info(f"wrote metrics.json, predictions.csv, figures and report.html to {out_dir}")
    if fmt == TableOrJson.json:
        console.print_json(metrics)
        return
    for table in tables.metrics_tables(metrics):
        console.out.print(table)


def _say_what_was_evaluated(metrics: dict[str, Any]) -> None:
    """Which images were scored, and whether the figures can be trusted as a held-out estimate."""
    evaluated = metrics["evaluated"]
    if evaluated.get("note"):
        console.info(evaluated["note"])
    if evaluated.get("seen_in_training"):
        console.warn(
            f"{evaluated['seen_in_training']} of the {metrics['n'] + len(metrics['skipped'])} images were used to "
            "train this model (the same file, or a copy of one): these metrics are not a held-out estimate"
        )
    for item in metrics["skipped"]:
        console.warn(f"skipped {item['error']}")


REPORT_EPILOG = """
Examples:

    rescli report runs/run1                     # writes runs/run1/report.html
    rescli report runs/run1/eval-test           # a folder from evaluate
    rescli report runs/run1 -o pr-1234.html     # to attach to a PR

The file is self-contained (figures embedded, no scripts, no network): open it in any browser.
finetune and evaluate already write one; run this again after editing or copying a run folder.
"""


def report(
    run_dir: Annotated[Path, typer.Argument(
        help="A run folder (finetune) or evaluation folder (evaluate) with metrics.json.")],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="HTML file to write [default: RUN_DIR/report.html].")] = None,
) -> None:
    """Write one self-contained HTML report (settings, curves, metrics, confusion matrix, mistakes, calibration)."""
    from rescli.evaluation.report import write_html_report

    path = write_html_report(run_dir, output=output)
    console.out.print(str(path), markup=False, highlight=False)
