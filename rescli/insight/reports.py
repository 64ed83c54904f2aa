"""What evaluation and finetune's report take from insight: heatmaps of the worst mistakes (drawn in
top_losses.png, which the HTML report shows), and the validation split's label-issue suspects.

The validation split is out of sample for the model trained beside it, so its own probabilities judge those labels.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch

from rescli.core import events
from rescli.core.errors import RescliError
from rescli.insight.batches import picture_loader
from rescli.insight.cam import activation_maps, overlay, peak_xy
from rescli.insight.label_issues import issue_rows, rank_label_issues
from rescli.insight.network import StagedNet, open_network

#: How many suspects a finetune run's report lists.
REPORT_SUSPECTS = 10

#: {path: RGB uint8 overlay} for the mistakes given (path, predicted); the images that cannot be drawn are absent.
Heatmaps = Callable[[Sequence[dict[str, Any]]], dict[str, np.ndarray]]


def mistake_heatmaps(net: StagedNet, items: Sequence[dict[str, Any]], *, size: int = 256) -> dict[str, np.ndarray]:
    """The heatmap of each mistake's predicted label (why the model said it) over its picture, at most ``size`` px."""
    load = picture_loader(net.img_size, draft=False)
    out: dict[str, np.ndarray] = {}
    for item in items:
        path, predicted = str(item.get("path")), item.get("predicted")
        got = load(path)[1]
        if got is None or predicted not in net.classes:
            continue
        picture, image = got
        with torch.no_grad(), net.runtime.autocast():
            maps = net.explained_maps(net.inputs(image[None]))
        cam = activation_maps(maps, net.explained_head, [[net.classes.index(predicted)]])[0][0]
        peak = peak_xy(cam, img_size=net.img_size, width=picture.width, height=picture.height)
        out[path] = np.asarray(overlay(picture, cam, peak=peak, max_side=size))
    return out


def heatmaps_for_model(model: str | os.PathLike) -> Heatmaps | None:
    """mistake_heatmaps with the network of ``model``, or None where it has no layers to reach (ONNX, or not a
    ResNet): top_losses.png then shows the plain pictures. Loaded on the CPU when first asked."""
    state: dict[str, StagedNet] = {}

    def draw(items: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        if not items:
            return {}
        try:
            if "net" not in state:
                state["net"] = open_network(model, device="cpu", precision="fp32", what="heatmaps")
            return mistake_heatmaps(state["net"], items)
        except RescliError as exc:  # the figure is still drawn, without heatmaps
            events.info(f"top_losses.png without heatmaps: {exc}")
            return {}
        except Exception as exc:  # an optional layer on one figure must never cost a run its final evaluation
            events.warn(f"top_losses.png without heatmaps: {type(exc).__name__}: {exc}")
            return {}

    return draw


def validation_suspects(logits: np.ndarray, y_true: np.ndarray, paths: Sequence[str], classes: Sequence[str], *,
                        top: int = REPORT_SUSPECTS) -> list[dict[str, Any]]:
    """The validation images whose label is most probably wrong (path, given, suggested, score), by confident
    learning on the model's own (out-of-sample) probabilities."""
    if len(y_true) < 2 or logits.ndim != 2 or logits.shape[1] < 2:
        return []
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    ranking = rank_label_issues(probs, np.asarray(y_true))
    return issue_rows(ranking, paths=list(paths), given=[int(y) for y in y_true], classes=list(classes), top=top)


def label_issues_html(items: Any) -> str:
    """The report's table of suspects (escaped); a sentence where there are none."""
    rows = [it for it in items if isinstance(it, dict)] if isinstance(items, list) else []
    if not rows:
        return "<p>No suspects: confident learning counts every validation image under its given label.</p>"
    cells = "".join(
        f"<tr><td>{html.escape(os.path.basename(str(it.get('path', ''))))}</td><td>{html.escape(str(it.get('given')))}"
        f"</td><td>{html.escape(str(it.get('suggested')))}</td><td class=\"num\">{float(it.get('score', 0)):.3f}</td>"
        "</tr>" for it in rows)
    return ('<table><tr><th>image</th><th>given</th><th>suggested</th><th class="num">score</th></tr>'
            f'{cells}</table><p class="note">Validation images whose given label the model doubts most (1 - its '
            'probability of the given label), by confident learning: check these labels first. '
            '<code>rescli label-issues</code> judges every split.</p>')


def near_duplicate_embedder(method: str, model: str | None) -> Callable[[Sequence[str]], np.ndarray] | None:
    """For `rescli dataset --near-duplicates`: paths -> unit vectors by ``model`` (None when the method needs none).

    An image that cannot be read gets a zero vector, similar to nothing.
    """
    from rescli.core.errors import UsageError
    from rescli.data.near_duplicates import METHODS
    from rescli.insight.embed import embed_all

    if method not in METHODS:
        raise UsageError(f"--near-duplicates {method!r}: choose one of {', '.join(METHODS)}")
    if method not in ("embeddings", "both"):
        return None
    if not model:
        raise UsageError(f"--near-duplicates {method}: needs --model (a checkpoint, run folder or .ts export)")
    net = open_network(model, what="--near-duplicates embeddings")

    def embed(paths: Sequence[str]) -> np.ndarray:
        kept, vectors, _ = embed_all(iter(paths), net=net)
        row = {p: i for i, p in enumerate(kept)}
        out = np.zeros((len(paths), vectors.shape[1] if len(kept) else 1), dtype=np.float32)
        for i, p in enumerate(paths):
            if p in row:
                out[i] = vectors[row[p]]
        return out

    return embed
