"""One self-contained HTML report for a rescli run folder.

Reads ``run.json``, ``metrics.json``, ``history.csv`` and the PNG figures that exist, and writes a single HTML file:
images embedded as base64 data URIs, inline CSS, no scripts, no external resources. Anything missing (other than
``metrics.json``) makes its section say "not available" instead of failing. Every string from the run is escaped.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import math
import os
from pathlib import Path

from rescli.core.errors import RescliError
from rescli.core.fileio import atomic_write_text

FIGURES = {
    "curves": "curves.png",
    "confusion": "confusion_matrix.png",
    "top_losses": "top_losses.png",
    "reliability": "reliability.png",
    "lr_find": "lr_find.png",
}


#: Above this many classes the confusion-matrix table shows the same subset as the figure.
MAX_TABLE_CLASSES = 40


_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 background:#f6f7f9;color:#1d232b;line-height:1.45}
main{max-width:1150px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.7em;margin:0 0 4px} h2{font-size:1.3em;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #d7dce3}
.sub{color:#5b6573;margin:0 0 18px}
nav{margin:10px 0 6px;font-size:.92em} nav a{margin-right:12px;color:#2458a6;text-decoration:none}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin:6px 0 12px}
th,td{border:1px solid #d7dce3;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{font-weight:600;white-space:nowrap;color:#36404c}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 12px}
.card{background:#fff;border:1px solid #d7dce3;border-radius:8px;padding:10px 16px;min-width:130px}
.card .v{font-size:1.45em;font-weight:650} .card .k{font-size:.8em;color:#5b6573;text-transform:uppercase;letter-spacing:.03em}
img.fig{max-width:100%;height:auto;background:#fff;border:1px solid #d7dce3;border-radius:6px;display:block;margin:8px 0}
.na{color:#8a6d3b;background:#fcf8e3;border:1px solid #f0e1a8;padding:8px 12px;border-radius:6px;display:inline-block}
.note{color:#5b6573;font-size:.88em}
.scroll{overflow-x:auto;max-width:100%}
table.cm td,table.cm th{padding:2px 5px;font-size:.8em;text-align:right}
table.cm td.diag{font-weight:700;outline:1px solid #2458a6}
tr.low td{background:#fdecea}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return _e(value)
    if isinstance(value, int):
        return f"{value:,}"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return _e(value)
    if math.isnan(f):
        return "\u2014"
    if f.is_integer() and abs(f) >= 1000:
        return f"{int(f):,}"
    return f"{f:.{digits}f}" if abs(f) >= 10 ** -digits or f == 0 else f"{f:.2e}"


def _na(what: str = "Not available") -> str:
    return f'<p class="na">{_e(what)}</p>'


def _read_json(path: Path):
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


def _img(path: Path, alt: str) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="fig" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _figure(run_dir: Path, key: str, alt: str) -> str:
    tag = _img(run_dir / FIGURES[key], alt)
    return tag if tag is not None else _na(f"Figure not available ({FIGURES[key]} missing).")


def _kv_table(mapping: dict) -> str:
    rows = []
    for key, value in mapping.items():
        if isinstance(value, (dict, list, tuple)):
            text = json.dumps(value, ensure_ascii=False, default=str)
            if len(text) > 400:
                text = text[:399] + "\u2026"
            cell = f"<code>{_e(text)}</code>"
        elif isinstance(value, float):
            cell = _e(repr(value))
        else:
            cell = _e(value)
        rows.append(f"<tr><td>{_e(key)}</td><td>{cell}</td></tr>")
    return '<table class="kv">' + "".join(rows) + "</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _settings_section(run: dict | None) -> str:
    if not isinstance(run, dict):
        return _na("Settings not available (run.json missing or unreadable).")
    parts = []
    settings = run.get("settings")
    if isinstance(settings, dict) and settings:
        parts.append(_kv_table(settings))
    else:
        parts.append(_na("No settings recorded."))
    others = {k: v for k, v in run.items() if k not in ("settings", "versions") and not isinstance(v, (dict, list))}
    if others:
        parts.append("<h3>Run</h3>" + _kv_table(others))
    versions = run.get("versions")
    if isinstance(versions, dict) and versions:
        parts.append("<h3>Versions</h3>" + _kv_table(versions))
    return "".join(parts)


def _history_table(history: list[dict]) -> str:
    columns: list[str] = []
    for row in history:
        for key in row:
            if key is not None and key not in columns:
                columns.append(key)
    head = "".join(f'<th class="num">{_e(c)}</th>' for c in columns)
    body = []
    for row in history:
        cells = []
        for c in columns:
            raw = row.get(c)
            try:
                f = float(raw)
                text = _num(int(f) if c == "epoch" and f.is_integer() else f, 6 if c == "lr" else 4)
            except (TypeError, ValueError):
                text = _e(raw)
            cells.append(f'<td class="num">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _training_section(run_dir: Path, history: list[dict] | None) -> str:
    parts = [_figure(run_dir, "curves", "training curves")]
    if history:
        parts.append(_history_table(history))
    else:
        parts.append(_na("History not available (history.csv missing or empty)."))
    lr_tag = _img(run_dir / FIGURES["lr_find"], "learning-rate finder")
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


def _metrics_section(metrics: dict) -> str:
    cards = []
    for key, name in _HEADLINE:
        if key in metrics and metrics[key] is not None:
            cards.append(f'<div class="card"><div class="k">{_e(name)}</div><div class="v">{_num(metrics[key])}</div></div>')
    top_k = metrics.get("top_k_accuracy")
    if isinstance(top_k, dict):
        def _k_order(item):
            try:
                return (0, int(item[0]))
            except (TypeError, ValueError):
                return (1, str(item[0]))
        for k, v in sorted(top_k.items(), key=_k_order):
            cards.append(f'<div class="card"><div class="k">Top-{_e(k)} accuracy</div><div class="v">{_num(v)}</div></div>')
    if not cards:
        return _na("No headline metrics recorded.")
    return '<div class="cards">' + "".join(cards) + "</div>"


def _per_class_section(metrics: dict) -> str:
    per_class = metrics.get("per_class")
    if not isinstance(per_class, dict) or not per_class:
        return _na("Per-class metrics not available.")
    order = [str(x) for x in metrics.get("labels") or [] if str(x) in per_class]
    order += [k for k in per_class if k not in order]
    rows = []
    for name in order:
        row = per_class.get(name) or {}
        f1 = row.get("f1")
        low = isinstance(f1, (int, float)) and f1 < 0.5
        row_class = ' class="low"' if low else ""
        rows.append(
            f'<tr{row_class}><td>{_e(name)}</td>'
            f'<td class="num">{_num(row.get("precision"))}</td><td class="num">{_num(row.get("recall"))}</td>'
            f'<td class="num">{_num(row.get("f1"))}</td><td class="num">{_num(row.get("support"))}</td></tr>'
        )
    head = ('<tr><th>class</th><th class="num">precision</th><th class="num">recall</th>'
            '<th class="num">F1</th><th class="num">support</th></tr>')
    return (f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>'
            '<p class="note">Rows with F1 below 0.5 are shaded.</p>')


def _cm_table(metrics: dict) -> str:
    cm = metrics.get("confusion_matrix")
    labels = metrics.get("labels")
    if not isinstance(cm, list) or not cm:
        return _na("Confusion-matrix numbers not available.")
    n = len(cm)
    if not isinstance(labels, list) or len(labels) != n:
        labels = [str(i) for i in range(n)]
    try:
        rows = [[float(v) for v in row] for row in cm]
        if any(len(r) != n for r in rows):
            raise ValueError
    except (TypeError, ValueError):
        return _na("Confusion-matrix numbers are malformed.")
    indices = list(range(n))
    note = ""
    if n > MAX_TABLE_CLASSES:
        try:
            import numpy as np

            from rescli.evaluation.plots import confusion_subset

            _, _, indices = confusion_subset(np.asarray(rows), [str(x) for x in labels], MAX_TABLE_CLASSES)
            note = (f'<p class="note">{n} classes: the table shows the {len(indices)} classes most involved in '
                    "confusions; metrics.json has the full matrix.</p>")
        except Exception:
            indices = indices[:MAX_TABLE_CLASSES]
            note = f'<p class="note">{n} classes: the table shows the first {MAX_TABLE_CLASSES}.</p>'
    vmax = max((rows[i][j] for i in indices for j in indices), default=0.0) or 1.0
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{_e(labels[j])}</th>" for j in indices) + "</tr>"
    body = []
    for i in indices:
        cells = []
        for j in indices:
            v = rows[i][j]
            alpha = 0.08 + 0.7 * v / vmax if v > 0 else 0.0
            style = f' style="background:rgba(36,88,166,{alpha:.2f});{"color:#fff;" if alpha > 0.5 else ""}"' if v > 0 else ""
            cls = ' class="diag"' if i == j else ""
            text = f"{int(v)}" if v.is_integer() else f"{v:g}"
            cells.append(f"<td{cls}{style}>{text}</td>")
        body.append(f'<tr><th style="text-align:left">{_e(labels[i])}</th>{"".join(cells)}</tr>')
    return f'{note}<div class="scroll"><table class="cm">{head}{"".join(body)}</table></div>'


def _most_confused_section(metrics: dict) -> str:
    pairs = metrics.get("most_confused")
    if not isinstance(pairs, list):
        pairs = None
        cm, labels = metrics.get("confusion_matrix"), metrics.get("labels")
        if isinstance(cm, list) and isinstance(labels, list) and cm and len(labels) == len(cm):
            try:
                import numpy as np

                from rescli.evaluation.plots import most_confused

                pairs = most_confused(np.asarray(cm, dtype=float), [str(x) for x in labels], k=10)
            except Exception:
                pairs = None
    if pairs is None:
        return _na("Not available.")
    pairs = [p for p in pairs if isinstance(p, dict)]
    if not pairs:
        return '<p>No confusions: every image was classified correctly.</p>'
    rows = "".join(
        f'<tr><td>{_e(p.get("true"))}</td><td>{_e(p.get("predicted"))}</td><td class="num">{_num(p.get("count"))}</td></tr>'
        for p in pairs
    )
    return f'<table><tr><th>true</th><th>predicted as</th><th class="num">count</th></tr>{rows}</table>'


def _top_losses_table(metrics: dict) -> str:
    items = metrics.get("top_losses")
    if not isinstance(items, list) or not items:
        return ""
    rows = "".join(
        f'<tr><td>{_e(os.path.basename(str(it.get("path", ""))))}</td><td>{_e(it.get("true"))}</td>'
        f'<td>{_e(it.get("predicted"))}</td><td class="num">{_num(it.get("score"))}</td>'
        f'<td class="num">{_num(it.get("loss"))}</td></tr>'
        for it in items if isinstance(it, dict)
    )
    return ('<table><tr><th>image</th><th>true</th><th>predicted</th><th class="num">score of predicted</th>'
            f'<th class="num">loss</th></tr>{rows}</table>')


def _evaluation_section(evaluated: dict) -> str:
    return _kv_table(evaluated)


def _calibration_section(run_dir: Path, metrics: dict) -> str:
    info = {}
    for key, name in (("ece_before_temperature", "ECE before temperature scaling"),
                      ("temperature", "Temperature T"),
                      ("ece", "ECE (after)")):
        if metrics.get(key) is not None:
            info[name] = _num(metrics[key])
    if metrics.get("temperature_source"):
        info["Temperature from"] = _e(metrics["temperature_source"])
    table = ""
    if info:
        table = '<table class="kv">' + "".join(f'<tr><td>{_e(k)}</td><td class="num">{v}</td></tr>'
                                               for k, v in info.items()) + "</table>"
    return (table or _na("Calibration numbers not available.")) + _figure(run_dir, "reliability", "reliability diagram")


def write_html_report(run_dir: str | os.PathLike, *, output: str | os.PathLike | None = None) -> Path:
    """Write one self-contained HTML report for ``run_dir`` (default ``run_dir/report.html``) and return its path."""
    run_path = Path(run_dir)
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
    run = _read_json(run_path / "run.json")
    history = _read_history(run_path / "history.csv")

    settings = run.get("settings") if isinstance(run, dict) and isinstance(run.get("settings"), dict) else {}
    arch = settings.get("arch")
    classes = settings.get("classes") or metrics.get("labels") or []
    n_classes = len(classes) if isinstance(classes, list) else None
    subtitle_bits = [f"run folder <code>{_e(run_path.resolve())}</code>"]
    if arch:
        subtitle_bits.append(f"architecture <b>{_e(arch)}</b>")
    if n_classes:
        subtitle_bits.append(f"{n_classes} classes")
    subtitle_bits.append(f"report written {_e(_dt.datetime.now().isoformat(timespec='seconds'))}")

    # Numbers first (what a reader of a PR wants), the long settings table last.
    evaluated = metrics.get("evaluated") if isinstance(metrics.get("evaluated"), dict) else None
    eval_folder = bool(evaluated) and not isinstance(run, dict)  # a `rescli evaluate` output folder, not a run folder
    what = "evaluated images" if eval_folder else "validation images"
    sections = [("metrics", "Headline metrics", _metrics_section(metrics))]
    if not eval_folder:
        sections.append(("training", "Training curves", _training_section(run_path, history)))
    sections += [
        ("per-class", "Per-class metrics", _per_class_section(metrics)),
        ("confusion", "Confusion matrix", _figure(run_path, "confusion", "confusion matrix") + _cm_table(metrics)),
        ("most-confused", "Most-confused pairs", _most_confused_section(metrics)),
        ("mistakes", "Mistakes (top losses)",
         _figure(run_path, "top_losses", f"highest-loss {what}") + _top_losses_table(metrics)),
        ("calibration", "Calibration", _calibration_section(run_path, metrics)),
    ]
    if eval_folder:
        sections.append(("evaluation", "Evaluation", _evaluation_section(evaluated)))
    else:
        sections.append(("settings", "Settings", _settings_section(run)))
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    title = f"rescli report: {run_path.name}"
    document = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><p class=\"sub\">{' &middot; '.join(subtitle_bits)}</p><nav>{nav}</nav>"
        + "".join(_section(a, t, body) for a, t, body in sections)
        + "</main></body></html>\n"
    )
    target = Path(output) if output is not None else run_path / "report.html"
    try:
        atomic_write_text(target, document, undecodable="escape")  # valid UTF-8 whatever the file is called
    except OSError as exc:
        raise RescliError(f"cannot write report to {target}: {exc}") from exc
    return target
