"""Fast CLI wiring tests: for every command, the keyword arguments its library call receives from typical flags,
how a canned result renders on stdout, and the exit code. No model, no images: milliseconds a test.

A command imports its library function when it runs (importing rescli.cli must not load torch), so the
library is replaced where that import looks it up: sys.modules. The end-to-end tests elsewhere run the
real thing; these pin the wiring between the flags and the library, and the rendering.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from rich.console import Console

from rescli.cli import console
from rescli.core import events


class Call:
    """A stand-in library function: records each call, returns ``result`` (or what ``effect`` returns)."""

    def __init__(self, result: Any = None, effect: Any = None) -> None:
        self.result, self.effect, self.calls = result, effect, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.effect(*args, **kwargs) if self.effect else self.result

    @property
    def kwargs(self) -> dict[str, Any]:
        assert len(self.calls) == 1, self.calls
        return self.calls[0][1]


class Recorded:
    """A stand-in for TrainSettings: keeps the keyword arguments it was made with."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@pytest.fixture
def library(monkeypatch):
    """``library("rescli.x.y", name=fake, ...)``: the module the command imports from, replaced for this test."""
    monkeypatch.setattr("rescli.core.cpus.adapt_to_load", lambda: None)  # no 0.1 s load probe, no thread message

    def install(module_name: str, **names: Any) -> types.ModuleType:
        module = types.ModuleType(module_name)
        module.__dict__.update(names)
        monkeypatch.setitem(sys.modules, module_name, module)
        return module

    return install


@pytest.fixture
def terminal(monkeypatch):
    """stderr as a terminal (where progress shows), 100 columns wide."""
    monkeypatch.setattr(console, "err", Console(stderr=True, force_terminal=True, highlight=False, soft_wrap=True,
                                                width=100))


def plain(text: str) -> str:
    """Terminal output without its escape sequences (colours, erase-line)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


# --- finetune ---------------------------------------------------------------------------------------------------

METRICS = {"best_epoch": 2, "epochs_run": 3, "accuracy": 0.875, "balanced_accuracy": 0.8, "macro_f1": 0.7,
           "temperature": 1.25, "ece": 0.05, "ece_before_temperature": 0.1,
           "per_class": {"cat": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2},
                         "dog": {"precision": 0.5, "recall": 1.0, "f1": 0.667, "support": 1}},
           "labels": ["cat", "dog"], "confusion_matrix": [[1, 1], [0, 1]],
           "most_confused": [{"true": "cat", "predicted": "dog", "count": 1}]}


@pytest.fixture
def training(library):
    """The library finetune and lr-find call; arch_name/check_arch_kwargs stand in for the registry's checks."""
    run = Call({"run_dir": "runs/run7", "metrics": METRICS})
    library("rescli.train.loop", finetune=run)
    library("rescli.train.settings", TrainSettings=Recorded)
    library("rescli.models.registry", arch_name=lambda *, depth, arch: arch or f"resnet{depth or 18}",
            check_arch_kwargs=lambda arch, kwargs: {k: v.upper() for k, v in kwargs.items()})
    return run


def test_finetune_flags_become_the_run_settings(training, tmp_path):
    res = run_cli("finetune", tmp_path / "data", "--depth", "34", "--epochs", "3", "-b", "8", "--lr", "auto",
                  "--seed", "7", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--no-cache-images",
                  "--augment", "light", "--strict", "--compile", "-o", tmp_path / "run")
    assert res.code == 0, res.err
    settings = training.kwargs["settings"]
    assert training.kwargs == {"settings": settings, "output": tmp_path / "run"}
    assert settings.kwargs == {
        "data_dir": str(tmp_path / "data"), "arch": "resnet34", "arch_kwargs": {}, "weights": "imagenet",
        "strategy": "auto", "freeze_epochs": 1, "epochs": 3, "batch_size": 8, "img_size": 224, "lr": "auto",
        "weight_decay": 0.05, "label_smoothing": 0.1, "augment": "light", "patience": None, "balance": False,
        "val_split": 0.2, "seed": 7, "workers": 0, "device": "cpu", "precision": "fp32", "strict": True,
        "compile": True, "mixup": 0.0, "cutmix": 0.0, "cache_features": True, "cache_images": False,
        "sync_bn": False, "multi_label": False, "label_sep": " ", "path_column": None, "label_column": None,
    }
    lines = res.out.splitlines()
    assert lines[0].strip() == "finetune"
    assert "│ best_checkpoint " in res.out and "runs/run7/best.pt" in res.out and "│ 0.8750" in res.out
    assert "per class" in res.out and "confusion matrix (rows: true, columns: predicted)" in res.out
    assert "next: rescli evaluate runs/run7/best.pt DATA_DIR" in res.err


