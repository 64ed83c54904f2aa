"""What finetune's and evaluate's reports take from insight: the validation split's label-issue suspects, and
top_losses.png drawn with the heatmaps of the worst mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import COLORS, make_split_folder, run_cli, write_color_images
from PIL import Image

from rescli.evaluation.plots import plot_top_losses


@pytest.fixture(scope="module")
def run_with_a_wrong_label(tmp_path_factory):
    """A finished run whose validation split holds a red picture filed as blue."""
    root = tmp_path_factory.mktemp("wrong")
    data = make_split_folder(root / "data", with_test=False)
    wrong = write_color_images(data / "val" / "blue", COLORS["red"], 1, seed=11)[0]
    wrong = wrong.rename(wrong.with_name("planted.png"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESCLI_CACHE_DIR", str(root / "cache"))
        res = run_cli("finetune", data, "--arch", "resnet20", "--weights", "none", "--img-size", "24", "--epochs", "3",
                      "--batch-size", "8", "--workers", "0", "--augment", "none", "--output", root / "run")
    assert res.code == 0, res.err
    return data, root / "run", wrong


def test_the_run_report_lists_the_validation_suspects(run_with_a_wrong_label):
    _, run, wrong = run_with_a_wrong_label
    metrics = json.loads((run / "metrics.json").read_text())
    suspects = metrics["label_issues"]
    assert suspects[0]["path"].endswith("planted.png") and suspects[0]["given"] == "blue"
    assert suspects[0]["suggested"] == "red"
    html = (run / "report.html").read_text()
    assert "Label issues (validation split)" in html and "planted.png" in html


def test_top_losses_shows_the_heatmaps_of_the_mistakes(run_with_a_wrong_label, tmp_path):
    data, run, _ = run_with_a_wrong_label
    figure = Image.open(run / "top_losses.png")
    assert "heatmap" in figure.text["Title"]
    res = run_cli("evaluate", run / "best.pt", data, "--output", tmp_path / "eval")
    assert res.code == 0, res.err
    assert "heatmap" in Image.open(tmp_path / "eval" / "top_losses.png").text["Title"]


def test_an_onnx_evaluation_draws_plain_pictures(run_with_a_wrong_label, tmp_path):
    pytest.importorskip("onnxruntime")
    data, run, _ = run_with_a_wrong_label
    assert run_cli("export", run, "--to", "onnx", "-o", tmp_path / "m.onnx").code == 0
    res = run_cli("evaluate", tmp_path / "m.onnx", data, "--output", tmp_path / "eval")
    assert res.code == 0, res.err
    assert "heatmap" not in Image.open(tmp_path / "eval" / "top_losses.png").text["Title"]


def test_plot_top_losses_draws_the_overlay_given(tmp_path):
    picture = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(picture)
    red = np.zeros((32, 32, 3), dtype=np.uint8)
    red[..., 0] = 255
    items = [{"path": str(picture), "true": "x", "predicted": "y", "score": 0.9, "loss": 2.0}]
    plot_top_losses(items, tmp_path / "plain.png")
    plot_top_losses(items, tmp_path / "maps.png", overlays={str(picture): red})

    def reddest(name: str) -> float:
        rgb = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=np.float32)
        return float((rgb[..., 0] - rgb[..., 2]).max())

    assert reddest("maps.png") > 200 > reddest("plain.png")
