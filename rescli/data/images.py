"""Reading one image from a messy folder: sniffing, EXIF, every mode to RGB, draft decoding, checks and their cache.

Pillow and the standard library only (no torch), so scanning and checking a folder stays cheap to import.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import pathlib
import re
import stat
import warnings
from dataclasses import dataclass
from typing import IO

from PIL import Image

from rescli.core.errors import RescliError

# MPO is what Pillow calls the multi-picture JPEGs many phones and cameras write.
IMAGE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF"})


# We enforce the same pixel limit ourselves and turn it into an ImageError per file. Pillow's warning would only be
# noise on stderr, and silencing it per call with warnings.catch_warnings() is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# Pillow also warns (without naming the file) about things like corrupt EXIF blocks. A file that fails is reported by
# name as an ImageError; one that decodes is fine as far as the user is concerned; either way the warning is only noise.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


# Lower-cased names that operating systems, file managers, photo tools and editors leave behind.
_CLUTTER_NAMES = frozenset(
    {
        ".ds_store", ".localized", "icon\r", ".directory", ".apdisk", ".appledouble", ".lsoverride",
        "__macosx", ".spotlight-v100", ".trashes", ".fseventsd", ".temporaryitems", ".documentrevisions-v100",
        "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "$recycle.bin", "system volume information",
        ".picasa.ini", "picasa.ini", ".picasaoriginals", "@eadir", ".@__thumb", ".thumbnails", ".nomedia",
        ".ipynb_checkpoints", "__pycache__", ".git", ".svn", ".hg", "lost+found",
    }
)


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


def fs_name(path: str | os.PathLike) -> str:
    return os.fsdecode(os.fspath(path))


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(mode: int) -> str | None:
    """What a file that is neither a regular file nor a folder is ("a named pipe (FIFO)", ...); None for those two."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "not a regular file")


def special_file(path: str | os.PathLike) -> str | None:
    """special_kind of what ``path`` names (links followed); None for a regular file, a folder, or nothing at all."""
    try:
        return special_kind(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


def not_regular_reason(kind: str) -> str:
    return f"not a regular file but {kind}; only regular files are read as images"


class _NotRegular(OSError):
    """Raised by _open_regular for a FIFO, device or socket, which it never reads."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _open_regular(path: str | os.PathLike) -> IO[bytes]:
    """``open(path, "rb")`` for regular files only: reading a FIFO waits for a writer forever (and a device may never
    end), so anything else raises _NotRegular without a byte read. The stat before the open keeps devices unopened;
    the non-blocking open and the fstat after it close the gap in which the name could be swapped for a FIFO."""
    kind = special_file(path)
    if kind:
        raise _NotRegular(kind)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), fs_name(path))
        kind = special_kind(mode)
        if kind:
            raise _NotRegular(kind)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _sniff_bytes(head: bytes) -> str | None:
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


def _sniff_unsupported(head: bytes) -> str | None:
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
        with _open_regular(path) as f:
            return _sniff_bytes(f.read(32))
    except OSError:
        return None


# Extensions people give the formats we read (and the photo formats we do not read but should name when we meet them).
# A file with one of these is meant to be an image: if its content is not one we can decode, it is broken, not ignored.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".webp", ".tif", ".tiff",
     ".heic", ".heif", ".avif", ".jxl", ".psd"}
)


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
        with _open_regular(path) as f:
            head = f.read(32)
    except OSError:
        return False
    return _sniff_bytes(head) is not None or _sniff_unsupported(head) is not None


def is_hidden(path: str | os.PathLike) -> bool:
    return pathlib.PurePath(fs_name(path)).name.startswith(".")


def is_clutter(path: str | os.PathLike) -> bool:
    """Files and folders left by OSes and tools; skipped without a report because nobody put them there on purpose."""
    name = pathlib.PurePath(fs_name(path)).name
    return name.lower() in _CLUTTER_NAMES or name.startswith("._")


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
        lo, hi = img.getextrema()
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf floats: fall back to plain clipping
            lo, hi = 0, 255
        top = 65535 if mode == "I" else 1
        if 0 <= lo and hi <= top:
            scale, offset = 255 / top, 0.0
        elif hi > lo:
            scale = 255 / (hi - lo)
            offset = -lo * scale
        else:  # constant image outside the expected range
            scale, offset = 1.0, 0.0
        return _linear_to_l(img, scale, offset).convert("RGB")
    if _has_alpha(img):
        return _on_white(img)
    if mode == "RGB":
        return img
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX


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
    fmt = _sniff_bytes(head)
    if fmt:
        return _fail(path, f"corrupt or truncated {fmt} file (its header cannot be read)")
    other = _sniff_unsupported(head)
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
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        return to_rgb(img)
    except Exception as exc:
        raise _fail(path, f"cannot convert {img.mode} image to RGB ({type(exc).__name__}: {exc})") from None


def open_file(path: str | os.PathLike) -> IO[bytes]:
    try:
        return _open_regular(path)
    except _NotRegular as exc:
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
        with _open_regular(path) as f:
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