def test_finetune_json_summary_and_shortcut(training, tmp_path):
    res = run_cli("finetune", tmp_path, "--arch", "resnet20", "--shortcut", "b", "--format", "json")
    assert res.code == 0, res.err
    settings = training.kwargs["settings"]
    assert settings.kwargs["arch"] == "resnet20" and settings.kwargs["arch_kwargs"] == {"shortcut": "B"}
    assert settings.kwargs["epochs"] == 5  # the documented default when --epochs is not given
    summary = json.loads(res.out)
    assert summary["best_checkpoint"] == "runs/run7/best.pt" and summary["val_accuracy"] == 0.875
    assert summary["report"] == "runs/run7/report.html"


def test_finetune_resume_names_every_ignored_option_and_argument(training, tmp_path):
    res = run_cli("finetune", tmp_path / "data", "--resume", tmp_path / "run", "--epochs", "9", "--lr", "0.5")
    assert res.code == 0, res.err
    assert training.kwargs == {"resume": tmp_path / "run", "epochs": 9}
    warning = next(line for line in res.err.splitlines() if line.startswith("warning:"))
    assert "ignoring DATA_DIR, --lr (only --epochs changes a resumed run)" in warning, warning


def test_finetune_usage_errors(training):
    res = run_cli("finetune")
    assert res.code == 2 and res.err.strip() == "error: missing DATA_DIR (or pass --resume RUN_DIR)"
    res = run_cli("finetune", "data", "--gpus", "0")
    assert res.code == 2 and res.err.strip() == "error: --gpus/--nproc must be at least 1"
    assert training.calls == []


def test_finetune_gpus_relaunches_under_torchrun_and_exits_with_its_status(library, monkeypatch):
    from rescli.cli.commands import train

    checked, launched = Call(), Call(result=3)
    library("rescli.train.distributed", check_batch_size=checked)
    monkeypatch.setattr(train, "launch", launched)
    res = run_cli("finetune", "data", "--gpus", "2", "-b", "64")
    assert res.code == 3 and res.out == "" and res.err == ""  # the launched processes said why
    assert checked.calls == [((64, 2), {})]
    assert launched.calls == [((2, ["finetune", "data", "-b", "64"]), {})]


# --- lr-find ----------------------------------------------------------------------------------------------------

def test_lr_find_wiring_and_output(training, library, tmp_path):
    result = types.SimpleNamespace(suggestion=0.00123, minimum_lr=0.01, steepest_lr=0.002, lrs=[1e-5] * 40,
                                   extra={"plot": "curve.png"}, as_dict=lambda: {"suggested_lr": 0.00123})
    find = Call(result)
    library("rescli.train.lr_find", find_lr=find)
    res = run_cli("lr-find", tmp_path, "--weights", "none", "--img-size", "32", "--steps", "40", "--start-lr", "1e-5",
                  "-o", tmp_path / "curve.png", "--device", "cpu")
    assert res.code == 0, res.err
    (settings,), kwargs = find.calls[0]
    assert kwargs == {"output": tmp_path / "curve.png", "start_lr": 1e-5, "end_lr": 10.0, "num_steps": 40}
    assert settings.kwargs["weights"] == "none" and settings.kwargs["img_size"] == 32
    assert settings.kwargs["device"] == "cpu" and settings.kwargs["arch"] == "resnet18"
    assert res.out == "0.00123\n"
    assert f"next: rescli finetune {tmp_path} --lr 0.00123" in res.err
    assert json.loads(run_cli("lr-find", tmp_path, "--format", "json").out) == {"suggested_lr": 0.00123}


