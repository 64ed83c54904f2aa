"""CIFAR-style residual and plain networks (He et al. 2015, "Deep Residual Learning", section 4.2).

depth = 6n + 2: a 3x3 stem conv, three stages of n basic blocks (2 convs each) with 16/32/64
channels (32/16/8 px for 32 px input), global average pool, fc. No max-pool: inputs are small.
Attribute names copy torchvision's ResNet (conv1, bn1, relu, layer1..3, avgpool, fc), so the rest
of rescli (heads, freezing, parameter groups, export) handles these nets the same way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rescli.core.errors import RescliError

STAGE_NAMES = ("layer1", "layer2", "layer3")


WIDTHS = (16, 32, 64)


SHORTCUTS = ("A", "B", "C")


class PadShortcut(nn.Module):
    """Option A for a block that grows dimensions: take every other pixel and zero-pad the new
    channels. It has no parameters on purpose: the paper uses it so that residual and plain nets
    have exactly the same parameter count, making the comparison fair."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ::2 matches the stride-2 conv's output size (ceil(H/2)) for odd sizes too.
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers; with residual=True the shortcut is added before the last ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, residual: bool, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        grows = stride != 1 or c_in != c_out
        # Always a module (never None) so TorchScript sees one static type per block.
        self.shortcut: nn.Module = nn.Identity()
        if residual and (shortcut == "C" or (shortcut == "B" and grows)):
            # Projection: a learned 1x1 conv (+BN, as in torchvision's "downsample").
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        elif residual and grows:
            self.shortcut = PadShortcut(c_out - c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, n: int, num_classes: int, residual: bool, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = WIDTHS[0]
        stages = []
        for i, c in enumerate(WIDTHS):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1  # downsample at the start of stages 2, 3
                blocks.append(BasicBlock(c_in, c, stride, residual, shortcut))
                c_in = c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # adaptive: any input >= 8 px works
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        # Same init as the paper (He et al. 2015, "Delving deep...") and torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(
    depth: int, num_classes: int = 10, *, residual: bool = True, shortcut: str = "A"
) -> nn.Module:
    """The paper's CIFAR net with `depth` = 6n+2 layers (20, 32, 44, 56, 110, ...).

    residual=False gives the plain counterpart (same layers, no shortcuts). shortcut: "A" identity +
    parameter-free zero-pad where dimensions grow, "B" 1x1 projection only where they grow,
    "C" 1x1 projection on every block. Ignored for plain nets.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise RescliError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110); got {depth!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RescliError(f"num_classes must be a positive integer; got {num_classes!r}")
    sc = shortcut.upper() if isinstance(shortcut, str) else shortcut
    if sc not in SHORTCUTS:
        raise RescliError(f"shortcut must be one of A, B, C; got {shortcut!r}")
    return CifarResNet((depth - 2) // 6, num_classes, bool(residual), sc)


def stage_of(param_name: str) -> str:
    """Map a parameter name to "stem", "layer1".."layer3" or "head" (for per-stage grad norms).

    Wrapper prefixes ("module." from DataParallel, "_orig_mod." from torch.compile) are skipped;
    other "layerN" names (torchvision's layer4) map to themselves.
    """
    parts = param_name.split(".")
    while parts and parts[0] in ("module", "_orig_mod"):
        parts = parts[1:]
    top = parts[0] if len(parts) > 1 else ""
    if top in ("conv1", "bn1"):
        return "stem"
    if top == "fc":
        return "head"
    if top.startswith("layer") and top[5:].isdigit():
        return top
    raise RescliError(f"cannot tell which stage parameter {param_name!r} belongs to")
