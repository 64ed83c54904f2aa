"""Runs that must not be stranded, numbers that must not be silently wrong, output that must not lie.

Evaluate on the training folder scores the held-out split; resume keeps its split and refuses changed classes;
one process per run folder; interrupts at any point stay resumable; user strings are never rich markup; I/O
failures are one line.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_class_folder, run_cli, write_color_images

from rescli.models.checkpoint import load_checkpoint
from rescli.train.interrupts import Interrupted
from rescli.train.loop import finetune
from rescli.train.settings import TrainSettings

TINY = ["--weights", "none", "--arch", "resnet20", "--img-size", "16", "--batch-size", "4", "--workers", "0",
        "--augment", "none"]


def train(data: Path, out: Path, *extra: str, cwd: Path | None = None):
    res = run_cli("finetune", data, *TINY, "--epochs", "1", "--output", out, *extra, cwd=cwd)
    assert res.code == 0, res.err
    return res


def predictions(run: Path) -> list[dict[str, str]]:
    with open(run / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_on_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trust")
    data = make_class_folder(root / "data", per_class=6, size=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLI_CACHE_DIR", str(root / "cache"))
        train(data, root / "run")
    return data, root / "run"


# --- 3: evaluate scores the images the model did not train on -------------------------------------------------

def test_evaluate_on_the_training_folder_scores_the_held_out_split(run_on_data, cli):
    data, run = run_on_data
    held_out = sorted(r["path"] for r in predictions(run))  # finetune's validation images
    res = cli("evaluate", run / "best.pt", data, "--format", "json", "--no-files", "--workers", "0")
    assert res.code == 0, res.err
    metrics = json.loads(res.out)
    assert metrics["n"] == len(held_out) == 3
    assert metrics["evaluated"]["split"] == "val" and metrics["evaluated"]["held_out"] is True
    assert metrics["evaluated"]["seen_in_training"] == 0
    assert "the folder this model was trained on" in res.err and "held out" in res.err
    res = cli("evaluate", run / "best.pt", data, "--output", run.parent / "ev", "--workers", "0")
    assert sorted(r["path"] for r in predictions(run.parent / "ev")) == held_out

    for split, n in (("train", 15), ("all", 18)):
        res = cli("evaluate", run / "best.pt", data, "--split", split, "--format", "json", "--no-files",
                  "--workers", "0")
        assert res.code == 0, res.err
        assert json.loads(res.out)["n"] == n and json.loads(res.out)["evaluated"]["split"] == split
    res = cli("evaluate", run / "best.pt", data, "--split", "test", "--no-files", "--workers", "0")
    assert res.code == 2 and "without a test split" in res.err and res.out == ""


def test_evaluate_finds_the_training_folder_from_anywhere(run_on_data, cli, tmp_path):
    data, run = run_on_data
    link = tmp_path / "same"
    link.symlink_to(data)
    res = cli("evaluate", run / "best.pt", "same", "--format", "json", "--no-files", "--workers", "0", cwd=tmp_path)
    assert res.code == 0, res.err
    assert json.loads(res.out)["n"] == 3  # the same folder under another name: still its held-out split


def test_evaluate_elsewhere_counts_and_warns_about_trained_on_images(run_on_data, cli, tmp_path):
    data, run = run_on_data
    trained = load_checkpoint(run / "best.pt")["data"]["splits"]["train"]["paths"]
    other = tmp_path / "other"
    for rel in trained[:4]:  # copies of training images under new names, beside new images
        (other / Path(rel).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(data / rel, other / Path(rel).parent / f"copy_{Path(rel).name}")
    write_color_images(other / "red", (220, 40, 40), 3, size=16, seed=99)
    res = cli("evaluate", run / "best.pt", other, "--format", "json", "--no-files", "--workers", "0")
    assert res.code == 0, res.err
    metrics = json.loads(res.out)
    assert metrics["n"] == 7 and metrics["evaluated"]["seen_in_training"] == 4 and metrics["evaluated"]["split"] is None
    assert "4 of the 7 images were used to train this model" in res.err
    res = cli("evaluate", run / "best.pt", other, "--split", "val", "--no-files", "--workers", "0")
    assert res.code == 2 and "has no val split" in res.err


# --- 4: never train on the run's own outputs ---------------------------------------------------------------------

def test_finetune_refuses_a_run_folder_inside_its_data_folder(cli, tmp_path):
    data = make_class_folder(tmp_path / "photos", per_class=4, size=16)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    res = cli("finetune", ".", *TINY, "--epochs", "1", cwd=data)
    assert res.code == 2 and "inside the data folder" in res.err and "Traceback" not in res.err
    res = cli("finetune", data, *TINY, "--epochs", "1", "--output", data / "red" / "run")
    assert res.code == 2 and "inside the data folder" in res.err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


# --- 5: resume keeps its data, its split and its settings, and says what it ignores ----------------------------------

def test_resume_works_from_another_directory_and_names_ignored_flags(cli, tmp_path):
    make_class_folder(tmp_path / "work" / "data", per_class=6, size=16)
    train(Path("data"), tmp_path / "run", cwd=tmp_path / "work")  # data_dir typed as a relative path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = cli("finetune", "--resume", tmp_path / "run", "--epochs", "2", "--lr", "0.5", "--batch-size", "8",
              cwd=elsewhere)
    assert res.code == 0, res.err
    ignored = next(line for line in res.err.splitlines() if "ignoring" in line)
    assert "--lr" in ignored and "--batch-size" in ignored and "--epochs" not in ignored.split("(")[0]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 2 and last["settings"]["lr"] == 0.002 and last["settings"]["batch_size"] == 4


@pytest.mark.parametrize("change", ["class added", "class renamed"])
def test_resume_refuses_changed_classes_in_one_line(cli, tmp_path, change):
    data = make_class_folder(tmp_path / "data", per_class=6, size=16)
    train(data, tmp_path / "run")
    if change == "class added":
        write_color_images(data / "yellow", (230, 220, 30), 6, size=16)
    else:
        (data / "blue").rename(data / "azure")  # same count, other name: indices would silently swap
    res = cli("finetune", "--resume", tmp_path / "run", "--epochs", "2")
    assert res.code == 1 and "Traceback" not in res.err
    assert "classes" in res.err and ("yellow" in res.err if change == "class added" else "azure" in res.err)
    assert len(res.err.strip().splitlines()) == 1


def test_resume_keeps_the_stored_split_when_images_are_added(cli, tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=6, size=16)
    train(data, tmp_path / "run")
    split = load_checkpoint(tmp_path / "run" / "last.pt")["data"]["splits"]
    for name, color in (("red", (220, 40, 40)), ("green", (40, 200, 60))):
        for p in write_color_images(tmp_path / "new", color, 5, size=16, seed=7):
            p.rename(data / name / f"new_{p.name}")
    res = cli("finetune", "--resume", tmp_path / "run", "--epochs", "2")
    assert res.code == 0, res.err
    assert "10 image(s) added" in res.err and "left out" in res.err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["data"]["splits"] == split
    predicted = sorted(Path(r["path"]).relative_to(data).as_posix() for r in predictions(tmp_path / "run"))
    assert predicted == sorted(split["val"]["paths"])


# --- 6: a last batch of one image ---------------------------------------------------------------------------------

def test_a_last_training_batch_of_one_image_trains_and_says_so_once(cli, tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=6, size=32)  # 15 training images: 2 x 7 + 1
    res = cli("finetune", data, "--weights", "none", "--img-size", "32", "--batch-size", "7", "--epochs", "2",
              "--workers", "0", "--output", tmp_path / "run")
    assert res.code == 0, res.err
    assert res.err.count("a training batch of one image") == 1
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "metrics.json").is_file()


# --- 7: interrupts in the tail of a run, and outside training --------------------------------------------------------

def test_an_interrupt_during_the_final_evaluation_is_resumable(tmp_path, monkeypatch):
    from rescli.train import finish as train_module

    data = make_class_folder(tmp_path / "data", per_class=6, size=16)
    real = train_module.write_evaluation
    calls = []

    def interrupted(**kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_evaluation", interrupted)
    s = TrainSettings(data_dir=str(data), arch="resnet20", weights="none", img_size=16, batch_size=4, workers=0,
                      epochs=1)
    try:
        finetune(settings=s, output=tmp_path / "run", show_progress=False)
    except Interrupted as exc:
        assert exc.exit_code == 130 and f"rescli finetune --resume {tmp_path / 'run'}" in exc.message
    except KeyboardInterrupt:  # escaping, it would also stop pytest itself
        pytest.fail("a Ctrl-C during the final evaluation escaped finetune without a word")
    else:
        pytest.fail("finetune did not report the interrupt")
    assert calls and not (tmp_path / "metrics.json").exists()
    res = run_cli("report", tmp_path / "run")
    assert res.code == 1 and "--resume" in res.err

    monkeypatch.setattr(train_module, "write_evaluation", real)
    res = run_cli("finetune", "--resume", tmp_path / "run")
    assert res.code == 0, res.err
    assert "finishing its evaluation" in res.err
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "report.html").is_file()
    assert load_checkpoint(tmp_path / "run" / "best.pt")["metrics"]["epochs_run"] == 1
    res = run_cli("finetune", "--resume", tmp_path / "run")
    assert res.code == 2 and "already trained 1 epochs" in res.err


def test_sigterm_in_the_tail_raises_like_ctrl_c():
    from rescli.train.interrupts import interrupt_raises as _interrupt_raises

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _interrupt_raises():
            os.kill(os.getpid(), signal.SIGTERM)  # the default handler would end the process here
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_outside_training_says_interrupted(cli, tmp_path, monkeypatch):
    from rescli.data import report as dataset_report

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_report, "describe_dataset", ctrl_c)
    res = cli("dataset", tmp_path)
    assert res.code == 130 and res.err.strip() == "interrupted"


# --- 8 and 15e: one writer per run folder; what a kill left behind is cleared -----------------------------------------

def test_a_run_folder_in_use_is_refused_and_unrelated_folders_are_not_overwritten(cli, tmp_path):
    from rescli.train.run_folder import RunFolderLock

    data = make_class_folder(tmp_path / "data", per_class=6, size=16)
    busy = tmp_path / "busy"
    busy.mkdir()
    with RunFolderLock(busy):  # another rescli process writing there
        res = cli("finetune", data, *TINY, "--epochs", "1", "--output", busy)
    assert res.code == 1 and "being written by another rescli process" in res.err
    assert list(busy.iterdir()) == []

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    res = cli("finetune", data, *TINY, "--epochs", "1", "--output", mine)
    assert res.code == 2 and "not empty" in res.err and "todo.txt" in res.err
    assert [p.name for p in mine.iterdir()] == ["todo.txt"]

    train(data, tmp_path / "run")
    with RunFolderLock(tmp_path / "run"):
        res = cli("finetune", "--resume", tmp_path / "run", "--epochs", "2")
    assert res.code == 1 and "being written by another rescli process" in res.err


def test_a_run_that_fails_before_training_leaves_no_folder_and_the_same_command_then_works(cli, tmp_path,
                                                                                        monkeypatch):
    data = make_class_folder(tmp_path / "data", per_class=6, size=16)
    (data / "red" / "broken.jpg").write_bytes(b"not a picture")  # the scan writes skipped.txt
    not_weights = tmp_path / "weights.pt"
    not_weights.write_text("no checkpoint")  # fails at the start weights, after the scan
    out = tmp_path / "out"
    res = cli("finetune", data, *TINY, "--epochs", "1", "--weights", not_weights, "--output", out)
    assert res.code == 1 and str(not_weights) in res.err
    assert not out.exists()
    res = cli("finetune", data, *TINY, "--epochs", "1", "--output", out)
    assert res.code == 0, res.err
    assert (out / "best.pt").is_file() and "broken.jpg" in (out / "skipped.txt").read_text()

    monkeypatch.chdir(tmp_path)  # the default runs/runN: gone too, so `latest` is never a run without a model
    res = cli("finetune", data, *TINY, "--epochs", "1", "--weights", not_weights)
    assert res.code == 1 and not list((tmp_path / "runs").glob("run*"))

    mine = tmp_path / "empty"
    mine.mkdir()  # a folder the user made stays, emptied of what the run wrote
    res = cli("finetune", data, *TINY, "--epochs", "1", "--weights", not_weights, "--output", mine)
    assert res.code == 1 and mine.is_dir() and list(mine.iterdir()) == []


def test_temp_files_left_by_a_killed_write_are_removed(cli, tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=6, size=16)
    train(data, tmp_path / "run")
    stale = tmp_path / "run" / ".best.pt.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    res = cli("finetune", "--resume", tmp_path / "run", "--epochs", "2")
    assert res.code == 0, res.err
    assert not stale.exists() and not list((tmp_path / "run").glob(".*.tmp"))


# --- 12: user strings are never rich markup ------------------------------------------------------------------------

def test_markup_in_paths_and_class_names_is_shown_as_it_is(cli, tmp_path):
    data = tmp_path / "data"
    for name, color in (("[bold]x", (220, 40, 40)), (":smile:", (40, 200, 60)), ("plain", (40, 60, 220))):
        write_color_images(data / name, color, 6, size=16)
    out = tmp_path / "run[/]m"
    res = cli("finetune", data, *TINY, "--epochs", "1", "--output", out)  # the summary table once crashed here
    assert res.code == 0, res.err
    assert "[bold]x" in res.out and ":smile:" in res.out and "run[/]m" in res.err
    res = cli("finetune", data, *TINY, "--epochs", "1", "--output", tmp_path / "again[/]m", "--format", "json")
    assert json.loads(res.out)["best_checkpoint"] == str(tmp_path / "again[/]m" / "best.pt")
    exp = tmp_path / "exp[v2]"
    shutil.copytree(out, exp)
    res = cli("info", "exp[v2]/best.pt", cwd=tmp_path)
    assert res.code == 0, res.err
    assert "exp[v2]/best.pt" in res.out and "[bold]x" in res.out
    res = cli("evaluate", exp / "best.pt", data, "--split", "all", "--no-files", "--workers", "0")
    assert res.code == 0, res.err
    assert "[bold]x" in res.out and ":smile:" in res.out


# --- 13: I/O failures are one line with a meaningful status -----------------------------------------------------------

def test_a_run_folder_that_cannot_be_made_is_one_line(cli, tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=6, size=16)
    (tmp_path / "afile").write_text("x")
    res = cli("finetune", data, *TINY, "--epochs", "1", "--output", tmp_path / "afile" / "run")
    assert res.code == 1 and "cannot create run folder" in res.err and "Traceback" not in res.err
    work = tmp_path / "work"
    work.mkdir()
    (work / "runs").write_text("not a folder")
    res = cli("finetune", data, *TINY, "--epochs", "1", cwd=work)
    assert res.code == 2 and "runs: exists and is not a folder" in res.err


def test_export_onto_a_full_disk_is_one_line(cli, run_on_data, tmp_path, monkeypatch):
    _, run = run_on_data

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    res = cli("export", run, "--output", tmp_path / "m.ts")
    assert res.code == 1 and "Traceback" not in res.err
    assert res.err.strip() == f"error: {tmp_path / 'm.ts'}: No space left on device"  # the file asked for, not a temp
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "m.ts").exists()


def test_an_output_that_is_not_a_regular_file_is_never_replaced(cli, run_on_data, tmp_path):
    from rescli.core.errors import RescliError
    from rescli.core.fileio import atomic_write_bytes

    fifo = tmp_path / "m.ts"
    os.mkfifo(fifo)
    res = cli("export", run_on_data[1], "--output", fifo)  # as root, /dev/null would have been replaced the same way
    assert res.code == 2 and "exists and is not a regular file" in res.err
    assert fifo.is_fifo()
    with pytest.raises(RescliError, match="not a regular file"):
        atomic_write_bytes(tmp_path, b"x")
    assert tmp_path.is_dir()


def _rescli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rescli", *map(str, args)], capture_output=False, text=True,
                          env=env, timeout=300, **kwargs)


def test_predict_into_a_full_disk_is_one_line(run_on_data):
    data, run = run_on_data
    with open("/dev/full", "w") as full:
        res = _rescli("predict", data, "--model", run / "best.pt", "--format", "jsonl", stdout=full,
                      stderr=subprocess.PIPE)
    assert res.returncode == 1, res.stderr
    assert "cannot write the results to stdout: No space left on device" in res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr


@pytest.mark.parametrize("command", ["predict", "info"])
def test_a_closed_stdout_is_an_error_not_silence(run_on_data, command):
    data, run = run_on_data
    args = ["predict", str(data), "--model", str(run / "best.pt")] if command == "predict" else ["info", str(run)]
    line = " ".join([sys.executable, "-m", "rescli", *args]) + " >&-"
    res = subprocess.run(["bash", "-c", line], stderr=subprocess.PIPE, text=True, timeout=300)
    assert res.returncode == 1 and "stdout is closed" in res.stderr and "Traceback" not in res.stderr
