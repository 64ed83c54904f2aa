"""Self-describing checkpoints: saving, loading (weights only), and the checks every model file passes.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
``torch.load(..., weights_only=True)``: no pickled code runs when a user opens a file
someone sent them, whatever is inside it (``load_weights_only``, also used for ``--weights``).
Every file a run writes goes through a temp file + rename, so a kill at
any moment leaves either the old file or the new one, never half of one.

``check_model_metadata`` is the one validation of what a model file says about itself (classes,
image size, mean/std, temperature, task and thresholds), shared by checkpoints and the TorchScript/ONNX exports.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import platform
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from rescli import __version__
from rescli.core.errors import RescliError, first_line
from rescli.core.fileio import atomic_write_bytes, json_default
from rescli.data.tasks import SINGLE_LABEL, task_field_problem
from rescli.models.registry import arch_spec, check_arch_kwargs, create_model, head_prefix

FORMAT = "rescli-checkpoint"


FORMAT_VERSION = 1


REQUIRED_KEYS = ("arch", "classes", "img_size", "mean", "std", "model")


# A crafted img_size of 10**6 would ask for terabytes of pixels before anything else could fail.
MAX_IMG_SIZE = 8192


def versions() -> dict[str, str]:
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
    task: str = SINGLE_LABEL,
    thresholds: list[float] | None = None,
    **training_state: Any,
) -> dict[str, Any]:
    """Assemble the checkpoint dict. ``training_state`` (optimizer, epoch, ...) goes in last.pt only.

    ``thresholds``: multi-label, each class's decision threshold (tuned on the validation split), else absent.
    """
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "task": task,
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
    if thresholds is not None:
        ckpt["thresholds"] = [float(t) for t in thresholds]
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
    ckpt = load_weights_only(path, map_location=map_location, what=f"{path}: not a readable rescli checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RescliError(
            f"{path}: not a rescli checkpoint (no '{FORMAT}' marker); "
            f"to start from plain ResNet weights use --weights {path}"
        )
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise RescliError(
            f"{path}: written by a newer rescli (format {ckpt.get('format_version')}); upgrade rescli to read it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise RescliError(f"{path}: checkpoint lacks {', '.join(missing)}")
    check_checkpoint(ckpt, path=path)
    return ckpt


def load_weights_only(path: Path, *, map_location: str | torch.device = "cpu", what: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers, and nothing runs.

    A TorchScript archive is refused before torch sees it (it is a program, whatever its name says). Any
    failure is one RescliError ``"{what}: {why}"``; ``why`` names what was refused and, unlike torch's own
    message, never suggests loading the file with its code.
    """
    if _is_torchscript_archive(path):
        raise RescliError(
            f"{what}: it is a TorchScript program, which runs code when opened; rescli opens TorchScript only from "
            f"files named .ts or .torchscript (rename it only if it is your own export)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for foreign, corrupt or refused files
        raise RescliError(f"{what}: {_why_not_loaded(exc, path)}") from None


def _is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a zip holding TorchScript code (``torch.jit.save`` writes code/ and constants.pkl)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name or name.endswith("constants.pkl") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# torch's refusals name the offending global or callable in one of these forms (2.4 to 2.14).
_REFUSED_OBJECT = (
    re.compile(r"GLOBAL (\S+)"),
    re.compile(r"call reduce for unrecognized function (.+?)(?: which belongs to|$)", re.MULTILINE),
    re.compile(r"Can only create new object for .*? but got (.+)$", re.MULTILINE),
    re.compile(r"``(torch\.\S+)`` must be imported to load"),
)


# Lines of torch's message that advise loading the file anyway, or point at torch's own docs.
_UNSAFE_ADVICE = (
    "weights_only", "weights only", "trusted source", "safe_globals", "trust", "documentation", "file an issue",
)


def _why_not_loaded(exc: Exception, path: Path) -> str:
    text = str(exc)
    for pattern in _REFUSED_OBJECT:
        found = pattern.search(text)
        if found:
            refused = found.group(1).strip().rstrip(".")[:100]
            return (f"it holds code or an object that rescli will not load ({refused}); nothing in it was run. "
                    "rescli reads only tensors, numbers and strings from a .pt file")
    if _looks_like_onnx(path):
        return "it looks like an ONNX model; rescli opens ONNX models from files named .onnx"
    reason = "corrupt, truncated, or not a weights-only torch file"
    if isinstance(exc, EOFError):
        return f"{reason} (it ends early)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln.removeprefix("WeightsUnpickler error:").strip() for ln in lines]
    safe = [ln for ln in lines if ln and not any(word in ln.lower() for word in _UNSAFE_ADVICE)]
    return f"{reason}: {safe[0][:160] if safe else type(exc).__name__}"


def _looks_like_onnx(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:1] == b"\x08" and head[2:3] == b"\x12"  # ModelProto: ir_version, then producer_name


def check_model_metadata(
    meta: Mapping[str, Any], *, path: str | os.PathLike, outputs: int | None = None, fix: str = "",
) -> None:
    """The fields a model file's user relies on, for checkpoints and exports alike; one RescliError naming the
    file and the field otherwise. ``outputs``: the number of logits the network produces, when known.

    Each check stands for a failure further on: a std of 0 divides by zero, a temperature of 0 turns every
    score into NaN (invalid JSON), more logits than classes label images with names they do not have, a task
    rescli does not know would read the logits wrongly. Files from before tasks existed are single-label.
    """
    fix = f"; {fix}" if fix else ""

    def bad(field: str, problem: str) -> RescliError:
        shown = repr(meta.get(field))
        return RescliError(f"{path}: {field} {shown[:80]}{'...' if len(shown) > 80 else ''}: {problem}{fix}")

    classes = meta.get("classes")
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise bad("classes", "expected a non-empty list of class names")
    duplicates = sorted({c for c in classes if list(classes).count(c) > 1})
    if duplicates:
        raise bad("classes", f"names {', '.join(map(repr, duplicates[:3]))} more than once")
    img_size = meta.get("img_size")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not 1 <= img_size <= MAX_IMG_SIZE:
        raise bad("img_size", f"expected a whole number of pixels from 1 to {MAX_IMG_SIZE}")
    for field in ("mean", "std"):
        values = meta.get(field)
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(_is_finite(v) for v in values):
            raise bad(field, "expected 3 finite numbers, one per RGB channel")
    if not all(v > 0 for v in meta["std"]):
        raise bad("std", "every value must be above 0 (pixels are divided by it)")
    temperature = meta.get("temperature", 1.0)
    if not _is_finite(temperature) or not temperature > 0:
        raise bad("temperature", "expected a finite number above 0 (logits are divided by it)")
    problem = task_field_problem(meta)
    if problem is not None:
        raise bad(*problem)
    if outputs is not None and outputs != len(classes):
        raise bad("classes", f"{len(classes)} names, but the model outputs {outputs} logits (one per class expected)")


def check_checkpoint(ckpt: Mapping[str, Any], *, path: str | os.PathLike) -> None:
    """check_model_metadata, plus what only a checkpoint has: an architecture rescli knows and its weights."""
    state = ckpt.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RescliError(f"{path}: model: expected a state_dict (names to tensors); the file was altered or damaged")
    head = state.get(f"{head_prefix()}weight")
    outputs = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None
    check_model_metadata(ckpt, path=path, outputs=outputs, fix="the file was altered or damaged")
    arch, arch_kwargs = ckpt.get("arch"), ckpt.get("arch_kwargs", {})
    try:
        if not isinstance(arch, str) or not isinstance(arch_kwargs, dict):
            raise RescliError("expected an architecture name and a dict of its options")
        check_arch_kwargs(arch_spec(arch).name, arch_kwargs)
    except RescliError as exc:
        raise RescliError(f"{path}: arch {str(arch)[:60]!r}: {exc.message}") from None


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_rescli_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def model_fields(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What a loaded checkpoint says about its network, how to feed it and how to read its logits.

    One list for every place that passes these on: an export's metadata and ``rescli info`` show the same fields.
    ``thresholds`` only where the model has them (multi-label).
    """
    fields = {
        "arch": ckpt["arch"],
        "arch_kwargs": ckpt.get("arch_kwargs", {}),
        "task": ckpt.get("task", SINGLE_LABEL),
        "classes": ckpt["classes"],
        "img_size": ckpt["img_size"],
        "mean": ckpt["mean"],
        "std": ckpt["std"],
        "temperature": ckpt.get("temperature", 1.0),
    }
    if ckpt.get("thresholds") is not None:
        fields["thresholds"] = ckpt["thresholds"]
    return fields


def model_from_checkpoint(ckpt: dict[str, Any], *, source: str | os.PathLike | None = None) -> nn.Module:
    """The network of a loaded checkpoint (``checkpoint.load_checkpoint``); ``source`` names it in errors."""
    model = create_model(ckpt["arch"], len(ckpt["classes"]), ckpt.get("arch_kwargs"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        where = f"{source}: " if source is not None else ""
        raise RescliError(
            f"{where}checkpoint weights do not match its architecture {ckpt['arch']}: {first_line(exc, None)}"
        ) from None
    return model.eval()
