"""Results as rich tables for people (programs ask for --format json instead). Building them prints nothing.

Every cell that holds the user's own strings (paths, class names) is a ``Text``, so that it is never read
as rich markup, and names that are not UTF-8 show their bytes as ``\\xNN``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from rescli.core.fileio import shown_name

#: The confusion matrix is drawn only up to this many classes: wider, it wraps into something unreadable.
MAX_MATRIX_CLASSES = 20

METRIC_ROWS = ("accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1",
               "roc_auc_ovr", "loss", "log_loss", "ece", "ece_before_temperature", "temperature")


MULTI_LABEL_METRIC_ROWS = ("mean_average_precision", "micro_f1", "micro_precision", "micro_recall", "macro_f1",
                           "macro_precision", "macro_recall", "subset_accuracy", "hamming_loss", "loss", "ece",
                           "ece_before_temperature", "temperature")


def _multi_label(metrics: dict[str, Any]) -> bool:
    return metrics.get("task") == "multi-label"


def shown(name: str) -> Text:
    return Text(shown_name(name))


def key_value_table(rows: Iterable[tuple[str, str]], *, title: str | None = None) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths and lists wrap instead of ending in "…": they are meant to be copied
    for key, value in rows:
        table.add_row(key, value)
    return table


def run_summary_table(summary: dict[str, Any]) -> Table:
    """What finetune reports: the run folder, the best checkpoint and its validation figures."""
    return key_value_table(((k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()),
                           title="finetune")


def model_table(description: dict[str, Any]) -> Table:
    """What `rescli info` found in a checkpoint or export; empty entries left out."""
    return key_value_table((key, _info_cell(value)) for key, value in description.items()
                           if value is not None and value != {})


def _info_cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={f'{v:.4f}' if isinstance(v, float) else v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def metrics_tables(metrics: dict[str, Any]) -> list[Table]:
    """evaluate's figures: the headline metrics, then the per-class tables."""
    head = Table(title=f"{metrics['n']} images", show_header=False)
    for key in MULTI_LABEL_METRIC_ROWS if _multi_label(metrics) else METRIC_ROWS:
        if metrics.get(key) is not None:
            head.add_row(key, f"{metrics[key]:.4f}")
    for k, v in (metrics.get("top_k_accuracy") or {}).items():
        if k != "1":
            head.add_row(f"top{k}_accuracy", f"{v:.4f}")
    return [head, *class_tables(metrics)]


def class_tables(metrics: dict[str, Any]) -> list[Table]:
    """Per-class P/R/F1, the confusion matrix (up to MAX_MATRIX_CLASSES classes) and the most-confused pairs.
    Multi-label: per-label P/R/F1, AP, support and threshold, then each label's confusion counts."""
    if _multi_label(metrics):
        return _label_tables(metrics)
    per = _table("per class", ("class", "precision", "recall", "f1", "support"), right_from=1)
    for name, row in metrics["per_class"].items():
        per.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    out = [per]
    labels, matrix = metrics["labels"], metrics["confusion_matrix"]
    if len(labels) <= MAX_MATRIX_CLASSES:
        conf = _table("confusion matrix (rows: true, columns: predicted)", ("", *labels), right_from=1)
        for name, row in zip(labels, matrix):
            conf.add_row(name, *map(str, row))
        out.append(conf)
    if metrics.get("most_confused"):
        pairs = _table("most confused (true -> predicted)", ("true", "predicted", "count"), right_from=2)
        for pair in metrics["most_confused"]:
            pairs.add_row(pair["true"], pair["predicted"], str(pair["count"]))
        out.append(pairs)
    return out


def _label_tables(metrics: dict[str, Any]) -> list[Table]:
    per = _table("per label", ("label", "precision", "recall", "f1", "AP", "support", "threshold"), right_from=1)
    for name, row in metrics["per_class"].items():
        ap = row.get("average_precision")
        per.add_row(shown(name), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                    "-" if ap is None else f"{ap:.3f}", str(row["support"]), f"{row['threshold']:.3f}")
    counts = _table("confusion counts per label", ("label", "tp", "fp", "fn", "tn"), right_from=1)
    for name, c in metrics.get("confusion_counts", {}).items():
        counts.add_row(shown(name), *(str(c[k]) for k in ("tp", "fp", "fn", "tn")))
    return [per, counts]