# --- dataset ----------------------------------------------------------------------------------------------------

REPORT = {
    "root": "photos", "layout": "class folders", "classes": {"cat": 3, "dog": 2},
    "splits": {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 0}}, "images": 5,
    "broken": ["cat/bad.jpg"], "broken_reasons": {"cat/bad.jpg": "truncated"}, "ignored": [], "ignored_reasons": {},
    "empty_classes": [], "sizes": {"width": [10, 20], "height": [10, 30],
                                   "smallest": {"path": "cat/a.png", "width": 10, "height": 10}},
    "imbalance_ratio": 1.5, "duplicates": [{"kind": "leak", "paths": ["cat/a.png", "cat/b.png"],
                                            "classes": ["cat"], "splits": ["train", "val"]}],
    "warnings": ["class 'dog' has no validation image"],
}


def _describe(data_dir, *, progress, **kwargs):
    for done in (1, 2):
        progress(done, 2)
    return REPORT


def test_dataset_wiring_and_tables(library, tmp_path):
    describe = Call(effect=_describe)
    library("rescli.data.report", describe_dataset=describe)
    res = run_cli("dataset", tmp_path, "--val-split", "0.3", "--seed", "4", "--workers", "2")
    assert res.code == 0, res.err
    (data_dir,), kwargs = describe.calls[0]
    assert data_dir == tmp_path and callable(kwargs.pop("progress"))
    assert kwargs.pop("table").default  # a folder: no table options
    assert kwargs == {"val_split": 0.3, "seed": 4, "workers": 2}
    for title in ("photos (class folders)", "summary", "warnings (finetune shows them too)", "broken images",
                  "identical files"):
        assert title in res.out, title
    assert "cat/bad.jpg" in res.out and "truncated" in res.out and "1 (0 label conflict(s)" in res.out
    assert res.err == ""  # no progress chatter when stderr is not a terminal
    assert json.loads(run_cli("dataset", tmp_path, "--format", "json").out) == REPORT


def test_dataset_counts_images_on_the_one_progress_line(library, tmp_path, terminal):
    library("rescli.data.report", describe_dataset=_describe)
    res = run_cli("dataset", tmp_path)
    assert res.code == 0, res.err
    assert "\rchecking images " in res.err and "1/2" in res.err
    assert "checked" not in res.err  # the command's own counter is gone
    assert plain(res.err).endswith("\r")  # the line is erased when the checks end


# --- evaluate, report -------------------------------------------------------------------------------------------

EVAL_METRICS = {"n": 4, "accuracy": 0.75, "macro_f1": 0.5, "loss": None, "top_k_accuracy": {"1": 0.75, "2": 1.0},
                "skipped": [{"error": "cat/x.png: truncated"}], "evaluated": {"note": "held-out split: val",
                                                                             "seen_in_training": 1},
                **{k: METRICS[k] for k in ("per_class", "labels", "confusion_matrix", "most_confused")}}


def test_evaluate_wiring_and_tables(library, tmp_path):
    resolve = Call((tmp_path / "run" / "best.pt", "given"))
    evaluate = Call((EVAL_METRICS, object(), tmp_path / "out"))
    library("rescli.inference.lookup", resolve_model_path=resolve)
    library("rescli.evaluation.folder", evaluate_folder=evaluate)
    res = run_cli("evaluate", tmp_path / "run", tmp_path / "data", "--split", "val", "--no-files", "--raw-scores",
                  "-b", "16", "--device", "cpu", "--compile")
    assert res.code == 0, res.err
    assert resolve.calls == [((tmp_path / "run",), {})]
    assert evaluate.kwargs == {
        "model": tmp_path / "run" / "best.pt", "data_dir": tmp_path / "data", "split": "val", "output": None,
        "raw_scores": True, "write_files": False, "batch_size": 16, "workers": None, "device": "cpu",
        "precision": "auto", "compile": True, "path_column": None, "label_column": None, "label_sep": None,
    }
    assert "4 images" in res.out and "│ accuracy " in res.out and "0.7500" in res.out and "top2_accuracy" in res.out
    assert "loss" not in res.out.split("per class")[0]  # a metric the library left out is not a row
    err = res.err.splitlines()
    assert err[0] == "held-out split: val"
    assert err[1].startswith("warning: 1 of the 5 images were used to train this model")
    assert err[2] == "warning: skipped cat/x.png: truncated"
    assert err[3] == f"wrote metrics.json, predictions.csv, figures and report.html to {tmp_path / 'out'}"
    assert json.loads(run_cli("evaluate", "m.pt", "d", "--format", "json").out)["accuracy"] == 0.75


