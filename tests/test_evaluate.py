"""Evaluation artefacts end to end: one small fine-tune on real handwritten digits, then evaluate, predict and report.

Every artefact is checked against an independent source: the confusion matrix (JSON and PNG) against the
per-image predictions, the calibrated scores against `predict`, ECE before/after against `predict --raw-scores`.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from rescli.evaluation.artefacts import write_evaluation
from rescli.evaluation.calibration import expected_calibration_error
from rescli.evaluation.evaluate import EvalResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_sample_data import write_digits  # noqa: E402


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _png_text(path: Path) -> dict:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return dict(img.text)


def _confusion(rows: list[dict], labels: list[str]) -> list[list[int]]:
    idx = {c: i for i, c in enumerate(labels)}
    cm = [[0] * len(labels) for _ in labels]
    for r in rows:
        cm[idx[r["true"]]][idx[r["predicted"]]] += 1
    return cm


def _top1_ece(scores: list[float], correct: list[bool]) -> float:
    # ECE needs only the top-1 probability and whether it was right: column 0 holds the top score, the rest of the
    # mass is spread thinly over 100 other columns (each below any top-1 score of a 10-class model).
    s = np.asarray(scores)
    probs = np.concatenate([s[:, None], np.repeat(((1 - s) / 100)[:, None], 100, axis=1)], axis=1)
    labels = np.where(np.asarray(correct), 0, 1)
    return expected_calibration_error(probs, labels)



@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """300 real handwritten digits (30 per class, 16 px), 3 epochs with heavy label smoothing (0.4): the model is
    clearly mis-calibrated (under-confident; T comes out near 0.37 and ECE drops from 0.30-0.40 to under 0.09 for
    seeds 0, 1 and 2), and it still makes enough mistakes to fill every figure. fp32 and one thread: deterministic."""
    root = tmp_path_factory.mktemp("digits")
    data = root / "digits"
    write_digits(data, per_class=30, size=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLI_CACHE_DIR", str(root / "cache"))
        res = run_cli("finetune", data, "--weights", "none", "--img-size", "16", "--epochs", "3", "--batch-size", "16",
                      "--lr", "0.003", "--label-smoothing", "0.4", "--val-split", "0.3", "--seed", "0",
                      "--precision", "fp32", "--workers", "0", "--augment", "none", "--output", root / "run")
    assert res.code == 0, res.err
    run = root / "run"
    run.joinpath("finetune.out").write_text(res.out)
    return run


def test_finetune_writes_consistent_artefacts(digits_run):
    run = digits_run
    metrics = json.loads((run / "metrics.json").read_text())
    rows = _read_csv(run / "predictions.csv")
    run_info = json.loads((run / "run.json").read_text())
    classes = metrics["labels"]
    assert classes == sorted(json.loads((run / "run.json").read_text())["classes"]) and len(classes) == 10
    assert len(rows) == metrics["n"] == run_info["settings"]["val_images"]  # the validation split, every image once

    # Confusion matrix: JSON == recomputed from the per-image predictions == the numbers drawn in the PNG.
    k = len(classes)
    cm = _confusion(rows, classes)
    assert metrics["confusion_matrix"] == cm
    meta = _png_text(run / "confusion_matrix.png")
    assert json.loads(meta["Labels"]) == classes and json.loads(meta["Counts"]) == cm
    mistakes = sum(map(sum, cm)) - sum(cm[i][i] for i in range(k))
    assert mistakes >= 5, "the run must leave mistakes to show"

    # Per-class table and accuracy agree with the predictions.
    for i, name in enumerate(classes):
        row = metrics["per_class"][name]
        assert row["support"] == sum(cm[i])
        predicted = sum(cm[j][i] for j in range(k))
        assert row["precision"] == pytest.approx(cm[i][i] / predicted if predicted else 0.0)
        assert row["recall"] == pytest.approx(cm[i][i] / sum(cm[i]))
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] == "true" for r in rows) / len(rows))
    assert all((r["true"] == r["predicted"]) == (r["correct"] == "true") for r in rows)

    # Most-confused pairs: the largest off-diagonal cells, largest first.
    off = sorted((cm[i][j] for i in range(k) for j in range(k) if i != j and cm[i][j]), reverse=True)
    assert [p["count"] for p in metrics["most_confused"]] == off[:10]
    for p in metrics["most_confused"]:
        assert cm[classes.index(p["true"])][classes.index(p["predicted"])] == p["count"] and p["true"] != p["predicted"]

    # Top losses: exactly the misclassified images, highest loss first, with true/predicted/score as drawn.
    wrong = sorted((r for r in rows if r["correct"] == "false"), key=lambda r: -float(r["loss"]))
    drawn = json.loads(_png_text(run / "top_losses.png")["Items"])
    assert len(drawn) == min(16, mistakes)
    assert [d["path"] for d in drawn] == [r["path"] for r in wrong[:16]]
    for d, r in zip(drawn, wrong):
        assert (d["true"], d["predicted"]) == (r["true"], r["predicted"]) and d["true"] != d["predicted"]
        assert d["score"] == pytest.approx(float(r["score"]), abs=1e-5)
        assert d["loss"] == pytest.approx(-np.log(float(r["true_score"])), abs=1e-3)
    assert metrics["top_losses"] == drawn

    # Curves from history.csv; the terminal shows the per-class table and the confused pairs.
    assert _png_text(run / "curves.png")["Title"] == "Training curves"
    assert len(_read_csv(run / "history.csv")) == metrics["epochs_run"] == 3
    out = (run / "finetune.out").read_text()
    assert "per class" in out and "most confused" in out and "report.html" in "".join(re.findall(r"[\w.]+", out))

    # best.pt carries the temperature and the same metrics.
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["temperature"] == pytest.approx(metrics["temperature"])
    assert ckpt["metrics"]["confusion_matrix"] == cm


def test_temperature_scaling_lowers_ece_and_predict_applies_it(digits_run, cli):
    run = digits_run
    metrics = json.loads((run / "metrics.json").read_text())
    t = metrics["temperature"]
    assert t < 0.8, "label smoothing 0.4 makes the model under-confident: it needs sharpening"
    assert metrics["ece"] < metrics["ece_before_temperature"] / 2
    assert metrics["log_loss"] < metrics["log_loss_before_temperature"]
    assert "fitted on the validation split" in metrics["temperature_source"]
    rel = _png_text(run / "reliability.png")
    assert float(rel["ECE before"]) == pytest.approx(metrics["ece_before_temperature"])
    assert float(rel["ECE"]) == pytest.approx(metrics["ece"])
    assert float(rel["Temperature"]) == pytest.approx(metrics["temperature"])

    # Independent check through predict on the same validation images: calibrated vs --raw-scores.
    rows = _read_csv(run / "predictions.csv")
    listing = run.parent / "val.txt"
    listing.write_text("".join(r["path"] + "\n" for r in rows))
    got = {}
    for mode in ("calibrated", "raw"):
        res = cli("predict", f"@{listing}", "--model", run / "best.pt", "--format", "jsonl", "--workers", "0",
                  "--precision", "fp32", *(["--raw-scores"] if mode == "raw" else []))
        assert res.code == 0, res.err
        got[mode] = {d["path"]: d for d in map(json.loads, res.out.splitlines())}
    truth = {r["path"]: r["true"] for r in rows}
    for r in rows:
        assert got["calibrated"][r["path"]]["label"] == r["predicted"]
        assert got["calibrated"][r["path"]]["score"] == pytest.approx(float(r["score"]), abs=2e-3)
    paths = list(truth)
    ece = {m: _top1_ece([got[m][p]["score"] for p in paths], [got[m][p]["label"] == truth[p] for p in paths])
           for m in got}
    assert ece["calibrated"] == pytest.approx(metrics["ece"], abs=2e-3)
    assert ece["raw"] == pytest.approx(metrics["ece_before_temperature"], abs=2e-3)
    assert ece["calibrated"] < ece["raw"]
    # T > 1 (over-confident) pulls every top score down, T < 1 (under-confident) pushes every one up.
    sign = 1 if t > 1 else -1
    assert all(sign * (got["raw"][p]["score"] - got["calibrated"][p]["score"]) >= -1e-6 for p in paths)
    assert any(abs(got["raw"][p]["score"] - got["calibrated"][p]["score"]) > 1e-3 for p in paths)


def test_threshold_routes_low_confidence_to_unknown(digits_run, cli):
    rows = _read_csv(digits_run / "predictions.csv")
    scores = sorted(float(r["score"]) for r in rows)
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # between two scores: no ties
    res = cli("predict", *[r["path"] for r in rows], "--model", digits_run / "best.pt",
              "--threshold", f"{threshold:.6f}", "--top-k", "2", "--format", "jsonl", "--workers", "0",
              "--precision", "fp32")
    assert res.code == 0, res.err
    out = [json.loads(line) for line in res.out.splitlines()]
    assert len(out) == len(rows)
    unknown = [d for d in out if d["label"] == "unknown"]
    assert 0 < len(unknown) < len(out)
    for d in out:
        assert len(d["topk"]) == 2 and d["topk"][0]["score"] == d["score"]  # scores still shown
        assert (d["label"] == "unknown") == (d["score"] < threshold)
        if d["label"] != "unknown":
            assert d["label"] == d["topk"][0]["label"]
        else:
            assert d["topk"][0]["label"] != "unknown"


def test_evaluate_writes_next_to_the_model_never_into_the_data(digits_run, cli, tmp_path):
    data = digits_run.parent / "digits"
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    res = cli("evaluate", digits_run / "best.pt", data, "--split", "all", "--workers", "0", "--precision", "fp32")
    assert res.code == 0, res.err
    out_dir = digits_run / "eval-digits-all"
    assert str(out_dir) in res.err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written into the data folder
    metrics = json.loads((out_dir / "metrics.json").read_text())
    rows = _read_csv(out_dir / "predictions.csv")
    assert metrics["n"] == len(rows) == 300  # --split all on the training folder: every image
    classes = metrics["labels"]
    plotted = json.loads(_png_text(out_dir / "confusion_matrix.png")["Counts"])
    assert metrics["confusion_matrix"] == _confusion(rows, classes) == plotted
    stored = torch.load(digits_run / "best.pt", weights_only=True)["temperature"]
    assert metrics["temperature"] == pytest.approx(stored) and stored != 1.0
    assert metrics["evaluated"]["model"] == str((digits_run / "best.pt").resolve())
    for name in ("top_losses.png", "reliability.png", "report.html"):
        assert (out_dir / name).stat().st_size > 0
    assert "per class" in res.out and "most confused" in res.out and "ece" in res.out
    for name in classes:
        assert name in res.out

    # --raw-scores: no temperature; --output elsewhere; --no-files writes nothing; never inside the data folder.
    res = cli("evaluate", digits_run / "best.pt", data, "--split", "all", "--workers", "0", "--precision", "fp32",
              "--raw-scores", "--output", tmp_path / "raw", "--format", "json")
    assert res.code == 0, res.err
    raw = json.loads(res.out)
    assert raw["temperature"] == 1.0 and raw["ece"] == pytest.approx(raw["ece_before_temperature"])
    assert raw["confusion_matrix"] == metrics["confusion_matrix"]  # argmax does not depend on T
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text())["ece"] == pytest.approx(raw["ece"])
    res = cli("evaluate", digits_run / "best.pt", data, "--workers", "0", "--precision", "fp32", "--no-files",
              "--output", tmp_path / "none")
    assert res.code == 0 and not (tmp_path / "none").exists()
    res = cli("evaluate", digits_run / "best.pt", data, "--workers", "0", "--precision", "fp32",
              "--output", data / "seven" / "eval")
    assert res.code == 2 and "inside the data folder" in res.err
    assert not (data / "seven" / "eval").exists()


def test_report_embeds_images_and_numbers(digits_run, cli, tmp_path):
    target = tmp_path / "share" / "run.html"
    res = cli("report", digits_run, "--output", target)
    assert res.code == 0, res.err
    assert res.out.strip() == str(target)
    page = target.read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    embedded = [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    for name in ("curves.png", "confusion_matrix.png", "top_losses.png", "reliability.png"):
        assert (digits_run / name).read_bytes() in embedded, name
    metrics = json.loads((digits_run / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "ece", "ece_before_temperature", "temperature"):
        assert f"{metrics[key]:.4f}" in page, key
    for item in metrics["top_losses"]:
        assert Path(item["path"]).name in page
    # finetune already wrote one into the run folder, with the same figures.
    assert (digits_run / "confusion_matrix.png").read_bytes() in [
        base64.b64decode(s) for s in re.findall(r'base64,([^"]+)"', (digits_run / "report.html").read_text())]

    assert cli("report", tmp_path / "missing").code == 1
    res = cli("report", "--help")
    assert res.code == 0 and "rescli report runs/run1" in res.out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless chromium on this machine")
def test_report_renders_in_a_headless_browser(digits_run, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1000,1400", (digits_run / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.shape == (1400, 1000)
    # Rendered content, not a blank or error page: plenty of dark (text) and mid-tone (figure) pixels.
    assert (pixels < 100).mean() > 0.005 and pixels.std() > 20


def test_write_evaluation_many_classes_and_no_mistakes(tmp_path):
    rng = np.random.default_rng(0)
    n, c = 600, 120
    classes = [f"class_{i:03d}" for i in range(c)]
    y = np.arange(n) % c
    logits = rng.normal(size=(n, c)).astype(np.float32)
    logits[np.arange(n), y] += 3.0
    pred = logits.argmax(1)
    ev = EvalResult(loss=1.0, accuracy=float((pred == y).mean()), y_true=y, y_pred=pred, logits=logits,
                    paths=[str(tmp_path / f"missing_{i}.png") for i in range(n)], failures=[])
    m = write_evaluation(out_dir=tmp_path / "many", ev=ev, classes=classes, fit=True, report=False)
    meta = _png_text(tmp_path / "many" / "confusion_matrix.png")
    assert meta["Classes shown"] == "30" and meta["Classes total"] == "120"
    shown = json.loads(meta["Labels"])
    idx = [classes.index(s) for s in shown]
    assert json.loads(meta["Counts"]) == np.asarray(m["confusion_matrix"])[np.ix_(idx, idx)].tolist()
    assert set(m["top_k_accuracy"]) == {"1", "3", "5"} and m["roc_auc_ovr"] is not None
    assert len(m["most_confused"]) == 10 and len(m["top_losses"]) == 16

    # All right: the NLL-optimal temperature is 0, so none is fitted.
    right = EvalResult(loss=0.1, accuracy=1.0, y_true=y[:30] % 3, y_pred=y[:30] % 3,
                       logits=np.eye(3, dtype=np.float32)[y[:30] % 3] * 4, paths=[f"p{i}" for i in range(30)],
                       failures=[])
    m = write_evaluation(out_dir=tmp_path / "right", ev=right, classes=["a", "b", "c"], fit=True, report=False)
    assert m["temperature"] == 1.0 and "not fitted" in m["temperature_source"]
    assert m["most_confused"] == [] and m["top_losses"] == []
    assert json.loads(_png_text(tmp_path / "right" / "top_losses.png").get("Items", "[]")) == []


def test_write_evaluation_fixes_an_over_confident_model(tmp_path):
    # Logits far too sharp (x5) and 30 % of the labels wrong: a model that is sure and often wrong.
    rng = np.random.default_rng(0)
    n, c = 400, 5
    y_model = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y_model] += 2.0
    logits = (logits * 5.0).astype(np.float32)
    y = np.where(rng.random(n) < 0.3, rng.integers(0, c, n), y_model)
    pred = logits.argmax(1)
    ev = EvalResult(loss=1.0, accuracy=float((pred == y).mean()), y_true=y, y_pred=pred, logits=logits,
                    paths=[f"img_{i}.png" for i in range(n)], failures=[])
    m = write_evaluation(out_dir=tmp_path, ev=ev, classes=list("abcde"), fit=True, report=False)
    assert m["temperature"] > 2.0
    assert m["ece"] < m["ece_before_temperature"] / 2
    rel = _png_text(tmp_path / "reliability.png")
    assert float(rel["ECE before"]) == pytest.approx(m["ece_before_temperature"])
    assert float(rel["ECE"]) == pytest.approx(m["ece"])
    rows = _read_csv(tmp_path / "predictions.csv")
    probs = torch.softmax(torch.from_numpy(logits).double() / m["temperature"], 1).numpy()
    np.testing.assert_allclose([float(r["score"]) for r in rows], probs.max(1), atol=1e-6)
    assert m["confusion_matrix"] == _confusion(rows, list("abcde"))
    assert not (tmp_path / "curves.png").exists()  # no history given
