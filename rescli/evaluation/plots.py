"""The evaluation's figures as PNG files, from plain arrays: confusion matrix, training curves, top losses,
reliability diagram, precision-recall curves (multi-label), learning-rate finder. Each is drawn and written as
``figures`` says (Agg canvas, atomic write, a ``Title`` text chunk, and the drawn numbers in further text chunks
where a reader may check them).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rescli.core.errors import RescliError
from rescli.data.images import load_rgb
from rescli.evaluation.calibration import (
    expected_calibration_error,
    reliability_bins,
    softmax,
)
from rescli.evaluation.confusion import check_confusion_matrix, confusion_subset
from rescli.evaluation.figures import (
    ARROW,
    integer_ticks,
    message_figure,
    new_figure,
    save_png,
    short_label,
    to_float,
)


def plot_confusion_matrix(
    cm: np.ndarray, labels: list[str], path: str | os.PathLike, *, max_classes: int = 30
) -> Path:
    """Two panels, counts and row-normalised (recall on the diagonal). See ``confusion_subset`` for > max_classes."""
    arr = check_confusion_matrix(cm, labels)
    n_total = arr.shape[0]
    if n_total == 0:
        return message_figure(path, "no classes", title="Confusion matrix")
    sub, names, _ = confusion_subset(arr, labels, max_classes)
    n = len(names)
    counts = sub.astype(np.float64)
    row_sum = counts.sum(axis=1, keepdims=True)
    normed = np.divide(counts, row_sum, out=np.zeros_like(counts), where=row_sum > 0)

    if n < n_total:
        title = (f"Confusion matrix: {n} of {n_total} classes shown "
                 f"(those most involved in confusions)")
    else:
        title = f"Confusion matrix ({n_total} classes)"

    panel = min(max(4.5, 0.32 * n + 2.5), 14.0)
    fig = new_figure(2 * panel + 1.2, panel + 0.8)
    fig.suptitle(title, fontsize=12)
    short = [short_label(s, 22) for s in names]
    for col, (data, sub_title, fmt, vmax) in enumerate([
        (counts, "Counts", "count", counts.max() if counts.size else 1.0),
        (normed, "Normalised by true class (row)", "frac", 1.0),
    ]):
        ax = fig.add_subplot(1, 2, col + 1)
        _matrix_panel(fig, ax, data, short, title=sub_title, fmt=fmt, vmax=float(vmax) if vmax > 0 else 1.0)
    # The drawn numbers travel in the PNG's text chunks, so a reader (or a test) can check the figure against
    # metrics.json.
    return save_png(fig, path, title=title, extra={
        "Classes shown": n, "Classes total": n_total,
        "Labels": json.dumps(names), "Counts": json.dumps(sub.tolist()),
    })


def _matrix_panel(fig: Figure, ax: Axes, data: np.ndarray, names: list[str], *, title: str, fmt: str,
                  vmax: float) -> None:
    """One panel of the confusion matrix: the cells as a heat map, each non-zero one labelled (up to 30 classes)."""
    n = len(names)
    tick_size = 10 if n <= 12 else 9 if n <= 20 else 8
    ticks = np.arange(n)
    im = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(names, rotation=60 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=tick_size)
    ax.set_yticklabels(names, fontsize=tick_size)
    if n > 30:
        return
    cell_size = 9 if n <= 10 else 7.5 if n <= 18 else 6
    for i in range(n):
        for j in range(n):
            v = data[i, j]
            if v == 0:
                continue
            if fmt == "count":
                text = f"{int(v)}" if float(v).is_integer() else f"{v:.2g}"
            else:
                text = f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=cell_size,
                    color="white" if v > 0.55 * vmax else "black")


def plot_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """Left: train/val loss per epoch. Right: validation accuracy per epoch. Values may be strings (from CSV)."""
    rows = []
    for i, row in enumerate(history or []):
        epoch = to_float(row.get("epoch", i + 1))
        rows.append((epoch if math.isfinite(epoch) else float(i + 1),
                     to_float(row.get("train_loss")), to_float(row.get("val_loss")),
                     to_float(row.get("val_accuracy"))))
    if not rows:
        return message_figure(path, "no training history", title="Training curves")
    rows.sort(key=lambda r: r[0])
    epochs = np.array([r[0] for r in rows])
    train_loss = np.array([r[1] for r in rows])
    val_loss = np.array([r[2] for r in rows])
    val_acc = np.array([r[3] for r in rows])

    title = "Training curves"
    fig = new_figure(11, 4.2)
    fig.suptitle(title)
    ax_loss = fig.add_subplot(1, 2, 1)
    ax_acc = fig.add_subplot(1, 2, 2)
    marker = "o" if len(rows) <= 40 else None
    if np.isfinite(train_loss).any():
        ok = np.isfinite(train_loss)
        ax_loss.plot(epochs[ok], train_loss[ok], marker=marker, ms=4, label="train loss")
    if np.isfinite(val_loss).any():
        ok = np.isfinite(val_loss)
        ax_loss.plot(epochs[ok], val_loss[ok], marker=marker, ms=4, label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.grid(True, alpha=0.3)
    if ax_loss.has_data():
        ax_loss.legend()
    else:
        ax_loss.text(0.5, 0.5, "no loss values", ha="center", va="center", transform=ax_loss.transAxes)

    ok = np.isfinite(val_acc)
    if ok.any():
        ax_acc.plot(epochs[ok], val_acc[ok], marker=marker, ms=4, color="tab:green", label="val accuracy")
        best = int(np.nanargmax(np.where(ok, val_acc, -np.inf)))
        ax_acc.scatter([epochs[best]], [val_acc[best]], s=80, facecolors="none", edgecolors="tab:red", zorder=3,
                       label=f"best {val_acc[best]:.4f} (epoch {epochs[best]:g})")
        if np.nanmax(val_acc) <= 1.0 and np.nanmin(val_acc) >= 0.0:
            ax_acc.set_ylim(max(0.0, float(np.nanmin(val_acc)) - 0.05), 1.005)
        ax_acc.legend(loc="lower right")
    else:
        ax_acc.text(0.5, 0.5, "no accuracy values", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("Validation accuracy")
    ax_acc.grid(True, alpha=0.3)
    for ax in (ax_loss, ax_acc):
        integer_ticks(ax)
    return save_png(fig, path, title=title)


def _load_thumbnail(path: object, size: int = 256) -> np.ndarray | None:
    """An RGB thumbnail (upright, as the model saw the image) as a uint8 array, or None when it cannot be read."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        img = load_rgb(path)
        img.thumbnail((size, size))
        return np.asarray(img)
    except Exception:  # the tile is drawn grey and says "unreadable"; the figure is still written
        return None


