"""Trust in odd data folders: names that are not UTF-8, caches that cannot be written, FIFOs, links, odd layouts.

Each test here fails on the code before its fix. Everything runs on tiny generated images; the few finetune runs are
resnet18 at 16 px for one epoch.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from conftest import make_class_folder, make_split_folder, run_cli

FAST = ["--weights", "none", "--img-size", "16", "--batch-size", "16", "--workers", "0", "--augment", "none",
        "--precision", "fp32", "--epochs", "1"]


def bytes_name(folder: Path, raw: bytes) -> Path:
    """``folder / raw`` for a name that is not UTF-8 (as Python holds it: surrogate escapes), or skip where the file
    system refuses such names (macOS, some network shares)."""
    path = folder / os.fsdecode(raw)
    try:
        path.write_bytes(b"")
        path.unlink()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    return path


def make_fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(path)
    return path


def finishes(fn, *, fifos: list[Path], patience: float = 120.0):  # generous: a hang, not a speed test
    """fn() in a thread; its result, or a test failure when it is still blocked on one of ``fifos`` after ``patience``
    seconds (then each FIFO gets a writer that closes at once, so the blocked reader sees an end and the run ends)."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(patience)
    hung = thread.is_alive()
    while thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # nobody reading it right now
                pass
        thread.join(0.2)
    assert not hung, f"blocked reading a FIFO: {fifos}"
    if "error" in box:
        raise box["error"]
    return box["result"]


# --- 9: names that are not UTF-8 -----------------------------------------------------------------------------------


def test_text_writers_keep_bytes_for_path_lists_and_escape_them_in_html_and_json(tmp_path):
    from rescli.fileio import atomic_write_json, atomic_write_text

    name = os.fsdecode(b"notes\xff.txt")
    atomic_write_text(tmp_path / "skipped.txt", f"ignored\t{name}\n")
    atomic_write_text(tmp_path / "predictions.csv", f"path\n{name}\n")
    atomic_write_text(tmp_path / "report.html", f"<p>{name}</p>")
    atomic_write_json(tmp_path / "metrics.json", {"path": name})

    assert (tmp_path / "skipped.txt").read_bytes() == b"ignored\tnotes\xff.txt\n"  # the bytes that name the file
    assert (tmp_path / "predictions.csv").read_bytes() == b"path\nnotes\xff.txt\n"
    assert (tmp_path / "report.html").read_bytes().decode("utf-8") == "<p>notes\\xff.txt</p>"  # valid UTF-8
    raw = (tmp_path / "metrics.json").read_bytes()
    assert raw.isascii() and os.fsencode(json.loads(raw)["path"]) == b"notes\xff.txt"  # valid JSON, bytes recoverable


def test_predictions_csv_keeps_names_that_are_not_utf8(tmp_path):
    from rescli.evaluate import write_predictions_csv

    cls, path = os.fsdecode(b"caf\xe9"), os.fsdecode(b"/data/caf\xe9/gr\xfcn.png")
    row = {"path": path, "true": cls, "predicted": cls, "score": 0.9, "true_score": 0.9, "loss": 0.1, "correct": True}
    write_predictions_csv(tmp_path / "predictions.csv", [row])
    lines = (tmp_path / "predictions.csv").read_bytes().splitlines()
    assert lines[1] == b"/data/caf\xe9/gr\xfcn.png,caf\xe9,caf\xe9,0.900000,0.900000,0.100000,true"


def test_checkpoint_and_check_cache_keep_names_that_are_not_utf8(tmp_path):
    """Guards (these already worked): the two writers that are not text files."""
    from rescli import images
    from rescli.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint

    cls = os.fsdecode(b"r\xe9d")
    ckpt = make_checkpoint(model_state={}, arch="resnet18", classes=[cls, "green"], img_size=16, mean=[0.5] * 3,
                           std=[0.5] * 3, settings={"data": os.fsdecode(b"/d/r\xe9d")})
    save_checkpoint(ckpt, tmp_path / "best.pt")
    assert load_checkpoint(tmp_path / "best.pt")["classes"] == [cls, "green"]

    data = make_class_folder(tmp_path / "d", per_class=1, classes=("red",))
    png = (data / "red" / "img_000.png").rename(bytes_name(data / "red", b"\xe9t\xe9.png"))
    cache_file = tmp_path / "cache.json"
    first = images.check_images([png], cache_file=cache_file)
    assert first[str(png)].ok and cache_file.read_bytes().isascii()
    assert images._read_cache(cache_file).keys() == {str(png)}  # read back as the very same name: a cache hit


