"""CLI wiring of label tables and multi-label (issue #15), in test_cli_wiring's style: the table options each
command passes to its library call, a multi-label model's rows in every --format, and the multi-label summaries."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from conftest import run_cli
from test_cli_wiring import Call, Recorded, library  # noqa: F401 (library: the fixture)

from rescli.data.tables import TableOptions

ML_METRICS = {
    "task": "multi-label", "best_epoch": 3, "epochs_run": 4, "n": 8, "mean_average_precision": 0.91,
    "micro_f1": 0.875, "macro_f1": 0.86, "subset_accuracy": 0.625, "hamming_loss": 0.0625, "temperature": 0.9,
    "ece": 0.04, "ece_before_temperature": 0.06, "labels": ["cat", "dog"],
    "per_class": {"cat": {"precision": 1.0, "recall": 0.75, "f1": 0.857, "average_precision": 0.95, "support": 4,
                          "threshold": 0.41},
                  "dog": {"precision": 0.8, "recall": 1.0, "f1": 0.889, "average_precision": None, "support": 4,
                          "threshold": 0.5}},
    "confusion_counts": {"cat": {"tp": 3, "fp": 0, "fn": 1, "tn": 4}, "dog": {"tp": 4, "fp": 1, "fn": 0, "tn": 3}},
}


def test_finetune_and_lr_find_pass_the_table_options_into_the_settings(library, tmp_path):  # noqa: F811
    run = Call({"run_dir": "runs/run8", "metrics": ML_METRICS})
    library("rescli.train.loop", finetune=run)
    library("rescli.train.settings", TrainSettings=Recorded)
    library("rescli.models.registry", arch_name=lambda *, depth, arch: "resnet18", check_arch_kwargs=lambda a, k: k)
    res = run_cli("finetune", tmp_path / "labels.csv", "--multi-label", "--label-sep", ";", "--path-column", "id",
                  "--label-column", "tags", "--balance")
    assert res.code == 0, res.err
    settings = run.kwargs["settings"].kwargs
    assert {k: settings[k] for k in ("data_dir", "multi_label", "label_sep", "path_column", "label_column",
                                     "balance")} == {
        "data_dir": str(tmp_path / "labels.csv"), "multi_label": True, "label_sep": ";", "path_column": "id",
        "label_column": "tags", "balance": True}
    for row in ("val_map", "0.9100", "val_micro_f1", "val_subset_accuracy", "val_hamming_loss", "multi-label"):
        assert row in res.out, row
    assert "val_accuracy" not in res.out
    assert "per label" in res.out and "confusion counts per label" in res.out and "0.410" in res.out
    summary = json.loads(run_cli("finetune", tmp_path / "labels.csv", "--multi-label", "--format", "json").out)
    assert summary["task"] == "multi-label" and summary["val_micro_f1"] == 0.875

    result = types.SimpleNamespace(suggestion=0.001, minimum_lr=0.01, steepest_lr=0.002, lrs=[1e-5] * 9,
                                   extra={"plot": "lr.png"}, as_dict=lambda: {"suggested_lr": 0.001})
    find = Call(result)
    library("rescli.train.lr_find", find_lr=find)
    res = run_cli("lr-find", tmp_path / "labels.csv", "--multi-label", "--label-column", "tags")
    assert res.code == 0, res.err
    (found,), _ = find.calls[0]
    assert (found.kwargs["multi_label"], found.kwargs["label_column"], found.kwargs["label_sep"]) == (True, "tags", " ")


def test_dataset_passes_the_table_options_and_titles_a_table(library, tmp_path):  # noqa: F811
    report = {"root": str(tmp_path), "layout": "table", "task": "multi-label", "table": str(tmp_path / "t.csv"),
              "classes": {"cat": 3, "dog": 2}, "splits": {"train": {"cat": 2, "dog": 1}, "val": {"cat": 1, "dog": 1}},
              "images": 4, "broken": [], "broken_reasons": {}, "ignored": [], "ignored_reasons": {},
              "empty_classes": [], "imbalance_ratio": 1.5, "duplicates": [], "warnings": [],
              "sizes": {"width": [8, 8], "height": [8, 8], "smallest": {"path": "a.png", "width": 8, "height": 8},
                        "largest": {"path": "a.png", "width": 8, "height": 8}}}
    describe = Call(report)
    library("rescli.data.report", describe_dataset=describe)
    res = run_cli("dataset", tmp_path / "t.csv", "--multi-label", "--label-sep", ",", "--path-column", "file")
    assert res.code == 0, res.err
    assert describe.calls[0][1]["table"] == TableOptions(path_column="file", multi_label=True, label_sep=",")
    assert "t.csv (multi-label table)" in res.out and "label" in res.out.splitlines()[2]


def test_evaluate_passes_table_overrides_and_shows_multi_label_tables(library, tmp_path):  # noqa: F811
    evaluate = Call(({**ML_METRICS, "skipped": [], "evaluated": {"note": None}, "loss": 0.2}, object(), None))
    library("rescli.inference.lookup", resolve_model_path=Call((tmp_path / "best.pt", "given")))
    library("rescli.evaluation.folder", evaluate_folder=evaluate)
    res = run_cli("evaluate", tmp_path, tmp_path / "test.tsv", "--path-column", "image", "--label-column", "tags",
                  "--label-sep", "|", "--no-files")
    assert res.code == 0, res.err
    kwargs = evaluate.kwargs
    assert (kwargs["path_column"], kwargs["label_column"], kwargs["label_sep"]) == ("image", "tags", "|")
    for row in ("mean_average_precision", "micro_f1", "subset_accuracy", "hamming_loss", "per label"):
        assert row in res.out, row
    assert "accuracy " not in res.out.replace("subset_accuracy", "")


ML_ROWS = [{"path": "a.png", "labels": ["cat", "dog"], "scores": {"cat": 0.9, "dog": 0.7},
            "topk": [{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.7}]},
           {"path": "b.png", "labels": [], "scores": {"cat": 0.2, "dog": 0.1},
            "topk": [{"label": "cat", "score": 0.2}, {"label": "dog", "score": 0.1}]}]


@pytest.fixture
def multi_label_model(library, monkeypatch):  # noqa: F811
    from rescli.cli.commands import inference

    monkeypatch.setattr(inference, "let_idle_threads_sleep", lambda: None)
    predictor = types.SimpleNamespace(kind="checkpoint", classes=["cat", "dog"], device=None,
                                      task=types.SimpleNamespace(name="multi-label"),
                                      meta={"settings": {"label_sep": ";"}})
    stream = Call(effect=lambda paths, **kwargs: iter([ML_ROWS]))
    library("rescli.inference.inputs", check_inputs=Call(), iter_input_paths=Call(iter(["a.png", "b.png"])))
    library("rescli.inference.load", load_predictor=Call(predictor))
    library("rescli.inference.lookup", resolve_model_path=Call((Path("m.pt"), "--model")))
    library("rescli.inference.stream", predict_batches=stream)
    library("rescli.inference.jpeg", jpeg_decode_works=Call(True))
    return stream


@pytest.mark.parametrize("args, expected", [
    (["--format", "jsonl"], '{"path": "a.png", "labels": ["cat", "dog"], "scores": {"cat": 0.9, "dog": 0.7}}\n'
                            '{"path": "b.png", "labels": [], "scores": {"cat": 0.2, "dog": 0.1}}\n'),
    (["--format", "csv"], "path,labels,scores,error\na.png,cat;dog,cat:0.9000;dog:0.7000,\n"
                          "b.png,,cat:0.2000;dog:0.1000,\n"),  # joined by the training table's separator
    (["--format", "tsv", "--label-sep", " ", "--fields", "labels,path"], "labels\tpath\ncat dog\ta.png\n\tb.png\n"),
    (["--format", "table"], "labels    path\ncat dog   a.png\n(none)    b.png\n"),
    (["--format", "json", "-k", "2", "--fields", "path,topk"],
     '[\n  {"path": "a.png", "topk": [{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.7}]},\n'
     '  {"path": "b.png", "topk": [{"label": "cat", "score": 0.2}, {"label": "dog", "score": 0.1}]}\n]\n'),
])
def test_predict_writes_a_multi_label_models_rows(multi_label_model, args, expected):
    res = run_cli("predict", "a.png", "b.png", "--quiet", *args)
    assert (res.code, res.out) == (0, expected), res.err


def test_predict_threshold_reaches_the_stream_and_wrong_fields_name_the_task(multi_label_model):
    res = run_cli("predict", "a.png", "--threshold", "0.3", "--format", "jsonl")
    assert res.code == 0 and multi_label_model.kwargs["threshold"] == 0.3
    assert "2 labels, multi-label" in res.err
    wrong = run_cli("predict", "a.png", "--fields", "path,label")
    assert wrong.code == 2 and "unknown field(s) label for a multi-label model" in wrong.err
    unknown = run_cli("predict", "a.png", "--fields", "size")
    assert unknown.code == 2 and "unknown field(s) size" in unknown.err
