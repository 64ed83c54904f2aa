"""`rescli dataset`: what a data folder or a label table holds, exactly as finetune sees it."""

from typing import Annotated, Optional

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
) -> None:
    """Show what DATA_DIR holds, exactly as finetune sees it: classes, counts per split, broken and ignored files,
    image sizes, class imbalance, and identical files across splits (leakage) or classes (label conflicts)."""
    from rescli.data.report import describe_dataset
    from rescli.data.tables import TableOptions

    options = TableOptions(path_column=path_column, label_column=label_column, multi_label=multi_label,
                           label_sep=label_sep)
    report = describe_dataset(data_dir, val_split=val_split, seed=seed, workers=workers, progress=_images_checked,
                              table=options)
    if fmt == TableOrJson.json:
        console.print_json(report)
        return
    for table in tables.dataset_tables(report):
        console.out.print(table)


def _images_checked(done: int, total: int) -> None:
    """describe_dataset's count of images checked, on the one progress display."""
    events.progress("checking images", done, total, finished=done >= total)
