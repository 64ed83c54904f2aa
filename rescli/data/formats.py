"""Which image format a file holds, by its first bytes rather than its name, and whether it is meant to be an
image at all (then a file that does not decode is broken, not ignored).

The standard library only, so scanning a folder stays cheap to import.
"""

from __future__ import annotations

import os
import pathlib

from rescli.data.files import fs_name, open_regular, special_file

# The Pillow formats rescli decodes. MPO is what Pillow calls the multi-picture JPEGs many phones and cameras write.
IMAGE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF"})


# Extensions people give the formats we read (and the photo formats we do not read but should name when we meet them).
# A file with one of these is meant to be an image: if its content is not one we can decode, it is broken, not ignored.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".webp", ".tif", ".tiff",
     ".heic", ".heif", ".avif", ".jxl", ".psd"}
)


_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def sniff_bytes(head: bytes) -> str | None:
    """The Pillow format name (one of IMAGE_FORMATS but MPO) that a file's first 32 bytes announce, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"  # MPO files start the same way; Pillow tells them apart when it opens them
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF
        return "TIFF"
    # "BM" alone matches too much text; a real BMP has a known DIB header size right after the file header.
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    return None


def sniff_unsupported(head: bytes) -> str | None:
    """Image formats people do have in photo folders but that we do not read, so they get a useful message."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC/HEIF"
        if brand in (b"avif", b"avis"):
            return "AVIF"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    if head.startswith(b"8BPS"):
        return "Photoshop (PSD)"
    return None


def sniff_format(path: str | os.PathLike) -> str | None:
    """The Pillow format name the file's first bytes announce (not its extension), or None."""
    try:
        with open_regular(path) as f:
            return sniff_bytes(f.read(32))
    except OSError:
        return None


def looks_like_image(path: str | os.PathLike) -> bool:
    """True when the file is meant to be an image: its first bytes say so, or its extension does (any case).

    Scanning uses this to split files into images (checked; broken ones are reported by name) and everything else
    (ignored). A zero-byte ``.jpg`` or a note saved as ``photo.png`` is a broken image, not an ignored file.
    Only regular files are images: a FIFO or device named ``x.jpg`` is not (and is never opened).
    """
    if special_file(path):
        return False
    if pathlib.PurePath(fs_name(path)).suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open_regular(path) as f:
            head = f.read(32)
    except OSError:
        return False
    return sniff_bytes(head) is not None or sniff_unsupported(head) is not None
