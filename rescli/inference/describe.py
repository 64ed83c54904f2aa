"""What a checkpoint or an export holds, as a plain dict (rescli info); the file is loaded and checked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rescli.core.errors import RescliError
from rescli.data.tasks import SINGLE_LABEL
from rescli.inference.lookup import model_kind, run_folder_to_file
from rescli.inference.onnx_export import describe_onnx
from rescli.inference.openvino_export import describe_openvino
from rescli.inference.torchscript_export import describe_torchscript
from rescli.models.checkpoint import load_checkpoint, model_fields

HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "val_accuracy", "ece", "best_epoch")


SHOWN_SETTINGS = ("data_dir", "weights", "strategy_resolved", "epochs", "batch_size", "lr", "augment", "seed")


# Buffers, not weights: BatchNorm's running statistics are not counted as parameters.
_NOT_PARAMETERS = ("running_mean", "running_var", "num_batches_tracked")


def describe_model(path: str | os.PathLike) -> dict[str, Any]:
    """Architecture, classes, image size, normalisation, metrics, versions of a checkpoint, run folder or export."""
    path = run_folder_to_file(Path(path))
    if not path.exists():
        raise RescliError(f"{path}: no such file")
    if path.is_dir():
        raise RescliError(f"{path}: is a folder; pass a model file (a run folder's best.pt, or a .ts/.onnx/.xml "
                          f"export)")
    size_mb = round(path.stat().st_size / 1e6, 2)
    kind = model_kind(path)
    if kind == "checkpoint":
        return _describe_checkpoint(path, size_mb=size_mb)
    return _describe_export(path, kind=kind, size_mb=size_mb)


_DESCRIBE = {"torchscript": describe_torchscript, "onnx": describe_onnx, "openvino": describe_openvino}


def _describe_export(path: Path, *, kind: str, size_mb: float) -> dict[str, Any]:
    desc = _DESCRIBE[kind](path)
    meta = desc["meta"]
    deployment = meta.get("deployment") or {}
    if kind == "openvino":  # the weights are in the .bin beside the .xml
        size_mb = round(size_mb + path.with_suffix(".bin").stat().st_size / 1e6, 2)
    shown = ("arch", "classes", "img_size", "mean", "std", "temperature")
    return {
        "file": str(path),
        "kind": kind + (f" {deployment['precision']}" if deployment.get("precision") == "int8" else ""),
        "size_mb": size_mb,
        "task": meta.get("task", SINGLE_LABEL),  # an export from before tasks is single-label
        **{k: meta.get(k) for k in shown},
        **({"thresholds": meta["thresholds"]} if meta.get("thresholds") is not None else {}),
        # an int8 ONNX file holds its weights as int8, which describe_onnx does not count: the export's record does
        "parameters": deployment.get("parameters", desc["parameters"]),
        "metrics": meta.get("metrics", {}),
        **_deployment_rows(deployment),
        "source": meta.get("source"),
        "created": meta.get("created"),
        "versions": meta.get("versions", {}),
        "trained_with": meta.get("trained_with", {}),
    }


def _deployment_rows(deployment: dict[str, Any]) -> dict[str, Any]:
    """What an export checked on the validation split carries: how it was quantised, and how it compared with the
    checkpoint (label agreement, accuracy of both, the largest score difference) on which images."""
    if not deployment:
        return {}
    check = deployment.get("check") or {}
    figures = ("images", "agreement", "accuracy_checkpoint", "accuracy_export", "accuracy_drop_points",
               "max_score_difference", "min_agreement", "max_drop_points")
    quantisation = deployment.get("quantisation") or {}
    return {
        "engine": f"{deployment.get('engine')} {deployment.get('precision')}"
                  + (f" (checked at {deployment['inference_precision']})" if deployment.get("inference_precision")
                     else ""),
        "quantisation": {k: quantisation[k] for k in ("method", "calibration_images", "calibration_source")
                         if k in quantisation},
        "checked_on": check.get("on"),
        "check": {k: check[k] for k in figures if check.get(k) is not None},
    }


def _describe_checkpoint(path: Path, *, size_mb: float) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    metrics = ckpt.get("metrics", {})
    settings = ckpt.get("settings", {})
    return {
        "file": str(path),
        "kind": "checkpoint" + (" (with training state)" if "optimizer" in ckpt else ""),
        "size_mb": size_mb,
        **model_fields(ckpt),
        "parameters": sum(int(t.numel()) for k, t in ckpt["model"].items() if not k.endswith(_NOT_PARAMETERS)),
        "metrics": {k: metrics[k] for k in HEADLINE_METRICS if k in metrics},
        "settings": {k: settings[k] for k in SHOWN_SETTINGS if k in settings},
        "epoch": ckpt.get("epoch"),
        "versions": ckpt.get("versions", {}),
        "created": ckpt.get("created"),
    }
