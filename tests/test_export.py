"""rescli export and info: self-describing TorchScript/ONNX files.

They predict like the checkpoint, with and without rescli.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """The tiny run exported once to each format.

    TorchScript as a user would (default name, table output), ONNX as json.
    """
    out = tmp_path_factory.mktemp("exports")
    ckpt = out / "model.pt"
    ckpt.write_bytes((trained_run / "best.pt").read_bytes())
    res = run_cli("export", ckpt, "--check-images", trained_run.parent / "data" / "red")
    assert res.code == 0, res.err
    results = {"torchscript": {"output": str(out / "model.ts"), "table": res.out}}  # default name: MODEL with .ts
    res = run_cli("export", trained_run, "--format", "onnx", "--output", out / "model.onnx", "--print", "json")
    assert res.code == 0, res.err
    results["onnx"] = json.loads(res.out)
    return results


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def blocked_imports_prelude(*names: str) -> str:
    """Python source that makes `import NAME` fail for each name, as if the package were not installed."""
    return "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names)


# --- export --------------------------------------------------------------------------------------------------

def test_exports_embed_metadata_and_pass_parity(exports, trained_run):
    result = exports["onnx"]
    assert result["parity_ok"] is True and Path(result["output"]).is_file()
    assert result["max_abs_diff_random"] < 1e-4 and result["max_abs_diff_real"] < 1e-4
    assert result["real_images"] > 0  # the training folder is still there: real images were checked too
    lines = exports["torchscript"]["table"].splitlines()
    assert lines[0] == f"wrote {exports['torchscript']['output']} (torchscript, 3 classes, 24 px)"
    assert lines[1].startswith("max |logit difference| vs PyTorch, random images: ")
    assert lines[2].startswith("max |logit difference| vs PyTorch, 8 real images: ")  # from --check-images
    assert max(float(lines[1].rsplit(" ", 1)[1]), float(lines[2].rsplit(" ", 1)[1])) < 1e-4
    with zipfile.ZipFile(exports["torchscript"]["output"]) as z:
        meta = json.loads(z.read(next(n for n in z.namelist() if n.endswith("extra/rescli.json"))))
    proto = onnx.load(exports["onnx"]["output"])
    onnx_meta = json.loads({p.key: p.value for p in proto.metadata_props}["rescli.json"])
    for m, source in ((meta, "model.pt"), (onnx_meta, "best.pt")):
        assert m["classes"] == ["blue", "green", "red"] and m["img_size"] == 24 and len(m["mean"]) == len(m["std"]) == 3
        assert m["arch"] == "resnet18" and m["format"] == "rescli-export" and m["source"] == source
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis


def test_onnx_batch_axis_is_dynamic(exports):
    session = ort.InferenceSession(exports["onnx"]["output"], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for n in (1, 5):
        logits = session.run(None, {name: np.zeros((n, 3, 24, 24), np.float32)})[0]
        assert logits.shape == (n, 3)


def test_export_errors(cli, exports, trained_run, tmp_path, monkeypatch):
    res = cli("export", exports["onnx"]["output"], "--format", "torchscript", "-o", tmp_path / "x.ts")
    assert res.code == 1 and "already a onnx export" in res.err
    res = cli("export", tmp_path / "nope.pt")
    assert res.code == 1 and "no such file" in res.err
    res = cli("export", trained_run / "best.pt", "-o", trained_run / "best.pt")
    assert res.code == 2 and "would overwrite the checkpoint" in res.err
    res = cli("export", trained_run, "--format", "tflite")
    assert res.code == 2
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the optional extra were not installed
    res = cli("export", trained_run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert res.code == 1 and not (tmp_path / "m.onnx").exists() and "Traceback" not in res.err
    assert res.err.strip() == ("error: ONNX export needs the onnx package: pip install 'rescli[onnx]'"
                               " (or pip install onnx onnxruntime)")


# --- predicting with exports -----------------------------------------------------------------------------------------

def test_exports_predict_the_same_labels_as_the_checkpoint(cli, exports, trained_run):
    folder = trained_run.parent / "data"  # the real training folder: 36 images
    runs = {}
    for name, model in (("checkpoint", trained_run / "best.pt"), ("torchscript", exports["torchscript"]["output"]),
                        ("onnx", exports["onnx"]["output"])):
        res = cli("predict", folder, "--model", model, "--precision", "fp32", "-f", "jsonl", "-k", "3",
                  "--workers", "1")
        assert res.code == 0, res.err
        assert f"({'--model'}; {name}, 3 classes)" in res.err
        runs[name] = jsonl(res.out)
    ref = runs["checkpoint"]
    assert len(ref) == 36
    for name in ("torchscript", "onnx"):
        assert [r["path"] for r in runs[name]] == [r["path"] for r in ref]
        assert [r["label"] for r in runs[name]] == [r["label"] for r in ref], name
        for a, b in zip(runs[name], ref):
            assert [t["score"] for t in a["topk"]] == pytest.approx([t["score"] for t in b["topk"]], abs=1e-4)


def test_torchscript_loads_with_plain_torch(exports, trained_run, cli):
    """No rescli import: torch.jit.load + the metadata inside the file are enough to label images the same way."""
    folder = trained_run.parent / "data"
    code = blocked_imports_prelude("rescli") + f'''
import json, os, numpy as np, torch
from PIL import Image
extra = {{"rescli.json": ""}}
model = torch.jit.load({exports["torchscript"]["output"]!r}, _extra_files=extra).eval()
meta = json.loads(extra["rescli.json"])
size, classes = meta["img_size"], meta["classes"]
paths = sorted(os.path.join(d, f) for d, _, fs in os.walk({str(folder)!r}) for f in fs)
batch = []
for p in paths:
    img = Image.open(p).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, int(w * s)), max(size, int(h * s))), Image.BILINEAR)
    l, t = round((img.width - size) / 2), round((img.height - size) / 2)
    x = np.asarray(img.crop((l, t, l + size, t + size)), np.float32).transpose(2, 0, 1) / 255
    batch.append((x - np.array(meta["mean"], np.float32)[:, None, None])
                 / np.array(meta["std"], np.float32)[:, None, None])
with torch.no_grad():
    probs = torch.softmax(model(torch.from_numpy(np.stack(batch))) / meta["temperature"], 1)
for p, row in zip(paths, probs):
    print(json.dumps({{"path": p, "label": classes[int(row.argmax())], "score": float(row.max())}}))
'''
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO.parent)
    assert res.returncode == 0, res.stderr
    plain = {r["path"]: r for r in jsonl(res.stdout)}
    ref = jsonl(cli("predict", folder, "--model", trained_run / "best.pt", "--precision", "fp32", "-f", "jsonl").out)
    assert len(plain) == len(ref) == 36
    for r in ref:
        assert plain[r["path"]]["label"] == r["label"]
        assert plain[r["path"]]["score"] == pytest.approx(r["score"], abs=1e-4)


def test_onnx_example_script_needs_only_onnxruntime_numpy_pillow(exports, trained_run, cli, tmp_path):
    folder = trained_run.parent / "data"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    code = blocked_imports_prelude("rescli", "torch", "torchvision") + (
        "import runpy\n"
        f"sys.argv = ['predict_onnx.py', {exports['onnx']['output']!r}, {str(folder)!r}, {str(broken)!r},"
        " '--top-k', '2', '--batch-size', '7']\n"
        f"runpy.run_path({str(REPO / 'examples' / 'predict_onnx.py')!r}, run_name='__main__')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 1, res.stderr  # the broken file
    rows = jsonl(res.stdout)
    assert rows[-1]["path"] == str(broken) and "error" in rows[-1]
    ref = jsonl(cli("predict", folder, "--model", exports["onnx"]["output"], "-f", "jsonl", "-k", "2").out)
    assert [(r["path"], r["label"]) for r in rows[:-1]] == [(r["path"], r["label"]) for r in ref]
    for a, b in zip(rows, ref):
        assert [t["score"] for t in a["topk"]] == pytest.approx([t["score"] for t in b["topk"]], abs=1e-5)


def test_predict_onnx_without_onnxruntime_gives_install_hint(cli, exports, trained_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    res = cli("predict", trained_run.parent / "data", "--model", exports["onnx"]["output"])
    assert res.code == 1 and res.out == ""
    assert res.err.strip() == "error: predicting with an .onnx model needs onnxruntime: pip install 'rescli[onnx]'"


@pytest.mark.parametrize("suffix", [".ts", ".onnx"])
def test_corrupt_exports_give_one_line_errors(cli, tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(os.urandom(3000))
    for args in (("predict", tmp_path, "--model", bad), ("info", bad)):
        res = cli(*args)
        assert res.code == 1 and "Traceback" not in res.err
        assert res.err.strip().startswith(f"error: {bad}: not a readable"), res.err


# --- info ------------------------------------------------------------------------------------------------------------

def test_info_on_checkpoint_and_exports(cli, exports, trained_run):
    models = {"checkpoint": trained_run / "best.pt", "torchscript": exports["torchscript"]["output"],
              "onnx": exports["onnx"]["output"]}
    temperatures = set()
    for kind, path in models.items():
        res = cli("info", path, "--format", "json")
        assert res.code == 0, res.err
        desc = json.loads(res.out)
        assert desc["kind"].startswith(kind) and desc["arch"] == "resnet18"
        assert desc["classes"] == ["blue", "green", "red"] and desc["img_size"] == 24
        temperatures.add(desc["temperature"])  # the calibration travels with the exports
        assert desc["parameters"] > 1_000_000 and "torch" in desc["versions"] and "accuracy" in desc["metrics"]
        table = cli("info", path)
        assert table.code == 0
        assert "resnet18" in table.out and "blue, green, red" in table.out and "img_size" in table.out
    assert len(temperatures) == 1 and temperatures.pop() > 0
    run_folder = json.loads(cli("info", trained_run, "--format", "json").out)
    assert run_folder["file"] == str(trained_run / "best.pt") and run_folder["settings"]["epochs"] == 2
    res = cli("info", trained_run / "nope.pt")
    assert res.code == 1 and "no such file" in res.err
