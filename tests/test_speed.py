"""The speed features keep results the same: decoded-image caches, one-call centre crops, fused input
normalisation, and predict's OpenMP setting (issue 5). Speed itself is measured by bench/bench.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folder
from PIL import Image
from torchvision import transforms as T

from rescli.data.loading import DecodedCache, ImageSamples, make_loader
from rescli.data.transforms import (
    CenterSquare,
    build_transform,
    center_square_tensor,
    to_model_input,
)
from rescli.inference import jpeg as jpeg_module
from rescli.inference.predictor import CompiledForward


def _smooth_photo(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([np.sin(xx / 90 + c) * np.cos(yy / 70 + c) for c in range(3)], -1)  # smooth at any of these scales
    return Image.fromarray(((rgb * 0.5 + 0.5) * 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (300, 300), (100, 60), (64, 64)])
def test_center_square_is_resize_then_center_crop_in_one_call(size):
    img = _smooth_photo(*size)
    ours = T.PILToTensor()(CenterSquare(64)(img)).float()
    reference = T.PILToTensor()(T.CenterCrop(64)(T.Resize(64, antialias=True)(img))).float()
    assert ours.shape == reference.shape == (3, 64, 64)
    # The same pixels up to the reference's rounding of the crop to whole pixels (a sub-pixel shift).
    assert (ours - reference).abs().mean() < 3.0
    if size == (64, 64):  # already the right size: untouched
        assert torch.equal(ours, reference)


def test_model_input_is_normalised_in_channels_last():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = to_model_input(images, device=torch.device("cpu"), mean=mean, std=std, channels_last=True)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def _cached_samples(tmp_path: Path, *, budget_images: int, shared: bool):
    root = make_class_folder(tmp_path / "d", per_class=4, size=20)
    samples = [(str(p), 0) for p in sorted(root.rglob("*.png"))]
    cache = DecodedCache(len(samples), 16, budget_bytes=budget_images * 3 * 16 * 16, shared=shared)
    ds = ImageSamples(samples, build_transform(img_size=16, train=False), cache=cache)
    return ds, samples


def _images_and_failures(ds, *, workers: int):
    loader = make_loader(ds, batch_size=5, shuffle=False, workers=workers)
    images, failures = [], []
    for batch in loader:
        if len(batch.labels):
            images.append(batch.images)
        failures += [i for i, _ in batch.failures]
    return torch.cat(images) if images else None, failures


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_images_are_served_from_memory_after_the_first_pass(tmp_path, workers):
    ds, samples = _cached_samples(tmp_path, budget_images=100, shared=workers > 0)
    first, failures = _images_and_failures(ds, workers=workers)
    assert not failures and len(first) == len(samples)
    assert bool(ds.cache.filled.all())  # filled by the worker processes, seen by this one: shared memory
    for path, _ in samples:  # the files change under us; the second pass must not read them
        Path(path).write_bytes(b"not an image any more")
    second, failures = _images_and_failures(ds, workers=workers)
    assert not failures and torch.equal(first, second)


def test_decoded_cache_holds_only_what_its_budget_allows(tmp_path):
    ds, samples = _cached_samples(tmp_path, budget_images=5, shared=False)
    _images_and_failures(ds, workers=0)
    assert ds.cache.capacity == 5 and bool(ds.cache.filled.all())
    for path, _ in samples:
        Path(path).write_bytes(b"broken")
    _, failures = _images_and_failures(ds, workers=0)
    assert failures == list(range(5, len(samples)))  # beyond the budget: read again, and found broken


FAST = ["--weights", "none", "--img-size", "24", "--batch-size", "8", "--workers", "0", "--epochs", "2"]


def _history(run: Path) -> list[dict]:
    rows = (run / "history.csv").read_text().splitlines()
    keys = rows[0].split(",")
    return [{k: v for k, v in zip(keys, r.split(",")) if "loss" in k or "accuracy" in k} for r in rows[1:]]


def test_image_cache_changes_nothing_but_the_time(tmp_path, cli):
    folder = make_class_folder(tmp_path / "d", per_class=8)
    runs = {}
    for name, extra in (("cached", []), ("uncached", ["--no-cache-images"]), ("light", ["--augment", "light"])):
        runs[name] = tmp_path / name
        res = cli("finetune", folder, *FAST, *extra, "--output", runs[name])
        assert res.code == 0, res.err
    info = {k: json.loads((r / "run.json").read_text()) for k, r in runs.items()}
    counts = info["cached"]["settings"]
    assert info["cached"]["image_cache"] == {"val": counts["val_images"], "train": counts["train_images"]}
    assert "image_cache" not in info["uncached"]
    assert info["light"]["image_cache"] == {"val": counts["val_images"]}  # random crops differ every epoch: not cached
    assert _history(runs["cached"]) == _history(runs["uncached"])


def test_cli_loads_without_torch_so_predict_can_set_openmp_first():
    code = (
        "import os, sys; from rescli import cli; assert 'torch' not in sys.modules, 'rescli.cli imported torch'; "
        "from rescli.core.cpus import let_idle_threads_sleep; let_idle_threads_sleep(); "
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PASSIVE"
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert chosen.stdout.strip() == "ACTIVE"  # the user's own setting wins


# --- JPEGs decoded by torchvision (nvJPEG on a GPU; the same code on the CPU here) ---------------------------------


def _jpeg(path: Path, color, *, size=(40, 30), mode="RGB", exif_orientation: int | None = None) -> Path:
    rng = np.random.default_rng(len(path.name))
    pixels = np.clip(np.array(color, np.float32) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=92, **kwargs)
    return path


def test_only_plain_jpegs_are_handed_over_undecoded(tmp_path):
    from rescli.data.images import plain_jpeg_bytes

    plain = _jpeg(tmp_path / "plain.jpg", (200, 40, 40))
    grey = _jpeg(tmp_path / "grey.jpg", (90, 90, 90), mode="L")
    assert plain_jpeg_bytes(plain) == plain.read_bytes()
    assert plain_jpeg_bytes(grey) is not None
    declined = {
        "rotated": _jpeg(tmp_path / "rotated.jpg", (200, 40, 40), exif_orientation=6),  # Pillow turns it upright
        "cmyk": _jpeg(tmp_path / "cmyk.jpg", (200, 40, 40), mode="CMYK"),
        "png": tmp_path / "x.png",
        "truncated": tmp_path / "cut.jpg",
        "missing": tmp_path / "missing.jpg",
    }
    Image.new("RGB", (8, 8)).save(declined["png"])
    declined["truncated"].write_bytes(plain.read_bytes()[:-200])
    for name, path in declined.items():
        assert plain_jpeg_bytes(path) is None, name


def test_center_square_on_tensors_matches_pillow():
    for size in [(500, 375), (120, 200), (64, 64)]:
        img = _smooth_photo(*size)
        ours = center_square_tensor(T.PILToTensor()(img), 64).float()
        pillow = T.PILToTensor()(CenterSquare(64)(img)).float()
        assert ours.shape == (3, 64, 64) and (ours - pillow).abs().mean() < 3.0


def test_predict_with_torchvision_jpeg_decoding_agrees_with_pillow(trained_run, tmp_path, cli, monkeypatch):
    from conftest import COLORS


    inbox = tmp_path / "inbox"
    for name, color in COLORS.items():
        _jpeg(inbox / f"{name}_wide.jpg", color, size=(60, 40))
        _jpeg(inbox / f"{name}_tall.jpg", color, size=(30, 50))
    _jpeg(inbox / "grey.jpg", (120, 120, 120), mode="L")
    _jpeg(inbox / "red_rotated.jpg", COLORS["red"], exif_orientation=8)
    Image.new("RGB", (30, 30), COLORS["blue"]).save(inbox / "blue.png")
    (inbox / "cut.jpg").write_bytes((inbox / "red_wide.jpg").read_bytes()[:300])

    decoded_by_torchvision = []
    real = jpeg_module.center_square_tensor

    def counting_center_square_tensor(img, size):
        decoded_by_torchvision.append(1)
        return real(img, size)

    monkeypatch.setattr(jpeg_module, "center_square_tensor", counting_center_square_tensor)
    rows = {}
    for decoder in ("pillow", "torchvision"):
        res = cli("predict", inbox, "--model", trained_run, "--format", "jsonl", "--jpeg-decoder", decoder,
                  "--precision", "fp32")
        assert res.code == 1, res.err  # the truncated file is an error row either way
        rows[decoder] = {Path(r["path"]).name: r for r in map(json.loads, res.out.splitlines())}
        if decoder == "pillow":
            assert not decoded_by_torchvision
    # the seven plain JPEGs; the rotated one, the PNG and the cut one took Pillow's path
    assert len(decoded_by_torchvision) == 7
    assert rows["pillow"].keys() == rows["torchvision"].keys()
    assert "error" in rows["torchvision"]["cut.jpg"]
    assert rows["torchvision"]["cut.jpg"]["error"] == rows["pillow"]["cut.jpg"]["error"]
    for name, row in rows["pillow"].items():
        if name != "cut.jpg":
            assert rows["torchvision"][name]["label"] == row["label"], name
            assert abs(rows["torchvision"][name]["score"] - row["score"]) < 0.05, name
            if name != "grey.jpg":
                assert row["label"] == name.split("_")[0].split(".")[0], name


def test_torchvision_jpeg_decoder_is_refused_for_onnx_models(tmp_path, cli, trained_run):
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "m.onnx"
    assert cli("export", trained_run, "--format", "onnx", "-o", onnx_path).code == 0
    res = cli("predict", tmp_path, "--model", onnx_path, "--jpeg-decoder", "torchvision")
    assert res.code == 2 and "--jpeg-decoder torchvision" in res.err


def test_bench_script_runs_every_phase_and_prints_the_ratios(tmp_path):
    """bench/bench.py is a script, not a test; this only keeps it working (tiny images, one step, one round)."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "bench.py"
    phases = "model_train,model_infer,finetune,predict,predict_x4,baseline,finetune_busy,predict_busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(bench), "--img-size", "32", "--images", "24", "--batch", "4", "--steps", "1",
         "--warmup", "1", "--repeat", "1", "--phases", phases, "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for phase in phases.split(","):
        assert report["results"][phase].get("images_per_s", 0) > 0, (phase, report["results"][phase])
    assert report["results"]["predict"]["images"] == 24 and report["results"]["predict_x4"]["images"] == 96
    assert {"finetune / baseline (target >= 3.0)", "finetune / model_train (target >= 0.85)",
            "predict / model_infer (target >= 0.80)", "finetune_busy / finetune (target >= 0.40)",
            "predict_busy / predict (target >= 0.40)"} <= set(report["ratios"])