def test_report_wiring(library, tmp_path):
    write = Call(tmp_path / "r.html")
    library("rescli.evaluation.report", write_html_report=write)
    res = run_cli("report", tmp_path, "-o", tmp_path / "r.html")
    assert (res.code, res.out) == (0, f"{tmp_path / 'r.html'}\n")
    assert write.calls == [((tmp_path,), {"output": tmp_path / "r.html"})]


# --- predict ----------------------------------------------------------------------------------------------------

ROWS = [{"path": "a.png", "label": "cat", "score": 0.9, "topk": [{"label": "cat", "score": 0.9},
                                                                 {"label": "dog", "score": 0.1}]},
        {"path": "b.png", "error": "file not found"}]


@pytest.fixture
def predicting(library, monkeypatch):
    """The library predict calls; predict_batches yields one batch per entry of ``batches``."""
    from rescli.cli.commands import inference

    monkeypatch.setattr(inference, "let_idle_threads_sleep", lambda: None)
    fakes = types.SimpleNamespace(batches=[ROWS], between=None)

    def stream(paths, **kwargs):
        for i, batch in enumerate(fakes.batches):
            if i and fakes.between:
                fakes.between()
            yield batch

    fakes.check, fakes.paths = Call(), Call(iter(["a.png", "b.png"]))
    fakes.predict = Call(effect=stream)
    fakes.load = Call(types.SimpleNamespace(kind="checkpoint", classes=["cat", "dog"], device=None, meta={},
                                            task=types.SimpleNamespace(name="single-label")))
    library("rescli.inference.inputs", check_inputs=fakes.check, iter_input_paths=fakes.paths)
    library("rescli.inference.load", load_predictor=fakes.load)
    library("rescli.inference.lookup", resolve_model_path=Call((Path("m.pt"), "--model")))
    library("rescli.inference.stream", predict_batches=fakes.predict)
    library("rescli.inference.jpeg", jpeg_decode_works=Call(True))
    return fakes


def test_predict_wiring_and_jsonl(predicting):
    res = run_cli("predict", "a.png", "@list.txt", "-m", "m.pt", "-f", "jsonl", "-k", "2", "--threshold", "0.5",
                  "--raw-scores", "-0", "-b", "4", "--workers", "3", "--device", "cpu", "--precision", "fp32")
    assert res.code == 1  # one input failed
    assert predicting.check.calls == [((["a.png", "@list.txt"],), {})]
    assert predicting.paths.calls == [((["a.png", "@list.txt"],), {"null_separated": True})]
    assert predicting.load.calls == [((Path("m.pt"),), {"device": "cpu", "precision": "fp32", "compile": False})]
    kwargs = predicting.predict.kwargs
    assert kwargs.pop("predictor") is predicting.load.result
    assert kwargs == {"batch_size": 4, "workers": 3, "top_k": 2, "raw_scores": True, "threshold": 0.5,
                      "jpeg_device": "auto"}
    assert [json.loads(line) for line in res.out.splitlines()] == [
        {"path": "a.png", "label": "cat", "score": 0.9, "topk": ROWS[0]["topk"]}, ROWS[1]]
    err = res.err.splitlines()
    assert err[0] == "model: m.pt (--model; checkpoint, 2 classes)"
    assert err[1] == "error: b.png: file not found"
    assert err[2].startswith("2 input(s), 1 predicted, 1 failed in ")


@pytest.mark.parametrize("fmt, expected", [
    ("csv", "path,label,score,error\na.png,cat,0.900000,\nb.png,,,file not found\n"),
    ("tsv", "path\tlabel\tscore\terror\na.png\tcat\t0.900000\t\nb.png\t\t\tfile not found\n"),
    ("json", '[\n  {"path": "a.png", "label": "cat", "score": 0.9},\n'
             '  {"path": "b.png", "error": "file not found"}\n]\n'),
    ("table", "label     score  path\ncat      0.9000  a.png\n-             -  b.png  error: file not found\n"),
])
def test_predict_formats(predicting, fmt, expected):
    res = run_cli("predict", "a.png", "b.png", "--format", fmt, "--quiet")
    assert (res.code, res.out) == (1, expected)
    assert res.err == "error: b.png: file not found\n"  # --quiet: errors alone


def test_predict_usage_errors_come_before_any_work(predicting):
    for args, message in ((["-k", "0"], "--top-k must be at least 1"), (["--fields", "path,size"], "unknown field"),
                          (["--threshold", "2"], "between 0 and 1"), (["--jpeg-decoder", "torchvision"], "not for")):
        res = run_cli("predict", "a.png", *args)
        assert res.code == 2 and message in res.err and res.out == "", (args, res.err)
    assert predicting.predict.calls == []


def test_predict_counts_on_the_one_progress_line_and_messages_clear_it(predicting, terminal):
    predicting.batches = [ROWS[:1], ROWS[:1]]
    predicting.between = lambda: events.warn("a library warning, mid-stream")
    res = run_cli("predict", "a.png", "-f", "jsonl")
    assert res.code == 0, res.err
    assert "\r1 images, 0 failed" in res.err
    before = plain(res.err).split("warning: a library warning")[0]
    assert before.endswith("\r"), before  # the progress line was erased first: the warning starts its own line
    res = run_cli("predict", "a.png", "-f", "jsonl", "--no-progress")
    assert "images," not in res.err


# --- degradation ------------------------------------------------------------------------------------------------

def test_degradation_wiring_and_tables(library, tmp_path):
    model = {"name": "plain8", "params": 12345, "final_train_error": 0.5, "final_val_error": 0.25,
             "best_val_error": 0.125, "grad_norms": {"stage1": 0.5, "stage2": 0.25}}
    run = Call({"models": [model], "run_dir": "runs/deg", "figure": "runs/deg/degradation.png"})
    library("rescli.experiments.degradation", STAGES=("stage1", "stage2"), run_degradation=run)
    res = run_cli("degradation", tmp_path, "--depths", "8,14", "--epochs", "2", "--shortcut", "B", "--threads", "1",
                  "--label-smoothing", "0.1", "-o", tmp_path / "deg")
    assert res.code == 0, res.err
    assert run.kwargs == {
        "data_dir": tmp_path, "depths": "8,14", "output": tmp_path / "deg", "epochs": 2, "batch_size": 64,
        "img_size": 32, "shortcut": "B", "lr": 2e-3, "weight_decay": 0.05, "label_smoothing": 0.1, "augment": "none",
        "val_split": 0.2, "seed": 0, "workers": None, "device": "auto", "precision": "auto", "threads": 1,
    }
    assert "final error after 2 epoch(s), %" in res.out and "12,345" in res.out and "12.50" in res.out
    assert "stage2" in res.out and "0.25" in res.out
    assert "wrote runs/deg/degradation.json, runs/deg/degradation.png" in res.err


# --- export, info -----------------------------------------------------------------------------------------------

EXPORTED = {"output": "m.onnx", "format": "onnx", "classes": 2, "img_size": 24, "max_abs_diff_random": 1.5e-6,
            "max_abs_diff_real": 2e-6, "real_images": 8, "parity_ok": True}


