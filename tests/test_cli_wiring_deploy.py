"""Wiring of the deployment commands: export's int8/OpenVINO options, info's check figures, and rescli bench. The
library is replaced where the command imports it (as in test_cli_wiring.py): milliseconds a test."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from rescli.inference.checked_export import Calibration
from rescli.inference.deploy_check import Limits


class Call:
    def __init__(self, result: Any = None) -> None:
        self.result, self.calls = result, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.result

    @property
    def kwargs(self) -> dict[str, Any]:
        assert len(self.calls) == 1, self.calls
        return self.calls[0][1]


@pytest.fixture
def library(monkeypatch):
    monkeypatch.setattr("rescli.core.cpus.adapt_to_load", lambda: None)

    def install(module_name: str, **names: Any) -> None:
        module = types.ModuleType(module_name)
        module.__dict__.update(names)
        monkeypatch.setitem(sys.modules, module_name, module)

    return install


CHECK = {"images": 350, "unreadable": 2, "agreement": 0.9943, "max_score_difference": 0.0412,
         "accuracy_checkpoint": 0.9171, "accuracy_export": 0.9143, "accuracy_drop_points": 0.2857,
         "on": "images of the validation split of /data/photos", "min_agreement": 0.99, "max_drop_points": 1.0}
EXPORTED = {"output": "m.xml", "format": "openvino-int8", "classes": 4, "img_size": 224, "weights": "m.bin",
            "deployment": {"format": "openvino-int8", "engine": "openvino", "precision": "int8",
                           "quantisation": {"method": "NNCF", "calibration_images": 300,
                                            "calibration_source": "/data/more"}, "check": CHECK}}


def test_export_int8_options_reach_the_library_and_the_check_is_printed(library, tmp_path):
    export = Call(EXPORTED)
    library("rescli.inference.export", export_model=export)
    res = run_cli("export", tmp_path / "run", "--to", "openvino-int8", "-o", tmp_path / "m.xml", "--calibrate",
                  tmp_path / "more", "--calibration-images", "50", "--min-agreement", "0.995", "--max-drop", "0.5")
    assert res.code == 0, res.err
    assert export.kwargs == {"model": tmp_path / "run", "fmt": "openvino-int8", "output": tmp_path / "m.xml",
                             "check_images": None, "calibration": Calibration(folder=tmp_path / "more", count=50),
                             "limits": Limits(min_agreement=0.995, max_drop=0.5)}
    assert res.out.splitlines() == [
        "wrote m.xml (openvino-int8, 4 classes, 224 px)",
        "wrote m.bin (its weights: keep it beside m.xml)",
        "int8 calibrated on 300 images of /data/more",
        "checked on 350 images of the validation split of /data/photos:",
        "  label agreement with the checkpoint: 99.43%",
        "  accuracy: checkpoint 91.71%, export 91.43% (+0.29 points lost)",
        "  largest score difference: 0.0412",
        "  2 image(s) could not be read and were left out",
    ]
    assert res.err == ""


def test_export_defaults_and_json(library, tmp_path):
    export = Call(EXPORTED)
    library("rescli.inference.export", export_model=export)
    res = run_cli("export", "run", "--to", "onnx-int8", "--print", "json")
    assert json.loads(res.out) == EXPORTED
    assert export.kwargs["calibration"] == Calibration(folder=None, count=300)
    assert export.kwargs["limits"] == Limits(min_agreement=0.99, max_drop=1.0)


def test_check_options_are_refused_for_parity_checked_formats(library, tmp_path):
    library("rescli.inference.export", export_model=Call(EXPORTED))
    for flags in (("--calibrate", "x"), ("--min-agreement", "0.9"), ("--max-drop", "2")):
        res = run_cli("export", "run", "--to", "onnx", *flags)
        assert res.code == 2 and f"{flags[0]} is for --to onnx-int8, openvino and openvino-int8" in res.err
    res = run_cli("export", "run", "--to", "openvino-int8", "--check-images", "photos")
    assert res.code == 2 and "--check-images is for --to torchscript and onnx" in res.err


def test_info_shows_the_check_figures(library, tmp_path):
    describe = Call({"kind": "openvino int8", "engine": "openvino int8 (checked at bf16)",
                     "checked_on": CHECK["on"], "check": {"agreement": 0.9943, "images": 350}})
    library("rescli.inference.describe", describe_model=describe)
    res = run_cli("info", tmp_path / "m.xml")
    assert res.code == 0, res.err
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in res.out.splitlines() if "│" in line}
    assert rows["engine"] == "openvino int8 (checked at bf16)"
    assert rows["check"] == "agreement=0.9943, images=350"


BENCHED = {"cpu": {"name": "AMD EPYC 9R45", "features": ["AVX512-BF16", "AVX2"], "cpus": 2, "threads": 2,
                   "fast_bf16": True},
           "model": "runs/run1/best.pt", "arch": "resnet50", "img_size": 224, "images": 64, "batch_size": 32,
           "rows": [{"engine": "default", "precision": "torch bf16", "setup_s": 0.5, "model_only_img_s": 20.0,
                     "end_to_end_img_s": 10.0, "agreement": 1.0, "vs_default": 1.0, "of_model_bound": 0.5},
                    {"engine": "openvino-int8", "setup_s": 9.0, "model_only_img_s": 40.0, "end_to_end_img_s": 35.0,
                     "agreement": 0.995, "vs_default": 3.5, "of_model_bound": 0.875},
                    {"engine": "openvino-bf16", "skipped": "no OpenVINO"}]}


def test_bench_wiring_and_table(library, tmp_path):
    bench = Call(BENCHED)
    library("rescli.inference.engine_bench", bench_engines=bench)
    res = run_cli("bench", tmp_path / "run", "photos", "more", "-e", "openvino-int8", "--engine", "torch-fp32",
                  "--images", "64", "-b", "16", "--workers", "3")
    assert res.code == 0, res.err
    assert bench.kwargs == {"model": tmp_path / "run", "inputs": ["photos", "more"],
                            "engines": ["openvino-int8", "torch-fp32"], "batch_size": 16, "max_images": 64,
                            "workers": 3}
    assert "AMD EPYC 9R45 (AVX512-BF16, AVX2)" in res.out.replace("\n", " ")
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in res.out.splitlines() if line.startswith("│")]
    assert cells[0] == ["default: torch bf16", "10.0", "1.00", "20.0", "0.50", "100.0%", "0.5"]
    assert cells[1] == ["openvino-int8", "35.0", "3.50", "40.0", "0.88", "99.5%", "9.0"]
    assert len(cells) == 2 and "skipped: openvino-bf16: no OpenVINO" in res.out
    assert json.loads(run_cli("bench", "run", "photos", "--format", "json").out) == BENCHED
    assert bench.calls[-1][1]["engines"] is None and bench.calls[-1][1]["max_images"] == 512


def test_bench_is_listed_with_the_other_commands():
    assert "bench" in run_cli("--help").out
    assert Path(__file__).parents[1].joinpath("docs", "cli.md").read_text().count("rescli bench") >= 1
