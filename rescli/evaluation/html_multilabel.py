"""The HTML report's sections for a multi-label task, from its metrics.json: headline figures, a table per class
(precision, recall, F1, average precision, support, threshold), the confusion counts, the worst rows by binary
cross-entropy and the calibration figures. Every string goes through ``escape``, every number through ``number``.
"""

from __future__ import annotations

import os
from typing import Any

from rescli.evaluation.html_blocks import card, escape, not_available, number

HEADLINE = [
    ("mean_average_precision", "mAP (macro)"),
    ("micro_f1", "Micro F1"),
    ("macro_f1", "Macro F1"),
    ("subset_accuracy", "Subset accuracy"),
    ("hamming_loss", "Hamming loss"),
    ("ece", "ECE"),
]


def headline_cards(metrics: dict[str, Any]) -> str:
    cards = [card(name, metrics[key]) for key, name in HEADLINE if metrics.get(key) is not None]
    if not cards:
        return not_available("No headline metrics recorded.")
    return ('<div class="cards">' + "".join(cards) + "</div>"
            '<p class="note">F1, subset accuracy and hamming loss at each class\'s threshold (see the per-class '
            'table); mAP does not depend on thresholds.</p>')


def _ordered(metrics: dict[str, Any], table: dict[str, Any]) -> list[str]:
    order = [str(x) for x in metrics.get("labels") or [] if str(x) in table]
    return order + [k for k in table if k not in order]


def per_label_table(metrics: dict[str, Any]) -> str:
    per_class = metrics.get("per_class")
    if not isinstance(per_class, dict) or not per_class:
        return not_available("Per-class metrics not available.")
    columns = ("precision", "recall", "f1", "average_precision", "support", "threshold")
    head = "<tr><th>class</th>" + "".join(f'<th class="num">{escape(c.replace("_", " "))}</th>' for c in columns)
    rows = []
    for name in _ordered(metrics, per_class):
        row = per_class.get(name) or {}
        f1 = row.get("f1")
        low = ' class="low"' if isinstance(f1, (int, float)) and f1 < 0.5 else ""
        cells = "".join(f'<td class="num">{number(row.get(c))}</td>' for c in columns)
        rows.append(f"<tr{low}><td>{escape(name)}</td>{cells}</tr>")
    source = metrics.get("thresholds_source")
    note = f"Thresholds: {escape(source)}. " if source else ""
    return (f'<div class="scroll"><table>{head}</tr>{"".join(rows)}</table></div>'
            f'<p class="note">{note}Rows with F1 below 0.5 are shaded; average precision is undefined (—) for a class '
            "without a positive image.</p>")


def confusion_counts_table(metrics: dict[str, Any]) -> str:
    counts = metrics.get("confusion_counts")
    if not isinstance(counts, dict) or not counts:
        return not_available("Confusion counts not available.")
    head = ('<tr><th>class</th><th class="num">true positives</th><th class="num">false positives</th>'
            '<th class="num">false negatives</th><th class="num">true negatives</th></tr>')
    rows = "".join(
        f"<tr><td>{escape(name)}</td>"
        + "".join(f'<td class="num">{number((counts.get(name) or {}).get(k))}</td>' for k in ("tp", "fp", "fn", "tn"))
        + "</tr>"
        for name in _ordered(metrics, counts)
    )
    return f'<div class="scroll"><table>{head}{rows}</table></div>'


def worst_rows_table(metrics: dict[str, Any]) -> str:
    items = metrics.get("top_losses")
    if not isinstance(items, list) or not items:
        return "<p>No mistakes: every image got exactly its labels.</p>"
    rows = "".join(
        f'<tr><td>{escape(os.path.basename(str(it.get("path", ""))))}</td><td>{escape(it.get("true"))}</td>'
        f'<td>{escape(it.get("predicted") or "(none)")}</td><td class="num">{number(it.get("loss"))}</td></tr>'
        for it in items if isinstance(it, dict)
    )
    return ('<table><tr><th>image</th><th>true labels</th><th>predicted labels</th>'
            f'<th class="num">binary cross-entropy</th></tr>{rows}</table>')


def calibration_table(metrics: dict[str, Any]) -> str:
    names = (("ece_before_temperature", "ECE before temperature scaling"),
             ("temperature", "Temperature T (one for every class)"), ("ece", "ECE (after)"))
    info = [(name, metrics[key]) for key, name in names if metrics.get(key) is not None]
    rows = "".join(f'<tr><td>{escape(k)}</td><td class="num">{number(v)}</td></tr>' for k, v in info)
    per_class = metrics.get("ece_per_class")
    if isinstance(per_class, dict) and per_class:
        rows += "".join(f'<tr><td>ECE of {escape(name)}</td><td class="num">{number(per_class[name])}</td></tr>'
                        for name in _ordered(metrics, per_class))
    if not rows:
        return not_available("Calibration numbers not available.")
    return ('<table class="kv">' + rows + "</table>"
            '<p class="note">Each (image, class) decision is a binary one: the figure bins them all by the '
            "probability of the side chosen.</p>")
