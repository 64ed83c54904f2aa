"""`rescli degradation`: the plain-versus-residual experiment, one recipe for every depth."""

from pathlib import Path
from typing import Annotated, Optional

import typer

import rescli.cli.console as console
import rescli.cli.tables as tables
from rescli.cli.before_torch import threads_for_load
from rescli.cli.options import (
    Device,
    OutputFormat,
    Precision,
    RecipeBatchSize,
    Seed,
    TableOrJson,
    ValSplit,
    WeightDecay,
    Workers,
)

DEGRADATION_EPILOG = """
Examples:

    rescli degradation ./images --depths 20,56     # plain/ResNet-20 and -56
    rescli degradation ./images --depths 20,32,44,56 --epochs 30 -o runs/deg
    rescli degradation ./images --shortcut B --img-size 16
    rescli degradation ./images --format json | jq '.summary'
    rescli degradation ./images --threads 1        # busy machine: much faster

Writes OUTPUT/degradation.json, OUTPUT/degradation.png and a run folder per model
(OUTPUT/plain20/best.pt, ...). Training error is measured in eval mode on the whole
training split after each epoch, like validation error. --format json prints what
degradation.json holds. Details: docs/degradation.md.
"""

# The experiment's recipe differs from finetune's where the paper's does: these say why.
SmallImages = Annotated[Path, typer.Argument(
    help="Folder with one sub-folder per class (small images: digits, CIFAR-like).")]
Depths = Annotated[str, typer.Option(
    "--depths", help="Comma-separated 6n+2 depths; each gets a plain and a residual net.")]
EpochsPerModel = Annotated[int, typer.Option("--epochs", help="Epochs per model (one recipe for all).")]
ResidualShortcut = Annotated[str, typer.Option("--shortcut", help=(
    "Residual nets' shortcut: A (identity+zero-pad, no parameters), B (projection when shape changes), "
    "C (projection everywhere)."))]
PeakLearningRate = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warmup + cosine).")]
PaperLabelSmoothing = Annotated[float, typer.Option(
    "--label-smoothing", help="Label smoothing [default: none, the paper's plain cross-entropy].")]
FixedTrainingSet = Annotated[str, typer.Option("--augment", help=(
    "none | light | strong [default: none, so training error is error on a fixed training set]."))]
TorchThreads = Annotated[Optional[int], typer.Option("--threads", help=(
    "CPU threads for PyTorch [default: PyTorch's]; 1 is much faster when other jobs share the cores."))]
PaperImgSize = Annotated[int, typer.Option("--img-size", help="Square input size in pixels (the paper: 32).")]
ExperimentFolder = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Output folder [default: a new runs/runN].")]


def degradation(
    data_dir: SmallImages,
    depths: Depths = "20,56",
    epochs: EpochsPerModel = 12,
    batch_size: RecipeBatchSize = 64,
    img_size: PaperImgSize = 32,
    shortcut: ResidualShortcut = "A",
    lr: PeakLearningRate = 2e-3,
    weight_decay: WeightDecay = 0.05,
    label_smoothing: PaperLabelSmoothing = 0.0,
    augment: FixedTrainingSet = "none",
    val_split: ValSplit = 0.2,
    seed: Seed = 0,
    workers: Workers = None,
    device: Device = "auto",
    precision: Precision = "auto",
    threads: TorchThreads = None,
    output: ExperimentFolder = None,
    fmt: OutputFormat = TableOrJson.table,
) -> None:
    """Train plain and residual nets at each depth with one recipe: training/validation error per epoch, gradient
    norms at init, a figure."""
    if threads is None:
        threads_for_load()
    from rescli.experiments.degradation import STAGES, run_degradation

    result = run_degradation(
        data_dir=data_dir, depths=depths, output=output, epochs=epochs, batch_size=batch_size, img_size=img_size,
        shortcut=shortcut, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, augment=augment,
        val_split=val_split, seed=seed, workers=workers, device=device, precision=precision, threads=threads,
    )
    if fmt == TableOrJson.json:  # the content of degradation.json
        console.print_json(result)
        return
    for table in tables.degradation_tables(result, epochs=epochs, stages=STAGES):
        console.out.print(table)
    console.info(f"wrote {result['run_dir']}/degradation.json, {result['figure']} and one run folder per model")