def test_export_to_wiring_and_lines(library, tmp_path):
    export = Call(EXPORTED)
    library("rescli.inference.export", export_model=export)
    res = run_cli("export", tmp_path / "run", "--to", "onnx", "-o", tmp_path / "m.onnx", "--check-images", "a",
                  "--check-images", "b")
    assert res.code == 0, res.err
    assert export.kwargs == {"model": tmp_path / "run", "fmt": "onnx", "output": tmp_path / "m.onnx",
                             "check_images": ["a", "b"]}
    assert res.out.splitlines() == ["wrote m.onnx (onnx, 2 classes, 24 px)",
                                    "max |logit difference| vs PyTorch, random images: 1.5e-06",
                                    "max |logit difference| vs PyTorch, 8 real images: 2e-06"]
    assert res.err == ""
    assert json.loads(run_cli("export", "run", "--print", "json").out) == EXPORTED
    assert export.calls[-1][1]["fmt"] == "torchscript"  # the default


def test_export_format_still_works_with_one_deprecation_warning(library, tmp_path):
    export = Call(EXPORTED)
    library("rescli.inference.export", export_model=export)
    for spelling in ("--format", "-f"):
        res = run_cli("export", tmp_path, spelling, "onnx")
        assert res.code == 0, res.err
        assert export.calls[-1][1]["fmt"] == "onnx"
        assert res.err.count("warning:") == 1 and "export --format is now --to (--to onnx)" in res.err
    res = run_cli("export", tmp_path, "--to", "torchscript", "--format", "onnx")
    assert res.code == 2 and "give --to alone" in res.err
    options = re.findall(r"^│ (-[-\w]+)", run_cli("export", "--help").out, flags=re.MULTILINE)
    assert "--to" in options and "--format" not in options  # documented under its new name only


def test_info_wiring_and_table(library, tmp_path):
    describe = Call({"arch": "resnet18", "classes": ["cat", "dog"], "parameters": 11689512, "metrics": {"acc": 0.5},
                     "temperature": None, "settings": {}})
    library("rescli.inference.describe", describe_model=describe)
    res = run_cli("info", tmp_path / "m.pt")
    assert res.code == 0, res.err
    assert describe.calls == [((tmp_path / "m.pt",), {})]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in res.out.splitlines() if "│" in line}
    assert rows == {"arch": "resnet18", "classes": "cat, dog", "parameters": "11,689,512", "metrics": "acc=0.5000"}
    assert json.loads(run_cli("info", "m.pt", "--format", "json").out)["parameters"] == 11689512


# --- library progress on the one display ------------------------------------------------------------------------

def test_library_progress_and_messages_share_the_one_status_line(training, terminal, tmp_path):
    def train(**kwargs):
        with events.counting("epoch 1/2", 4) as advance:
            advance(loss=0.5)
            events.info("a message from the library")
            advance(loss=0.25)
        return {"run_dir": "runs/run7", "metrics": METRICS}

    training.effect = train
    res = run_cli("finetune", tmp_path, "--format", "json")
    assert res.code == 0, res.err
    assert "\repoch 1/2 ━━━━━━━━━━━━━━━━━━━━ 0/4" in plain(res.err)  # drawn at once when the task starts
    assert "1/4, loss 0.5000" in res.err
    before = plain(res.err).split("a message from the library")[0]
    assert before.endswith("\r"), before
    assert json.loads(res.out)["run_dir"] == "runs/run7"  # stdout holds the results alone


def test_predict_rows_on_the_terminal_of_the_progress_line_each_start_a_line(monkeypatch):
    """stdout and stderr on one terminal (predict's table, watched): a row never continues the progress line."""
    import io

    from rescli.cli.predict_output import JsonLinesWriter, write_predictions

    screen = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=screen, force_terminal=True, width=100))
    batches = [[{"path": f"{i}.png", "label": "cat", "score": 0.5}] for i in range(3)]
    with events.subscribed(console.EventRenderer()):
        done = write_predictions(iter(batches), JsonLinesWriter(screen, ["path"]), quiet=True, progress=True)
    assert done == (3, 0)
    shown = plain(screen.getvalue())
    assert "\r1 images, 0 failed" in shown
    assert all(shown[shown.index(f'{{"path": "{i}.png"}}') - 1] in "\r\n" for i in range(3)), repr(shown)
