"""What every evaluation figure shares: a Figure on the Agg canvas (no pyplot, no global backend switch, so safe
from any process: headless servers, notebooks, tests), written as a PNG atomically with a ``Title`` text chunk
(readable with ``PIL.Image.open(path).text``) so callers and tests can check what was drawn."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rescli.core.fileio import atomic_path, shown_name

DPI = 100


ARROW = "\u2192"


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, *, title: str, extra: dict | None = None) -> Path:
    """Write ``fig`` as a PNG atomically and return the final path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Title": title, "Software": "rescli"}
    if extra:
        metadata.update({k: str(v) for k, v in extra.items()})
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=metadata)
    return target


def message_figure(path: str | os.PathLike, message: str, *, title: str) -> Path:
    fig = new_figure(6, 3)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, transform=ax.transAxes)
    ax.set_title(title)
    return save_png(fig, path, title=title)


def short_label(text: str, limit: int = 24) -> str:
    text = shown_name(str(text))  # matplotlib cannot draw the bytes of a name that is not UTF-8
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def to_float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def integer_ticks(ax: Axes) -> None:
    """Whole numbers only on the x axis (epochs): matplotlib's default locator, told so."""
    locator = ax.xaxis.get_major_locator()
    if isinstance(locator, MaxNLocator):  # the default AutoLocator is one
        locator.set_params(integer=True)
