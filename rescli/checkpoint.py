"""Self-describing checkpoints and atomic file writes.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
``torch.load(..., weights_only=True)``: no pickled code runs when a user opens a file
someone sent them. Every file a run writes goes through a temp file + rename, so a kill at
any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from rescli import __version__
from rescli.errors import RescliError
from rescli.fileio import atomic_write_bytes, json_default

FORMAT = "rescli-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("arch", "classes", "img_size", "mean", "std", "model")


def versions() -> dict[str, str]:
    import torchvision

    return {
        # str(): torch.__version__ is a TorchVersion object, which the weights_only loader refuses.
        "rescli": str(__version__),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def make_checkpoint(
    *,
    model_state: dict[str, torch.Tensor],
    arch: str,
    classes: list[str],
    img_size: int,
    mean: list[float],
    std: list[float],
    arch_kwargs: dict[str, Any] | None = None,
    temperature: float = 1.0,
    settings: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    **training_state: Any,
) -> dict[str, Any]:
    """Assemble the checkpoint dict. ``training_state`` (optimizer, epoch, ...) goes in last.pt only."""
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "classes": list(classes),
        "img_size": int(img_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "temperature": float(temperature),
        # Detached CPU copies: the live model keeps training while this dict is written.
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model_state.items()},
        "settings": _plain(settings or {}),
        "metrics": _plain(metrics or {}),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    ckpt.update(training_state)
    return ckpt


def _plain(obj: Any) -> Any:
    """JSON round trip: only types the weights_only unpickler accepts survive."""
    return json.loads(json.dumps(obj, default=json_default))


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a rescli checkpoint; any problem is one clear RescliError naming the file."""
    path = Path(path)
    if not path.exists():
        raise RescliError(f"{path}: no such file")
    if path.is_dir():
        raise RescliError(f"{path}: is a folder; pass a checkpoint file such as {path / 'best.pt'}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for foreign/corrupt files
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        # torch's message is long; the line naming the refused type (if any) is the useful one.
        reason = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        raise RescliError(
            f"{path}: not a readable rescli checkpoint (corrupt, truncated, or not a weights-only torch file): {reason[:200]}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RescliError(
            f"{path}: not a rescli checkpoint (no '{FORMAT}' marker); to start from plain ResNet weights use --weights {path}"
        )
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise RescliError(
            f"{path}: written by a newer rescli (format {ckpt.get('format_version')}); upgrade rescli to read it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise RescliError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def is_rescli_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT
