"""Messy real folders through the real CLI: never crash, never lose an image silently, never touch the user's data.

The folders are built here (tests/hostile.py): crops of the two real photos scikit-learn ships, salted with broken
files, odd-but-valid images, clutter and notes. Training is kept tiny (resnet18, 16 px, one thread, 1-2 epochs).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folder, run_cli
from hostile import make_hostile_class_folder, make_messy_photo_folder, snapshot
from PIL import Image

from rescli.train import loop as loop_module

FAST = ["--weights", "none", "--img-size", "16", "--batch-size", "16", "--workers", "0", "--augment", "none",
        "--precision", "fp32"]
CLUTTER_MARKS = (".DS_Store", "Thumbs.db", "._IMG", "__MACOSX")




# --- the whole flow, as a new user would run it ------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """finetune, dataset --format json and predict (jsonl, csv) over one messy folder of real photos, run once."""
    root = tmp_path_factory.mktemp("photos")
    data = root / "my photos"  # a space in the path, as real folders have
    expect = make_messy_photo_folder(data)
    before = snapshot(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse fixtures do not apply here
            mp.setenv("RESCLI_CACHE_DIR", str(root / "cache"))
            mp.setenv("TORCH_HOME", str(root / "torch"))
            train = run_cli("finetune", data, *FAST, "--epochs", "1", "--output", root / "run", cwd=root)
            report = run_cli("dataset", data, "--format", "json", cwd=root)
            model = root / "run" / "best.pt"
            jsonl = run_cli("predict", data, "--model", model, "--format", "jsonl", "--workers", "1", cwd=root)
            table = run_cli("dataset", data, cwd=root)
            csv_res = run_cli("predict", data, "--model", model, "--format", "csv", "--workers", "1", cwd=root)
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "expect": expect, "before": before, "after": snapshot(data), "run": root / "run",
            "cache": root / "cache", "train": train, "report": report, "jsonl": jsonl, "table": table, "csv": csv_res}


def good_files(expect) -> list[str]:
    return sorted(rel for rels in expect["good"].values() for rel in rels)


def test_finetune_exits_0_and_uses_every_valid_image(photos):
    train, expect = photos["train"], photos["expect"]
    assert train.code == 0, train.err
    run = json.loads((photos["run"] / "run.json").read_text())
    assert run["classes"] == expect["classes"] == ["flower", "sky", "temple"]
    used = {c: run["counts"]["train"][c] + run["counts"]["val"][c] for c in run["classes"]}
    assert used == {c: len(rels) for c, rels in expect["good"].items()}
    assert run["settings"]["train_images"] + run["settings"]["val_images"] == len(good_files(expect))
    assert "skipped during" not in train.err  # every file that passed the check also loaded in training


def test_finetune_names_each_broken_file_exactly_once(photos):
    err, expect = photos["train"].err, photos["expect"]
    for rel in expect["broken"]:  # the zero-byte .jpg, the web page saved as .JPG, garbage .webp ... included
        assert err.count(rel) == 1, (rel, err)
    for rel in good_files(expect):
        assert rel not in err, rel
    assert not any(mark in err for mark in CLUTTER_MARKS)  # clutter is silent
    assert "drafts" in err and "empty" in err  # folders without images: "not a class", said once
    lines = (photos["run"] / "skipped.txt").read_text().splitlines()
    rows = [line.split("\t") for line in lines]
    assert sorted(r[1] for r in rows if r[0] == "broken") == expect["broken"]
    assert sorted(r[1] for r in rows if r[0] == "ignored") == expect["ignored"]
    assert {r[1]: r[2] for r in rows if r[0] == "ignored"}["temple/.hidden_edit.jpg"] == "hidden file"
    assert sorted(r[1] for r in rows if r[0] == "empty") == expect["empty_classes"]
    assert not any(mark in line for line in lines for mark in CLUTTER_MARKS)
    assert not any(rel in photos["train"].out for rel in expect["broken"])  # stdout: results only


def test_nothing_is_written_into_the_data_folder(photos):
    # finetune, dataset (twice) and predict (twice) have all run: every path and every byte is as it was.
    assert photos["after"] == photos["before"]
    assert len(photos["before"]) > 40
    assert list((photos["cache"] / "checks").glob("*.json"))  # the check cache lives in the user's cache dir


def test_dataset_json_reports_what_finetune_used(photos):
    rep, expect = photos["report"], photos["expect"]
    assert rep.code == 0, rep.err
    assert rep.err == ""  # no progress chatter when stderr is not a terminal
    report = json.loads(rep.out)
    run = json.loads((photos["run"] / "run.json").read_text())
    skipped = [line.split("\t") for line in (photos["run"] / "skipped.txt").read_text().splitlines()]
    assert report["classes"] == {c: len(rels) for c, rels in expect["good"].items()}
    assert report["splits"] == run["counts"]  # the same seeded split finetune made
    assert report["broken"] == sorted(r[1] for r in skipped if r[0] == "broken") == expect["broken"]
    assert report["ignored"] == sorted(r[1] for r in skipped if r[0] == "ignored") == expect["ignored"]
    assert report["empty_classes"] == expect["empty_classes"]
    assert report["images"] == len(good_files(expect))
    assert report["broken_reasons"]["temple/IMG_0100.jpg"] == "empty file (0 bytes)"
    assert "truncated" in report["broken_reasons"]["flower/download.jpg"]
    conflicts = [g for g in report["duplicates"] if g["label_conflict"]]
    assert [g["paths"] for g in conflicts] == expect["duplicates"]
    assert conflicts[0]["classes"] == ["sky", "temple"]
    counts = report["classes"].values()
    assert report["imbalance_ratio"] == pytest.approx(max(counts) / min(counts), abs=1e-3)
    w, h = report["sizes"]["width"], report["sizes"]["height"]
    assert 40 <= w[0] <= w[1] <= 64 and 24 <= h[0] <= h[1] <= 64


def test_dataset_table_is_for_people(photos):
    table = photos["table"]
    assert table.code == 0 and table.err == ""
    for word in ("flower", "sky", "temple", "train", "val", "temple/IMG_0100.jpg", "empty file", "flower/notes.txt",
                 "label-conflict", "imbalance"):
        assert word in table.out, word


def test_predict_jsonl_errors_for_broken_labels_for_valid(photos):
    res, expect, data = photos["jsonl"], photos["expect"], photos["data"]
    assert res.code == 1  # some inputs failed
    rows = [json.loads(line) for line in res.out.splitlines()]
    rel = lambda row: Path(row["path"]).relative_to(data).as_posix()  # noqa: E731
    errors = {rel(r): r["error"] for r in rows if "error" in r}
    labelled = {rel(r): r["label"] for r in rows if "label" in r}
    assert sorted(errors) == expect["broken"]
    assert all(set(r) == {"path", "error"} for r in rows if "error" in r)
    assert sorted(labelled) == good_files(expect)
    assert set(labelled.values()) <= set(expect["classes"])
    assert "empty file" in errors["temple/IMG_0100.jpg"]


def test_predict_csv_has_an_error_column(photos):
    res, expect, data = photos["csv"], photos["expect"], photos["data"]
    assert res.code == 1
    rows = list(csv.DictReader(io.StringIO(res.out)))
    assert "error" in rows[0]
    by_rel = {Path(r["path"]).relative_to(data).as_posix(): r for r in rows}
    assert sorted(by_rel) == sorted(good_files(expect) + expect["broken"])
    for rel in expect["broken"]:
        assert by_rel[rel]["error"] and not by_rel[rel]["label"], rel
    for rel in good_files(expect):
        assert by_rel[rel]["label"] in expect["classes"] and not by_rel[rel]["error"], rel


def test_predict_named_broken_and_missing_inputs(photos, cli, tmp_path):
    data = photos["data"]
    inputs = [data / "sky/IMG_0000.JPG", data / "temple/IMG_0100.jpg", tmp_path / "gone.jpg", data / "sky/bad.tif"]
    res = cli("predict", *inputs, "--model", photos["run"] / "best.pt", "--format", "jsonl")
    assert res.code == 1
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in inputs]  # input order, one row each
    assert "label" in rows[0] and all("error" in r for r in rows[1:])


# --- scanning: what is an image, what is ignored, what is silent -------------------------------------------------


@pytest.fixture
def hostile(tmp_path):
    root = tmp_path / "data"
    return root, make_hostile_class_folder(root)


def test_scan_reports_misnamed_garbage_as_broken_not_ignored(hostile):
    from rescli.data.scan import scan_dataset

    root, expect = hostile
    index = scan_dataset(root)
    assert sorted(index.broken) == expect["broken"]  # zero.jpg, garbage.png and text.jpg included
    assert index.ignored == expect["ignored"]
    assert sorted(set(index.empty_classes)) == expect["empty_classes"]
    used = sorted(index.rel(p) for split in index.splits.values() for p, _ in split)
    assert used == sorted(rel for rels in expect["good"].values() for rel in rels)


def test_any_case_of_image_extension_and_hidden_files(tmp_path):
    from rescli.data.scan import scan_dataset

    make_class_folder(tmp_path / "d", per_class=3, classes=("red", "green"))
    red = tmp_path / "d" / "red"
    for name in ("A.JPG", "b.JpEg", "c.Png", "d.GIF", "e.BMP", "f.WEBP", "g.TIF", "h.TIFF"):
        (red / name).write_bytes(b"")  # each meant to be an image: broken, whatever the case of its extension
    (red / "IMG_1.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")  # an iPhone photo
    (red / ".secret.png").write_bytes((red / "img_000.png").read_bytes())
    (red / ".cache").mkdir()
    (red / ".cache" / "x.png").write_bytes(b"")
    (red / ".ipynb_checkpoints").mkdir()  # clutter folder: silent
    (red / ".ipynb_checkpoints" / "y.png").write_bytes(b"")
    index = scan_dataset(tmp_path / "d")
    assert sorted(index.broken) == sorted(f"red/{n}" for n in ("A.JPG", "b.JpEg", "c.Png", "d.GIF", "e.BMP", "f.WEBP",
                                                               "g.TIF", "h.TIFF", "IMG_1.HEIC"))
    assert "HEIC/HEIF images are not supported; convert it to JPEG or PNG" in index.broken["red/IMG_1.HEIC"]
    assert index.ignored == ["red/.cache", "red/.secret.png"]
    assert index.ignored_reasons == {"red/.cache": "hidden folder", "red/.secret.png": "hidden file"}


def test_split_layout_names_what_is_outside_the_splits(tmp_path):
    from rescli.data.scan import scan_dataset

    root = tmp_path / "s"
    make_class_folder(root / "train", per_class=3, classes=("red", "green"))
    make_class_folder(root / "valid", per_class=2, classes=("red", "green"), seed=5)
    make_class_folder(root / "extra", per_class=1, classes=("red",))
    (root / "README.md").write_text("x")
    (root / "train" / "loose.png").write_bytes((root / "train/red/img_000.png").read_bytes())
    (root / "Thumbs.db").write_bytes(b"x")
    index = scan_dataset(root)
    assert index.ignored == ["README.md", "extra", "train/loose.png"]
    assert index.ignored_reasons == {"README.md": "outside train/val/test", "extra": "outside train/val/test",
                                     "train/loose.png": "not inside a class folder"}


def test_a_class_of_only_broken_files_is_not_a_class(tmp_path):
    from rescli.data.scan import scan_dataset

    make_class_folder(tmp_path / "d", per_class=3, classes=("red", "green", "blue"))
    for p in (tmp_path / "d" / "blue").iterdir():
        p.write_bytes(b"")
    index = scan_dataset(tmp_path / "d")
    assert index.classes == ["green", "red"] and index.empty_classes == ["blue"] and len(index.broken) == 3


def test_fewer_than_two_classes_says_what_was_found(tmp_path, cli):
    make_class_folder(tmp_path / "d", per_class=3, classes=("red",))
    (tmp_path / "d" / "green").mkdir()
    (tmp_path / "d" / "blue").mkdir()
    (tmp_path / "d" / "blue" / "x.jpg").write_bytes(b"")
    for args in (["finetune", tmp_path / "d", *FAST, "--output", tmp_path / "run"], ["dataset", tmp_path / "d"]):
        res = cli(*args)
        assert res.code == 1, res.err
        assert "need at least two class folders" in res.err and "red (3)" in res.err and "green" in res.err
        assert res.out == ""


def test_symlink_loop_does_not_hang(tmp_path):
    from rescli.data.scan import scan_dataset

    make_class_folder(tmp_path / "d", per_class=2, classes=("red", "green"))
    try:
        (tmp_path / "d" / "red" / "loop").symlink_to(tmp_path / "d" / "red", target_is_directory=True)
    except OSError:
        pytest.skip("no symlinks here")
    index = scan_dataset(tmp_path / "d", val_split=0.0)
    assert index.counts("train") == {"green": 2, "red": 2}


# --- dataset: duplicates, leakage ---------------------------------------------------------------------------------


def test_dataset_finds_leaks_across_splits_and_conflicts_across_classes(tmp_path, cli):
    root = tmp_path / "s"
    make_class_folder(root / "train", per_class=3, classes=("red", "green"))
    make_class_folder(root / "val", per_class=2, classes=("red", "green"), seed=7)
    shutil.copy(root / "train/red/img_000.png", root / "val/red/leaked.png")  # leak: same picture, two splits
    shutil.copy(root / "train/red/img_001.png", root / "train/green/mislabelled.png")  # label conflict
    shutil.copy(root / "train/green/img_002.png", root / "train/green/copy.png")  # a plain copy
    before = snapshot(root)
    res = cli("dataset", root, "--format", "json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    kinds = {g["kind"]: g for g in report["duplicates"]}
    assert kinds["label-conflict"]["paths"] == ["train/green/mislabelled.png", "train/red/img_001.png"]
    assert kinds["leak"]["paths"] == ["train/red/img_000.png", "val/red/leaked.png"]
    assert kinds["leak"]["splits"] == ["train", "val"] and not kinds["leak"]["label_conflict"]
    assert kinds["copy"]["paths"] == ["train/green/copy.png", "train/green/img_002.png"]
    assert [g["kind"] for g in report["duplicates"]] == ["label-conflict", "leak", "copy"]  # worst first
    assert report["layout"] == "split-folders" and "val_split" not in report
    assert report["splits"] == {"train": {"green": 5, "red": 3}, "val": {"green": 2, "red": 3}}
    assert report["classes"] == {"green": 7, "red": 6}
    assert report["imbalance_ratio"] == pytest.approx(7 / 6, abs=1e-3)
    assert snapshot(root) == before


def test_dataset_help_has_examples(cli):
    res = cli("dataset", "--help")
    assert res.code == 0 and "Examples" in res.out and "rescli dataset ./images --format json" in res.out


# --- --strict -----------------------------------------------------------------------------------------------------


def test_strict_stops_before_training_and_names_the_files(hostile, cli, tmp_path):
    root, expect = hostile
    res = cli("finetune", root, *FAST, "--epochs", "1", "--strict", "--output", tmp_path / "run")
    assert res.code == 1 and res.out == ""
    assert f"--strict: {len(expect['broken'])} broken image(s)" in res.err
    assert sum(rel in res.err for rel in expect["broken"]) == 5  # the first five by name, then a count
    assert "drop --strict" in res.err
    assert not list((tmp_path / "run").glob("*.pt"))


# --- during training ----------------------------------------------------------------------------------------------


def test_file_that_vanishes_or_breaks_during_training_is_skipped_with_a_warning(tmp_path, cli, monkeypatch):
    from rescli.data.scan import scan_dataset

    root = make_class_folder(tmp_path / "d", per_class=5, size=16, classes=("red", "green"))
    real_scan = scan_dataset
    hit = {}

    def scan_then_damage(*args, **kwargs):
        index = real_scan(*args, **kwargs)  # every file checked and fine; now the folder changes under us
        hit["gone"], hit["cut"] = index.splits["train"][0][0], index.splits["train"][1][0]
        hit["val"] = index.splits["val"][0][0]
        Path(hit["gone"]).unlink()
        Path(hit["cut"]).write_bytes(Path(hit["cut"]).read_bytes()[:40])
        Path(hit["val"]).unlink()
        return index

    monkeypatch.setattr(loop_module, "scan_dataset", scan_then_damage)
    res = cli("finetune", root, *FAST, "--epochs", "2", "--output", tmp_path / "run")
    assert res.code == 0, res.err
    for key in ("gone", "cut"):
        assert res.err.count(f"skipped during training: {hit[key]}") == 1, res.err  # two epochs, named once
    assert res.err.count(f"skipped during validation: {hit['val']}") == 1, res.err
    assert "file not found" in res.err
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 3  # header + both epochs ran
    assert (tmp_path / "run" / "best.pt").is_file()


# --- --balance ----------------------------------------------------------------------------------------------------


def _gray_images(folder: Path, level: int, n: int, seed: int) -> None:
    """Noisy grey squares: two levels 25 apart overlap enough that a plain loss can ignore the rarer one."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.clip(level + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(folder / f"{i:03d}.png")


