"""Multi-label classification end to end (issue #15): finetune labels.csv --multi-label -> evaluate -> predict ->
export, with the task and the tuned thresholds in the checkpoint and in exports; the metrics from scikit-learn; and
resume, cached-feature head training, lr-find and a 2-process (gloo) run on a multi-label table."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAfter
from label_tables import LABELS, make_multilabel_table
from sklearn import metrics as skm

from rescli.core.errors import RescliError
from rescli.data.tasks import MULTI
from rescli.evaluation.evaluate import EvalResult
from rescli.evaluation.metrics import metrics_from
from rescli.evaluation.multilabel import tune_thresholds
from rescli.models.checkpoint import check_model_metadata, load_checkpoint, save_checkpoint
from rescli.train.interrupts import Interrupted
from rescli.train.loop import finetune
from rescli.train.settings import TrainSettings
from rescli.train.step import SigmoidObjective, positive_weights_for

TINY = ["--arch", "resnet20", "--weights", "none", "--img-size", "24", "--workers", "0", "--precision", "fp32",
        "--batch-size", "8"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return make_multilabel_table(tmp_path_factory.mktemp("ml") / "data", n=42)


@pytest.fixture(scope="module")
def multi_run(table, tmp_path_factory) -> Path:
    from conftest import run_cli

    out = tmp_path_factory.mktemp("mlrun") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLI_CACHE_DIR", str(out.parent / "cache"))
        res = run_cli("finetune", table, "--multi-label", *TINY, "--epochs", "4", "--lr", "5e-3", "--output", out,
                      "--format", "json")
    assert res.code == 0, res.err
    return out


# --- the pieces --------------------------------------------------------------------------------------------------

def test_thresholds_maximise_each_labels_f1_and_sit_between_scores():
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 0], [1, 1]])
    p = np.array([[0.9, 0.2], [0.35, 0.1], [0.3, 0.8], [0.1, 0.6], [0.6, 0.55]])
    t = tune_thresholds(y, p)
    assert math.isclose(t[0], (0.35 + 0.3) / 2)  # all three positives in, the negative at 0.3 out: F1 1
    assert math.isclose(t[1], (0.55 + 0.2) / 2) or t[1] > 0.55  # the best F1 of label 1
    for c in range(2):
        best = max(skm.f1_score(y[:, c], p[:, c] >= cut) for cut in np.unique(p[:, c]))
        assert math.isclose(skm.f1_score(y[:, c], p[:, c] >= t[c]), best)
    assert tune_thresholds(np.zeros((3, 1), int), np.array([[0.2], [0.7], [0.9]])) == [0.5]  # nothing to tune


def test_multi_label_metrics_are_scikit_learns():
    rng = np.random.default_rng(0)
    y = (rng.random((40, 3)) < 0.4).astype(np.int64)
    logits = rng.normal(0, 2, (40, 3)) + 2.5 * (y - 0.5)
    ev = EvalResult(0.3, 0.8, y, (logits > 0).astype(np.int64), logits.astype(np.float32), [f"{i}.png" for i in
                    range(40)], [], MULTI)
    thresholds = [0.4, 0.5, 0.6]
    m = metrics_from(ev, list(LABELS), thresholds=thresholds)
    probs = 1 / (1 + np.exp(-logits))
    pred = (probs >= np.array(thresholds)).astype(int)
    assert m["task"] == "multi-label" and m["thresholds"] == thresholds
    assert math.isclose(m["micro_f1"], skm.f1_score(y, pred, average="micro"))
    assert math.isclose(m["macro_f1"], skm.f1_score(y, pred, average="macro"))
    assert math.isclose(m["subset_accuracy"], skm.accuracy_score(y, pred))
    assert math.isclose(m["hamming_loss"], skm.hamming_loss(y, pred))
    assert math.isclose(m["mean_average_precision"], skm.average_precision_score(y, probs, average="macro"),
                        rel_tol=1e-6)
    red = m["per_class"]["red"]
    assert math.isclose(red["average_precision"], skm.average_precision_score(y[:, 0], probs[:, 0]))
    tn, fp, fn, tp = skm.confusion_matrix(y[:, 0], pred[:, 0]).ravel()
    assert m["confusion_counts"]["red"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    losses = [r["loss"] for r in m["top_losses"]]
    assert losses == sorted(losses, reverse=True) and set(m["ece_per_class"]) == set(LABELS)


def test_balance_weights_each_labels_positives_by_its_negatives():
    weights = positive_weights_for([(0,), (0, 1), (0,), (0,)], 3, torch.device("cpu"))
    assert weights.tolist() == pytest.approx([1 / 100, 3.0, 4.0])  # always on (capped), 1 in 4, never
    rare = positive_weights_for([(0,)] + [(1,)] * 499, 2, torch.device("cpu"))
    assert rare.tolist() == pytest.approx([100.0, 1 / 100])  # 499 negatives a positive: capped
    objective = SigmoidObjective(pos_weight=torch.tensor([1.0, 3.0]), label_smoothing=0.0, summed=False)
    logits, target = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
    assert float(objective.loss(logits, target, target, 1.0)) == pytest.approx(math.log(2) * (1 + 3) / 2)


def test_a_checkpoint_from_before_tasks_is_single_label_and_bad_thresholds_are_refused(trained_run, tmp_path):
    ckpt = load_checkpoint(trained_run / "best.pt")
    assert ckpt["task"] == "single-label" and "thresholds" not in ckpt
    old = {k: v for k, v in ckpt.items() if k != "task"}
    save_checkpoint(old, tmp_path / "old.pt")
    from rescli.inference.load import load_predictor

    assert load_predictor(tmp_path / "old.pt", device="cpu").task.name == "single-label"
    with pytest.raises(RescliError, match="thresholds .*: 2 values for 3 classes"):
        check_model_metadata({**ckpt, "task": "multi-label", "thresholds": [0.5, 0.5]}, path="m.pt")
    with pytest.raises(RescliError, match="task 'multi-class': expected single-label or multi-label"):
        check_model_metadata({**ckpt, "task": "multi-class"}, path="m.pt")


# --- end to end ---------------------------------------------------------------------------------------------------

def test_finetune_records_the_task_labels_and_tuned_thresholds(multi_run):
    best = load_checkpoint(multi_run / "best.pt")
    metrics = json.loads((multi_run / "metrics.json").read_text())
    assert best["task"] == "multi-label" and best["classes"] == sorted(LABELS)
    assert best["thresholds"] == metrics["thresholds"] and len(best["thresholds"]) == 3
    assert all(0 < t < 1 for t in best["thresholds"])
    assert metrics["micro_f1"] > 0.8 and metrics["mean_average_precision"] > 0.8
    for name in ("pr_curves.png", "top_losses.png", "reliability.png", "report.html", "predictions.csv"):
        assert (multi_run / name).is_file(), name
    assert not (multi_run / "confusion_matrix.png").exists()
    assert "label_issues" not in metrics  # confident learning ranks one given label per image
    header = (multi_run / "predictions.csv").read_text().splitlines()[0]
    assert header == "path,true,predicted,loss,correct,score:blue,score:green,score:red"
    report = (multi_run / "report.html").read_text()
    assert "mAP (macro)" in report and "Confusion counts per class" in report and "Precision-recall curves" in report
    assert best["data"]["table"].endswith("labels.csv")
    assert all(isinstance(y, list) for y in best["data"]["splits"]["val"]["labels"])


def test_evaluate_scores_the_held_out_rows_with_the_stored_thresholds(cli, multi_run, table, tmp_path):
    res = cli("evaluate", multi_run / "best.pt", table, "--output", tmp_path / "eval", "--format", "json",
              "--precision", "fp32", "--workers", "0")
    assert res.code == 0, res.err
    metrics = json.loads(res.out)
    trained = json.loads((multi_run / "metrics.json").read_text())
    assert metrics["evaluated"]["split"] == "val" and metrics["n"] == trained["n"]
    assert metrics["thresholds"] == trained["thresholds"] and metrics["thresholds_source"] == "the model's"
    assert math.isclose(metrics["micro_f1"], trained["micro_f1"], abs_tol=1e-9)
    assert "the table this model was trained on" in res.err


def test_predict_jsonl_rows_hold_labels_and_scores_and_threshold_overrides(cli, multi_run, table):
    images = sorted((table.parent / "images").glob("*.png"))[:6]
    res = cli("predict", *images, "--model", multi_run, "--format", "jsonl")
    assert res.code == 0, res.err
    rows = [json.loads(line) for line in res.out.splitlines()]
    thresholds = dict(zip(sorted(LABELS), load_checkpoint(multi_run / "best.pt")["thresholds"]))
    for row in rows:
        assert set(row) == {"path", "labels", "scores"} and set(row["scores"]) == set(LABELS)
        assert set(row["labels"]) == {k for k, p in row["scores"].items() if p >= thresholds[k]}
    everything = cli("predict", *images, "--model", multi_run, "--format", "jsonl", "--threshold", "0")
    assert all(len(json.loads(line)["labels"]) == 3 for line in everything.out.splitlines())
    nothing = cli("predict", *images, "--model", multi_run, "--format", "csv", "--threshold", "1", "--label-sep", ";")
    assert nothing.out.splitlines()[0] == "path,labels,scores,error"
    assert all(line.split(",")[1] == "" for line in nothing.out.splitlines()[1:])  # an empty list of labels
    joined = cli("predict", *images, "--model", multi_run, "--format", "csv", "--threshold", "0", "--label-sep", ";",
                 "--fields", "labels")
    assert joined.out.splitlines()[1:] == ["blue;green;red"] * 6
    top = cli("predict", images[0], "--model", multi_run, "--format", "json", "--top-k", "2")
    assert len(json.loads(top.out)[0]["topk"]) == 2
    wrong = cli("predict", images[0], "--model", multi_run, "--fields", "path,score")
    assert wrong.code == 2 and "for a multi-label model" in wrong.err


@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".ts"), ("onnx", ".onnx")])
def test_an_export_carries_the_task_and_thresholds_and_predicts_the_same_labels(cli, multi_run, table, tmp_path, fmt,
                                                                              suffix):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"model{suffix}"
    res = cli("export", multi_run / "best.pt", "--to", fmt, "--output", out)
    assert res.code == 0, res.err
    assert "random images only" not in res.err  # checked on the table's validation rows
    described = json.loads(cli("info", out, "--format", "json").out)
    assert described["task"] == "multi-label"
    assert described["thresholds"] == load_checkpoint(multi_run / "best.pt")["thresholds"]
    from rescli.inference.load import load_predictor

    predictor = load_predictor(out, device="cpu", precision="fp32")
    assert predictor.task.name == "multi-label"
    assert predictor.thresholds == load_checkpoint(multi_run / "best.pt")["thresholds"]
    images = sorted((table.parent / "images").glob("*.png"))
    args = ["--format", "jsonl", "--fields", "path,labels", "--precision", "fp32"]
    from_checkpoint = cli("predict", *images, "--model", multi_run / "best.pt", *args)
    from_export = cli("predict", *images, "--model", out, *args)
    assert from_export.code == 0, from_export.err
    assert from_export.out == from_checkpoint.out


@pytest.mark.parametrize("fmt,suffix,needs", [("onnx-int8", ".onnx", "onnxruntime"),
                                              ("openvino-int8", ".xml", "openvino")])
def test_an_int8_export_is_checked_label_by_label_on_the_validation_rows(cli, multi_run, table, tmp_path, fmt,
                                                                         suffix, needs):
    pytest.importorskip(needs)
    out = tmp_path / f"model{suffix}"
    res = cli("export", multi_run / "best.pt", "--to", fmt, "--output", out, "--print", "json",
              "--min-agreement", "0", "--max-drop", "100")  # the figures of a tiny model, whatever they are
    assert res.code == 0, res.err
    check = json.loads(res.out)["deployment"]["check"]
    val_rows = len(load_checkpoint(multi_run / "best.pt")["data"]["splits"]["val"]["paths"])
    assert check["images"] == val_rows and check["agreement_of"] == "label decisions (image x label)"
    assert 0 <= check["identical_label_sets"] <= check["agreement"] <= 1
    assert 0 <= check["accuracy_export"] <= 1 and 0 <= check["accuracy_checkpoint"] <= 1
    rows = cli("predict", *sorted((table.parent / "images").glob("*.png"))[:3], "--model", out, "--format", "jsonl")
    assert rows.code == 0, rows.err
    assert all(set(json.loads(line)) >= {"labels", "scores"} for line in rows.out.splitlines())


def test_explain_maps_each_predicted_label_with_the_score_predict_gives(cli, multi_run, table, tmp_path):
    images = sorted((table.parent / "images").glob("*.png"))[:6]
    predicted = cli("predict", *images, "--model", multi_run / "best.pt", "--format", "jsonl", "--precision", "fp32")
    explained = cli("explain", multi_run / "best.pt", *images, "-o", tmp_path / "maps", "--format", "jsonl")
    assert predicted.code == 0 and explained.code == 0, explained.err
    rows: dict[str, dict[str, float]] = {}
    for line in explained.out.splitlines():
        row = json.loads(line)
        rows.setdefault(row["path"], {})[row["label"]] = row["score"]
    for line in predicted.out.splitlines():
        want = json.loads(line)
        got = rows[want["path"]]
        likeliest = max(want["scores"], key=want["scores"].get)
        assert set(got) == (set(want["labels"]) or {likeliest})  # sigmoid scores over the tuned thresholds
        for label, score in got.items():
            assert abs(score - want["scores"][label]) < 1e-3, (label, score, want["scores"][label])


def test_resume_of_an_interrupted_multi_label_run_keeps_its_split_and_finishes(table, tmp_path):
    settings = TrainSettings(data_dir=str(table), arch="resnet20", weights="none", img_size=24, epochs=2,
                             batch_size=8, workers=0, precision="fp32", multi_label=True, label_sep=" ")
    with pytest.raises(Interrupted):
        finetune(settings=settings, output=tmp_path / "run", _stop=StopAfter(3))
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["task"] == "multi-label" and last["epoch"] == 0 and last["step_in_epoch"] == 3
    result = finetune(resume=tmp_path / "run")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["data"]["splits"] == last["data"]["splits"] and len(best["thresholds"]) == 3
    assert result["metrics"]["task"] == "multi-label" and len(result["history"]) == 2


def test_head_training_on_cached_features_of_a_multi_label_table(cli, table, tmp_path):
    res = cli("finetune", table, "--multi-label", *TINY, "--strategy", "head", "--epochs", "2", "--output",
              tmp_path / "run")
    assert res.code == 0, res.err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["feature_cache"]["train"] + info["feature_cache"]["val"] == 42
    assert load_checkpoint(tmp_path / "run" / "best.pt")["task"] == "multi-label"


def test_lr_find_on_a_multi_label_table_uses_binary_cross_entropy(cli, table, tmp_path):
    res = cli("lr-find", table, "--multi-label", *TINY, "--steps", "8", "--output", tmp_path / "lr.png",
              "--format", "json")
    assert res.code == 0, res.err
    assert "labels (multi-label)" in res.err and json.loads(res.out)["steps"] >= 5
    single = cli("lr-find", table, *TINY, "--steps", "8", "--output", tmp_path / "lr1.png", "--format", "json")
    assert single.code == 0, single.err and "classes" in single.err


def test_two_gloo_processes_train_a_multi_label_table_and_count_each_val_image_once(table, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RESCLI_LAUNCH_STATUS_FILE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rescli",
           "finetune", str(table), "--multi-label", *TINY, "--epochs", "1", "--output", str(tmp_path / "run")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    with open(tmp_path / "run" / "predictions.csv") as f:
        scored = sorted(row["path"] for row in csv.DictReader(f))
    held_out = sorted(str(table.parent / p) for p in best["data"]["splits"]["val"]["paths"])
    assert scored == held_out and best["task"] == "multi-label" and len(best["thresholds"]) == 3
