"""`rescli explain`, `embed`, `similar` and `label-issues`: what the model sees, which images look alike, and which
labels are probably wrong."""

import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

import rescli.cli.console as console
from rescli.cli.before_torch import threads_for_load
from rescli.cli.entry import PipeClosed
from rescli.cli.options import TRUST_NOTE, Device, InferenceBatchSize, PredictFormat, RawScores, Seed, ValSplit
from rescli.core import events
from rescli.core.errors import UsageError
from rescli.core.fileio import json_escapes, shown_name

ModelArgument = Annotated[str, typer.Argument(
    help="Checkpoint (.pt), run folder, 'latest' (the newest runs/*/best.pt) or TorchScript export (.ts); ONNX "
         "exports have no layers to reach. " + TRUST_NOTE)]
Inputs = Annotated[list[str], typer.Argument(
    help="Image files, folders (recursive), quoted globs, '-' for paths on stdin, @LIST for a file of paths.")]
RowsFormat = Annotated[PredictFormat, typer.Option("--format", "-f", help="table (people), jsonl, json, csv or tsv.")]
NullSeparated = Annotated[bool, typer.Option(
    "-0", "--null", help="Paths on stdin / in list files are NUL-separated (find -print0).")]
DecodeThreads = Annotated[int, typer.Option("--workers", help="Decode threads.")]

EXPLAIN_EPILOG = """
Examples:

    rescli explain runs/run1 photo.jpg                    # writes runs/run1/explain/photo.<label>.png
    rescli explain runs/run1 ./val --output heatmaps --format jsonl | jq -c '[.path, .peak_xy]'
    rescli explain runs/run1 cat.jpg --label dog          # why "dog"?
    rescli explain model.ts 'shots/*.png' --method layercam

Heatmaps are taken at the last residual stage (layer4; layer3 of CIFAR-style nets), or at the
deepest stage at least 4 cells wide where small images leave the last one 1x1. peak_xy is
the heatmap's maximum in the original picture's pixels, after EXIF rotation. Exit status: 0 all
inputs explained, 1 some input failed (its row has an error field), 2 usage error.
"""

Method = Annotated[str, typer.Option("--method", help=(
    "gradcam (default), gradcam++ or layercam: how the last stage's maps are weighted by the label's gradient."))]
ExplainLabel = Annotated[Optional[list[str]], typer.Option(
    "--label", help="Explain this class instead of the predicted one (repeat for several maps per image).")]
CamLayer = Annotated[Optional[str], typer.Option("--layer", help=(
    "The residual stage to explain, layer1..N [default: the last, or the deepest one at least 4 cells wide]."))]
OverlayFolder = Annotated[Optional[Path], typer.Option(
    "--output", "-o", help="Folder for the overlay PNGs [default: the model's folder/explain].")]


def explain(
    model: ModelArgument,
    inputs: Inputs,
    output: OverlayFolder = None,
    method: Method = "gradcam",
    label: ExplainLabel = None,
    layer: CamLayer = None,
    fmt: RowsFormat = PredictFormat.table,
    raw_scores: RawScores = False,
    null: NullSeparated = False,
    batch_size: InferenceBatchSize = 16,
    workers: DecodeThreads = 2,
    device: Device = "auto",
) -> None:
    """Write a heatmap overlay PNG per input: where the model looked for its label (or --label's)."""
    threads_for_load()
    from rescli.inference.inputs import check_inputs, iter_input_paths
    from rescli.inference.lookup import resolve_model_path
    from rescli.insight.cam import check_method
    from rescli.insight.explain import check_output_dir, explain_batches
    from rescli.insight.network import choose_cam_stage, open_network

    check_method(method)
    check_inputs(inputs)
    path, _ = resolve_model_path(model)
    net = open_network(path, device=device, what="explain")
    net.cam_stage = choose_cam_stage(net, layer)
    out_dir = check_output_dir(output if output is not None else path.parent / "explain", inputs)
    console.info(f"model: {path} ({net.kind}, {len(net.classes)} classes); {method} at {net.cam_stage}; overlays in "
                 f"{out_dir}")
    batches = explain_batches(iter_input_paths(inputs, null_separated=null), net=net, output_dir=out_dir,
                              method=method, labels=label, raw_scores=raw_scores, batch_size=batch_size,
                              workers=workers)
    fields = ["path", "label", "score", "peak_xy", "overlay"]
    _finish(write_rows(batches, fmt=fmt, fields=fields, table_last="overlay", key="path"))


EMBED_EPILOG = """
Examples:

    rescli embed runs/run1 ./images --output images.npy     # + images.paths.txt
    rescli embed runs/run1 ./images -o images.parquet       # needs pip install 'rescli[parquet]'
    find shots -name '*.jpg' | rescli embed runs/run1 - -o shots.jsonl
    rescli similar runs/run1 query.jpg --in images.npy      # reuses the vectors

The vectors are the pooled penultimate features (what the fc layer reads), L2-normalised
unless --raw; FILE.meta.json beside the file names the model that made them.
"""

