"""One self-contained HTML report for a rescli run folder.

Reads ``run.json``, ``metrics.json``, ``history.csv`` and the PNG figures that exist, and writes a single HTML file:
images embedded as base64 data URIs, inline CSS, no scripts, no external resources. Anything missing (other than
``metrics.json``) makes its section say "not available" instead of failing. Every string from the run is escaped.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from rescli.core.errors import RescliError
from rescli.core.fileio import atomic_write_text
from rescli.data.tasks import MULTI_LABEL
from rescli.evaluation.confusion import confusion_subset, most_confused
from rescli.evaluation.html_blocks import card, document, escape, kv_table, not_available, number, png_img
from rescli.evaluation.html_multilabel import (
    calibration_table,
    confusion_counts_table,
    headline_cards,
    per_label_table,
    worst_rows_table,
)
from rescli.insight.reports import label_issues_html

FIGURES = {
    "curves": "curves.png",
    "confusion": "confusion_matrix.png",
    "top_losses": "top_losses.png",
    "reliability": "reliability.png",
    "lr_find": "lr_find.png",
    "pr_curves": "pr_curves.png",
}


#: Above this many classes the confusion-matrix table shows the same subset as the figure.
MAX_TABLE_CLASSES = 40


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _read_history(path: Path) -> list[dict] | None:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return None


def _figure(run_dir: Path, key: str, alt: str) -> str:
    tag = png_img(run_dir / FIGURES[key], alt)
    return tag if tag is not None else not_available(f"Figure not available ({FIGURES[key]} missing).")


def _settings_section(run: dict | None) -> str:
    if not isinstance(run, dict):
        return not_available("Settings not available (run.json missing or unreadable).")
    parts = []
    settings = run.get("settings")
    if isinstance(settings, dict) and settings:
        parts.append(kv_table(settings))
    else:
        parts.append(not_available("No settings recorded."))
    others = {k: v for k, v in run.items() if k not in ("settings", "versions") and not isinstance(v, (dict, list))}
    if others:
        parts.append("<h3>Run</h3>" + kv_table(others))
    versions = run.get("versions")
    if isinstance(versions, dict) and versions:
        parts.append("<h3>Versions</h3>" + kv_table(versions))
    return "".join(parts)


def _history_table(history: list[dict]) -> str:
    columns: list[str] = []
    for row in history:
        for key in row:
            if key is not None and key not in columns:
                columns.append(key)
    head = "".join(f'<th class="num">{escape(c)}</th>' for c in columns)
    body = ["<tr>" + "".join(f'<td class="num">{_history_cell(c, row.get(c))}</td>' for c in columns) + "</tr>"
            for row in history]
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _history_cell(column: str, raw: Any) -> str:
    try:
        f = float(raw)
    except (TypeError, ValueError):
        return escape(raw)
    return number(int(f) if column == "epoch" and f.is_integer() else f, 6 if column == "lr" else 4)


def _training_section(run_dir: Path, history: list[dict] | None) -> str:
    parts = [_figure(run_dir, "curves", "training curves")]
    if history:
        parts.append(_history_table(history))
    else:
        parts.append(not_available("History not available (history.csv missing or empty)."))
    lr_tag = png_img(run_dir / FIGURES["lr_find"], "learning-rate finder")
    if lr_tag:
        parts.append("<h3>Learning-rate finder</h3>" + lr_tag)
    return "".join(parts)


_HEADLINE = [
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("macro_f1", "Macro F1"),
    ("weighted_f1", "Weighted F1"),
    ("macro_precision", "Macro precision"),
    ("macro_recall", "Macro recall"),
    ("roc_auc_ovr", "ROC AUC (OvR)"),
    ("ece", "ECE"),
]


def _top_k_order(item: tuple[Any, Any]) -> tuple[int, int | str]:
    try:
        return (0, int(item[0]))
    except (TypeError, ValueError):
        return (1, str(item[0]))


def _metrics_section(metrics: dict) -> str:
    cards = [card(name, metrics[key]) for key, name in _HEADLINE if key in metrics and metrics[key] is not None]
    top_k = metrics.get("top_k_accuracy")
    if isinstance(top_k, dict):
        cards += [card(f"Top-{k} accuracy", v) for k, v in sorted(top_k.items(), key=_top_k_order)]
    if not cards:
        return not_available("No headline metrics recorded.")
    return '<div class="cards">' + "".join(cards) + "</div>"


def _per_class_section(metrics: dict) -> str:
    per_class = metrics.get("per_class")
    if not isinstance(per_class, dict) or not per_class:
        return not_available("Per-class metrics not available.")
    order = [str(x) for x in metrics.get("labels") or [] if str(x) in per_class]
    order += [k for k in per_class if k not in order]
    rows = []
    for name in order:
        row = per_class.get(name) or {}
        f1 = row.get("f1")
        low = isinstance(f1, (int, float)) and f1 < 0.5
        row_class = ' class="low"' if low else ""
        rows.append(
            f'<tr{row_class}><td>{escape(name)}</td>'
            f'<td class="num">{number(row.get("precision"))}</td><td class="num">{number(row.get("recall"))}</td>'
            f'<td class="num">{number(row.get("f1"))}</td><td class="num">{number(row.get("support"))}</td></tr>'
        )
    head = ('<tr><th>class</th><th class="num">precision</th><th class="num">recall</th>'
            '<th class="num">F1</th><th class="num">support</th></tr>')
    return (f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>'
            '<p class="note">Rows with F1 below 0.5 are shaded.</p>')


def _cm_table(metrics: dict) -> str:
    cm = metrics.get("confusion_matrix")
    labels = metrics.get("labels")
    if not isinstance(cm, list) or not cm:
        return not_available("Confusion-matrix numbers not available.")
    n = len(cm)
    if not isinstance(labels, list) or len(labels) != n:
        labels = [str(i) for i in range(n)]
    try:
        rows = [[float(v) for v in row] for row in cm]
        if any(len(r) != n for r in rows):
            raise ValueError
    except (TypeError, ValueError):
        return not_available("Confusion-matrix numbers are malformed.")
    indices = list(range(n))
    note = ""
    if n > MAX_TABLE_CLASSES:
        _, _, indices = confusion_subset(np.asarray(rows), [str(x) for x in labels], MAX_TABLE_CLASSES)
        note = (f'<p class="note">{n} classes: the table shows the {len(indices)} classes most involved in '
                "confusions; metrics.json has the full matrix.</p>")
    return f'{note}<div class="scroll"><table class="cm">{_cm_cells(rows, labels, indices)}</table></div>'


def _cm_cells(rows: list[list[float]], labels: list, indices: list[int]) -> str:
    """The table's header and rows for the classes at ``indices``, each cell shaded by its count."""
    vmax = max((rows[i][j] for i in indices for j in indices), default=0.0) or 1.0
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{escape(labels[j])}</th>" for j in indices) + "</tr>"
    body = []
    for i in indices:
        cells = []
        for j in indices:
            v = rows[i][j]
            style = ""
            if v > 0:
                alpha = 0.08 + 0.7 * v / vmax
                style = f' style="background:rgba(36,88,166,{alpha:.2f});{"color:#fff;" if alpha > 0.5 else ""}"'
            cls = ' class="diag"' if i == j else ""
            text = f"{int(v)}" if v.is_integer() else f"{v:g}"
            cells.append(f"<td{cls}{style}>{text}</td>")
        body.append(f'<tr><th style="text-align:left">{escape(labels[i])}</th>{"".join(cells)}</tr>')
    return head + "".join(body)


