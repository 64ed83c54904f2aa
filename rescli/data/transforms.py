"""From a decoded image to the model's input: the train/eval transforms (PIL -> uint8 CHW), and the
batched normalisation on the device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from PIL import Image
from torchvision import transforms as T

from rescli.core.errors import UsageError

AUGMENTS = ("none", "light", "strong")


def build_transform(*, img_size: int, train: bool, augment: str = "light") -> Callable[[Any], torch.Tensor]:
    """PIL RGB image -> uint8 CHW tensor. Normalisation happens on the device, batched (see to_model_input)."""
    if augment not in AUGMENTS:
        raise UsageError(f"--augment {augment!r}: expected one of {', '.join(AUGMENTS)}")
    if not train or augment == "none":
        steps: list[Any] = [CenterSquare(img_size)]
    elif augment == "light":
        # Mild crops: short runs on small folders learn faster than with ImageNet's 0.08-1.0 range.
        steps = [T.RandomResizedCrop(img_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
                 T.RandomHorizontalFlip()]
    else:  # strong
        steps = [
            T.RandomResizedCrop(img_size, scale=(0.25, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.TrivialAugmentWide(),
        ]
    steps.append(T.PILToTensor())
    return T.Compose(steps)


class CenterSquare:
    """The central square of a PIL image, resized to size x size (bilinear, antialiased), in one Pillow call.

    What Resize(size) + CenterCrop(size) give, up to the crop's rounding to whole pixels, without resizing
    the strips the crop would throw away (a quarter of a 4:3 photo); the time saved per image is in
    docs/performance.md ("How rescli is fast").
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        return img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))

    def __repr__(self) -> str:
        return f"CenterSquare({self.size})"


def center_square_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """CenterSquare for a uint8 [3, H, W] tensor on any device (JPEGs decoded on the GPU): the crop is rounded
    to whole pixels, so the result can differ from Pillow's by a sub-pixel shift."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top:top + side, left:left + side]
    if side == size:
        return square.contiguous()
    resized = torch.nn.functional.interpolate(square[None].float(), size=(size, size), mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def draft_size_for(img_size: int, *, train: bool) -> int:
    # Random crops may zoom in ~1.7x; decode JPEGs at no less than that so crops are not upsampled.
    return img_size * 2 if train else img_size


def to_model_input(
    images: torch.Tensor, *, device: torch.device, mean: Sequence[float], std: Sequence[float],
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 batch -> normalised float batch on ``device`` (the copy is 4x smaller as uint8)."""
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # (x/255 - mean)/std as one multiply and one add, in place (keeps channels_last): 3 passes over the batch, not 4.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, 3, 1, 1)
    return x.float().mul_(scale).add_(shift)
