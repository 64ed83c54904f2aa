"""`rescli explain`: for each input, a heatmap of where the model looked for a label, written as an overlay PNG,
and a row with the label, its score and the heatmap's peak in the original picture's pixels."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rescli.core.errors import UsageError
from rescli.core.fileio import atomic_path
from rescli.core.paths import refuse_inside_data
from rescli.data.tasks import MULTI
from rescli.insight.batches import Item, decoded_batches, picture_loader
from rescli.insight.cam import activation_maps, check_method, overlay, peak_xy
from rescli.insight.network import StagedNet


def explain_batches(
    paths: Iterable[str],
    *,
    net: StagedNet,
    output_dir: str | os.PathLike,
    method: str = "gradcam",
    labels: Sequence[str] | None = None,
    raw_scores: bool = False,
    batch_size: int = 16,
    workers: int = 2,
) -> Iterator[list[dict[str, Any]]]:
    """One list of rows per batch, in input order: a row per explained label (path, label, score, overlay,
    peak_xy), or (path, error) for an input that could not be read.

    ``labels``: the classes to explain for every image (--label); None explains what the model predicts.
    """
    check_method(method)
    wanted = label_indices(labels, classes=net.classes)
    out = Path(output_dir)
    names = OverlayNames()
    temperature = 1.0 if raw_scores else net.temperature
    load = picture_loader(net.img_size, draft=False)
    for items in decoded_batches(paths, load=load, batch_size=batch_size, workers=workers):
        yield _explain(items, net=net, out=out, names=names, method=method, wanted=wanted, temperature=temperature)


def _explain(items: list[Item], *, net: StagedNet, out: Path, names: OverlayNames, method: str,
             wanted: list[int] | None, temperature: float) -> list[dict[str, Any]]:
    good = [i for i, (_, got, _) in enumerate(items) if got is not None]
    rows_at: dict[int, list[dict[str, Any]]] = {}
    if good:
        with torch.no_grad(), net.runtime.autocast():
            maps = net.explained_maps(net.inputs(torch.stack([items[i][1][1] for i in good])))
        with torch.no_grad():
            probs = net.probabilities(net.explained_head(maps.float()), temperature=temperature).cpu()
        targets = [list(wanted) if wanted is not None else predicted_labels(p, net=net) for p in probs]
        cams = activation_maps(maps, net.explained_head, targets, method=method)
        for i, image_targets, image_cams, p in zip(good, targets, cams, probs):
            path, (picture, _), _ = items[i]
            rows_at[i] = [
                _row(path, picture, cam, label=net.classes[k], score=float(p[k]), img_size=net.img_size, out=out,
                     names=names)
                for k, cam in zip(image_targets, image_cams)
            ]
    rows: list[dict[str, Any]] = []
    for i, (path, _, error) in enumerate(items):
        rows += rows_at[i] if i in rows_at else [{"path": path, "error": error}]
    return rows


def _row(path: str, picture: Any, cam: torch.Tensor, *, label: str, score: float, img_size: int, out: Path,
         names: OverlayNames) -> dict[str, Any]:
    width, height = picture.size
    peak = peak_xy(cam, img_size=img_size, width=width, height=height)
    target = out / names.next(path, label)
    with atomic_path(target) as tmp:
        overlay(picture, cam, peak=peak).save(tmp, format="PNG")
    return {"path": path, "label": label, "score": round(score, 6), "overlay": str(target), "peak_xy": peak}


def predicted_labels(probs: torch.Tensor, *, net: StagedNet) -> list[int]:
    """The labels the model predicts for one image, as predict decides them: its top class, or (multi-label) every
    label at or over its threshold, each explained in its own map and row. An image with no label over its
    threshold gets the map of its likeliest one, whose row shows the low score."""
    if net.task is MULTI:
        thresholds = torch.tensor(net.thresholds or [0.5] * len(probs))
        chosen = torch.nonzero(probs >= thresholds).flatten().tolist()
        if chosen:
            return [int(k) for k in chosen]
    return [int(probs.argmax())]


def label_indices(labels: Sequence[str] | None, *, classes: Sequence[str]) -> list[int] | None:
    if not labels:
        return None
    unknown = [name for name in labels if name not in classes]
    if unknown:
        raise UsageError(f"--label {', '.join(unknown)}: not a class of this model; its classes: {', '.join(classes)}")
    return [list(classes).index(name) for name in dict.fromkeys(labels)]


class OverlayNames:
    """File names for the overlays of one run: ``<stem>.<label>.png``; a stem met again (a.png in two folders)
    gets ``-2``, ``-3``..., so the same inputs in the same order give the same names every run."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.stems: dict[tuple[str, str], str] = {}

    def next(self, path: str, label: str) -> str:
        stem = _safe(Path(path).stem) or "image"
        key = (path, stem)
        if key not in self.stems:
            chosen, n = stem, 1
            while chosen in self.used:
                n += 1
                chosen = f"{stem}-{n}"
            self.used.add(chosen)
            self.stems[key] = chosen
        return f"{self.stems[key]}.{_safe(label) or 'label'}.png"


def _safe(text: str) -> str:
    """A file-name part: no separators or control characters, at most 100 characters."""
    return re.sub(r"[\x00-\x1f/\\:*?\"<>|]+", "_", text).strip(" .")[:100]


def check_output_dir(output_dir: str | os.PathLike, inputs: Sequence[str]) -> Path:
    """``output_dir``, made; never inside a folder given as input (its overlays would become inputs next time)."""
    out = Path(output_dir).expanduser()
    for item in inputs:
        if os.path.isdir(item):
            refuse_inside_data(out, item, what="--output")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out
