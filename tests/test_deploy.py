"""int8 and OpenVINO exports (rescli export --to onnx-int8|openvino|openvino-int8): calibrated and checked on the
checkpoint's validation split before they are kept, then used by predict, evaluate and info like any export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rescli.inference.lookup import model_kind

needs_openvino = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("openvino", "nncf")),
    reason="needs pip install 'rescli[openvino]'")


def _export(cli, run: Path, fmt: str, out: Path, *extra: str):
    return cli("export", run, "--to", fmt, "--output", out, *extra)


def _labels(cli, model: Path, data: Path) -> list[tuple[str, str]]:
    res = cli("predict", data, "--model", model, "--format", "jsonl", "-q")
    assert res.code == 0, res.err
    return [(row["path"], row["label"]) for row in map(json.loads, res.out.splitlines())]


@pytest.mark.parametrize("fmt, name", [
    pytest.param("onnx-int8", "model.int8.onnx"),
    pytest.param("openvino", "model.xml", marks=needs_openvino),
    pytest.param("openvino-int8", "model.int8.xml", marks=needs_openvino),
])
def test_checked_export_prints_embeds_and_predicts_like_the_checkpoint(cli, trained_run, tmp_path, fmt, name):
    out = tmp_path / name
    res = _export(cli, trained_run, fmt, out)
    assert res.code == 0, res.err
    assert "label agreement with the checkpoint: 100.00%" in res.out
    assert "accuracy: checkpoint" in res.out and "largest score difference" in res.out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ([name] if fmt == "onnx-int8" else sorted([name, Path(name).with_suffix(".bin").name]))

    info = cli("info", out, "--format", "json")
    assert info.code == 0, info.err
    described = json.loads(info.out)
    check = described["check"]
    assert check["agreement"] == 1.0 and check["images"] >= 6
    assert {"accuracy_checkpoint", "accuracy_export", "max_score_difference"} <= set(check)
    assert "validation split" in described["checked_on"]
    if fmt.endswith("int8"):
        assert described["kind"].endswith("int8")
        assert described["quantisation"]["calibration_images"] == check["images"]
    data = Path(json.loads((trained_run / "run.json").read_text())["settings"]["data_dir"])
    assert _labels(cli, out, data) == _labels(cli, trained_run / "best.pt", data)


def test_export_below_min_agreement_fails_by_how_much_and_leaves_nothing(cli, trained_run, tmp_path, monkeypatch):
    import rescli.inference.onnx_export as onnx_export

    real = onnx_export.load_onnx_predictor

    def disagreeing(path):  # an int8 model that lost its way: every label moves one class on
        predictor = real(path)
        logits = predictor.logits_fn
        predictor.logits_fn = lambda images: logits(images).roll(1, dims=1)
        return predictor

    monkeypatch.setattr(onnx_export, "load_onnx_predictor", disagreeing)
    out = tmp_path / "out" / "model.int8.onnx"
    res = _export(cli, trained_run, "onnx-int8", out)
    assert res.code == 1
    assert "not written" in res.err and "label agreement with the checkpoint 0.00% is below --min-agreement" in res.err
    assert "by 99.00 points" in res.err
    assert "Traceback" not in res.err and len(res.err.strip().splitlines()) <= 2
    assert not out.parent.exists() or list(out.parent.iterdir()) == []

    res = _export(cli, trained_run, "onnx-int8", out, "--min-agreement", "0", "--max-drop", "5")
    assert res.code == 1
    assert "accuracy fell from 100.00% to 0.00%, 100.00 points, beyond --max-drop 5 by 95.00" in res.err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_calibrate_folder_and_count(cli, trained_run, tmp_path):
    from conftest import make_class_folder

    photos = make_class_folder(tmp_path / "photos", per_class=5, seed=7)
    out = tmp_path / "m.int8.onnx"
    res = _export(cli, trained_run, "onnx-int8", out, "--calibrate", photos, "--calibration-images", "4",
                  "--print", "json")
    assert res.code == 0, res.err
    quantisation = json.loads(res.out)["deployment"]["quantisation"]
    assert quantisation["calibration_images"] == 4 and quantisation["calibration_source"] == str(photos)


def _without_validation_images(trained_run: Path, tmp_path: Path) -> Path:
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt["data"] = {**ckpt["data"], "root": str(tmp_path / "moved-away")}
    ckpt["settings"] = {**ckpt["settings"], "data_dir": str(tmp_path / "moved-away")}
    path = tmp_path / "orphan.pt"
    torch.save(ckpt, path)
    return path


def test_int8_without_validation_images_asks_for_calibrate(cli, trained_run, tmp_path):
    orphan = _without_validation_images(trained_run, tmp_path)
    res = _export(cli, orphan, "onnx-int8", tmp_path / "m.int8.onnx")
    assert res.code == 2
    assert "pass --calibrate DATA_DIR" in res.err and "moved-away" in res.err
    assert not (tmp_path / "m.int8.onnx").exists()


def test_int8_without_validation_split_checks_agreement_on_the_calibration_images(cli, trained_run, tmp_path):
    orphan = _without_validation_images(trained_run, tmp_path)
    data = Path(json.loads((trained_run / "run.json").read_text())["settings"]["data_dir"])
    res = _export(cli, orphan, "onnx-int8", tmp_path / "m.int8.onnx", "--calibrate", data, "--print", "json")
    assert res.code == 0, res.err
    check = json.loads(res.out)["deployment"]["check"]
    assert check["on"] == "calibration images (unlabelled)" and "accuracy_export" not in check
    assert "label agreement only" in res.err


@pytest.mark.parametrize("flags, message", [
    (("--min-agreement", "1.5"), "--min-agreement 1.5"),
    (("--max-drop", "-1"), "--max-drop -1"),
    (("--calibration-images", "0"), "--calibration-images must be at least 1"),
])
def test_limit_usage_errors(cli, trained_run, tmp_path, flags, message):
    res = _export(cli, trained_run, "onnx-int8", tmp_path / "m.int8.onnx", *flags)
    assert res.code == 2 and message in res.err


def test_output_names_follow_the_format(cli, trained_run, tmp_path):
    res = _export(cli, trained_run, "openvino", tmp_path / "model.onnx")
    assert res.code == 2 and "must be named .xml" in res.err
    res = _export(cli, trained_run, "onnx-int8", tmp_path / "model.xml")
    assert res.code == 2 and "must be named .onnx" in res.err
    assert model_kind("m.xml") == "openvino" and model_kind("m.int8.onnx") == "onnx"


def test_missing_openvino_gives_the_pip_command(cli, trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    res = _export(cli, trained_run, "openvino-int8", tmp_path / "m.xml")
    assert res.code == 1
    assert res.err.strip().splitlines()[-1] == (
        "error: OpenVINO models need the openvino package: pip install 'rescli[openvino]' "
        "(or pip install openvino nncf)")
    (tmp_path / "m.xml").write_text("<net/>")
    res = cli("predict", trained_run / "best.pt", "--model", tmp_path / "m.xml")
    assert res.code == 1 and "pip install 'rescli[openvino]'" in res.err and "Traceback" not in res.err


@pytest.fixture(scope="module")
def openvino_export(trained_run, tmp_path_factory) -> Path:
    pytest.importorskip("openvino")
    from conftest import run_cli

    out = tmp_path_factory.mktemp("ov") / "model.xml"
    res = run_cli("export", trained_run, "--to", "openvino", "--output", out)
    assert res.code == 0, res.err
    return out


@needs_openvino
def test_openvino_weights_must_be_beside_and_the_same(cli, openvino_export, tmp_path):
    lone = tmp_path / "lone.xml"
    lone.write_bytes(openvino_export.read_bytes())
    res = cli("info", lone)
    assert res.code == 1 and "lone.bin is not beside it" in res.err

    swapped = tmp_path / "swapped.xml"
    swapped.write_bytes(openvino_export.read_bytes())
    weights = bytearray(openvino_export.with_suffix(".bin").read_bytes())
    weights[-1] ^= 0xFF
    swapped.with_suffix(".bin").write_bytes(bytes(weights))
    res = cli("predict", openvino_export, "--model", swapped)
    assert res.code == 1 and "swapped.bin is not the weights file this model was saved with" in res.err


@needs_openvino
def test_openvino_files_that_are_not_rescli_exports_fail_in_one_line(cli, tmp_path):
    import openvino as ov

    garbage = tmp_path / "garbage.xml"
    garbage.write_text("not xml at all")
    garbage.with_suffix(".bin").write_bytes(b"")
    res = cli("info", garbage)
    assert res.code == 1 and "not a readable OpenVINO model" in res.err and "Traceback" not in res.err

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    plain = ov.convert_model(net.eval(), example_input=torch.zeros(1, 1, 24, 24), input=[(-1, 1, 24, 24)])
    ov.save_model(plain, str(tmp_path / "plain.xml"))
    res = cli("info", tmp_path / "plain.xml")
    assert res.code == 1 and "not a rescli export (no rescli metadata inside)" in res.err

    meta = {"format": "rescli-export", "arch": "x", "classes": ["a", "b", "c"], "img_size": 24,
            "mean": [0.5] * 3, "std": [0.5] * 3}
    plain.set_rt_info(json.dumps(meta), ["rescli", "json"])
    ov.save_model(plain, str(tmp_path / "grey.xml"))
    res = cli("info", tmp_path / "grey.xml")
    assert res.code == 1 and "takes 1-channel images; rescli feeds 3 (RGB)" in res.err


@needs_openvino
def test_openvino_predict_streams_in_order_with_error_rows_and_thresholds(cli, openvino_export, trained_run, tmp_path):
    data = Path(json.loads((trained_run / "run.json").read_text())["settings"]["data_dir"])
    images = sorted(str(p) for p in data.rglob("*.png"))[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    inputs = [images[0], str(broken), *images[1:]]
    res = cli("predict", *inputs, "--model", openvino_export, "--format", "jsonl", "--threshold", "0.999",
              "--batch-size", "2")
    assert res.code == 1
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert [r["path"] for r in rows] == inputs
    assert "error" in rows[1] and all(r["label"] == "unknown" for i, r in enumerate(rows) if i != 1)

    res = cli("predict", *images, "--model", openvino_export, "--precision", "fp32", "--format", "csv")
    assert res.code == 0, res.err
    res = cli("predict", *images, "--model", openvino_export, "--device", "cuda")
    assert res.code == 2 and "runs OpenVINO models on the CPU" in res.err
    res = cli("predict", *images, "--model", openvino_export, "--compile")
    assert res.code == 2 and "--compile is for checkpoints" in res.err


@needs_openvino
def test_openvino_evaluate_scores_the_held_out_split(cli, openvino_export, trained_run, tmp_path):
    data = Path(json.loads((trained_run / "run.json").read_text())["settings"]["data_dir"])
    res = cli("evaluate", openvino_export, data, "--output", tmp_path / "eval", "--format", "json")
    assert res.code == 0, res.err
    metrics = json.loads(res.out)
    assert metrics["evaluated"]["split"] == "val" and metrics["n"] >= 6


@needs_openvino
def test_openvino_and_nncf_send_no_telemetry(tmp_path, trained_run):
    """In a fresh process with no opt-out file and not in CI (where openvino-telemetry would stay quiet anyway), an
    int8 export opens no connection and leaves no telemetry files in the home folder."""
    home = tmp_path / "home"
    home.mkdir()
    script = f"""
