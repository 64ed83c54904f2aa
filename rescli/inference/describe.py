"""What a checkpoint or an export holds, as a plain dict (rescli info)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rescli.core.errors import RescliError


def describe_model(path: str | os.PathLike) -> dict[str, Any]:
    """Architecture, classes, image size, normalisation, metrics, versions of a checkpoint, run folder or export."""
    from rescli.inference.lookup import model_kind
    from rescli.inference.lookup import run_folder_to_file as _run_folder_to_file

    path = _run_folder_to_file(Path(path))
    if not path.exists():
        raise RescliError(f"{path}: no such file")
    if path.is_dir():
        raise RescliError(f"{path}: is a folder; pass a model file (a run folder's best.pt, or a .ts/.onnx export)")
    size_mb = round(path.stat().st_size / 1e6, 2)
    kind = model_kind(path)
    if kind in ("onnx", "torchscript"):
        from rescli.inference.exported import describe_export

        desc = describe_export(path)
        meta = desc["meta"]
        return {
            "file": str(path),
            "kind": kind,
            "size_mb": size_mb,
            "arch": meta.get("arch"),
            "classes": meta.get("classes"),
            "img_size": meta.get("img_size"),
            "mean": meta.get("mean"),
            "std": meta.get("std"),
            "temperature": meta.get("temperature"),
            "parameters": desc["parameters"],
            "metrics": meta.get("metrics", {}),
            "source": meta.get("source"),
            "created": meta.get("created"),
            "versions": meta.get("versions", {}),
            "trained_with": meta.get("trained_with", {}),
        }
    from rescli.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    metrics = ckpt.get("metrics", {})
    headline = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "val_accuracy", "ece", "best_epoch") if k in metrics}
    settings = ckpt.get("settings", {})
    return {
        "file": str(path),
        "kind": "checkpoint" + (" (with training state)" if "optimizer" in ckpt else ""),
        "size_mb": size_mb,
        "arch": ckpt["arch"],
        "arch_kwargs": ckpt.get("arch_kwargs", {}),
        "classes": ckpt["classes"],
        "img_size": ckpt["img_size"],
        "mean": ckpt["mean"],
        "std": ckpt["std"],
        "temperature": ckpt.get("temperature", 1.0),
        "parameters": sum(int(t.numel()) for k, t in ckpt["model"].items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))),
        "metrics": headline,
        "settings": {k: settings[k] for k in ("data_dir", "weights", "strategy_resolved", "epochs", "batch_size", "lr", "augment", "seed") if k in settings},
        "epoch": ckpt.get("epoch"),
        "versions": ckpt.get("versions", {}),
        "created": ckpt.get("created"),
    }