def plot_top_losses(items: list[dict], path: str | os.PathLike, *, max_items: int = 16, sets: bool = False,
                    overlays: dict[str, np.ndarray] | None = None) -> Path:
    """Grid of the highest-loss images titled ``true → predicted (score)``; unreadable files become grey tiles.

    ``sets``: multi-label items, whose true and predicted are sets of labels (and have no score).
    ``overlays``: {path: picture with the heatmap of its predicted label} (issue #16, rescli.insight.reports),
    drawn instead of the plain picture.
    """
    items = sorted(items or [], key=_highest_loss_first)[: max(0, int(max_items))]
    if not items:
        return message_figure(path, "no mistakes", title="Top losses")
    n = len(items)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    title = (f"Top {n} losses (true labels {ARROW} predicted labels; binary cross-entropy)" if sets
             else f"Top {n} losses (true {ARROW} predicted (probability of predicted))")
    if overlays:
        title += "\nheatmap: where the model looked for the predicted label (Grad-CAM)"
    fig = new_figure(3.0 * cols, 3.2 * rows + 0.5)
    fig.suptitle(title, fontsize=11)
    grey = np.full((64, 64, 3), 200, dtype=np.uint8)
    for k, item in enumerate(items):
        ax = fig.add_subplot(rows, cols, k + 1)
        thumb = (overlays or {}).get(str(item.get("path"))) if overlays else None
        thumb = thumb if thumb is not None else _load_thumbnail(item.get("path"))
        ax.imshow(grey if thumb is None else thumb)
        if thumb is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes, color="dimgray")
        ax.set_xticks([])
        ax.set_yticks([])
        score = to_float(item.get("score"))
        loss = to_float(item.get("loss"))
        label = f"{short_label(item.get('true', '?'), 16)} {ARROW} {short_label(item.get('predicted', '?'), 16)}"
        if sets:
            true, predicted = item.get("true") or "(none)", item.get("predicted") or "(none)"
            label = f"{short_label(true, 30)}\n{ARROW} {short_label(predicted, 30)}"
        score_txt = f"({score:.2f})" if math.isfinite(score) else ""
        loss_txt = f"loss {loss:.2f}" if math.isfinite(loss) else ""
        ax.set_title(f"{label} {score_txt}\n{loss_txt}".strip(), fontsize=9, color="firebrick")
    drawn = [{"path": str(it.get("path")), "true": str(it.get("true")), "predicted": str(it.get("predicted")),
              "score": to_float(it.get("score")), "loss": to_float(it.get("loss"))} for it in items]
    return save_png(fig, path, title=title, extra={"Items": json.dumps(drawn)})