def test_balance_weights_the_loss_and_lifts_minority_recall(tmp_path, cli, monkeypatch):
    root = tmp_path / "imbalanced"
    _gray_images(root / "train" / "common", 110, 28, seed=1)
    _gray_images(root / "train" / "rare", 135, 3, seed=2)
    _gray_images(root / "val" / "common", 110, 10, seed=3)
    _gray_images(root / "val" / "rare", 135, 10, seed=4)

    seen = []
    real = torch.nn.CrossEntropyLoss

    class Spy(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(None if self.weight is None else self.weight.tolist())

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", Spy)
    recall, weights = {}, {}
    for flag in ([], ["--balance"]):
        seen.clear()
        out = tmp_path / ("balanced" if flag else "plain")
        res = cli("finetune", root, *FAST, "--epochs", "2", "--seed", "0", "--label-smoothing", "0", *flag,
                  "--output", out)
        assert res.code == 0, res.err
        per_class = json.loads((out / "metrics.json").read_text())["per_class"]
        recall[bool(flag)] = per_class["rare"]["recall"]
        weights[bool(flag)] = seen[0]  # the training criterion is the first one a run makes
    # Inverse class frequency, normalised so a balanced folder would get 1.0 everywhere: 31/(2*28), 31/(2*3).
    assert weights[False] is None
    assert weights[True] == pytest.approx([31 / 56, 31 / 6], rel=1e-5)
    # With 28:3 the plain loss mostly calls everything "common"; the weighted one finds the rare class.
    # (Measured over seeds 0-4: plain 0.0/0.7/0.1/0.0/0.9, balanced 0.9/1.0/1.0/1.0/1.0.)
    assert recall[True] > recall[False], recall
