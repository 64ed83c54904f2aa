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
    "Checkpoint, run folder or export (.ts, .onnx, .xml) [default: $RESCLI_MODEL, else the newest runs/*/best.pt]. "
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
    rescli export runs/run1 --to openvino-int8 --output model.xml   # writes model.xml + model.bin
    rescli export runs/run1 --to onnx-int8 --calibrate ./more_photos --min-agreement 0.995
    rescli predict photo.jpg --model model.xml       # works like the checkpoint
    rescli info model.xml                            # what the file holds, and how it was checked

The file carries class names, image size, mean/std and temperature (TorchScript extra file,
ONNX metadata_props or OpenVINO rt_info "rescli.json"); the batch axis is dynamic. They load
without rescli: torch.jit.load, onnxruntime (see examples/predict_onnx.py) or OpenVINO.

onnx-int8, openvino and openvino-int8 are for fast CPU inference (docs/deploy.md). int8 is
calibrated on 300 images of the checkpoint's validation split (or of --calibrate DATA_DIR).
Before the file is kept, it runs beside the checkpoint on the validation split: label
agreement, the accuracy of both and the largest score difference are printed and stored in
the file. Agreement below --min-agreement or an accuracy drop beyond --max-drop fails the
export (exit 1, nothing written). OpenVINO needs pip install 'rescli[openvino]'; ONNX needs
pip install 'rescli[onnx]'.

A TorchScript file is a program: loading it (torch.jit.load, rescli predict/evaluate/info)
runs the code inside, so open only TorchScript files you made yourself. rescli loads
TorchScript only from a file named .ts or .torchscript, ONNX only from .onnx and OpenVINO
only from .xml (with the .bin beside it), so --output must end that way; a checkpoint (.pt,
a run folder) is only ever read as data.

