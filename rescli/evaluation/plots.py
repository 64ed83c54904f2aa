"""Evaluation figures written as PNG files, from plain arrays.

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot, no global backend switch, so it is safe
to call from any process (headless servers, notebooks, tests). Every function writes its PNG atomically (temp file
in the same directory, then ``os.replace``) and returns the path. Each PNG also carries a ``Title`` text chunk
(readable with ``PIL.Image.open(path).text``) so callers and tests can check what was drawn.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rescli.core.errors import RescliError
from rescli.core.fileio import atomic_path, shown_name
from rescli.evaluation.calibration import (
    expected_calibration_error,
    reliability_bins,
    softmax,
)

DPI = 100


_ARROW = "\u2192"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike, *, title: str, extra: dict | None = None) -> Path:
    """Write ``fig`` as a PNG atomically and return the final path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Title": title, "Software": "rescli"}
    if extra:
        metadata.update({k: str(v) for k, v in extra.items()})
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=metadata)
    return target


def _message_figure(path, message: str, *, title: str) -> Path:
    fig = _new_figure(6, 3)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, transform=ax.transAxes)
    ax.set_title(title)
    return _save(fig, path, title=title)


def _short(text: str, limit: int = 24) -> str:
    text = shown_name(str(text))  # matplotlib cannot draw the bytes of a name that is not UTF-8
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _to_float(value) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _check_cm(cm, labels) -> np.ndarray:
    arr = np.asarray(cm)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise RescliError(f"confusion matrix must be square, got shape {arr.shape}")
    if len(labels) != arr.shape[0]:
        raise RescliError(f"confusion matrix has {arr.shape[0]} classes but {len(labels)} labels were given")
    return arr


def confusion_subset(cm: np.ndarray, labels: list[str], max_classes: int = 30) -> tuple[np.ndarray, list[str], list[int]]:
    """The part of ``cm`` that ``plot_confusion_matrix`` shows: ``(sub_cm, sub_labels, indices)``.

    With at most ``max_classes`` classes everything is kept. Otherwise keeps the ``max_classes`` classes most involved
    in confusions (off-diagonal mass of their row plus their column; ties broken by support, then index), in their
    original order.
    """
    arr = _check_cm(cm, labels)
    n = arr.shape[0]
    if max_classes < 1:
        raise RescliError(f"max_classes must be at least 1, got {max_classes}")
    if n <= max_classes:
        return arr, [str(x) for x in labels], list(range(n))
    a = arr.astype(np.float64)
    off = a.copy()
    np.fill_diagonal(off, 0.0)
    involvement = off.sum(axis=1) + off.sum(axis=0)
    support = a.sum(axis=1)
    order = sorted(range(n), key=lambda i: (-involvement[i], -support[i], i))
    keep = sorted(order[:max_classes])
    return arr[np.ix_(keep, keep)], [str(labels[i]) for i in keep], keep


def most_confused(cm: np.ndarray, labels: list[str], *, k: int = 10) -> list[dict]:
    """The ``k`` largest off-diagonal cells: ``[{"true", "predicted", "count"}]``, count descending, count > 0."""
    arr = _check_cm(cm, labels)
    n = arr.shape[0]
    pairs = [
        (int(arr[i, j]) if float(arr[i, j]).is_integer() else float(arr[i, j]), i, j)
        for i in range(n)
        for j in range(n)
        if i != j and arr[i, j] > 0
    ]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": str(labels[i]), "predicted": str(labels[j]), "count": c} for c, i, j in pairs[: max(0, int(k))]]


