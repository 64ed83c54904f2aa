"""The vertical slice through the real CLI: finetune -> evaluate -> predict -> export, both layouts, errors."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_class_folder, make_split_folder

FAST = ["--weights", "none", "--img-size", "24", "--batch-size", "8", "--workers", "0", "--augment", "none"]


def test_finetune_writes_a_complete_run_folder(trained_run):
    history = list(csv.DictReader(open(trained_run / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"} <= set(history[0])
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix", "labels"} <= set(metrics)
    assert metrics["labels"] == ["blue", "green", "red"]
    # The saved best accuracy is the best epoch's validation accuracy.
    assert metrics["accuracy"] == pytest.approx(max(float(r["val_accuracy"]) for r in history))


def test_checkpoint_is_self_describing_and_weights_only(trained_run):
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    assert ckpt["format"] == "rescli-checkpoint"
    assert ckpt["arch"] == "resnet18" and ckpt["classes"] == ["blue", "green", "red"] and ckpt["img_size"] == 24
    assert len(ckpt["mean"]) == 3 and len(ckpt["std"]) == 3
    assert ckpt["settings"]["epochs"] == 2 and ckpt["settings"]["weights"] == "none"
    assert set(ckpt["versions"]) >= {"rescli", "torch", "torchvision", "python"}
    assert "accuracy" in ckpt["metrics"]
    last = torch.load(trained_run / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and "optimizer" in last


def test_checkpoint_round_trip_gives_identical_logits(trained_run):
    from rescli.models.checkpoint import (
        load_checkpoint,
        make_checkpoint,
        model_from_checkpoint,
        save_checkpoint,
    )

    ckpt = load_checkpoint(trained_run / "best.pt")
    model = model_from_checkpoint(ckpt)
    copy = trained_run.parent / "copy.pt"
    save_checkpoint(make_checkpoint(model_state=model.state_dict(), arch=ckpt["arch"], classes=ckpt["classes"],
                                    img_size=ckpt["img_size"], mean=ckpt["mean"], std=ckpt["std"]), copy)
    again = model_from_checkpoint(load_checkpoint(copy))
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_runs_are_numbered_and_never_overwritten(tmp_path, class_folder, cli):
    for expected in ("run1", "run2"):
        res = cli("finetune", class_folder, *FAST, "--epochs", "1", cwd=tmp_path)
        assert res.code == 0, res.err
        assert (tmp_path / "runs" / expected / "best.pt").exists()
    res = cli("finetune", class_folder, *FAST, "--epochs", "1", "--output", tmp_path / "runs" / "run1", cwd=tmp_path)
    assert res.code == 2 and "--resume" in res.err


def test_split_is_stratified_seeded_and_copies_nothing(tmp_path):
    from rescli.data.scan import scan_dataset

    data = make_class_folder(tmp_path / "d", per_class=10)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    a = scan_dataset(data, val_split=0.2, seed=3)
    b = scan_dataset(data, val_split=0.2, seed=3)
    c = scan_dataset(data, val_split=0.2, seed=4)
    assert a.splits == b.splits and a.splits["val"] != c.splits["val"]
    assert a.counts("val") == {"blue": 2, "green": 2, "red": 2}
    assert not set(a.splits["train"]) & set(a.splits["val"])
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_split_folder_layout(tmp_path, val_name):
    from rescli.data.scan import scan_dataset

    root = make_split_folder(tmp_path / "s", val_name=val_name)
    index = scan_dataset(root)
    assert index.layout == "split-folders"
    assert len(index.splits["train"]) == 30 and len(index.splits["val"]) == 12 and len(index.splits["test"]) == 12
    assert all(f"/{val_name}/" in p for p, _ in index.splits["val"])


def test_evaluate_json_agrees_with_predict_jsonl(trained_run, class_folder, cli):
    model = trained_run / "best.pt"
    ev = cli("evaluate", model, class_folder, "--format", "json", "--workers", "0")
    assert ev.code == 0, ev.err
    metrics = json.loads(ev.out)
    pr = cli("predict", class_folder, "--model", model, "--format", "jsonl", "--workers", "1")
    assert pr.code == 0, pr.err
    rows = [json.loads(line) for line in pr.out.splitlines()]
    assert len(rows) == metrics["n"] == 36
    correct = sum(r["label"] == Path(r["path"]).parent.name for r in rows)
    assert correct / len(rows) == metrics["accuracy"]
    assert sum(map(sum, metrics["confusion_matrix"])) == 36
    assert set(rows[0]) == {"path", "label", "score"}


def test_evaluate_split_root_uses_test_split(trained_run, tmp_path, cli):
    root = make_split_folder(tmp_path / "s")
    res = cli("evaluate", trained_run / "best.pt", root, "--format", "json", "--workers", "0")
    assert res.code == 0, res.err
    assert json.loads(res.out)["n"] == 12  # the test/ folder, not train/
    res = cli("evaluate", trained_run / "best.pt", root, "--split", "val", "--format", "table", "--workers", "0")
    assert res.code == 0 and "per class" in res.out


def test_evaluate_unknown_class_folder_is_named(trained_run, tmp_path, cli):
    data = make_class_folder(tmp_path / "d", per_class=2)
    make_class_folder(tmp_path / "extra", per_class=2, classes=("red",))
    (tmp_path / "extra" / "red").rename(data / "purple")
    res = cli("evaluate", trained_run / "best.pt", data)
    assert res.code == 1 and "purple" in res.err and res.out == ""


def test_predict_topk_csv_and_table(trained_run, class_folder, cli):
    img = next((class_folder / "red").iterdir())
    res = cli("predict", img, "--model", trained_run / "best.pt", "--top-k", "2", "--format", "jsonl")
    row = json.loads(res.out)
    assert len(row["topk"]) == 2 and row["topk"][0]["label"] == row["label"]
    assert 0 <= row["score"] <= 1 and row["topk"][0]["score"] >= row["topk"][1]["score"]
    res = cli("predict", img, "--model", trained_run / "best.pt", "--format", "csv")
    lines = res.out.splitlines()
    assert lines[0] == "path,label,score,error" and lines[1].startswith(str(img))
    res = cli("predict", img, "--model", trained_run / "best.pt")
    assert res.code == 0 and img.name in res.out


def test_predict_reads_paths_from_stdin(trained_run, class_folder, cli):
    paths = sorted(str(p) for p in (class_folder / "green").iterdir())[:3]
    res = cli("predict", "-", "--model", trained_run / "best.pt", "--format", "jsonl", stdin="\n".join(paths) + "\n")
    assert [json.loads(line)["path"] for line in res.out.splitlines()] == paths


def test_predict_default_model_lookup(trained_run, class_folder, tmp_path, cli, monkeypatch):
    img = next((class_folder / "red").iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("predict", img, cwd=empty)
    assert res.code == 2 and "--model" in res.err
    # Newest runs/*/best.pt under the current directory.
    for name in ("run1", "run2"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "best.pt").write_bytes((trained_run / "best.pt").read_bytes())
    os.utime(tmp_path / "runs" / "run1" / "best.pt", (1, 1))
    res = cli("predict", img, "--format", "jsonl", cwd=tmp_path)
    assert res.code == 0 and "runs/run2/best.pt" in res.err
    monkeypatch.setenv("RESCLI_MODEL", str(trained_run / "best.pt"))
    res = cli("predict", img, "--format", "jsonl", cwd=empty)
    assert res.code == 0 and "RESCLI_MODEL" in res.err


def test_predict_failed_input_exit_status(trained_run, class_folder, cli):
    img = next((class_folder / "red").iterdir())
    res = cli("predict", img, "/no/such/image.jpg", "--model", trained_run / "best.pt", "--format", "jsonl")
    assert res.code == 1
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert "label" in rows[0] and rows[1] == {"path": "/no/such/image.jpg", "error": rows[1]["error"]}
    assert "/no/such/image.jpg" in res.err


def test_torchscript_export_matches_checkpoint(trained_run, tmp_path, cli):
    out = tmp_path / "m.ts"
    res = cli("export", trained_run / "best.pt", "--format", "torchscript", "--output", out)
    assert res.code == 0, res.err
    from rescli.models.checkpoint import load_checkpoint, model_from_checkpoint

    scripted = torch.jit.load(str(out))  # plain torch, no rescli
    model = model_from_checkpoint(load_checkpoint(trained_run / "best.pt"))
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["finetune", "/no/such/folder", "--weights", "none"], 2, "no such folder"),
        (["finetune", "DATA", "--depth", "19", "--weights", "none"], 2, "--depth 19"),
        (["finetune", "DATA", "--weights", "/no/such.pth"], 2, "/no/such.pth"),
        (["finetune", "DATA", "--weights", "none", "--device", "cuda:7"], 2, "--device"),
        (["finetune", "DATA", "--weights", "none", "--precision", "fp8"], 2, "--precision"),
        (["finetune", "DATA", "--weights", "none", "--val-split", "1.5"], 2, "--val-split"),
        (["finetune"], 2, "DATA_DIR"),
        (["predict", "x.jpg", "--model", "/no/such.pt"], 1, "/no/such.pt"),
        (["export", "/no/such.pt"], 1, "/no/such.pt"),
        (["evaluate", "/no/such.pt", "DATA"], 1, "/no/such.pt"),
        (["finetune", "DATA", "--bogus"], 2, "--bogus"),
    ],
)
def test_documented_errors(args, code, needle, class_folder, tmp_path, cli):
    args = [str(class_folder) if a == "DATA" else a for a in args]
    res = cli(*args, cwd=tmp_path)
    assert res.code == code, (res.out, res.err)
    assert needle in res.err
    assert "Traceback" not in res.err and res.out == ""


def test_one_class_is_an_error_that_says_what_was_found(tmp_path, cli):
    data = make_class_folder(tmp_path / "d", classes=("red",), per_class=3)
    res = cli("finetune", data, *FAST, cwd=tmp_path)
    assert res.code == 1 and "at least two" in res.err and "red (3)" in res.err


@pytest.mark.parametrize("content", [b"", b"garbage that is not a checkpoint", None])
def test_corrupt_or_foreign_checkpoint(tmp_path, trained_run, cli, content):
    bad = tmp_path / "bad.pt"
    if content is None:  # a real torch file that is not a rescli checkpoint
        torch.save({"weight": torch.zeros(2)}, bad)
    else:
        bad.write_bytes(content)
    res = cli("predict", trained_run / "best.pt", "--model", bad)
    assert res.code == 1 and str(bad) in res.err and "Traceback" not in res.err
    half = tmp_path / "half.pt"  # a truncated copy of a real checkpoint
    half.write_bytes((trained_run / "best.pt").read_bytes()[:5000])
    res = cli("info", half)
    assert res.code == 1 and "half.pt" in res.err


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "rescli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("rescli ")