def _most_confused_section(metrics: dict) -> str:
    pairs = metrics.get("most_confused")
    if not isinstance(pairs, list):
        pairs = None
        cm, labels = metrics.get("confusion_matrix"), metrics.get("labels")
        if isinstance(cm, list) and isinstance(labels, list) and cm and len(labels) == len(cm):
            try:
                pairs = most_confused(np.asarray(cm, dtype=float), [str(x) for x in labels], k=10)
            except (TypeError, ValueError, RescliError):  # numbers that are not a square matrix
                pairs = None
    if pairs is None:
        return not_available("Not available.")
    pairs = [p for p in pairs if isinstance(p, dict)]
    if not pairs:
        return '<p>No confusions: every image was classified correctly.</p>'
    rows = "".join(
        f'<tr><td>{escape(p.get("true"))}</td><td>{escape(p.get("predicted"))}</td>'
        f'<td class="num">{number(p.get("count"))}</td></tr>'
        for p in pairs
    )
    return f'<table><tr><th>true</th><th>predicted as</th><th class="num">count</th></tr>{rows}</table>'


def _top_losses_table(metrics: dict) -> str:
    items = metrics.get("top_losses")
    if not isinstance(items, list) or not items:
        return ""
    rows = "".join(
        f'<tr><td>{escape(os.path.basename(str(it.get("path", ""))))}</td><td>{escape(it.get("true"))}</td>'
        f'<td>{escape(it.get("predicted"))}</td><td class="num">{number(it.get("score"))}</td>'
        f'<td class="num">{number(it.get("loss"))}</td></tr>'
        for it in items if isinstance(it, dict)
    )
    return ('<table><tr><th>image</th><th>true</th><th>predicted</th><th class="num">score of predicted</th>'
            f'<th class="num">loss</th></tr>{rows}</table>')


def _calibration_section(run_dir: Path, metrics: dict) -> str:
    info = {}
    for key, name in (("ece_before_temperature", "ECE before temperature scaling"),
                      ("temperature", "Temperature T"),
                      ("ece", "ECE (after)")):
        if metrics.get(key) is not None:
            info[name] = number(metrics[key])
    if metrics.get("temperature_source"):
        info["Temperature from"] = escape(metrics["temperature_source"])
    table = ""
    if info:
        table = '<table class="kv">' + "".join(f'<tr><td>{escape(k)}</td><td class="num">{v}</td></tr>'
                                               for k, v in info.items()) + "</table>"
    figure = _figure(run_dir, "reliability", "reliability diagram")
    return (table or not_available("Calibration numbers not available.")) + figure


