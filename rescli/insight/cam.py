"""Class activation maps at a ResNet's last residual stage, where in the original picture they peak, and the
overlay PNG that shows them.

Written here rather than taken from pytorch-grad-cam or torchcam: both find the layer with forward hooks, which
TorchScript modules refuse, and pytorch-grad-cam pulls in OpenCV; with the net split at its last stage
(``network.StagedNet``) each method is a few lines of tensor arithmetic on the maps A and the gradient G of the
chosen logit with respect to them (tests/test_insight_explain.py checks them against their definitions):

    gradcam    ReLU(sum_c mean_xy(G_c) A_c)                                   Selvaraju et al. 2017
    gradcam++  ReLU(sum_c sum_xy(alpha_c ReLU(G_c)) A_c), alpha from G^2, G^3  Chattopadhay et al. 2018
    layercam   ReLU(sum_c ReLU(G_c) A_c)                                      Jiang et al. 2021
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from rescli.core.errors import UsageError

METHODS = ("gradcam", "gradcam++", "layercam")

#: How strongly the heatmap covers the picture in an overlay (0 = not at all, 1 = only the heatmap).
OVERLAY_ALPHA = 0.5


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def activation_maps(
    maps: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: Sequence[Sequence[int]], *,
    method: str = "gradcam",
) -> list[list[torch.Tensor]]:
    """One heatmap [h, w] (float32, CPU, >= 0) per (image, target class): ``targets[i]`` lists the classes to
    explain for image i (one for a single-label model; every predicted label of a multi-label one).

    ``maps``: the last stage's activations [B, C, h, w]; ``head``: maps -> logits. Only the head is
    differentiated, so the cost is one small backward per target slot, whatever the trunk's depth.
    """
    check_method(method)
    a = maps.detach().float().requires_grad_(True)
    logits = head(a)
    out: list[list[torch.Tensor]] = [[] for _ in targets]
    depth = max((len(t) for t in targets), default=0)
    for slot in range(depth):
        rows = [i for i, t in enumerate(targets) if len(t) > slot]
        chosen = logits[rows, [int(targets[i][slot]) for i in rows]].sum()
        # Images do not interact in an eval-mode head, so one backward gives every image its own gradient.
        (grads,) = torch.autograd.grad(chosen, a, retain_graph=slot < depth - 1)
        cams = combine(a.detach()[rows], grads[rows], method=method)
        for i, cam in zip(rows, cams):
            out[i].append(cam.cpu())
    return out


def combine(a: torch.Tensor, g: torch.Tensor, *, method: str) -> torch.Tensor:
    """The heatmaps [B, h, w] of activations ``a`` and gradients ``g`` [B, C, h, w] by ``method``."""
    if method == "gradcam":
        weights = g.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * a).sum(1))
    if method == "gradcam++":
        g2, g3 = g.pow(2), g.pow(3)
        denominator = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
        alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        weights = (alpha * torch.relu(g)).sum(dim=(2, 3), keepdim=True)
        return torch.relu((weights * a).sum(1))
    if method == "layercam":
        return torch.relu((torch.relu(g) * a).sum(1))
    raise UsageError(f"--method {method!r}: choose one of {', '.join(METHODS)}")


def upsampled(cam: torch.Tensor, size: int) -> torch.Tensor:
    """The heatmap resized to the model's input, size x size (bilinear, as the input's pixel centres sit)."""
    return torch.nn.functional.interpolate(cam[None, None].float(), size=(size, size), mode="bilinear",
                                           align_corners=False)[0, 0]


def square_box(width: int, height: int) -> tuple[float, float, float]:
    """(left, top, side) of the central square the model sees (data.transforms.CenterSquare) in the picture."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side


def peak_xy(cam: torch.Tensor, *, img_size: int, width: int, height: int) -> list[int]:
    """The heatmap's maximum as [x, y] pixels of the original (EXIF-upright) picture of ``width`` x ``height``.

    The model saw the central square resized to img_size, so the peak's input pixel is mapped back through that.
    """
    big = upsampled(cam, img_size)
    # The centre of the top plateau, not its first pixel: bilinear upsampling holds an edge cell's value flat out
    # to the border, where argmax alone would put every corner peak on pixel (0, 0).
    top_value = float(big.max())
    rows, cols = torch.nonzero(big >= top_value - 1e-6 * max(1.0, abs(top_value)), as_tuple=True)
    v, u = float(rows.float().mean()), float(cols.float().mean())
    left, top, side = square_box(width, height)
    scale = side / img_size
    x = min(width - 1, max(0, int(left + (u + 0.5) * scale)))
    y = min(height - 1, max(0, int(top + (v + 0.5) * scale)))
    return [x, y]


def overlay(picture: Image.Image, cam: torch.Tensor, *, peak: Sequence[int] | None = None,
            max_side: int = 1024) -> Image.Image:
    """``picture`` with the heatmap over the central square the model saw (jet colours, normalised to its own
    maximum), a ring at ``peak`` (original pixels); at most ``max_side`` pixels on the longer side."""
    width, height = picture.size
    scale = min(1.0, max_side / max(width, height))
    shown = picture if scale == 1.0 else picture.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                        Image.Resampling.BILINEAR)
    left, top, side = (v * scale for v in square_box(width, height))
    box = (round(left), round(top), round(left + side), round(top + side))
    size = (max(1, box[2] - box[0]), max(1, box[3] - box[1]))
    heat = cam.float().numpy()
    peak_value = float(heat.max()) if heat.size else 0.0
    heat = heat / peak_value if peak_value > 0 else np.zeros_like(heat)
    heat_image = Image.fromarray(heat.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    colours = jet(np.asarray(heat_image))
    base = np.asarray(shown.convert("RGB")).astype(np.float32)
    region = base[box[1]:box[1] + size[1], box[0]:box[0] + size[0]]
    region[:] = (1 - OVERLAY_ALPHA) * region + OVERLAY_ALPHA * colours[:region.shape[0], :region.shape[1]]
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    if peak is not None:
        draw = ImageDraw.Draw(out)
        r = max(3, round(min(out.size) / 40))
        px, py = (peak[0] + 0.5) * scale, (peak[1] + 0.5) * scale
        draw.ellipse((px - r, py - r, px + r, py + r), outline=(255, 255, 255), width=max(1, r // 3))
    return out


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue, cyan, yellow, red) of values in [0, 1], as float RGB in 0..255: the familiar CAM
    colours, without importing matplotlib for them."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1) * 255.0
