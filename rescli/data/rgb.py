"""Any Pillow image mode as the 8-bit RGB every model here takes: transparency on white, high bit depths scaled."""

from __future__ import annotations

import math
from typing import cast

from PIL import Image


def _has_alpha(img: Image.Image) -> bool:
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        return True
    if img.info.get("transparency") is not None:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _on_white(img: Image.Image) -> Image.Image:
    if img.mode == "La":  # Pillow cannot convert premultiplied La directly; as RGBa it can
        lum, alpha = img.split()
        img = Image.merge("RGBa", (lum, lum, lum, alpha))
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, (0, 0), rgba)
    return out


def _linear_to_l(img: Image.Image, scale: float, offset: float) -> Image.Image:
    # point() on I/F images is a C-level scale+offset; +0.5 rounds, and the conversion to L clips to 0..255.
    return img.point(lambda v: v * scale + offset + 0.5).convert("L")


def _scale_of_wide_values(img: Image.Image) -> tuple[float, float]:
    """(scale, offset) that bring a 32-bit int ("I") or float ("F") image into 0..255; see to_rgb."""
    lo, hi = cast("tuple[float, float]", img.getextrema())  # one band: (min, max), not one pair per band
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf floats: fall back to plain clipping
        lo, hi = 0, 255
    top = 65535 if img.mode == "I" else 1
    if 0 <= lo and hi <= top:
        return 255 / top, 0.0
    if hi > lo:
        scale = 255 / (hi - lo)
        return scale, -lo * scale
    return 1.0, 0.0  # constant image outside the expected range


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB (may return ``img`` itself if it already is). Transparency is composited on white.

    High bit depths are scaled, never clipped:
    - ``I;16*``: 0..65535 -> 0..255 (divide by 257, rounded), so 65535 -> 255 and 32768 -> 128.
    - ``I`` (32-bit int): Pillow also uses it for 16-bit PNG/TIFF data, so values inside 0..65535 are scaled as 16-bit
      (keeps brightness consistent between files); anything outside that range is stretched from its min..max.
    - ``F`` (float): values inside 0..1 are scaled by 255 (the usual float convention); otherwise min..max is stretched
      (a constant image is clipped to 0..255).
    Transparency of I/F images is ignored; the colour-key transparency of RGB/L/P images is honoured.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        return _linear_to_l(img.convert("I"), 1 / 257, 0).convert("RGB")
    if mode in ("I", "F"):
        return _linear_to_l(img, *_scale_of_wide_values(img)).convert("RGB")
    if _has_alpha(img):
        return _on_white(img)
    if mode == "RGB":
        return img
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX
