"""The options several commands share, declared once: one spelling, one help text, wherever they appear.

Each is an ``Annotated`` type; a command gives only its default (``device: Device = "auto"``). Options that
mean something different in one command (predict's decode threads, degradation's recipe) are declared
there, under their own name, so that a shared help text never has to hedge.

No ``from __future__ import annotations`` here or in the command modules: Typer reads these annotations at
run time, so they are written in a form that Python 3.9 can evaluate (``Optional[int]``, not ``int | None``).
"""

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


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


class ModelFormat(str, Enum):
    """What `rescli export --to` writes."""

    torchscript = "torchscript"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"
    openvino = "openvino"
    openvino_int8 = "openvino-int8"


# --- what a command reads -------------------------------------------------------------------------------------------

DATA_DIR_HELP = ("Folder with one sub-folder per class, train/ + val/ (+ test/) split folders, or a label table "
                 "(.csv, .tsv, .jsonl, .parquet: one row per image).")
DataDir = Annotated[Path, typer.Argument(help=DATA_DIR_HELP)]

# --- how a label table is read (finetune, lr-find, dataset; evaluate and predict take the model's) ------------------

MultiLabel = Annotated[bool, typer.Option("--multi-label", help=(
    "A label table whose rows list several labels per image (split by --label-sep): one sigmoid output per label, "
    "binary cross-entropy, a threshold per label tuned on the validation split."))]
LabelSep = Annotated[str, typer.Option("--label-sep", help=(
    "What separates the labels of a row in a multi-label table (a space: any run of whitespace)."))]
PathColumn = Annotated[Optional[str], typer.Option("--path-column", help=(
    "A label table's column of image paths [default: the first of path, file, filename, image, image_path, "
    "fname]."))]
LabelColumn = Annotated[Optional[str], typer.Option("--label-column", help=(
    "A label table's column of labels [default: the first of label, labels, tags, class, category, target]."))]

# A checkpoint is plain data; TorchScript is code: every command that opens models says so where it asks for one.
TRUST_NOTE = (
    "A checkpoint is read as data only; a .ts (TorchScript) file is a program that runs when opened: use only "
    "your own."
)

# --- the model and the training recipe (finetune, lr-find) ----------------------------------------------------------

Depth = Annotated[Optional[int], typer.Option(
    "--depth", help="torchvision ResNet depth: 18, 34, 50, 101 or 152 [default: 18].")]
Arch = Annotated[Optional[str], typer.Option(
    "--arch", help="Architecture by name (overrides --depth), e.g. resnext50_32x4d, resnet20, plain56.")]
Shortcut = Annotated[Optional[str], typer.Option("--shortcut", help=(
    "CIFAR-style nets only: A (identity+zero-pad), B (projection when shape changes), C (projection everywhere)."))]
Weights = Annotated[str, typer.Option(
    "--weights", help="imagenet, none, or PATH to a torchvision/timm state_dict or a rescli checkpoint.")]
Strategy = Annotated[str, typer.Option("--strategy", help=(
    "head (backbone frozen), full, gradual (head first, then all with lower LRs for early layers); "
    "auto = gradual when pretrained, else full."))]
RecipeBatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per step.")]
TrainBatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", help="Images per step [default: 32; 64 for images under 64 px when the training split has "
    "2,000 or more]; with several processes, the global batch.")]
ImgSize = Annotated[int, typer.Option("--img-size", help="Square input size in pixels.")]
WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", help="AdamW weight decay (not applied to norms and biases).")]
LabelSmoothing = Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the training loss.")]
Augment = Annotated[str, typer.Option("--augment", help=(
    "none | light (crops, flips) | strong (+ TrivialAugment). Short runs learn faster without; use light/strong "
    "for long runs (20+ epochs) or when validation loss rises while training loss falls."))]
ValSplit = Annotated[float, typer.Option(
    "--val-split", help="Fraction held out for validation when DATA_DIR has no val/ folder.")]
Seed = Annotated[int, typer.Option(
    "--seed", help="Seed for the validation split and, when training, the data order and initialisation.")]

# --- where and how the model runs (every command that runs one) -----------------------------------------------------

InferenceBatchSize = Annotated[int, typer.Option(
    "--batch-size", "-b", help="Images per model call (predict writes its results after each).")]
Workers = Annotated[Optional[int], typer.Option("--workers", help=(
    "Decode worker processes; 0 decodes in the main process [default: depends on the machine]."))]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option("--precision", help=(
    "auto, fp32, bf16 or fp16 (auto: bf16 on CPUs with AMX/AVX512-BF16 and GPUs that have it, fp16 on older "
    "GPUs)."))]
Compile = Annotated[bool, typer.Option("--compile", help=(
    "torch.compile the model first: a slower start, then faster inference on a CPU, worth it from a few thousand "
    "images (figures: docs/performance.md). Checkpoints only."))]
RawScores = Annotated[bool, typer.Option(
    "--raw-scores", help="Softmax of raw logits (skip the stored temperature calibration).")]

# --- what a command prints ------------------------------------------------------------------------------------------

OutputFormat = Annotated[TableOrJson, typer.Option(
    "--format", help="Results on stdout: table for people, json for programs.")]
