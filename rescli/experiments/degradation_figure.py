"""The degradation experiment's figure: error per epoch, plain | residual panels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rescli.evaluation.figures import integer_ticks, new_figure, save_png

KINDS = ("plain", "resnet")


# Colour per depth, in depth order (paper's figure 6 uses one colour per depth in both panels).
COLORS = ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def degradation_figure(result: dict[str, Any]) -> Figure:
    """Two panels (plain | ResNet) of error (%) per epoch; training thin and dashed, validation bold."""
    fig = new_figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    depths = sorted({m["depth"] for m in result["models"]})
    color = {d: COLORS[i % len(COLORS)] for i, d in enumerate(depths)}
    titles = {"plain": "plain networks", "resnet": f"ResNets (shortcut {result.get('shortcut', 'A')})"}
    top = 0.0
    for ax, kind in zip(axes, KINDS):
        for m in sorted((m for m in result["models"] if m["kind"] == kind), key=lambda m: m["depth"]):
            ep = m["epochs"]
            tr = [100 * e for e in m["train_error"]]
            va = [100 * e for e in m["val_error"]]
            top = max([top, *tr, *va])
            ax.plot(ep, tr, color=color[m["depth"]], lw=1.0, ls="--", label=f"{m['name']} train",
                    gid=f"{m['arch']}:train")
            ax.plot(ep, va, color=color[m["depth"]], lw=2.6, label=m["name"], gid=f"{m['arch']}:val")
        ax.set_title(titles[kind])
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        integer_ticks(ax)
        handles = [Line2D([], [], color=color[m["depth"]], lw=2.6, label=m["name"])
                   for m in sorted((m for m in result["models"] if m["kind"] == kind), key=lambda m: m["depth"])]
        handles += [Line2D([], [], color="k", lw=1.0, ls="--", label="training error"),
                    Line2D([], [], color="k", lw=2.6, label="validation error")]
        ax.legend(handles=handles, loc="upper right", fontsize=9)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(0, min(100.0, max(5.0, top * 1.08)))
    r = result.get("recipe", {})
    fig.suptitle(f"Plain vs residual networks on {Path(result.get('data_dir', '')).name or 'data'}: "
                 f"{r.get('train_images', '?')} train / {r.get('val_images', '?')} val images, "
                 f"{r.get('img_size', '?')} px")
    return fig


def plot_degradation(result: dict[str, Any], path: str | os.PathLike) -> Path:
    return save_png(degradation_figure(result), path, title="rescli degradation")
