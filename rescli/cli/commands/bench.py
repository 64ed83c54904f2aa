"""`rescli bench`: which engine labels images fastest on this machine, measured on the user's own images."""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

import rescli.cli.console as console
from rescli.cli.before_torch import threads_for_load
from rescli.cli.options import InferenceBatchSize, OutputFormat, TableOrJson

BENCH_EPILOG = """
Examples:

    rescli bench runs/run1 ./photos                     # every engine this machine has
    rescli bench runs/run1 ./photos --engine openvino-int8 --engine onnxruntime-int8
    rescli bench runs/run1 ./photos --images 1024 --format json | jq '.rows[] | {engine, end_to_end_img_s}'

Engines: torch-fp32, torch-bf16, torch-compiled, onnxruntime-fp32, onnxruntime-int8,
openvino-fp32, openvino-bf16, openvino-int8 (ONNX Runtime needs pip install 'rescli[onnx]',
OpenVINO pip install 'rescli[openvino]'; a missing one is listed as skipped). The first row is
today's default predict (torch, bf16 where the CPU has it, else fp32): the ratios are against it.

e2e (end to end): predict's own stream from the image files (decode threads, batches, rows);
model: the same images decoded once, in memory, so the engine alone; agree: the share
of images labelled as the checkpoint's fp32 network labels them (int8 is calibrated on these
images here; `rescli export` calibrates and checks on the validation split). Close other work
first: a busy machine gives figures that say little. docs/deploy.md says which engine to pick.
"""

ModelToBench = Annotated[Path, typer.Argument(help="A rescli checkpoint, or a run folder (its best.pt).")]
BenchInputs = Annotated[list[str], typer.Argument(help="Image files or folders to time on (your own images).")]
EngineChoice = Annotated[Optional[list[str]], typer.Option(
    "--engine", "-e", help="An engine to time (repeat for several) [default: all of them].")]
BenchImages = Annotated[int, typer.Option("--images", help="Time on at most this many of the inputs.")]
DecodeThreads = Annotated[int, typer.Option("--workers", help="Decode threads for the end-to-end figure.")]


def bench(
    model: ModelToBench,
    inputs: BenchInputs,
    engine: EngineChoice = None,
    images: BenchImages = 512,
    batch_size: InferenceBatchSize = 32,
    workers: DecodeThreads = 2,
    fmt: OutputFormat = TableOrJson.table,
) -> None:
    """Measure images/s of a checkpoint in every engine and precision (torch, ONNX Runtime, OpenVINO; fp32, bf16,
    int8) on your own images."""
    threads_for_load()
    from rescli.inference.engine_bench import bench_engines

    result = bench_engines(model=model, inputs=inputs, engines=engine, batch_size=batch_size, max_images=images,
                           workers=workers)
    if fmt == TableOrJson.json:
        console.print_json(result)
        return
    console.out.print(bench_table(result))


def bench_table(result: dict[str, Any]) -> Table:
    """One row per engine: img/s end to end and model-only, the ratios, the label agreement."""
    cpu = result["cpu"]
    title = (f"{result['arch']}, {result['img_size']} px, {result['images']} images, batch {result['batch_size']} - "
             f"{cpu['name']} ({', '.join(cpu['features']) or 'no AVX2'}), {cpu['cpus']} CPU(s), "
             f"{cpu['threads']} thread(s)")
    table = Table(title=title)
    skipped: list[str] = []
    table.add_column("engine", no_wrap=True)
    for column in ("e2e img/s", "x default", "model img/s", "e2e/model", "agree", "setup s"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        name = row["engine"] + (f": {row['precision']}" if "precision" in row else "")
        if "skipped" in row:
            skipped.append(f"{name}: {row['skipped']}")
            continue
        table.add_row(name, f"{row['end_to_end_img_s']:.1f}", f"{row['vs_default']:.2f}",
                      f"{row['model_only_img_s']:.1f}", f"{row['of_model_bound']:.2f}",
                      f"{100 * row['agreement']:.1f}%", f"{row['setup_s']:.1f}")
    if skipped:
        table.caption = "skipped: " + "; ".join(skipped)
    return table