def write_html_report(run_dir: str | os.PathLike, *, output: str | os.PathLike | None = None) -> Path:
    """Write one self-contained HTML report for ``run_dir`` (default ``run_dir/report.html``) and return its path."""
    run_path = Path(run_dir)
    metrics = _read_metrics(run_path)
    read = _read_json(run_path / "run.json")
    run = read if isinstance(read, dict) else None  # None: a `rescli evaluate` folder, or run.json unreadable
    title = f"rescli report: {run_path.name}"
    page = document(title=title, subtitle=_subtitle(run_path, metrics, run),
                    sections=_sections(run_path, metrics, run, _read_history(run_path / "history.csv")))
    target = Path(output) if output is not None else run_path / "report.html"
    try:
        atomic_write_text(target, page, undecodable="escape")  # valid UTF-8 whatever the file is called
    except OSError as exc:
        raise RescliError(f"cannot write report to {target}: {exc}") from exc
    return target


def _read_metrics(run_path: Path) -> dict[str, Any]:
    if not run_path.is_dir():
        raise RescliError(f"run folder not found: {run_path}")
    metrics_path = run_path / "metrics.json"
    if not metrics_path.is_file():
        hint = (f"its final evaluation did not finish: rescli finetune --resume {run_path} completes it"
                if (run_path / "last.pt").is_file() else "is it a rescli run or evaluation folder?")
        raise RescliError(f"{run_path} has no metrics.json; {hint}")
    metrics = _read_json(metrics_path)
    if not isinstance(metrics, dict):
        raise RescliError(f"{metrics_path} is not a readable JSON object")
    return metrics


def _subtitle(run_path: Path, metrics: dict[str, Any], run: dict[str, Any] | None) -> str:
    settings: dict[str, Any] = run["settings"] if run is not None and isinstance(run.get("settings"), dict) else {}
    arch = settings.get("arch")
    classes = settings.get("classes") or metrics.get("labels") or []
    n_classes = len(classes) if isinstance(classes, list) else None
    bits = [f"run folder <code>{escape(run_path.resolve())}</code>"]
    if arch:
        bits.append(f"architecture <b>{escape(arch)}</b>")
    if n_classes:
        bits.append(f"{n_classes} classes")
    bits.append(f"report written {escape(_dt.datetime.now().isoformat(timespec='seconds'))}")
    return " &middot; ".join(bits)


def _sections(
    run_path: Path, metrics: dict[str, Any], run: dict[str, Any] | None, history: list[dict] | None
) -> list[tuple[str, str, str]]:
    """(anchor, title, HTML) of each section: numbers first (what a reader of a PR wants), the long settings last."""
    evaluated = metrics.get("evaluated") if isinstance(metrics.get("evaluated"), dict) else None
    eval_folder = bool(evaluated) and run is None  # a `rescli evaluate` output folder, not a run folder
    what = "evaluated images" if eval_folder else "validation images"
    multi = metrics.get("task") == MULTI_LABEL
    sections = [("metrics", "Headline metrics", headline_cards(metrics) if multi else _metrics_section(metrics))]
    if not eval_folder:
        sections.append(("training", "Training curves", _training_section(run_path, history)))
    sections += _multi_label_sections(run_path, metrics, what) if multi else _single_label_sections(
        run_path, metrics, what)
    if "label_issues" in metrics:  # issue #16: a finetune run's validation suspects (rescli.insight.reports)
        sections.append(("label-issues", "Label issues (validation split)", label_issues_html(metrics["label_issues"])))
    if evaluated is not None and eval_folder:
        sections.append(("evaluation", "Evaluation", kv_table(evaluated)))
    else:
        sections.append(("settings", "Settings", _settings_section(run)))
    return sections


def _multi_label_sections(run_path: Path, metrics: dict[str, Any], what: str) -> list[tuple[str, str, str]]:
    """Per class (with AP and threshold), the confusion counts, the PR curves, the worst rows by binary
    cross-entropy, and the calibration of the binary decisions."""
    calibration = calibration_table(metrics) + _figure(run_path, "reliability", "reliability diagram")
    return [
        ("per-class", "Per-class metrics", per_label_table(metrics)),
        ("pr-curves", "Precision-recall curves", _figure(run_path, "pr_curves", "precision-recall curves")),
        ("confusion", "Confusion counts per class", confusion_counts_table(metrics)),
        ("mistakes", "Mistakes (top losses)",
         _figure(run_path, "top_losses", f"highest-loss {what}") + worst_rows_table(metrics)),
        ("calibration", "Calibration", calibration),
    ]


def _single_label_sections(run_path: Path, metrics: dict[str, Any], what: str) -> list[tuple[str, str, str]]:
    return [
        ("per-class", "Per-class metrics", _per_class_section(metrics)),
        ("confusion", "Confusion matrix", _figure(run_path, "confusion", "confusion matrix") + _cm_table(metrics)),
        ("most-confused", "Most-confused pairs", _most_confused_section(metrics)),
        ("mistakes", "Mistakes (top losses)",
         _figure(run_path, "top_losses", f"highest-loss {what}") + _top_losses_table(metrics)),
        ("calibration", "Calibration", _calibration_section(run_path, metrics)),
    ]
