"""How `rescli predict` writes its results: one writer per --format, each row written as it comes.

Rows are the library's dicts (path, label, score, topk; a multi-label model's: path, labels, scores, topk; or
path and error). Every batch is flushed as soon as it is written, so results stream downstream (`| jq`) while later
images are still being decoded.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import rescli.cli.console as console
from rescli.cli.entry import PipeClosed
from rescli.cli.options import PredictFormat
from rescli.core import events
from rescli.core.errors import UsageError
from rescli.core.fileio import json_escapes

FIELDS = ("path", "label", "score", "topk", "error")


#: A multi-label model's rows: the labels at or above their thresholds, and every label's probability.
MULTI_LABEL_FIELDS = ("path", "labels", "scores", "topk", "error")

Row = dict[str, Any]


def check_field_names(spec: str | None) -> None:
    """A usage error, before any model is loaded, for --fields that no model's rows have (choose_fields checks them
    against the model's own once it is loaded)."""
    if spec is None:
        return
    names = [f.strip() for f in spec.split(",") if f.strip()]
    known = dict.fromkeys(FIELDS + MULTI_LABEL_FIELDS)
    bad = [f for f in names if f not in known]
    if bad or not names:
        raise UsageError(f"--fields: unknown field(s) {', '.join(bad) or '(none given)'}; choose from "
                         f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise UsageError("--fields: a field is named twice")


def choose_fields(spec: str | None, *, top_k: int, fmt: PredictFormat, multi_label: bool = False) -> list[str]:
    """The columns to write: --fields as given (checked), else path, label, score (+ topk), error; multi-label:
    path, labels, scores (+ topk), error (a table for people leaves the scores out)."""
    known = MULTI_LABEL_FIELDS if multi_label else FIELDS
    if not spec:
        chosen = [*known[:3]] + (["topk"] if top_k > 1 else []) + ["error"]
        if fmt == PredictFormat.table:  # the one unbounded column goes last, so the others line up; errors follow it
            chosen = [f for f in chosen if f not in ("path", "error", "scores")] + ["path"]
        return chosen
    chosen = [f.strip() for f in spec.split(",") if f.strip()]
    bad = [f for f in chosen if f not in known]
    if bad or not chosen:
        unknown = ", ".join(bad) or "(none given)"
        model = "a multi-label model" if multi_label else "a single-label model"
        raise UsageError(f"--fields: unknown field(s) {unknown} for {model}; choose from {', '.join(known)}")
    if len(set(chosen)) != len(chosen):
        raise UsageError("--fields: a field is named twice")
    return chosen


class RowWriter:
    """Writes rows in one format to ``out``: ``start()``, then ``row()`` for each, then ``end()``."""

    def __init__(self, out: TextIO, fields: list[str]) -> None:
        self.out, self.fields = out, fields

    def start(self) -> None:
        pass

    def row(self, row: Row) -> None:
        raise NotImplementedError

    def end(self) -> None:
        pass


class TableWriter(RowWriter):
    """Aligned plain-text columns written line by line: a table for people that needs no buffering."""

    def __init__(self, out: TextIO, fields: list[str], *, classes: list[str], top_k: int) -> None:
        super().__init__(out, fields)
        label_w = max([len("label"), len("unknown")] + [len(c) for c in classes])
        k = max(1, min(top_k, len(classes)))
        self.widths = {"label": label_w, "score": 6, "topk": max(4, k * (label_w + 6) + (k - 1) * 2), "path": 4,
                       "error": 5, "labels": max(6, min(40, sum(len(c) + 1 for c in classes))),
                       "scores": max(6, len(classes) * (label_w + 7))}

    def start(self) -> None:
        self.out.write(self._join({f: f for f in self.fields}, header=True))

    def row(self, row: Row) -> None:
        if "error" in row:
            cells = dict.fromkeys(self.fields, "-")
            cells.update(path=row["path"], error=f"error: {row['error']}")
        else:
            topk = "  ".join(f"{t['label']}:{t['score']:.3f}" for t in row["topk"])
            cells = {"path": row["path"], "error": "", "topk": topk}
            if "labels" in row:  # multi-label
                cells["labels"] = " ".join(row["labels"]) or "(none)"
                cells["scores"] = "  ".join(f"{name}:{p:.3f}" for name, p in row["scores"].items())
            else:
                cells.update(label=row["label"], score=f"{row['score']:.4f}")
        self.out.write(self._join(cells))

    def _join(self, cells: dict[str, str], header: bool = False) -> str:
        parts = []
        last = len(self.fields) - 1
        for i, f in enumerate(self.fields):
            text = cells.get(f, "")
            if f == "path" and not header:
                self.widths["path"] = max(self.widths["path"], len(text))  # grows with the longest path seen
            if i == last:
                parts.append(text)
                if "error" not in self.fields and cells.get("error"):  # an error is never hidden by --fields
                    parts.append(cells["error"])
            elif f == "score":
                parts.append(text.rjust(self.widths[f]))
            else:
                parts.append(text.ljust(self.widths[f]))
        return "  ".join(parts).rstrip() + "\n"


class DelimitedWriter(RowWriter):
    """csv or tsv: a header row, then one row per image; topk (and a multi-label row's scores) as
    ``label:score;label:score``, a multi-label row's labels joined by ``label_sep``."""

    def __init__(self, out: TextIO, fields: list[str], *, delimiter: str, label_sep: str = " ") -> None:
        super().__init__(out, fields)
        self.writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
        self.label_sep = label_sep

    def start(self) -> None:
        self.writer.writerow(self.fields)

    def row(self, row: Row) -> None:
        self.writer.writerow([self.label_sep.join(row[k]) if k == "labels" and k in row else _delimited_cell(row.get(k))
                              for k in self.fields])


def _delimited_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ";".join(f"{name}:{p:.4f}" for name, p in value.items())
    if isinstance(value, list):
        return ";".join(f"{t['label']}:{t['score']:.4f}" for t in value)
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


class JsonLinesWriter(RowWriter):
    """One JSON object a line; a failed image is ``{"path", "error"}`` whatever --fields says."""

    def row(self, row: Row) -> None:
        self.out.write(self._text(row) + "\n")

    def _text(self, row: Row) -> str:
        obj = {k: row[k] for k in self.fields if k in row} if "error" not in row else {"path": row["path"],
                                                                                      "error": row["error"]}
        return json_escapes(json.dumps(obj, ensure_ascii=False))  # any file name, valid UTF-8


class JsonArrayWriter(JsonLinesWriter):
    """The same objects as jsonl, as one JSON array (still written element by element)."""

    def start(self) -> None:
        self.out.write("[")
        self.written = 0

    def row(self, row: Row) -> None:
        self.out.write(("\n  " if self.written == 0 else ",\n  ") + self._text(row))
        self.written += 1

    def end(self) -> None:
        self.out.write("\n]\n" if self.written else "]\n")


def row_writer(fmt: PredictFormat, fields: list[str], *, classes: list[str], top_k: int,
               label_sep: str = " ") -> RowWriter:
    out = sys.stdout  # looked up now: the entry point guards it for the length of the command
    if fmt == PredictFormat.table:
        return TableWriter(out, fields, classes=classes, top_k=top_k)
    if fmt in (PredictFormat.csv, PredictFormat.tsv):
        return DelimitedWriter(out, fields, delimiter="," if fmt == PredictFormat.csv else "\t", label_sep=label_sep)
    if fmt == PredictFormat.json:
        return JsonArrayWriter(out, fields)
    return JsonLinesWriter(out, fields)


def write_predictions(batches: Iterable[list[Row]], writer: RowWriter, *, quiet: bool,
                      progress: bool) -> tuple[int, int]:
    """Write each batch as it comes and flush it, then close ``batches``; returns (inputs, inputs that failed).

    Each failed input is also named on stderr; ``progress`` counts images on the status line (a terminal only).
    """
    started = time.monotonic()
    try:
        done, failed = _write_all(batches, writer, progress=progress)
    except BrokenPipeError:  # sys.stdout not guarded (called from Python, not from the rescli program)
        raise PipeClosed() from None
    finally:  # however writing ends, the stream's decode threads stop with it
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if not quiet and done:
        elapsed = time.monotonic() - started
        console.info(f"{done} input(s), {done - failed} predicted, {failed} failed in {elapsed:.1f}s "
                     f"({done / max(elapsed, 1e-9):.0f}/s)")
    return done, failed


def _write_all(batches: Iterable[list[Row]], writer: RowWriter, *, progress: bool) -> tuple[int, int]:
    done = failed = 0
    writer.start()
    for batch in batches:
        with console.status.cleared():  # stdout may be the terminal the progress line is on: rows start a line
            for row in batch:
                done += 1
                if "error" in row:
                    failed += 1
                    console.error(f"{row['path']}: {row['error']}")
                writer.row(row)
            writer.out.flush()  # a batch is visible downstream as soon as it is computed
        if progress:
            events.progress("images", done, failed=failed)
    writer.end()
    writer.out.flush()
    if progress:
        events.progress("images", done, failed=failed, finished=True)
    return done, failed