def plot_confusion_matrix(cm: np.ndarray, labels: list[str], path, *, max_classes: int = 30) -> Path:
    """Two panels, counts and row-normalised (recall on the diagonal). See ``confusion_subset`` for > max_classes."""
    arr = _check_cm(cm, labels)
    n_total = arr.shape[0]
    if n_total == 0:
        return _message_figure(path, "no classes", title="Confusion matrix")
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
    fig = _new_figure(2 * panel + 1.2, panel + 0.8)
    fig.suptitle(title, fontsize=12)
    tick_size = 10 if n <= 12 else 9 if n <= 20 else 8
    annotate = n <= 30
    ticks = np.arange(n)
    short = [_short(s, 22) for s in names]
    for col, (data, sub_title, fmt, vmax) in enumerate([
        (counts, "Counts", "count", counts.max() if counts.size else 1.0),
        (normed, "Normalised by true class (row)", "frac", 1.0),
    ]):
        ax = fig.add_subplot(1, 2, col + 1)
        vmax = float(vmax) if vmax > 0 else 1.0
        im = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="equal")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(sub_title, fontsize=11)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels(short, rotation=60 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=tick_size)
        ax.set_yticklabels(short, fontsize=tick_size)
        if annotate:
            cell_size = 9 if n <= 10 else 7.5 if n <= 18 else 6
            for i in range(n):
                for j in range(n):
                    v = data[i, j]
                    if fmt == "count":
                        if v == 0:
                            continue
                        text = f"{int(v)}" if float(v).is_integer() else f"{v:.2g}"
                    else:
                        if v == 0:
                            continue
                        text = f"{v:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=cell_size,
                            color="white" if v > 0.55 * vmax else "black")
    # The drawn numbers travel in the PNG's text chunks, so a reader (or a test) can check the figure against metrics.json.
    return _save(fig, path, title=title, extra={
        "Classes shown": n, "Classes total": n_total,
        "Labels": json.dumps(names), "Counts": json.dumps(sub.tolist()),
    })


def plot_curves(history: list[dict], path) -> Path:
    """Left: train/val loss per epoch. Right: validation accuracy per epoch. Values may be strings (from CSV)."""
    rows = []
    for i, row in enumerate(history or []):
        epoch = _to_float(row.get("epoch", i + 1))
        rows.append((epoch if math.isfinite(epoch) else float(i + 1),
                     _to_float(row.get("train_loss")), _to_float(row.get("val_loss")),
                     _to_float(row.get("val_accuracy"))))
    if not rows:
        return _message_figure(path, "no training history", title="Training curves")
    rows.sort(key=lambda r: r[0])
    epochs = np.array([r[0] for r in rows])
    train_loss = np.array([r[1] for r in rows])
    val_loss = np.array([r[2] for r in rows])
    val_acc = np.array([r[3] for r in rows])

    title = "Training curves"
    fig = _new_figure(11, 4.2)
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
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path, title=title)


def _load_thumbnail(path, size: int = 256):
    """An RGB thumbnail as a uint8 array, or None when the file cannot be read."""
    from PIL import Image

    img = None
    try:
        from rescli.data.images import load_rgb
    except Exception:  # module missing or broken: plain PIL
        load_rgb = None
    try:
        if load_rgb is not None:
            try:
                img = load_rgb(path)
            except TypeError:  # signature we do not know: fall back to PIL
                img = None
        if img is None:
            with Image.open(path) as raw:
                raw.draft("RGB", (size, size))
                img = raw.convert("RGB")
        if isinstance(img, np.ndarray):
            img = Image.fromarray(np.asarray(img, dtype=np.uint8)).convert("RGB")
        elif not isinstance(img, Image.Image):
            return None
        else:
            img = img.convert("RGB")
        img.thumbnail((size, size))
        return np.asarray(img)
    except Exception:
        return None


def plot_top_losses(items: list[dict], path, *, max_items: int = 16) -> Path:
    """Grid of the highest-loss images titled ``true → predicted (score)``; unreadable files become grey tiles."""
    items = sorted(items or [], key=lambda it: -_to_float(it.get("loss")) if math.isfinite(_to_float(it.get("loss"))) else math.inf)
    items = items[: max(0, int(max_items))]
    if not items:
        return _message_figure(path, "no mistakes", title="Top losses")
    n = len(items)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    title = f"Top {n} losses (true {_ARROW} predicted (probability of predicted))"
    fig = _new_figure(3.0 * cols, 3.2 * rows + 0.5)
    fig.suptitle(title, fontsize=11)
    grey = np.full((64, 64, 3), 200, dtype=np.uint8)
    for k, item in enumerate(items):
        ax = fig.add_subplot(rows, cols, k + 1)
        thumb = _load_thumbnail(item.get("path"))
        ax.imshow(grey if thumb is None else thumb)
        if thumb is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes, color="dimgray")
        ax.set_xticks([])
        ax.set_yticks([])
        score = _to_float(item.get("score"))
        loss = _to_float(item.get("loss"))
        label = f"{_short(item.get('true', '?'), 16)} {_ARROW} {_short(item.get('predicted', '?'), 16)}"
        score_txt = f"({score:.2f})" if math.isfinite(score) else ""
        loss_txt = f"loss {loss:.2f}" if math.isfinite(loss) else ""
        ax.set_title(f"{label} {score_txt}\n{loss_txt}".strip(), fontsize=9, color="firebrick")
    drawn = [{"path": str(it.get("path")), "true": str(it.get("true")), "predicted": str(it.get("predicted")),
              "score": _to_float(it.get("score")), "loss": _to_float(it.get("loss"))} for it in items]
    return _save(fig, path, title=title, extra={"Items": json.dumps(drawn)})


