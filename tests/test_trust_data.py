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
