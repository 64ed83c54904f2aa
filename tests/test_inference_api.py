"""The library side of rescli.inference: export_model's format keyword, where logits become rows, where JPEGs decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rescli.core.errors import UsageError
from rescli.inference.describe import describe_model
from rescli.inference.export import export_model
from rescli.inference.export_format import export_metadata
from rescli.inference.jpeg import jpeg_decode_device
from rescli.inference.scores import label_rows
from rescli.models.checkpoint import load_checkpoint, make_checkpoint, model_fields, save_checkpoint
from rescli.models.registry import create_model


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """An untrained CIFAR-style resnet20 for 2 classes at 16 px: enough to export and compare, in a second."""
    torch.manual_seed(0)
    model = create_model("resnet20", 2)
    ckpt = make_checkpoint(model_state=model.state_dict(), arch="resnet20", classes=["cat", "dog"], img_size=16,
                           mean=[0.5] * 3, std=[0.25] * 3, temperature=1.5, metrics={"accuracy": 0.5, "ece": 0.1})
    return save_checkpoint(ckpt, tmp_path / "best.pt")


def test_export_model_takes_to_as_the_new_name_of_fmt(small_checkpoint, tmp_path):
    new = export_model(model=small_checkpoint, to="torchscript", output=tmp_path / "new.ts")
    old = export_model(model=small_checkpoint, fmt="torchscript", output=tmp_path / "old.ts")
    for result, name in ((new, "new.ts"), (old, "old.ts")):
        assert result["format"] == "torchscript" and result["output"] == str(tmp_path / name)
        assert result["parity_ok"] is True and (tmp_path / name).is_file()
    both = export_model(model=small_checkpoint, to="torchscript", fmt="torchscript", output=tmp_path / "both.ts")
    assert both["format"] == "torchscript"
    with pytest.raises(UsageError, match="give the format once"):
        export_model(model=small_checkpoint, to="onnx", fmt="torchscript", output=tmp_path / "x.onnx")
    formats = "torchscript, onnx, onnx-int8, openvino, openvino-int8"
    with pytest.raises(UsageError, match=rf"^--to 'tflite': expected one of {formats}$"):
        export_model(model=small_checkpoint, to="tflite")
    with pytest.raises(UsageError, match=rf"^--format 'tflite': expected one of {formats}$"):
        export_model(model=small_checkpoint, fmt="tflite")
    with pytest.raises(UsageError, match="no export format given"):
        export_model(model=small_checkpoint)
    assert not (tmp_path / "x.onnx").exists()


def test_export_metadata_and_info_show_the_same_model_fields(small_checkpoint):
    ckpt = load_checkpoint(small_checkpoint)
    fields = model_fields(ckpt)
    assert fields == {"arch": "resnet20", "arch_kwargs": {}, "task": "single-label", "classes": ["cat", "dog"],
                      "img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "temperature": 1.5}
    meta = export_metadata(ckpt, source="best.pt")
    info = describe_model(small_checkpoint)
    assert {k: meta[k] for k in fields} == fields == {k: info[k] for k in fields}
    assert meta["metrics"] == {"accuracy": 0.5} and info["metrics"] == {"accuracy": 0.5, "ece": 0.1}


def test_label_rows_give_calibrated_top_k_and_unknown_below_the_threshold():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    rows = label_rows(["a.png", "b.png"], logits, classes=["x", "y", "z"], top_k=5, temperature=2.0, threshold=0.4)
    sure = torch.softmax(logits[0] / 2.0, dim=0)
    assert rows[0] == {"path": "a.png", "label": "x", "score": round(float(sure[0]), 6),
                       "topk": [{"label": c, "score": round(float(s), 6)} for c, s in zip("xyz", sure.tolist())]}
    assert rows[1]["label"] == "unknown" and rows[1]["topk"][0]["label"] == "y"  # top-k is still the model's view
    assert [len(r["topk"]) for r in rows] == [3, 3]  # top_k beyond the classes: every class once


def test_jpeg_decode_device_uses_pillow_for_a_model_off_the_gpu():
    assert jpeg_decode_device("auto", model_device=torch.device("cpu")) is None
    assert jpeg_decode_device("auto", model_device=None) is None  # onnxruntime: Pillow's images
    assert jpeg_decode_device(None, model_device=torch.device("cpu")) is None
    assert jpeg_decode_device("cpu", model_device=None) == torch.device("cpu")
