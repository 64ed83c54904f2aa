"""`rescli dataset`: what a data folder or a label table holds, exactly as finetune sees it."""

from typing import Annotated, Any, Optional

import typer

import rescli.cli.console as console
import rescli.cli.tables as tables
from rescli.cli.options import (
    DataDir,
    LabelColumn,
    LabelSep,
    MultiLabel,
    OutputFormat,
    PathColumn,
    Seed,
    TableOrJson,
    ValSplit,
)
from rescli.core import events

DATASET_EPILOG = """
Examples:

    rescli dataset ./images                   # what finetune ./images would use
    rescli dataset ./images --format json | jq .broken
    rescli dataset ./images --format json | jq '.duplicates[] | select(.leak)'
    rescli dataset ./images --val-split 0.3   # as finetune --val-split 0.3
    rescli dataset labels.csv --multi-label   # a label table, as finetune labels.csv --multi-label reads it
"""

# Issue #16: near-duplicates by perceptual hash and/or a model's embeddings (rescli.data.near_duplicates).
NearDuplicates = Annotated[str, typer.Option("--near-duplicates", help=(
    "phash (resized, re-encoded), embeddings (also crops; needs --model), both, or none."))]
NearModel = Annotated[Optional[str], typer.Option("--model", "-m", help=(
    "Checkpoint, run folder or .ts export whose embeddings find near-duplicates (--near-duplicates embeddings)."))]
CheckThreads = Annotated[Optional[int], typer.Option(
    "--workers", help="Threads that check images [default: one per core].")]


def dataset(
    data_dir: DataDir,
    val_split: ValSplit = 0.2,
    seed: Seed = 0,
    workers: CheckThreads = None,
    multi_label: MultiLabel = False,
    label_sep: LabelSep = " ",
    path_column: PathColumn = None,
    label_column: LabelColumn = None,
    fmt: OutputFormat = TableOrJson.table,
    near_duplicates: NearDuplicates = "phash",
    model: NearModel = None,
) -> None:
    """Show what DATA_DIR holds, exactly as finetune sees it: classes, counts per split, broken and ignored files,
    image sizes, class imbalance, and identical files across splits (leakage) or classes (label conflicts)."""
    from rescli.data.report import describe_dataset
    from rescli.data.tables import TableOptions
    from rescli.insight.reports import near_duplicate_embedder

    options = TableOptions(path_column=path_column, label_column=label_column, multi_label=multi_label,
                           label_sep=label_sep)
    # Passed only when chosen, so that describe_dataset's own default (phash, no model) decides otherwise.
    chosen = near_duplicates != "phash" or model is not None
    near: dict[str, Any] = {}
    if chosen:
        near = {"near_duplicates": near_duplicates, "embed": near_duplicate_embedder(near_duplicates, model)}
    report = describe_dataset(data_dir, val_split=val_split, seed=seed, workers=workers, progress=_images_checked,
                              table=options, **near)
    if fmt == TableOrJson.json:
        console.print_json(report)
        return
    for table in tables.dataset_tables(report):
        console.out.print(table)


def _images_checked(done: int, total: int) -> None:
    """describe_dataset's count of images checked, on the one progress display."""
    events.progress("checking images", done, total, finished=done >= total)
