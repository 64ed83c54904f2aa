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

from rescli.data import checks

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
    from rescli.core.fileio import atomic_write_json, atomic_write_text

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
    from rescli.evaluation.artefacts import write_predictions_csv

    cls, path = os.fsdecode(b"caf\xe9"), os.fsdecode(b"/data/caf\xe9/gr\xfcn.png")
    row = {"path": path, "true": cls, "predicted": cls, "score": 0.9, "true_score": 0.9, "loss": 0.1, "correct": True}
    write_predictions_csv(tmp_path / "predictions.csv", [row])
    lines = (tmp_path / "predictions.csv").read_bytes().splitlines()
    assert lines[1] == b"/data/caf\xe9/gr\xfcn.png,caf\xe9,caf\xe9,0.900000,0.900000,0.100000,true"


def test_finetune_with_file_names_that_are_not_utf8(tmp_path, cli):
    data = make_class_folder(tmp_path / "d", per_class=6, classes=("red", "green"))
    for i, png in enumerate(sorted((data / "green").iterdir())):  # every green image: some land in validation
        png.rename(bytes_name(data / "green", b"gr\xfcn_%d.png" % i))
    bytes_name(data / "red", b"notes\xff.txt").write_text("not an image")
    res = cli("finetune", data, *FAST, "--output", tmp_path / "run")
    assert res.code == 0, res.err
    run = tmp_path / "run"
    assert b"ignored\tred/notes\xff.txt\tnot an image\n" in (run / "skipped.txt").read_bytes()
    assert b"/green/gr\xfcn_" in (run / "predictions.csv").read_bytes()
    metrics = json.loads((run / "metrics.json").read_bytes().decode("ascii"))
    assert "temperature_source" in metrics  # calibration ran: the run finished after writing predictions.csv
    (run / "report.html").read_bytes().decode("utf-8")  # valid UTF-8 whatever the names
    json.loads((run / "run.json").read_bytes().decode("ascii"))
    assert torch.load(run / "best.pt", weights_only=True)["temperature"] == metrics["temperature"]
    assert "notes\\xff.txt" in res.err  # stderr shows the byte, not a replacement character


def test_finetune_with_a_class_name_that_is_not_utf8(tmp_path, cli):
    data = make_class_folder(tmp_path / "d", per_class=6, classes=("red", "green"))
    (data / "red").rename(bytes_name(data, b"r\xe9d"))
    res = cli("finetune", data, *FAST, "--output", tmp_path / "run")
    assert res.code == 0, res.err
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["classes"] == ["green", os.fsdecode(b"r\xe9d")]
    assert b"r\xe9d" in (tmp_path / "run" / "predictions.csv").read_bytes()


def test_checkpoint_and_check_cache_keep_names_that_are_not_utf8(tmp_path):
    """Guards (these already worked): the two writers that are not text files."""
    from rescli.data.checks import _read_cache, check_images
    from rescli.models.checkpoint import (
        load_checkpoint,
        make_checkpoint,
        save_checkpoint,
    )

    cls = os.fsdecode(b"r\xe9d")
    ckpt = make_checkpoint(model_state={}, arch="resnet18", classes=[cls, "green"], img_size=16, mean=[0.5] * 3,
                           std=[0.5] * 3, settings={"data": os.fsdecode(b"/d/r\xe9d")})
    save_checkpoint(ckpt, tmp_path / "best.pt")
    assert load_checkpoint(tmp_path / "best.pt")["classes"] == [cls, "green"]

    data = make_class_folder(tmp_path / "d", per_class=1, classes=("red",))
    png = (data / "red" / "img_000.png").rename(bytes_name(data / "red", b"\xe9t\xe9.png"))
    cache_file = tmp_path / "cache.json"
    first = check_images([png], cache_file=cache_file)
    assert first[str(png)].ok and cache_file.read_bytes().isascii()
    assert _read_cache(cache_file).keys() == {str(png)}  # read back as the very same name: a cache hit


# --- 10: a cache folder that cannot be made -----------------------------------------------------------------------


