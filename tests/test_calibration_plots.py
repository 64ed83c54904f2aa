"""Calibration maths, evaluation figures and the HTML report, on small synthetic data (no training, no torch models)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from rescli.core.errors import RescliError
from rescli.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    softmax,
)
from rescli.evaluation.confusion import confusion_subset, most_confused
from rescli.evaluation.plots import (
    plot_confusion_matrix,
    plot_curves,
    plot_lr_find,
    plot_reliability,
    plot_top_losses,
)
from rescli.evaluation.report import write_html_report

# --------------------------------------------------------------------------- calibration


def test_softmax_is_stable_and_respects_temperature():
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]]))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]], atol=1e-12)
    z = np.array([[2.0, 0.0]])
    assert softmax(z, 2.0)[0, 0] == pytest.approx(np.exp(1) / (np.exp(1) + 1))
    with pytest.raises(RescliError):
        softmax(z, 0.0)


def test_ece_is_zero_for_perfectly_calibrated_data():
    # Ten samples at confidence 0.8, exactly eight of them right.
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # Confident and always right: also perfectly calibrated.
    assert expected_calibration_error(np.eye(4), np.arange(4)) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_hand_computed_value():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    # 5 bins: (0.8,1] holds conf .9/.9 with accuracy .5 -> |.5-.9| * 2/4 = 0.2
    #         (0.6,0.8] holds .7 (right) -> .3 * 1/4 = 0.075 ; (0.4,0.6] holds .55 (right) -> .45 * 1/4 = 0.1125
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.3875)

    bins = reliability_bins(probs, labels, n_bins=5)
    assert [b["count"] for b in bins] == [0, 0, 1, 1, 2]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    assert bins[4]["lo"] == pytest.approx(0.8) and bins[4]["hi"] == pytest.approx(1.0)
    assert bins[4]["confidence"] == pytest.approx(0.9) and bins[4]["accuracy"] == pytest.approx(0.5)


def _overconfident(n=3000, c=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 2.0
    logits *= 5.0  # far too sharp
    noisy = rng.random(n) < 0.3  # and 30 % of the labels are wrong
    labels = np.where(noisy, rng.integers(0, c, n), labels)
    return logits, labels


def test_fit_temperature_fixes_overconfident_logits():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert 1.0 < t <= 20.0
    assert negative_log_likelihood(logits, labels, t) < negative_log_likelihood(logits, labels, 1.0) - 0.5
    ece_before = expected_calibration_error(softmax(logits), labels)
    ece_after = expected_calibration_error(softmax(logits, t), labels)
    assert ece_after < ece_before / 2
    # It is the minimiser: nudging T either way does not help.
    best = negative_log_likelihood(logits, labels, t)
    assert best <= negative_log_likelihood(logits, labels, t * 1.05) + 1e-9
    assert best <= negative_log_likelihood(logits, labels, t / 1.05) + 1e-9


def test_fit_temperature_near_one_for_calibrated_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(6000, 5))
    probs = softmax(logits)
    labels = np.array([rng.choice(5, p=p) for p in probs])  # labels drawn from the model's own probabilities
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_fit_temperature_edge_cases():
    assert fit_temperature(np.array([[3.0, 1.0]]), np.array([0])) == 1.0  # one sample
    assert fit_temperature(np.ones((5, 1)), np.zeros(5, dtype=int)) == 1.0  # one class
    assert fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 0])) == pytest.approx(1.0)  # flat: T irrelevant
    separable = np.eye(3)[[0, 1, 2, 0, 1]] * 4.0
    t = fit_temperature(separable, np.array([0, 1, 2, 0, 1]))  # all right: wants T -> 0, clamped
    assert 0.05 <= t < 1.0
    with pytest.raises(RescliError):
        fit_temperature(np.zeros((4, 3)), np.array([0, 1, 5, 0]))


# --------------------------------------------------------------------------- figures


def _assert_png(path, min_side=200):
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_side and max(img.size) <= 6000
        text = dict(img.text)
        img.load()
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp file left behind
    _assert_usual_mode(path)
    return text


def _assert_usual_mode(path):
    # Atomic writes must not leave 0600 files behind (tempfile.mkstemp's mode): same mode as a plain new file.
    probe = path.parent / ".mode-probe"
    probe.write_bytes(b"")
    try:
        assert (path.stat().st_mode & 0o777) == (probe.stat().st_mode & 0o777)
    finally:
        probe.unlink()


def test_most_confused_order_and_content():
    labels = ["cat", "dog", "fox"]
    cm = np.array([[5, 3, 0], [7, 4, 1], [0, 3, 9]])
    assert most_confused(cm, labels, k=10) == [
        {"true": "dog", "predicted": "cat", "count": 7},
        {"true": "cat", "predicted": "dog", "count": 3},
        {"true": "fox", "predicted": "dog", "count": 3},
        {"true": "dog", "predicted": "fox", "count": 1},
    ]
    assert most_confused(cm, labels, k=2) == most_confused(cm, labels)[:2]
    assert most_confused(np.diag([3, 4, 5]), labels) == []


def test_confusion_subset_keeps_the_most_confused_classes():
    n = 120
    cm = np.diag(np.full(n, 10))
    confused = list(range(50, 90))  # 40 classes that confuse each other, with more mass for lower indices
    for rank, i in enumerate(confused):
        cm[i, confused[(rank + 1) % len(confused)]] += 50 - rank
    labels = [f"class_{i:03d}" for i in range(n)]
    sub, names, idx = confusion_subset(cm, labels, max_classes=30)
    assert sub.shape == (30, 30) and len(names) == 30 and len(idx) == 30
    assert set(idx) <= set(confused) and idx == sorted(idx)
    assert names == [labels[i] for i in idx]
    np.testing.assert_array_equal(sub, cm[np.ix_(idx, idx)])
    same, same_names, all_idx = confusion_subset(cm[:5, :5], labels[:5], max_classes=30)
    assert all_idx == [0, 1, 2, 3, 4] and same.shape == (5, 5)


def test_confusion_matrix_png_small_and_with_120_classes(tmp_path):
    labels = ["cat", "dog", "a <weird> & long class name that goes on"]
    small = plot_confusion_matrix(np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]]), labels, tmp_path / "cm.png")
    meta = _assert_png(small)
    assert meta["Classes shown"] == "3" and "3 classes" in meta["Title"]

    rng = np.random.default_rng(0)
    cm = rng.integers(0, 3, size=(120, 120)) + np.diag(rng.integers(20, 40, 120))
    big = plot_confusion_matrix(cm, [f"c{i}" for i in range(120)], tmp_path / "sub" / "cm120.png", max_classes=30)
    meta = _assert_png(big)
    assert meta["Classes shown"] == "30" and meta["Classes total"] == "120"
    assert "30 of 120 classes shown" in meta["Title"]

    with pytest.raises(RescliError):
        plot_confusion_matrix(np.zeros((3, 2)), labels, tmp_path / "bad.png")


def test_curves_from_csv_strings(tmp_path):
    history = [
        {"epoch": "1", "train_loss": "1.2", "val_loss": "1.0", "val_accuracy": "0.55", "lr": "0.001", "seconds": "3.1"},
        {"epoch": "2", "train_loss": "0.8", "val_loss": "0.9", "val_accuracy": "0.7", "lr": "0.0005", "seconds": "3.0"},
        {"epoch": "3", "train_loss": "0.5", "val_loss": "", "val_accuracy": "0.72", "lr": "0.0001", "seconds": "3.0"},
    ]
    meta = _assert_png(plot_curves(history, tmp_path / "curves.png"))
    assert meta["Title"] == "Training curves"
    _assert_png(plot_curves([], tmp_path / "empty.png"), min_side=100)


def test_top_losses_with_good_bad_and_missing_images(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    items = [
        {"path": str(good), "true": "cat", "predicted": "dog", "score": 0.91, "loss": 2.5},
        {"path": str(broken), "true": "<b>&co", "predicted": "cat", "score": 0.6, "loss": 1.1},
        {"path": str(tmp_path / "missing.png"), "true": "dog", "predicted": "cat", "score": 0.55, "loss": 0.9},
    ]
    meta = _assert_png(plot_top_losses(items, tmp_path / "top.png"))
    assert "Top 3 losses" in meta["Title"]
    meta = _assert_png(plot_top_losses(items * 10, tmp_path / "top16.png", max_items=16))
    assert "Top 16 losses" in meta["Title"]
    _assert_png(plot_top_losses([], tmp_path / "none.png"), min_side=100)


def test_reliability_and_lr_find_pngs(tmp_path):
    logits, labels = _overconfident(n=500)
    t = fit_temperature(logits, labels)
    meta = _assert_png(plot_reliability(softmax(logits), labels, tmp_path / "rel.png"))
    assert "ECE" in meta["Title"]
    meta = _assert_png(
        plot_reliability(softmax(logits, t), labels, tmp_path / "rel2.png", temperature=t, logits=logits)
    )
    assert "temperature scaling" in meta["Title"]

    lrs = list(np.logspace(-6, 0, 60))
    losses = [2.3 - 1.5 * np.exp(-((np.log10(lr) + 2.5) ** 2)) + (5.0 if lr > 0.3 else 0.0) for lr in lrs]
    losses[-1] = float("nan")
    meta = _assert_png(plot_lr_find(lrs, losses, tmp_path / "lr.png", suggestion=3e-3))
    assert "3.00e-03" in meta["Title"]


# --------------------------------------------------------------------------- HTML report

CLASSES = ["cat", "dog", "<b>&co"]


def _fake_run(run_dir, *, with_pngs):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({
        "settings": {"arch": "resnet18", "classes": CLASSES, "img_size": 64, "epochs": 3, "lr": 0.001},
        "versions": {"rescli": "0.1.0", "torch": "2.x", "python": "3.11"},
    }))
    cm = [[8, 2, 0], [1, 9, 0], [0, 3, 7]]
    (run_dir / "metrics.json").write_text(json.dumps({
        "accuracy": 0.8, "balanced_accuracy": 0.8, "macro_f1": 0.7987, "weighted_f1": 0.7987,
        "macro_precision": 0.8254, "macro_recall": 0.8, "top_k_accuracy": {"2": 0.95}, "roc_auc_ovr": None,
        "ece": 0.0412, "ece_before_temperature": 0.1234, "temperature": 1.7321, "labels": CLASSES,
        "per_class": {
            "cat": {"precision": 0.8889, "recall": 0.8, "f1": 0.8421, "support": 10},
            "dog": {"precision": 0.6429, "recall": 0.9, "f1": 0.75, "support": 10},
            "<b>&co": {"precision": 1.0, "recall": 0.7, "f1": 0.8235, "support": 10},
        },
        "confusion_matrix": cm,
    }))
    with open(run_dir / "history.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"])
        w.writerow([1, 1.1, 0.9, 0.6, 0.001, 2.5])
        w.writerow([2, 0.7, 0.8, 0.8, 0.0005, 2.4])
    if with_pngs:
        with open(run_dir / "history.csv", newline="") as fh:
            plot_curves(list(csv.DictReader(fh)), run_dir / "curves.png")
        plot_confusion_matrix(np.array(cm), CLASSES, run_dir / "confusion_matrix.png")
        plot_top_losses([], run_dir / "top_losses.png")
        Image.new("RGB", (50, 40), (0, 128, 255)).save(run_dir / "reliability.png")
    return run_dir


def test_html_report_is_self_contained_and_escaped(tmp_path):
    run = _fake_run(tmp_path / "run", with_pngs=True)
    out = write_html_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http" not in "".join(srcs) and "<script" not in page.lower()
    assert "<link" not in page.lower() and "url(" not in page.lower()
    # per-class numbers, headline metrics, calibration numbers
    for number in ("0.8889", "0.6429", "0.8421", "0.8235", "0.7987", "0.1234", "1.7321", "0.9500"):
        assert number in page
    # the class named <b>&co is escaped everywhere, never raw
    assert "&lt;b&gt;&amp;co" in page and "<b>&co" not in page
    # most-confused pairs computed from the matrix when metrics.json lacks them
    assert re.search(r"<td>&lt;b&gt;&amp;co</td><td>dog</td><td class=\"num\">3</td>", page)
    assert "resnet18" in page and "Not available" not in page
    assert not list(run.glob(".report.html.*"))
    _assert_usual_mode(out)


def test_html_report_without_pngs_and_custom_output(tmp_path):
    run = _fake_run(tmp_path / "run", with_pngs=False)
    (run / "history.csv").unlink()
    target = tmp_path / "elsewhere" / "r.html"
    out = write_html_report(run, output=target)
    assert out == target and not (run / "report.html").exists()
    page = out.read_text(encoding="utf-8")
    assert "src=" not in page
    assert page.count("not available") >= 4  # curves, history, confusion figure, top losses, reliability
    assert "0.8889" in page


def test_html_report_errors(tmp_path):
    with pytest.raises(RescliError, match="not found"):
        write_html_report(tmp_path / "nope")
    run = _fake_run(tmp_path / "run", with_pngs=False)
    (run / "metrics.json").unlink()
    with pytest.raises(RescliError, match="metrics.json"):
        write_html_report(run)
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(RescliError):
        write_html_report(run)
