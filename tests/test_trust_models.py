"""Model files from strangers: nothing in a checkpoint path runs, refusals say why, and metadata is checked on load.

A crafted TorchScript file (its __setstate__ overwrites a file through torch.from_file(shared=True)) named
best.pt must be refused by every way rescli reaches a checkpoint; a pickle naming a global is refused without
advice to load it unsafely; exports and checkpoints whose metadata or graph cannot be right fail on load in one
line naming the file and the field.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_class_folder, write_color_images

REPO = Path(__file__).resolve().parents[1]
UNTOUCHED = b"marker: untouched\n"

EVIL_SOURCE = '''
import torch


class Overwriter(torch.nn.Module):
    """Looks like a 2-class model; loading it overwrites the first bytes of ``target``."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.register_buffer("weight", torch.zeros(2, 3))

    def forward(self, x):
        return x.mean((2, 3)) @ self.weight.t()

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
        written = torch.from_file(state[1], shared=True, size=6, dtype=torch.uint8)
        written.fill_(88)
        self.weight = state[0] + written[0].float() * 0  # uses the mapping, so the compiler keeps it
        self.target = state[1]
        self.training = state[2]
'''


def one_error_line(res, path) -> str:
    assert res.code == 1, (res.code, res.err)
    assert res.out == "" and "Traceback" not in res.err, res.err
    lines = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0], res.err
    return lines[0]


def jit_save(module, path: Path, meta: dict | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream
        extra = {"rescli.json": json.dumps(meta)} if meta is not None else {}
        torch.jit.save(module, str(path), _extra_files=extra)
    return path


# --- 1. a TorchScript program named like a checkpoint ---------------------------------------------------------

@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """runs/run1/best.pt that is a TorchScript program writing to ``marker``; proven to work before it is used."""
    root = tmp_path_factory.mktemp("evil")
    source = root / "overwriter_module.py"
    source.write_text(EVIL_SOURCE)
    spec = importlib.util.spec_from_file_location("overwriter_module", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    marker = root / "marker.txt"
    marker.write_bytes(UNTOUCHED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module.Overwriter(str(marker)))
    meta = {"format": "rescli-export", "classes": ["a", "b"], "img_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}
    best = root / "runs" / "run1" / "best.pt"
    best.parent.mkdir(parents=True)
    jit_save(scripted, best, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(best))  # what rescli used to do with it
    assert marker.read_bytes().startswith(b"XXXXXX"), "the payload must really work, or the tests below prove nothing"
    marker.write_bytes(UNTOUCHED)
    data = make_class_folder(root / "data", per_class=2, size=8, classes=("red", "green"))
    return {"root": root, "best": best, "marker": marker, "data": data, "image": next((data / "red").iterdir())}


@pytest.mark.parametrize("how", [
    "info file", "info run folder", "predict --model", "predict --model latest", "predict RESCLI_MODEL",
    "predict runs/*/best.pt", "evaluate", "evaluate latest", "export", "finetune --weights", "named .pth",
    "named .jit",
])
def test_torchscript_named_as_a_checkpoint_never_runs(cli, evil, how, monkeypatch, tmp_path):
    root, best, image, data = evil["root"], evil["best"], evil["image"], evil["data"]
    path = best
    if how.startswith("named"):
        path = tmp_path / f"model{how.rsplit(' ', 1)[1]}"
        shutil.copy(best, path)
    args = {
        "info file": ("info", best), "info run folder": ("info", best.parent),
        "predict --model": ("predict", image, "--model", best),
        "predict --model latest": ("predict", image, "-m", "latest"),
        "predict RESCLI_MODEL": ("predict", image), "predict runs/*/best.pt": ("predict", image),
        "evaluate": ("evaluate", best, data, "--no-files"),
        "evaluate latest": ("evaluate", "latest", data, "--no-files"),
        "export": ("export", best.parent, "-o", tmp_path / "m.ts"),
        "finetune --weights": ("finetune", data, "--weights", best, "--img-size", "8", "--epochs", "1",
                               "--output", tmp_path / "run"),
        "named .pth": ("predict", image, "--model", path), "named .jit": ("info", path),
    }[how]
    if how == "predict RESCLI_MODEL":
        monkeypatch.setenv("RESCLI_MODEL", str(best.parent))
    res = cli(*args, cwd=root)
    # the automatic lookups name it relative to the current folder
    line = one_error_line(res, path.relative_to(root) if path.is_relative_to(root) else path)
    assert "TorchScript program" in line and ".ts or .torchscript" in line
    assert evil["marker"].read_bytes() == UNTOUCHED


def test_torchscript_opens_only_from_a_name_made_for_it(cli, trained_run, tmp_path):
    from rescli.inference.lookup import model_kind

    assert [model_kind(f"m{s}") for s in (".ts", ".TorchScript", ".onnx", ".jit", ".pt", ".pth", "")] == [
        "torchscript", "torchscript", "onnx", "checkpoint", "checkpoint", "checkpoint", "checkpoint"]
    res = cli("export", trained_run, "--format", "torchscript", "-o", tmp_path / "m.pt")
    assert res.code == 2 and "must be named .ts or .torchscript" in res.err and not (tmp_path / "m.pt").exists()
    res = cli("export", trained_run, "--format", "onnx", "-o", tmp_path / "m.ts")
    assert res.code == 2 and "must be named .onnx" in res.err and not (tmp_path / "m.ts").exists()
    assert cli("export", trained_run, "-o", tmp_path / "m.torchscript").code == 0
    image = write_color_images(tmp_path / "img", (220, 40, 40), 1)[0]
    res = cli("predict", image, "--model", tmp_path / "m.torchscript", "-f", "jsonl")
    assert res.code == 0 and "torchscript, 3 classes" in res.err, res.err


# --- 2. a pickle that names code ------------------------------------------------------------------------------

class RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Payload:
    """A class of this module: weights_only loading refuses any such object too."""


@pytest.mark.parametrize("payload", ["os.system", "own class"])
def test_pickled_code_is_refused_without_unsafe_advice(cli, tmp_path, payload):
    marker = tmp_path / "ran"
    obj = RunsAShellCommand(marker) if payload == "os.system" else Payload()
    path = tmp_path / "model.pt"
    torch.save({"format": "rescli-checkpoint", "classes": ["a", "b"], "x": obj}, path)
    image = write_color_images(tmp_path / "img", (220, 40, 40), 1)[0]
    named = "system" if payload == "os.system" else "Payload"
    for args in (("predict", image, "--model", path), ("info", path)):
        line = one_error_line(cli(*args), path)
        assert "holds code or an object that rescli will not load" in line and named in line, line
        assert "weights_only" not in line.lower() and "trusted" not in line.lower(), line
    from rescli.core.errors import RescliError
    from rescli.models.registry import create_model
    from rescli.models.weights import load_pretrained

    with pytest.raises(RescliError) as exc:  # --weights PATH reads files the same way
        load_pretrained(create_model("resnet18", 2), arch="resnet18", weights=str(path))
    assert exc.value.message.startswith(f"--weights {path}: not a readable weights file: it holds code or an object")
    assert "weights_only" not in exc.value.message and named in exc.value.message
    assert not marker.exists()


def test_other_unreadable_files_never_get_unsafe_advice(tmp_path):
    from rescli.core.errors import RescliError
    from rescli.models.checkpoint import load_checkpoint

    cases = {"junk.pt": b"not a torch file at all", "empty.pt": b"", "onnx.pt": b"\x08\x07\x12\x07pytorch" + b"\0" * 40}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RescliError) as exc:
            load_checkpoint(tmp_path / name)
        message = exc.value.message
        assert message.startswith(f"{tmp_path / name}: not a readable rescli checkpoint") and "\n" not in message
        assert "weights_only" not in message and "trusted" not in message, message
        if name == "onnx.pt":
            assert "looks like an ONNX model" in message and "named .onnx" in message, message


# --- 14. metadata that cannot be right --------------------------------------------------------------------------

BAD_METADATA = {  # field -> (value, words the one-line error must contain)
    "std zero": ("std", [0.2, 0.0, 0.2], "above 0"),
    "temperature zero": ("temperature", 0.0, "above 0"),
    "temperature nan": ("temperature", float("nan"), "finite number above 0"),
    "img_size zero": ("img_size", 0, "whole number of pixels"),
    "mean of 2": ("mean", [0.5, 0.5], "3 finite numbers"),
    "std infinite": ("std", [0.2, float("inf"), 0.2], "3 finite numbers"),
    "classes 5 for 3 outputs": ("classes", ["a", "b", "c", "d", "e"], "5 names, but the model outputs 3 logits"),
    "duplicate classes": ("classes", ["red", "red", "blue"], "more than once"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA) + ["unknown arch"])
def test_checkpoint_metadata_is_checked_on_load(cli, trained_run, tmp_path, case):
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    field, value, words = BAD_METADATA.get(case, ("arch", "resnet7", "unknown architecture"))
    ckpt[field] = value
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    image = write_color_images(tmp_path / "img", (220, 40, 40), 1)[0]
    for args in (("predict", image, "--model", path, "-f", "jsonl"), ("info", path)):
        line = one_error_line(cli(*args), path)
        assert f"{path}: {field} " in line and words in line, line


def _exported(trained_run, tmp_path_factory, fmt: str) -> Path:
    out = tmp_path_factory.mktemp(f"good-{fmt}") / ("m.ts" if fmt == "torchscript" else "m.onnx")
    from conftest import run_cli

    res = run_cli("export", trained_run, "--format", fmt, "-o", out)
    assert res.code == 0, res.err
    return out


@pytest.fixture(scope="module")
def good_ts(trained_run, tmp_path_factory) -> Path:
    return _exported(trained_run, tmp_path_factory, "torchscript")


def ts_meta(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {"rescli.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), _extra_files=extra)  # our own export
    return module, json.loads(extra["rescli.json"])


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_torchscript_export_metadata_is_checked_on_load(cli, good_ts, tmp_path, case):
    module, meta = ts_meta(good_ts)
    field, value, words = BAD_METADATA[case]
    meta[field] = value
    path = jit_save(module, tmp_path / "bad.ts", meta)
    image = write_color_images(tmp_path / "img", (220, 40, 40), 1)[0]
    for args in (("predict", image, "--model", path, "-f", "jsonl"), ("info", path)):
        line = one_error_line(cli(*args), path)
        assert f"{path}: {field} " in line and words in line, line


class Logits(torch.nn.Module):
    """A stand-in network: mean colour -> ``outputs`` logits, or a 4-D map with ``four_d``."""

    def __init__(self, outputs: int, four_d: bool = False) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(3, outputs, 1)
        self.four_d = four_d

    def forward(self, x):
        y = self.head(x.mean((2, 3), keepdim=True))
        return y if self.four_d else y.flatten(1)


@pytest.mark.parametrize("case", ["5 logits for 2 classes", "4-D output"])
def test_torchscript_export_outputs_are_checked_on_load(cli, tmp_path, case):
    net = Logits(5 if case.startswith("5") else 2, four_d=case == "4-D output").eval()
    meta = {"format": "rescli-export", "classes": ["a", "b"], "img_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3,
            "temperature": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, torch.zeros(1, 3, 8, 8))
    path = jit_save(traced, tmp_path / "m.ts", meta)
    image = write_color_images(tmp_path / "img", (220, 40, 40), 1)[0]
    field = "classes" if case.startswith("5") else "output"
    for args in (("predict", image, "--model", path, "-f", "jsonl"), ("info", path)):
        line = one_error_line(cli(*args), path)
        assert f"{path}: {field} " in line, line


# --- ONNX graphs built by hand -------------------------------------------------------------------------------------

def onnx_model(path: Path, *, channels: int = 3, size: int = 24, logits: int = 2, four_d: bool = False,
               **meta_changes) -> Path:
    """A tiny valid graph: global average pool, then a [channels, logits] matrix; its metadata says 24 px, 2 classes."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    pool = helper.make_node("GlobalAveragePool", ["input"], ["pooled"])
    if four_d:
        nodes, out_shape = [helper.make_node("Identity", ["pooled"], ["logits"])], ["batch", channels, 1, 1]
        weights = []
    else:
        flat = helper.make_node("Flatten", ["pooled"], ["flat"])
        nodes, out_shape = [flat, helper.make_node("MatMul", ["flat", "w"], ["logits"])], ["batch", logits]
        matrix = np.linspace(-1, 1, channels * logits, dtype=np.float32).reshape(channels, logits)
        weights = [numpy_helper.from_array(matrix, "w")]
    graph = helper.make_graph(
        [pool, *nodes], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"format": "rescli-export", "arch": "resnet18", "classes": ["red", "blue"], "img_size": 24,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "temperature": 1.5, **meta_changes}
    entry = model.metadata_props.add()
    entry.key, entry.value = "rescli.json", json.dumps(meta)
    save(model, str(path))
    return path


ONNX_CASES = {  # name -> (graph changes, the field the error names, words it contains)
    "input size 32 for img_size 24": ({"size": 32}, "input", "32x32 images, but its metadata says img_size 24"),
    "1-channel graph": ({"channels": 1}, "input", "1-channel images"),
    "4-D output": ({"four_d": True}, "output", "4 axes"),
    "5 logits for 2 classes": ({"logits": 5}, "classes", "2 names, but the model outputs 5 logits"),
    "std 0": ({"std": [0.2, 0.0, 0.2]}, "std", "above 0"),
    "temperature 0": ({"temperature": 0}, "temperature", "above 0"),
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_onnx_graph_and_metadata_are_checked_on_load(cli, tmp_path, case):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    changes, field, words = ONNX_CASES[case]
    image = write_color_images(tmp_path / "img", (220, 40, 40), 1)[0]
    good = onnx_model(tmp_path / "good.onnx")
    res = cli("predict", image, "--model", good, "-f", "jsonl")
    assert res.code == 0 and json.loads(res.out)["label"] in ("red", "blue"), res.err  # the checks let a sound graph in
    path = onnx_model(tmp_path / "bad.onnx", **changes)
    for args in (("predict", image, "--model", path, "-f", "jsonl"), ("info", path)):
        line = one_error_line(cli(*args), path)
        assert f"{path}: {field} " in line and words in line, line


def test_predictor_checks_every_batch_of_logits():
    from rescli.core.errors import RescliError
    from rescli.inference.predictor import Predictor

    predictor = Predictor(classes=["a", "b"], img_size=8, mean=[0.5] * 3, std=[0.5] * 3, temperature=1.0,
                          logits_fn=lambda x: torch.zeros(len(x), 5), kind="onnx", source="m.onnx")
    with pytest.raises(RescliError, match=r"m.onnx: output \(4, 5\) for 4 images: expected logits of shape \(4, 2\)"):
        predictor.logits(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))


def test_onnx_example_script_refuses_bad_metadata(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    image = write_color_images(tmp_path / "img", (220, 40, 40), 1)[0]
    script = str(REPO / "examples" / "predict_onnx.py")
    for changes, field in (({"temperature": 0}, "temperature"), ({"std": [0.2, 0.0, 0.2]}, "std"),
                           ({"logits": 5}, "classes"), ({"channels": 1}, "input")):
        path = onnx_model(tmp_path / "bad.onnx", **changes)
        res = subprocess.run([sys.executable, script, str(path), str(image)], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode != 0 and res.stdout == "", (changes, res.stdout, res.stderr)
        assert res.stderr.strip().splitlines() == [res.stderr.strip()] and f"{path}: {field}" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, script, str(onnx_model(tmp_path / "good.onnx")), str(image)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and json.loads(res.stdout)["label"] in ("red", "blue"), res.stderr


@pytest.mark.parametrize("command", ["predict", "evaluate", "info", "export"])
def test_help_says_a_torchscript_file_is_a_program(cli, command):
    res = cli(command, "--help")
    text = " ".join(res.out.replace("│", " ").split())  # rich wraps and boxes the help: compare the words
    names_the_risk = "is a program" in text and ("use only your own" in text or "you made yourself" in text)
    assert res.code == 0 and names_the_risk, text