def degradation_tables(result: dict[str, Any], *, epochs: int, stages: Sequence[str]) -> list[Table]:
    """The degradation experiment: final errors per model, and gradient norms per stage at initialisation."""
    errors = _table(f"final error after {epochs} epoch(s), %",
                    ("model", "params", "train error", "val error", "best val error"), right_from=1)
    for m in result["models"]:
        errors.add_row(m["name"], f"{m['params']:,}", f"{100 * m['final_train_error']:.2f}",
                       f"{100 * m['final_val_error']:.2f}", f"{100 * m['best_val_error']:.2f}")
    grads = _table("gradient L2 norm per stage at initialisation (one batch)", ("model", *stages), right_from=1)
    for m in result["models"]:
        grads.add_row(m["name"], *(f"{m['grad_norms'][s]:.3g}" for s in stages))
    return [errors, grads]


def _table(title: str, columns: Sequence[str], *, right_from: int) -> Table:
    """A titled table whose columns from ``right_from`` on hold numbers (right-aligned)."""
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i >= right_from else "left")
    return table


def dataset_tables(report: dict[str, Any]) -> list[Table]:
    """`rescli dataset`: counts per class and split, a summary, then each kind of problem found, if any."""
    out = [_dataset_counts(report), _dataset_summary(report)]
    if report.get("warnings"):
        warnings = Table(title="warnings (finetune shows them too)", show_header=False)
        warnings.add_column(overflow="fold")
        for message in report["warnings"]:
            warnings.add_row(shown(message))
        out.append(warnings)
    if report["broken"]:
        out.append(_reasons_table("broken images (finetune skips them; --strict stops on them)",
                                  ("path", "problem"), report["broken_reasons"]))
    if report["ignored"]:
        out.append(_reasons_table("ignored (not images or not regular files, hidden, outside any class folder, or "
                                  "counted elsewhere)", ("path", "why"), report["ignored_reasons"]))
    if report["duplicates"]:
        # Issue #16: near-duplicates (the same picture resized, re-encoded or cropped) are marked "(near)".
        dups = _table("identical and near-identical files", ("kind", "files", "classes", "splits"), right_from=4)
        for g in report["duplicates"]:
            dups.add_row(g["kind"] + (" (near)" if g.get("near") else ""), shown("\n".join(g["paths"])),
                         shown(", ".join(g["classes"])),
                         ", ".join(g["splits"]))
        out.append(dups)
    return out


def _dataset_counts(report: dict[str, Any]) -> Table:
    splits = list(report["splits"])
    where = (f"{report['table']} ({report['task']} table)" if "table" in report
             else f"{report['root']} ({report['layout']})")
    counts = Table(title=shown(where))
    counts.add_column("label" if report.get("task") == "multi-label" else "class")
    for split in splits:
        counts.add_column(split, justify="right")
    counts.add_column("total", justify="right")
    for name, total in report["classes"].items():
        counts.add_row(shown(name), *(str(report["splits"][s][name]) for s in splits), str(total))
    counts.add_row("all", *(str(sum(report["splits"][s].values())) for s in splits), str(report["images"]),
                   style="bold")
    return counts


def _dataset_summary(report: dict[str, Any]) -> Table:
    summary = Table(show_header=False, title="summary")
    sizes = report["sizes"]
    summary.add_row("usable images", str(report["images"]))
    summary.add_row("broken images (skipped)", str(len(report["broken"])))
    summary.add_row("ignored files", str(len(report["ignored"])))
    if report["empty_classes"]:
        summary.add_row("not classes (no usable images)", shown(", ".join(report["empty_classes"])))
    summary.add_row("width range (px)", "{} - {}".format(*sizes["width"]))
    summary.add_row("height range (px)", "{} - {}".format(*sizes["height"]))
    summary.add_row("smallest image", shown("{path} ({width}x{height})".format(**sizes["smallest"])))
    summary.add_row("class imbalance (largest / smallest)", f"{report['imbalance_ratio']:.2f}")
    kinds = [g["kind"] for g in report["duplicates"]]
    summary.add_row(
        "duplicate groups",
        f"{len(kinds)} ({kinds.count('label-conflict')} label conflict(s), {kinds.count('leak')} split leak(s), "
        f"{kinds.count('copy')} copy(ies))",
    )
    return summary


def _reasons_table(title: str, columns: tuple[str, str], reasons: dict[str, str]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for path, why in reasons.items():
        table.add_row(shown(path), shown(why))
    return table
