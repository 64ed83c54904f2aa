"""Architectures, pretrained weights, the classifier head and what gets trained.

Every architecture here follows torchvision's ResNet naming (conv1, bn1, layer1..layerN,
fc), so the head is always ``model.fc`` and the same freezing, checkpoint and export code
serves torchvision's ResNets and the CIFAR-style networks alike.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchvision import models as tvm

from rescli.errors import RescliError, UsageError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)
CIFAR_DEPTHS = (20, 32, 44, 56, 110)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build: Callable[..., nn.Module]  # build(num_classes=..., **arch_kwargs) -> random-init model
    weights_enum: Any = None  # torchvision weights enum, when ImageNet weights exist
    family: str = "torchvision"  # torchvision | cifar


def _torchvision_arch(name: str, builder: Callable[..., nn.Module], enum: Any) -> ArchSpec:
    return ArchSpec(name=name, build=lambda num_classes, **kw: builder(weights=None, num_classes=num_classes, **kw), weights_enum=enum)


ARCHS: dict[str, ArchSpec] = {
    f"resnet{d}": _torchvision_arch(f"resnet{d}", getattr(tvm, f"resnet{d}"), getattr(tvm, f"ResNet{d}_Weights"))
    for d in TORCHVISION_DEPTHS
}
ARCHS.update(
    {
        "resnext50_32x4d": _torchvision_arch("resnext50_32x4d", tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights),
        "resnext101_32x8d": _torchvision_arch("resnext101_32x8d", tvm.resnext101_32x8d, tvm.ResNeXt101_32X8D_Weights),
        "wide_resnet50_2": _torchvision_arch("wide_resnet50_2", tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights),
    }
)


def _cifar_spec(name: str) -> ArchSpec | None:
    m = re.fullmatch(r"(resnet|plain)(\d+)", name)
    if not m or int(m.group(2)) in TORCHVISION_DEPTHS:
        return None
    from rescli.cifar import cifar_resnet

    depth, residual = int(m.group(2)), m.group(1) == "resnet"
    if depth < 8 or (depth - 2) % 6:
        raise UsageError(f"unknown architecture {name!r}: CIFAR-style {m.group(1)}N nets have N = 6n+2 layers (20, 32, 44, 56, 110, ...)")
    return ArchSpec(
        name=name,
        build=lambda num_classes, **kw: cifar_resnet(depth, num_classes, residual=residual, **kw),
        family="cifar",
    )


def arch_spec(name: str) -> ArchSpec:
    spec = ARCHS.get(name) or _cifar_spec(name)
    if spec is None:
        known = ", ".join(list(ARCHS) + [f"resnet{d}/plain{d}" for d in CIFAR_DEPTHS])
        raise UsageError(f"unknown architecture {name!r}; known: {known}")
    return spec


def arch_name(*, depth: int | None = None, arch: str | None = None) -> str:
    """``--arch`` wins; ``--depth N`` keeps meaning torchvision's resnetN."""
    if arch:
        return arch_spec(arch.lower()).name
    depth = 18 if depth is None else depth
    if depth not in TORCHVISION_DEPTHS:
        raise UsageError(f"--depth {depth}: expected one of {', '.join(map(str, TORCHVISION_DEPTHS))}")
    return f"resnet{depth}"