def _highest_loss_first(item: dict) -> float:
    loss = to_float(item.get("loss"))
    return -loss if math.isfinite(loss) else math.inf


def _reliability_panel(ax_top, ax_bottom, probs, labels, n_bins: int, name: str, color: str) -> float:
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    ece = expected_calibration_error(probs, labels, n_bins=n_bins)
    width = 1.0 / n_bins
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    acc = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    ax_top.bar(centers, acc, width=width, color=color, edgecolor="black", linewidth=0.5, alpha=0.85,
               label=f"accuracy ({name}), ECE = {ece:.4f}")
    # Gap between accuracy and mean confidence, per non-empty bin.
    filled = [(c, b) for c, b in zip(centers, bins) if b["count"]]
    gap_x = [c for c, _ in filled]
    gap_lo = [min(b["accuracy"], b["confidence"]) for _, b in filled]
    gap_h = [abs(b["accuracy"] - b["confidence"]) for _, b in filled]
    if gap_x:
        ax_top.bar(gap_x, gap_h, bottom=gap_lo, width=width, color="tab:red", alpha=0.25, hatch="//",
                   edgecolor="tab:red", linewidth=0.5, label="gap to mean confidence")
    ax_top.plot([0, 1], [0, 1], ls="--", color="gray", label="perfect calibration")
    ax_top.set_xlim(0, 1)
    ax_top.set_ylim(0, 1)
    ax_top.set_ylabel("accuracy")
    ax_top.set_title(f"Reliability ({name})", fontsize=11)
    ax_top.legend(loc="upper left", fontsize=8)
    ax_top.grid(True, alpha=0.3)
    counts = [b["count"] for b in bins]
    ax_bottom.bar(centers, counts, width=width, color=color, edgecolor="black", linewidth=0.5, alpha=0.85)
    ax_bottom.set_xlim(0, 1)
    ax_bottom.set_xlabel("confidence (top-1 probability)")
    ax_bottom.set_ylabel("samples")
    return ece


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path: str | os.PathLike, *, n_bins: int = 15,
                     temperature: float | None = None, logits: np.ndarray | None = None) -> Path:
    """Reliability diagram (accuracy vs confidence per bin, diagonal) with ECE in the legend and a confidence histogram.

    If both ``logits`` and ``temperature`` are given, draws two panels computed from the logits: before
    (``softmax(logits)``) and after (``softmax(logits / temperature)``) temperature scaling; ``probs`` is then unused.
    """
    labels = np.asarray(labels)
    scaled_by: float | None = None  # the temperature of a before/after pair of panels
    if logits is not None and temperature is not None:
        scaled_by = float(temperature)
        panels = [(softmax(logits), "before: T = 1", "tab:gray"),
                  (softmax(logits, temperature), f"after: T = {temperature:.3g}", "tab:blue")]
    else:
        panels = [(np.asarray(probs, dtype=np.float64), "model", "tab:blue")]
    if labels.size == 0:
        return message_figure(path, "no samples", title="Reliability diagram")
    fig = new_figure(5.2 * len(panels) + 0.4, 6.2)
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    eces = []
    for col, (p, name, color) in enumerate(panels):
        ax_top = fig.add_subplot(grid[0, col])
        ax_bottom = fig.add_subplot(grid[1, col], sharex=ax_top)
        eces.append(_reliability_panel(ax_top, ax_bottom, p, labels, n_bins, name, color))
    if scaled_by is not None:
        title = f"Reliability diagram: ECE {eces[0]:.4f} {ARROW} {eces[1]:.4f} with temperature scaling"
        extra = {"ECE before": repr(eces[0]), "ECE": repr(eces[1]), "Temperature": repr(scaled_by)}
    else:
        title = f"Reliability diagram: ECE {eces[0]:.4f}"
        extra = {"ECE": repr(eces[0])}
    fig.suptitle(title, fontsize=12)
    return save_png(fig, path, title=title, extra=extra)