def test_unusable_cache_folder_warns_once_and_goes_on(tmp_path, cli, monkeypatch):
    data = make_class_folder(tmp_path / "d", per_class=4, classes=("red", "green"))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("RESCLI_CACHE_DIR", str(blocker / "rescli"))  # mkdir under a regular file: ENOTDIR
    for args in (["dataset", data], ["finetune", data, *FAST, "--output", tmp_path / "run"]):
        res = cli(*args)
        assert res.code == 0, res.err
        assert res.err.count("warning:") == 1 and "no image check cache" in res.err, res.err
        assert "RESCLI_CACHE_DIR" in res.err and "Traceback" not in res.err


def test_no_home_folder_at_all_is_not_fatal(tmp_path, monkeypatch):
    import pwd

    from rescli.data.scan import scan_dataset

    data = make_class_folder(tmp_path / "d", per_class=2, classes=("red", "green"))
    for var in ("RESCLI_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_entry(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)  # Path.home() then raises RuntimeError
    index = scan_dataset(data, val_split=0.0)
    assert index.counts("train") == {"green": 2, "red": 2}


# --- 11: FIFOs and devices -----------------------------------------------------------------------------------------


def test_fifo_named_like_an_image_is_ignored_never_opened(tmp_path):
    from rescli.data.scan import scan_dataset

    data = make_class_folder(tmp_path / "d", per_class=2, classes=("red", "green"))
    fifos = [make_fifo(data / "red" / "x.jpg"), make_fifo(data / "green" / "pipe")]
    index = finishes(lambda: scan_dataset(data, val_split=0.0), fifos=fifos)
    assert index.counts("train") == {"green": 2, "red": 2} and index.broken == {}
    assert index.ignored_reasons["red/x.jpg"] == "a named pipe (FIFO), not a regular file"
    assert index.ignored_reasons["green/pipe"] == "a named pipe (FIFO), not a regular file"


def test_image_readers_refuse_fifos_and_devices_without_blocking(tmp_path):
    from rescli.data.formats import looks_like_image, sniff_format
    from rescli.data.images import ImageError, check_image, load_rgb, plain_jpeg_bytes

    fifo = make_fifo(tmp_path / "x.jpg")

    def read_all():
        with pytest.raises(ImageError, match=r"x\.jpg: not a regular file but a named pipe \(FIFO\)"):
            load_rgb(fifo)
        info = check_image(fifo)
        return info, sniff_format(fifo), looks_like_image(fifo), plain_jpeg_bytes(fifo)

    info, fmt, looks, raw = finishes(read_all, fifos=[fifo])
    assert not info.ok and "named pipe" in info.error and (fmt, looks, raw) == (None, False, None)
    with pytest.raises(ImageError, match="not a regular file but a character device"):
        load_rgb("/dev/zero")  # would otherwise be read until memory runs out
    with pytest.raises(ImageError, match="is a directory, not a file"):
        load_rgb(tmp_path)


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
    from rescli.data.checks import check_images
    from rescli.data.images import (
        check_image,
    )

    data = make_class_folder(tmp_path / "d", per_class=2, classes=("red",))
    paths = [str(p) for p in sorted((data / "red").iterdir())]
    cache_file = tmp_path / "cache.json"
    check_images(paths, cache_file=cache_file)
    calls = []
    real = check_image
    monkeypatch.setattr(checks, "check_image", lambda p: calls.append(p) or real(p))

    before = os.stat(paths[0])
    for mode in (0o600, 0o640, 0o604, 0o644) * 50:  # chmod changes ctime (not mtime); wait for the clock to move on
        os.chmod(paths[0], mode)
        if os.stat(paths[0]).st_ctime_ns != before.st_ctime_ns:
            break
    after = os.stat(paths[0])
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    if after.st_ctime_ns == before.st_ctime_ns:
        pytest.skip("ctime did not move here")
    check_images(paths, cache_file=cache_file)
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
    from rescli.inference.inputs import iter_input_paths

    long_line = b"x" * (4 << 20)  # 4 MiB: 64 chunks of 64 KiB
    _Counted.work = 0
    stream = _ChunkedStream(b"a.jpg\n" + long_line + b"\nb.jpg\n", 65536)
    paths = list(iter_input_paths(["-"], stdin=stream))
    assert paths == ["a.jpg", long_line.decode(), "b.jpg"]
    assert _Counted.work <= 3 * len(stream.data), _Counted.work  # the old re-split of the whole buffer: ~33x


# --- 15c: a class named "train" ----------------------------------------------------------------------------------


def test_a_class_named_train_is_a_class_not_a_split(tmp_path):
    from rescli.data.scan import scan_dataset

    data = tmp_path / "vehicles"
    make_class_folder(data, per_class=4, classes=("red", "green"))
    (data / "red").rename(data / "train")  # pictures of trains, beside pictures of buses
    (data / "green").rename(data / "bus")
    index = scan_dataset(data)
    assert index.layout == "class-folders" and index.classes == ["bus", "train"]
    assert sum(index.counts("train").values()) + sum(index.counts("val").values()) == 8


def test_split_root_is_still_a_split_root(tmp_path):
    from rescli.data.scan import scan_dataset

    index = scan_dataset(make_split_folder(tmp_path / "s", with_test=False))
    assert index.layout == "split-folders" and index.classes == ["blue", "green", "red"]


# --- 15d: a class without a validation image ------------------------------------------------------------------------


def test_a_one_image_class_is_warned_of_by_name(tmp_path, cli):
    from rescli.data.report import describe_dataset
    from rescli.data.scan import scan_dataset

    data = make_class_folder(tmp_path / "d", per_class=5, classes=("red", "green"))
    make_class_folder(data, per_class=1, classes=("blue",))
    index = scan_dataset(data)
    assert index.counts("val")["blue"] == 0
    assert len(index.warnings) == 1 and "class 'blue' has only one image (blue/img_000.png)" in index.warnings[0]
    assert describe_dataset(data)["warnings"] == index.warnings

    table = cli("dataset", data)
    assert table.code == 0 and "class 'blue' has only one image" in table.out
    res = cli("finetune", data, *FAST, "--output", tmp_path / "run")
    assert res.code == 0, res.err
    assert res.err.count("warning: class 'blue' has only one image") == 1


def test_a_class_missing_from_val_folder_is_warned_of(tmp_path):
    from rescli.data.scan import scan_dataset

    root = make_split_folder(tmp_path / "s", with_test=False)
    for png in (root / "val" / "blue").iterdir():
        png.unlink()
    (root / "val" / "blue").rmdir()
    index = scan_dataset(root)
    assert index.warnings == ["class 'blue' has no validation images (in val): validation never measures it"]
    assert scan_dataset(make_split_folder(tmp_path / "ok", with_test=False)).warnings == []


# --- 15f: links between class folders ------------------------------------------------------------------------------


def test_a_link_to_a_sibling_class_counts_its_images_once_and_says_so(tmp_path):
    from rescli.data.scan import scan_dataset

    data = make_class_folder(tmp_path / "d", per_class=3, classes=("red", "green"))
    try:
        (data / "crimson").symlink_to(data / "red", target_is_directory=True)  # a second name for a class
        (data / "green" / "more").symlink_to(data / "red", target_is_directory=True)  # a class inside another
    except OSError:
        pytest.skip("no symlinks here")
    index = scan_dataset(data, val_split=0.0)
    assert index.classes == ["green", "red"] and index.counts("train") == {"green": 3, "red": 3}
    assert index.ignored_reasons == {
        "crimson": "link to class folder red (its images count once, in red)",
        "green/more": "link into class folder red (its images count once, in red)",
    }


def test_a_linked_class_folder_outside_the_data_folder_is_still_a_class(tmp_path):
    from rescli.data.scan import scan_dataset

    data = make_class_folder(tmp_path / "d", per_class=2, classes=("red",))
    elsewhere = make_class_folder(tmp_path / "pool", per_class=2, classes=("green",))
    try:
        (data / "green").symlink_to(elsewhere / "green", target_is_directory=True)
        (data / "lime").symlink_to(elsewhere / "green", target_is_directory=True)  # the same folder twice
    except OSError:
        pytest.skip("no symlinks here")
    index = scan_dataset(data, val_split=0.0)
    assert index.counts("train") == {"green": 2, "red": 2}
    assert index.ignored_reasons == {"lime": "link to class folder green (its images count once, in green)"}