def _reliability_panel(ax_top, ax_bottom, probs, labels, n_bins: int, name: str, color: str) -> float:
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    ece = expected_calibration_error(probs, labels, n_bins=n_bins)
    width = 1.0 / n_bins
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    acc = [b["accuracy"] if b["count"] else 0.0 for b in bins]
    conf = [b["confidence"] if b["count"] else None for b in bins]
    ax_top.bar(centers, acc, width=width, color=color, edgecolor="black", linewidth=0.5, alpha=0.85,
               label=f"accuracy ({name}), ECE = {ece:.4f}")
    # Gap between accuracy and mean confidence, per non-empty bin.
    gap_x = [c for c, b in zip(centers, bins) if b["count"]]
    gap_lo = [min(a, cf) for a, cf, b in zip(acc, conf, bins) if b["count"]]
    gap_h = [abs(a - cf) for a, cf, b in zip(acc, conf, bins) if b["count"]]
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


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path, *, n_bins: int = 15,
                     temperature: float | None = None, logits: np.ndarray | None = None) -> Path:
    """Reliability diagram (accuracy vs confidence per bin, diagonal) with ECE in the legend and a confidence histogram.

    If both ``logits`` and ``temperature`` are given, draws two panels computed from the logits: before
    (``softmax(logits)``) and after (``softmax(logits / temperature)``) temperature scaling; ``probs`` is then unused.
    """
    labels = np.asarray(labels)
    if logits is not None and temperature is not None:
        panels = [(softmax(logits), "before: T = 1", "tab:gray"),
                  (softmax(logits, temperature), f"after: T = {temperature:.3g}", "tab:blue")]
    else:
        panels = [(np.asarray(probs, dtype=np.float64), "model", "tab:blue")]
    if labels.size == 0:
        return _message_figure(path, "no samples", title="Reliability diagram")
    fig = _new_figure(5.2 * len(panels) + 0.4, 6.2)
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    eces = []
    for col, (p, name, color) in enumerate(panels):
        ax_top = fig.add_subplot(grid[0, col])
        ax_bottom = fig.add_subplot(grid[1, col], sharex=ax_top)
        eces.append(_reliability_panel(ax_top, ax_bottom, p, labels, n_bins, name, color))
    if len(eces) == 2:
        title = f"Reliability diagram: ECE {eces[0]:.4f} {_ARROW} {eces[1]:.4f} with temperature scaling"
        extra = {"ECE before": repr(eces[0]), "ECE": repr(eces[1]), "Temperature": repr(float(temperature))}
    else:
        title = f"Reliability diagram: ECE {eces[0]:.4f}"
        extra = {"ECE": repr(eces[0])}
    fig.suptitle(title, fontsize=12)
    return _save(fig, path, title=title, extra=extra)


def plot_lr_find(lrs: list[float], losses: list[float], path, *, suggestion: float | None = None) -> Path:
    """Loss vs learning rate on a log x axis; the suggested learning rate marked with a vertical line."""
    lr = np.array([_to_float(v) for v in lrs or []], dtype=np.float64)
    loss = np.array([_to_float(v) for v in losses or []], dtype=np.float64)
    if lr.shape != loss.shape:
        raise RescliError(f"lrs and losses differ in length ({lr.size} vs {loss.size})")
    ok = np.isfinite(lr) & np.isfinite(loss) & (lr > 0)
    title = "Learning-rate finder"
    if not ok.any():
        return _message_figure(path, "no finite losses recorded", title=title)
    lr, loss = lr[ok], loss[ok]
    order = np.argsort(lr, kind="stable")
    lr, loss = lr[order], loss[order]
    fig = _new_figure(7.5, 4.5)
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
    if suggestion is not None and math.isfinite(_to_float(suggestion)) and suggestion > 0:
        s = float(suggestion)
        ax.axvline(s, color="tab:red", ls="--", label=f"suggested lr = {s:.2e}")
        if lr[0] <= s <= lr[-1]:
            y = float(np.interp(math.log(s), np.log(lr), loss))
            ax.scatter([s], [y], color="tab:red", zorder=3)
        title = f"Learning-rate finder (suggested lr = {s:.2e})"
    ax.set_title(title)
    ax.legend()
    return _save(fig, path, title=title)