--to was called --format (-f) before; that spelling still works, with a warning.
"""

ModelToExport = Annotated[Path, typer.Argument(
    help="A rescli checkpoint, or a run folder (its best.pt); read as data only.")]
ExportTo = Annotated[ModelFormat, typer.Option("--to", help=(
    "torchscript (.ts), onnx (.onnx), onnx-int8 (.int8.onnx; both need pip install 'rescli[onnx]'), openvino "
    "(.xml + .bin) or openvino-int8 (.int8.xml + .bin; both need pip install 'rescli[openvino]')."))]
# The old spelling of --to: `--format` means the output's format in every other command.
ExportToDeprecated = Annotated[Optional[ModelFormat], typer.Option("--format", "-f", hidden=True)]
ExportFile = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Output file [default: MODEL with the format's suffix, e.g. best.int8.xml].")]
CheckImages = Annotated[Optional[list[str]], typer.Option("--check-images", help=(
    "Images or folders for the parity check [default: the training folder, if present]."))]
PrintFormat = Annotated[TableOrJson, typer.Option("--print", help="Result as table or json.")]
CalibrateFolder = Annotated[Optional[Path], typer.Option("--calibrate", help=(
    "int8: a folder of images to calibrate on [default: the checkpoint's validation split]."))]
CalibrationImages = Annotated[int, typer.Option(
    "--calibration-images", help="int8: how many images to calibrate on (spread over the folder or split).")]
MinAgreement = Annotated[float, typer.Option("--min-agreement", help=(
    "onnx-int8/openvino/openvino-int8: the least share of validation images on which the export must give the "
    "checkpoint's label (0..1)."))]
MaxDrop = Annotated[float, typer.Option("--max-drop", help=(
    "onnx-int8/openvino/openvino-int8: the most validation accuracy the export may lose, in percentage points."))]


def export(
    ctx: typer.Context,
    model: ModelToExport,
    to: ExportTo = ModelFormat.torchscript,
    deprecated_format: ExportToDeprecated = None,
    output: ExportFile = None,
    check_images: CheckImages = None,
    calibrate: CalibrateFolder = None,
    calibration_images: CalibrationImages = 300,
    min_agreement: MinAgreement = 0.99,
    max_drop: MaxDrop = 1.0,
    out_fmt: PrintFormat = TableOrJson.table,
) -> None:
    """Export a checkpoint to TorchScript, ONNX or OpenVINO, fp32 or int8 (labels and preprocessing inside),
    checked against the checkpoint."""
    from rescli.inference.checked_export import CHECKED_FORMATS, Calibration
    from rescli.inference.deploy_check import Limits
    from rescli.inference.export import export_model

    if deprecated_format is not None:
        to_given = getattr(ctx.get_parameter_source("to"), "name", None) == "COMMANDLINE"
        if to_given and to != deprecated_format:
            raise UsageError(f"--to {to.value} and --format {deprecated_format.value}: give --to alone")
        to = deprecated_format
    checked: dict[str, Any] = {}
    if to.value in CHECKED_FORMATS:
        if check_images:
            raise UsageError(f"--check-images is for --to torchscript and onnx; --to {to.value} is checked on the "
                             f"checkpoint's validation split (and calibrated on --calibrate DATA_DIR, if given)")
        checked = {"calibration": Calibration(folder=calibrate, count=calibration_images),
                   "limits": Limits(min_agreement=min_agreement, max_drop=max_drop)}
    else:
        _refuse_check_options(ctx, to.value)
    result = export_model(model=model, fmt=to.value, output=output, check_images=check_images, **checked)
    if out_fmt == TableOrJson.json:
        console.print_json(result)
    else:
        for line in _export_lines(result):
            console.out.print(line, markup=False)
    if "parity" in result:
        console.warn(result["parity"])
    elif "max_abs_diff_real" not in result and "deployment" not in result:
        console.warn("parity checked on random images only: the training images are gone; pass --check-images "
                     "FOLDER to check real ones")
    if deprecated_format is not None:  # said last: a failed export still ends with its one line of error
        console.warn(f"export --format is now --to (--to {to.value}); --format will go in a later version")


def _refuse_check_options(ctx: typer.Context, fmt: str) -> None:
    """The calibration and check options mean nothing to torchscript and onnx (checked by logit parity instead)."""
    for name, flag in (("calibrate", "--calibrate"), ("calibration_images", "--calibration-images"),
                       ("min_agreement", "--min-agreement"), ("max_drop", "--max-drop")):
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE":
            raise UsageError(f"{flag} is for --to onnx-int8, openvino and openvino-int8; --to {fmt} is checked by "
                             f"its logits matching the checkpoint's instead")


def _export_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"wrote {result['output']} ({result['format']}, {result['classes']} classes, {result['img_size']} px)"]
    if "weights" in result:
        lines.append(f"wrote {result['weights']} (its weights: keep it beside {Path(result['output']).name})")
    if "deployment" in result:
        return lines + _check_lines(result["deployment"])
    for key, what in (("max_abs_diff_random", "random images"),
                      ("max_abs_diff_real", f"{result.get('real_images')} real images")):
        if key in result:
            lines.append(f"max |logit difference| vs PyTorch, {what}: {result[key]:.3g}")
    return lines


def _check_lines(deployment: dict[str, Any]) -> list[str]:
    """The check an onnx-int8/openvino export passed, as export prints it (info shows the same figures)."""
    check, quantisation = deployment["check"], deployment.get("quantisation")
    lines = []
    if quantisation:
        lines.append(f"int8 calibrated on {quantisation['calibration_images']} images of "
                     f"{quantisation['calibration_source']}")
    lines.append(f"checked on {check['images']} {check['on']}:")
    lines.append(f"  label agreement with the checkpoint: {100 * check['agreement']:.2f}%"
                 + (f" of {check['agreement_of']}; identical label sets {100 * check['identical_label_sets']:.2f}%"
                    if "agreement_of" in check else ""))
    if "accuracy_export" in check:
        lines.append(f"  accuracy: checkpoint {100 * check['accuracy_checkpoint']:.2f}%, export "
                     f"{100 * check['accuracy_export']:.2f}% ({check['accuracy_drop_points']:+.2f} points lost)")
    lines.append(f"  largest score difference: {check['max_score_difference']:.4f}")
    if check.get("unreadable"):
        lines.append(f"  {check['unreadable']} image(s) could not be read and were left out")
    return lines


INFO_EPILOG = """
Examples:

    rescli info runs/run1/best.pt
    rescli info runs/run1                # a run folder: its best.pt
    rescli info model.onnx --format json | jq .classes
    rescli info model.int8.xml --format json | jq .check.agreement

info loads the file and checks what it says about itself (classes against the model's
outputs, image size, mean/std, temperature). For onnx-int8 and OpenVINO exports it also shows
how they were quantised and how they compared with the checkpoint on its validation split
(label agreement, accuracy of both, the largest score difference). A checkpoint is read as data only, whatever
it holds; a .ts/.torchscript file is a TorchScript program, which runs when it is opened,
even by info: open only your own.
"""

ModelToDescribe = Annotated[Path, typer.Argument(help="Checkpoint (.pt), run folder, or export (.ts, .onnx, .xml). "
                                                      + TRUST_NOTE)]


def info(model: ModelToDescribe, fmt: OutputFormat = TableOrJson.table) -> None:
    """Show what a checkpoint or export holds: architecture, classes, image size, metrics, versions."""
    from rescli.inference.describe import describe_model

    description = describe_model(model)
    if fmt == TableOrJson.json:
        console.print_json(description)
        return
    console.out.print(tables.model_table(description))
