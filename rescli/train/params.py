"""What gets trained: freezing the backbone (and its BatchNorm statistics), layer groups, AdamW groups."""

from __future__ import annotations

from typing import Any

from torch import nn

from rescli.models.registry import head_prefix


def head(model: nn.Module) -> nn.Module:
    """The classification head: the ``fc`` layer of torchvision's ResNets and of the CIFAR nets."""
    return model.get_submodule(head_prefix().rstrip("."))


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


def param_groups(
    model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_ratio: float = 1.0
) -> list[dict[str, Any]]:
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