EmbeddingsOutput = Annotated[Path, typer.Option(
    "--output", "-o", help=".npy (+ <stem>.paths.txt), .parquet or .jsonl: the format follows the suffix.")]
Raw = Annotated[bool, typer.Option("--raw", help="The features as they are, not L2-normalised.")]


def embed(
    model: ModelArgument,
    inputs: Inputs,
    output: EmbeddingsOutput,
    raw: Raw = False,
    null: NullSeparated = False,
    batch_size: InferenceBatchSize = 32,
    workers: DecodeThreads = 2,
    device: Device = "auto",
) -> None:
    """Write every input's embedding (pooled penultimate features) to FILE, streaming in constant memory."""
    threads_for_load()
    from rescli.inference.inputs import check_inputs, iter_input_paths
    from rescli.inference.lookup import resolve_model_path
    from rescli.insight.embed import embed_batches
    from rescli.insight.embeddings_file import EmbeddingsWriter, check_embeddings_path, embeddings_meta
    from rescli.insight.network import open_network

    check_inputs(inputs)
    target = check_embeddings_path(output)
    path, _ = resolve_model_path(model)
    net = open_network(path, device=device, what="embed")
    failed = 0
    meta = embeddings_meta(model=str(path), fingerprint=net.fingerprint, arch=net.meta.get("arch"), normalised=not raw)
    with EmbeddingsWriter(target, meta) as writer:
        for batch in embed_batches(iter_input_paths(inputs, null_separated=null), net=net, raw=raw,
                                   batch_size=batch_size, workers=workers):
            for row in batch.errors + writer.add(batch.paths, batch.vectors):
                failed += 1
                console.error(f"{shown_name(row['path'])}: {row['error']}")
            events.progress("images embedded", writer.rows, failed=failed)
    events.progress("images embedded", writer.rows, failed=failed, finished=True)
    console.out.print(f"wrote {target} ({writer.rows} vectors of {writer.dim or 0} dimensions"
                      f"{', raw' if raw else ''}); {failed} input(s) failed", markup=False)
    _finish((writer.rows + failed, failed))


SIMILAR_EPILOG = """
Examples:

    rescli similar runs/run1 query.jpg --in ./images -k 3
    rescli embed runs/run1 ./images -o images.npy && rescli similar runs/run1 q1.jpg q2.jpg --in images.npy
    rescli similar runs/run1 'queries/*.png' --in images.parquet --format csv > neighbours.csv

Similarity is the cosine of the two embeddings (1 = the same direction). A query found in the
collection is not listed as its own neighbour. With faiss installed (pip install 'rescli[faiss]'),
collections of 1,000+ vectors are searched by faiss, which is faster there (docs/insight.md).
"""

Collection = Annotated[str, typer.Option(
    "--in", help="A folder of images (embedded now) or an embeddings file from rescli embed (read as it is).")]
Neighbours = Annotated[int, typer.Option("-k", "--top-k", help="How many neighbours per query.")]


def similar(
    model: ModelArgument,
    queries: Inputs,
    collection: Collection,
    k: Neighbours = 5,
    fmt: RowsFormat = PredictFormat.table,
    null: NullSeparated = False,
    batch_size: InferenceBatchSize = 32,
    workers: DecodeThreads = 2,
    device: Device = "auto",
) -> None:
    """The k most similar images of each query: query, rank, path, similarity."""
    threads_for_load()
    from rescli.inference.inputs import check_inputs, iter_input_paths
    from rescli.inference.lookup import resolve_model_path
    from rescli.insight.network import open_network
    from rescli.insight.similar import VectorIndex, load_collection, similar_batches

    if k < 1:
        raise UsageError("-k must be at least 1")
    check_inputs(queries)
    path, _ = resolve_model_path(model)
    net = open_network(path, device=device, what="similar")
    paths, vectors = load_collection(collection, net=net, batch_size=batch_size, workers=workers)
    index = VectorIndex(vectors)
    console.info(f"{len(paths)} images to compare with ({index.backend} index)")
    batches = similar_batches(iter_input_paths(queries, null_separated=null), net=net, paths=paths, index=index, k=k,
                              batch_size=batch_size, workers=workers)
    fields = ["query", "rank", "similarity", "path"]
    _finish(write_rows(batches, fmt=fmt, fields=fields, table_last="path", key="query"))


LABEL_ISSUES_EPILOG = """
Examples:

    rescli label-issues ./images --model runs/run1          # the backbone of run1
    rescli label-issues ./images --model runs/run1 --format csv > suspects.csv
    rescli label-issues labels.csv --model runs/run1 --top 20

Every image is judged by a head that never saw it: logistic regression on the backbone's
features, cross-validated in 5 folds, then confident learning (docs/insight.md). Without
--model the backbone is torchvision's ImageNet ResNet-50 (downloaded once), which never saw
your images; a --model trained on this folder has, so its features may have learnt a wrong
label by heart: a backbone trained elsewhere, or a short run, judges more fairly.
"""

