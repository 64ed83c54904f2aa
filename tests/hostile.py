"""Builders for the messy image folders real users have, for any test that needs one (not a test module itself).

Everything is tiny and generated on the spot, so a whole folder takes a few milliseconds.
"""

from __future__ import annotations

import io
import pathlib
import random

from PIL import Image

GREEN = (0, 200, 0)
BLUE = (0, 0, 220)


def _write(root: pathlib.Path, rel: str, data: bytes) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return rel


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _pattern(color: tuple[int, int, int], size: int = 24, seed: int = 0) -> Image.Image:
    """A solid colour with a few seeded squares so no two generated images share bytes by accident."""
    img = Image.new("RGB", (size, size), color)
    rng = random.Random(seed)
    for _ in range(3):
        x, y = rng.randrange(size - 6), rng.randrange(size - 6)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 6, y + 6))
    return img


def halves(mode: str, left, right, size: tuple[int, int] = (24, 24)) -> Image.Image:
    """An image whose left half is ``left`` and right half ``right`` (pixel values in ``mode``)."""
    img = Image.new(mode, size, left)
    half = size[0] // 2
    img.paste(Image.new(mode, (size[0] - half, size[1]), right), (half, 0))  # pasting a bare value is wrong for I;16
    return img


def exif_rotated_jpeg() -> bytes:
    """Stored 32x16, blue with a green 8x8 block top-left, EXIF orientation 6 (rotate 90° clockwise to view).

    Viewed upright it is 16x32 with the green block in the top-right corner.
    """
    img = Image.new("RGB", (32, 16), BLUE)
    img.paste(GREEN, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def truncated_jpeg() -> bytes:
    """A download cut off mid-scan: the header is intact (it opens), the pixel data stops early (it cannot load)."""
    noise = random.Random(99).randbytes(64 * 64 * 3)
    data = _encode(Image.frombytes("RGB", (64, 64), noise), "JPEG", quality=90)
    return data[: len(data) * 2 // 3]


def make_bomb_png(path: pathlib.Path, side: int = 64) -> int:
    """A small PNG of ``side``² pixels; tests lower Image.MAX_IMAGE_PIXELS below that to hit the bomb guard cheaply.

    Returns the pixel count.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (side, side), 128).save(path, "PNG")
    return side * side


def make_hostile_class_folder(root: pathlib.Path) -> dict:
    """Build a class-per-folder dataset with every kind of mess under ``root``; return what a correct reader sees.

    Returned dict (relative POSIX paths from ``root``):
      classes        class folders with usable images, sorted: ["cats", "dogs"]
      good           {class: [decodable images]}; some have odd modes, names or extensions on purpose
      sizes          {good image: (width, height)} as seen upright (EXIF applied)
      special        {kind: good image} for the tricky ones, e.g. special["exif_rotated"], special["gray16"]
      broken         files in class folders that should be images but cannot be decoded
      broken_sniffed the part of ``broken`` whose first bytes still claim an image format
      ignored        non-image files that are not clutter (should be reported, not trained on)
      clutter        OS/tool clutter (files and folders) that is skipped silently
      empty_classes  folders with no usable image: one empty, one with only clutter and non-images
      duplicates     groups of files with identical bytes (same sha1)
    """
    root = pathlib.Path(root)
    good: dict[str, list[str]] = {"cats": [], "dogs": []}
    sizes: dict[str, tuple[int, int]] = {}
    special: dict[str, str] = {}

    def add(cls: str, name: str, data: bytes, size=(24, 24), kind: str | None = None) -> None:
        rel = _write(root, f"{cls}/{name}", data)
        good[cls].append(rel)
        sizes[rel] = size
        if kind:
            special[kind] = rel

    red = _encode(_pattern((220, 30, 30), seed=1), "PNG")
    add("cats", "red.png", red)
    add("cats", "orange.jpg", _encode(_pattern((240, 150, 20), seed=2), "JPEG", quality=95))
    add("cats", "exif_rotated.jpg", exif_rotated_jpeg(), size=(16, 32), kind="exif_rotated")
    add("cats", "cmyk.jpg", _encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95), kind="cmyk")
    gray16 = halves("I;16", 65535, 32768)  # values above 255 on purpose: viewed as white | mid-grey
    add("cats", "gray16.png", _encode(gray16, "PNG"), kind="gray16")
    add("cats", "rgba.png", _encode(halves("RGBA", (0, 0, 0, 0), (220, 30, 30, 255)), "PNG"), kind="rgba")
    palette = halves("P", 0, 1)
    palette.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    add("cats", "palette_trns.png", _encode(palette, "PNG", transparency=0), kind="palette_transparent")
    add("cats", "bw.png", _encode(halves("1", 0, 1), "PNG"), kind="bilevel")
    add("cats", "UPPER.JPEG", _encode(_pattern((200, 200, 40), seed=3), "JPEG"), kind="upper_ext")

    add("dogs", "blue.png", _encode(_pattern(BLUE, seed=4), "PNG"))
    add("dogs", "red_copy.png", red)  # the same bytes as cats/red.png: a leak a duplicate check must catch
    add("dogs", "png_named.jpg", _encode(_pattern((40, 160, 160), seed=5), "PNG"), kind="png_named_jpg")
    add("dogs", "pic.webp", _encode(_pattern((120, 40, 200), seed=6), "WEBP", lossless=True), kind="webp")
    frames = [Image.new("RGB", (24, 24), (255, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 255))]
    add("dogs", "anim.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), kind="gif")
    add("dogs", "pic.bmp", _encode(_pattern((30, 90, 30), seed=7), "BMP"), kind="bmp")
    add("dogs", "pic.tif", _encode(_pattern((160, 100, 60), seed=8), "TIFF"), kind="tiff")
    add("dogs", "float.tif", _encode(halves("F", 0.0, 1.0), "TIFF"), kind="float_tiff")

    garbage = random.Random(7).randbytes(300)
    broken_sniffed = [
        _write(root, "cats/truncated.jpg", truncated_jpeg()),
        _write(root, "dogs/bad_header.png", b"\x89PNG\r\n\x1a\n" + garbage),
    ]
    broken = broken_sniffed + [
        _write(root, "cats/zero.jpg", b""),
        _write(root, "dogs/garbage.png", garbage),
        _write(root, "dogs/text.jpg", b"This is not a photo, it is a note someone saved as .jpg\n"),
    ]
    ignored = [
        _write(root, "cats/notes.txt", b"cats were photographed in 2019\n"),
        _write(root, "dogs/README.md", b"# Dogs\n"),
        _write(root, "junk/info.txt", b"nothing to see\n"),
    ]
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + bytes(40)
    clutter = [
        _write(root, ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64)),
        _write(root, "cats/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64)),
        _write(root, "cats/._red.png", apple_double),
        _write(root, "dogs/Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64)),
        _write(root, "junk/Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64)),
        _write(root, "__MACOSX/cats/._red.png", apple_double),
        "__MACOSX",
    ]
    (root / "empty").mkdir(parents=True, exist_ok=True)

    return {
        "classes": sorted(good),
        "good": good,
        "sizes": sizes,
        "special": special,
        "broken": sorted(broken),
        "broken_sniffed": sorted(broken_sniffed),
        "ignored": sorted(ignored),
        "clutter": clutter,
        "empty_classes": ["empty", "junk"],
        "duplicates": [["cats/red.png", "dogs/red_copy.png"]],
    }


# --- real photos -------------------------------------------------------------------------------------------------


def sample_photos() -> dict[str, Image.Image]:
    """The two real photos scikit-learn ships (china.jpg: a pagoda under a hazy sky; flower.jpg: a dahlia), 640x427."""
    import sklearn.datasets

    folder = pathlib.Path(sklearn.datasets.__file__).parent / "images"
    photos = {}
    for name in ("china", "flower"):
        with Image.open(folder / f"{name}.jpg") as img:
            photos[name] = img.convert("RGB")
    return photos


# Regions (left, top, right, bottom) of the sample photos that look alike within a class and unlike across classes.
PHOTO_CLASSES = {
    "temple": ("china", (110, 20, 350, 420)),
    "sky": ("china", (380, 0, 640, 190)),
    "flower": ("flower", (160, 80, 470, 380)),
}


def photo_crop(photos: dict[str, Image.Image], cls: str, i: int) -> Image.Image:
    """The i-th seeded crop of class ``cls``: a random window of its region, shrunk to a small photo (40-64 px wide)."""
    source, (left, top, right, bottom) = PHOTO_CLASSES[cls]
    rng = random.Random(f"{cls}-{i}")
    w = rng.randint(90, min(170, right - left))
    h = rng.randint(int(w * 0.6), min(w, bottom - top))
    x, y = rng.randint(left, right - w), rng.randint(top, bottom - h)
    out_w = rng.randint(40, 64)
    return photos[source].crop((x, y, x + w, y + h)).resize((out_w, max(24, out_w * h // w)), Image.Resampling.LANCZOS)


def make_messy_photo_folder(root: pathlib.Path, *, per_class: int = 8) -> dict:
    """A folder of real photo crops in three classes, salted like a real download: broken files, odd-but-valid images,
    clutter, notes, an empty class folder and a duplicate across classes. Returns what a correct reader sees (as
    make_hostile_class_folder does): classes, good {class: [paths]}, broken, ignored, clutter, empty_classes,
    duplicates.
    """
    root = pathlib.Path(root)
    photos = sample_photos()
    good: dict[str, list[str]] = {cls: [] for cls in sorted(PHOTO_CLASSES)}

    def add(cls: str, name: str, data: bytes) -> None:
        good[cls].append(_write(root, f"{cls}/{name}", data))

    for cls in PHOTO_CLASSES:
        for i in range(per_class):
            ext = ("JPG", "jpg", "jpeg")[i % 3]  # cameras write .JPG, people rename to .jpg / .jpeg
            add(cls, f"IMG_{i:04d}.{ext}", _encode(photo_crop(photos, cls, i), "JPEG", quality=90))

    # Odd but valid: each must be trained on, upright and in the right colours.
    upright = photo_crop(photos, "temple", 100)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned clockwise; viewers (and rescli) turn it back
    turned = upright.transpose(Image.Transpose.ROTATE_270)
    add("temple", "phone_portrait.jpg", _encode(turned, "JPEG", exif=exif.tobytes()))
    add("temple", "print_cmyk.jpg", _encode(photo_crop(photos, "temple", 101).convert("CMYK"), "JPEG", quality=90))
    add("flower", "actually_png.jpg", _encode(photo_crop(photos, "flower", 100), "PNG"))
    gray16 = photo_crop(photos, "flower", 101).convert("L").point(lambda v: v * 257, "I").convert("I;16")
    add("flower", "scan_16bit.png", _encode(gray16, "PNG"))
    rgba = photo_crop(photos, "flower", 102).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 200))
    add("flower", "cutout.PNG", _encode(rgba, "PNG"))
    add("sky", "shared.webp", _encode(photo_crop(photos, "sky", 100), "WEBP", quality=90))
    paletted = photo_crop(photos, "sky", 101).convert("P", palette=Image.Palette.ADAPTIVE)
    add("sky", "palette.gif", _encode(paletted, "GIF"))
    add("sky", "scan.TIFF", _encode(photo_crop(photos, "sky", 102), "TIFF"))
    dup = _encode(photo_crop(photos, "sky", 103), "JPEG", quality=90)
    add("sky", "IMG_9000.jpg", dup)
    add("temple", "IMG_9000 (1).jpg", dup)  # the same photo filed under two classes: a label conflict

    cut = _encode(photo_crop(photos, "flower", 103).resize((96, 64)), "JPEG", quality=95)
    broken = sorted([
        _write(root, "temple/IMG_0100.jpg", b""),  # zero bytes: a failed copy
        _write(root, "flower/download.jpg", cut[: len(cut) * 2 // 3]),  # a download cut off mid-file
        # a web error page saved as a photo
        _write(root, "sky/IMG_0101.JPG", b"<html><body>403 Forbidden</body></html>\n"),
        _write(root, "temple/thumb.webp", random.Random(3).randbytes(200)),  # garbage
        _write(root, "sky/bad.tif", b"II*\x00" + random.Random(4).randbytes(60)),  # a TIFF header and nothing sensible
    ])
    ignored = sorted([
        _write(root, "README.md", b"# my photos\n"),
        _write(root, "flower/notes.txt", b"shot in june\n"),
        _write(root, "temple/.hidden_edit.jpg", _encode(photo_crop(photos, "temple", 102), "JPEG")),
        _write(root, "drafts/todo.txt", b"sort these\n"),
    ])
    clutter = [
        _write(root, ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64)),
        _write(root, "sky/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64)),
        _write(root, "temple/Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64)),
        _write(root, "flower/._IMG_0001.jpg", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(40)),
        _write(root, "__MACOSX/flower/._IMG_0001.jpg", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(40)),
    ]
    (root / "empty").mkdir()
    return {
        "classes": sorted(good),
        "good": {cls: sorted(rels) for cls, rels in good.items()},
        "broken": broken,
        "ignored": ignored,
        "clutter": clutter,
        "empty_classes": ["drafts", "empty"],
        "duplicates": [["sky/IMG_9000.jpg", "temple/IMG_9000 (1).jpg"]],
    }


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """Every path under ``root`` (hidden and clutter included) -> sha256 of its bytes, or "dir" / "link:<target>"."""
    import hashlib
    import os

    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = pathlib.Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
