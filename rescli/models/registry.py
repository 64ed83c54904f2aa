"""The architecture registry: torchvision ResNets (18-152, ResNeXt, Wide) and the CIFAR-style nets.

Every architecture here follows torchvision's ResNet naming (conv1, bn1, layer1..layerN, fc), so the
head is always ``model.fc`` and the same freezing, checkpoint and export code serves all of them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torchvision import models as tvm

from rescli.core.errors import UsageError
from rescli.models.cifar import SHORTCUTS, cifar_resnet

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
    def build(num_classes: int, **arch_kwargs: Any) -> nn.Module:
        return builder(weights=None, num_classes=num_classes, **arch_kwargs)

    return ArchSpec(name=name, build=build, weights_enum=enum)


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
    depth, residual = int(m.group(2)), m.group(1) == "resnet"
    if depth < 8 or (depth - 2) % 6:
        raise UsageError(
            f"unknown architecture {name!r}: CIFAR-style {m.group(1)}N nets have N = 6n+2 layers "
            f"(20, 32, 44, 56, 110, ...)"
        )
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
            raise UsageError(
                f"--shortcut (or {', '.join(kw)}): only for CIFAR-style nets (resnet20/32/44/56/110, plain20...); "
                f"{arch} takes none"
            )
        return kw
    unknown = sorted(set(kw) - {"shortcut"})
    if unknown:
        raise UsageError(f"{arch}: unknown option(s) {', '.join(unknown)}; CIFAR-style nets take only shortcut")
    if "shortcut" in kw:
        sc = str(kw["shortcut"]).upper()
        if sc not in SHORTCUTS:
            raise UsageError(
                f"--shortcut {kw['shortcut']!r}: expected A (identity + zero-pad), "
                f"B (projection when the shape changes) or C (projection everywhere)"
            )
        kw["shortcut"] = sc
    return kw


def create_model(arch: str, num_classes: int, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    return arch_spec(arch).build(num_classes=num_classes, **check_arch_kwargs(arch, arch_kwargs))


def head_prefix() -> str:
    return "fc."


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(head_prefix())}


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
