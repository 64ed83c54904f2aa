"""rescli.data: every messy file a user's photo folder holds is read correctly or reported by name, never crashes."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
from hostile import BLUE, GREEN, make_bomb_png, make_hostile_class_folder
from PIL import Image, ImageFile

from rescli.core.errors import RescliError
from rescli.data import checks
from rescli.data.checks import cache_file_for, check_images, default_cache_dir
from rescli.data.files import is_clutter, is_hidden
from rescli.data.formats import looks_like_image, sniff_format
from rescli.data.images import ImageError, ImageInfo, check_image, load_rgb
from rescli.data.rgb import to_rgb


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, make_hostile_class_folder(root)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("RESCLI_CACHE_DIR", str(path))
    return path


def near(pixel, expected, tol=6):
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


def good_paths(root, expect):
    return [str(root / rel) for rels in expect["good"].values() for rel in rels]


# --- sniffing and names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, kw",
    [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("TIFF", {}), ("TIFF", {"big_tiff": True})],
)
def test_sniff_by_content_not_extension(tmp_path, fmt, kw):
    path = tmp_path / "picture.dat"
    try:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path, fmt, **kw)
    except (TypeError, ValueError, KeyError):
        pytest.skip(f"this Pillow cannot write {fmt} {kw}")
    assert sniff_format(path) == fmt
    assert load_rgb(path).getpixel((0, 0)) is not None


def test_sniff_png_named_jpg_and_mpo(hostile, tmp_path):
    root, expect = hostile
    assert sniff_format(root / expect["special"]["png_named_jpg"]) == "PNG"
    assert sniff_format(root / expect["special"]["upper_ext"]) == "JPEG"
    mpo = tmp_path / "phone.jpg"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(mpo, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert sniff_format(mpo) == "JPEG"  # MPO starts like any JPEG
    with Image.open(mpo) as img:
        assert img.format == "MPO"
    assert near(load_rgb(mpo).getpixel((4, 4)), (200, 0, 0))  # the first (primary) picture


def test_sniff_rejects_non_images(hostile, tmp_path):
    root, expect = hostile
    for rel in ["cats/zero.jpg", "dogs/garbage.png", "dogs/text.jpg", "cats/notes.txt", "dogs/README.md"]:
        assert sniff_format(root / rel) is None, rel
    (tmp_path / "bmw.txt").write_bytes(b"BMW service history, 2019-2023, all receipts\n")
    assert sniff_format(tmp_path / "bmw.txt") is None  # "BM" alone is not a bitmap
    assert sniff_format(tmp_path / "missing.jpg") is None
    assert sniff_format(tmp_path) is None  # a directory


def test_broken_sniffed_files_claim_a_format(hostile):
    root, expect = hostile
    assert all(sniff_format(root / rel) for rel in expect["broken_sniffed"])


@pytest.mark.parametrize(
    "name", [".DS_Store", "Thumbs.db", "thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r", "._IMG_0001.jpg",
             ".directory", "__MACOSX", ".ipynb_checkpoints", "@eaDir", "$RECYCLE.BIN", "a/b/.DS_Store"]
)
def test_clutter(name):
    assert is_clutter(name)
    assert is_clutter(pathlib.Path("/data/cats") / name)


@pytest.mark.parametrize("name", ["cat.jpg", "notes.txt", "README.md", "Icon.png", "thumbs.jpg", "DS_Store.png"])
def test_not_clutter(name):
    assert not is_clutter(name)


def test_hidden():
    assert is_hidden(".secret.jpg") and is_hidden("/a/b/.git") and is_hidden(pathlib.Path(".x"))
    assert not is_hidden("cat.jpg") and not is_hidden("/home/.me/cat.jpg")


def test_looks_like_image_by_content_or_extension(hostile, tmp_path):
    root, expect = hostile
    # Everything meant to be an image, decodable or not, is an image candidate (broken ones get reported, not ignored).
    for rel in expect["broken"] + [r for rels in expect["good"].values() for r in rels]:
        assert looks_like_image(root / rel), rel
    for rel in expect["ignored"]:
        assert not looks_like_image(root / rel), rel
    Image.new("RGB", (4, 4)).save(tmp_path / "scan.dat", "PNG")
    (tmp_path / "IMG_2.heic").write_bytes(b"")
    (tmp_path / "noext").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    (tmp_path / "bmw.txt").write_bytes(b"BMW service history\n")
    assert looks_like_image(tmp_path / "scan.dat") and looks_like_image(tmp_path / "noext")
    assert looks_like_image(tmp_path / "IMG_2.heic") and looks_like_image(tmp_path / "missing.TIFF")
    assert not looks_like_image(tmp_path / "bmw.txt") and not looks_like_image(tmp_path / "missing.txt")


# --- modes -------------------------------------------------------------------------------------------------------


def _img(mode, values, info=None):
    img = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        img.putpixel((x, 0), value)
    img.info.update(info or {})
    return img


def _premultiplied(mode, values):
    return Image.frombytes(mode, (len(values), 1), b"".join(bytes(v) for v in values))


def _palette(transparent: bool):
    img = _img("P", [0, 1], {"transparency": 0} if transparent else None)
    img.putpalette([10, 20, 30, *GREEN] + [0] * 762)
    return img


def _pa():
    img = Image.frombytes("PA", (2, 1), bytes([1, 0, 1, 255]))
    img.putpalette([0, 0, 0, *GREEN] + [0] * 762)
    return img


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: _img("1", [0, 255]), [(0, 0, 0), (255, 255, 255)]),
        (lambda: _img("L", [0, 77, 255]), [(0, 0, 0), (77, 77, 77), (255, 255, 255)]),
        (lambda: _img("LA", [(100, 0), (100, 255), (0, 128)]), [(255, 255, 255), (100, 100, 100), (127, 127, 127)]),
        (lambda: _premultiplied("La", [(50, 128), (100, 255)]), [(177, 177, 177), (100, 100, 100)]),
        (lambda: _palette(False), [(10, 20, 30), GREEN]),
        (lambda: _palette(True), [(255, 255, 255), GREEN]),
        (_pa, [(255, 255, 255), GREEN]),
        (
            lambda: _img("RGBA", [(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)]),
            [(255, 255, 255), (255, 0, 0), (127, 127, 127)],
        ),
        (lambda: _premultiplied("RGBa", [(0, 0, 0, 0), (100, 0, 0, 128)]), [(255, 255, 255), (227, 127, 127)]),
        (lambda: _img("RGB", [(255, 0, 0), (1, 2, 3)], {"transparency": (255, 0, 0)}), [(255, 255, 255), (1, 2, 3)]),
        (lambda: _img("CMYK", [(0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]), [(255, 0, 0), (0, 0, 0), (255,) * 3]),
        (lambda: _img("YCbCr", [(76, 85, 255), (255, 128, 128)]), [(254, 0, 0), (255, 255, 255)]),
        (lambda: _img("LAB", [(255, 128, 128), (0, 128, 128)]), [(255, 255, 255), (0, 0, 0)]),
        (lambda: _img("HSV", [(0, 255, 255), (85, 255, 255)]), [(255, 0, 0), (0, 255, 0)]),
        (lambda: _img("RGBX", [(1, 2, 3, 0)]), [(1, 2, 3)]),
    ],
)
def test_to_rgb_modes(make, expected):
    img = make()
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    for x, want in enumerate(expected):
        assert near(out.getpixel((x, 0)), want, tol=3), (img.mode, x, out.getpixel((x, 0)), want)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N", "I"])
def test_sixteen_bit_is_scaled_not_clipped(mode):
    out = to_rgb(_img(mode, [0, 257, 32768, 65535]))
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    assert out.getpixel((2, 0)) == (128, 128, 128)


def test_int32_outside_16_bit_range_is_stretched():
    out = to_rgb(_img("I", [-1000, 0, 1000]))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert to_rgb(_img("I", [-5, -5])).getpixel((0, 0)) == (0, 0, 0)  # constant, no division by zero


def test_float_modes():
    unit = to_rgb(_img("F", [0.0, 0.5, 1.0]))
    assert [unit.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = to_rgb(_img("F", [-1.0, 1.0, 3.0]))
    assert [wide.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert to_rgb(_img("F", [7.0, 7.0])).getpixel((0, 0)) == (7, 7, 7)
    assert to_rgb(_img("F", [float("nan"), float("inf"), 2.0])).mode == "RGB"


def test_every_pillow_mode_converts():
    for mode in ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                 "I", "I;16", "I;16B", "I;16L", "I;16N", "F"]:
        out = to_rgb(Image.new(mode, (3, 2)))
        assert (out.mode, out.size) == ("RGB", (3, 2)), mode


# --- loading files -----------------------------------------------------------------------------------------------


def test_every_good_file_loads_upright_rgb(hostile):
    root, expect = hostile
    for rel, size in expect["sizes"].items():
        img = load_rgb(root / rel)
        assert (img.mode, img.size) == ("RGB", tuple(size)), rel


def test_exif_orientation_applied(hostile):
    root, expect = hostile
    path = root / expect["special"]["exif_rotated"]
    with Image.open(path) as raw:
        assert raw.size == (32, 16)  # stored landscape, green block top-left
    img = load_rgb(path)
    assert img.size == (16, 32)
    assert near(img.getpixel((13, 2)), GREEN, tol=25)  # the block is now top-right
    assert near(img.getpixel((2, 2)), BLUE, tol=25)
    assert near(img.getpixel((13, 29)), BLUE, tol=25)


def test_special_files_pixels(hostile):
    root, expect = hostile
    special = {kind: load_rgb(root / rel) for kind, rel in expect["special"].items()}
    assert near(special["cmyk"].getpixel((12, 12)), (255, 0, 0), tol=12)
    assert special["gray16"].getpixel((2, 2)) == (255, 255, 255)
    assert special["gray16"].getpixel((20, 2)) == (128, 128, 128)
    assert special["rgba"].getpixel((2, 2)) == (255, 255, 255)  # transparent -> white, not black
    assert special["rgba"].getpixel((20, 2)) == (220, 30, 30)
    assert special["palette_transparent"].getpixel((2, 2)) == (255, 255, 255)
    assert special["palette_transparent"].getpixel((20, 2)) == GREEN
    assert special["bilevel"].getpixel((2, 2)) == (0, 0, 0) and special["bilevel"].getpixel((20, 2)) == (255,) * 3
    assert special["float_tiff"].getpixel((2, 2)) == (0, 0, 0)
    assert special["float_tiff"].getpixel((20, 2)) == (255, 255, 255)
    assert special["gif"].getpixel((2, 2)) == (255, 0, 0)  # first frame
    assert special["png_named_jpg"].getpixel((0, 0)) == (40, 160, 160)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.linear_gradient("L").resize((1600, 1200)).convert("RGB").save(path, "JPEG", quality=80)
    return path


@pytest.mark.parametrize(
    "draft, size",
    [(300, (400, 300)), (100, (200, 150)), (550, (800, 600)), (700, (1600, 1200)), (1300, (1600, 1200))],
)
def test_draft_decodes_smaller_but_never_below_draft_size(big_jpeg, draft, size):
    img = load_rgb(big_jpeg, draft_size=draft)
    assert img.size == size and min(img.size) >= min(draft, 1200)


def test_draft_ignored_for_other_formats_and_keeps_exif(hostile, tmp_path):
    root, expect = hostile
    assert load_rgb(root / "cats/red.png", draft_size=8).size == (24, 24)
    assert load_rgb(root / expect["special"]["exif_rotated"], draft_size=8).size == (8, 16)  # 1/2 scale, upright


@pytest.mark.parametrize(
    "rel, reason",
    [
        ("cats/zero.jpg", "empty file"),
        ("cats/truncated.jpg", "truncated"),
        ("dogs/garbage.png", "not an image"),
        ("dogs/text.jpg", "not an image"),
        ("dogs/bad_header.png", "corrupt or truncated PNG"),
        ("cats/notes.txt", "not an image"),
    ],
)
def test_broken_files_raise_image_error_naming_the_file(hostile, rel, reason):
    root, _ = hostile
    with pytest.raises(ImageError) as caught:
        load_rgb(root / rel)
    message = str(caught.value)
    assert isinstance(caught.value, RescliError) and caught.value.exit_code == 1
    assert str(root / rel) in message and reason in message and "\n" not in message
    assert caught.value.reason in message and str(root / rel) not in caught.value.reason


def test_missing_directory_and_unsupported(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_rgb(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="directory"):
        load_rgb(tmp_path)
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(32))
    with pytest.raises(ImageError, match="HEIC.*not supported"):
        load_rgb(heic)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_rgb(path)
        assert check_image(path).error == "permission denied"
    finally:
        path.chmod(0o644)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [3000, 1000])  # 3000: our own check; 1000: Pillow refuses at open (> 2x limit)
def test_decompression_bomb_is_a_clear_image_error(tmp_path, monkeypatch, limit):
    path = tmp_path / "bomb.png"
    pixels = make_bomb_png(path, side=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError) as caught:
        load_rgb(path)
    message = str(caught.value)
    assert "too large" in message and f"{pixels:,}" in message and f"{limit:,}" in message and "bomb.png" in message
    info = check_image(path)
    assert not info.ok and "too large" in info.error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_rgb(path).size == (64, 64)


def test_truncated_images_stay_broken():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_module_does_not_import_torch():
    code = "import sys, rescli.data.images, rescli.data.checks, rescli.data.scan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
    assert out.stdout.strip() == "False"


# --- checks and cache --------------------------------------------------------------------------------------------


def test_check_image_good_and_bad(hostile):
    root, expect = hostile
    path = root / expect["special"]["exif_rotated"]
    info = check_image(path)
    assert info == ImageInfo(str(path), True, None, 16, 32, hashlib.sha1(path.read_bytes()).hexdigest())
    bad = check_image(root / "cats/truncated.jpg")
    assert not bad.ok and "truncated" in bad.error and bad.sha1 and (bad.width, bad.height) == (0, 0)
    missing = check_image(root / "nope.jpg")
    assert not missing.ok and missing.sha1 == "" and missing.error == "file not found"


@pytest.mark.parametrize("workers", [1, 2])
def test_check_images_flags_exactly_the_broken_files(hostile, workers):
    root, expect = hostile
    paths = good_paths(root, expect) + [root / rel for rel in expect["broken"]]  # Path objects in, str keys out
    done = []
    result = check_images(paths, workers=workers, progress=done.append)
    assert list(result) == [str(p) for p in paths] and sum(done) == len(paths)
    assert {p for p, info in result.items() if not info.ok} == {str(root / rel) for rel in expect["broken"]}
    for rel, size in expect["sizes"].items():
        info = result[str(root / rel)]
        assert (info.width, info.height) == tuple(size) and info.error is None
        assert info.sha1 == hashlib.sha1((root / rel).read_bytes()).hexdigest()
    for group in expect["duplicates"]:
        assert len({result[str(root / rel)].sha1 for rel in group}) == 1
    good_sha1s = [result[p].sha1 for p in good_paths(root, expect)]
    assert len(set(good_sha1s)) == len(good_sha1s) - sum(len(g) - 1 for g in expect["duplicates"])


def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cache_reused_and_invalidated(hostile, cache_dir, monkeypatch, tmp_path):
    root, expect = hostile
    data = tmp_path / "data"
    make_hostile_class_folder(data)  # a private copy: this test touches files
    paths = good_paths(data, expect) + [str(data / rel) for rel in expect["broken"]]
    cache_file = cache_file_for(data)
    before = _snapshot(data)
    first = check_images(paths, cache_file=cache_file)
    assert cache_file.is_file() and not cache_file.is_relative_to(data)
    assert _snapshot(data) == before  # nothing written into the data folder

    calls = []
    real = check_image
    monkeypatch.setattr(checks, "check_image", lambda p: calls.append(p) or real(p))
    done = []
    assert check_images(paths, cache_file=cache_file, progress=done.append) == first
    assert calls == [] and sum(done) == len(paths)

    touched = paths[0]
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert check_images(paths, cache_file=cache_file) == first
    assert calls == [touched]

    calls.clear()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # results depend on the limit: all are checked again
    check_images(paths, cache_file=cache_file)
    assert sorted(calls) == sorted(paths)
    assert [p.name for p in cache_file.parent.iterdir()] == [cache_file.name]  # no temp files left behind


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 1, "entries": "x"}', ""])
def test_corrupt_cache_is_ignored_and_replaced(hostile, cache_dir, monkeypatch, content):
    root, expect = hostile
    paths = good_paths(root, expect)[:4]
    cache_file = cache_dir / "c.json"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(content)
    assert all(info.ok for info in check_images(paths, cache_file=cache_file).values())
    assert len(json.loads(cache_file.read_text())["entries"]) == 4


def test_corrupt_cache_entries_are_rechecked(hostile, cache_dir, monkeypatch):
    root, expect = hostile
    paths = good_paths(root, expect)[:3]
    cache_file = cache_dir / "c.json"
    check_images(paths, cache_file=cache_file)
    doc = json.loads(cache_file.read_text())
    key = os.path.abspath(paths[0])
    doc["entries"][key]["width"] = "wide"
    cache_file.write_text(json.dumps(doc))
    calls = []
    real = check_image
    monkeypatch.setattr(checks, "check_image", lambda p: calls.append(p) or real(p))
    assert check_images(paths, cache_file=cache_file)[paths[0]].width == 24
    assert calls == [paths[0]]


def test_unreadable_results_are_not_cached(hostile, tmp_path, cache_dir, monkeypatch):
    root, expect = hostile
    cache_file = cache_dir / "c.json"
    result = check_images([tmp_path / "missing.jpg"], cache_file=cache_file)
    assert result[str(tmp_path / "missing.jpg")].error == "file not found"
    assert json.loads(cache_file.read_text())["entries"] == {}
    # A permission problem (faked: tests may run as root) can be fixed without touching the file: check again next time.
    path = good_paths(root, expect)[0]
    calls = []
    monkeypatch.setattr(
        checks, "check_image", lambda p: calls.append(p) or ImageInfo(p, False, "permission denied", 0, 0, "")
    )
    for _ in range(2):
        assert check_images([path], cache_file=cache_file)[path].error == "permission denied"
    assert calls == [path, path] and json.loads(cache_file.read_text())["entries"] == {}


def test_interrupted_check_keeps_finished_results(hostile, cache_dir):
    root, expect = hostile
    paths = good_paths(root, expect)[:5]
    cache_file = cache_dir / "c.json"

    done = []

    def progress(n):  # Ctrl-C arrives while the third file is being reported
        done.append(n)
        if sum(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_images(paths, workers=1, cache_file=cache_file, progress=progress)
    assert len(json.loads(cache_file.read_text())["entries"]) == 3  # finished work is not lost


def test_unwritable_cache_is_not_fatal(hostile, tmp_path):
    root, expect = hostile
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = check_images(good_paths(root, expect)[:2], cache_file=blocker / "c.json")
    assert all(info.ok for info in result.values())


def test_cache_locations(monkeypatch, tmp_path):
    monkeypatch.delenv("RESCLI_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "rescli"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "rescli"
    monkeypatch.setenv("RESCLI_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert not (tmp_path / "mine").exists()  # created by whoever writes, not by asking

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cache = cache_file_for("data")
    assert cache == cache_file_for(tmp_path / "data")
    assert cache.parent == tmp_path / "mine" / "checks" and len(cache.stem) == 16 and cache.suffix == ".json"
    assert cache != cache_file_for(tmp_path / "other")

