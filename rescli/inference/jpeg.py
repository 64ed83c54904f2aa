"""JPEG decoding with torchvision (nvJPEG on a GPU), batched, for plain JPEGs; Pillow for the rest.

torchvision.io is imported where it is used, never at the top: torchvision 0.29 deprecated its decoders (for
TorchCodec), and a release without them must still let Pillow decode everything.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from rescli.data.transforms import center_square_tensor
from rescli.inference.inputs import load_input

_JPEG_DECODE_WORKS: dict[str, bool] = {}


def jpeg_decode_works(device: torch.device) -> bool:
    """Whether torchvision decodes JPEGs on ``device`` here (its build may lack nvJPEG): tried once per device."""
    key = str(device)
    if key not in _JPEG_DECODE_WORKS:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
            out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            _JPEG_DECODE_WORKS[key] = tuple(out.shape) == (3, 16, 16)
        except Exception:
            _JPEG_DECODE_WORKS[key] = False
    return _JPEG_DECODE_WORKS[key]


def jpeg_decode_device(choice: torch.device | str | None, *, model_device: torch.device | None) -> torch.device | None:
    """Where plain JPEGs are decoded: ``choice``, or for "auto" the model's GPU when torchvision can decode there;
    None means Pillow for every file (on a CPU Pillow is the faster: docs/performance.md)."""
    if choice == "auto":
        on_gpu = model_device is not None and model_device.type == "cuda" and jpeg_decode_works(model_device)
        return model_device if on_gpu else None
    return torch.device(choice) if choice is not None else None


def decode_jpegs(items: list[tuple[str, Any, str | None]], *, device: torch.device, img_size: int, transform) -> list:
    """Decode the batch's undecoded JPEGs in one torchvision call on ``device``; the rest stays as it is.

    A JPEG torchvision refuses (a corrupt stream, a variant nvJPEG lacks) goes through Pillow instead, which
    decodes it or names what is wrong with it, as for every other file.
    """
    from torchvision.io import ImageReadMode, decode_jpeg  # here only after jpeg_decode_works found it

    at = [i for i, (_, payload, _) in enumerate(items) if isinstance(payload, bytearray)]
    if not at:
        return items
    datas = [torch.frombuffer(items[i][1], dtype=torch.uint8) for i in at]
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except Exception:  # one bad stream fails the batched call: decode one by one to find it
        decoded = []
        for d in datas:
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except Exception:
                decoded.append(None)
    items = list(items)
    for i, image in zip(at, decoded):
        path = items[i][0]
        if image is None:
            items[i] = load_input(path, transform, img_size)
        else:
            items[i] = (path, center_square_tensor(image, img_size), None)
    return items
