"""Reading a label table: one row per image, from a CSV, TSV, JSON-lines or Parquet file (Parquet with pandas and
pyarrow: pip install 'rescli[tables]').

Columns are found by name (or named with --path-column / --label-column); paths are relative to the table's
folder unless absolute, and a path without an extension is looked up with the usual image extensions. A ``split``
column (train / val / test) or an ``is_valid`` column (fastai's) gives the split. Nothing here decodes a pixel or
writes anything; whether each image decodes is checked later, as for class folders (``checks``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rescli.core.errors import RescliError, UsageError
from rescli.core.fileio import shown_name
from rescli.data.formats import IMAGE_EXTENSIONS
from rescli.data.layout import SPLIT_ALIASES, TABLE_SUFFIXES

PATH_COLUMNS = ("path", "file", "filename", "image", "image_path", "fname")


LABEL_COLUMNS = ("label", "labels", "tags", "class", "category", "target")


SPLIT_COLUMN, IS_VALID_COLUMN = "split", "is_valid"


#: Tried in this order for a path given without an extension (then any other image extension, in name order).
PREFERRED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


_TRUE, _FALSE = {"1", "true", "yes", "y", "t"}, {"0", "false", "no", "n", "f", ""}


@dataclass(frozen=True)
class TableOptions:
    """How to read a label table (finetune's --path-column, --label-column, --multi-label, --label-sep)."""

    path_column: str | None = None
    label_column: str | None = None
    multi_label: bool = False
    label_sep: str = " "

    @property
    def default(self) -> bool:
        return self == TableOptions()


@dataclass(frozen=True)
class TableRow:
    line: int  # where the row is, for messages: the line of a CSV/TSV/JSON-lines file, the row of a Parquet file
    path: str  # absolute, with the extension found on disk
    labels: tuple[str, ...]  # one name (single-label), or the image's labels
    split: str | None  # train | val | test from a split or is_valid column, None without one


@dataclass
class LabelTable:
    file: Path
    rows: list[TableRow]
    path_column: str
    label_column: str
    split_column: str | None

    @property
    def folder(self) -> Path:
        return self.file.parent


def read_label_table(path: str | os.PathLike, *, options: TableOptions = TableOptions()) -> LabelTable:
    """Every row of the table at ``path``, its paths resolved and its labels split; one RescliError naming the row
    (or the column) for a row rescli cannot use."""
    file = Path(path).expanduser().resolve()
    records = _records(file)
    header = next(records, None)
    columns: list[str] = header if isinstance(header, list) else []
    path_col = _column(file, columns, options.path_column, PATH_COLUMNS, what="path", flag="--path-column")
    label_col = _column(file, columns, options.label_column, LABEL_COLUMNS, what="label", flag="--label-column")
    if path_col == label_col:
        raise UsageError(f"{file}: column {path_col!r} cannot be both the path and the label column")
    split_col = next((c for c in columns if c.lower() == SPLIT_COLUMN), None)
    valid_col = None if split_col else next((c for c in columns if c.lower() == IS_VALID_COLUMN), None)
    resolver = _PathResolver(file.parent)
    rows = []
    for line, record in records:  # after the header: (line, record) pairs
        where = f"{shown_name(str(file))}, {_row_word(file)} {line}"
        rows.append(TableRow(
            line=line,
            path=resolver.resolve(_cell(record.get(path_col), where=where, column=path_col, what="path")),
            labels=_labels(record.get(label_col), options=options, where=where, column=label_col),
            split=_split(record, split_col=split_col, valid_col=valid_col, where=where),
        ))
    if not rows:
        raise RescliError(f"{file}: the table has no rows")
    return LabelTable(file, rows, path_col, label_col, split_col or valid_col)


def _row_word(file: Path) -> str:
    return "row" if file.suffix.lower() == ".parquet" else "line"


def _records(file: Path) -> Iterator[Any]:
    """The column names first, then (line, {column: value}) for each row."""
    suffix = file.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            yield from _delimited(file, delimiter="," if suffix == ".csv" else "\t")
        elif suffix in (".jsonl", ".ndjson"):
            yield from _json_lines(file)
        elif suffix == ".parquet":
            yield from _parquet(file)
        else:
            raise UsageError(f"{file}: not a label table (expected a name ending {', '.join(TABLE_SUFFIXES)})")
    except OSError as exc:
        raise RescliError(f"{file}: cannot read the table ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise RescliError(f"{file}: not UTF-8 text (byte {exc.start}); save the table as UTF-8") from None


def _delimited(file: Path, *, delimiter: str) -> Iterator[Any]:
    with open(file, newline="", encoding="utf-8-sig") as fh:  # -sig: the byte-order mark spreadsheets write
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = [c.strip() for c in next(reader)]
        except StopIteration:
            raise RescliError(f"{file}: the table is empty (no header row)") from None
        except csv.Error as exc:
            raise RescliError(f"{file}, line 1: not a readable table ({exc})") from None
        yield header
        try:
            for cells in reader:
                if not any(c.strip() for c in cells):  # blank lines, as spreadsheets leave at the end
                    continue
                if len(cells) > len(header):
                    raise RescliError(f"{file}, line {reader.line_num}: {len(cells)} cells for {len(header)} columns "
                                      f"(a {'comma' if delimiter == ',' else 'tab'} inside a value needs quotes)")
                yield reader.line_num, dict(zip(header, cells))
        except csv.Error as exc:
            raise RescliError(f"{file}, line {reader.line_num}: not a readable table ({exc})") from None


def _json_lines(file: Path) -> Iterator[Any]:
    with open(file, encoding="utf-8-sig") as fh:
        parsed = []
        for line, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as exc:
                raise RescliError(f"{file}, line {line}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise RescliError(f"{file}, line {line}: expected one JSON object a line")
            parsed.append((line, record))
    columns = list(dict.fromkeys(k for _, record in parsed for k in record))
    yield columns
    yield from parsed


def _parquet(file: Path) -> Iterator[Any]:
    try:
        import pandas as pd
    except ImportError:
        raise RescliError(f"{file}: reading Parquet needs pandas and pyarrow: pip install 'rescli[tables]'") from None
    try:
        frame = pd.read_parquet(file)
    except ImportError:
        raise RescliError(f"{file}: reading Parquet needs pyarrow: pip install 'rescli[tables]'") from None
    except Exception as exc:  # pyarrow raises its own types for a file that is not Parquet
        raise RescliError(f"{file}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None
    yield [str(c) for c in frame.columns]
    for row, record in enumerate(frame.to_dict(orient="records"), 1):
        yield row, {str(k): v for k, v in record.items()}


def _column(file: Path, columns: list[str], chosen: str | None, names: tuple[str, ...], *, what: str,
            flag: str) -> str:
    """The column holding ``what``: ``chosen`` (from ``flag``) if given, else the first of ``names`` present (in any
    case)."""
    found = ", ".join(repr(c) for c in columns) or "none"
    if chosen is not None:
        if chosen in columns:
            return chosen
        raise UsageError(f"{file}: {flag} {chosen!r}: no such column (its columns: {found})")
    lower = {c.lower(): c for c in columns}
    for name in names:
        if name in lower:
            return lower[name]
    raise UsageError(f"{file}: no {what} column (looked for {', '.join(names)}; its columns: {found}); name it with "
                     f"{flag}")


def _present(value: Any) -> bool:
    """Whether a cell holds something (pandas gives NaN or None for an empty Parquet cell)."""
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN
        return False
    return not (isinstance(value, str) and not value.strip())


def _cell(value: Any, *, where: str, column: str, what: str) -> str:
    if not _present(value):
        raise RescliError(f"{where}: empty {what} (column {column!r}); fill it in or remove the row")
    return str(value).strip()


def _labels(value: Any, *, options: TableOptions, where: str, column: str) -> tuple[str, ...]:
    """One label, or (multi-label) the labels of the cell: split by --label-sep, or a JSON/Parquet list as it is."""
    if hasattr(value, "tolist") and not isinstance(value, str):  # a numpy array from a Parquet list column
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not options.multi_label:
            raise RescliError(f"{where}: a list of labels in column {column!r}; for several labels per image pass "
                              f"--multi-label")
        parts = [str(v).strip() for v in value if _present(v)]
    else:
        text = _cell(value, where=where, column=column, what="label")
        if not options.multi_label:
            return (text,)
        parts = text.split() if options.label_sep == " " else [p.strip() for p in text.split(options.label_sep)]
    parts = sorted({p for p in parts if p})
    if not parts:
        raise RescliError(f"{where}: empty label (column {column!r}); fill it in or remove the row")
    return tuple(parts)


def _split(record: dict[str, Any], *, split_col: str | None, valid_col: str | None, where: str) -> str | None:
    if split_col is not None:
        name = str(record.get(split_col) or "").strip().lower()
        for split, aliases in SPLIT_ALIASES.items():
            if name in aliases:
                return split
        raise RescliError(f"{where}: split {name[:40]!r} (column {split_col!r}): expected train, val, valid, "
                          f"validation or test")
    if valid_col is not None:
        value = record.get(valid_col)
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            return "val" if value else "train"
        text = str(value if _present(value) else "").strip().lower()
        if text in _TRUE or text in _FALSE:
            return "val" if text in _TRUE else "train"
        raise RescliError(f"{where}: is_valid {text[:40]!r} (column {valid_col!r}): expected true/false or 1/0")
    return None


class _PathResolver:
    """A row's path as a file on disk: relative to the table's folder unless absolute; without an extension, the one
    image file of that name found in its folder (each folder is listed once, however many rows it holds)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stems: dict[str, dict[str, str]] = {}  # folder -> stem -> file name

    def resolve(self, text: str) -> str:
        path = Path(os.path.expanduser(text))
        if not path.is_absolute():
            path = self.folder / path
        if path.suffix.lower() in IMAGE_EXTENSIONS or os.path.exists(path):
            return os.path.normpath(path)  # a missing file is named later, by the image check
        found = self._by_stem(str(path.parent)).get(path.name)
        return os.path.normpath(path.parent / found if found else path)

    def _by_stem(self, folder: str) -> dict[str, str]:
        if folder not in self._stems:
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            order = {ext: i for i, ext in enumerate(PREFERRED_EXTENSIONS)}
            images = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
            images.sort(key=lambda n: (order.get(os.path.splitext(n)[1].lower(), len(order)), n))
            stems: dict[str, str] = {}
            for name in images:
                stems.setdefault(os.path.splitext(name)[0], name)
            self._stems[folder] = stems
        return self._stems[folder]