def test_predict_compile_gives_the_eager_labels_and_pads_partial_batches(trained_run, class_folder, cli, monkeypatch):

    shapes = []
    real_init = CompiledForward.__init__

    def watching_init(self, model):
        real_init(self, model)
        compiled = self.compiled
        self.compiled = lambda x: shapes.append(tuple(x.shape)) or compiled(x)

    monkeypatch.setattr(CompiledForward, "__init__", watching_init)
    rows = {}
    for extra in ([], ["--compile"]):
        res = cli("predict", class_folder, "--model", trained_run, "--format", "jsonl", "--batch-size", "8",
                  "--precision", "fp32", *extra)
        assert res.code == 0, res.err
        rows[bool(extra)] = [json.loads(line) for line in res.out.splitlines()]
    n = len(rows[False])
    # the last, partial batch was padded: one shape, one compile
    assert n % 8 and shapes and all(s[0] == 8 for s in shapes)
    assert len(shapes) == -(-n // 8)
    assert [r["label"] for r in rows[True]] == [r["label"] for r in rows[False]]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(rows[True], rows[False])) < 1e-3


def test_predict_compile_falls_back_to_eager_when_compiling_fails(trained_run, class_folder, cli, monkeypatch):

    def failing_compile(model, **kwargs):
        def compiled(x):
            raise RuntimeError("no C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    res = cli("predict", class_folder, "--model", trained_run, "--format", "jsonl", "--compile")
    assert res.code == 0, res.err
    warning = "--compile: torch.compile failed (RuntimeError: no C++ compiler found); running the model uncompiled"
    assert res.err.count(warning) == 1
    assert all("label" in json.loads(line) for line in res.out.splitlines())


def test_compile_is_refused_for_exports(trained_run, tmp_path, cli):
    ts = tmp_path / "m.ts"
    assert cli("export", trained_run, "--format", "torchscript", "-o", ts).code == 0
    res = cli("predict", tmp_path, "--model", ts, "--compile")
    assert res.code == 2 and "--compile is for checkpoints" in res.err


def test_evaluate_compile_gives_the_eager_metrics(trained_run, class_folder, cli):
    results = []
    for extra in ([], ["--compile"]):
        res = cli("evaluate", trained_run, class_folder, "--format", "json", "--no-files", "--precision", "fp32",
                  *extra)
        assert res.code == 0, res.err
        results.append(json.loads(res.out))
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert abs(results[0]["log_loss"] - results[1]["log_loss"]) < 1e-3
