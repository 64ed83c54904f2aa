"""The images an int8 export is calibrated on, and the check an export passes before it is kept: the export and
the checkpoint's own network on the checkpoint's validation split (its ``data`` record, file for file), compared
label for label (agreement), by accuracy, and by the largest difference of any calibrated score.

Every image goes through rescli's preprocessing (the checkpoint's transform), as it will in predict.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rescli.core import events
from rescli.core.errors import RescliError, UsageError
from rescli.data.images import load_rgb
from rescli.data.loading import ImageSamples, make_loader
from rescli.data.tasks import MULTI, Label, task_named
from rescli.data.transforms import build_transform
from rescli.inference.inputs import BadInput, iter_input_paths
from rescli.inference.predictor import Predictor

Sample = tuple[str, Label]  # (path, label as its task holds it: a class index, or an image's class indices)


@dataclass(frozen=True)
class Limits:
    """What an export must reach to be kept: label agreement (a fraction) and accuracy drop (percentage points)."""

    min_agreement: float = 0.99
    max_drop: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise UsageError(f"--min-agreement {self.min_agreement}: a fraction of the images, from 0 to 1")
        if not 0.0 <= self.max_drop <= 100.0:
            raise UsageError(f"--max-drop {self.max_drop}: percentage points of accuracy, from 0 to 100")


def validation_samples(ckpt: dict[str, Any]) -> tuple[list[Sample], str] | None:
    """The checkpoint's validation split, (path, label) per image, and where it is; None when the checkpoint has no
    record of it or its folder is gone."""
    record = ckpt.get("data") or {}
    val = (record.get("splits") or {}).get("val") or {}
    root = record.get("root")
    if not root or not val.get("paths") or not Path(root).is_dir():
        return None
    task = task_named(ckpt.get("task"))
    samples = [(str(Path(root) / rel), task.from_record(y)) for rel, y in zip(val["paths"], val["labels"])]
    return samples, f"the validation split of {root}"


def calibration_paths(*, ckpt: dict[str, Any], calibrate: str | os.PathLike | None) -> tuple[list[str], str]:
    """The images int8 calibration may draw on: ``calibrate`` (a folder, any images), else the validation split."""
    if calibrate is not None:
        folder = Path(calibrate).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--calibrate {folder}: no such folder")
        paths = [p for p in iter_input_paths([str(folder)]) if not isinstance(p, BadInput)]
        if not paths:
            raise UsageError(f"--calibrate {folder}: no images found in this folder")
        return paths, str(folder)
    val = validation_samples(ckpt)
    if val is None:
        root = (ckpt.get("data") or {}).get("root")
        where = f"its validation images ({root}) are gone" if root else "it has no record of its validation images"
        raise UsageError(f"int8 needs calibration images, and {where}: pass --calibrate DATA_DIR (a folder of images "
                         f"like the ones the model will see)")
    return [p for p, _ in val[0]], val[1]


def calibration_images(paths: Sequence[str], *, count: int, img_size: int) -> list[torch.Tensor]:
    """Up to ``count`` of ``paths``, evenly spread over them (class folders come in order), decoded and preprocessed;
    unreadable files are passed over."""
    if count < 1:
        raise UsageError("--calibration-images must be at least 1")
    step = max(1.0, len(paths) / count)
    chosen = [paths[int(i * step)] for i in range(min(count, len(paths)))]
    transform = build_transform(img_size=img_size, train=False)
    images = []
    with events.counting("calibration images", len(chosen)) as advance:
        for path in chosen:
            try:
                images.append(transform(load_rgb(path, draft_size=img_size)))
            except RescliError:
                pass
            advance()
    if not images:
        raise RescliError(f"none of the {len(chosen)} calibration image(s) could be read (the first: {chosen[0]})")
    return images


def compare(reference: Predictor, export: Predictor, *, samples: Sequence[Sample], labelled: bool,
            batch_size: int = 32) -> dict[str, Any]:
    """The export against ``reference`` (the checkpoint's network) on ``samples``: label agreement, the accuracy of
    each (when ``labelled``), and the largest difference of any calibrated score; images that cannot be read are
    counted and left out.

    Multi-label: agreement and accuracy count (image, label) decisions at the checkpoint's thresholds, as
    hamming loss does (an image holds one decision per label, and one score near its threshold would otherwise
    count the other nine as disagreeing too); ``identical_label_sets`` is the share of images whose whole set of
    labels is the checkpoint's."""
    multi = reference.task is MULTI
    dataset = ImageSamples(list(samples), reference.transform(), draft_size=reference.img_size,
                           task=reference.task, n_classes=len(reference.classes))
    thresholds = torch.tensor(reference.thresholds or [0.5] * len(reference.classes))
    agree = right_reference = right_export = seen = decisions = identical = 0
    worst = 0.0
    with events.counting("checking the export", len(samples)) as advance:
        for batch in make_loader(dataset, batch_size=batch_size, shuffle=False, workers=0):
            if not batch.labels.numel():
                continue
            ref, got = reference.logits(batch.images).float(), export.logits(batch.images).float()
            if multi:
                scores = [torch.sigmoid(x / reference.temperature) for x in (ref, got)]
                ref_label, got_label = (scores[0] >= thresholds), (scores[1] >= thresholds)
                truth = batch.labels >= 0.5
                agree += int((ref_label == got_label).sum())
                identical += int((ref_label == got_label).all(dim=1).sum())
                right_reference += int((ref_label == truth).sum())
                right_export += int((got_label == truth).sum())
                decisions += truth.numel()
            else:
                scores = [torch.softmax(x / reference.temperature, dim=1) for x in (ref, got)]
                ref_label, got_label = ref.argmax(1), got.argmax(1)
                agree += int((ref_label == got_label).sum())
                right_reference += int((ref_label == batch.labels).sum())
                right_export += int((got_label == batch.labels).sum())
                decisions += len(batch.labels)
            worst = max(worst, float((scores[0] - scores[1]).abs().max()))
            seen += len(batch.labels)
            for _ in range(len(batch.labels) + len(batch.failures)):
                advance()
    if not seen:
        raise RescliError(f"none of the {len(samples)} check image(s) could be read (the first: {samples[0][0]})")
    result: dict[str, Any] = {"images": seen, "unreadable": len(samples) - seen, "agreement": agree / decisions,
                              "max_score_difference": worst}
    if multi:
        result.update(agreement_of="label decisions (image x label)", identical_label_sets=identical / seen)
    if labelled:
        result.update(accuracy_checkpoint=right_reference / decisions, accuracy_export=right_export / decisions,
                      accuracy_drop_points=100.0 * (right_reference - right_export) / decisions)
    return result


def failures(check: dict[str, Any], *, limits: Limits) -> list[str]:
    """What the check fell short of, one phrase each; empty when the export may be kept."""
    found = []
    if check["agreement"] < limits.min_agreement:
        found.append(f"label agreement with the checkpoint {100 * check['agreement']:.2f}% is below --min-agreement "
                     f"{100 * limits.min_agreement:.2f}% by {100 * (limits.min_agreement - check['agreement']):.2f} "
                     f"points")
    drop = check.get("accuracy_drop_points")
    if drop is not None and drop > limits.max_drop:
        found.append(f"accuracy fell from {100 * check['accuracy_checkpoint']:.2f}% to "
                     f"{100 * check['accuracy_export']:.2f}%, {drop:.2f} points, beyond --max-drop {limits.max_drop:g} "
                     f"by {drop - limits.max_drop:.2f}")
    return found