# --- 11: FIFOs and devices -----------------------------------------------------------------------------------------


def test_image_readers_refuse_fifos_and_devices_without_blocking(tmp_path):
    from rescli import images

    fifo = make_fifo(tmp_path / "x.jpg")

    def read_all():
        with pytest.raises(images.ImageError, match=r"x\.jpg: not a regular file but a named pipe \(FIFO\)"):
            images.load_rgb(fifo)
        info = images.check_image(fifo)
        return info, images.sniff_format(fifo), images.looks_like_image(fifo), images.plain_jpeg_bytes(fifo)

    info, fmt, looks, raw = finishes(read_all, fifos=[fifo])
    assert not info.ok and "named pipe" in info.error and (fmt, looks, raw) == (None, False, None)
    with pytest.raises(images.ImageError, match="not a regular file but a character device"):
        images.load_rgb("/dev/zero")  # would otherwise be read until memory runs out
    with pytest.raises(images.ImageError, match="is a directory, not a file"):
        images.load_rgb(tmp_path)


def test_predict_gives_fifos_found_or_named_an_error_row(trained_run, tmp_path):
    folder = tmp_path / "imgs"
    make_class_folder(folder, per_class=1, classes=("red",))
    found, named = make_fifo(folder / "red" / "x.jpg"), make_fifo(tmp_path / "given.png")
    args = ("predict", folder, named, "--model", trained_run / "best.pt", "--format", "jsonl", "--workers", "1")
    res = finishes(lambda: run_cli(*args), fifos=[found, named])
    assert res.code == 1, res.err
    rows = {Path(r["path"]).name: r for r in map(json.loads, res.out.splitlines())}
    assert rows["img_000.png"]["label"]
    for name in ("x.jpg", "given.png"):
        assert "not a regular file but a named pipe (FIFO)" in rows[name]["error"]


# --- 15a: the check cache notices a chmod ----------------------------------------------------------------------


def test_check_cache_notices_a_change_that_keeps_size_and_mtime(tmp_path, monkeypatch):
    from rescli import images

    data = make_class_folder(tmp_path / "d", per_class=2, classes=("red",))
    paths = [str(p) for p in sorted((data / "red").iterdir())]
    cache_file = tmp_path / "cache.json"
    images.check_images(paths, cache_file=cache_file)
    calls = []
    real = images.check_image
    monkeypatch.setattr(images, "check_image", lambda p: calls.append(p) or real(p))

    before = os.stat(paths[0])
    for mode in (0o600, 0o640, 0o604, 0o644) * 50:  # chmod changes ctime (not mtime); wait for the clock to move on
        os.chmod(paths[0], mode)
        if os.stat(paths[0]).st_ctime_ns != before.st_ctime_ns:
            break
    after = os.stat(paths[0])
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    if after.st_ctime_ns == before.st_ctime_ns:
        pytest.skip("ctime did not move here")
    images.check_images(paths, cache_file=cache_file)
    assert calls == [paths[0]]  # checked again: permissions may have made it unreadable


# --- 15b: one long line on stdin --------------------------------------------------------------------------------


class _Counted(bytes):
    """bytes that add up how many bytes split() and + go over, to tell linear from quadratic without a clock."""

    work = 0

    def split(self, *args, **kwargs):
        _Counted.work += len(self)
        return [_Counted(part) for part in super().split(*args, **kwargs)]

    def __add__(self, other):
        _Counted.work += len(self) + len(other)
        return _Counted(bytes(self) + bytes(other))


class _ChunkedStream:
    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.pos = data, chunk, 0

    def read1(self, n: int) -> bytes:
        out = _Counted(self.data[self.pos:self.pos + min(n, self.chunk)])
        self.pos += len(out)
        return out


def test_one_very_long_stdin_line_is_read_in_one_pass():
    from rescli.predict import iter_input_paths

    long_line = b"x" * (4 << 20)  # 4 MiB: 64 chunks of 64 KiB
    _Counted.work = 0
    stream = _ChunkedStream(b"a.jpg\n" + long_line + b"\nb.jpg\n", 65536)
    paths = list(iter_input_paths(["-"], stdin=stream))
    assert paths == ["a.jpg", long_line.decode(), "b.jpg"]
    assert _Counted.work <= 3 * len(stream.data), _Counted.work  # the old re-split of the whole buffer: ~33x
