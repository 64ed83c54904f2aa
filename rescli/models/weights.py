"""Starting weights: torchvision's ImageNet weights (torch.hub's cache), a weights file, or a rescli checkpoint,
put into a model's backbone; the head stays new."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rescli.core.errors import RescliError, UsageError
from rescli.core.events import info
from rescli.models.checkpoint import check_checkpoint, is_rescli_checkpoint, load_weights_only
from rescli.models.registry import (
    ARCHS,
    CIFAR_DEPTHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    arch_spec,
    backbone_state,
    create_model,
)


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "none", "imagenet:<enum name>", or a file path
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: bool
    from_checkpoint: dict[str, Any] | None = None  # the rescli checkpoint, when transferring from one


def torch_hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_pretrained(
    model: nn.Module, *, arch: str, weights: str, arch_kwargs: dict[str, Any] | None = None
) -> WeightsInfo:
    """Put ``weights`` (none | imagenet | PATH) into ``model``'s backbone; the head stays new."""
    w = (weights or "none").strip()
    if w.lower() == "none":
        return WeightsInfo("none", IMAGENET_MEAN, IMAGENET_STD, pretrained=False)
    if w.lower() == "imagenet":
        state, enum_name = _imagenet_state(arch)
        _load_backbone(model, state, source=f"torchvision {enum_name}")
        return WeightsInfo(f"imagenet:{enum_name}", IMAGENET_MEAN, IMAGENET_STD, pretrained=True)
    path = Path(w).expanduser()
    if not path.exists():
        raise UsageError(f"--weights {w}: no such file (use imagenet, none, or a path to a .pt/.pth file)")
    obj = load_weights_only(path, map_location="cpu", what=f"--weights {path}: not a readable weights file")
    if is_rescli_checkpoint(obj):
        check_checkpoint(obj, path=f"--weights {path}")  # its mean/std become this run's: a std of 0 would train on NaN
        if obj["arch"] != arch or obj.get("arch_kwargs", {}) != (arch_kwargs or {}):
            raise UsageError(
                f"--weights {path}: that checkpoint is a {obj['arch']}; "
                f"pass --arch {obj['arch']} (or the matching --depth) to reuse it"
            )
        _load_backbone(model, obj["model"], source=str(path))
        return WeightsInfo(str(path), tuple(obj["mean"]), tuple(obj["std"]), pretrained=True, from_checkpoint=obj)
    _load_backbone(model, _state_dict_from(obj, path), source=str(path))
    return WeightsInfo(str(path), IMAGENET_MEAN, IMAGENET_STD, pretrained=True)


def _imagenet_state(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    spec = arch_spec(arch)
    if spec.weights_enum is None:
        raise UsageError(
            f"--weights imagenet: there are no ImageNet weights for {arch} (CIFAR-style nets train from scratch); "
            f"use --weights none"
        )
    enum = spec.weights_enum.DEFAULT  # torchvision's best published weights for this architecture
    cached = torch_hub_checkpoint_dir() / os.path.basename(enum.url)
    if not cached.exists():
        info(f"downloading {enum} to {cached.parent}")
    previous = socket.getdefaulttimeout()
    # Without a timeout an offline machine can hang for minutes on DNS/TCP; fail in seconds instead.
    socket.setdefaulttimeout(20)
    try:
        state = enum.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:
        raise RescliError(
            f"--weights imagenet: could not download {enum} ({type(exc).__name__}: {str(exc)[:120]}). "
            f"Offline? Copy {os.path.basename(enum.url)} into {cached.parent}, or pass --weights PATH "
            f"(a torchvision .pth or rescli .pt file) or --weights none"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return state, str(enum)


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict, or one nested under 'state_dict'/'model' (timm, Lightning, DDP)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RescliError(f"--weights {path}: expected a state_dict (a dict of tensors)")
    prefixes = ("module.", "model.", "backbone.")
    return {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in obj.items()}


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load every non-head tensor; anything that does not fit is listed in one error."""
    own = backbone_state(model.state_dict())
    incoming = backbone_state(state)
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    mismatched = [
        f"{k} {tuple(incoming[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(incoming))
        if incoming[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                parts.append(f"{label} {len(items)}: {_summarise_keys(items)}")
        guess = guess_arch(state)
        hint = f" The file looks like a {guess}: pass --arch {guess}." if guess else ""
        raise RescliError(f"weights from {source} do not fit this model: " + "; ".join(parts) + "." + hint)
    model.load_state_dict(incoming, strict=False)


def _summarise_keys(items: list[str], limit: int = 6) -> str:
    """Name at most ``limit`` entries; many keys of one block (layer3.4.conv1.weight, ...) become 'layer3.4.*'."""
    if len(items) <= limit:
        return ", ".join(items)
    blocks: list[str] = []
    for item in items:
        key = item.split(" ", 1)[0]
        parts = key.split(".")
        block = ".".join(parts[:2]) + ".*" if len(parts) > 2 else key
        if block not in blocks:
            blocks.append(block)
    shown = blocks[:limit]
    return ", ".join(shown) + (f", … (+{len(blocks) - limit} more)" if len(blocks) > limit else "")


def guess_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision/CIFAR architecture whose backbone has exactly these keys and shapes, if one does."""
    incoming = {k: tuple(v.shape) for k, v in backbone_state(state).items()}
    names = list(ARCHS) + [f"resnet{d}" for d in CIFAR_DEPTHS] + [f"plain{d}" for d in CIFAR_DEPTHS]
    for name in names:
        try:
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                candidate = create_model(name, 2)
        except Exception:
            continue
        if {k: tuple(v.shape) for k, v in backbone_state(candidate.state_dict()).items()} == incoming:
            return name
    return None