import socket, sys
attempts = []
def refuse(self, address):
    attempts.append(address)
    raise OSError("no network in this test")
socket.socket.connect = refuse
socket.socket.connect_ex = lambda self, address: attempts.append(address) or 1
from rescli.inference.export import export_model
export_model(model={str(trained_run)!r}, to="openvino-int8", output={str(tmp_path / "m.xml")!r})
import nncf.telemetry.wrapper as wrapper
print(type(wrapper.telemetry).__name__, attempts)
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV", "PYTEST_CURRENT_TEST")}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["MagicMock", "[]"]
    assert not (home / "intel").exists()


@needs_openvino
def test_telemetry_loaded_by_the_host_program_first_is_switched_off(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    script = """
import openvino_telemetry
from rescli.inference.openvino_export import import_nncf
import_nncf()
t = openvino_telemetry.Telemetry(app_name="host", app_version="1", tid="G-TEST", backend="ga4",
                                 enable_opt_in_dialog=False)
t.send_event("host", "action", "label")
t.end_session("host")
print(t.consent)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False"]
    assert not (home / "intel").exists()


def test_bench_times_each_engine_and_skips_the_missing(trained_run, monkeypatch):
    from rescli.inference.engine_bench import bench_engines

    monkeypatch.setitem(sys.modules, "openvino", None)
    data = Path(json.loads((trained_run / "run.json").read_text())["settings"]["data_dir"])
    result = bench_engines(model=trained_run, inputs=[str(data)], engines=["torch-fp32", "onnxruntime-int8",
                                                                           "openvino-fp32"], max_images=8, batch_size=4)
    rows = {row["engine"]: row for row in result["rows"]}
    assert list(rows) == ["default", "torch-fp32", "onnxruntime-int8", "openvino-fp32"]
    assert result["images"] == 8 and result["cpu"]["cpus"] >= 1 and "name" in result["cpu"]
    for name in ("default", "torch-fp32", "onnxruntime-int8"):
        row = rows[name]
        assert row["end_to_end_img_s"] > 0 and row["model_only_img_s"] > 0 and row["agreement"] == 1.0
        for what in ("end_to_end", "model_only"):  # the median of the rounds, between their extremes
            low, high = row[f"{what}_spread"]
            assert low <= row[f"{what}_img_s"] <= high
    assert rows["default"]["vs_default"] == 1.0
    assert "pip install 'rescli[openvino]'" in rows["openvino-fp32"]["skipped"]
