"""`rescli predict`, `rescli export` and `rescli info`: using a trained model, moving it, and looking inside it."""

import sys
import warnings
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
    JpegDecoder,
    ModelFormat,
    OutputFormat,
    Precision,
    PredictFormat,
    RawScores,
    TableOrJson,
)
from rescli.cli.predict_output import (
    FIELDS,
    MULTI_LABEL_FIELDS,
    check_field_names,
    choose_fields,
    row_writer,
    write_predictions,
)
from rescli.core.cpus import let_idle_threads_sleep
from rescli.core.errors import UsageError

PREDICT_EPILOG = """
Examples:

    rescli predict photo.jpg                          # uses the newest runs/*/best.pt
    rescli predict ./new_photos --model runs/run2/best.pt --top-k 3
    find shots -name '*.jpg' | rescli predict - --format jsonl | jq -r '.label'
    find shots -name '*.jpg' -print0 | rescli predict -0 - --format csv > labels.csv
    rescli predict 'shots/**/*.png' @more_paths.txt --format tsv --fields path,label
    rescli predict ./inbox --model model.onnx --format jsonl | jq -r 'select(.error) | .path'
    rescli predict ./tiles --model runs/run4 --format jsonl | jq -c '.labels'   # a multi-label model
    rescli predict ./tiles --model runs/run4 --format csv --label-sep ';' --threshold 0.3

A multi-label model's rows hold labels (those at or above their thresholds, tuned on the
validation split; possibly none) and scores (every label's probability) instead of label and
score; csv/tsv join the labels with --label-sep.

Exit status: 0 all inputs labelled, 1 some input failed (its row has an error field), 2 usage error.
"""

Inputs = Annotated[list[str], typer.Argument(
    help="Image files, folders (recursive), quoted globs, '-' for paths on stdin, @LIST for a file of paths.")]
PredictModel = Annotated[Optional[str], typer.Option("--model", "-m", help=(
    "Checkpoint, run folder or export (.ts, .onnx) [default: $RESCLI_MODEL, else the newest runs/*/best.pt]. "
    + TRUST_NOTE))]
TopK = Annotated[int, typer.Option("--top-k", "-k", help="How many labels to report per image (the topk field).")]
PredictFormatOption = Annotated[PredictFormat, typer.Option(
    "--format", "-f", help="table (people), jsonl, json, csv or tsv.")]
Fields = Annotated[Optional[str], typer.Option("--fields", help=(
    f"Comma-separated columns, in order: {','.join(FIELDS)}; a multi-label model's: {','.join(MULTI_LABEL_FIELDS)}."))]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help=(
    "Label 'unknown' when the top score is below this (0..1). Multi-label: one threshold for every label, instead "
    "of the tuned ones."))]
PredictLabelSep = Annotated[Optional[str], typer.Option("--label-sep", help=(
    "csv/tsv of a multi-label model: what joins the labels of a row [default: the model's training table's "
    "separator, else a space]."))]
NullSeparated = Annotated[bool, typer.Option(
    "-0", "--null", help="Paths on stdin / in list files are NUL-separated (find -print0).")]
DecodeThreads = Annotated[int, typer.Option("--workers", help="Decode threads.")]
JpegDecoderOption = Annotated[JpegDecoder, typer.Option("--jpeg-decoder", help=(
    "auto: torchvision (nvJPEG) on the model's GPU when it can, else Pillow; pillow; torchvision: on the model's "
    "device, GPU or CPU. Other formats always go through Pillow."))]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr except errors.")]
NoProgress = Annotated[bool, typer.Option(
    "--no-progress", help="No progress counter on stderr (it only shows when stderr is a terminal).")]