#: Above this many classes the PR figure draws the micro average and the classes of lowest average precision.
MAX_PR_CURVES = 12


def plot_pr_curves(y_true: np.ndarray, probs: np.ndarray, labels: list[str], path: str | os.PathLike, *,
                   thresholds: list[float] | None = None) -> Path:
    """Precision against recall per class (multi-label), with the micro average over every (image, class) decision;
    each class's operating point at its threshold is marked. Over MAX_PR_CURVES classes, the worst ones are drawn."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    title = "Precision-recall curves"
    if y.size == 0 or not y.any():
        return message_figure(path, "no positive labels", title=title)
    ap = {c: float(average_precision_score(y[:, c], p[:, c])) for c in range(y.shape[1]) if y[:, c].any()}
    shown = sorted(ap, key=lambda c: (ap[c], c))[:MAX_PR_CURVES]
    fig = new_figure(7.5, 6.0)
    ax = fig.add_subplot()
    precision, recall, _ = precision_recall_curve(y.reshape(-1), p.reshape(-1))
    micro = float(average_precision_score(y.reshape(-1), p.reshape(-1)))
    ax.plot(recall, precision, color="black", lw=2.2, label=f"micro average (AP {micro:.3f})")
    for c in sorted(shown):
        precision, recall, _ = precision_recall_curve(y[:, c], p[:, c])
        line = ax.plot(recall, precision, lw=1.2, label=f"{short_label(labels[c], 20)} (AP {ap[c]:.3f})")[0]
        if thresholds is not None:
            pred = p[:, c] >= thresholds[c]
            tp = int((pred & (y[:, c] == 1)).sum())
            ax.scatter([tp / max(1, int(y[:, c].sum()))], [tp / max(1, int(pred.sum()))], color=line.get_color(),
                       s=28, zorder=3)
    if len(ap) > len(shown):
        title += f": the {len(shown)} classes of lowest AP, of {len(ap)}"
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title + (" (dots: each class's threshold)" if thresholds is not None else ""), fontsize=10)
    return save_png(fig, path, title=title, extra={
        "AP": json.dumps({labels[c]: ap[c] for c in sorted(ap)}), "Micro AP": repr(micro)})


def plot_lr_find(
    lrs: list[float], losses: list[float], path: str | os.PathLike, *, suggestion: float | None = None
) -> Path:
    """Loss vs learning rate on a log x axis; the suggested learning rate marked with a vertical line."""
    lr = np.array([to_float(v) for v in lrs or []], dtype=np.float64)
    loss = np.array([to_float(v) for v in losses or []], dtype=np.float64)
    if lr.shape != loss.shape:
        raise RescliError(f"lrs and losses differ in length ({lr.size} vs {loss.size})")
    ok = np.isfinite(lr) & np.isfinite(loss) & (lr > 0)
    title = "Learning-rate finder"
    if not ok.any():
        return message_figure(path, "no finite losses recorded", title=title)
    lr, loss = lr[ok], loss[ok]
    order = np.argsort(lr, kind="stable")
    lr, loss = lr[order], loss[order]
    fig = new_figure(7.5, 4.5)
    ax = fig.add_subplot()
    ax.plot(lr, loss, color="tab:blue", label="loss")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    # Keep the divergence spike at the end from flattening the interesting part.
    lo = float(loss.min())
    hi = float(max(loss[0], np.percentile(loss, 90)))
    if hi > lo:
        pad = 0.08 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
    if suggestion is not None and math.isfinite(to_float(suggestion)) and suggestion > 0:
        s = float(suggestion)
        ax.axvline(s, color="tab:red", ls="--", label=f"suggested lr = {s:.2e}")
        if lr[0] <= s <= lr[-1]:
            y = float(np.interp(math.log(s), np.log(lr), loss))
            ax.scatter([s], [y], color="tab:red", zorder=3)
        title = f"Learning-rate finder (suggested lr = {s:.2e})"
    ax.set_title(title)
    ax.legend()
    return save_png(fig, path, title=title)
