"""Decoding one image from a messy folder: every format to upright 8-bit RGB, draft decoding, the pixel limit, and
the full check of a file (every pixel, plus the SHA-1 of its bytes). A file that cannot be used raises ImageError
with one line that names it and the problem; nothing else escapes.

Pillow and the standard library only (no torch), so scanning and checking a folder stays cheap to import.
What a path is (regular, hidden, clutter) lives in ``files``, which format its bytes announce in ``formats``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from typing import IO

from PIL import Image

from rescli.core.errors import RescliError
from rescli.data.files import NotRegular, fs_name, is_clutter, is_hidden, not_regular_reason, open_regular, special_file
from rescli.data.formats import IMAGE_FORMATS, looks_like_image, sniff_bytes, sniff_unsupported
from rescli.data.rgb import to_rgb

__all__ = [
    "ImageError", "ImageInfo", "check_image", "load_rgb", "open_file", "plain_jpeg_bytes",
    # Defined in files and formats; other packages look them up here, beside load_rgb: what a scan or an input
    # list skips, and why.
    "is_clutter", "is_hidden", "looks_like_image", "not_regular_reason", "special_file",
]

# We enforce the same pixel limit ourselves and turn it into an ImageError per file. Pillow's warning would only be
# noise on stderr, and silencing it per call with warnings.catch_warnings() is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# Pillow also warns (without naming the file) about things like corrupt EXIF blocks. A file that fails is reported by
# name as an ImageError; one that decodes is fine as far as the user is concerned; either way the warning is only noise.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


_EXIF_ORIENTATION = 0x0112


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(RescliError):
    """One file could not be used as an image. ``str(err)`` is ``"<path>: <problem>"`` on one line."""

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message, exit_code=exit_code)
        self.path = path
        self.reason = reason or message


def _fail(path: str, reason: str) -> ImageError:
    shown = path.replace("\n", "\\n").replace("\r", "\\r")
    reason = " ".join(reason.split())
    return ImageError(f"{shown}: {reason}", path=path, reason=reason)


def _open_formats() -> list[str]:
    Image.init()  # cheap after the first call; registers the plugins so we can ask which formats this Pillow opens
    return sorted(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _too_large(path: str, pixels: int | None) -> ImageError:
    limit = Image.MAX_IMAGE_PIXELS
    size = f"{pixels:,} pixels" if pixels else "its pixel count"
    return _fail(path, f"image too large: {size} exceeds the limit of {limit:,} (decompression-bomb guard); skipped")


def _not_an_image(f: IO[bytes], path: str) -> ImageError:
    f.seek(0)
    head = f.read(32)
    fmt = sniff_bytes(head)
    if fmt:
        return _fail(path, f"corrupt or truncated {fmt} file (its header cannot be read)")
    other = sniff_unsupported(head)
    if other:
        return _fail(path, f"{other} images are not supported; convert it to JPEG or PNG")
    return _fail(path, "not an image (content is not PNG, JPEG, GIF, BMP, WebP or TIFF)")


def _decode(f: IO[bytes], path: str, draft_size: int | None) -> Image.Image:
    try:
        return _decode_steps(f, path, draft_size)
    except ImageError:
        raise
    except Exception as exc:  # callers rely on ImageError being the only failure, whatever Pillow throws
        raise _fail(path, f"cannot read image ({type(exc).__name__}: {exc})") from None


def _decode_steps(f: IO[bytes], path: str, draft_size: int | None) -> Image.Image:
    if os.fstat(f.fileno()).st_size == 0:
        raise _fail(path, "empty file (0 bytes)")
    f.seek(0)
    try:
        img = Image.open(f, formats=_open_formats())
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(found.group(1)) if found else None) from None
    except Image.UnidentifiedImageError:
        raise _not_an_image(f, path) from None
    except Exception as exc:  # plugins raise SyntaxError, struct.error, ValueError... on damaged headers
        raise _fail(path, f"corrupt or truncated image header ({type(exc).__name__}: {exc})") from None

    width, height = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise _too_large(path, width * height)

    if draft_size and img.format in ("JPEG", "MPO"):
        img.draft("RGB", (draft_size, draft_size))
        if min(img.size) < min(draft_size, width, height):  # never trade away pixels the caller asked for
            return _decode_steps(f, path, None)

    try:
        img.load()  # the whole stream: truncation and corrupt data surface here, not at open()
    except Exception as exc:
        raise _fail(path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from None

    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block should not cost an otherwise good photo
        orientation = 1
    try:
        return to_rgb(img.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else img)
    except Exception as exc:
        raise _fail(path, f"cannot convert {img.mode} image to RGB ({type(exc).__name__}: {exc})") from None


def open_file(path: str | os.PathLike) -> io.BufferedReader:
    try:
        return open_regular(path)
    except NotRegular as exc:
        raise _fail(fs_name(path), not_regular_reason(exc.kind)) from None
    except OSError as exc:
        reason = {
            errno.ENOENT: "file not found",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.EISDIR: "is a directory, not a file",
        }.get(exc.errno or 0, f"cannot open file ({exc.strerror or exc})")
        raise _fail(fs_name(path), reason) from None


def load_rgb(path: str | os.PathLike, *, draft_size: int | None = None) -> Image.Image:
    """The image as loaded 8-bit RGB, upright per EXIF; first frame of animations. Raises only ImageError.

    ``draft_size`` lets JPEGs decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size.
    """
    with open_file(path) as f:
        return _decode(f, fs_name(path), draft_size)


def plain_jpeg_bytes(path: str | os.PathLike) -> bytearray | None:
    """The file's bytes if it is a JPEG that any decoder turns into what load_rgb gives: 8-bit RGB or grey,
    upright (no EXIF rotation to apply), within the pixel limit. None for anything else, and for files that
    cannot be read: load_rgb then decodes those, or names what is wrong with them."""
    try:
        with open_regular(path) as f:
            raw = bytearray(os.fstat(f.fileno()).st_size)
            if f.readinto(raw) != len(raw):
                return None
    except OSError:
        return None
    # A stream that does not end in the end-of-image marker may be truncated; GPU decoders can fill in the missing part
    # without a word, where Pillow stops. Such files (and those with bytes after the marker) go to Pillow.
    if not raw.startswith(b"\xff\xd8\xff") or not raw.endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(raw), formats=["JPEG"]) as img:  # the header only: no pixels are decoded here
            width, height = img.size
            if img.mode not in ("RGB", "L") or (Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS):
                return None
            if int(img.getexif().get(_EXIF_ORIENTATION, 1)) not in (0, 1):
                return None
    except Exception:
        return None
    return raw


@dataclass(frozen=True)
class ImageInfo:
    path: str
    ok: bool
    error: str | None  # the problem without the path (the path is in .path); None when ok
    width: int  # after EXIF orientation; 0 when not ok
    height: int
    sha1: str  # of the file's bytes; "" if the file could not be read


def check_image(path: str | os.PathLike) -> ImageInfo:
    """Decode every pixel exactly as training would. Never raises for a bad file: ``ok=False`` and the reason."""
    name = fs_name(path)
    digest = ""
    try:
        with open_file(path) as f:
            try:
                sha1 = hashlib.sha1()
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha1.update(block)
            except OSError as exc:
                raise _fail(name, f"cannot read file ({exc.strerror or exc})") from None
            digest = sha1.hexdigest()
            img = _decode(f, name, None)
    except ImageError as exc:
        return ImageInfo(name, False, exc.reason, 0, 0, digest)
    return ImageInfo(name, True, None, img.width, img.height, digest)