def predict(
    inputs: Inputs,
    model: PredictModel = None,
    top_k: TopK = 1,
    fmt: PredictFormatOption = PredictFormat.table,
    fields: Fields = None,
    threshold: Threshold = None,
    raw_scores: RawScores = False,
    null: NullSeparated = False,
    batch_size: InferenceBatchSize = 32,
    workers: DecodeThreads = 2,
    device: Device = "auto",
    precision: Precision = "auto",
    compile: Compile = False,
    jpeg_decoder: JpegDecoderOption = JpegDecoder.auto,
    label_sep: PredictLabelSep = None,
    quiet: Quiet = False,
    no_progress: NoProgress = False,
) -> None:
    """Label images with a trained model; results stream to stdout in input order, batch by batch."""
    threads_for_load()
    let_idle_threads_sleep()
    from rescli.inference.inputs import check_inputs, iter_input_paths
    from rescli.inference.load import load_predictor
    from rescli.inference.lookup import resolve_model_path
    from rescli.inference.stream import predict_batches

    if quiet:
        warnings.simplefilter("ignore")  # library warnings are chatter too
    check_field_names(fields)
    _check_predict_numbers(top_k=top_k, batch_size=batch_size, threshold=threshold)
    check_inputs(inputs)
    path, how = resolve_model_path(model)
    predictor = load_predictor(path, device=device, precision=precision, compile=compile)
    multi_label = predictor.task.name == "multi-label"
    chosen = choose_fields(fields, top_k=top_k, fmt=fmt, multi_label=multi_label)
    jpeg_device = _jpeg_device(jpeg_decoder, predictor)
    if not quiet:
        kind = "labels, multi-label" if multi_label else "classes"
        console.info(f"model: {path} ({how}; {predictor.kind}, {len(predictor.classes)} {kind})")
        if "-" in inputs and sys.stdin.isatty():
            console.info("reading image paths from the terminal, one per line; end with Ctrl-D")
    batches = predict_batches(
        iter_input_paths(inputs, null_separated=null), predictor=predictor, batch_size=batch_size, workers=workers,
        top_k=top_k, raw_scores=raw_scores, threshold=threshold, jpeg_device=jpeg_device,
    )
    sep = label_sep or predictor.meta.get("settings", {}).get("label_sep") or " "
    writer = row_writer(fmt, chosen, classes=predictor.classes, top_k=top_k, label_sep=sep)
    done, failed = write_predictions(batches, writer, quiet=quiet, progress=not (quiet or no_progress))
    if done == 0 and not quiet:
        console.warn("no input paths were given on stdin or in the list files")
    if failed:
        raise typer.Exit(1)


def _check_predict_numbers(*, top_k: int, batch_size: int, threshold: Optional[float]) -> None:
    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError("--threshold is a probability: give a number between 0 and 1")


def _jpeg_device(choice: JpegDecoder, predictor: Any) -> Any:
    """Where predict_batches decodes JPEGs: None (Pillow), "auto", or the model's own device (torchvision)."""
    from rescli.inference.jpeg import jpeg_decode_works

    if choice == JpegDecoder.pillow:
        return None
    if choice == JpegDecoder.auto:
        return "auto"
    if predictor.device is None:
        raise UsageError(f"--jpeg-decoder torchvision: not for {predictor.kind} models (they take Pillow's images); "
                         "use auto or pillow")
    if not jpeg_decode_works(predictor.device):
        raise UsageError(f"--jpeg-decoder torchvision: this torchvision cannot decode JPEGs on {predictor.device}; "
                         "use auto or pillow")
    return predictor.device


EXPORT_EPILOG = """
Examples:

    rescli export runs/run1/best.pt --to torchscript --output model.ts
    rescli export runs/run1 --to onnx --output model.onnx --check-images ./images/val
    rescli predict photo.jpg --model model.onnx      # works like the checkpoint
    rescli info model.onnx                           # what the file holds

The file carries class names, image size, mean/std and temperature (TorchScript extra file
or ONNX metadata_props "rescli.json"); the ONNX batch axis is dynamic. Both load without
rescli: torch.jit.load, or onnxruntime (see examples/predict_onnx.py).

A TorchScript file is a program: loading it (torch.jit.load, rescli predict/evaluate/info)
runs the code inside, so open only TorchScript files you made yourself. rescli loads
TorchScript only from a file named .ts or .torchscript, and ONNX only from .onnx, so
--output must end that way; a checkpoint (.pt, a run folder) is only ever read as data.

--to was called --format (-f) before; that spelling still works, with a warning.
"""

ModelToExport = Annotated[Path, typer.Argument(
    help="A rescli checkpoint, or a run folder (its best.pt); read as data only.")]
ExportTo = Annotated[ModelFormat, typer.Option(
    "--to", help="torchscript (.ts) or onnx (.onnx; needs pip install 'rescli[onnx]').")]
# The old spelling of --to: `--format` means the output's format in every other command.
ExportToDeprecated = Annotated[Optional[ModelFormat], typer.Option("--format", "-f", hidden=True)]
ExportFile = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Output file [default: MODEL with .ts/.onnx].")]
CheckImages = Annotated[Optional[list[str]], typer.Option("--check-images", help=(
    "Images or folders for the parity check [default: the training folder, if present]."))]
PrintFormat = Annotated[TableOrJson, typer.Option("--print", help="Result as table or json.")]


def export(
    ctx: typer.Context,
    model: ModelToExport,
    to: ExportTo = ModelFormat.torchscript,
    deprecated_format: ExportToDeprecated = None,
    output: ExportFile = None,
    check_images: CheckImages = None,
    out_fmt: PrintFormat = TableOrJson.table,
) -> None:
    """Export a checkpoint to TorchScript or ONNX (labels and preprocessing inside), checked against PyTorch."""
    from rescli.inference.export import export_model

    if deprecated_format is not None:
        to_given = getattr(ctx.get_parameter_source("to"), "name", None) == "COMMANDLINE"
        if to_given and to != deprecated_format:
            raise UsageError(f"--to {to.value} and --format {deprecated_format.value}: give --to alone")
        to = deprecated_format
    result = export_model(model=model, fmt=to.value, output=output, check_images=check_images)
    if out_fmt == TableOrJson.json:
        console.print_json(result)
    else:
        for line in _export_lines(result):
            console.out.print(line, markup=False)
    if "parity" in result:
        console.warn(result["parity"])
    elif "max_abs_diff_real" not in result:
        console.warn("parity checked on random images only: the training folder is gone; pass --check-images "
                     "FOLDER to check real ones")
    if deprecated_format is not None:  # said last: a failed export still ends with its one line of error
        console.warn(f"export --format is now --to (--to {to.value}); --format will go in a later version")


def _export_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"wrote {result['output']} ({result['format']}, {result['classes']} classes, {result['img_size']} px)"]
    for key, what in (("max_abs_diff_random", "random images"),
                      ("max_abs_diff_real", f"{result.get('real_images')} real images")):
        if key in result:
            lines.append(f"max |logit difference| vs PyTorch, {what}: {result[key]:.3g}")
    return lines


INFO_EPILOG = """
Examples:

    rescli info runs/run1/best.pt
    rescli info runs/run1                # a run folder: its best.pt
    rescli info model.onnx --format json | jq .classes

info loads the file and checks what it says about itself (classes against the model's
outputs, image size, mean/std, temperature). A checkpoint is read as data only, whatever
it holds; a .ts/.torchscript file is a TorchScript program, which runs when it is opened,
even by info: open only your own.
"""

ModelToDescribe = Annotated[Path, typer.Argument(help="Checkpoint (.pt), run folder, or export (.ts, .onnx). "
                                                      + TRUST_NOTE)]


def info(model: ModelToDescribe, fmt: OutputFormat = TableOrJson.table) -> None:
    """Show what a checkpoint or export holds: architecture, classes, image size, metrics, versions."""
    from rescli.inference.describe import describe_model

    description = describe_model(model)
    if fmt == TableOrJson.json:
        console.print_json(description)
        return
    console.out.print(tables.model_table(description))