def check_arch_kwargs(arch: str, arch_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Validate (and normalise) options such as ``shortcut`` before any work: a UsageError, not a TypeError later."""
    kw = dict(arch_kwargs or {})
    spec = arch_spec(arch)
    if spec.family != "cifar":
        if kw:
            raise UsageError(f"--shortcut (or {', '.join(kw)}): only for CIFAR-style nets (resnet20/32/44/56/110, plain20...); {arch} takes none")
        return kw
    unknown = sorted(set(kw) - {"shortcut"})
    if unknown:
        raise UsageError(f"{arch}: unknown option(s) {', '.join(unknown)}; CIFAR-style nets take only shortcut")
    if "shortcut" in kw:
        sc = str(kw["shortcut"]).upper()
        if sc not in ("A", "B", "C"):
            raise UsageError(f"--shortcut {kw['shortcut']!r}: expected A (identity + zero-pad), B (projection when the shape changes) or C (projection everywhere)")
        kw["shortcut"] = sc
    return kw


def create_model(arch: str, num_classes: int, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    return arch_spec(arch).build(num_classes=num_classes, **check_arch_kwargs(arch, arch_kwargs))


def head_prefix() -> str:
    return "fc."


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(head_prefix())}


# --- weights -------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "none", "imagenet:<enum name>", or a file path
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: bool
    from_checkpoint: dict[str, Any] | None = None  # the rescli checkpoint, when transferring from one


def torch_hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_pretrained(model: nn.Module, *, arch: str, weights: str, arch_kwargs: dict[str, Any] | None = None) -> WeightsInfo:
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
    obj = _load_weights_file(path)
    from rescli.checkpoint import check_checkpoint, is_rescli_checkpoint

    if is_rescli_checkpoint(obj):
        check_checkpoint(obj, path=f"--weights {path}")  # its mean/std become this run's: a std of 0 would train on NaN
        if obj["arch"] != arch or obj.get("arch_kwargs", {}) != (arch_kwargs or {}):
            raise UsageError(
                f"--weights {path}: that checkpoint is a {obj['arch']}; pass --arch {obj['arch']} (or the matching --depth) to reuse it"
            )
        _load_backbone(model, obj["model"], source=str(path))
        return WeightsInfo(str(path), tuple(obj["mean"]), tuple(obj["std"]), pretrained=True, from_checkpoint=obj)
    _load_backbone(model, _state_dict_from(obj, path), source=str(path))
    return WeightsInfo(str(path), IMAGENET_MEAN, IMAGENET_STD, pretrained=True)


def _imagenet_state(arch: str) -> tuple[dict[str, torch.Tensor], str]:
    spec = arch_spec(arch)
    if spec.weights_enum is None:
        raise UsageError(f"--weights imagenet: there are no ImageNet weights for {arch} (CIFAR-style nets train from scratch); use --weights none")
    enum = spec.weights_enum.DEFAULT  # torchvision's best published weights for this architecture
    cached = torch_hub_checkpoint_dir() / os.path.basename(enum.url)
    if not cached.exists():
        print_to_stderr(f"downloading {enum} to {cached.parent}")
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


def print_to_stderr(message: str) -> None:
    from rescli.console import info

    info(message)


def _load_weights_file(path: Path) -> Any:
    from rescli.checkpoint import load_weights_only

    return load_weights_only(path, map_location="cpu", what=f"--weights {path}: not a readable weights file")


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


# --- building from a checkpoint, freezing, parameter groups -----------------------------------

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


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for name, p in model.named_parameters():
        if not name.startswith(head_prefix()):
            p.requires_grad_(trainable)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Frozen backbone means frozen running statistics too: BN layers stay in eval mode."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith(head_prefix()):
            module.eval()


def layer_groups(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Parameters from input to output: stem, each residual stage, head (for discriminative LRs)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        key = top if (top.startswith("layer") or top == "fc") else "stem"
        groups.setdefault(key, []).append((name, p))
    order = ["stem"] + sorted(k for k in groups if k.startswith("layer")) + ["fc"]
    return [groups[k] for k in order if k in groups]


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_ratio: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms and biases; earlier stages get geometrically lower LRs.

    backbone_lr_ratio is the LR of the stem relative to the head; stages in between are spaced
    geometrically (fastai's ``slice(lr/100, lr)`` idea).
    """
    groups = layer_groups(model)
    n = len(groups)
    out: list[dict[str, Any]] = []
    for i, group in enumerate(groups):
        scale = backbone_lr_ratio ** ((n - 1 - i) / max(1, n - 1)) if n > 1 else 1.0
        decay = [p for name, p in group if p.ndim > 1]
        no_decay = [p for name, p in group if p.ndim <= 1]  # biases and norm weights
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": lr * scale, "weight_decay": wd, "lr_scale": scale})
    return out


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