IssuesModel = Annotated[Optional[str], typer.Option("--model", "-m", help=(
    "Whose backbone computes the features [default: ImageNet ResNet-50]. " + TRUST_NOTE))]
Top = Annotated[Optional[int], typer.Option("--top", help="At most this many rows.")]
Everything = Annotated[bool, typer.Option("--all", help="Rank every image, not only the flagged ones.")]
Folds = Annotated[int, typer.Option("--folds", help="Cross-validation folds (fewer if a class is smaller).")]


def label_issues(
    data_dir: Annotated[str, typer.Argument(help="Class folders (or split folders), or a label table.")],
    model: IssuesModel = None,
    top: Top = None,
    everything: Everything = False,
    folds: Folds = 5,
    fmt: RowsFormat = PredictFormat.table,
    val_split: ValSplit = 0.2,
    seed: Seed = 0,
    batch_size: InferenceBatchSize = 32,
    workers: DecodeThreads = 2,
    device: Device = "auto",
) -> None:
    """List images whose given label is probably wrong, most suspect first: path, given, suggested, score."""
    threads_for_load()
    from rescli.insight.label_issues import find_label_issues
    from rescli.insight.network import imagenet_network, open_network

    if folds < 2:
        raise UsageError("--folds must be at least 2")
    if top is not None and top < 1:
        raise UsageError("--top must be at least 1")
    net = open_network(model, device=device, what="label-issues") if model else imagenet_network(device=device)
    result = find_label_issues(data_dir, net=net, val_split=val_split, seed=seed, folds=folds, top=top,
                               everything=everything, batch_size=batch_size, workers=workers)
    console.info(f"{result['flagged']} of {result['judged']} images flagged (out-of-sample, {net.source})")
    write_rows([result["rows"]], fmt=fmt, fields=["score", "given", "suggested", "path"], table_last="path",
               key="path")


# --- rows on stdout -------------------------------------------------------------------------------------------------


def write_rows(batches: Iterable[list[dict[str, Any]]], *, fmt: PredictFormat, fields: list[str], table_last: str,
               key: str) -> tuple[int, int]:
    """Each batch's rows on stdout as they come, flushed; an error row is (key, error) and is named on stderr.
    Returns (inputs, inputs that failed)."""
    out = sys.stdout
    shown = [f for f in fields if f != table_last] + [table_last] if fmt == PredictFormat.table else fields
    delimited = csv.writer(out, delimiter="\t" if fmt == PredictFormat.tsv else ",", lineterminator="\n")
    rows = failed = 0
    keys: set[str] = set()
    try:
        if fmt in (PredictFormat.csv, PredictFormat.tsv, PredictFormat.table):
            _header(out, delimited, fmt, shown)
        out.write("[" if fmt == PredictFormat.json else "")
        for batch in batches:
            for row in batch:
                if "error" in row:
                    failed += 1
                    console.error(f"{shown_name(str(row[key]))}: {row['error']}")
                keys.add(str(row.get(key)))
                _row(out, delimited, fmt, shown, row, first=rows == 0)
                rows += 1
            out.flush()
        out.write(("\n]\n" if rows else "]\n") if fmt == PredictFormat.json else "")
        out.flush()
    except BrokenPipeError:
        raise PipeClosed() from None
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return len(keys), failed


def _header(out: Any, delimited: Any, fmt: PredictFormat, fields: list[str]) -> None:
    if fmt == PredictFormat.table:
        out.write("  ".join(fields) + "\n")
    else:
        delimited.writerow([*fields, "error"])


def _row(out: Any, delimited: Any, fmt: PredictFormat, fields: list[str], row: dict[str, Any], *, first: bool) -> None:
    if fmt in (PredictFormat.jsonl, PredictFormat.json):
        obj = row if "error" in row else {f: row[f] for f in fields if f in row}
        text = json_escapes(json.dumps(obj, ensure_ascii=False))
        out.write(text + "\n" if fmt == PredictFormat.jsonl else ("\n  " if first else ",\n  ") + text)
    elif fmt == PredictFormat.table:
        cells = [_cell(row.get(f), table=True) for f in fields]
        if "error" in row:
            cells = [_cell(row.get(f), table=True) if f in row else "-" for f in fields] + [f"error: {row['error']}"]
        out.write("  ".join(cells) + "\n")
    else:
        delimited.writerow([_cell(row.get(f), table=False) for f in fields] + [row.get("error", "")])


def _cell(value: Any, *, table: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if table else f"{value:.6f}"
    if isinstance(value, list):
        return "{},{}".format(*value) if len(value) == 2 else " ".join(map(str, value))
    return shown_name(str(value)) if table else str(value)


def _finish(counts: tuple[int, int]) -> None:
    done, failed = counts
    if done == 0:
        console.warn("no input paths were given on stdin or in the list files")
    if failed:
        raise typer.Exit(1)
